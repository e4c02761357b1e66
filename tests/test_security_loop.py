"""The iteration loop behind the production broker: with its own ``_loop`` account it reads two
competing tenants' units and feedback and publishes each tenant's insights from that tenant's data
only; each tenant reads its own insights and never the other's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from security_support import probe

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import topics
from forgeline.loop.service import LoopService, ServiceConfig
from forgeline.loop.simulate import RevisionProfile, simulate_line

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

SUFFIX = uuid.uuid4().hex[:6]
OVENS, RIVAL = f"ovens{SUFFIX}", f"rival{SUFFIX}"
MODEL = "MW-20"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("loop-broker"), [OVENS, RIVAL, "_loop", "_twin"])
    yield broker
    broker.stop()


def _publish_line(secure: SecureBroker, tenant: str, units: int, seed: int) -> tuple[int, int]:
    """Publish a simulated line as the tenant itself (anomaly events as the twin, their only writer)."""
    profiles = [RevisionProfile("A", units=units), RevisionProfile("B", units=units)]
    messages = simulate_line(tenant, MODEL, profiles, seed=seed)
    factory, twin = probe(secure.settings(tenant)), probe(secure.settings("_twin"))
    try:
        for message in messages:
            topic, payload = message.wire()
            publisher = twin if "/anomaly/" in topic else factory
            assert publisher.publish(topic, payload) == 0, topic
    finally:
        factory.close()
        twin.close()
    return 2 * units, sum(1 for m in messages if "/feedback/" in m.topic)


def test_loop_insights_stay_within_each_tenant(secure: SecureBroker) -> None:
    service = LoopService(secure.settings("_loop"), ServiceConfig(tenant="+", interval_s=0.3))
    watchers = {t: probe(secure.settings(t)) for t in (OVENS, RIVAL)}
    try:
        service.start()
        for tenant, watcher in watchers.items():
            watcher.subscribe(topics.insights_filter("+"), topics.insights_filter(tenant))
        expected = {OVENS: _publish_line(secure, OVENS, 60, seed=1), RIVAL: _publish_line(secure, RIVAL, 25, seed=2)}

        for tenant, (units, feedback) in expected.items():
            topic = topics.insights_topic(tenant, MODEL)

            def settled(messages: list[tuple[str, bytes, bool]], topic: str = topic, units: int = units,
                        feedback: int = feedback) -> bool:
                for t, payload, _ in reversed(messages):
                    if t == topic:
                        revisions = json.loads(payload)["revisions"]
                        return (sum(r["units"] for r in revisions) == units
                                and sum(r["feedback"] for r in revisions) == feedback)
                return False

            watchers[tenant].wait_for(settled, timeout=30)
        for tenant, watcher in watchers.items():
            own = f"fl/v1/{tenant}/"
            foreign = [m for m in watcher.messages if not m[0].startswith(own)]
            assert foreign == [], f"{tenant} received another tenant's insights: {[m[0] for m in foreign]}"
        assert service.counters["publish_errors"] == 0 and service.counters["dead_letters"] == 0
    finally:
        service.stop()
        for watcher in watchers.values():
            watcher.close()
