"""The customer service on MQTT: instant quotes and order tracking on the customer topic level.

Topics (built in :mod:`forgeline.contract.topics`)::

    in   fl/v1/_customers/{customer}/quote/request              quote_request
    out  fl/v1/_customers/{customer}/quotes/{client_id}         quote_response
    in   fl/v1/_customers/{customer}/orders                     order_submit
    out  fl/v1/_customers/{customer}/orders/{order_id}          order_status (retained)
    out  fl/v1/_customers/{customer}/orders/{order_id}/parts/{part}   part_status (retained)
    out  fl/v1/_customers/{customer}/events                     customer_event (ETA past due, done)
    out  fl/v1/_platform/routing/request                        orders to the routing service
    in   fl/v1/_platform/routing/response/_tracking , .../_events   routing results, re-routing, build states
    in   fl/v1/+/status/#, fl/v1/+/twin/#, fl/v1/+/event/#      capabilities, load, layer progress, jobs

Access: the broker's ACL confines a customer to its own level (``_customer@NAME`` may write only its
quote requests and orders and read only its own answers and status). The service checks again: the
customer is taken from the topic, never from the payload (an order naming another customer is
refused), answers go only below that customer's level, and status documents list only that
customer's units. Orders travel to routing and to the factories under an opaque id, so a factory
never learns which customer a part belongs to.
"""

from __future__ import annotations

import hashlib
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
from forgeline.contract.topics import Kind, TopicError
from forgeline.mqtt import MqttSettings, connect, subscribe_all
from forgeline.quotes.pricing import PricingConfig, QuoteError, quote_document
from forgeline.quotes.tracking import Notice, OrderTracker
from forgeline.routing.model import Fleet, FleetBuilder, OrderError, parse_order
from forgeline.routing.router import RoutingConfig
from forgeline.routing.service import EVENTS_CLIENT

log = logging.getLogger(__name__)

TRACKING_CLIENT = "_tracking"


def routing_order_id(customer: str, order_id: str) -> str:
    """The opaque id an order travels under to routing and the factories (no customer name in it)."""
    return "o-" + hashlib.sha256(f"{customer}/{order_id}".encode()).hexdigest()[:24]


@dataclass
class CustomerCounters:
    quotes: int = 0
    orders: int = 0
    refused: int = 0
    status_published: int = 0
    events_published: int = 0


@dataclass
class _PendingOptions:
    notice: Notice
    deadline: float


