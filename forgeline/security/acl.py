"""The broker ACL, generated from the topic contract so it cannot drift from ``topics.TOPICS``.

Who may do what is stated once, in :data:`RIGHTS`, by channel name; the topic filters come from
each channel's address in :data:`forgeline.contract.topics.TOPICS`. A test checks that every channel
of the contract is granted to some role and that ``broker/acl`` equals :func:`render_acl`'s output.

Principals and their usernames
------------------------------
The role of a broker user follows from its username, so adding a factory needs only a password
entry (no ACL edit) and a username can never claim a role it was not given:

==========================  ==========  =====================================================
username                    role        scope
==========================  ==========  =====================================================
``acme``                    factory     tenant ``acme`` (``pattern ... fl/v1/%u/...`` lines)
``acme@gw2``                factory     tenant ``acme``: a second gateway (explicit ``user`` block)
``_twin``, ``_twin@i2``     twin        all tenants: reads input, writes twin topics
``_loop``                   loop        all tenants: reads units/anomalies/feedback, writes insights
``_routing``, ``_quotes``,  platform    all tenants: reads twin topics, writes routing/commands
``_platform@x``
``_customer@bigco``         customer    customer ``bigco`` only (customer topic level)
``_ops``, ``_ops@x``        operator    reads everything (incl. ``$SYS``), writes commands
==========================  ==========  =====================================================

Tenants never start with ``_`` and never contain ``@`` (see ``topics.check_tenant``), so the
``%u`` patterns granted to every user give service and customer accounts nothing real: for
``_twin`` they expand to ``fl/v1/_twin/...``, a topic no one reads.

Example::

    >>> principal_for("acme@gw2")
    Principal(username='acme@gw2', role=<Role.FACTORY: 'factory'>, scope='acme')
    >>> "pattern write fl/v1/%u/telemetry/#" in render_acl()
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from forgeline.contract import topics
from forgeline.contract.topics import TopicError, TopicSpec


class AclError(ValueError):
    """A username that maps to no role, or a contract the ACL cannot express."""


class Role(StrEnum):
    FACTORY = "factory"
    TWIN = "twin"
    LOOP = "loop"
    PLATFORM = "platform"
    CUSTOMER = "customer"
    OPERATOR = "operator"


# Service account names (before an optional "@instance") and their roles.
SERVICE_ACCOUNTS: dict[str, Role] = {
    "_twin": Role.TWIN,
    "_routing": Role.PLATFORM,
    "_quotes": Role.PLATFORM,
    "_loop": Role.LOOP,
    "_platform": Role.PLATFORM,
    "_customer": Role.CUSTOMER,
    "_ops": Role.OPERATOR,
}

# Channel rights per role: (read, write) channel names of topics.TOPICS. "readwrite" is both.
# Factory and customer rights are scoped to their own tenant / customer; the others span all.
RIGHTS: dict[Role, tuple[frozenset[str], frozenset[str]]] = {
    Role.FACTORY: (
        frozenset({"command", "twin", "fleet", "anomaly", "api_response", "insights", "deadletter"}),
        frozenset({"status", "telemetry", "event", "command_response", "api_request", "feedback"}),
    ),
    Role.TWIN: (
        # twin/fleet/insights are read back too: the twin restores from its retained state. Only twin
        # workers may write the scale-out topics: a handoff names the original topic in a property,
        # which a worker may trust only because no one else can publish there.
        frozenset({"status", "telemetry", "event", "feedback", "api_request", "twin", "fleet", "insights",
                   "twin_worker", "twin_handoff"}),
        frozenset({"twin", "fleet", "anomaly", "api_response", "insights", "deadletter", "twin_worker",
                   "twin_handoff"}),
    ),
    Role.LOOP: (
        # the iteration loop (forgeline.loop.service): units, anomalies and feedback in, insights out
        frozenset({"status", "event", "anomaly", "feedback", "insights"}),
        frozenset({"insights", "deadletter"}),
    ),
    Role.PLATFORM: (
        frozenset({
            "status", "event", "twin", "fleet", "anomaly", "insights", "command_response", "api_response",
            "routing_request", "routing_response", "feedback",
            # customer-facing services (quotes, order tracking) read requests and their own retained status
            "quote_request", "order_submit", "order_status", "part_status",
        }),
        frozenset({"command", "api_request", "routing_request", "routing_response", "feedback",
                   "quote_response", "order_status", "part_status", "customer_event"}),
    ),
    Role.CUSTOMER: (
        frozenset({"quote_response", "order_status", "part_status", "customer_event"}),
        frozenset({"quote_request", "order_submit"}),
    ),
    Role.OPERATOR: (frozenset(), frozenset({"command"})),  # reads everything through OPERATOR_READ_ALL
}

OPERATOR_READ_ALL = ("#", "$SYS/#")

# The service accounts of a standard deployment; broker/acl is rendered for these.
STANDARD_ACCOUNTS = ("_twin", "_routing", "_quotes", "_loop", "_ops")


_PARAM = re.compile(r"^\{([a-z_]+)\}$")


@dataclass(frozen=True)
class Principal:
    """A broker user: its username, role and scope (tenant or customer; None for global roles)."""

    username: str
    role: Role
    scope: str | None


def principal_for(username: str) -> Principal:
    """The role and scope a username stands for (see the module docstring); :class:`AclError` if none."""
    base, at, instance = username.partition("@")
    if at and not instance:
        raise AclError(f"username {username!r}: nothing after '@'")
    if base.startswith("_"):
        role = SERVICE_ACCOUNTS.get(base)
        if role is None:
            raise AclError(f"username {username!r}: unknown service account {base!r} "
                           f"(one of {', '.join(sorted(SERVICE_ACCOUNTS))})")
        if role is Role.CUSTOMER:
            if not instance:
                raise AclError(f"username {username!r}: a customer account is _customer@CUSTOMER")
            try:
                topics.check_customer(instance)
            except TopicError as exc:
                raise AclError(f"username {username!r}: {exc}") from None
            return Principal(username, role, instance)
        if instance and not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", instance):
            raise AclError(f"username {username!r}: invalid instance name {instance!r}")
        return Principal(username, role, None)
    try:
        topics.check_tenant(base)
    except TopicError as exc:
        raise AclError(f"username {username!r}: {exc}") from None
    if instance and not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", instance):
        raise AclError(f"username {username!r}: invalid gateway name {instance!r}")
    return Principal(username, Role.FACTORY, base)


def channel_filter(spec: TopicSpec, scope: str) -> str:
    """The ACL topic filter for one channel: ``{tenant}`` becomes ``scope`` (``%u``, a tenant or ``+``),
    other parameters become ``+``, and trailing parameters collapse into ``#`` (so that a client may
    subscribe with ``#`` below a fixed level) where that reaches no other channel."""
    levels = spec.address.split("/")
    out: list[str] = []
    for level in levels:
        m = _PARAM.match(level)
        if m is None:
            if "{" in level:
                raise AclError(f"channel {spec.name}: cannot express level {level!r} in an ACL")
            out.append(level)
        elif m.group(1) in ("tenant", "customer"):
            out.append(scope)
        else:
            out.append("+")
    # Collapse a tail of '+' levels into '#', keeping at least fl/v1/<scope> -- unless the wider
    # filter would reach another channel (orders/# would also cover the order submissions at orders).
    fixed = len(out)
    while fixed > 3 and out[fixed - 1] == "+":
        fixed -= 1
    if fixed < len(out):
        collapsed = "/".join([*out[:fixed], "#"])
        exact = "/".join(out)
        others = [_sample_topic(other) for other in topics.TOPICS if other.name != spec.name]
        if not any(topics.matches(collapsed, t) and not topics.matches(exact, t) for t in others):
            return collapsed
    return "/".join(out)


