"""The ACL generated from the contract: no drift from topics.TOPICS or from broker/acl, no channel
without a writer and a reader, no way for one tenant's grants to reach another tenant's topics, and
usernames that cannot be abused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.broker.secure import production_config_path
from forgeline.contract import topics
from forgeline.contract.topics import DeviceRef, Kind
from forgeline.security import acl, passwords, pki
from forgeline.security.acl import AclError, Role, principal_for, render_acl

REPO = Path(__file__).resolve().parents[1]
tenant_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,15}", fullmatch=True)


def test_checked_in_acl_matches_the_contract() -> None:
    assert (REPO / "broker" / "acl").read_text() == render_acl(acl.STANDARD_ACCOUNTS), (
        "broker/acl drifted from the contract: run 'forgeline broker acl --out broker/acl'"
    )


def test_module_examples_run() -> None:
    import doctest

    for module in (acl, passwords, pki):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_every_channel_has_a_writer_and_a_reader() -> None:
    assert acl.uncovered_channels() == []


def test_production_config_is_shipped_and_closed() -> None:
    conf = production_config_path().read_text().splitlines()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    assert not [line for line in conf if line.startswith("listener") and line.split()[1] in ("1883",)]


# A model of Mosquitto's acl_file check (deny by default; %u substitution; topic filter matching),
# to check properties over many tenant names that the broker tests check on a few.
def _allowed(acl_text: str, username: str, topic: str, access: str) -> bool:
    if _denied(acl_text, username, topic):
        return False
    current: str | None = None
    for raw in acl_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            current = rest
            continue
        if word not in ("topic", "pattern"):
            continue
        mode, _, flt = rest.partition(" ")
        if word == "topic" and current != username:
            continue
        if word == "pattern":
            flt = flt.replace("%u", username)
        if mode in (access, "readwrite") and topics.matches(flt, topic):
            return True
    return False


def _denied(acl_text: str, username: str, topic: str) -> bool:
    """Mosquitto checks a user's deny lines before any grant."""
    current: str | None = None
    for raw in acl_text.splitlines():
        word, _, rest = raw.strip().partition(" ")
        if word == "user":
            current = rest
        elif word in ("topic", "pattern") and rest.startswith("deny "):
            flt = rest.split(" ", 1)[1].replace("%u", username)
            if (word == "pattern" or current == username) and topics.matches(flt, topic):
                return True
    return False


def _device_topics(tenant: str) -> list[str]:
    ref = DeviceRef(tenant, "s", "a", "d")
    return [
        *(ref.topic(k, "c" if k.value in topics.COMMAND_KINDS else None) for k in Kind),
        topics.fleet_topic(tenant), topics.api_request_topic(tenant, "m"), topics.api_response_topic(tenant, "c"),
        topics.feedback_topic(tenant, "m", "r"), topics.insights_topic(tenant, "m"), topics.deadletter_topic(tenant),
    ]


@settings(max_examples=100, deadline=None)
@given(tenant_names, tenant_names, st.sampled_from(["", "@gw2"]))
def test_no_grant_crosses_tenants(own: str, other: str, gateway: str) -> None:
    if own == other:
        return
    username = own + gateway
    text = render_acl([username, other])
    for topic in _device_topics(other):
        for access in ("read", "write"):
            assert not _allowed(text, username, topic, access), (username, access, topic)
    # and the platform topics are out of reach too
    for topic in (topics.routing_request_topic(), topics.routing_response_topic("c"), "fl/v1/_customers/x/y"):
        assert not _allowed(text, username, topic, "write") and not _allowed(text, username, topic, "read")
    # while its own telemetry is writable and its commands readable
    ref = DeviceRef(own, "s", "a", "d")
    assert _allowed(text, username, ref.telemetry_topic, "write")
    assert _allowed(text, username, ref.command_topic("c"), "read")


# Read rights that follow from a '#' filter over a parent topic, reviewed: a customer reads the
# order topic it writes its own orders to (its own data).
EXTRA_READS = {(Role.CUSTOMER, "order_submit")}


def _sample_topic(address: str, scope: str) -> str:
    levels = []
    for level in address.split("/"):
        if level in ("{tenant}", "{customer}"):
            levels.append(scope)
        elif level.startswith("{"):
            levels.append("x1")
        else:
            levels.append(level)
    return "/".join(levels)


@pytest.mark.parametrize(("username", "scope"), [("acme", "acme"), ("acme@gw2", "acme"), ("_twin", "acme"),
                                                 ("_routing", "acme"), ("_loop", "acme"),
                                                 ("_customer@bigco", "bigco"), ("_ops", "acme")])
