"""Tenant isolation at the broker: a real Mosquitto started from broker/mosquitto.conf (TLS with client
certificates, no anonymous access, the password file and the ACL generated from the contract).

Every forbidden publish is refused (PUBACK "Not authorized") and never reaches any subscriber;
every forbidden subscription receives nothing. "Nothing" is proved without sleeping: an operator
account reads ``#``, and a sentinel published after the forbidden message by the same client (or
delivered after it to the same subscriber) arrives while the forbidden message does not, and
Mosquitto keeps per-connection order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_support import Probe, probe

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import topics
from forgeline.contract.topics import DeviceRef

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87

SUFFIX = uuid.uuid4().hex[:6]
ACME, BETA = f"acme{SUFFIX}", f"beta{SUFFIX}"
CUST1, CUST2 = f"cust1{SUFFIX}", f"cust2{SUFFIX}"
USERS = [ACME, f"{ACME}@gw2", BETA, "_twin", "_routing", "_loop", "_ops", f"_customer@{CUST1}", f"_customer@{CUST2}"]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("secure-broker"), USERS)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def ops(secure: SecureBroker) -> Iterator[Probe]:
    """The operator reads everything: the witness that a refused message went nowhere."""
    p = probe(secure.settings("_ops"))
    p.subscribe("#")
    yield p
    p.close()


@pytest.fixture
def clients(secure: SecureBroker) -> Iterator[dict[str, Probe]]:
    made = {u: probe(secure.settings(u)) for u in (ACME, f"{ACME}@gw2", BETA, "_twin", "_routing", "_loop")}
    yield made
    for p in made.values():
        p.close()


def dev(tenant: str, device: str | None = None) -> DeviceRef:
    return DeviceRef(tenant, "site1", "cell1", device or f"p{uuid.uuid4().hex[:8]}")


def test_production_config_is_what_runs(secure: SecureBroker) -> None:
    conf = (secure.workdir / "mosquitto.conf").read_text().splitlines()
    for line in ("allow_anonymous false", "require_certificate true", "per_listener_settings false",
                 "tls_version tlsv1.2", "max_packet_size 16842752"):
        assert line in conf
    assert sum(1 for line in conf if line.startswith("listener ")) == 1


def test_allowed_paths_work(secure: SecureBroker, clients: dict[str, Probe], ops: Probe) -> None:
    acme, gw2, twin, routing = clients[ACME], clients[f"{ACME}@gw2"], clients["_twin"], clients["_routing"]
    device = dev(ACME)
    # the twin reads every tenant's telemetry, with a plain and with a shared subscription
    assert twin.subscribe(topics.device_filter("telemetry"), topics.shared("twin", topics.device_filter("status")))
    # the factory reads its own commands and twin topics
    acme.subscribe(f"fl/v1/{ACME}/cmd/#", f"fl/v1/{ACME}/twin/#", topics.fleet_topic(ACME))
    routing.subscribe("fl/v1/+/twin/#", topics.routing_request_topic())

    assert acme.publish(device.telemetry_topic, b"t1") == 0
    assert gw2.publish(device.telemetry_topic, b"t2") == 0  # a second gateway of the same tenant
    assert acme.publish(device.status_topic, b"s", retain=True) == 0
    twin.wait_topic(device.telemetry_topic, b"t1")
    twin.wait_topic(device.telemetry_topic, b"t2")
    twin.wait_topic(device.status_topic, b"s")

    assert twin.publish(device.twin_topic, b"state", retain=True) == 0
    assert twin.publish(topics.fleet_topic(ACME), b"fleet") == 0
    acme.wait_topic(device.twin_topic, b"state")
    acme.wait_topic(topics.fleet_topic(ACME), b"fleet")
    routing.wait_topic(device.twin_topic, b"state")

    assert routing.publish(device.command_topic("dispatch_job"), b"job") == 0
    acme.wait_topic(device.command_topic("dispatch_job"), b"job")
    assert routing.publish(topics.routing_request_topic(), b"order") == 0
    routing.wait_topic(topics.routing_request_topic(), b"order")
    ops.wait_topic(topics.routing_request_topic(), b"order")


FORBIDDEN_PUBLISH = [
    # (publisher, topic builder, why it is forbidden)
    (ACME, lambda: dev(BETA).telemetry_topic, "another tenant's telemetry"),
    (ACME, lambda: dev(BETA).status_topic, "another tenant's status"),
    (ACME, lambda: dev(BETA).event_topic, "another tenant's events"),
    (ACME, lambda: dev(BETA).command_response_topic("ping"), "another tenant's command responses"),
    (ACME, lambda: topics.api_request_topic(BETA, "get_twin"), "another tenant's twin query API"),
    (ACME, lambda: topics.feedback_topic(BETA, "m", "r"), "another tenant's feedback"),
    (ACME, lambda: dev(ACME).twin_topic, "forging its own twin state"),
    (ACME, lambda: topics.fleet_topic(ACME), "forging its own fleet summary"),
    (ACME, lambda: dev(ACME).anomaly_topic, "forging anomaly events"),
    (ACME, lambda: dev(ACME).command_topic("dispatch_job"), "commanding its own devices"),
    (ACME, lambda: dev(BETA).command_topic("dispatch_job"), "commanding another tenant"),
    (ACME, lambda: topics.api_response_topic(ACME, "svc"), "forging query API answers"),
    (ACME, lambda: topics.insights_topic(ACME, "m"), "forging insights"),
    (ACME, lambda: topics.routing_request_topic(), "platform routing requests"),
    (ACME, lambda: topics.routing_response_topic("svc"), "platform routing responses"),
    (ACME, lambda: topics.deadletter_topic(ACME), "dead letters"),
    (ACME, lambda: topics.twin_handoff_topic(uuid.uuid4().hex[:8]), "a twin handoff (forged original topic)"),
    (ACME, lambda: topics.twin_worker_topic(uuid.uuid4().hex[:8]), "twin worker membership"),
    ("_routing", lambda: topics.twin_handoff_topic("w1"), "a platform service forging a twin handoff"),
    (ACME, lambda: topics.order_submit_topic(CUST1), "a customer's orders"),
    (ACME, lambda: topics.quote_response_topic(CUST1, "c"), "a customer's quotes"),
    (ACME, lambda: f"fl/v1/{ACME}@gw2/telemetry/s/a/d", "a tenant named after a gateway account"),
    (ACME, lambda: "fl/v2/anything", "outside the contract"),
    (ACME, lambda: "$SYS/broker/uptime", "$SYS"),
    (f"{ACME}@gw2", lambda: dev(BETA).telemetry_topic, "a gateway writing another tenant's telemetry"),
    (f"{ACME}@gw2", lambda: dev(ACME).twin_topic, "a gateway forging twin state"),
    ("_twin", lambda: dev(ACME).telemetry_topic, "the twin forging telemetry"),
    ("_twin", lambda: dev(ACME).command_topic("dispatch_job"), "the twin issuing commands"),
    ("_twin", lambda: topics.routing_request_topic(), "the twin issuing routing requests"),
    ("_routing", lambda: dev(ACME).telemetry_topic, "a platform service forging telemetry"),
    ("_routing", lambda: dev(ACME).twin_topic, "a platform service forging twin state"),
    ("_routing", lambda: topics.deadletter_topic(ACME), "a platform service forging dead letters"),
    ("_loop", lambda: dev(ACME).twin_topic, "the loop forging twin state"),
    ("_loop", lambda: dev(ACME).event_topic, "the loop forging events"),
    ("_loop", lambda: dev(ACME).command_topic("dispatch_job"), "the loop issuing commands"),
]


@pytest.mark.parametrize(("publisher", "topic_of", "why"), FORBIDDEN_PUBLISH, ids=[f[2] for f in FORBIDDEN_PUBLISH])
def test_forbidden_publish_is_refused_and_reaches_no_one(
    clients: dict[str, Probe], ops: Probe, publisher: str, topic_of: object, why: str
) -> None:
    client = clients[publisher]
    topic = topic_of()  # type: ignore[operator]
    payload = f"forbidden {uuid.uuid4().hex}".encode()
    assert client.publish(topic, payload, retain=True) == NOT_AUTHORIZED, why
    # A sentinel on a topic this client may write, published after the refused message:
    sentinel = {
        "_twin": dev(ACME).twin_topic,
        "_loop": topics.insights_topic(ACME, "m"),
        "_routing": topics.routing_request_topic(),
    }.get(publisher, dev(ACME).telemetry_topic)
    mark = uuid.uuid4().hex.encode()
    assert client.publish(sentinel, mark) == 0
    ops.wait_topic(sentinel, mark)
    assert not [m for m in ops.messages if m[1] == payload], f"{why}: the refused message was delivered"


def test_forbidden_subscriptions_receive_nothing(
    secure: SecureBroker, clients: dict[str, Probe], ops: Probe
) -> None:
    beta, twin, routing = clients[BETA], clients["_twin"], clients["_routing"]
    beta_device, acme_device = dev(BETA), dev(ACME)
    # retained state of the other tenant exists before the subscriptions are made
    assert twin.publish(beta_device.twin_topic, b"beta-state", retain=True) == 0
    assert twin.publish(topics.fleet_topic(BETA), b"beta-fleet", retain=True) == 0
    ops.wait_topic(topics.fleet_topic(BETA), b"beta-fleet")

    spy = probe(secure.settings(ACME))
    try:
        spy.subscribe(
            "#", "fl/#", "fl/v1/+/#", f"fl/v1/{BETA}/#", "fl/v1/+/telemetry/#", "fl/v1/+/twin/#",
            f"fl/v1/{BETA}/cmd/#", "fl/v1/_platform/#", "fl/v1/_sys/#", "fl/v1/_customers/#", "$SYS/#",
            topics.shared("spy", f"fl/v1/{BETA}/#"), topics.shared("twin", topics.device_filter("telemetry")),
        )
        # the other tenant's traffic of every kind flows now
        assert beta.publish(beta_device.telemetry_topic, b"beta-telemetry") == 0
        assert beta.publish(beta_device.status_topic, b"beta-status", retain=True) == 0
        assert beta.publish(topics.api_request_topic(BETA, "get_twin"), b"beta-api") == 0
        assert twin.publish(beta_device.anomaly_topic, b"beta-anomaly") == 0
        assert twin.publish(topics.api_response_topic(BETA, "c1"), b"beta-answer") == 0
        assert twin.publish(topics.deadletter_topic(BETA), b"beta-deadletter") == 0
        assert routing.publish(beta_device.command_topic("dispatch_job"), b"beta-job") == 0
        assert routing.publish(topics.routing_request_topic(), b"order") == 0
        for topic, payload in ((beta_device.telemetry_topic, b"beta-telemetry"),
                               (beta_device.command_topic("dispatch_job"), b"beta-job")):
            ops.wait_topic(topic, payload)
        # a sentinel the spy may read, delivered after everything above on the spy's connection
        assert twin.publish(acme_device.twin_topic, b"own-state") == 0
        spy.wait_topic(acme_device.twin_topic, b"own-state")
        foreign = spy.received(lambda t: not t.startswith(f"fl/v1/{ACME}/") and t != topics.deadletter_topic(ACME))
        assert foreign == [], f"tenant {ACME} received other tenants' or platform messages: {foreign[:5]}"
    finally:
        spy.close()


def test_the_loop_reads_units_and_feedback_of_every_tenant_and_writes_insights(
    clients: dict[str, Probe], ops: Probe
) -> None:
    loop, acme, beta = clients["_loop"], clients[ACME], clients[BETA]
    loop.subscribe(topics.device_filter("event"), topics.feedback_filter())
    acme_device = dev(ACME)
    assert acme.publish(acme_device.event_topic, b"unit") == 0
    assert beta.publish(topics.feedback_topic(BETA, "MW-20", "B"), b"fb") == 0
    loop.wait_topic(acme_device.event_topic, b"unit")
    loop.wait_topic(topics.feedback_topic(BETA, "MW-20", "B"), b"fb")
    assert loop.publish(topics.insights_topic(BETA, "MW-20"), b"insights", retain=True) == 0
    ops.wait_topic(topics.insights_topic(BETA, "MW-20"), b"insights")


def test_platform_services_do_not_read_twin_scale_out_topics(clients: dict[str, Probe], ops: Probe) -> None:
    """``fl/v1/+/twin/#`` (twin state of every tenant) would also match ``fl/v1/_sys/twin/...`` (worker
    membership and handoffs carrying raw telemetry): the ACL denies those to platform services."""
    routing, twin = clients["_routing"], clients["_twin"]
    routing.subscribe("fl/v1/+/twin/#", "fl/v1/_sys/#")
    assert twin.publish(topics.twin_handoff_topic("w1"), b"raw-telemetry") == 0
    assert twin.publish(topics.twin_worker_topic("w1"), b"membership") == 0
    ops.wait_topic(topics.twin_worker_topic("w1"), b"membership")
    sentinel = dev(ACME)
    assert twin.publish(sentinel.twin_topic, b"state") == 0
    routing.wait_topic(sentinel.twin_topic, b"state")
    assert not routing.received(lambda t: t.startswith("fl/v1/_sys/"))


def test_customers_see_only_their_own_level(secure: SecureBroker, ops: Probe) -> None:
    c1 = probe(secure.settings(f"_customer@{CUST1}"))
    c2 = probe(secure.settings(f"_customer@{CUST2}"))
    routing = probe(secure.settings("_routing"))
    try:
        # c2's order status exists (retained) before c1 tries to read every level
        assert routing.publish(topics.order_status_topic(CUST2, "o2"), b"c2-status", retain=True) == 0
        ops.wait_topic(topics.order_status_topic(CUST2, "o2"), b"c2-status")
        c1.subscribe("#", topics.customer_filter(CUST1), topics.customer_filter(CUST2), topics.customer_filter(),
                     "fl/v1/+/twin/#")
        # requests and orders are the only things a customer writes, and only on its own level
        assert c2.publish(topics.order_submit_topic(CUST2), b"c2-order") == 0
        assert c2.publish(topics.quote_request_topic(CUST2), b"c2-quote") == 0
        assert c2.publish(topics.order_submit_topic(CUST1), b"c2-into-c1") == NOT_AUTHORIZED
        assert c2.publish(topics.order_status_topic(CUST2, "o2"), b"forged-status") == NOT_AUTHORIZED
        assert c2.publish(topics.quote_response_topic(CUST1, "c"), b"forged-quote") == NOT_AUTHORIZED
        assert c2.publish(topics.routing_request_topic(), b"c2-routing") == NOT_AUTHORIZED
        assert c2.publish(dev(ACME).telemetry_topic, b"c2-telemetry") == NOT_AUTHORIZED
        assert routing.publish(dev(ACME).twin_topic, b"x") == NOT_AUTHORIZED
        ops.wait_topic(topics.order_submit_topic(CUST2), b"c2-order")
        # the sentinel: a quote for c1, delivered after everything above
        assert routing.publish(topics.quote_response_topic(CUST1, "q1"), b"quote") == 0
        c1.wait_topic(topics.quote_response_topic(CUST1, "q1"), b"quote")
        assert {m[0] for m in c1.messages} == {topics.quote_response_topic(CUST1, "q1")}
    finally:
        for p in (c1, c2, routing):
            p.close()


def test_last_will_on_another_tenants_topic_is_not_delivered(secure: SecureBroker, ops: Probe) -> None:
    """A factory may not plant a last will on another tenant's status topic."""
    victim = dev(BETA).status_topic
    own = dev(ACME).status_topic
    forged = probe(secure.settings(ACME), will=(victim, b"forged-offline", 1, True))
    honest = probe(secure.settings(ACME), will=(own, b"own-offline", 1, True))
    for p in (forged, honest):  # drop the connections without DISCONNECT: the wills fire
        p.client.loop_stop()
        p.client.socket().close()  # type: ignore[union-attr]
    ops.wait_topic(own, b"own-offline", timeout=15)
    assert not ops.received(lambda t: t == victim)


def test_added_user_is_confined_after_reload(secure: SecureBroker, ops: Probe, tmp_path: Path) -> None:
    """Adding a tenant at runtime (password entry + SIGHUP) gives it its own tenant and nothing else."""
    newcomer = f"new{uuid.uuid4().hex[:6]}"
    p = probe(secure.ensure_user(newcomer))
    password = secure.passwords[newcomer]
    assert secure.ensure_user(newcomer).password == password  # a known user is not re-keyed
    try:
        assert p.publish(dev(newcomer).telemetry_topic) == 0
        assert p.publish(dev(ACME).telemetry_topic) == NOT_AUTHORIZED
    finally:
        p.close()