def _channels() -> dict[str, TopicSpec]:
    return {spec.name: spec for spec in topics.TOPICS}


def _scoped(spec: TopicSpec) -> str | None:
    """The name of the scope parameter of a channel (tenant or customer), or None for global channels."""
    for level in spec.address.split("/"):
        m = _PARAM.match(level)
        if m and m.group(1) in ("tenant", "customer"):
            return m.group(1)
    return None


def grants(role: Role, scope: str) -> list[tuple[str, str]]:
    """``(access, filter)`` pairs for ``role``; ``scope`` replaces the tenant/customer level.

    Global channels (routing, the platform level) are granted without scope; the deadletter channel
    is scoped by its ``{tenant}`` level like any other.
    """
    channels = _channels()
    read, write = RIGHTS[role]
    unknown = (read | write) - channels.keys()
    if unknown:
        raise AclError(f"RIGHTS names channels that are not in the contract: {sorted(unknown)}")
    out: list[tuple[str, str]] = []
    for name, spec in channels.items():
        kind = _scoped(spec)
        if role in (Role.FACTORY, Role.CUSTOMER) and kind != ("customer" if role is Role.CUSTOMER else "tenant"):
            # A scoped role never gets a channel outside its own scope, whatever RIGHTS says.
            if name in read or name in write:
                raise AclError(f"{role} may not be granted global channel {name!r}")
            continue
        access = {(True, True): "readwrite", (True, False): "read", (False, True): "write"}.get(
            (name in read, name in write)
        )
        if access:
            out.append((access, channel_filter(spec, scope if kind else "+")))
    if role is Role.OPERATOR:
        out += [("read", f) for f in OPERATOR_READ_ALL]
    return out


