"""End to end over a real Mosquitto: unit events, anomaly events and feedback in, a retained insights
document out (validated by its schema), dead letters for unusable input; also through the
``forgeline loop serve`` process and ``forgeline loop report --broker``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from forgeline.broker import RunningBroker
from forgeline.contract import schemas, topics
from forgeline.loop.intake import LoopStore
from forgeline.loop.service import LoopService, ServiceConfig, fit_document
from forgeline.loop.simulate import RevisionProfile, simulate_line
from forgeline.mqtt import MqttSettings, connect
from tests.conftest import Collector

ROOT = Path(__file__).resolve().parents[1]


def publish_all(settings: MqttSettings, messages: list[tuple[str, bytes]]) -> None:
    client = connect(settings)
    try:
        last = None
        for topic, payload in messages:
            last = client.publish(topic, payload, qos=1)
        assert last is not None
        last.wait_for_publish(30)
        assert last.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def latest_insights(collector: Collector, topic: str) -> dict[str, Any] | None:
    received = collector.on(topic)
    return schemas.loads("insights", bytes(received[-1].payload)) if received else None


def settled(topic: str, units: int, feedback: int) -> Callable[[list[paho.MQTTMessage]], bool]:
    """True once an insights document on ``topic`` accounts for every unit and feedback sent."""

    def check(messages: list[paho.MQTTMessage]) -> bool:
        for message in reversed(messages):
            if message.topic == topic:
                document = json.loads(message.payload)
                revisions = document["revisions"]
                return (sum(r["units"] for r in revisions) == units
                        and sum(r["feedback"] for r in revisions) == feedback)
        return False

    return check


def line_data(tenant: str, seed: int = 3, units: int = 600) -> tuple[list[tuple[str, bytes]], int, int]:
    profiles = [RevisionProfile("A", units=units),
                RevisionProfile("B", units=units, anomaly_rate_scale={"cavity_temp_rise": 6.0})]
    messages = simulate_line(tenant, "MW-20", profiles, seed=seed)
    feedback = sum(1 for m in messages if "/feedback/" in m.topic)
    return [m.wire() for m in messages], 2 * units, feedback


def test_events_and_feedback_in_retained_validated_insight_out(
    mqtt_settings: MqttSettings, tenant: str, collect: Callable[..., Collector]
) -> None:
    insights_topic = topics.insights_topic(tenant, "MW-20")
    watcher = collect(insights_topic, topics.deadletter_topic(tenant))
    messages, units, feedback = line_data(tenant)
    station = topics.DeviceRef(tenant, "plant1", "line1", "leak")
    first_serial = json.loads(next(p for t, p in messages if t == station.event_topic))["serial"]
    bad = [
        (station.event_topic, b'{"type": "unit_produced", "ts": 1, "serial": 7}'),  # schema
        (station.event_topic, b"\xff\xfe not json"),
        (topics.feedback_topic(tenant, "MW-20", "Z"), json.dumps({"ts": 1e9, "serial": first_serial}).encode()),
    ]
    with LoopService(mqtt_settings, ServiceConfig(tenant=tenant, interval_s=0.3)) as service:
        publish_all(mqtt_settings, messages + bad)
        watcher.wait_for(settled(insights_topic, units, feedback), timeout=60)
        watcher.wait_for(lambda ms: sum(m.topic.startswith("fl/v1/_sys/") for m in ms) == len(bad))
    document = latest_insights(watcher, insights_topic)
    assert document is not None
    flagged = {(i["revision"], i["kpi"], i["channel"], i["direction"]) for i in document["insights"]}
    assert ("B", "anomaly_rate", "cavity_temp_rise", "worse") in flagged
    assert document["insights"][0]["channel"] == "cavity_temp_rise"
    # The service monitors: flags are decided at looks with a share of alpha (see compare.monitor_model).
    assert document["look"] >= 5 and document["look_alpha"] < document["alpha"]
    assert service.counters["dead_letters"] == len(bad)
    letters = [schemas.loads("deadletter", bytes(m.payload)) for m in watcher.on(topics.deadletter_topic(tenant))]
    reasons = " | ".join(letter["reason"] for letter in letters)
    assert "serial" in reasons and "not valid JSON" in reasons and "built as revision" in reasons
    # Retained: a client that subscribes afterwards gets the same document at once.
    late = collect(insights_topic)
    [retained] = late.wait_for(lambda ms: len(ms) >= 1, timeout=10)
    assert retained.retain
    assert schemas.loads("insights", bytes(retained.payload)) == document


def test_service_state_survives_a_restart(mqtt_settings: MqttSettings, tenant: str, tmp_path: Path,
                                          collect: Callable[..., Collector]) -> None:
    state = tmp_path / "loop-state.json"
    messages, units, feedback = line_data(tenant, seed=5, units=120)
    half = len(messages) // 2
    config = ServiceConfig(tenant=tenant, interval_s=0.2, state_file=state)
    insights_topic = topics.insights_topic(tenant, "MW-20")
    watcher = collect(insights_topic)
    with LoopService(mqtt_settings, config) as first:
        publish_all(mqtt_settings, messages[:half])
        deadline = time.monotonic() + 30
        while first.counters["messages"] < half and time.monotonic() < deadline:
            time.sleep(0.05)
    assert state.exists()
    with LoopService(mqtt_settings, config) as second:
        assert second.store.counters.units == first.store.counters.units > 0
        publish_all(mqtt_settings, messages[half:])
        watcher.wait_for(settled(insights_topic, units, feedback), timeout=60)


def test_oversized_documents_keep_every_flagged_insight() -> None:
    comparison = {"flagged": False, "q_value": 0.9, "pad": "x" * 1000}
    document = {"model": "M", "insights": [{"flagged": True}],
                "comparisons": [{**comparison, "q_value": 0.5 + i / 1000} for i in range(300)]
                + [{"flagged": True, "q_value": 0.01}]}
    fitted = fit_document(document, limit=50_000)
    assert len(schemas.dumps(fitted)) <= 50_000
    assert {"flagged": True, "q_value": 0.01} in fitted["comparisons"]
    assert max(c["q_value"] for c in fitted["comparisons"]) < 0.9  # the least interesting went first


def test_serve_process_and_report_from_the_broker(mosquitto: RunningBroker, mqtt_settings: MqttSettings, tenant: str,
                                                  tmp_path: Path, collect: Callable[..., Collector]) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    protocol = "5" if mosquitto.mqtt5 else "4"
    insights_topic = topics.insights_topic(tenant, "MW-20")
    watcher = collect(insights_topic)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen(
        [sys.executable, "-m", "forgeline.cli", "loop", "serve", "--broker", url, "--tenant", tenant,
         "--interval", "0.3", "--state", str(tmp_path / "state.json"), "--mqtt-protocol", protocol],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        line = serve.stderr.readline() if serve.stderr else ""
        assert "loop service on" in line, line
        messages, units, feedback = line_data(tenant, seed=9, units=300)
        publish_all(mqtt_settings, messages)
        watcher.wait_for(settled(insights_topic, units, feedback), timeout=60)
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    counters = json.loads(out.strip().splitlines()[-1])
    assert counters["intake"]["units"] > 0 and counters["counters"]["published"] >= 1
    assert (tmp_path / "state.json").exists()

    report = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "forgeline.cli", "loop", "report", "--model", "MW-20", "--tenant", tenant,
         "--broker", url, "--mqtt-protocol", protocol, "-o", str(report)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert "cavity_temp_rise" in text and "<svg" in text
    missing = subprocess.run(
        [sys.executable, "-m", "forgeline.cli", "loop", "report", "--model", "NOPE", "--tenant", tenant,
         "--broker", url, "--mqtt-protocol", protocol, "-o", str(tmp_path / "x.html"), "--timeout", "1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert missing.returncode == 2 and "no retained insights" in missing.stderr


def totals(messages: list[tuple[str, bytes]]) -> tuple[int, int]:
    """Units and feedback that ``messages`` amount to, counted by the store itself."""
    store = LoopStore()
    store.ingest_all(messages)
    revisions = [r for m in store for r in m.revisions.values()]
    return sum(r.units for r in revisions), sum(r.feedback for r in revisions)


def test_killed_serve_process_loses_nothing_it_acknowledged(
    mosquitto: RunningBroker, mqtt_settings: MqttSettings, tenant: str, tmp_path: Path,
    collect: Callable[..., Collector]
) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    state = tmp_path / "state.json"
    command = [sys.executable, "-m", "forgeline.cli", "loop", "serve", "--broker", url, "--tenant", tenant,
               "--interval", "0.2", "--state", str(state), "--state-interval", "3600",
               "--mqtt-protocol", "5" if mosquitto.mqtt5 else "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    insights_topic = topics.insights_topic(tenant, "MW-20")
    watcher = collect(insights_topic)
    messages, units, feedback = line_data(tenant, seed=12, units=150)
    half = len(messages) * 2 // 3
    first = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
    try:
        assert first.stderr is not None and "loop service on" in first.stderr.readline()
        publish_all(mqtt_settings, messages[:half])
        watcher.wait_for(settled(insights_topic, *totals(messages[:half])), timeout=60)
    finally:
        first.kill()  # SIGKILL: no clean shutdown, no final state file
        first.wait(10)
    assert not state.exists(), "the snapshot was not due yet: only the journal holds the data"
    second = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert second.stderr is not None and "loop service on" in second.stderr.readline()
        publish_all(mqtt_settings, messages[half:])
        watcher.wait_for(settled(insights_topic, units, feedback), timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=30)
    assert second.returncode == 0 and state.exists()
    assert (tmp_path / "state.json.journal").read_text() == ""  # folded into the snapshot at the clean stop
    # The state file alone renders the report (one analysis of everything the service accepted).
    report, as_json = tmp_path / "from-state.html", tmp_path / "from-state.json"
    result = subprocess.run([sys.executable, "-m", "forgeline.cli", "loop", "report", "--model", "MW-20",
                             "--state", str(state), "-o", str(report), "--json", str(as_json)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    document = json.loads(as_json.read_text())
    assert sum(r["units"] for r in document["revisions"]) == units
    assert sum(r["feedback"] for r in document["revisions"]) == feedback
    assert "<svg" in report.read_text()


@pytest.mark.parametrize("bad", [{"tenant": "_sys"}, {"interval_s": 0}])
def test_bad_service_config_is_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServiceConfig(**bad)
