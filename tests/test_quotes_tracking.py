"""Order tracking against a real Mosquitto with the real routing service: an order split across two
factories shows progress from both and completes; a printer failure mid-build moves the ETA and raises
the delay event with re-routing options; bad and foreign orders are refused on the sender's level."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from quotes_support import Agents, Clock, Subscriber, birth, event, twin, wait_until

from forgeline.broker import RunningBroker
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings
from forgeline.quotes.service import CustomerService, routing_order_id
from forgeline.routing.router import RoutingConfig
from forgeline.routing.service import RoutingService

pytestmark = pytest.mark.timeout(120)

A = DeviceRef("acme", "s1", "h1", "mjf-a")
B = DeviceRef("beta", "s1", "h1", "mjf-b")
CUSTOMER = "bigco"
DAY = 86400.0


@pytest.fixture
def settings(fresh_mosquitto: RunningBroker) -> MqttSettings:
    return MqttSettings(host=fresh_mosquitto.host, port=fresh_mosquitto.port,
                        protocol=5 if fresh_mosquitto.mqtt5 else 4)


@pytest.fixture
def stack(settings: MqttSettings) -> Iterator[tuple[RoutingService, CustomerService, Agents, Subscriber, Clock]]:
    clock = Clock()
    agents = Agents(settings)
    customer = Subscriber(settings, topics.customer_filter(CUSTOMER))
    routing = RoutingService(settings, RoutingConfig(keep_open=False), dispatch_timeout_s=5, tick_s=0.3)
    service = CustomerService(settings, clock=clock, tick_s=0.2, options_timeout_s=3)
    routing.start()
    service.start()
    yield routing, service, agents, customer, clock
    service.stop()
    routing.stop()
    agents.close()
    customer.close()


def announce(settings: MqttSettings, *printers: tuple[DeviceRef, str, dict[str, object]]) -> Subscriber:
    publisher = Subscriber(settings)
    for ref, material, twin_kw in printers:
        publisher.publish(ref.status_topic, schemas.dumps(birth(material)), retain=True)
        publisher.publish(ref.twin_topic, schemas.dumps(twin(ref, **twin_kw)), retain=True)  # type: ignore[arg-type]
    return publisher


def submit(customer: Subscriber, order: dict[str, object], as_customer: str = CUSTOMER) -> None:
    customer.publish(topics.order_submit_topic(as_customer), json.dumps(order).encode())


def test_order_split_across_two_factories_progresses_on_both_and_completes(
    settings: MqttSettings, stack: tuple[RoutingService, CustomerService, Agents, Subscriber, Clock]
) -> None:
    routing, service, agents, customer, clock = stack
    printers = announce(settings, (A, "PA12", {}), (B, "PA11", {}))
    wait_until(lambda: len(routing.router.fleet) == 2)
    order_topic = topics.order_status_topic(CUSTOMER, "o-100")
    submit(customer, {"order_id": "o-100", "due_ts": clock.now + 5 * DAY, "parts": [
        {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20], "volume_cm3": 12,
         "quantity": 4},
        {"part_id": "clip", "technology": "MJF", "material": "PA11", "bbox_mm": [20, 10, 5], "volume_cm3": 0.5,
         "quantity": 3}]})
    queued = customer.wait_doc(order_topic, lambda d: d["status"] == "queued")
    schemas.validate("order_status", queued)
    assert queued["factories"] == 2 and queued["units"] == 7 and queued["eta_ts"] is not None
    jobs = dict(agents.wait_jobs(2))
    assert set(jobs) == {A.key, B.key}
    # the factories see opaque order ids, never the customer
    assert all(p["order_id"] == routing_order_id(CUSTOMER, "o-100") and CUSTOMER not in json.dumps(job)
               for job in jobs.values() for p in job["parts"])

    # both printers start and report half their layers
    for ref in (A, B):
        job_id = jobs[ref.key]["job_id"]
        printers.publish(ref.event_topic, event("job_started", job_id, clock.now))
        printers.publish(ref.twin_topic, schemas.dumps(twin(ref, "printing", progress=0.5,
                                                            job={"job_id": job_id})), retain=True)
    printing = customer.wait_doc(order_topic, lambda d: d["status"] == "printing" and d["progress"] == 0.5)
    for part, factory in (("bracket", "acme"), ("clip", "beta")):
        status = customer.wait_doc(topics.part_status_topic(CUSTOMER, "o-100", part),
                                   lambda d: d["status"] == "printing" and d["progress"] == 0.5)
        schemas.validate("part_status", status)
        assert {u["factory"] for u in status["units"]} == {factory}
        assert "build_id" not in json.dumps(status)  # no handle to find who else is in the build
    assert printing["eta_ts"] is not None

    # both finish; after cool-down and post-processing the order is done
    for ref in (A, B):
        printers.publish(ref.event_topic, event("job_finished", jobs[ref.key]["job_id"], clock.now + 3600))
    post = customer.wait_doc(order_topic, lambda d: d["status"] == "post_processing")
    clock.now = post["eta_ts"] + 1
    service.tick_now()
    done = customer.wait_doc(order_topic, lambda d: d["status"] == "done")
    assert done["units_done"] == 7 and done["progress"] == 1.0
    done_event = customer.wait_doc(topics.customer_events_topic(CUSTOMER), lambda d: d["type"] == "order_done")
    assert done_event["order_id"] == "o-100"
    printers.close()


def test_printer_failure_mid_build_moves_the_eta_and_raises_the_delay_event(
    settings: MqttSettings, stack: tuple[RoutingService, CustomerService, Agents, Subscriber, Clock]
) -> None:
    routing, _service, agents, customer, clock = stack
    busy: dict[str, object] = {"state": "printing",
                               "job": {"job_id": "other-job", "estimated_end_ts": clock.now + 3 * DAY}}
    printers = announce(settings, (A, "PA12", {}), (B, "PA12", busy))
    fleet = routing.router.fleet
    wait_until(lambda: len(fleet) == 2 and fleet.printers[B.key].busy_until_ts is not None)
    order_topic = topics.order_status_topic(CUSTOMER, "o-200")
    submit(customer, {"order_id": "o-200", "due_ts": clock.now + 2 * DAY, "parts": [
        {"part_id": "housing", "technology": "MJF", "material": "PA12", "bbox_mm": [150, 120, 60],
         "volume_cm3": 90, "quantity": 2}]})
    (printer, job), = agents.wait_jobs(1)
    assert printer == A.key
    printers.publish(A.event_topic, event("job_started", job["job_id"], clock.now))
    printers.publish(A.twin_topic, schemas.dumps(twin(A, "printing", progress=0.4, job={"job_id": job["job_id"]})),
                     retain=True)
    before = customer.wait_doc(order_topic, lambda d: d["status"] == "printing")
    assert before["eta_ts"] <= before["due_ts"]

    # the printer fails: routing moves the parts to the busy printer, three days out
    printers.publish(A.twin_topic, schemas.dumps(twin(A, "error")), retain=True)
    after = customer.wait_doc(order_topic, lambda d: d["status"] == "delayed")
    assert after["eta_ts"] > before["eta_ts"] + DAY and after["eta_ts"] > after["due_ts"]
    part = customer.wait_doc(topics.part_status_topic(CUSTOMER, "o-200", "housing"), lambda d: d["status"] == "delayed")
    assert {u["factory"] for u in part["units"]} == {"beta"}
    delay = customer.wait_doc(topics.customer_events_topic(CUSTOMER), lambda d: d["type"] == "eta_past_due")
    schemas.validate("customer_event", delay)
    assert delay["part_ids"] == ["housing"] and delay["eta_ts"] > delay["due_ts"]
    options = {o["option"]: o for o in delay["options"]}
    assert options["keep"]["on_time"] is False
    assert "reroute" in options and options["reroute"]["eta_ts"] is not None  # what routing offers now
    printers.close()


def test_bad_and_foreign_orders_are_refused_on_the_senders_level(
    settings: MqttSettings, stack: tuple[RoutingService, CustomerService, Agents, Subscriber, Clock]
) -> None:
    routing, service, _agents, customer, _clock = stack
    other = Subscriber(settings, topics.customer_filter("other"))
    announce(settings, (A, "PA12", {})).close()
    wait_until(lambda: len(routing.router.fleet) == 1)
    submit(customer, {"order_id": "o-300", "customer": "other", "parts": [
        {"part_id": "x", "bbox_mm": [1, 1, 1], "volume_cm3": 0.1, "material": "PA12"}]})
    refused = customer.wait_doc(topics.order_status_topic(CUSTOMER, "o-300"), lambda d: d["status"] == "error")
    assert "another customer" in refused["error"]
    customer.publish(topics.order_submit_topic(CUSTOMER), b'{"order_id": "o-301", "parts": "none"}')
    bad = customer.wait_doc(topics.order_status_topic(CUSTOMER, "o-301"), lambda d: d["status"] == "error")
    assert "parts" in bad["error"]
    submit(customer, {"order_id": "o-302", "parts": [
        {"part_id": "ok", "technology": "MJF", "material": "PA12", "bbox_mm": [10, 10, 10], "volume_cm3": 0.5},
        {"part_id": "huge", "technology": "MJF", "material": "PA12", "bbox_mm": [900, 10, 10], "volume_cm3": 0.5}]})
    part = customer.wait_doc(topics.part_status_topic(CUSTOMER, "o-302", "huge"), lambda d: d["status"] == "rejected")
    assert "larger than every chamber" in part["reason"]
    time.sleep(0.3)
    assert other.messages == []  # nothing went to the customer the payload named
    assert service.counters.refused == 2
    other.close()


def test_end_to_end_with_a_real_edge_agent(
    settings: MqttSettings, stack: tuple[RoutingService, CustomerService, Agents, Subscriber, Clock]
) -> None:
    """Customer order -> routing -> dispatch_job to a simulated printer in the real edge agent, which
    acknowledges, prints (job_started / job_finished events) -> the customer sees it through to done."""
    from edge_agent import FleetSpec, PrinterSpec, start_simulated_fleet, wait_connected

    routing, service, stand_in, customer, clock = stack
    stand_in.close()  # the real agent answers this time
    fleet = FleetSpec("acme", "plant", "hall", (PrinterSpec("mjf-01", "MJF", materials=("PA12",)),), ())
    agent = start_simulated_fleet(settings, fleet, speed=2000, rate_hz=2, auto_jobs=False)
    try:
        assert wait_connected(agent)
        wait_until(lambda: len(routing.router.fleet) == 1)
        time.sleep(0.3)  # the agent's command subscription follows its CONNACK
        order_topic = topics.order_status_topic(CUSTOMER, "o-900")
        submit(customer, {"order_id": "o-900", "due_ts": clock.now + 5 * DAY, "parts": [
            {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [40, 30, 10],
             "volume_cm3": 4, "quantity": 3}]})
        wait_until(lambda: routing.counters.acknowledged == 1, timeout=20)
        customer.wait_doc(order_topic, lambda d: d["status"] in ("printing", "post_processing"), timeout=30)
        finished = customer.wait_doc(order_topic, lambda d: d["status"] == "post_processing", timeout=60)
        clock.now = finished["eta_ts"] + 1
        service.tick_now()
        done = customer.wait_doc(order_topic, lambda d: d["status"] == "done")
        assert done["units_done"] == 3 and done["factories"] == 1
    finally:
        agent.stop()


def test_tracking_survives_a_restart(settings: MqttSettings, tmp_path: Path) -> None:
    clock = Clock()
    state = str(tmp_path / "customers.json")
    agents = Agents(settings)
    customer = Subscriber(settings, topics.customer_filter(CUSTOMER))
    routing = RoutingService(settings, RoutingConfig(keep_open=False), tick_s=0.3)
    routing.start()
    printers = announce(settings, (A, "PA12", {}))
    try:
        wait_until(lambda: len(routing.router.fleet) == 1)
        first = CustomerService(settings, clock=clock, tick_s=0.2, state_path=state)
        first.start()
        order_topic = topics.order_status_topic(CUSTOMER, "o-400")
        submit(customer, {"order_id": "o-400", "due_ts": clock.now + 5 * DAY, "parts": [
            {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20],
             "volume_cm3": 12, "quantity": 2}]})
        customer.wait_doc(order_topic, lambda d: d["status"] == "queued")
        first.stop()
        (_, job), = agents.wait_jobs(1)
        second = CustomerService(settings, clock=clock, tick_s=0.2, state_path=state)
        second.start()
        try:
            printers.publish(A.event_topic, event("job_started", job["job_id"], clock.now))
            customer.wait_doc(order_topic, lambda d: d["status"] == "printing")  # the new process knew the order
        finally:
            second.stop()
    finally:
        routing.stop()
        printers.close()
        agents.close()
        customer.close()


def test_an_order_waits_for_a_routing_service_that_is_down(settings: MqttSettings) -> None:
    clock = Clock()
    customer = Subscriber(settings, topics.customer_filter(CUSTOMER))
    service = CustomerService(settings, clock=clock, tick_s=0.2, routing_retry_s=0.5)
    service.start()
    printers = announce(settings, (A, "PA12", {}))
    routing = RoutingService(settings, dispatch=False)
    try:
        order_topic = topics.order_status_topic(CUSTOMER, "o-500")
        submit(customer, {"order_id": "o-500", "parts": [
            {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20],
             "volume_cm3": 12, "quantity": 2}]})
        customer.wait_doc(order_topic, lambda d: d["status"] == "received")
        time.sleep(1.0)  # requests sent meanwhile reach nobody
        routing.start()
        wait_until(lambda: len(routing.router.fleet) == 1)
        routed = customer.wait_doc(order_topic, lambda d: d["status"] == "routed")
        assert routed["units"] == 2
        assert sum(len(b.units) for b in routing.router.builds.values()) == 2  # retries routed nothing twice
    finally:
        routing.stop()
        service.stop()
        printers.close()
        customer.close()