@dataclass
class CustomerService:
    settings: MqttSettings
    fleet: Fleet | None = None  # fixed fleet for quotes; None: live from status and twin topics
    pricing: PricingConfig = field(default_factory=PricingConfig)
    routing_config: RoutingConfig = field(default_factory=RoutingConfig)
    client_id: str | None = None
    clock: Callable[[], float] = time.time
    tick_s: float = 5.0
    options_timeout_s: float = 5.0
    counters: CustomerCounters = field(default_factory=CustomerCounters)
    # Where accepted orders and their tracking state survive a restart (written atomically after every
    # change); None: in memory only.
    state_path: str | None = None
    routing_retry_s: float = 10.0  # an order routing has not answered is sent again this often

    def __post_init__(self) -> None:
        self.tracker = OrderTracker()
        self.builder = FleetBuilder()
        self.live_fleet = self.fleet is None
        self._fleet = self.fleet if self.fleet is not None else Fleet()
        self._orders: dict[str, tuple[str, str, dict[str, Any]]] = {}  # routed id -> (customer, order id, doc)
        self._pending_options: dict[str, _PendingOptions] = {}
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._client: paho.Client | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._awaiting_routing: dict[str, float] = {}  # routed order id -> when to send again
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as fh:
                state = json.load(fh)
            self.tracker.restore(state["tracker"])
            self._orders = {k: (v[0], v[1], v[2]) for k, v in state["orders"].items()}
            for routed_id, (customer, order_id, _) in self._orders.items():
                track = self.tracker.orders.get((customer, order_id))
                if track is not None and all(u.status == "received" for u in track.units.values()):
                    self._awaiting_routing[routed_id] = 0.0  # accepted, never answered by routing

    def _save(self) -> None:
        if not self.state_path:
            return
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"tracker": self.tracker.snapshot(), "orders": {k: list(v) for k, v in self._orders.items()}},
                      fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        client = connect(self.settings, self.client_id or f"_quotes-{uuid.uuid4().hex[:8]}")
        client.on_message = lambda _c, _u, msg: self._inbox.put((msg.topic, bytes(msg.payload)))
        filters = [
            topics.customer_filter("+", "quote/request"), topics.customer_filter("+", "orders"),
            topics.routing_response_topic(TRACKING_CLIENT), topics.routing_response_topic(EVENTS_CLIENT),
            topics.device_filter(Kind.EVENT), topics.device_filter(Kind.TWIN), topics.device_filter(Kind.STATUS),
        ]
        subscribe_all(client, filters, what="customer service")
        self._client = client
        self._worker = threading.Thread(target=self._run, name="customer-service", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(10)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> CustomerService:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.2)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._handle(*item)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick_s
                    self._publish_changes(self.tracker.tick(self.clock()))
                self._expire_options()
                self._retry_routing()
            except Exception:
                log.exception("customer service: failed on %s", item[0] if item else "tick")

    def tick_now(self) -> None:
        """Run a tick at the next loop turn (tests advance ``clock`` and call this)."""
        self._inbox.put(("_tick", b""))

    # --- dispatching ---------------------------------------------------------------------------------

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == "_tick":
            self._publish_changes(self.tracker.tick(self.clock()))
            return
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return
        if parsed.kind == "quote_request" and parsed.customer:
            self._on_quote(parsed.customer, payload)
        elif parsed.kind == "order_submit" and parsed.customer:
            self._on_order(parsed.customer, payload)
        elif parsed.kind == "routing_response":
            self._on_routing(payload)
        elif parsed.kind in (Kind.STATUS.value, Kind.TWIN.value) and parsed.device is not None:
            self._on_fleet(topic, parsed.kind, parsed.device.key, payload)
        elif parsed.kind == Kind.EVENT.value and parsed.device is not None:
            try:
                event = schemas.loads("event", payload)
            except PayloadError:
                return
            self._publish_changes(self.tracker.apply_event(parsed.device.key, event))

    def _publish(self, topic: str, schema: str, document: dict[str, Any], *, retain: bool = False) -> None:
        schemas.validate(schema, document)
        assert self._client is not None
        self._client.publish(topic, schemas.dumps(document), qos=1, retain=retain)

    # --- quotes ----------------------------------------------------------------------------------------

    def _on_quote(self, customer: str, payload: bytes) -> None:
        self.counters.quotes += 1
        try:
            request = schemas.loads("quote_request", payload)
        except PayloadError as exc:
            self.counters.refused += 1
            ids = _peek(payload)
            if ids is not None:
                self._publish(topics.quote_response_topic(customer, ids[1]), "quote_response",
                              {"correlation_id": ids[0], "ok": False, "error": str(exc)})
            return
        try:
            document = quote_document(request["parts"], self._fleet, self.clock(), pricing=self.pricing,
                                      routing=self.routing_config, correlation_id=request["correlation_id"])
        except QuoteError as exc:
            document = {"correlation_id": request["correlation_id"], "ok": False, "error": str(exc)}
        self._publish(topics.quote_response_topic(customer, request["client_id"]), "quote_response", document)

    # --- orders --------------------------------------------------------------------------------------

    def _on_order(self, customer: str, payload: bytes) -> None:
        self.counters.orders += 1
        now = self.clock()
        try:
            doc = schemas.loads("order_submit", payload)
        except PayloadError as exc:
            self.counters.refused += 1
            order_id = _peek_order_id(payload)
            if order_id is not None:
                self._publish_status_error(customer, order_id, str(exc), now)
            return
        order_id = doc["order_id"]
        if doc.get("customer", customer) != customer:
            # The payload claims another customer: refuse, and answer only on the sender's own level.
            self.counters.refused += 1
            self._publish_status_error(customer, order_id, "the order names another customer than its topic", now)
            return
        routed_id = routing_order_id(customer, order_id)
        if routed_id in self._orders:
            self._publish_changes({(customer, order_id)})  # a repeated submission: the status again
            return
        order_doc = {**doc, "customer": customer, "order_id": routed_id}
        try:
            parse_order(order_doc)
        except OrderError as exc:
            self.counters.refused += 1
            self._publish_status_error(customer, order_id, str(exc), now)
            return
        self._orders[routed_id] = (customer, order_id, order_doc)
        track = self.tracker.order_received(customer, order_id, doc["parts"], doc.get("due_ts"), now)
        self.tracker.by_order_id[routed_id] = (customer, order_id)
        del self.tracker.by_order_id[order_id]
        self._save()  # accepted: it survives a restart from here on
        self._publish_changes({(track.customer, track.order_id)})
        self._awaiting_routing[routed_id] = time.monotonic() + self.routing_retry_s
        self._send_routing(routed_id, order_doc, dry_run=False)

    def _retry_routing(self) -> None:
        now = time.monotonic()
        for routed_id, due in list(self._awaiting_routing.items()):
            if due <= now:
                self._awaiting_routing[routed_id] = now + self.routing_retry_s
                self._send_routing(routed_id, self._orders[routed_id][2], dry_run=False)

    def _send_routing(self, correlation_id: str, order_doc: dict[str, Any], *, dry_run: bool) -> None:
        request = {"correlation_id": correlation_id, "client_id": TRACKING_CLIENT, "order": order_doc,
                   "dry_run": dry_run}
        assert self._client is not None
        self._client.publish(topics.routing_request_topic(), schemas.dumps(request), qos=1)

    def _publish_status_error(self, customer: str, order_id: str, error: str, now: float) -> None:
        try:
            topic = topics.order_status_topic(customer, order_id)
        except TopicError:
            return
        self._publish(topic, "order_status", {"order_id": order_id, "customer": customer, "ts": now,
                                              "status": "error", "error": error}, retain=True)

    # --- routing results and options ---------------------------------------------------------------------

    def _on_routing(self, payload: bytes) -> None:
        try:
            document = schemas.loads("routing_response", payload)
        except PayloadError:
            return
        self._awaiting_routing.pop(str(document.get("correlation_id")), None)
        pending = self._pending_options.pop(str(document.get("correlation_id")), None)
        if pending is not None:
            self._options_answered(pending, document)
            return
        if not document.get("ok"):
            routed = self._orders.get(str(document.get("correlation_id")))
            if routed is not None:
                self.tracker.order_failed(routed[0], routed[1], str(document.get("error")), self.clock())
                self._publish_changes({(routed[0], routed[1])})
            return
        self._publish_changes(self.tracker.apply_routing(document))

    def _ask_options(self, notice: Notice) -> None:
        """Ask routing (dry run) where the delayed units could go now; the event waits for the answer."""
        routed_id = routing_order_id(notice.customer, notice.order_id)
        _, _, order_doc = self._orders[routed_id]
        counts: dict[str, int] = {}
        track = self.tracker.orders[(notice.customer, notice.order_id)]
        for unit_id in notice.delayed_units:
            counts[track.units[unit_id].part_id] = counts.get(track.units[unit_id].part_id, 0) + 1
        parts = [{**p, "quantity": counts[p["part_id"]]} for p in order_doc["parts"] if p["part_id"] in counts]
        correlation_id = f"options-{uuid.uuid4().hex[:12]}"
        alternative = {**order_doc, "order_id": f"{routed_id}-alt", "parts": parts,
                       "priority": int(order_doc.get("priority", 0)) + 10}
        self._pending_options[correlation_id] = _PendingOptions(notice, time.monotonic() + self.options_timeout_s)
        self._send_routing(correlation_id, alternative, dry_run=True)

    def _options_answered(self, pending: _PendingOptions, document: dict[str, Any]) -> None:
        event = pending.notice.event
        assignments = document.get("assignments") or []
        if document.get("ok") and assignments:
            etas = [a.get("expected_ready_ts") for a in assignments]
            eta = max(e for e in etas if e is not None) if all(e is not None for e in etas) else None
            due = event.get("due_ts")
            event["options"].append({
                "option": "reroute", "eta_ts": eta, "on_time": None if eta is None or due is None else eta <= due,
                "factories": len({a["factory"] for a in assignments if a.get("factory")}),
                "description": "move the delayed units to the printers routing would choose now",
            })
        self._publish_event(pending.notice)

    def _expire_options(self) -> None:
        now = time.monotonic()
        for correlation_id, pending in list(self._pending_options.items()):
            if pending.deadline <= now:
                del self._pending_options[correlation_id]
                self._publish_event(pending.notice)

    def _publish_event(self, notice: Notice) -> None:
        self.counters.events_published += 1
        self._publish(topics.customer_events_topic(notice.customer), "customer_event", notice.event)

    # --- fleet -----------------------------------------------------------------------------------------

    def _on_fleet(self, topic: str, kind: str, device_key: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            document = schemas.loads("status" if kind == Kind.STATUS.value else "twin_state", payload)
        except PayloadError:
            return
        if self.live_fleet:
            self.builder.apply(topic, document)
            self._fleet = self.builder.fleet()
        if kind == Kind.TWIN.value:
            self._publish_changes(self.tracker.apply_twin(device_key, document))

    # --- publishing --------------------------------------------------------------------------------------

    def _publish_changes(self, keys: set[tuple[str, str]]) -> None:
        now = self.clock()
        if keys:
            self._save()
        for key in sorted(keys):
            order_doc, part_docs = self.tracker.documents(key, now)
            customer, order_id = key
            self._publish(topics.order_status_topic(customer, order_id), "order_status", order_doc, retain=True)
            for part, doc in part_docs.items():
                self._publish(topics.part_status_topic(customer, order_id, part), "part_status", doc, retain=True)
            self.counters.status_published += 1
            for notice in self.tracker.notices(key, now):
                if notice.event["type"] == "eta_past_due" and notice.delayed_units:
                    self._ask_options(notice)
                else:
                    self._publish_event(notice)


def _peek(payload: bytes) -> tuple[str, str] | None:
    """(correlation_id, client_id) of an invalid quote request if both can be read, to answer it."""
    try:
        doc = json.loads(payload)
        correlation_id, client_id = str(doc["correlation_id"])[:128], doc["client_id"]
        topics.check_ident(client_id, "client id")
    except (ValueError, KeyError, TypeError, TopicError, RecursionError):
        return None
    return correlation_id, client_id


def _peek_order_id(payload: bytes) -> str | None:
    """The order id of an invalid order if it can be read, to answer on its status topic."""
    try:
        order_id = json.loads(payload)["order_id"]
        return topics.check_ident(order_id, "order id")
    except (ValueError, KeyError, TypeError, TopicError, RecursionError):
        return None
