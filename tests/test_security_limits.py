"""Bounded input at the broker (production config): slow-drip clients do not stall anyone, oversized
packets are cut off at the header, and the broker's memory does not follow what a client claims."""

from __future__ import annotations

import socket
import ssl
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_support import connect_packet, probe, publish_packet, tls_socket

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract.topics import DeviceRef

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

TENANT = f"lim{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("limits-broker"), [TENANT, "_twin"])
    yield broker
    broker.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _round_trip_latencies(secure: SecureBroker, count: int, gap: float) -> list[float]:
    """Latency of ``count`` QoS 1 round trips (telemetry -> twin subscriber), ``gap`` s apart."""
    device = DeviceRef(TENANT, "s", "a", f"rt{uuid.uuid4().hex[:6]}")
    twin = probe(secure.settings("_twin"))
    agent = probe(secure.settings(TENANT))
    try:
        twin.subscribe(device.telemetry_topic)
        latencies = []
        for i in range(count):
            start = time.monotonic()
            agent.publish(device.telemetry_topic, str(i).encode())
            twin.wait_topic(device.telemetry_topic, str(i).encode(), timeout=10)
            latencies.append(time.monotonic() - start)
            time.sleep(gap)
        return latencies
    finally:
        twin.close()
        agent.close()


def _client_hello(host: str) -> bytes:
    """The bytes of a real TLS ClientHello, made with ssl.MemoryBIO (no network)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_slow_drip_clients_do_not_stall_the_broker(secure: SecureBroker) -> None:
    """20 clients trickle a TLS ClientHello and 5 authenticated clients trickle an MQTT CONNECT and
    PUBLISH one byte at a time; meanwhile round trips of a normal client stay fast, and the
    trickled packets are still handled correctly once complete."""
    stop = threading.Event()
    hello = _client_hello(secure.host)
    results: dict[str, object] = {}
    device = DeviceRef(TENANT, "s", "a", "dripper")
    settings = secure.settings(TENANT)
    pair = secure.pki.client(TENANT)

    def drip_tls_hello() -> None:
        with socket.create_connection((secure.host, secure.port), timeout=10) as sock:
            for byte in hello:
                if stop.wait(0.02):
                    return
                sock.sendall(bytes([byte]))

    def drip_mqtt(index: int) -> None:
        sock = tls_socket(secure.host, secure.port, settings.ca_file or "", (str(pair.cert), str(pair.key)))
        try:
            packet = connect_packet(f"drip{index}{uuid.uuid4().hex[:4]}", settings.username, settings.password)
            packet += publish_packet(device.telemetry_topic, f"dripped-{index}".encode())
            for byte in packet:  # every byte its own TLS record
                if stop.wait(0.01):
                    return
                sock.sendall(bytes([byte]))
            results[f"connack{index}"] = sock.recv(4)
        finally:
            sock.close()

    watcher = probe(secure.settings("_twin"))
    watcher.subscribe(device.telemetry_topic)
    threads = [threading.Thread(target=drip_tls_hello, daemon=True) for _ in range(20)]
    threads += [threading.Thread(target=drip_mqtt, args=(i,), daemon=True) for i in range(5)]
    baseline = _round_trip_latencies(secure, 5, 0.0)
    try:
        for t in threads:
            t.start()
        during = _round_trip_latencies(secure, 20, 0.05)
        for t in threads[20:]:
            t.join(20)
        for i in range(5):
            watcher.wait_topic(device.telemetry_topic, f"dripped-{i}".encode())
    finally:
        stop.set()
        watcher.close()
        for t in threads:
            t.join(5)
    assert all(results[f"connack{i}"] == b"\x20\x02\x00\x00" for i in range(5)), results
    # Generous bound: a stalled broker would show seconds; this machine is shared and noisy.
    assert max(during) < 1.0, (statistics.median(baseline), during)
    assert secure.broker.alive()


def test_oversized_packet_is_cut_off_at_the_header(secure: SecureBroker) -> None:
    """A PUBLISH whose header claims more than max_packet_size: the broker closes the connection
    after the header, without reading or allocating the claimed size."""
    settings = secure.settings(TENANT)
    pair = secure.pki.client(TENANT)
    pid = secure.broker.pid
    assert pid is not None
    rss_before = _rss_kib(pid)
    sock = tls_socket(secure.host, secure.port, settings.ca_file or "", (str(pair.cert), str(pair.key)))
    try:
        sock.sendall(connect_packet(f"big{uuid.uuid4().hex[:6]}", settings.username, settings.password))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        claimed = 200 * 1024 * 1024  # 200 MiB, far above the 16 MiB + 64 KiB limit
        header = bytearray([0x30])
        n = claimed
        while True:
            byte, n = n % 128, n // 128
            header.append(byte | (0x80 if n else 0))
            if not n:
                break
        sock.sendall(bytes(header) + b"\x00\x05fl/v1")
        sock.settimeout(5)
        try:
            data = sock.recv(16)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        assert data in (b"",) or data[0] == 0xE0, data  # closed (3.1.1 has no DISCONNECT from the server)
    finally:
        sock.close()
    assert secure.broker.alive()
    assert _rss_kib(pid) - rss_before < 20 * 1024, "the broker allocated for the claimed size"


def test_payload_within_limits_still_passes(secure: SecureBroker) -> None:
    """The control for the test above: a 1 MiB batch goes through."""
    device = DeviceRef(TENANT, "s", "a", "big")
    twin = probe(secure.settings("_twin"))
    agent = probe(secure.settings(TENANT))
    try:
        twin.subscribe(device.telemetry_topic)
        payload = bytes(1024 * 1024)
        assert agent.publish(device.telemetry_topic, payload) == 0
        twin.wait_for(lambda ms: any(len(p) == len(payload) for _, p, _ in ms))
    finally:
        twin.close()
        agent.close()
