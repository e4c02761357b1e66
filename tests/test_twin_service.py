"""The twin service against a real Mosquitto: telemetry in, retained twin state, fleet summary,
anomaly-free KPIs, dead letters for bad input, de-duplication, the query API and tenant isolation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forgeline.contract import schemas, telemetry, topics
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings
from tests.conftest import Collector
from tests.twin_support import T0_US, Publisher, batch, birth, latest_json, request, twin_config
from twin.service import TwinService


@pytest.fixture
def publisher(mqtt_settings: MqttSettings) -> Iterator[Publisher]:
    pub = Publisher(mqtt_settings)
    yield pub
    pub.close()


@pytest.fixture
def service_factory(mqtt_settings: MqttSettings) -> Iterator[Callable[..., TwinService]]:
    started: list[TwinService] = []

    def make(tenant: str | list[str], **overrides: Any) -> TwinService:
        service = TwinService(twin_config(mqtt_settings, tenant, **overrides)).start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


def _twin(collector: Collector, ref: DeviceRef, predicate: Callable[[dict[str, Any]], bool],
          timeout: float = 10.0) -> dict[str, Any]:
    def ok(messages: list[Any]) -> bool:
        doc = latest_json(messages, ref.twin_topic)
        return doc is not None and predicate(doc)

    messages = collector.wait_for(ok, timeout)
    doc = latest_json(messages, ref.twin_topic)
    assert doc is not None
    return doc


def test_telemetry_becomes_retained_twin_state_and_fleet_summary(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service = service_factory(tenant, fleet_interval_s=0.2)
    ref = DeviceRef(tenant, "berlin", "hall1", "fdm-1")
    watch = collect(topics.device_filter("twin", tenant), topics.fleet_topic(tenant))
    publisher.birth(ref, birth("FDM", vendor="Prusa", build_volume_mm=[250, 210, 220], planned_cycle_time_s=60))
    for seq in range(5):
        publisher.publish(ref.telemetry_topic, batch(seq))
    doc = _twin(watch, ref, lambda d: d["last_seq"] == 4)
    schemas.validate("twin_state", doc)
    assert doc["samples"] == 5 * 10 * 3
    assert doc["state"] == "printing" and doc["online"] is True
    assert doc["capabilities"]["technology"] == "FDM" and doc["capabilities"]["vendor"] == "Prusa"
    assert doc["reported"]["nozzle_temp"] == 210.0
    assert doc["reported"]["produced_total"] == 49.0
    assert doc["kpis"]["utilization"] == pytest.approx(1.0)
    assert doc["last_sample_ts"] == pytest.approx((T0_US + 49_000_000) / 1e6)
    assert doc["gaps"] == 0 and doc["duplicates"] == 0
    # retained: a late subscriber gets the same state
    late = collect(ref.twin_topic)
    retained = late.wait_for(lambda m: len(m) >= 1)[0]
    assert retained.retain and json.loads(retained.payload)["last_seq"] == 4
    fleet_messages = watch.wait_for(lambda m: any(json.loads(x.payload).get("by_state") == {"printing": 1} for x in m
                                                  if x.topic == topics.fleet_topic(tenant)))
    fleet = latest_json(fleet_messages, topics.fleet_topic(tenant))
    assert fleet is not None
    schemas.validate("fleet_summary", fleet)
    assert fleet["online"] == 1 and fleet["by_state"] == {"printing": 1}
    assert service.snapshot_view()[0]["device"] == ref.key


def test_duplicates_gaps_and_replays_are_counted_not_double_counted(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service_factory(tenant)
    ref = DeviceRef(tenant, "s", "a", "d1")
    watch = collect(ref.twin_topic)
    publisher.birth(ref, birth())
    for seq in (0, 1, 1, 0, 4, 5):  # two duplicates, then a gap of 2 and 3
        publisher.publish(ref.telemetry_topic, batch(seq))
    doc = _twin(watch, ref, lambda d: d["last_seq"] == 5)
    assert doc["duplicates"] == 2 and doc["gaps"] == 1 and doc["missing"] == 2
    assert doc["samples"] == 4 * 30
    # the agent replays the gap from its spool (historical flag): accepted, the gap closes
    for seq in (2, 3, 3):
        publisher.publish(ref.telemetry_topic, batch(seq, historical=True))
    doc = _twin(watch, ref, lambda d: d["missing"] == 0 and d["duplicates"] == 3)
    assert doc["samples"] == 6 * 30 and doc["duplicates"] == 3
    # the counters went up by exactly one per tick: 60 ticks, produced_total 0..59 seen once each
    assert doc["reported"]["produced_total"] == 59.0


def test_bad_input_goes_to_dead_letters_with_reasons(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service = service_factory(tenant)
    ref = DeviceRef(tenant, "s", "a", "d1")
    dead = collect(topics.deadletter_topic(tenant))
    watch = collect(ref.twin_topic)
    publisher.birth(ref, birth(channels=("state", "nozzle_temp", "bed_temp"), units={"bed_temp": "degF"}))
    good = batch(0)
    truncated = good[:-3]
    bad_magic = b"XXXX" + good[4:]
    bad_channel = bytearray(good)
    bad_channel[-2:] = (7).to_bytes(2, "little")  # channel index 7 of a 3-channel table
    future = batch(0, t0_us=T0_US * 2)
    publisher.publish(ref.telemetry_topic, truncated)
    publisher.publish(ref.telemetry_topic, bad_magic)
    publisher.publish(ref.telemetry_topic, bytes(bad_channel))
    publisher.publish(ref.telemetry_topic, future)
    publisher.publish(ref.event_topic, b"{not json")
    publisher.publish(ref.event_topic, json.dumps({"type": "job_started", "ts": float("nan")}).encode())
    unknown = DeviceRef(tenant, "s", "a", "never-born")
    publisher.publish(unknown.telemetry_topic, good)
    publisher.publish(topics.api_request_topic(tenant, "get_twin"), b"[]")
    publisher.publish(ref.telemetry_topic, batch(0))  # the good one still gets in
    reasons = [json.loads(m.payload)["reason"] for m in dead.wait_for(lambda m: len(m) >= 9, timeout=15)]
    for message in dead.messages:
        schemas.validate("deadletter", json.loads(message.payload))
    text = "\n".join(reasons)
    assert "wrong unit" in text and "bed_temp" in text and "degF" in text
    assert "header says" in text  # truncated
    assert "bad magic" in text
    assert "channel index 7" in text
    assert "clock skew" in text
    assert "not valid JSON" in text
    assert "unknown device" in text
    assert "api_request" in text
    doc = _twin(watch, ref, lambda d: d["samples"] > 0)
    # the good batch's nozzle_temp and state samples were accepted; bed_temp is quarantined
    assert doc["samples"] == 30 and doc["reported"]["nozzle_temp"] == 210.0
    assert "bed_temp" not in doc["reported"]
    counts = service.ingestor.counters.dead_letters
    assert sum(counts.values()) >= 9


def test_oversized_payload_is_dead_lettered(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service_factory(tenant, max_message_bytes=1 << 20)
    ref = DeviceRef(tenant, "s", "a", "big")
    dead = collect(topics.deadletter_topic(tenant))
    publisher.birth(ref, birth())
    publisher.publish(ref.telemetry_topic, b"FLT1" + b"\0" * ((1 << 20) + 10))
    letter = json.loads(dead.wait_for(lambda m: len(m) >= 1)[0].payload)
    assert "oversized" in letter["reason"] and letter["size"] == (1 << 20) + 14


def test_query_api_answers_within_the_tenant_only(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector],
    mqtt_settings: MqttSettings, tenant: str,
) -> None:
    other = tenant + "x"
    service_factory([tenant, other])
    mine = DeviceRef(tenant, "s", "a", "p1")
    theirs = DeviceRef(other, "s", "a", "secret")
    watch = collect(topics.device_filter("twin", tenant), topics.device_filter("twin", other))
    publisher.birth(mine, birth("SLA", channels=("state", "resin_level")))
    publisher.birth(theirs, birth("SLS", channels=("state", "laser_power")))
    publisher.publish(mine.telemetry_topic, batch(0, channels=("state", "resin_level"), temp=0.5))
    publisher.publish(theirs.telemetry_topic, batch(0, channels=("state", "laser_power"), temp=30.0))
    _twin(watch, mine, lambda d: d["samples"] > 0)
    _twin(watch, theirs, lambda d: d["samples"] > 0)
    listed = request(mqtt_settings, tenant, "list_devices", {})
    assert listed["ok"] and [d["device"] for d in listed["result"]] == ["s/a/p1"]
    got = request(mqtt_settings, tenant, "get_twin", {"device": "s/a/p1"})
    assert got["ok"] and got["result"]["reported"]["resin_level"] == 0.5
    # the other tenant's device, asked for from this tenant, does not exist here
    denied = request(mqtt_settings, tenant, "get_twin", {"device": "s/a/secret"})
    assert not denied["ok"] and "unknown device" in denied["error"]
    traversal = request(mqtt_settings, tenant, "get_twin", {"device": f"../{other}/s/a/secret"})
    assert not traversal["ok"]
    assert request(mqtt_settings, tenant, "frobnicate", {})["ok"] is False


def test_tenant_not_served_is_dead_lettered(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service = service_factory(tenant)
    # a message for another tenant reaching this twin (e.g. a too-broad subscription) is refused
    result = service.ingestor.process([(DeviceRef(tenant + "z", "s", "a", "d").telemetry_topic, batch(0))])
    assert result.dead_letters and "wrong tenant" in result.dead_letters[0].reason


def test_birth_after_telemetry_is_held_then_ingested(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service_factory(tenant, unknown_device_hold_s=5.0)
    ref = DeviceRef(tenant, "s", "a", "late-birth")
    watch = collect(ref.twin_topic)
    publisher.publish(ref.telemetry_topic, batch(0))
    publisher.birth(ref, birth())
    doc = _twin(watch, ref, lambda d: d["samples"] == 30)
    assert doc["last_seq"] == 0


def test_anomaly_events_are_published(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service_factory(tenant)
    ref = DeviceRef(tenant, "s", "a", "hot")
    events = collect(topics.device_filter("anomaly", tenant))
    publisher.birth(ref, birth())
    import random

    rng = random.Random(3)
    channels = ["state", "nozzle_temp"]
    for seq in range(8):
        t, c, v = [], [], []
        for k in range(50):
            ts = T0_US + (seq * 50 + k) * 1_000_000
            temp = 210 + rng.gauss(0, 0.5) + (60.0 if seq >= 6 else 0.0)
            t += [ts, ts]
            c += [0, 1]
            v += [3.0, temp]
        publisher.publish(ref.telemetry_topic, telemetry.encode(channels, t, c, v, seq=seq, epoch=1))
    message = events.wait_for(lambda m: len(m) >= 1)[0]
    doc = json.loads(message.payload)
    schemas.validate("anomaly_event", doc)
    assert doc["phase"] == "start" and doc["device"] == ref.key and "nozzle_temp" in doc["channels"]


def test_metrics_and_health_endpoints(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    import urllib.error
    import urllib.request

    service = service_factory(tenant, metrics_port=0)
    assert service.metrics is not None
    url = f"http://127.0.0.1:{service.metrics.port}"
    ref = DeviceRef(tenant, "s", "a", "m1")
    watch = collect(ref.twin_topic)
    publisher.birth(ref, birth())
    publisher.publish(ref.telemetry_topic, batch(0))
    publisher.publish(ref.telemetry_topic, batch(0))
    publisher.publish(ref.telemetry_topic, b"garbage")
    _twin(watch, ref, lambda d: d["duplicates"] == 1)
    service.wait_idle()
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    worker = service.worker_id
    assert f'forgeline_twin_samples_total{{worker="{worker}"}} 30.0' in text
    assert f'forgeline_twin_batches_duplicate_total{{worker="{worker}"}} 1.0' in text
    assert f'forgeline_twin_dead_letters_total{{reason="TelemetryError",worker="{worker}"}} 1.0' in text
    assert f'forgeline_twin_devices{{worker="{worker}"}} 1.0' in text

    def value(name: str) -> float:
        prefix = f"forgeline_twin_{name}{{"
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    assert value("cycles_total") >= 1 and 0.0 < value("cycle_seconds_total") < 10.0
    assert value("twin_states_published_total") >= 1  # the state the watch saw, at least
    assert value("publish_failures_total") == 0 and value("outgoing_packets") >= 0
    lag = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("forgeline_twin_lag_seconds"))
    assert 0.0 < lag < 5.0  # receive -> processed of the last cycle, measured
    health = json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=5).read())
    assert health["connected"] and not health["ingest_stalled"]
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{url}/nope", timeout=5)


def test_a_flood_of_bad_input_is_counted_and_rate_limited(
    service_factory: Callable[..., TwinService], publisher: Publisher, collect: Callable[..., Collector], tenant: str
) -> None:
    service = service_factory(tenant, dead_letter_rate_per_s=5)
    dead = collect(topics.deadletter_topic(tenant))
    ref = DeviceRef(tenant, "s", "a", "noisy")
    publisher.birth(ref, birth())
    for _ in range(40):
        publisher.publish(ref.telemetry_topic, b"junk", qos=1)
    deadline = time.monotonic() + 10
    while service.ingestor.counters.dead_letters.get("TelemetryError", 0) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    messages = dead.wait_for(lambda m: len(m) + service.dead_letters_suppressed >= 40)
    assert 5 <= len(messages) < 40 and len(messages) + service.dead_letters_suppressed == 40
