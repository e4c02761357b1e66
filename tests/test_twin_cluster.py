"""Scale-out on a real Mosquitto: two twin workers in one shared-subscription group process every
device exactly once (each device on one worker, hand-off across the round-robin delivery), and when
one worker is SIGKILLed the other takes its devices over without counting anything twice."""

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

from forgeline.contract import topics
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings
from tests.conftest import Collector
from tests.twin_support import Publisher, batch, birth, twin_config
from twin.cluster import rendezvous_owner
from twin.service import TwinService

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 12


@pytest.fixture
def publisher(mqtt_settings: MqttSettings) -> Iterator[Publisher]:
    pub = Publisher(mqtt_settings)
    yield pub
    pub.close()


def _latest(collector: Collector) -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    with collector.cond:
        for message in collector.messages:
            if message.payload and "/twin/" in message.topic:
                doc = json.loads(message.payload)
                d = doc["device"]
                docs[f"{d['tenant']}/{d['site']}/{d['area']}/{d['device']}"] = doc
    return docs


def _wait_docs(collector: Collector, predicate: Callable[[dict[str, Any]], bool], count: int,
               timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        docs = _latest(collector)
        if sum(1 for d in docs.values() if predicate(d)) >= count:
            return docs
        if time.monotonic() > deadline:
            raise AssertionError(f"only {sum(1 for d in docs.values() if predicate(d))} of {count} twins: "
                                 f"{[(k, d.get('last_seq'), d.get('worker')) for k, d in sorted(docs.items())]}")
        time.sleep(0.05)


def test_two_workers_share_devices_and_hand_over_on_death(
    mqtt_settings: MqttSettings, publisher: Publisher, collect: Callable[..., Collector], tenant: str,
    tmp_path: Path,
) -> None:
    group = f"g{tenant}"
    worker_a, worker_b = f"a-{tenant}", f"b-{tenant}"
    config_b = twin_config(mqtt_settings, tenant, worker_id=worker_b, share_group=group)
    config_a = {"broker": config_b.broker, "worker_id": worker_a, "share_group": group, "tenants": [tenant],
                "publish_interval_s": 0.0}
    (tmp_path / "a.json").write_text(json.dumps(config_a))
    members = collect(topics.twin_workers_filter())
    twins = collect(topics.device_filter("twin", tenant))
    log = (tmp_path / "a.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "forgeline.cli", "twin", "--config", str(tmp_path / "a.json")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    service_b = TwinService(config_b).start()
    try:
        members.wait_for(lambda m: {x.topic.rsplit("/", 1)[1] for x in m if x.payload} >= {worker_a, worker_b},
                         timeout=30)
        deadline = time.monotonic() + 10
        while service_b.cluster is not None and len(service_b.cluster.members) < 2:
            assert time.monotonic() < deadline, "worker b never saw worker a"
            time.sleep(0.05)
        refs = [DeviceRef(tenant, "s", "a", f"p{i:02d}") for i in range(DEVICES)]
        for ref in refs:
            publisher.birth(ref, birth())
        for seq in range(5):
            for ref in refs:
                publisher.publish(ref.telemetry_topic, batch(seq))
        docs = _wait_docs(twins, lambda d: d.get("last_seq") == 4, DEVICES)
        owners = {key: rendezvous_owner(key, sorted([worker_a, worker_b])) for key in docs}
        assert set(owners.values()) == {worker_a, worker_b}, "the hash should spread 12 devices over both"
        for key, doc in docs.items():
            # every batch counted once, by the device's one owner
            assert doc["samples"] == 150 and doc["duplicates"] == 0 and doc["gaps"] == 0, (key, doc)
            assert doc["worker"] == owners[key]
        assert service_b.cluster is not None and service_b.cluster.handed_off > 0  # round-robin was undone
        b_devices = {k for k, o in owners.items() if o == worker_b}
        for key in docs:
            runtime = service_b.ingestor.runtime.get(service_b.ingestor.registry.devices[key].index)
            processed = runtime.samples if runtime is not None else 0
            assert processed == (150 if key in b_devices else 0), key
        # worker a dies without a word; its last will clears its membership
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        deadline = time.monotonic() + 10
        while len(service_b.cluster.members) != 1:
            assert time.monotonic() < deadline, "worker b did not notice the death"
            time.sleep(0.05)
        for seq in range(5, 10):
            for ref in refs:
                publisher.publish(ref.telemetry_topic, batch(seq))
        docs = _wait_docs(twins, lambda d: d.get("last_seq") == 9 and d.get("worker") == worker_b, DEVICES)
        for key, doc in docs.items():
            # the taken-over devices continue from a's retained state: nothing lost, nothing twice
            assert doc["samples"] == 300 and doc["duplicates"] == 0 and doc["gaps"] == 0, (key, doc)
        assert service_b.cluster.takeovers == DEVICES - len(b_devices)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        service_b.stop()
        log.close()
