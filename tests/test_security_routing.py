"""The routing service behind the production broker, with its own ``_routing`` account: a platform
client's request is answered on the platform level only; the released job reaches only the factory
that owns the chosen printer, whose acknowledgement gets back; a competing factory sees neither the
routing traffic nor the other factory's jobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from security_support import Probe, probe

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.routing.router import RoutingConfig
from forgeline.routing.service import RoutingService

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

SUFFIX = uuid.uuid4().hex[:6]
ACME, BETA = f"acme{SUFFIX}", f"beta{SUFFIX}"
PRINTERS = [DeviceRef(ACME, "s1", "h1", "mjf-1"), DeviceRef(BETA, "s1", "h1", "mjf-9")]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    users = [ACME, BETA, "_twin", "_routing", "_platform@shop"]
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("routing-broker"), users)
    yield broker
    broker.stop()


def _accepted(reason_code: Any) -> bool:
    """A PUBACK without failure ("success" or "no matching subscribers")."""
    return not reason_code.is_failure


def _birth() -> dict[str, Any]:
    doc = {"status": "online", "ts": time.time(), "technology": "MJF", "channels": [{"name": "state", "unit": "code"}],
           "materials": ["PA12"], "build_volume_mm": [380, 284, 380], "part_spacing_mm": 3, "cost_per_hour": 30.0}
    schemas.validate("status", doc)
    return doc


def _twin(ref: DeviceRef, utilization: float) -> dict[str, Any]:
    doc = {"device": {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device},
           "ts": time.time(), "online": True, "state": "idle", "kpis": {"utilization": utilization}}
    schemas.validate("twin_state", doc)
    return doc


def _answer_jobs(agent: Probe, tenant: str) -> None:
    """Acknowledge every dispatch_job this factory's agent received (as the factory itself)."""
    for topic, payload, _ in list(agent.messages):
        parsed = topics.parse(topic)
        if parsed.kind == "cmd" and parsed.device is not None and parsed.tenant == tenant:
            request = json.loads(payload)
            response = {"correlation_id": request["correlation_id"], "ok": True, "ts": time.time(),
                        "result": {"job_id": request["args"]["job_id"], "queued": 1}}
            assert _accepted(agent.publish(parsed.device.command_response_topic("dispatch_job"),
                                           schemas.dumps(response)))


def test_routing_traffic_and_jobs_stay_with_their_owners(secure: SecureBroker) -> None:
    twin = probe(secure.settings("_twin"))
    agents = {t: probe(secure.settings(t)) for t in (ACME, BETA)}
    shop = probe(secure.settings("_platform@shop"))
    service = RoutingService(secure.settings("_routing"), RoutingConfig(keep_open=False), dispatch_timeout_s=5,
                             tick_s=0.3)
    try:
        for ref, utilization in zip(PRINTERS, (0.1, 0.9), strict=True):
            assert _accepted(agents[ref.tenant].publish(ref.status_topic, schemas.dumps(_birth()), retain=True))
            assert _accepted(twin.publish(ref.twin_topic, schemas.dumps(_twin(ref, utilization)), retain=True))
        for tenant, agent in agents.items():  # each agent listens to its commands; each also tries to spy
            agent.subscribe(f"fl/v1/{tenant}/cmd/#", "fl/v1/+/cmd/#", "fl/v1/_platform/#", "#")
        service.start()
        deadline = time.monotonic() + 15
        while len(service.router.fleet) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(service.router.fleet) == 2, "the routing service did not see both factories' printers"

        response_topic = topics.routing_response_topic("shop")
        shop.subscribe(response_topic)
        order = {"order_id": "o-1", "customer": "bigco", "due_ts": time.time() + 5 * 86400, "parts": [
            {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20],
             "volume_cm3": 12, "quantity": 10}]}
        request = {"correlation_id": uuid.uuid4().hex, "client_id": "shop", "order": order}
        assert _accepted(shop.publish(topics.routing_request_topic(), schemas.dumps(request)))
        shop.wait_topic(response_topic, timeout=20)
        answer = json.loads(next(p for t, p, _ in shop.messages if t == response_topic))
        assert answer["ok"] and {a["printer"] for a in answer["assignments"]} == {PRINTERS[0].key}

        agents[ACME].wait_for(lambda ms: any(t.startswith(f"fl/v1/{ACME}/cmd/") for t, _, _ in ms), timeout=20)
        _answer_jobs(agents[ACME], ACME)
        deadline = time.monotonic() + 15
        while service.counters.acknowledged < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.counters.acknowledged >= 1, "the factory's acknowledgement did not reach routing"
        # a sentinel for BETA, delivered after everything above: its own twin state
        assert _accepted(twin.publish(PRINTERS[1].twin_topic, schemas.dumps(_twin(PRINTERS[1], 0.8))))
        agents[BETA].wait_for(lambda ms: sum(1 for t, _, _ in ms if t == PRINTERS[1].twin_topic) >= 1)
        for tenant, agent in agents.items():
            foreign = [t for t, _, _ in agent.messages if not t.startswith(f"fl/v1/{tenant}/")]
            assert foreign == [], f"{tenant} saw: {sorted(set(foreign))[:5]}"
    finally:
        service.stop()
        for p in (twin, shop, *agents.values()):
            p.close()
