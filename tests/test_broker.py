"""The broker harness: a real Mosquitto on a free loopback port, the embedded amqtt fallback chosen
automatically when no mosquitto binary exists, and restart on the same port for outage tests."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from forgeline.broker import BrokerError, RunningBroker, find_mosquitto, start_broker, start_mosquitto
from forgeline.mqtt import MqttError, MqttSettings, connect


def _round_trip(settings: MqttSettings, topic: str) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    sub = connect(settings)
    sub.on_message = lambda _c, _u, m: (got.append(m.payload), done.set())
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(topic, qos=1)
    assert subscribed.wait(10)
    pub = connect(settings)
    pub.publish(topic, b"hello", qos=1).wait_for_publish(10)
    assert done.wait(10), "message did not arrive"
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    return got[0]


def test_mosquitto_fixture_is_a_real_mosquitto(mosquitto: RunningBroker, mqtt_settings: MqttSettings,
                                               tenant: str) -> None:
    assert mosquitto.kind == "mosquitto" and mosquitto.alive()
    assert mosquitto.host == "127.0.0.1" and mosquitto.port not in (1883, 8883)
    assert _round_trip(mqtt_settings, f"fl/v1/{tenant}/probe") == b"hello"


def test_fallback_to_embedded_amqtt_when_no_mosquitto(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FORGELINE_MOSQUITTO", "/nonexistent/mosquitto")
    assert find_mosquitto() is None
    with caplog.at_level(logging.WARNING), start_broker() as broker:
        assert broker.kind == "amqtt" and not broker.mqtt5
        assert "falling back to the embedded amqtt broker" in caplog.text
        settings = MqttSettings(host=broker.host, port=broker.port, protocol=4)
        assert _round_trip(settings, "fl/v1/acme/probe") == b"hello"


def test_restart_on_same_port_after_kill(tmp_path: Path) -> None:
    broker = start_mosquitto(workdir=tmp_path / "a")
    port = broker.port
    broker.kill()
    assert not broker.alive()
    with pytest.raises(MqttError, match="cannot connect"):
        connect(MqttSettings(port=port), timeout=2)
    with start_mosquitto(port, workdir=tmp_path / "b") as again:
        assert _round_trip(MqttSettings(port=again.port), "fl/v1/acme/probe") == b"hello"


def test_bad_config_gives_the_broker_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="mosquitto"):
        start_mosquitto(workdir=tmp_path, config_text="listener 1 127.0.0.1\nno_such_option 1\n", timeout=3)