RESERVED_ROOTS = (topics.SYSTEM, topics.PLATFORM)


def _sample_topic(spec: TopicSpec) -> str:
    return "/".join("x1" if _PARAM.match(level) else level for level in spec.address.split("/"))


def denials(role: Role) -> list[str]:
    """Filters denied to ``role`` outright (Mosquitto checks denials first).

    A global role's ``fl/v1/+/twin/#`` also matches ``fl/v1/_sys/twin/...``: the ``+`` takes the
    reserved root for a tenant. Every channel under a reserved root that a grant reaches this way,
    and on which the role has no right, is denied; a partial right that a grant would widen cannot
    be expressed and is an error.
    """
    if role in (Role.FACTORY, Role.CUSTOMER, Role.OPERATOR):
        return []  # scoped roles never use '+' for the tenant; operators read everything on purpose
    granted = grants(role, "+")
    read, write = RIGHTS[role]
    out: list[str] = []
    for name, spec in _channels().items():
        if spec.address.split("/")[2] not in RESERVED_ROOTS:
            continue
        sample = _sample_topic(spec)
        reaches = {access for access, flt in granted if topics.matches(flt, sample)}
        wanted = {"read"} if name in read else set()
        wanted |= {"write"} if name in write else set()
        reached = {a for access in reaches for a in (("read", "write") if access == "readwrite" else (access,))}
        if reached <= wanted:
            continue
        if wanted:
            raise AclError(f"{role}: grants reach {name!r} beyond its rights and a denial would remove them")
        out.append(channel_filter(spec, "+"))
    return out


def uncovered_channels() -> list[str]:
    """Channels of the contract that no role may publish or no role may read (should be empty)."""
    written = set().union(*(w for _, w in RIGHTS.values()))
    read = set().union(*(r for r, _ in RIGHTS.values()))
    return sorted(name for name in _channels() if name not in written or name not in read)


HEADER = """\
# forgeline broker ACL (Mosquitto acl_file). GENERATED by `forgeline broker acl` from
# forgeline/contract/topics.py and forgeline/security/acl.py: do not edit by hand.
#
# Factories authenticate with username = tenant, so the patterns below confine each factory to
# fl/v1/<its tenant>/...; service accounts start with '_' and customers are _customer@NAME, so the
# same patterns grant them nothing real. Everything not granted here is denied.
"""


def render_acl(usernames: Iterable[str] = ()) -> str:
    """The Mosquitto ACL file: tenant patterns for every factory, plus a ``user`` block for each
    username in ``usernames`` that is not a plain tenant (services, extra gateways, customers)."""
    lines = [HEADER, "# --- factories (username = tenant) ---"]
    lines += [f"pattern {access} {flt}" for access, flt in grants(Role.FACTORY, "%u")]
    for username in sorted(set(usernames)):
        principal = principal_for(username)
        if principal.role is Role.FACTORY and principal.scope == username:
            continue  # covered by the patterns
        lines += ["", f"# {principal.role}" + (f" ({principal.scope})" if principal.scope else ""),
                  f"user {username}"]
        lines += [f"topic deny {flt}" for flt in denials(principal.role)]
        lines += [f"topic {access} {flt}" for access, flt in grants(principal.role, principal.scope or "+")]
    return "\n".join(lines) + "\n"
