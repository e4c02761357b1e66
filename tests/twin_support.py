"""Helpers for the twin tests: births, batches and events built with the contract (no edge agent)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho

from forgeline.contract import schemas, telemetry
from forgeline.contract.topics import DeviceRef
from forgeline.contract.vocabulary import CHANNELS
from forgeline.mqtt import MqttSettings, connect
from twin.config import TwinConfig

T0_US = 1_763_900_000_000_000  # a fixed data time (2025-11-23) keeps results independent of the clock


def birth(technology: str = "FDM", channels: Sequence[str] = ("state", "nozzle_temp", "produced_total"),
          epoch: int = 1, units: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    units = units or {}
    document: dict[str, Any] = {
        "status": "online",
        "ts": time.time(),
        "epoch": epoch,
        "technology": technology,
        "channels": [{"name": c, "unit": units.get(c, CHANNELS[c].unit if c in CHANNELS else "")}
                     for c in channels],
    }
    document.update(extra)
    schemas.validate("status", document)
    return document


def batch(seq: int, *, epoch: int = 1, t0_us: int = T0_US, n_ticks: int = 10, period_us: int = 1_000_000,
          state: int = 3, temp: float = 210.0, produced: float = 0.0, historical: bool = False,
          channels: Sequence[str] = ("state", "nozzle_temp", "produced_total")) -> bytes:
    """``n_ticks`` ticks of every channel starting at ``t0_us + seq * n_ticks * period_us``."""
    t_us: list[int] = []
    idx: list[int] = []
    values: list[float] = []
    start = t0_us + seq * n_ticks * period_us
    for k in range(n_ticks):
        for c, name in enumerate(channels):
            t_us.append(start + k * period_us)
            idx.append(c)
            values.append({"state": float(state), "produced_total": produced + seq * n_ticks + k}.get(name, temp))
    return telemetry.encode(list(channels), t_us, idx, values, seq=seq, epoch=epoch, historical=historical)


class Publisher:
    """A plain paho client publishing QoS 1 and waiting for every PUBACK."""

    def __init__(self, settings: MqttSettings) -> None:
        self.client = connect(settings)

    def publish(self, topic: str, payload: bytes | dict[str, Any], *, retain: bool = False, qos: int = 1) -> None:
        data = schemas.dumps(payload) if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(10)

    def birth(self, ref: DeviceRef, document: dict[str, Any]) -> None:
        self.publish(ref.status_topic, document, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def twin_config(settings: MqttSettings, tenant: str | Sequence[str], **overrides: Any) -> TwinConfig:
    tenants = (tenant,) if isinstance(tenant, str) else tuple(tenant)
    base: dict[str, Any] = {
        "broker": f"mqtt://{settings.host}:{settings.port}",
        "worker_id": f"twin-{uuid.uuid4().hex[:8]}",
        "tenants": tenants,
        "publish_interval_s": 0.0,
        "session_expiry_s": 5,
        "unknown_device_hold_s": 1.0,
    }
    base.update(overrides)
    return TwinConfig(**base)


def latest_json(messages: list[paho.MQTTMessage], topic: str) -> dict[str, Any] | None:
    found = [m for m in messages if m.topic == topic and m.payload]
    return json.loads(found[-1].payload) if found else None


def request(settings: MqttSettings, tenant: str, method: str, body: dict[str, Any],
            timeout: float = 10.0) -> dict[str, Any]:
    """Call the twin query API and return the response document."""
    from forgeline.contract import topics

    client_id = f"c{uuid.uuid4().hex[:8]}"
    correlation = uuid.uuid4().hex
    got: list[dict[str, Any]] = []
    done = threading.Event()
    client = connect(settings)

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        if doc.get("correlation_id") == correlation:
            got.append(doc)
            done.set()

    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe(topics.api_response_topic(tenant, client_id), 1)
    assert subscribed.wait(10)
    payload = {"correlation_id": correlation, "client_id": client_id, **body}
    client.publish(topics.api_request_topic(tenant, method), json.dumps(payload), qos=1).wait_for_publish(10)
    try:
        assert done.wait(timeout), f"no API response to {method}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]
