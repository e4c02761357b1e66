"""The routing service on MQTT: request/response on the contract's routing topics, a live fleet view
from retained status and twin topics, and dispatch of released builds to the agents.

Topics (all built in :mod:`forgeline.contract.topics`)::

    in   fl/v1/_platform/routing/request                    routing_request {correlation_id, client_id, order}
    out  fl/v1/_platform/routing/response/{client_id}       routing_response with per-part decisions
    out  fl/v1/_platform/routing/response/_events            re-routing after a failure, build state changes
    in   fl/v1/+/status/+/+/+ , fl/v1/+/twin/+/+/+           births (capabilities) and twin state
    in   fl/v1/+/event/+/+/+                                job_started / job_finished / job_aborted
    out  fl/v1/{tenant}/cmd/{site}/{area}/{device}/dispatch_job      a released build as a job
    in   fl/v1/{tenant}/cmdres/{site}/{area}/{device}/dispatch_job   the agent's acknowledgement

All messages are handled on one worker thread, which owns the :class:`Router`; paho's network
thread only queues them. A dispatch that is not acknowledged within ``dispatch_timeout_s`` is sent
again (same correlation id, so an agent that did get it answers again) up to ``dispatch_attempts``
times; a refused or unanswered job, and every build on a printer that goes offline, into error or
above its anomaly threshold, is re-routed.

With ``influx`` set, the worker writes the ``routing`` measurement (queue, open builds and their fill,
released builds, on-time rate per tenant and technology, see :mod:`forgeline.routing.metrics`) every
``influx_interval_s`` through the shared time-series writer, which spills to ``influx.spill_dir`` while
the database is unreachable. Off by default.

Example::

    service = RoutingService(MqttSettings.from_url("mqtt://127.0.0.1:1883"))
    service.start()
    ...
    service.stop()
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from forgeline.contract import schemas, topics
from forgeline.contract.schemas import PayloadError
from forgeline.contract.topics import DeviceRef, Kind, TopicError
from forgeline.mqtt import MqttSettings, connect, subscribe_all
from forgeline.routing.metrics import OnTimeTally, routing_lines
from forgeline.routing.model import Fleet, FleetBuilder, OrderError, parse_order
from forgeline.routing.router import PlannedBuild, Router, RoutingConfig, RoutingResult, restore, snapshot
from forgeline.timeseries import InfluxSettings, TimeSeriesWriter

log = logging.getLogger(__name__)

EVENTS_CLIENT = "_events"  # client id level of unsolicited routing responses (re-routing)
DISPATCH_COMMAND = "dispatch_job"


@dataclass
class PendingDispatch:
    build: PlannedBuild
    correlation_id: str
    payload: bytes
    topic: str
    attempts: int
    deadline: float


@dataclass
class ServiceCounters:
    requests: int = 0
    rejected_requests: int = 0
    routed_units: int = 0
    dispatched: int = 0
    acknowledged: int = 0
    dispatch_failures: int = 0
    reroutes: int = 0
    fleet_updates: int = 0
    bad_fleet_messages: int = 0

    def document(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Message:
    topic: str
    payload: bytes


@dataclass
class RoutingService:
    settings: MqttSettings
    config: RoutingConfig = field(default_factory=RoutingConfig)
    fleet: Fleet | None = None  # a fixed fleet (file); None: live from status and twin topics
    share_group: str | None = None  # run several instances behind one MQTT 5 shared subscription
    dispatch: bool = True
    dispatch_timeout_s: float = 10.0
    dispatch_attempts: int = 3
    tick_s: float = 30.0
    suspend_after_refusal_s: float = 900.0  # a printer whose agent refused a job gets none for this long
    client_id: str | None = None
    on_result: Callable[[RoutingResult], None] | None = None  # every routing and re-routing result
    on_build: Callable[[PlannedBuild], None] | None = None  # every build state change (released, acked, ...)
    counters: ServiceCounters = field(default_factory=ServiceCounters)
    # Where the router's state (open and queued builds, their parts) is kept across restarts; written
    # atomically after every change. None: in memory only (accepted parts die with the process).
    state_path: str | None = None
    influx: InfluxSettings | None = None  # write the routing measurement (off when None)
    influx_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.influx_interval_s > 0:
            raise ValueError(f"influx_interval_s must be > 0, got {self.influx_interval_s!r}")
        self.writer = TimeSeriesWriter(self.influx, name="routing") if self.influx is not None else None
        self.on_time = OnTimeTally()
        self.builder = FleetBuilder()
        self.router = Router(self.fleet if self.fleet is not None else Fleet(), self.config,
                             on_release=self._released)
        self.live_fleet = self.fleet is None
        self._inbox: queue.Queue[_Message | None] = queue.Queue()
        self._pending: dict[str, PendingDispatch] = {}
        self._to_dispatch: list[PlannedBuild] = []
        self._client: paho.Client | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._dirty = False
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as fh:
                restore(self.router, json.load(fh))
            # released but never acknowledged: send again (at least once; the job id is the build id)
            self._to_dispatch = [b for b in self.router.builds.values() if b.status == "released"]

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        client = connect(self.settings, self.client_id or f"_routing-{uuid.uuid4().hex[:8]}")
        client.on_message = lambda _c, _u, msg: self._inbox.put(_Message(msg.topic, bytes(msg.payload)))
        request_filter = topics.routing_request_topic()
        if self.share_group:
            request_filter = topics.shared(self.share_group, request_filter)
        filters = [request_filter, topics.device_filter(Kind.CMDRES), topics.device_filter(Kind.EVENT)]
        if self.live_fleet:
            filters += [topics.device_filter(Kind.STATUS), topics.device_filter(Kind.TWIN)]
        subscribe_all(client, filters, what="routing service")
        self._client = client
        if self.writer is not None:
            self.writer.start()
        self._worker = threading.Thread(target=self._run, name="routing-service", daemon=True)
        self._worker.start()
        self.ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(10)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        if self.writer is not None:
            self.writer.add(routing_lines(self.router, self.on_time, time.time()))  # the state at shutdown
            self.writer.stop()  # writes what is queued, or spills it

    def __enter__(self) -> RoutingService:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- worker ------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        next_point = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, min(next_tick - time.monotonic(), 0.2))
            try:
                message = self._inbox.get(timeout=timeout)
            except queue.Empty:
                message = None
            try:
                if message is not None:
                    self._handle(message)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick_s
                    if self.router.tick(time.time()):
                        self._dirty = True
                self._flush_dispatch()
                self._check_timeouts()
                if self._dirty:
                    self._save()
                if self.writer is not None and time.monotonic() >= next_point:
                    next_point = time.monotonic() + self.influx_interval_s
                    self.writer.add(routing_lines(self.router, self.on_time, time.time()))
            except Exception:  # a bug must not stop the service; it is logged with the message
                log.exception("routing service: failed on %s", message.topic if message else "tick")

    def _save(self) -> None:
        self._dirty = False
        if not self.state_path:
            return
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(snapshot(self.router), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    def _handle(self, message: _Message) -> None:
        try:
            parsed = topics.parse(message.topic)
        except TopicError:
            return
        if parsed.kind == "routing_request":
            self._on_request(message.payload)
        elif parsed.kind in (Kind.STATUS.value, Kind.TWIN.value):
            self._on_fleet_message(message.topic, parsed.kind, message.payload)
        elif parsed.kind == Kind.CMDRES.value and parsed.command == DISPATCH_COMMAND:
            self._on_ack(message.payload)
        elif parsed.kind == Kind.EVENT.value and parsed.device is not None:
            self._on_event(parsed.device, message.payload)

    # --- requests ----------------------------------------------------------------------------------

    def _respond(self, client_id: str, document: dict[str, Any]) -> None:
        schemas.validate("routing_response", document)
        assert self._client is not None
        self._client.publish(topics.routing_response_topic(client_id), schemas.dumps(document), qos=1)

    def _on_request(self, payload: bytes) -> None:
        self.counters.requests += 1
        try:
            request = schemas.loads("routing_request", payload)
        except PayloadError as exc:
            self.counters.rejected_requests += 1
            ids = _peek_ids(payload)
            if ids is None:
                log.warning("routing request dropped: %s", exc)
                return
            self._respond(ids[1], {"correlation_id": ids[0], "ok": False, "error": str(exc)})
            return
        correlation_id, client_id = request["correlation_id"], request["client_id"]
        try:
            order = parse_order(request["order"])
        except OrderError as exc:
            self.counters.rejected_requests += 1
            self._respond(client_id, {"correlation_id": correlation_id, "ok": False, "error": f"order: {exc}"})
            return
        result = self.router.route(order, time.time(), dry_run=bool(request.get("dry_run", False)))
        self.counters.routed_units += len(result.assignments)
        if not request.get("dry_run"):
            self._dirty = True
            self._save()  # before answering: an acknowledged routing survives a crash
        document = {"correlation_id": correlation_id, "ok": True, **result.document(self.config)}
        self._respond(client_id, document)
        if self.on_result is not None and not request.get("dry_run"):
            self.on_result(result)

    # --- fleet -------------------------------------------------------------------------------------

    def _on_fleet_message(self, topic: str, kind: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            document = schemas.loads("status" if kind == Kind.STATUS.value else "twin_state", payload)
        except PayloadError as exc:
            self.counters.bad_fleet_messages += 1
            log.info("routing: ignoring %s: %s", topic, exc)
            return
        self.builder.apply(topic, document)
        fresh = self.builder.fleet()
        self.counters.fleet_updates += 1
        for key, printer in fresh.printers.items():
            before = self.router.fleet.get(key)
            self.router.fleet.add(printer)
            reason = printer.unavailable_reason()
            if reason is not None and (before is None or before.unavailable_reason() is None):
                self._printer_lost(key, reason)

    def _printer_lost(self, key: str, reason: str) -> None:
        if not any(b.printer_key == key and b.status in ("open", "released", "dispatched", "printing")
                   for b in self.router.builds.values()):
            return
        for pending in [p for p in self._pending.values() if p.build.printer_key == key]:
            self._pending.pop(pending.correlation_id, None)
        result = self.router.fail_printer(key, time.time(), reason)
        self._dirty = True
        self.counters.reroutes += 1
        self._publish_event(result, f"reroute-{uuid.uuid4().hex[:12]}")

    def _publish_event(self, result: RoutingResult, correlation_id: str) -> None:
        self._respond(EVENTS_CLIENT, {"correlation_id": correlation_id, "ok": True, **result.document()})
        if self.on_result is not None:
            self.on_result(result)

    def _on_event(self, device: DeviceRef, payload: bytes) -> None:
        try:
            event = schemas.loads("event", payload)
        except PayloadError:
            return
        job_id = event.get("job_id")
        if not isinstance(job_id, str) or job_id not in self.router.builds:
            return
        planned = self.router.builds[job_id]
        if planned.printer_key != device.key:
            return  # another device claiming our job id: ignore
        if event["type"] == "job_started":
            self.router.mark_started(job_id, float(event["ts"]))
        elif event["type"] == "job_finished":
            self.router.mark_done(job_id)
            self.on_time.finished(planned, float(event["ts"]))
        elif event["type"] == "job_aborted":
            result = self.router.reroute_build(job_id, time.time(), f"job aborted on {device.key}")
            self.counters.reroutes += 1
            self._publish_event(result, f"reroute-{uuid.uuid4().hex[:12]}")
        self._build_changed(planned)

    def _build_changed(self, planned: PlannedBuild) -> None:
        """Announce a build's new state (released, dispatched, printing, done) on the events topic, so
        order tracking follows builds between routing responses."""
        self._dirty = True
        if self._client is not None:
            self._respond(EVENTS_CLIENT, {"correlation_id": f"build-{planned.build_id}-{planned.status}", "ok": True,
                                          "assignments": [], "rejected": [], "builds": [planned.document()]})
        if self.on_build is not None:
            self.on_build(planned)

    # --- dispatch ----------------------------------------------------------------------------------

    def _released(self, planned: PlannedBuild) -> None:
        # Called inside the router; sending waits until the router call returns.
        if self.dispatch:
            self._to_dispatch.append(planned)
        self._build_changed(planned)

    def _flush_dispatch(self) -> None:
        while self._to_dispatch:
            planned = self._to_dispatch.pop(0)
            if planned.status != "released":
                continue
            ref = DeviceRef.from_key(planned.printer_key)
            correlation_id = f"{planned.build_id}-{uuid.uuid4().hex[:8]}"
            material = self.config.materials.get(planned.material)
            request = {"correlation_id": correlation_id, "ts": time.time(),
                       "args": planned.job_document(material.density_g_cm3 if material else None)}
            schemas.validate("command_request", request)
            pending = PendingDispatch(planned, correlation_id, schemas.dumps(request),
                                      ref.command_topic(DISPATCH_COMMAND), 0, 0.0)
            self._pending[correlation_id] = pending
            self._send(pending)

    def _send(self, pending: PendingDispatch) -> None:
        assert self._client is not None
        pending.attempts += 1
        pending.deadline = time.monotonic() + self.dispatch_timeout_s
        self._client.publish(pending.topic, pending.payload, qos=1)
        self.counters.dispatched += 1

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            if pending.attempts < self.dispatch_attempts:
                self._send(pending)
                continue
            self._pending.pop(pending.correlation_id, None)
            self._dispatch_failed(pending.build, f"no acknowledgement after {pending.attempts} attempts")

    def _on_ack(self, payload: bytes) -> None:
        try:
            response = schemas.loads("command_response", payload)
        except PayloadError:
            return
        pending = self._pending.pop(response["correlation_id"], None)
        if pending is None:
            return  # a repeated answer, or another requester's command
        planned = pending.build
        if response["ok"]:
            self.counters.acknowledged += 1
            if planned.status == "released":
                planned.status = "dispatched"
            planned.dispatch_result = response.get("result") or {}
            self._build_changed(planned)
        else:
            why = f"agent refused the job: {response.get('error', 'no reason')}"
            # The same agent would refuse the same kind of job again (material not loaded, full queue).
            self.router.suspend(planned.printer_key, time.time() + self.suspend_after_refusal_s, why)
            self._dispatch_failed(planned, why)

    def _dispatch_failed(self, planned: PlannedBuild, reason: str) -> None:
        self.counters.dispatch_failures += 1
        log.warning("routing: dispatch of %s to %s failed: %s", planned.build_id, planned.printer_key, reason)
        result = self.router.reroute_build(planned.build_id, time.time(), reason)
        self._dirty = True
        self.counters.reroutes += 1
        self._publish_event(result, f"reroute-{uuid.uuid4().hex[:12]}")


def _peek_ids(payload: bytes) -> tuple[str, str] | None:
    """(correlation_id, client_id) of an invalid request if both can be read, to answer it."""
    try:
        doc = json.loads(payload)
        correlation_id, client_id = doc["correlation_id"], doc["client_id"]
        topics.check_ident(client_id, "client id")
    except (ValueError, KeyError, TypeError, TopicError, RecursionError):
        return None
    if not isinstance(correlation_id, str) or not 1 <= len(correlation_id) <= 128:
        return None
    return correlation_id, client_id
