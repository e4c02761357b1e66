"""The routing service against a real Mosquitto: fleet from retained births and twin state, request/response,
dispatch of jobs with acknowledgement, refusal and printer failure re-routed, bad requests answered."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from forgeline.broker import RunningBroker
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, connect
from forgeline.routing.router import RoutingConfig
from forgeline.routing.service import EVENTS_CLIENT, RoutingService

pytestmark = pytest.mark.timeout(120)

PRINTERS = [DeviceRef("acme", "s1", "h1", "mjf-1"), DeviceRef("acme", "s1", "h1", "mjf-2"),
            DeviceRef("beta", "s1", "h1", "mjf-9")]


def birth(cost: float) -> dict[str, Any]:
    doc = {"status": "online", "ts": time.time(), "technology": "MJF", "channels": [{"name": "state", "unit": "code"}],
           "materials": ["PA12"], "build_volume_mm": [380, 284, 380], "part_spacing_mm": 3, "cost_per_hour": cost}
    schemas.validate("status", doc)
    return doc


def twin(ref: DeviceRef, state: str = "idle", utilization: float = 0.5, anomaly: float = 0.05) -> dict[str, Any]:
    doc = {"device": {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device},
           "ts": time.time(), "online": state != "offline", "state": state,
           "kpis": {"utilization": utilization, "anomaly_score": anomaly}}
    schemas.validate("twin_state", doc)
    return doc


class Agents:
    """Stand-in for the printers' agents on the broker: answers dispatch_job like edge_agent/commands.py
    (refusing for the devices in ``refuse``) and records every request."""

    def __init__(self, settings: MqttSettings, refuse: set[str]) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.refuse = refuse
        self.cond = threading.Condition()
        self.client = connect(settings)
        self.client.on_message = self._on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topics.device_filter("cmd"), 1)
        assert done.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        parsed = topics.parse(msg.topic)
        assert parsed.device is not None and parsed.command is not None
        request = schemas.loads("command_request", bytes(msg.payload))
        with self.cond:
            self.requests.append((parsed.device.key, request))
            self.cond.notify_all()
        refused = parsed.device.key in self.refuse
        response = {"correlation_id": request["correlation_id"], "ok": not refused, "ts": time.time()}
        if refused:
            response["error"] = "material 'PA12' is not loaded"
        else:
            response["result"] = {"job_id": request["args"]["job_id"], "queued": 1}
        self.client.publish(parsed.device.command_response_topic(parsed.command), schemas.dumps(response), qos=1)

    def wait(self, predicate: Callable[[list[tuple[str, dict[str, Any]]]], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                assert left > 0, f"agents got {len(self.requests)} requests"
                self.cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Responses:
    def __init__(self, settings: MqttSettings) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.client = connect(settings)
        self.client.on_message = self._on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(f"{topics.PREFIX}/{topics.PLATFORM}/routing/response/#", 1)
        assert done.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, json.loads(msg.payload)))
            self.cond.notify_all()

    def wait(self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, doc in self.messages:
                    if t == topic and predicate(doc):
                        return doc
                left = deadline - time.monotonic()
                assert left > 0, f"no matching response on {topic}; got {[t for t, _ in self.messages]}"
                self.cond.wait(left)

    def request(self, client_id: str, order: dict[str, Any], **extra: Any) -> dict[str, Any]:
        correlation_id = uuid.uuid4().hex
        payload = {"correlation_id": correlation_id, "client_id": client_id, "order": order, **extra}
        self.client.publish(topics.routing_request_topic(), json.dumps(payload), qos=1)
        return self.wait(topics.routing_response_topic(client_id), lambda d: d["correlation_id"] == correlation_id)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def settings(fresh_mosquitto: RunningBroker) -> MqttSettings:
    # A broker of its own: the service reads every tenant's retained fleet topics.
    return MqttSettings(host=fresh_mosquitto.host, port=fresh_mosquitto.port,
                        protocol=5 if fresh_mosquitto.mqtt5 else 4)


@pytest.fixture
def fleet_published(settings: MqttSettings) -> Iterator[paho.Client]:
    client = connect(settings)
    for i, ref in enumerate(PRINTERS):
        client.publish(ref.status_topic, schemas.dumps(birth(30.0 + 10 * i)), qos=1, retain=True).wait_for_publish(5)
        client.publish(ref.twin_topic, schemas.dumps(twin(ref, utilization=0.2 + 0.3 * i)), qos=1,
                       retain=True).wait_for_publish(5)
    yield client
    client.disconnect()
    client.loop_stop()


def order(order_id: str, quantity: int = 30) -> dict[str, Any]:
    return {"order_id": order_id, "customer": "bigco", "due_ts": time.time() + 5 * 86400, "parts": [
        {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20], "volume_cm3": 12,
         "quantity": quantity},
        {"part_id": "alien", "technology": "MJF", "material": "Kryptonite", "bbox_mm": [6, 4, 2], "volume_cm3": 0.01},
    ]}


def _wait(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_route_dispatch_refuse_and_fail_over_mqtt(settings: MqttSettings, fleet_published: paho.Client) -> None:
    refused = PRINTERS[0].key
    agents = Agents(settings, refuse={refused})
    responses = Responses(settings)
    service = RoutingService(settings, RoutingConfig(keep_open=False), dispatch_timeout_s=3, tick_s=0.5)
    service.start()
    try:
        _wait(lambda: len(service.router.fleet) == 3 and all(p.utilization is not None for p in service.router.fleet))
        answer = responses.request("shop", order("o-1"))
        schemas.validate("routing_response", answer)
        assert answer["ok"] and len(answer["assignments"]) == 30
        assert [r["part_id"] for r in answer["rejected"]] == ["alien"]
        assert answer["rejected"][0]["code"] == "unknown_material"
        first = answer["assignments"][0]
        assert first["printer"] == refused  # the least utilized printer wins with equal fill
        assert refused in first["explanation"] and first["runner_up"] is not None

        # the job goes to the refusing agent; its parts are re-routed to another printer and dispatched there
        event = responses.wait(topics.routing_response_topic(EVENTS_CLIENT),
                               lambda d: any(a["printer"] != refused for a in d["assignments"]))
        assert {a["unit_id"] for a in event["assignments"]} == {a["unit_id"] for a in answer["assignments"]}
        assert all("agent refused the job" in a["explanation"] for a in event["assignments"])
        new_printer = event["assignments"][0]["printer"]
        agents.wait(lambda reqs: any(key == new_printer for key, _ in reqs))
        _wait(lambda: service.counters.acknowledged >= 1)
        job = next(r for key, r in agents.requests if key == new_printer)["args"]
        assert len(job["parts"]) == 30 and job["material"] == "PA12" and job["material_density_g_cm3"] == 1.01
        build = service.router.builds[job["job_id"]]
        _wait(lambda: build.status == "dispatched")

        # that printer fails in the twin: its queue moves again, announced on the events topic
        failed = DeviceRef.from_key(new_printer)
        fleet_published.publish(failed.twin_topic, schemas.dumps(twin(failed, state="error")), qos=1, retain=True)
        moved = responses.wait(topics.routing_response_topic(EVENTS_CLIENT),
                               lambda d: any("state error" in a["explanation"] for a in d["assignments"]))
        # not back to the printer whose agent refused (suspended for a while), not to the failed one
        assert {a["printer"] for a in moved["assignments"]} == {PRINTERS[2].key}
        assert "suspended" in str(service.router.unavailable_reason(service.router.fleet.printers[refused]))
        assert build.status == "failed"
    finally:
        service.stop()
        agents.close()
        responses.close()


def test_bad_requests_get_clear_answers(settings: MqttSettings, fleet_published: paho.Client) -> None:
    responses = Responses(settings)
    service = RoutingService(settings, dispatch=False)
    service.start()
    try:
        _wait(lambda: len(service.router.fleet) == 3)
        publish = responses.client.publish
        publish(topics.routing_request_topic(), b"{not json", qos=1)
        publish(topics.routing_request_topic(), json.dumps({"correlation_id": "c1", "client_id": "shop",
                                                           "order": {"parts": []}}), qos=1)
        bad = responses.wait(topics.routing_response_topic("shop"), lambda d: d["correlation_id"] == "c1")
        assert bad["ok"] is False and "order" in bad["error"]
        bad_order = order("o-2")
        bad_order["customer"] = "_platform"
        answer = responses.request("shop", bad_order)
        assert answer["ok"] is False and "reserved" in answer["error"]
        # a dry run answers but keeps nothing
        answer = responses.request("shop", order("o-3", 5), dry_run=True)
        assert answer["ok"] and len(answer["assignments"]) == 5 and not service.router.builds
        _wait(lambda: service.counters.rejected_requests == 3)
    finally:
        service.stop()
        responses.close()


def test_restart_keeps_accepted_parts_and_redispatches_unacknowledged_jobs(
    settings: MqttSettings, fleet_published: paho.Client, tmp_path: Any
) -> None:
    state = str(tmp_path / "routing-state.json")
    responses = Responses(settings)
    first = RoutingService(settings, RoutingConfig(keep_open=False), dispatch_timeout_s=60, state_path=state)
    first.start()
    try:
        _wait(lambda: len(first.router.fleet) == 3)
        answer = responses.request("shop", order("o-7", 12))
        assert answer["ok"] and len(answer["assignments"]) == 12  # accepted; no agent answers the job
        build_id = answer["assignments"][0]["build_id"]
        _wait(lambda: first.counters.dispatched >= 1)
    finally:
        first.stop()  # the process ends with the job unacknowledged
    agents = Agents(settings, refuse=set())
    second = RoutingService(settings, RoutingConfig(keep_open=False), dispatch_timeout_s=5, state_path=state)
    assert second.router.builds[build_id].status == "released" and len(second.router.builds[build_id].units) == 12
    second.start()
    try:
        agents.wait(lambda reqs: any(r["args"]["job_id"] == build_id for _, r in reqs))
        _wait(lambda: second.router.builds[build_id].status == "dispatched")
        # and the next build number continues, no id is reused
        again = responses.request("shop", order("o-8", 2))
        assert again["assignments"][0]["build_id"] != build_id
    finally:
        second.stop()
        agents.close()
        responses.close()


@pytest.mark.influx
def test_routing_measurement_spilled_and_loaded_into_influxdb(
    settings: MqttSettings, fleet_published: paho.Client, tmp_path: Any
) -> None:
    """With an InfluxDB URL nobody listens on, the routing points go to the spill directory; loaded into a
    real influxd they give the queue, the open build and its fill, and the on-time rate of the order."""
    from forgeline.broker import free_port
    from forgeline.timeseries import InfluxSettings
    from tests.servers import start_influxd

    spill = tmp_path / "spill"
    influx = InfluxSettings(f"http://127.0.0.1:{free_port()}", max_retries=0, flush_interval_s=0.1,
                            retry_interval_s=0.05, max_retry_delay_s=0.2, spill_dir=str(spill))
    responses = Responses(settings)
    service = RoutingService(settings, dispatch=False, influx=influx, influx_interval_s=0.2)
    service.start()
    try:
        _wait(lambda: len(service.router.fleet) == 3)
        answer = responses.request("shop", order("o-9", 30))
        assert answer["ok"] and len(answer["assignments"]) == 30
        [build] = service.router.builds.values()
        assert build.status == "open"  # kept open for more parts
        assert service.writer is not None
        _wait(lambda: service.writer is not None and service.writer.stats.spilled_points >= 6)
    finally:
        service.stop()
        responses.close()
    assert service.writer.stats.points_written == 0 and service.writer.stats.dropped_points == 0
    lines = [text for path in sorted(spill.glob("routing-*.lp")) for text in path.read_text().splitlines()]
    assert len(lines) == service.writer.stats.spilled_points
    with start_influxd(tmp_path / "influxd") as server:
        server.write(lines)
        [acme] = server.query('SELECT last("queued_parts") AS queued, max("queued_parts") AS most, '
                              'last("open_builds") AS open, '
                              'last("open_build_fill") AS fill, last("released_builds") AS released, '
                              'last("on_time_rate") AS on_time FROM "routing" '
                              "WHERE \"tenant\" = 'acme' AND \"technology\" = 'MJF'")
        assert (acme["queued"], acme["most"], acme["open"], acme["released"]) == (30, 30, 1, 0)
        assert acme["fill"] == pytest.approx(build.build.fill, abs=1e-9) and 0 < acme["fill"] < 1
        assert acme["on_time"] == 1.0  # due in five days, ready within hours
        [beta] = server.query('SELECT last("queued_parts") AS queued, last("open_builds") AS open FROM "routing" '
                              "WHERE \"tenant\" = 'beta'")
        assert (beta["queued"], beta["open"]) == (0, 0)  # an idle factory shows zeros, not nothing
        assert server.query("SELECT count(\"open_build_fill\") FROM \"routing\" WHERE \"tenant\" = 'beta'") == []
