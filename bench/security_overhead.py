"""What security costs: a plain Mosquitto versus the production config (TLS + client certificates +
passwords + ACL) on the same machine, in the same run.

    python bench/security_overhead.py [--messages 5000] [--connects 20]

Figures (last line of stdout, one JSON object):
  plain_msgs_per_s / secure_msgs_per_s   QoS 1 telemetry publish -> twin subscriber throughput
  secure_throughput_ratio                secure / plain (1.0 = free)
  connect_ms_plain / connect_ms_secure   median CONNECT to CONNACK (new TCP/TLS connection each)
  connect_ms_secure_101 / _10000         the same with 101 (mosquitto_passwd's default) and 10 000
                                         PBKDF2 iterations: Mosquitto hashes on its event loop
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from forgeline.broker import start_mosquitto
from forgeline.broker.secure import start_secure_mosquitto
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, connect
from forgeline.security import passwords, pki


def throughput(publisher: MqttSettings, subscriber: MqttSettings, topic: str, count: int, size: int) -> float:
    received = 0
    done = threading.Event()

    def on_message(*_args: object) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    sub = connect(subscriber)
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(topic, qos=1)
    subscribed.wait(10)
    pub = connect(publisher)
    payload = bytes(size)
    start = time.perf_counter()
    for _ in range(count):
        pub.publish(topic, payload, qos=1)
    if not done.wait(120):
        raise SystemExit(f"only {received}/{count} messages arrived")
    elapsed = time.perf_counter() - start
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return count / elapsed


def connect_ms(settings: MqttSettings, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client = connect(settings)
        times.append((time.perf_counter() - start) * 1000)
        client.disconnect()
        client.loop_stop()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1024, help="payload bytes")
    parser.add_argument("--connects", type=int, default=20)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fl-bench-security-"))
    device = DeviceRef("acme", "site", "line", "printer1")
    print("starting a plain and a secure mosquitto", file=sys.stderr)
    plain = start_mosquitto(workdir=work / "plain")
    secure = start_secure_mosquitto(work / "secure", ["acme", "_twin"])
    try:
        # a user whose entry uses mosquitto_passwd's default iteration count
        entries = passwords.read_entries(secure.password_file)
        for iterations in (101, 10_000):
            user = f"acme@it{iterations}"
            entries[user] = passwords.hash_password(f"pw{iterations}", iterations=iterations)
            pki.issue(secure.pki, user)
            secure.passwords[user] = f"pw{iterations}"
        passwords.write_entries(secure.password_file, entries)
        secure.reload()

        plain_settings = MqttSettings(host=plain.host, port=plain.port)
        results: dict[str, float | int] = {"messages": args.messages, "payload_bytes": args.size}
        print("throughput", file=sys.stderr)
        # alternate the two twice so drift on a shared machine hits both
        plain_rates, secure_rates = [], []
        for _ in range(2):
            plain_rates.append(throughput(plain_settings, plain_settings, device.telemetry_topic,
                                          args.messages, args.size))
            secure_rates.append(throughput(secure.settings("acme"), secure.settings("_twin"),
                                           device.telemetry_topic, args.messages, args.size))
        results["plain_msgs_per_s"] = round(max(plain_rates))
        results["secure_msgs_per_s"] = round(max(secure_rates))
        results["secure_throughput_ratio"] = round(max(secure_rates) / max(plain_rates), 3)
        print("connect latency", file=sys.stderr)
        results["connect_ms_plain"] = round(connect_ms(plain_settings, args.connects), 2)
        results["connect_ms_secure"] = round(connect_ms(secure.settings("acme"), args.connects), 2)
        for iterations in (101, 10_000):
            results[f"connect_ms_secure_{iterations}"] = round(
                connect_ms(secure.settings(f"acme@it{iterations}"), args.connects), 2)
        results["pbkdf2_iterations"] = passwords.DEFAULT_ITERATIONS
    finally:
        plain.stop()
        secure.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
