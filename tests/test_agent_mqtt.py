"""The agent against a real Mosquitto: birth and last will, batched numbered telemetry, events, commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_support import CounterSource, counter_values, telemetry_by_device
from conftest import Collector

from edge_agent import Agent, BatchSettings, FleetSpec, LineSpec, PrinterSpec, start_simulated_fleet, wait_connected
from edge_agent.config import SpoolSettings
from forgeline.contract import schemas, telemetry, topics
from forgeline.contract.topics import DeviceRef
from forgeline.contract.vocabulary import CHANNELS
from forgeline.mqtt import MqttSettings

REPO = Path(__file__).resolve().parents[1]


def small_fleet(tenant: str) -> FleetSpec:
    return FleetSpec(tenant, "plant", "hall", (PrinterSpec("fdm-01", "FDM"), PrinterSpec("sls-01", "SLS")),
                     (LineSpec("MW-20", "B", area="line1", stations=("assembly", "power")),))


def docs(messages: list[Any], kind: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if topics.parse(m.topic).kind == kind]


def test_fleet_publishes_births_numbered_batches_and_events(
    mqtt_settings: MqttSettings, collect: Callable[..., Collector], tenant: str
) -> None:
    collector = collect(f"fl/v1/{tenant}/#")
    agent = start_simulated_fleet(mqtt_settings, small_fleet(tenant), speed=3000, rate_hz=5,
                                  batch=BatchSettings(max_samples=200, window_s=0.2))
    try:
        keys = [info.key for info in agent.sources[0].devices()]
        collector.wait_for(lambda ms: {topics.parse(m.topic).device.key for m in ms  # type: ignore[union-attr]
                                       if topics.parse(m.topic).kind == "telemetry"} >= set(keys), timeout=20)
        collector.wait_for(lambda ms: any(b"job_finished" in m.payload for m in ms), timeout=20)
    finally:
        agent.stop()
    messages = collector.wait_for(lambda ms: sum(b'"offline"' in m.payload for m in ms) >= len(keys))
    births = [m for m in messages if topics.parse(m.topic).kind == "status" and b'"online"' in m.payload]
    assert {topics.parse(m.topic).device.key for m in births} == set(keys)  # type: ignore[union-attr]
    epoch = agent.spool.epoch
    for message in births:
        birth = schemas.loads("status", bytes(message.payload))
        assert message.retain or message.qos == 1
        assert birth["epoch"] == epoch
        for channel in birth["channels"]:
            assert channel["unit"] == CHANNELS[channel["name"]].unit
        if birth["technology"] == "line":
            assert birth["product_model"] == "MW-20" and birth["product_revision"] == "B"
        else:
            assert birth["materials"] and len(birth["build_volume_mm"]) == 3
    for event in docs(messages, "event"):
        schemas.validate("event", event)
    offline = [json.loads(m.payload) for m in messages if b'"offline"' in m.payload]
    assert all(doc["reason"] == "agent stopped" for doc in offline)
    logs = telemetry_by_device(messages)
    assert set(logs) == set(keys)
    for key, log in logs.items():
        assert log.duplicates == 0 and log.historical == 0
        assert log.seqs(epoch) == list(range(len(log.batches))), key  # gap-free from 0
        assert all(b.header.n_samples <= 200 for b in log.batches.values())
    units = [e for e in docs(messages, "event") if e["type"] == "unit_produced"]
    assert units and all(u["product_revision"] == "B" for u in units)
    # Retained births (now 'offline') are what a late subscriber sees first.
    late = collect(f"fl/v1/{tenant}/status/#")
    retained = late.wait_for(lambda ms: len(ms) >= len(keys))
    assert all(m.retain for m in retained)


def test_batches_close_on_size_and_on_time(
    mqtt_settings: MqttSettings, collect: Callable[..., Collector], tenant: str, tmp_path: Path
) -> None:
    ref = DeviceRef(tenant, "s", "a", "counter")
    collector = collect(ref.telemetry_topic)
    source = CounterSource(ref, per_tick=250, tick_s=0.001, total=10_000)
    agent = Agent(mqtt_settings, [source], spool=SpoolSettings(str(tmp_path / "spool.db")),
                  batch=BatchSettings(max_samples=1000, window_s=0.3)).start()
    try:
        assert source.done.wait(20)
        collector.wait_for(lambda ms: sum(telemetry.read_header(m.payload).n_samples for m in ms) >= 10_000)
    finally:
        agent.stop()
    log = telemetry_by_device(collector.messages)[ref.key]
    sizes = [log.batches[k].header.n_samples for k in sorted(log.batches)]
    assert max(sizes) == 1000 and sum(sizes) == 10_000
    assert counter_values(log) == [float(i) for i in range(10_000)]
    # A trickle is published when the window elapses, not held until the batch is full.
    trickle = CounterSource(DeviceRef(tenant, "s", "a", "trickle"), per_tick=1, tick_s=0.05, total=5)
    slow = collect(trickle.info.ref.telemetry_topic)
    agent = Agent(mqtt_settings, [trickle], spool=SpoolSettings(":memory:"),
                  batch=BatchSettings(max_samples=1000, window_s=0.3)).start()
    try:
        began = time.monotonic()
        slow.wait_for(lambda ms: len(ms) >= 1, timeout=5)
        assert time.monotonic() - began < 2.0
    finally:
        agent.stop()


def test_mqtt_311_works_too(mosquitto: Any, collect: Callable[..., Collector], tenant: str) -> None:
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port, protocol=4)
    ref = DeviceRef(tenant, "s", "a", "v311")
    collector = collect(f"fl/v1/{tenant}/#", settings=settings)
    source = CounterSource(ref, per_tick=50, total=500)
    agent = Agent(settings, [source], spool=SpoolSettings(":memory:"), batch=BatchSettings(100, 0.2)).start()
    try:
        collector.wait_for(lambda ms: sum(1 for m in ms if "/telemetry/" in m.topic) >= 5)
    finally:
        agent.stop()
    log = telemetry_by_device(collector.messages)[ref.key]
    assert counter_values(log) == [float(i) for i in range(500)]


def test_last_will_marks_each_device_offline_when_the_agent_dies(
    mqtt_settings: MqttSettings, collect: Callable[..., Collector], tenant: str, tmp_path: Path
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({
        "mqtt": {"url": f"mqtt://{mqtt_settings.host}:{mqtt_settings.port}"},
        "spool": {"path": "spool.db"},
        "sources": [{"type": "simulator", "tenant": tenant, "speed": 100,
                     "printers": [{"device": "p1", "technology": "FDM"}, {"device": "p2", "technology": "MJF"}]}],
    }))
    collector = collect(f"fl/v1/{tenant}/status/#")
    process = subprocess.Popen([sys.executable, "-m", "forgeline.cli", "agent", "--config", str(config)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        collector.wait_for(lambda ms: sum(b'"online"' in m.payload for m in ms) >= 2, timeout=20)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        messages = collector.wait_for(lambda ms: sum(b'"offline"' in m.payload for m in ms) >= 2, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    offline = {m.topic: json.loads(m.payload) for m in messages if b'"offline"' in m.payload}
    assert set(offline) == {DeviceRef(tenant, "plant1", "hall1", d).status_topic for d in ("p1", "p2")}
    assert all(doc["reason"] == "connection lost" for doc in offline.values())
    for doc in offline.values():
        schemas.validate("status", doc)


# --- commands ----------------------------------------------------------------------------------------


class Requester:
    """Sends commands and waits for the response with the same correlation id."""

    def __init__(self, collector: Collector, ref: DeviceRef) -> None:
        self.collector = collector
        self.ref = ref

    def send(self, command: str, payload: bytes | dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        if isinstance(payload, dict):
            correlation_id = payload.setdefault("correlation_id", uuid.uuid4().hex)
            payload.setdefault("ts", time.time())
            body = json.dumps(payload).encode()
        else:
            correlation_id, body = "", payload
        before = len(self.collector.messages)
        self.collector.client.publish(self.ref.command_topic(command), body, qos=1)
        topic = self.ref.command_response_topic(command)

        def answered(ms: list[Any]) -> bool:
            return any(m.topic == topic and json.loads(m.payload)["correlation_id"] == correlation_id
                       for m in ms[before:])

        messages = self.collector.wait_for(answered, timeout=timeout)
        response = next(json.loads(m.payload) for m in messages[before:] if m.topic == topic
                        and json.loads(m.payload)["correlation_id"] == correlation_id)
        schemas.validate("command_response", response)
        return response


@pytest.fixture
def printer_agent(mqtt_settings: MqttSettings, tenant: str) -> Any:
    fleet = FleetSpec(tenant, "plant", "hall", (PrinterSpec("sls-01", "SLS"),),
                      (LineSpec("MW-20", "B", area="line1", stations=("assembly", "power")),))
    agent = start_simulated_fleet(mqtt_settings, fleet, speed=1, rate_hz=2, auto_jobs=False)
    assert wait_connected(agent)
    time.sleep(0.2)  # the command subscriptions follow the CONNACK
    yield agent
    agent.stop()


def test_ping_set_config_and_dispatch_job(
    printer_agent: Agent, collect: Callable[..., Collector], tenant: str
) -> None:
    ref = DeviceRef(tenant, "plant", "hall", "sls-01")
    collector = collect(f"fl/v1/{tenant}/#")
    requester = Requester(collector, ref)
    pong = requester.send("ping", {})
    assert pong["ok"] and pong["result"]["pong"] and pong["result"]["epoch"] == printer_agent.spool.epoch

    reply = requester.send("set_config", {"args": {"rate_hz": 5, "channels": ["state", "laser_power"]}})
    assert reply["ok"], reply
    assert reply["result"]["applied"] == {"rate_hz": 5.0, "channels": ["state", "laser_power"]}
    births = collector.wait_for(lambda ms: any(
        m.topic == ref.status_topic and len(json.loads(m.payload).get("channels", [])) == 2 for m in ms))
    birth = next(json.loads(m.payload) for m in reversed(births) if m.topic == ref.status_topic)
    assert [c["name"] for c in birth["channels"]] == ["state", "laser_power"] and birth["channels"][0]["rate_hz"] == 5
    collector.wait_for(lambda ms: any(b"config_applied" in m.payload for m in ms if m.topic == ref.event_topic))
    mark = len(collector.messages)
    collector.wait_for(lambda ms: sum(1 for m in ms[mark:] if m.topic == ref.telemetry_topic) >= 2)
    for message in collector.messages[mark + 1:]:
        if message.topic == ref.telemetry_topic:
            batch = telemetry.decode(message.payload)
            assert {batch.channels[c] for c in batch.channel_idx} <= {"state", "laser_power"}

    job = {"job_id": "R-1", "material": "PA12",
           "parts": [{"part_id": "o1-p1", "bbox_mm": [50, 40, 30], "volume_cm3": 12.0}]}
    reply = requester.send("dispatch_job", {"args": job})
    assert reply["ok"] and reply["result"]["job_id"] == "R-1" and reply["result"]["queued"] == 1
    started = collector.wait_for(lambda ms: any(b"job_started" in m.payload for m in ms if m.topic == ref.event_topic))
    event = next(json.loads(m.payload) for m in started if m.topic == ref.event_topic and b"job_started" in m.payload)
    assert event["job_id"] == "R-1" and event["parts"][0]["part_id"] == "o1-p1"


def test_dispatch_job_is_idempotent_across_retries_and_restarts(
    mqtt_settings: MqttSettings, collect: Callable[..., Collector], tenant: str, tmp_path: Path
) -> None:
    """A job_id already dispatched is answered with the first result and starts nothing, also when the
    request comes again after the agent restarted on the same spool (a QoS 1 redelivery)."""
    fleet = FleetSpec(tenant, "plant", "hall", (PrinterSpec("sls-01", "SLS"),), ())
    ref = DeviceRef(tenant, "plant", "hall", "sls-01")
    collector = collect(f"fl/v1/{tenant}/#")
    requester = Requester(collector, ref)
    job = {"job_id": "R-7", "material": "PA12",
           "parts": [{"part_id": "o7-p1", "bbox_mm": [50, 40, 30], "volume_cm3": 12.0}]}
    spool = tmp_path / "spool.db"
    agent = start_simulated_fleet(mqtt_settings, fleet, speed=1, rate_hz=2, auto_jobs=False, spool_path=spool)
    try:
        assert wait_connected(agent)
        time.sleep(0.2)
        first = requester.send("dispatch_job", {"args": job})
        assert first["ok"] and first["result"]["queued"] == 1 and "duplicate" not in first["result"], first
        again = requester.send("dispatch_job", {"args": job})
        assert again["ok"] and again["result"] == {**first["result"], "duplicate": True}
        other = requester.send("dispatch_job", {"args": {**job, "job_id": "R-8"}})
        assert other["ok"] and "duplicate" not in other["result"], other
    finally:
        agent.stop()
    agent = start_simulated_fleet(mqtt_settings, fleet, speed=1, rate_hz=2, auto_jobs=False, spool_path=spool)
    try:
        assert wait_connected(agent)
        time.sleep(0.2)
        after_restart = requester.send("dispatch_job", {"args": job})
        assert after_restart["ok"] and after_restart["result"] == {**first["result"], "duplicate": True}
        fresh = requester.send("dispatch_job", {"args": {**job, "job_id": "R-9"}})
        assert fresh["ok"] and fresh["result"]["queued"] == 1 and "duplicate" not in fresh["result"], fresh
    finally:
        agent.stop()
    started = [json.loads(m.payload)["job_id"] for m in collector.messages
               if m.topic == ref.event_topic and b"job_started" in m.payload]
    assert started.count("R-7") <= 1, started


@pytest.mark.parametrize(
    ("command", "payload", "error"),
    [
        ("ping", b"{not json", "not valid JSON"),
        ("ping", b"[1, 2]", "JSON object"),
        ("ping", b'{"ts": 1}', "correlation_id"),
        ("reboot", {}, "unknown command 'reboot'"),
        ("set_config", {"args": {"rate_hz": -1}}, "rate_hz"),
        ("set_config", {"args": {"channels": ["nozzle_temp"]}}, "unknown channel 'nozzle_temp'"),
        ("set_config", {"args": {"warp_drive": True}}, "does not support setting 'warp_drive'"),
        ("set_config", {"args": {"batch_max_samples": 0}}, "max_samples"),
        ("dispatch_job", {"args": {"job_id": "x", "parts": [{"part_id": "p"}]}}, "bbox_mm"),
        ("ping", {"reply_to": "fl/v1/othertenant/cmdres/s/a/d/ping"}, "reply_to"),
        ("ping", {"args": [1]}, "args"),
        ("ping", b'{"correlation_id": "c", "ts": NaN}', "not valid JSON"),
    ],
)
def test_bad_commands_get_error_responses_and_the_agent_keeps_working(
    printer_agent: Agent, collect: Callable[..., Collector], tenant: str, command: str, payload: Any, error: str
) -> None:
    ref = DeviceRef(tenant, "plant", "hall", "sls-01")
    requester = Requester(collect(f"fl/v1/{tenant}/cmdres/#"), ref)
    reply = requester.send(command, payload)
    assert reply["ok"] is False and error in reply["error"], reply
    assert requester.send("ping", {})["ok"]  # still alive


def test_line_revision_change_by_command(
    printer_agent: Agent, collect: Callable[..., Collector], tenant: str
) -> None:
    ref = DeviceRef(tenant, "plant", "line1", "power")
    collector = collect(f"fl/v1/{tenant}/#")
    reply = Requester(collector, ref).send("set_config", {"args": {"product_revision": "C"}})
    assert reply["ok"] and reply["result"]["applied"]["product_revision"] == "C"
    topics_ = {DeviceRef(tenant, "plant", "line1", station).status_topic for station in ("assembly", "power")}

    def announced(ms: list[Any]) -> bool:
        seen = {m.topic for m in ms if m.topic in topics_ and json.loads(m.payload).get("product_revision") == "C"}
        return seen == topics_

    collector.wait_for(announced)


def test_spool_overflow_is_counted_and_reported_as_an_alarm(
    mqtt_settings: MqttSettings, collect: Callable[..., Collector], tenant: str, tmp_path: Path
) -> None:
    from forgeline.broker import free_port

    ref = DeviceRef(tenant, "s", "a", "overflow")
    spool = SpoolSettings(str(tmp_path / "spool.db"), max_bytes=60_000, overflow="drop_oldest")
    dead = MqttSettings(host="127.0.0.1", port=free_port())  # the broker is away: everything is spooled
    source = CounterSource(ref, per_tick=200, tick_s=0.001, total=20_000)
    offline = Agent(dead, [source], spool=spool, batch=BatchSettings(500, 0.1)).start()
    assert source.done.wait(20)
    time.sleep(1.5)  # the drop report runs once a second
    offline.stop(drain_timeout_s=0)
    stats = offline.spool.stats()
    assert stats["dropped_batches"] > 0 and stats["queued_bytes"] <= 60_000
    collector = collect(f"fl/v1/{tenant}/#")
    online = Agent(mqtt_settings, [CounterSource(ref, total=0)], spool=spool, batch=BatchSettings(500, 0.1)).start()
    try:
        collector.wait_for(lambda ms: any(b"spool overflow" in m.payload for m in ms) and
                           sum(1 for m in ms if m.topic == ref.telemetry_topic) >= 1)
        assert online.publisher.wait_idle(10)
    finally:
        online.stop()
    alarm = next(json.loads(m.payload) for m in collector.messages if b"spool overflow" in m.payload)
    schemas.validate("event", alarm)
    assert alarm["type"] == "alarm" and alarm["spool_dropped_samples"] == stats["dropped_samples"]
    log = telemetry_by_device(collector.messages)[ref.key]
    values = counter_values(log)
    # What survived is the newest data, complete and in order; the twin sees the dropped seqs as a gap.
    assert values == [float(i) for i in range(20_000 - len(values), 20_000)]
    assert len(values) + stats["dropped_samples"] == 20_000
    seqs = log.seqs(offline.spool.epoch)
    assert seqs == list(range(seqs[0], 40)) and seqs[0] == stats["dropped_batches"]
