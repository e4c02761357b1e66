"""The topic convention: every MQTT topic forgeline uses is built and parsed here, and only here.

Namespace (version in the root, tenant as the third level so broker ACLs can isolate tenants
with one pattern such as ``fl/v1/%u/telemetry/#``)::

    fl/v1/{tenant}/status/{site}/{area}/{device}              retained birth/last-will (JSON)
    fl/v1/{tenant}/telemetry/{site}/{area}/{device}           batched samples (binary, see telemetry.py)
    fl/v1/{tenant}/event/{site}/{area}/{device}               device events (JSON)
    fl/v1/{tenant}/cmd/{site}/{area}/{device}/{command}       command request to an agent (JSON)
    fl/v1/{tenant}/cmdres/{site}/{area}/{device}/{command}    command response from the agent (JSON)
    fl/v1/{tenant}/twin/{site}/{area}/{device}                twin state per device (retained, JSON)
    fl/v1/{tenant}/fleet                                      fleet summary per tenant (retained, JSON)
    fl/v1/{tenant}/anomaly/{site}/{area}/{device}             anomaly events (JSON)
    fl/v1/{tenant}/api/request/{method}                       twin query API request (JSON)
    fl/v1/{tenant}/api/response/{client_id}                   twin query API response (JSON)
    fl/v1/{tenant}/feedback/{model}/{revision}                user/customer feedback (JSON)
    fl/v1/{tenant}/insights/{model}                           iteration insights per model (retained, JSON)
    fl/v1/_platform/routing/request                           order routing request (JSON)
    fl/v1/_platform/routing/response/{client_id}              order routing response (JSON)
    fl/v1/_sys/deadletter/{tenant}                            rejected input with the reason (JSON)
    fl/v1/_customers/{customer}/quote/request                 instant quote request from a customer (JSON)
    fl/v1/_customers/{customer}/quotes/{client_id}            quote response (JSON)
    fl/v1/_customers/{customer}/orders                        order submitted by a customer (JSON)
    fl/v1/_customers/{customer}/orders/{order_id}             order status (retained, JSON)
    fl/v1/_customers/{customer}/orders/{order_id}/parts/{part}  part status (retained, JSON)
    fl/v1/_customers/{customer}/events                        order events: ETA past the due date, done (JSON)
    fl/v1/_sys/twin/worker/{client_id}                        twin worker membership (retained, JSON)
    fl/v1/_sys/twin/handoff/{client_id}                       input handed to the worker that owns its device

The tenant is the partner factory or plant that owns a device. Identifiers are 1-64 characters of
``[A-Za-z0-9_.-]``; a tenant may not start with ``_``, which marks the system roots. Customers (the
enterprises that order parts) are a level below ``_customers`` and follow the tenant rules, so broker
ACLs confine a customer to ``fl/v1/_customers/<customer>/...``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

ROOT = "fl"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

PLATFORM = "_platform"
SYSTEM = "_sys"
CUSTOMERS = "_customers"

_IDENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class TopicError(ValueError):
    """A topic or an identifier that does not follow the convention."""


def is_ident(value: object) -> bool:
    """Whether ``value`` is a valid topic level identifier (1-64 characters of A-Z a-z 0-9 _ . -)."""
    return isinstance(value, str) and _IDENT.match(value) is not None


def check_ident(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid topic level identifier, else raise :class:`TopicError`."""
    if not is_ident(value):
        raise TopicError(f"invalid {what} {value!r}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def check_tenant(tenant: str) -> str:
    check_ident(tenant, "tenant")
    if tenant.startswith("_"):
        raise TopicError(f"invalid tenant {tenant!r}: names starting with '_' are reserved")
    return tenant


def check_customer(customer: str) -> str:
    """A customer name: the tenant rules, and not a word that follows the tenant in a tenant's topics
    (``status``, ``twin``, ``feedback``...): otherwise a service's ``fl/v1/+/feedback/...`` filter
    would also reach ``fl/v1/_customers/feedback/...``, the level of a customer named so."""
    check_tenant(customer)
    if customer in _tenant_topic_words():
        words = ", ".join(sorted(_tenant_topic_words()))
        raise TopicError(f"invalid customer {customer!r}: it is a topic kind ({words})")
    return customer


def _tenant_topic_words() -> frozenset[str]:
    # The level after {tenant} in every tenant-scoped channel of the catalog (TOPICS, below).
    return frozenset(spec.address.split("/")[3] for spec in TOPICS if spec.address.split("/")[2] == "{tenant}")


class Kind(StrEnum):
    """The kinds of device-scoped topic (the level after the tenant)."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENT = "event"
    CMD = "cmd"
    CMDRES = "cmdres"
    TWIN = "twin"
    ANOMALY = "anomaly"


DEVICE_KINDS = {k.value for k in Kind}
COMMAND_KINDS = {Kind.CMD.value, Kind.CMDRES.value}


@dataclass(frozen=True, order=True)
class DeviceRef:
    """The full identity of one device: tenant / site / area (line or cell) / device."""

    tenant: str
    site: str
    area: str
    device: str

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        check_ident(self.site, "site")
        check_ident(self.area, "area")
        check_ident(self.device, "device")

    @property
    def key(self) -> str:
        """A stable string key, unique across tenants: ``tenant/site/area/device``."""
        return f"{self.tenant}/{self.site}/{self.area}/{self.device}"

    @classmethod
    def from_key(cls, key: str) -> DeviceRef:
        parts = key.split("/")
        if len(parts) != 4:
            raise TopicError(f"invalid device key {key!r}: expected tenant/site/area/device")
        return cls(*parts)

    def topic(self, kind: Kind | str, command: str | None = None) -> str:
        """The topic of this device for ``kind`` (``command`` is required for cmd/cmdres)."""
        kind = Kind(kind)
        base = f"{PREFIX}/{self.tenant}/{kind.value}/{self.site}/{self.area}/{self.device}"
        if kind.value in COMMAND_KINDS:
            if command is None:
                raise TopicError(f"a {kind.value} topic needs a command name")
            return f"{base}/{check_ident(command, 'command')}"
        if command is not None:
            raise TopicError(f"a {kind.value} topic takes no command name")
        return base

    # Convenience accessors, named after what they are for.
    @property
    def status_topic(self) -> str:
        return self.topic(Kind.STATUS)

    @property
    def telemetry_topic(self) -> str:
        return self.topic(Kind.TELEMETRY)

    @property
    def event_topic(self) -> str:
        return self.topic(Kind.EVENT)

    @property
    def twin_topic(self) -> str:
        return self.topic(Kind.TWIN)

    @property
    def anomaly_topic(self) -> str:
        return self.topic(Kind.ANOMALY)

    def command_topic(self, command: str) -> str:
        return self.topic(Kind.CMD, command)

    def command_response_topic(self, command: str) -> str:
        return self.topic(Kind.CMDRES, command)

    @property
    def command_filter(self) -> str:
        """A subscription filter for every command addressed to this device (the agent subscribes to it)."""
        return f"{PREFIX}/{self.tenant}/{Kind.CMD.value}/{self.site}/{self.area}/{self.device}/+"


@dataclass(frozen=True)
class ParsedTopic:
    """The result of :func:`parse`: what a topic is and whom it belongs to."""

    kind: str  # a Kind value, or fleet / api_request / api_response / feedback / insights / routing_*
    tenant: str | None
    device: DeviceRef | None = None
    command: str | None = None
    method: str | None = None
    client_id: str | None = None
    model: str | None = None
    revision: str | None = None
    customer: str | None = None  # customer topics: quote_request/response, order_submit/status, part_status
    order_id: str | None = None
    part: str | None = None


def _parse_customer(topic: str, rest: list[str]) -> ParsedTopic:
    if not rest:
        raise TopicError(f"a customer topic needs a customer level: {topic!r}")
    customer, tail = check_customer(rest[0]), rest[1:]
    if tail == ["quote", "request"]:
        return ParsedTopic("quote_request", None, customer=customer)
    if len(tail) == 2 and tail[0] == "quotes":
        return ParsedTopic("quote_response", None, customer=customer, client_id=check_ident(tail[1], "client id"))
    if tail == ["orders"]:
        return ParsedTopic("order_submit", None, customer=customer)
    if len(tail) == 2 and tail[0] == "orders":
        return ParsedTopic("order_status", None, customer=customer, order_id=check_ident(tail[1], "order id"))
    if len(tail) == 4 and tail[0] == "orders" and tail[2] == "parts":
        return ParsedTopic("part_status", None, customer=customer, order_id=check_ident(tail[1], "order id"),
                           part=check_ident(tail[3], "part"))
    if tail == ["events"]:
        return ParsedTopic("customer_event", None, customer=customer)
    raise TopicError(f"unknown customer topic {topic!r}")


def parse(topic: str) -> ParsedTopic:
    """Parse any forgeline topic; raise :class:`TopicError` for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT or parts[1] != VERSION:
        raise TopicError(f"not a {PREFIX} topic: {topic!r}")
    tenant, kind, rest = parts[2], parts[3], parts[4:]
    if tenant == PLATFORM:
        if kind == "routing" and rest == ["request"]:
            return ParsedTopic("routing_request", None)
        if kind == "routing" and len(rest) == 2 and rest[0] == "response":
            return ParsedTopic("routing_response", None, client_id=check_ident(rest[1], "client id"))
        raise TopicError(f"unknown platform topic {topic!r}")
    if tenant == CUSTOMERS:
        return _parse_customer(topic, parts[3:])
    if tenant == SYSTEM:
        if kind == "deadletter" and len(rest) == 1:
            return ParsedTopic("deadletter", rest[0])
        if kind == "twin" and len(rest) == 2 and rest[0] in ("worker", "handoff"):
            return ParsedTopic(f"twin_{rest[0]}", None, client_id=check_ident(rest[1], "client id"))
        raise TopicError(f"unknown system topic {topic!r}")
    check_tenant(tenant)
    if kind in DEVICE_KINDS:
        want = 4 if kind in COMMAND_KINDS else 3
        if len(rest) != want:
            raise TopicError(f"a {kind} topic has {want} levels after the kind: {topic!r}")
        device = DeviceRef(tenant, rest[0], rest[1], rest[2])
        command = check_ident(rest[3], "command") if kind in COMMAND_KINDS else None
        return ParsedTopic(kind, tenant, device=device, command=command)
    if kind == "fleet" and not rest:
        return ParsedTopic("fleet", tenant)
    if kind == "api" and len(rest) == 2 and rest[0] == "request":
        return ParsedTopic("api_request", tenant, method=check_ident(rest[1], "method"))
    if kind == "api" and len(rest) == 2 and rest[0] == "response":
        return ParsedTopic("api_response", tenant, client_id=check_ident(rest[1], "client id"))
    if kind == "feedback" and len(rest) == 2:
        return ParsedTopic(
            "feedback", tenant, model=check_ident(rest[0], "model"), revision=check_ident(rest[1], "revision")
        )
    if kind == "insights" and len(rest) == 1:
        return ParsedTopic("insights", tenant, model=check_ident(rest[0], "model"))
    raise TopicError(f"unknown topic {topic!r}")


# --- builders for the topics that are not device-scoped -------------------------------------------


def fleet_topic(tenant: str) -> str:
    return f"{PREFIX}/{check_tenant(tenant)}/fleet"


def api_request_topic(tenant: str, method: str) -> str:
    return f"{PREFIX}/{check_tenant(tenant)}/api/request/{check_ident(method, 'method')}"


def api_response_topic(tenant: str, client_id: str) -> str:
    return f"{PREFIX}/{check_tenant(tenant)}/api/response/{check_ident(client_id, 'client id')}"


def feedback_topic(tenant: str, model: str, revision: str) -> str:
    return f"{PREFIX}/{check_tenant(tenant)}/feedback/{check_ident(model, 'model')}/{check_ident(revision, 'revision')}"


def insights_topic(tenant: str, model: str) -> str:
    return f"{PREFIX}/{check_tenant(tenant)}/insights/{check_ident(model, 'model')}"


def routing_request_topic() -> str:
    return f"{PREFIX}/{PLATFORM}/routing/request"


def routing_response_topic(client_id: str) -> str:
    return f"{PREFIX}/{PLATFORM}/routing/response/{check_ident(client_id, 'client id')}"


def quote_request_topic(customer: str) -> str:
    return f"{PREFIX}/{CUSTOMERS}/{check_customer(customer)}/quote/request"


def quote_response_topic(customer: str, client_id: str) -> str:
    return f"{PREFIX}/{CUSTOMERS}/{check_customer(customer)}/quotes/{check_ident(client_id, 'client id')}"


def order_submit_topic(customer: str) -> str:
    return f"{PREFIX}/{CUSTOMERS}/{check_customer(customer)}/orders"


def order_status_topic(customer: str, order_id: str) -> str:
    return f"{PREFIX}/{CUSTOMERS}/{check_customer(customer)}/orders/{check_ident(order_id, 'order id')}"


def part_status_topic(customer: str, order_id: str, part: str) -> str:
    """``part`` is a topic-safe key of the part (see :func:`part_key`)."""
    return f"{order_status_topic(customer, order_id)}/parts/{check_ident(part, 'part')}"


def part_key(part_id: str) -> str:
    """A topic level for any part id: the id itself when it is a valid identifier, else a stable digest.

    >>> part_key("bracket-a"), part_key("bracket a/2")
    ('bracket-a', 'p-2de050b3485e7230')
    """
    if _IDENT.match(part_id):
        return part_id
    import hashlib

    return "p-" + hashlib.sha256(part_id.encode("utf-8")).hexdigest()[:16]


def customer_events_topic(customer: str) -> str:
    return f"{PREFIX}/{CUSTOMERS}/{check_customer(customer)}/events"


def customer_filter(customer: str = "+", what: str = "#") -> str:
    """A filter below one customer's level (or every customer's with ``+``): ``#``, ``orders``, ``orders/#``,
    ``quote/request``, ``events``."""
    if customer != "+":
        check_customer(customer)
    return f"{PREFIX}/{CUSTOMERS}/{customer}/{what}"


def deadletter_topic(tenant: str | None) -> str:
    # A dead letter whose tenant cannot be read from the topic goes to the '_unknown' bucket.
    return f"{PREFIX}/{SYSTEM}/deadletter/{tenant if tenant and _IDENT.match(tenant) else '_unknown'}"


def twin_worker_topic(client_id: str) -> str:
    """Membership of a twin worker (scale-out): retained while it lives, cleared by its last will."""
    return f"{PREFIX}/{SYSTEM}/twin/worker/{check_ident(client_id, 'client id')}"


def twin_handoff_topic(client_id: str) -> str:
    """Where other twin workers hand over input for the devices this worker owns."""
    return f"{PREFIX}/{SYSTEM}/twin/handoff/{check_ident(client_id, 'client id')}"


# --- subscription filters ---------------------------------------------------------------------------


def device_filter(kind: Kind | str, tenant: str = "+") -> str:
    """A filter for every device topic of ``kind`` (in one tenant, or in all with ``+``)."""
    kind = Kind(kind)
    tail = "+/+/+/+" if kind.value in COMMAND_KINDS else "+/+/+"
    if tenant != "+":
        check_tenant(tenant)
    return f"{PREFIX}/{tenant}/{kind.value}/{tail}"


def feedback_filter(tenant: str = "+", model: str = "+") -> str:
    """A filter for feedback of every revision of ``model`` (or every model with ``+``), in one tenant or all."""
    if tenant != "+":
        check_tenant(tenant)
    if model != "+":
        check_ident(model, "model")
    return f"{PREFIX}/{tenant}/feedback/{model}/+"


def insights_filter(tenant: str = "+") -> str:
    """A filter for the insights of every model (in one tenant, or in all with ``+``)."""
    if tenant != "+":
        check_tenant(tenant)
    return f"{PREFIX}/{tenant}/insights/+"


def twin_workers_filter() -> str:
    """Every twin worker's membership topic."""
    return f"{PREFIX}/{SYSTEM}/twin/worker/+"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription (``$share/group/filter``), served by Mosquitto 2 and EMQX."""
    return f"$share/{check_ident(group, 'share group')}/{topic_filter}"


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), for tests and twin-side checks."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_parts):
        if level == "#":
            return True
        if i >= len(t_parts):
            return False
        if level != "+" and level != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


# --- the catalog: every topic, for the AsyncAPI document and docs/topics.md -------------------------


@dataclass(frozen=True)
class TopicSpec:
    """One channel of the contract as documented in ``docs/asyncapi.yaml``."""

    name: str
    address: str  # with {parameters}
    message: str  # key in forgeline.contract.schemas.SCHEMAS
    publisher: str
    subscribers: str
    retained: bool
    qos: int
    description: str


_DEV = "{site}/{area}/{device}"

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("status", f"{PREFIX}/{{tenant}}/status/{_DEV}", "status", "edge agent", "twin, routing",
              True, 1, "Availability: birth 'online' with device metadata and capabilities; last will 'offline'."),
    TopicSpec("telemetry", f"{PREFIX}/{{tenant}}/telemetry/{_DEV}", "telemetry", "edge agent", "twin",
              False, 1, "Batched samples (binary FLT1 encoding), numbered per device by (epoch, seq)."),
    TopicSpec("event", f"{PREFIX}/{{tenant}}/event/{_DEV}", "event", "edge agent", "twin, iteration loop",
              False, 1, "Device events: job lifecycle with part lists, produced units, alarms."),
    TopicSpec("command", f"{PREFIX}/{{tenant}}/cmd/{_DEV}/{{command}}", "command_request",
              "routing, operators", "edge agent", False, 1,
              "Command request (set_config, dispatch_job, ping) with a correlation id."),
    TopicSpec("command_response", f"{PREFIX}/{{tenant}}/cmdres/{_DEV}/{{command}}", "command_response",
              "edge agent", "routing, operators", False, 1, "Command response with the request's correlation id."),
    TopicSpec("twin", f"{PREFIX}/{{tenant}}/twin/{_DEV}", "twin_state", "twin", "platform services, routing",
              True, 1, "Twin state of one device: reported values, capabilities, KPIs."),
    TopicSpec("fleet", f"{PREFIX}/{{tenant}}/fleet", "fleet_summary", "twin", "platform services",
              True, 1, "Fleet summary of one tenant."),
    TopicSpec("anomaly", f"{PREFIX}/{{tenant}}/anomaly/{_DEV}", "anomaly_event", "twin",
              "platform services, iteration loop", False, 1, "Anomaly events with hysteresis: start and end."),
    TopicSpec("api_request", f"{PREFIX}/{{tenant}}/api/request/{{method}}", "api_request", "platform services",
              "twin", False, 1, "Twin query API request: get_twin, list_devices (answers within the tenant only)."),
    TopicSpec("api_response", f"{PREFIX}/{{tenant}}/api/response/{{client_id}}", "api_response", "twin",
              "platform services", False, 1, "Twin query API response, correlated by correlation_id."),
    TopicSpec("feedback", f"{PREFIX}/{{tenant}}/feedback/{{model}}/{{revision}}", "feedback",
              "customer service, field apps", "iteration loop", False, 1, "User and customer feedback."),
    TopicSpec("insights", f"{PREFIX}/{{tenant}}/insights/{{model}}", "insights", "iteration loop",
              "engineering, dashboards", True, 1, "Revision comparison insights per product model."),
    TopicSpec("routing_request", f"{PREFIX}/{PLATFORM}/routing/request", "routing_request", "platform",
              "routing service", False, 1, "Order routing request."),
    TopicSpec("routing_response", f"{PREFIX}/{PLATFORM}/routing/response/{{client_id}}", "routing_response",
              "routing service", "platform", False, 1, "Order routing response with per-part decisions."),
    TopicSpec("deadletter", f"{PREFIX}/{SYSTEM}/deadletter/{{tenant}}", "deadletter", "twin", "operators",
              False, 1, "Rejected input with the reason; counted in the twin's metrics."),
    TopicSpec("twin_worker", f"{PREFIX}/{SYSTEM}/twin/worker/{{client_id}}", "twin_worker", "twin", "twin",
              True, 1, "Twin worker membership (scale-out): retained while the worker lives, cleared by its "
              "last will; the live set decides which worker owns which device (rendezvous hashing)."),
    TopicSpec("twin_handoff", f"{PREFIX}/{SYSTEM}/twin/handoff/{{client_id}}", "telemetry", "twin", "twin",
              False, 1, "Telemetry or a device event that a shared subscription delivered to a worker that "
              "does not own the device, handed to the owner; the original topic is the MQTT 5 user "
              "property fl-topic."),
    TopicSpec("quote_request", f"{PREFIX}/{CUSTOMERS}/{{customer}}/quote/request", "quote_request", "customer",
              "quote service", False, 1, "Instant quote request: parts with or without technology and material."),
    TopicSpec("quote_response", f"{PREFIX}/{CUSTOMERS}/{{customer}}/quotes/{{client_id}}", "quote_response",
              "quote service", "customer", False, 1, "Price and lead-time options per technology and material."),
    TopicSpec("order_submit", f"{PREFIX}/{CUSTOMERS}/{{customer}}/orders", "order_submit", "customer",
              "order tracking", False, 1, "An order to produce (after payment); routed to partner factories."),
    TopicSpec("order_status", f"{PREFIX}/{CUSTOMERS}/{{customer}}/orders/{{order_id}}", "order_status",
              "order tracking", "customer", True, 1, "Status and ETA of one order, with a summary per part."),
    TopicSpec("part_status", f"{PREFIX}/{CUSTOMERS}/{{customer}}/orders/{{order_id}}/parts/{{part}}", "part_status",
              "order tracking", "customer", True, 1, "Status, build progress and ETA of one part line."),
    TopicSpec("customer_event", f"{PREFIX}/{CUSTOMERS}/{{customer}}/events", "customer_event", "order tracking",
              "customer", False, 1, "Order events: ETA past the due date (with re-routing options), order done."),
)
