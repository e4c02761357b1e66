"""The twin service behind the production broker, with its own ``_twin`` account: tenants with
devices of the same names stay apart; a message on one tenant's topic never touches a device
registered to another tenant; the query API answers within the requester's tenant only and its
answers reach no other tenant; slow clients of the metrics endpoint do not stall it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from security_support import Probe, connect_packet, probe, publish_packet, tls_socket

from forgeline.broker import find_mosquitto, free_port
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from tests.twin_support import batch, birth
from twin.config import TwinConfig
from twin.service import TwinService

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

SUFFIX = uuid.uuid4().hex[:6]
ALPHA, BRAVO = f"alpha{SUFFIX}", f"bravo{SUFFIX}"
NOT_AUTHORIZED = 135


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("twin-broker"), [ALPHA, BRAVO, "_twin", "_ops"])
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def twin(secure: SecureBroker) -> Iterator[TwinService]:
    import twin.metrics

    patch = pytest.MonkeyPatch()
    patch.setattr(twin.metrics, "CLIENT_TIMEOUT_S", 1.0)  # so the idle-client test is quick
    settings = secure.settings("_twin")
    config = TwinConfig(
        broker=secure.url,
        mqtt={"username": settings.username, "password": settings.password, "ca_file": settings.ca_file,
              "cert_file": settings.cert_file, "key_file": settings.key_file},
        worker_id=f"twin-{SUFFIX}", publish_interval_s=0.0, session_expiry_s=5, unknown_device_hold_s=0.5,
        metrics_port=free_port(),
    )
    service = TwinService(config).start()
    yield service
    service.stop(snapshot=False)
    patch.undo()


def _publish(p: Probe, topic: str, payload: bytes | dict[str, Any], retain: bool = False) -> Any:
    """Publish QoS 1; the PUBACK reason code (compares equal to its number)."""
    data = schemas.dumps(payload) if isinstance(payload, dict) else payload
    return p.publish(topic, data, retain=retain)


def _latest(p: Probe, topic: str) -> dict[str, Any] | None:
    found = [payload for t, payload, _ in p.messages if t == topic and payload]
    return json.loads(found[-1]) if found else None


def test_same_named_devices_of_two_tenants_stay_apart(secure: SecureBroker, twin: TwinService) -> None:
    alpha, bravo = probe(secure.settings(ALPHA)), probe(secure.settings(BRAVO))
    mine, theirs = DeviceRef(ALPHA, "s", "a", "p1"), DeviceRef(BRAVO, "s", "a", "p1")
    try:
        for p in (alpha, bravo):
            p.subscribe("fl/v1/+/twin/#", "fl/v1/+/fleet", "fl/v1/_sys/deadletter/+")
        assert _publish(alpha, mine.status_topic, birth("FDM"), retain=True) == 0
        assert _publish(bravo, theirs.status_topic, birth("SLS", channels=("state", "laser_power"))) == 0
        for seq in range(3):
            assert _publish(alpha, mine.telemetry_topic, batch(seq)) == 0
        assert _publish(bravo, theirs.telemetry_topic, batch(0, channels=("state", "laser_power"), temp=30.0)) == 0
        alpha.wait_for(lambda _: (_latest(alpha, mine.twin_topic) or {}).get("samples", 0) == 90)
        bravo.wait_for(lambda _: (_latest(bravo, theirs.twin_topic) or {}).get("samples", 0) == 20)
        assert _latest(alpha, mine.twin_topic)["capabilities"]["technology"] == "FDM"  # type: ignore[index]
        assert _latest(bravo, theirs.twin_topic)["capabilities"]["technology"] == "SLS"  # type: ignore[index]
        for p, tenant in ((alpha, ALPHA), (bravo, BRAVO)):
            own = (f"fl/v1/{tenant}/", topics.deadletter_topic(tenant))
            foreign = [t for t, _, _ in p.messages if not (t.startswith(own[0]) or t == own[1])]
            assert foreign == [], f"{tenant} received: {foreign[:5]}"
    finally:
        alpha.close()
        bravo.close()


def test_a_message_on_another_tenants_topic_never_touches_a_registered_device(
    secure: SecureBroker, twin: TwinService
) -> None:
    """BRAVO sends telemetry for a device name ALPHA has registered: it is BRAVO's unknown device
    (dead-lettered to BRAVO), and ALPHA's device is untouched."""
    alpha, bravo = probe(secure.settings(ALPHA)), probe(secure.settings(BRAVO))
    registered, impostor = DeviceRef(ALPHA, "s", "a", "p2"), DeviceRef(BRAVO, "s", "a", "p2")
    try:
        alpha.subscribe(registered.twin_topic, topics.deadletter_topic(ALPHA))
        bravo.subscribe(topics.deadletter_topic(BRAVO))
        assert _publish(alpha, registered.status_topic, birth("FDM"), retain=True) == 0
        assert _publish(alpha, registered.telemetry_topic, batch(0)) == 0
        alpha.wait_for(lambda _: (_latest(alpha, registered.twin_topic) or {}).get("samples", 0) == 30)
        # the impostor sends batches that would advance the registered device's sequence
        for seq in range(1, 4):
            assert _publish(bravo, impostor.telemetry_topic, batch(seq, temp=999.0)) == 0
        # ... and cannot publish on the registered device's topic at all
        assert _publish(bravo, registered.telemetry_topic, batch(9)) == NOT_AUTHORIZED
        bravo.wait_for(lambda ms: any(t == topics.deadletter_topic(BRAVO) for t, _, _ in ms), timeout=15)
        letter = json.loads(next(p for t, p, _ in bravo.messages if t == topics.deadletter_topic(BRAVO)))
        assert letter["topic"] == impostor.telemetry_topic and "unknown device" in letter["reason"], letter
        twin.flush_twins()
        assert twin.wait_idle(10)
        state = next(d for d in twin.state.latest.values() if d["device"]["tenant"] == ALPHA
                     and d["device"]["device"] == "p2")
        assert state["samples"] == 30 and state["reported"]["nozzle_temp"] != 999.0
        assert not [t for t, _, _ in alpha.messages if t == topics.deadletter_topic(ALPHA)]
    finally:
        alpha.close()
        bravo.close()


