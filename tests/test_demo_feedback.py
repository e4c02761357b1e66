"""The demo's customers (``forgeline.demo.DemoFeedback``): feedback valid by the contract, on shipped ovens
only, with more door complaints for the revision with the leakier door seal — checked on the generator's
rates and over a real Mosquitto into the loop's intake."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.demo import DemoFeedback
from forgeline.loop.intake import LoopStore
from forgeline.mqtt import MqttSettings, connect
from tests.conftest import Collector

LEAKAGE = {"C": 1.8}  # what the demo configures for revision C


def _rate(feedback: DemoFeedback, revision: str, keep: Callable[[dict[str, object]], bool], n: int = 4000) -> float:
    hits = 0
    for i in range(n):
        documents = feedback.feedback_for(f"S{revision}{i}", revision, 1_700_000_000.0)
        for document in documents:
            schemas.validate("feedback", document)
        hits += any(keep(d) for d in documents)
    return hits / n


def test_door_complaints_follow_the_door_leakage_and_ratings_the_review_rate(mqtt_settings: MqttSettings) -> None:
    feedback = DemoFeedback(mqtt_settings, DeviceRef("t", "s", "a", "safety"), LEAKAGE, seed=7)
    n = 4000

    def door(d: dict[str, object]) -> bool:
        return d.get("category") == "door"

    b, c = _rate(feedback, "B", door, n), _rate(feedback, "C", door, n)
    for observed, expected in ((b, 0.03), (c, 0.03 * 1.8**2)):
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (observed, expected)
    assert c > 2.5 * b
    reviews = _rate(feedback, "B", lambda d: d.get("source") == "user", n)
    assert abs(reviews - 0.35) < 4 * math.sqrt(0.35 * 0.65 / n)
    # seeded per serial: the same unit always gets the same feedback
    assert feedback.feedback_for("S1", "C", 5.0) == feedback.feedback_for("S1", "C", 5.0)


def test_shipped_ovens_get_feedback_the_loop_accepts(mqtt_settings: MqttSettings, tenant: str,
                                                     collect: Callable[..., Collector]) -> None:
    station = DeviceRef(tenant, "plant1", "line1", "safety")
    feedback = DemoFeedback(mqtt_settings, station, LEAKAGE, seed=3)
    watch = collect(topics.feedback_filter(tenant))
    store = LoopStore()
    events: list[dict[str, Any]] = []
    for i in range(60):
        events.append({"type": "unit_produced", "ts": time.time(), "serial": f"MW-{i:04d}", "product_model": "MW-20",
                       "product_revision": "C", "good": i % 4 != 0, "cycle_time": 24.0})
    expected = sum(len(feedback.feedback_for(e["serial"], "C", 0.0)) for e in events if e["good"])
    assert expected > 0
    feedback.start()
    client = connect(mqtt_settings)
    try:
        for event in events:
            store.ingest(station.event_topic, schemas.dumps(event))  # the loop knows the units
            client.publish(station.event_topic, schemas.dumps(event), qos=1).wait_for_publish(5)
        client.publish(station.event_topic, b"not json", qos=1).wait_for_publish(5)  # ignored, no crash
        messages = watch.wait_for(lambda ms: len(ms) >= expected)
        time.sleep(0.3)
    finally:
        client.disconnect()
        client.loop_stop()
        feedback.stop()
    messages = watch.messages
    assert len(messages) == expected == feedback.sent
    scrapped = {e["serial"] for e in events if not e["good"]}
    for message in messages:
        document = json.loads(message.payload)
        assert document["serial"] not in scrapped  # scrap is not shipped
        assert message.topic == topics.feedback_topic(tenant, "MW-20", "C")
        assert store.ingest(message.topic, bytes(message.payload)) == "feedback"
    assert store.model(tenant, "MW-20").revisions["C"].feedback == expected