def test_every_role_gets_exactly_its_rights_on_every_channel(username: str, scope: str) -> None:
    """Least privilege, channel by channel: what the generated ACL allows on a concrete topic of each
    channel is exactly what RIGHTS grants (so no '#' collapse over-grants a neighbouring channel)."""
    role = principal_for(username).role
    read, write = acl.RIGHTS[role]
    text = render_acl([username])
    for spec in topics.TOPICS:
        own_scope = ("{customer}" in spec.address) == (role is Role.CUSTOMER) or role not in (
            Role.FACTORY, Role.CUSTOMER)
        topic = _sample_topic(spec.address, scope)
        can_write = _allowed(text, username, topic, "write")
        can_read = _allowed(text, username, topic, "read")
        assert can_write == (spec.name in write and own_scope), (username, spec.name, "write", topic)
        expected_read = role is Role.OPERATOR or (spec.name in read and own_scope) or (role, spec.name) in EXTRA_READS
        assert can_read == expected_read, (username, spec.name, "read", topic)


customer_names = st.sampled_from([*sorted(topics._tenant_topic_words()), "bigco"]) | tenant_names


@settings(max_examples=60, deadline=None)
@given(customer_names)
def test_no_service_grant_reaches_a_customer_level_beyond_its_rights(customer: str) -> None:
    """Global grants use '+' for the tenant, which also matches the ``_customers`` root; a customer
    named like a tenant topic kind ('feedback') would put its level under a service's
    ``fl/v1/+/feedback/...`` grant. Such names are refused; every other name is out of reach."""
    try:
        topics.check_customer(customer)
    except topics.TopicError:
        assert customer in topics._tenant_topic_words()  # the names drawn here are valid tenant names
        with pytest.raises(AclError):
            principal_for(f"_customer@{customer}")
        return
    for username in ("_twin", "_loop", "_routing"):
        role = principal_for(username).role
        read, write = acl.RIGHTS[role]
        text = render_acl([username])
        for spec in topics.TOPICS:
            if "{customer}" not in spec.address:
                continue
            topic = _sample_topic(spec.address, customer)
            assert _allowed(text, username, topic, "write") == (spec.name in write), (username, spec.name, topic)
            assert _allowed(text, username, topic, "read") == (spec.name in read), (username, spec.name, topic)


def test_service_accounts_get_nothing_from_the_tenant_patterns() -> None:
    """%u for a service account or a customer expands to a level no tenant can have."""
    for username in ("_twin", "_routing", "_customer@bigco", "acme@gw2", "_ops"):
        text = render_acl([username])
        patterns = [line.split()[2].replace("%u", username) for line in text.splitlines()
                    if line.startswith("pattern ")]
        for flt in patterns:
            level = flt.split("/")[2] if flt.split("/")[2] != "_sys" else flt.split("/")[-1]
            with pytest.raises(topics.TopicError):
                topics.check_tenant(level)


@pytest.mark.parametrize(
    ("username", "role", "scope"),
    [
        ("acme", Role.FACTORY, "acme"),
        ("acme@gw2", Role.FACTORY, "acme"),
        ("_twin", Role.TWIN, None),
        ("_twin@i2", Role.TWIN, None),
        ("_routing", Role.PLATFORM, None),
        ("_loop", Role.LOOP, None),
        ("_quotes", Role.PLATFORM, None),
        ("_customer@bigco", Role.CUSTOMER, "bigco"),
        ("_ops", Role.OPERATOR, None),
    ],
)
def test_principal_for(username: str, role: Role, scope: str | None) -> None:
    assert principal_for(username) == acl.Principal(username, role, scope)


@pytest.mark.parametrize(
    "username",
    ["", "_", "_platform_admin", "_customer", "_customer@", "_customer@_x", "acme@", "a/b", "a+b", "a#b",
     "%u", "acme@gw/1", "_sys", "x" * 65, "acme@" + "g" * 65],
)
def test_usernames_without_a_role_are_refused(username: str) -> None:
    with pytest.raises(AclError):
        principal_for(username)


@pytest.mark.parametrize("username", ["a:b", "a\nb", "a b", "a/b", "a+b", "a#b", "$SYS", ""])
def test_password_file_refuses_usernames_that_corrupt_it(username: str) -> None:
    with pytest.raises(passwords.PasswordError):
        passwords.check_username(username)


def test_password_hash_round_trip_and_errors() -> None:
    entry = passwords.hash_password("pw", iterations=5)
    assert passwords.verify_password("pw", entry) and not passwords.verify_password("pW", entry)
    assert not passwords.verify_password("pw", "$7$x$y$z") and not passwords.verify_password("pw", "garbage")
    with pytest.raises(passwords.PasswordError):
        passwords.hash_password("")
