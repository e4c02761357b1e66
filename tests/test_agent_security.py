"""The agent behind the production broker config: TLS, client certificate and password, per-tenant ACL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import CounterSource, counter_values, telemetry_by_device

from edge_agent import Agent, BatchSettings
from edge_agent.config import SpoolSettings, parse_config
from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import connect

TENANT = f"acme{uuid.uuid4().hex[:6]}"
OTHER = f"rival{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("agent-secure"), [TENANT, OTHER, "_ops"])
    yield broker
    broker.stop()


@pytest.mark.parametrize("protocol", [5, 4])
def test_agent_over_tls_with_client_certificate_and_password(secure: SecureBroker, tmp_path: Path,
                                                             protocol: int) -> None:
    ops = connect(secure.settings("_ops", protocol=protocol))
    received: list[Any] = []
    ops.on_message = lambda _c, _u, m: received.append(m)
    ops.subscribe(f"fl/v1/{TENANT}/#", qos=1)
    ref = DeviceRef(TENANT, "plant", "hall", f"gw{protocol}")
    source = CounterSource(ref, per_tick=100, total=2000)
    agent = Agent(secure.settings(TENANT, protocol=protocol), [source],
                  spool=SpoolSettings(str(tmp_path / "spool.db")), batch=BatchSettings(500, 0.1)).start()
    try:
        deadline = time.monotonic() + 20
        while sum(1 for m in received if "/telemetry/" in m.topic) < 4:
            assert time.monotonic() < deadline, f"got {[m.topic for m in received][:5]}"
            time.sleep(0.05)
        # A command from an operator account through the ACL, answered by the agent.
        ops.publish(ref.command_topic("ping"), json.dumps({"correlation_id": "tls-1", "ts": time.time()}), qos=1)
        while not any(m.topic == ref.command_response_topic("ping") for m in received):
            assert time.monotonic() < deadline, "no command response"
            time.sleep(0.05)
    finally:
        agent.stop()
        ops.disconnect()
        ops.loop_stop()
    response = next(json.loads(m.payload) for m in received if m.topic == ref.command_response_topic("ping"))
    schemas.validate("command_response", response)
    assert response["ok"] and response["correlation_id"] == "tls-1"
    log = telemetry_by_device(received)[ref.key]
    assert counter_values(log) == [float(i) for i in range(2000)]
    births = [json.loads(m.payload) for m in received if m.topic == ref.status_topic]
    assert births[0]["status"] == "online"


def test_agent_cannot_publish_into_another_tenant(secure: SecureBroker, tmp_path: Path) -> None:
    """The broker's ACL, not the agent, is the boundary: a gateway configured with another tenant's
    devices gets nothing through (its births and telemetry are dropped by the broker)."""
    ops = connect(secure.settings("_ops"))
    received: list[Any] = []
    ops.on_message = lambda _c, _u, m: received.append(m)
    ops.subscribe(f"fl/v1/{OTHER}/#", qos=1)
    ref = DeviceRef(OTHER, "plant", "hall", "intruder")
    agent = Agent(secure.settings(TENANT), [CounterSource(ref, per_tick=10, total=100)],
                  spool=SpoolSettings(":memory:"), batch=BatchSettings(50, 0.1)).start()
    try:
        time.sleep(1.5)
    finally:
        agent.stop(drain_timeout_s=0.5)
        ops.disconnect()
        ops.loop_stop()
    assert received == []
    # MQTT 5 tells the publisher: the refusals are counted, and the rows are not retried forever.
    device = agent.publisher.stats()["devices"][ref.key]
    assert device["broker_rejected"] > 0 and agent.publisher.stats()["spool"]["queued_rows"] == 0


def test_tls_settings_from_a_config_file(secure: SecureBroker, tmp_path: Path) -> None:
    settings = secure.settings(TENANT)
    (tmp_path / "pw").write_text(settings.password or "")
    config = parse_config({
        "mqtt": {"url": f"mqtts://{secure.host}:{secure.port}", "username": TENANT, "password_file": "pw",
                 "tls": {"ca_file": settings.ca_file, "cert_file": settings.cert_file, "key_file": settings.key_file}},
        "sources": [{"type": "simulator", "tenant": TENANT, "printers": [{"device": "p1", "technology": "FDM"}]}],
    }, tmp_path)
    assert config.mqtt.tls and config.mqtt.cert_file == settings.cert_file
    client = connect(config.mqtt)  # the broker accepts exactly these settings
    client.disconnect()
    client.loop_stop()
