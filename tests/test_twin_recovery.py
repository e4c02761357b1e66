"""Recovery: the twin as a real process, SIGKILLed and restarted from its snapshot, continues its KPIs
without double counting, gets what was published while it was down from its persistent session,
and keeps the retained twin state coherent. Also snapshot round trips in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings
from tests.conftest import Collector
from tests.twin_support import Publisher, batch, birth, latest_json, twin_config
from twin.service import TwinService

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def publisher(mqtt_settings: MqttSettings) -> Iterator[Publisher]:
    pub = Publisher(mqtt_settings)
    yield pub
    pub.close()


def _start_twin(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "forgeline.cli", "twin", "--config", str(config_path)],
                            stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _twin_doc(collector: Collector, ref: DeviceRef, predicate: Callable[[dict[str, Any]], bool],
              timeout: float = 30.0) -> dict[str, Any]:
    messages = collector.wait_for(lambda m: predicate(latest_json(m, ref.twin_topic) or {"last_seq": None}),
                                  timeout)
    doc = latest_json(messages, ref.twin_topic)
    assert doc is not None
    return doc


def test_sigkill_and_restart_continue_without_double_counting(
    mqtt_settings: MqttSettings, publisher: Publisher, collect: Callable[..., Collector], tenant: str,
    tmp_path: Path,
) -> None:
    snapshots = tmp_path / "snapshots"
    config = {
        "broker": f"mqtt://{mqtt_settings.host}:{mqtt_settings.port}",
        "worker_id": f"twin-{tenant}",
        "tenants": [tenant],
        "publish_interval_s": 0.0,
        "session_expiry_s": 60,
        "snapshot": {"dir": str(snapshots), "interval_s": 0.2},
    }
    config_path = tmp_path / "twin.json"
    config_path.write_text(json.dumps(config))
    log_path = tmp_path / "twin.log"
    ref = DeviceRef(tenant, "s", "a", "p1")
    watch = collect(ref.twin_topic)
    process = _start_twin(config_path, log_path)
    try:
        publisher.birth(ref, birth(planned_cycle_time_s=1.0))
        _twin_doc(watch, ref, lambda d: "online" in d)  # the twin is up and subscribed
        for seq in range(10):
            publisher.publish(ref.telemetry_topic, batch(seq))
        before = _twin_doc(watch, ref, lambda d: d["last_seq"] == 9)
        assert before["samples"] == 300
        # wait for a snapshot taken after the last batch, then kill without any chance to clean up
        snapshot_file = snapshots / "twin.snapshot"
        seen_at = time.time()
        deadline = time.monotonic() + 10
        while not (snapshot_file.exists() and snapshot_file.stat().st_mtime > seen_at):
            assert time.monotonic() < deadline, "no snapshot written"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        # while the twin is dead the agent keeps publishing: the broker queues it for the session
        for seq in range(10, 20):
            publisher.publish(ref.telemetry_topic, batch(seq))
        process = _start_twin(config_path, log_path)
        after = _twin_doc(watch, ref, lambda d: d["last_seq"] == 19)
        assert after["samples"] == 600 and after["duplicates"] == 0 and after["gaps"] == 0
        # the agent replays its spool after reconnecting: every batch is a duplicate now
        for seq in range(5, 20):
            publisher.publish(ref.telemetry_topic, batch(seq, historical=True))
        final = _twin_doc(watch, ref, lambda d: d["duplicates"] == 15)
        assert final["samples"] == 600
        # KPIs continued across the crash: printing the whole time, one unit per second as planned
        assert final["kpis"]["utilization"] == pytest.approx(1.0)
        assert final["kpis"]["effectiveness"] == pytest.approx(1.0, abs=0.05)
        assert final["reported"]["produced_total"] == 199.0
        # the retained state is the last one published, not a stale one from before the crash
        late = collect(ref.twin_topic)
        retained = json.loads(late.wait_for(lambda m: len(m) >= 1)[0].payload)
        assert retained["samples"] == 600 and retained["last_seq"] == 19
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        print(log_path.read_text()[-3000:])


def test_snapshot_round_trip_changes_no_kpi(
    mqtt_settings: MqttSettings, publisher: Publisher, collect: Callable[..., Collector], tenant: str,
    tmp_path: Path,
) -> None:
    config = twin_config(mqtt_settings, tenant, snapshot_dir=str(tmp_path / "snap"), snapshot_interval_s=3600)
    service = TwinService(config).start()
    ref = DeviceRef(tenant, "s", "a", "p2")
    watch = collect(ref.twin_topic)
    try:
        publisher.birth(ref, birth())
        for seq in range(3):
            publisher.publish(ref.telemetry_topic, batch(seq))
        _twin_doc(watch, ref, lambda d: d["last_seq"] == 2)
    finally:
        service.stop()  # writes the final snapshot
    restored = TwinService(config.with_overrides(worker_id=config.worker_id + "b"))
    assert restored.snapshots is None
    from twin.snapshot import Snapshotter

    assert Snapshotter(tmp_path / "snap", 3600).restore(restored)
    index = restored.ingestor.registry.devices[ref.key].index
    original = service.ingestor.core.kpis(index)
    assert restored.ingestor.core.kpis(index) == original
    assert restored.ingestor.runtime[index].sequences.last_seq == 2
    assert restored.ingestor.reported(index) == service.ingestor.reported(index)
    # a corrupt snapshot is moved aside, not fatal
    (tmp_path / "snap" / "twin.snapshot").write_bytes(b"garbage")
    assert not Snapshotter(tmp_path / "snap", 3600).restore(TwinService(config))
    assert list((tmp_path / "snap").glob("twin.bad-*"))


def test_broker_restart_is_survived_and_health_says_so(fresh_mosquitto: Any, tenant: str, tmp_path: Path) -> None:
    """The broker dies and comes back on the same port (with its persistence): the twin reports
    unhealthy meanwhile, reconnects by itself and carries on where it was."""
    import urllib.error
    import urllib.request

    from forgeline.broker import start_mosquitto

    broker = fresh_mosquitto
    port, workdir = broker.port, tmp_path / "persistent-broker"
    broker.stop()
    broker = start_mosquitto(port=port, workdir=workdir, persistence=True)
    settings = MqttSettings(host=broker.host, port=port)
    service = TwinService(twin_config(settings, tenant, metrics_port=0, session_expiry_s=300)).start()
    assert service.metrics is not None
    health_url = f"http://127.0.0.1:{service.metrics.port}/healthz"
    ref = DeviceRef(tenant, "s", "a", "p1")
    try:
        publisher = Publisher(settings)
        publisher.birth(ref, birth())
        publisher.publish(ref.telemetry_topic, batch(0))
        publisher.close()
        deadline = time.monotonic() + 10
        while service.ingestor.counters.samples_accepted < 30:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.2)  # the broker's autosave (1 s) has the twin's session on disk
        broker.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(health_url, timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and json.loads(exc.read())["connected"] is False
                break
            assert time.monotonic() < deadline, "healthz stayed 200 without a broker"
            time.sleep(0.1)
        broker = start_mosquitto(port=port, workdir=workdir, persistence=True)
        deadline = time.monotonic() + 20
        while not service.connected:
            assert time.monotonic() < deadline, "the twin did not reconnect"
            time.sleep(0.1)
        publisher = Publisher(settings)
        publisher.publish(ref.telemetry_topic, batch(1))
        publisher.close()
        deadline = time.monotonic() + 10
        while service.ingestor.counters.samples_accepted < 60:
            assert time.monotonic() < deadline, "no ingest after the reconnect"
            time.sleep(0.05)
        assert urllib.request.urlopen(health_url, timeout=2).status == 200
        runtime = service.ingestor.runtime[service.ingestor.registry.devices[ref.key].index]
        assert runtime.sequences.last_seq == 1 and runtime.sequences.gaps == 0
    finally:
        service.stop()
        broker.stop()
