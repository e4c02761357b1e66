"""Helpers for the quote and tracking tests: printers announced on the broker, an agent stand-in that
acknowledges jobs, a subscriber with waits, and a clock the test moves."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, connect


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def birth(material: str, cost: float = 30.0) -> dict[str, Any]:
    doc = {"status": "online", "ts": time.time(), "technology": "MJF", "channels": [{"name": "state", "unit": "code"}],
           "materials": [material], "build_volume_mm": [380, 284, 380], "part_spacing_mm": 3, "cost_per_hour": cost}
    schemas.validate("status", doc)
    return doc


def twin(ref: DeviceRef, state: str = "idle", utilization: float = 0.3, progress: float | None = None,
         job: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"device": {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device},
                           "ts": time.time(), "online": state != "offline", "state": state,
                           "kpis": {"utilization": utilization, "anomaly_score": 0.05}}
    if progress is not None:
        doc["reported"] = {"layer_progress": progress}
    if job is not None:
        doc["job"] = job
    schemas.validate("twin_state", doc)
    return doc


def event(kind: str, job_id: str, ts: float) -> bytes:
    doc = {"type": kind, "ts": ts, "job_id": job_id}
    schemas.validate("event", doc)
    return schemas.dumps(doc)


class Subscriber:
    """A plain paho client that records (topic, payload) and waits for conditions."""

    def __init__(self, settings: MqttSettings, *filters: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = connect(settings)
        self.client.on_message = self._on_message
        if filters:
            done = threading.Event()
            self.client.on_subscribe = lambda *_a: done.set()
            self.client.subscribe([(f, 1) for f in filters])
            assert done.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def latest(self, topic: str) -> dict[str, Any] | None:
        with self.cond:
            found = [p for t, p in self.messages if t == topic]
        return json.loads(found[-1]) if found else None

    def wait_doc(self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, p in reversed(self.messages):
                    if t == topic and p:
                        doc = json.loads(p)
                        if predicate(doc):
                            return doc
                left = deadline - time.monotonic()
                if left <= 0:
                    last = [json.loads(p) for t, p in self.messages if t == topic and p][-1:]
                    raise AssertionError(f"no matching message on {topic}; last: {last}")
                self.cond.wait(left)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Agents(Subscriber):
    """Answers every dispatch_job like the edge agent and remembers (device key, job)."""

    def __init__(self, settings: MqttSettings) -> None:
        self.jobs: list[tuple[str, dict[str, Any]]] = []
        super().__init__(settings, topics.device_filter("cmd"))

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parsed = topics.parse(msg.topic)
        assert parsed.device is not None and parsed.command == "dispatch_job"
        request = schemas.loads("command_request", bytes(msg.payload))
        response = {"correlation_id": request["correlation_id"], "ok": True, "ts": time.time(),
                    "result": {"job_id": request["args"]["job_id"], "queued": 1}}
        self.client.publish(parsed.device.command_response_topic("dispatch_job"), schemas.dumps(response), qos=1)
        with self.cond:
            if all(job["job_id"] != request["args"]["job_id"] for _, job in self.jobs):
                self.jobs.append((parsed.device.key, request["args"]))
            self.cond.notify_all()

    def wait_jobs(self, count: int, timeout: float = 20) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.jobs) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.jobs)} jobs dispatched, expected {count}"
                self.cond.wait(left)
            return list(self.jobs)


def wait_until(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)