def _request(p: Probe, tenant: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    client_id = f"c{uuid.uuid4().hex[:8]}"
    correlation = uuid.uuid4().hex
    response_topic = topics.api_response_topic(tenant, client_id)
    p.subscribe(response_topic)
    payload = {"correlation_id": correlation, "client_id": client_id, **body}
    assert _publish(p, topics.api_request_topic(tenant, method), payload) == 0
    p.wait_topic(response_topic, timeout=15)
    return json.loads(next(m for t, m, _ in p.messages if t == response_topic))


def test_query_api_answers_within_the_requesters_tenant_only(secure: SecureBroker, twin: TwinService) -> None:
    alpha, bravo = probe(secure.settings(ALPHA)), probe(secure.settings(BRAVO))
    mine, theirs = DeviceRef(ALPHA, "s", "b", "q1"), DeviceRef(BRAVO, "s", "b", "secret")
    try:
        bravo.subscribe("fl/v1/+/api/response/#", f"fl/v1/{ALPHA}/api/#")  # a spy on ALPHA's answers
        assert _publish(alpha, mine.status_topic, birth("FDM")) == 0
        assert _publish(bravo, theirs.status_topic, birth("FDM")) == 0
        assert _publish(alpha, mine.telemetry_topic, batch(0)) == 0
        assert _publish(bravo, theirs.telemetry_topic, batch(0)) == 0
        deadline = time.monotonic() + 15
        while len(twin.state.latest) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        listed = _request(alpha, ALPHA, "list_devices", {})
        assert listed["ok"] and all(not d["device"].endswith("/secret") for d in listed["result"])
        assert "s/b/q1" in [d["device"] for d in listed["result"]]
        for path in ("s/b/secret", f"{BRAVO}/s/b/secret", f"../{BRAVO}/s/b/secret", "s/b/secret/../q1"):
            answer = _request(alpha, ALPHA, "get_twin", {"device": path})
            assert not answer["ok"], (path, answer)
        # ALPHA cannot ask in BRAVO's name, and BRAVO's spy saw none of ALPHA's answers
        body = {"correlation_id": "x", "client_id": "spy"}
        assert _publish(alpha, topics.api_request_topic(BRAVO, "list_devices"), body) == NOT_AUTHORIZED
        own = _request(bravo, BRAVO, "list_devices", {})  # a sentinel delivered to the spy after the others
        assert "s/b/secret" in [d["device"] for d in own["result"]]
        assert "s/b/q1" not in [d["device"] for d in own["result"]]
        assert not [t for t, _, _ in bravo.messages if t.startswith(f"fl/v1/{ALPHA}/")]
    finally:
        alpha.close()
        bravo.close()


def test_slow_clients_of_the_metrics_endpoint_do_not_stall_it(twin: TwinService) -> None:
    port = twin.metrics.port
    stop = threading.Event()

    def drip() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
                if stop.wait(0.05):
                    return
                sock.sendall(bytes([byte]))
            stop.wait(5)

    threads = [threading.Thread(target=drip, daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        for _ in range(5):
            start = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                assert response.status == 200
            assert time.monotonic() - start < 1.0
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_idle_clients_of_the_metrics_endpoint_are_disconnected(twin: TwinService) -> None:
    """A connection that sends nothing does not hold a server thread for ever."""
    with socket.create_connection(("127.0.0.1", twin.metrics.port), timeout=10) as sock:
        sock.sendall(b"GET /metr")  # and then nothing
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < 5


def test_slow_drip_publishers_do_not_stall_the_twin(secure: SecureBroker, twin: TwinService) -> None:
    """Five authenticated clients trickle a CONNECT and a telemetry PUBLISH byte by byte; meanwhile
    the twin keeps ingesting another tenant's batches promptly, and once complete the trickled
    batches are ingested like any other."""
    alpha, bravo = probe(secure.settings(ALPHA)), probe(secure.settings(BRAVO))
    steady = DeviceRef(ALPHA, "s", "c", "steady")
    dripped = [DeviceRef(BRAVO, "s", "c", f"drip{i}") for i in range(5)]
    settings, pair = secure.settings(BRAVO), secure.pki.client(BRAVO)
    stop, replies = threading.Event(), {}

    def drip(index: int, ref: DeviceRef) -> None:
        sock = tls_socket(secure.host, secure.port, settings.ca_file or "", (str(pair.cert), str(pair.key)))
        try:
            packet = connect_packet(f"drip{index}{SUFFIX}", settings.username, settings.password)
            packet += publish_packet(ref.telemetry_topic, batch(0))
            for byte in packet:
                if stop.wait(0.005):
                    return
                sock.sendall(bytes([byte]))
            replies[index] = sock.recv(4)
        finally:
            sock.close()

    try:
        alpha.subscribe(steady.twin_topic)
        assert _publish(alpha, steady.status_topic, birth("FDM")) == 0
        for ref in dripped:
            assert not _publish(bravo, ref.status_topic, birth("FDM")).is_failure
        threads = [threading.Thread(target=drip, args=(i, ref), daemon=True) for i, ref in enumerate(dripped)]
        for t in threads:
            t.start()
        for seq in range(5):  # the steady device's batches are ingested promptly while the drips go on
            start = time.monotonic()
            assert _publish(alpha, steady.telemetry_topic, batch(seq)) == 0
            expected = 30 * (seq + 1)

            def ingested(_: object, expected: int = expected) -> bool:
                return (_latest(alpha, steady.twin_topic) or {}).get("samples") == expected

            alpha.wait_for(ingested)
            assert time.monotonic() - start < 2.0
            if seq == 0:
                assert all(t.is_alive() for t in threads), "the drips finished too early to prove anything"
        for t in threads:
            t.join(60)
        assert all(replies.get(i) == b"\x20\x02\x00\x00" for i in range(5)), replies
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            keys = {ref.key for ref in dripped}
            done = [d for key, d in list(twin.state.latest.items()) if key in keys and d["samples"] == 30]
            if len(done) == 5:
                break
            time.sleep(0.1)
        assert len(done) == 5, "the trickled batches were not ingested"
    finally:
        stop.set()
        alpha.close()
        bravo.close()
