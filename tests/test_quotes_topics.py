"""The customer level of the topic contract: builders, parser, filters, ACL rights."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgeline.contract import topics
from forgeline.contract.topics import TopicError
from forgeline.security.acl import Role, grants, render_acl

idents = st.from_regex(r"[A-Za-z0-9.\-][A-Za-z0-9_.\-]{0,20}", fullmatch=True)


@given(idents, idents, idents, st.text(min_size=1, max_size=60))
def test_builders_and_parser_agree(customer: str, order_id: str, client_id: str, part_id: str) -> None:
    part = topics.part_key(part_id)
    cases = {
        topics.quote_request_topic(customer): ("quote_request", None, None, None),
        topics.quote_response_topic(customer, client_id): ("quote_response", client_id, None, None),
        topics.order_submit_topic(customer): ("order_submit", None, None, None),
        topics.order_status_topic(customer, order_id): ("order_status", None, order_id, None),
        topics.part_status_topic(customer, order_id, part): ("part_status", None, order_id, part),
        topics.customer_events_topic(customer): ("customer_event", None, None, None),
    }
    for topic, (kind, client, order, part_level) in cases.items():
        parsed = topics.parse(topic)
        assert (parsed.kind, parsed.customer, parsed.client_id, parsed.order_id, parsed.part, parsed.tenant) == (
            kind, customer, client, order, part_level, None)
        assert topics.matches(topics.customer_filter(customer), topic)
        assert topics.matches(topics.customer_filter(), topic)


def test_part_keys_are_stable_and_topic_safe() -> None:
    assert topics.part_key("bracket-a") == "bracket-a"
    odd = topics.part_key("housing top/left #2")
    assert odd == topics.part_key("housing top/left #2") and odd != topics.part_key("housing top/left #3")
    topics.check_ident(odd)


@pytest.mark.parametrize("topic", [
    "fl/v1/_customers", "fl/v1/_customers/_platform/orders", "fl/v1/_customers/bigco",
    "fl/v1/_customers/bigco/orders/o1/parts", "fl/v1/_customers/bigco/quote/reply",
    "fl/v1/_customers/bigco/orders/o+1", "fl/v1/_customers/bigco/secrets",
])
def test_malformed_customer_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_builders_refuse_reserved_or_bad_customers() -> None:
    for bad in ("_platform", "a/b", "+", ""):
        with pytest.raises(TopicError):
            topics.order_submit_topic(bad)


def test_a_customer_may_only_ask_and_read_its_own_level() -> None:
    own = dict((flt, access) for access, flt in grants(Role.CUSTOMER, "bigco"))
    assert own[topics.order_submit_topic("bigco")] == "write"
    assert own[topics.quote_request_topic("bigco")] == "write"
    for flt in own:
        assert flt.startswith("fl/v1/_customers/bigco/")
    # status topics are written by the platform only: a customer cannot forge its own progress
    assert all(access == "read" for flt, access in own.items() if "/orders/" in flt or flt.endswith("/events"))
    text = render_acl(["_customer@bigco", "_customer@other"])
    assert "topic write fl/v1/_customers/bigco/orders\n" in text
    assert "fl/v1/_customers/+/" not in text.split("user _customer@bigco")[1].split("\n\n")[0]
