"""Shared fixtures: a real Mosquitto per session (and per test where a test stops it), unique names,
and a collector that subscribes with a plain paho client.

Tests never use a public broker or a fixed port: each broker listens on a free loopback port with a
temporary config. ``FORGELINE_TEST_BROKER=amqtt`` runs the broker-backed tests on the embedded broker.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from forgeline.broker import RunningBroker, find_mosquitto, start_embedded, start_mosquitto
from forgeline.mqtt import MqttSettings, connect, subscribe_all


def _start(tmp: Path, **kw: Any) -> RunningBroker:
    if os.environ.get("FORGELINE_TEST_BROKER") == "amqtt":
        return start_embedded()
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run .ci/run (or apt-get install mosquitto)")
    return start_mosquitto(workdir=tmp, **kw)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One real Mosquitto for the whole session; tests isolate themselves by unique tenant names."""
    broker = _start(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[RunningBroker]:
    """A Mosquitto of this test's own, which the test may stop, kill and restart."""
    broker = _start(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture
def mqtt_settings(mosquitto: RunningBroker) -> MqttSettings:
    return MqttSettings(host=mosquitto.host, port=mosquitto.port, protocol=5 if mosquitto.mqtt5 else 4)


@pytest.fixture
def tenant() -> str:
    """A tenant name unique to this test, so tests sharing a broker never see each other's messages."""
    return f"t{uuid.uuid4().hex[:10]}"


@dataclass
class Collector:
    """Messages received on the subscribed filters, with a wait helper."""

    client: paho.Client
    messages: list[paho.MQTTMessage] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(
        self, predicate: Callable[[list[paho.MQTTMessage]], bool], timeout: float = 15.0
    ) -> list[paho.MQTTMessage]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = sorted({m.topic for m in self.messages})[:20]
                    raise AssertionError(f"condition not met within {timeout}s; got {len(self.messages)} "
                                         f"messages on {topics}")
                self.cond.wait(remaining)
            return list(self.messages)

    def on(self, topic: str) -> list[paho.MQTTMessage]:
        with self.cond:
            return [m for m in self.messages if m.topic == topic]


@pytest.fixture
def collect(mqtt_settings: MqttSettings) -> Iterator[Callable[..., Collector]]:
    """``collect("filter", ...)`` subscribes a plain paho client (QoS 1) and returns a Collector."""
    clients: list[paho.Client] = []

    def _collect(*filters: str, settings: MqttSettings | None = None) -> Collector:
        client = connect(settings or mqtt_settings)
        collector = Collector(client)

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            with collector.cond:
                collector.messages.append(msg)
                collector.cond.notify_all()

        client.on_message = on_message
        subscribe_all(client, list(filters), what="test collector")
        clients.append(client)
        return collector

    yield _collect
    for c in clients:
        c.disconnect()
        c.loop_stop()
