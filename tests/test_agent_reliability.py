"""Store-and-forward against a real Mosquitto: the broker goes away mid-stream, the agent is SIGKILLed with
samples queued; in both cases every sample arrives, exactly once after de-duplication by (epoch, seq)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from agent_support import CounterSource, counter_values, telemetry_by_device
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import Agent, BatchSettings, LinkSettings
from edge_agent.config import SpoolSettings
from forgeline.broker import RunningBroker, free_port, start_mosquitto
from forgeline.contract import telemetry
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, make_client

REPO = Path(__file__).resolve().parents[1]


class Subscriber:
    """A QoS 1 subscriber that survives broker restarts: a persistent MQTT 5 session (the broker keeps it,
    and queues messages for it, across its own restart), reconnecting by itself and subscribing again."""

    def __init__(self, settings: MqttSettings, topic_filter: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = make_client(settings, f"collector-{os.getpid()}-{time.monotonic_ns()}")
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # paho takes floats here

        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(topic_filter, qos=1)

        def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
            with self.lock:
                self.messages.append(message)

        def on_disconnect(*_: Any) -> None:
            self.subscribed.clear()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = on_message
        self.client.on_disconnect = on_disconnect
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect(settings.host, settings.port, 10, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def snapshot(self) -> list[paho.MQTTMessage]:
        with self.lock:
            return list(self.messages)

    def wait_for_samples(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            logs = telemetry_by_device(self.snapshot())
            if predicate(logs):
                return logs
            if time.monotonic() > deadline:
                raise AssertionError(f"not all samples arrived: { {k: v.samples() for k, v in logs.items()} }")
            time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker_dir(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A Mosquitto on a fixed port that the test may stop and start again (same port, same dir, sessions
    persisted across the restart)."""
    state: dict[str, Any] = {"port": free_port(), "dir": tmp_path / "broker", "broker": None}

    def start() -> RunningBroker:
        state["broker"] = start_mosquitto(state["port"], workdir=state["dir"], persistence=True)
        return state["broker"]

    state["start"] = start
    yield state
    if state["broker"] is not None:
        state["broker"].stop()


def test_broker_outage_mid_stream_loses_nothing(broker_dir: dict[str, Any], tmp_path: Path) -> None:
    broker = broker_dir["start"]()
    settings = MqttSettings(host=broker.host, port=broker.port)
    ref = DeviceRef("reliability", "s", "a", "counter")
    subscriber = Subscriber(settings, ref.telemetry_topic)
    total = 40_000
    source = CounterSource(ref, per_tick=100, tick_s=0.005, total=total)
    agent = Agent(settings, [source], spool=SpoolSettings(str(tmp_path / "spool.db")),
                  batch=BatchSettings(max_samples=500, window_s=0.1),
                  link=LinkSettings(reconnect_min_s=0.05, reconnect_max_s=0.3))
    agent.start()
    try:
        subscriber.wait_for_samples(lambda logs: ref.key in logs and logs[ref.key].samples() > 3000)
        broker.stop()  # mid-stream
        time.sleep(1.0)
        queued = agent.spool.stats()["queued_samples"]
        assert queued > 0, "samples are spooled while the broker is away"
        broker = broker_dir["start"]()
        assert subscriber.subscribed.wait(10)
        assert source.done.wait(30)
        logs = subscriber.wait_for_samples(lambda logs: logs[ref.key].samples() >= total)
    finally:
        agent.stop()
        subscriber.close()
    log = logs[ref.key]
    epoch = agent.spool.epoch
    assert counter_values(log) == [float(i) for i in range(total)]  # every sample, once, in order
    assert log.seqs(epoch) == list(range(len(log.batches)))
    assert log.historical > 0  # the backlog was replayed marked historical
    stats = agent.spool.stats()
    assert stats["dropped_samples"] == 0 and stats["queued_rows"] == 0


def _spooled_rows(path: Path) -> dict[tuple[str, int], bytes]:
    with sqlite3.connect(path) as db:
        return {(device, seq): bytes(payload) for device, seq, payload in
                db.execute("SELECT device, seq, payload FROM queue WHERE kind=0")}


def _next_seqs(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT device, next_seq FROM streams"))


def test_sigkilled_agent_replays_its_spool_after_restart(broker_dir: dict[str, Any], tmp_path: Path) -> None:
    broker = broker_dir["start"]()
    settings = MqttSettings(host=broker.host, port=broker.port)
    tenant = "killtest"
    config = tmp_path / "agent.json"
    spool = tmp_path / "spool.db"
    config.write_text(json.dumps({
        "mqtt": {"url": f"mqtt://{settings.host}:{settings.port}"},
        "batch": {"max_samples": 400, "window_s": 0.1},
        "link": {"reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "spool": {"path": str(spool)},
        "sources": [{"type": "simulator", "tenant": tenant, "speed": 200, "rate_hz": 100, "tick_s": 0.01,
                     "printers": [{"device": "p1", "technology": "FDM"}, {"device": "p2", "technology": "metal"}]}],
    }))
    subscriber = Subscriber(settings, f"fl/v1/{tenant}/telemetry/#")
    command = [sys.executable, "-m", "forgeline.cli", "agent", "--config", str(config)]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        subscriber.wait_for_samples(lambda logs: len(logs) == 2 and all(v.samples() > 500 for v in logs.values()))
        broker.stop()  # the link goes down; the agent keeps sampling into its spool
        deadline = time.monotonic() + 20
        while sum(1 for _ in _spooled_rows(spool)) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    queued = _spooled_rows(spool)
    assert len(queued) >= 20, "samples were queued when the agent died"
    broker = broker_dir["start"]()
    assert subscriber.subscribed.wait(10)
    second = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Wait until everything queued at the kill has arrived, plus some new data.
        subscriber.wait_for_samples(lambda logs: all(
            (seq in {s for _, s in logs[device].batches}) for device, seq in queued
        ) and all(v.historical > 0 for v in logs.values()))
        time.sleep(0.5)
        second.send_signal(signal.SIGTERM)  # a clean stop drains what is left
        assert second.wait(20) == 0, second.stderr.read().decode() if second.stderr else ""
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    next_seqs = _next_seqs(spool)
    assert not _spooled_rows(spool), "a clean stop with the broker up leaves nothing behind"
    logs = telemetry_by_device(subscriber.snapshot())
    subscriber.close()
    epochs = {epoch for log in logs.values() for epoch, _ in log.batches}
    assert len(epochs) == 1, "a restart keeps the stream epoch"
    epoch = epochs.pop()
    for device, log in logs.items():
        # Every batch ever spooled arrived; after de-duplication each exactly once (telemetry_by_device
        # checks that duplicates are identical).
        assert log.seqs(epoch) == list(range(next_seqs[device])), device
    replayed = 0
    for (device, seq), payload in queued.items():
        original = telemetry.decode(payload)
        received = logs[device].batches[(epoch, seq)]
        assert (received.t_us, received.channel_idx, received.values) == (
            original.t_us, original.channel_idx, original.values)
        replayed += received.header.historical
    assert replayed > 0, "the backlog of the killed agent was replayed marked historical"
