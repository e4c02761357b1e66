"""Customers and factories behind the production broker (TLS, passwords, the generated ACL): a customer
sees only its own orders, quotes and events and cannot forge status; the factory that prints the parts
gets only its job, under an opaque order id; the competing factory and the other customer see nothing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from security_support import probe

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.quotes.service import CustomerService
from forgeline.routing.instances import generate_fleet
from forgeline.routing.router import RoutingConfig
from forgeline.routing.service import RoutingService

pytestmark = [pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary"),
              pytest.mark.timeout(120)]

SUFFIX = uuid.uuid4().hex[:6]
ACME, BETA = f"acme{SUFFIX}", f"beta{SUFFIX}"
C1, C2 = f"cust{SUFFIX}a", f"cust{SUFFIX}b"
PRINTERS = [DeviceRef(ACME, "s1", "h1", "mjf-1"), DeviceRef(BETA, "s1", "h1", "sla-1")]
NOT_AUTHORIZED = 135


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    users = [ACME, BETA, "_twin", "_routing", "_quotes", f"_customer@{C1}", f"_customer@{C2}"]
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("quotes-broker"), users)
    yield broker
    broker.stop()


def _birth(technology: str, material: str) -> dict[str, Any]:
    doc = {"status": "online", "ts": time.time(), "technology": technology, "channels": [],
           "materials": [material], "build_volume_mm": [300, 280, 300], "part_spacing_mm": 3, "cost_per_hour": 30.0}
    schemas.validate("status", doc)
    return doc


def _accepted(code: Any) -> bool:
    return not code.is_failure


def test_customers_and_factories_see_only_their_own(secure: SecureBroker) -> None:
    c1, c2 = probe(secure.settings(f"_customer@{C1}")), probe(secure.settings(f"_customer@{C2}"))
    factories = {t: probe(secure.settings(t)) for t in (ACME, BETA)}
    routing = RoutingService(secure.settings("_routing"), RoutingConfig(keep_open=False), tick_s=0.3)
    service = CustomerService(secure.settings("_quotes"), fleet=generate_fleet(10, seed=2, live=False),
                              tick_s=0.3)
    try:
        for ref, (tech, material) in zip(PRINTERS, (("MJF", "PA12"), ("SLA", "Tough-Resin")), strict=True):
            assert _accepted(factories[ref.tenant].publish(ref.status_topic, schemas.dumps(_birth(tech, material)),
                                                           retain=True))
        for p in (c1, c2, *factories.values()):
            p.subscribe("#")
        routing.start()
        service.start()
        deadline = time.monotonic() + 15
        while len(routing.router.fleet) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

        order = {"order_id": "o-1", "due_ts": time.time() + 5 * 86400, "parts": [
            {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20],
             "volume_cm3": 12, "quantity": 5}]}
        assert _accepted(c1.publish(topics.order_submit_topic(C1), json.dumps(order).encode()))
        status_topic = topics.order_status_topic(C1, "o-1")
        c1.wait_for(lambda ms: any(t == status_topic and json.loads(p)["status"] == "queued" for t, p, _ in ms),
                    timeout=20)
        quote = {"correlation_id": "q", "client_id": "web", "parts": [order["parts"][0]]}  # type: ignore[index]
        assert _accepted(c1.publish(topics.quote_request_topic(C1), json.dumps(quote).encode()))
        c1.wait_topic(topics.quote_response_topic(C1, "web"), timeout=20)
        factories[ACME].wait_for(lambda ms: any("/cmd/" in t for t, _, _ in ms), timeout=20)

        # the broker refuses what the ACL does not grant
        assert c2.publish(topics.order_submit_topic(C1), b"{}") == NOT_AUTHORIZED
        assert c1.publish(status_topic, b'{"status": "done"}', retain=True) == NOT_AUTHORIZED
        assert c1.publish(topics.quote_response_topic(C2, "web"), b"{}") == NOT_AUTHORIZED
        assert factories[BETA].publish(topics.order_submit_topic(C1), b"{}") == NOT_AUTHORIZED

        # a sentinel after everything above, on each receiver's own level, then look at what arrived
        for name, p in (("c1", c1), ("c2", c2)):
            customer = C1 if name == "c1" else C2
            sentinel = {"correlation_id": "s", "client_id": "web", "parts": [order["parts"][0]]}  # type: ignore[index]
            assert _accepted(p.publish(topics.quote_request_topic(customer), json.dumps(sentinel).encode()))
            answer_topic = topics.quote_response_topic(customer, "web")

            def answered(ms: list[tuple[str, bytes, bool]], topic: str = answer_topic) -> bool:
                return any(t == topic and json.loads(pl)["correlation_id"] == "s" for t, pl, _ in ms)

            p.wait_for(answered, timeout=20)
        for name, p, own in (("c1", c1, C1), ("c2", c2, C2)):
            foreign = [t for t, _, _ in p.messages if not t.startswith(f"fl/v1/_customers/{own}/")]
            assert foreign == [], f"{name} saw {sorted(set(foreign))[:5]}"
        assert not [t for t, _, _ in c2.messages if "/orders" in t]  # c2 never learns of c1's order
        for tenant, p in factories.items():
            foreign = [t for t, _, _ in p.messages if not t.startswith(f"fl/v1/{tenant}/")]
            assert foreign == [], f"{tenant} saw {sorted(set(foreign))[:5]}"
        jobs = [json.loads(pl) for t, pl, _ in factories[ACME].messages if "/cmd/" in t]
        assert jobs and all(C1 not in json.dumps(job) for job in jobs)  # opaque order ids only
        assert not [t for t, _, _ in factories[BETA].messages if "/cmd/" in t]
        # and the service checks again: an order naming another customer is refused on the sender's level
        spoof = {**order, "order_id": "o-2", "customer": C2}
        assert _accepted(c1.publish(topics.order_submit_topic(C1), json.dumps(spoof).encode()))
        c1.wait_for(lambda ms: any(t == topics.order_status_topic(C1, "o-2") and json.loads(p)["status"] == "error"
                                   for t, p, _ in ms), timeout=20)
    finally:
        service.stop()
        routing.stop()
        for p in (c1, c2, *factories.values()):
            p.close()
