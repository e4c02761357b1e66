"""The contract: topics build and parse round-trip, telemetry batches encode and decode exactly,
schemas accept good payloads and reject bad ones with a readable reason."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgeline.contract import schemas, telemetry, topics
from forgeline.contract.topics import DeviceRef, Kind, TopicError

ident = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True)


@given(ident, ident, ident, ident, st.sampled_from(list(Kind)), ident)
def test_device_topics_round_trip(tenant: str, site: str, area: str, device: str, kind: Kind, cmd: str) -> None:
    ref = DeviceRef(tenant, site, area, device)
    command = cmd if kind.value in topics.COMMAND_KINDS else None
    parsed = topics.parse(ref.topic(kind, command))
    assert parsed.kind == kind.value
    assert parsed.tenant == tenant
    assert parsed.device == ref
    assert parsed.command == command


def test_tenant_level_topics_round_trip() -> None:
    assert topics.parse(topics.fleet_topic("acme")).kind == "fleet"
    p = topics.parse(topics.api_request_topic("acme", "get_twin"))
    assert (p.kind, p.tenant, p.method) == ("api_request", "acme", "get_twin")
    p = topics.parse(topics.api_response_topic("acme", "svc1"))
    assert (p.kind, p.client_id) == ("api_response", "svc1")
    p = topics.parse(topics.feedback_topic("oven", "MW-20", "B"))
    assert (p.kind, p.model, p.revision) == ("feedback", "MW-20", "B")
    assert topics.parse(topics.insights_topic("oven", "MW-20")).model == "MW-20"
    assert topics.parse(topics.routing_request_topic()).kind == "routing_request"
    assert topics.parse(topics.routing_response_topic("c1")).client_id == "c1"
    assert topics.parse(topics.deadletter_topic("acme")).kind == "deadletter"
    assert topics.deadletter_topic("bad/tenant").endswith("/_unknown")


@pytest.mark.parametrize(
    "bad",
    [
        "fl/v2/acme/telemetry/s/a/d",
        "fl/v1/acme/telemetry/s/a",
        "fl/v1/acme/telemetry/s/a/d/extra",
        "fl/v1/acme/cmd/s/a/d",
        "fl/v1/_other/fleet",
        "fl/v1/acme/nosuch/s/a/d",
        "fl/v1/ac+me/telemetry/s/a/d",
        "x",
    ],
)
def test_parse_rejects_foreign_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "_sys", "x" * 65, "sp ace"])
def test_bad_tenant_names_are_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        DeviceRef(bad, "s", "a", "d")


def test_filters_match_built_topics() -> None:
    ref = DeviceRef("acme", "plant1", "cell2", "p7")
    assert topics.matches(topics.device_filter(Kind.TELEMETRY), ref.telemetry_topic)
    assert topics.matches(topics.device_filter(Kind.TELEMETRY, "acme"), ref.telemetry_topic)
    assert not topics.matches(topics.device_filter(Kind.TELEMETRY, "other"), ref.telemetry_topic)
    assert topics.matches(topics.device_filter(Kind.CMD), ref.command_topic("ping"))
    assert not topics.matches(topics.device_filter(Kind.STATUS), ref.telemetry_topic)
    assert topics.matches(topics.shared("twin", "fl/v1/#"), ref.twin_topic)


samples = st.lists(
    st.tuples(
        st.integers(0, 3_000_000),
        st.integers(0, 2),
        st.floats(allow_nan=True, allow_infinity=True, width=64),
    ),
    max_size=200,
)


@given(samples, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.booleans())
def test_telemetry_round_trip(rows: list[tuple[int, int, float]], seq: int, epoch: int, hist: bool) -> None:
    channels = ["nozzle_temp", "bed_temp", "state"]
    base = 1_700_000_000_000_000
    t = [base + r[0] for r in rows]
    c = [r[1] for r in rows]
    v = [r[2] for r in rows]
    payload = telemetry.encode(channels, t, c, v, seq=seq, epoch=epoch, historical=hist)
    batch = telemetry.decode(payload)
    assert batch.header.seq == seq and batch.header.epoch == epoch and batch.header.historical == hist
    assert batch.channels == tuple(channels)
    assert batch.t_us == t and batch.channel_idx == c
    assert all((a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(batch.values, v, strict=True))
    _h, t_np, c_np, v_np = telemetry.decode_numpy(payload)
    assert t_np.tolist() == t and c_np.tolist() == c
    np.testing.assert_array_equal(v_np, np.array(v, dtype=float))


def test_mark_historical_sets_only_the_flag() -> None:
    payload = telemetry.encode(["state"], [1, 2], [0, 0], [1.0, 3.0], seq=5)
    replay = telemetry.mark_historical(payload)
    assert telemetry.decode(replay).header.historical
    assert telemetry.decode(replay).values == [1.0, 3.0]
    assert replay[5:] == payload[5:]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: b"XXXX" + p[4:], "bad magic"),
        (lambda p: p[:20], "shorter than the 32-byte header"),
        (lambda p: p[:-1], "header says"),
        (lambda p: p + b"\0" * 8, "header says"),
        (lambda p: p[:6] + struct.pack("<H", 0) + p[8:], "channel count 0"),
        (lambda p: p[:20] + struct.pack("<I", 2_000_000) + p[24:], "exceeds"),
        (lambda p: p[:-2] + struct.pack("<H", 9), "not in the channel table"),
    ],
)
def test_malformed_batches_get_clear_errors(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    payload = telemetry.encode(["state", "bed_temp"], [10, 20], [0, 1], [1.0, 60.0], seq=1)
    with pytest.raises(telemetry.TelemetryError, match=message):
        telemetry.decode(mutate(payload))
    with pytest.raises(telemetry.TelemetryError, match=message):
        telemetry.decode_numpy(mutate(payload))


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(telemetry.TelemetryError, match="lengths differ"):
        telemetry.encode(["a"], [1], [0, 0], [1.0], seq=0)
    with pytest.raises(telemetry.TelemetryError, match="not in the channel table"):
        telemetry.encode(["a"], [1], [3], [1.0], seq=0)
    with pytest.raises(telemetry.TelemetryError, match="span"):
        telemetry.encode(["a"], [0, 2**33], [0, 0], [1.0, 2.0], seq=0)


def test_every_schema_is_valid_and_rejects_junk() -> None:
    for name in schemas.SCHEMAS:
        if name == "telemetry":
            continue
        with pytest.raises(schemas.PayloadError, match=name):
            schemas.validate(name, {"unexpected": [1, 2, 3]})


def test_status_schema_examples() -> None:
    birth = {
        "status": "online",
        "ts": 1.7e9,
        "technology": "SLS",
        "materials": ["PA12"],
        "build_volume_mm": [340, 340, 600],
        "channels": [{"name": "chamber_temp", "unit": "degC"}],
    }
    schemas.validate("status", birth)
    schemas.validate("status", {"status": "offline"})
    with pytest.raises(schemas.PayloadError, match="status"):
        schemas.validate("status", {**birth, "build_volume_mm": [340, -1, 600]})
    with pytest.raises(schemas.PayloadError, match="not valid JSON"):
        schemas.loads("status", b"{nope")
    with pytest.raises(schemas.PayloadError, match="exceeds"):
        schemas.loads("status", b" " * (schemas.MAX_JSON_PAYLOAD + 1))
    with pytest.raises(schemas.PayloadError, match="not valid JSON"):
        schemas.loads("status", b"[" * 100_000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_dumps_with_orjson_decodes_like_the_standard_library(document: object) -> None:
    """The twin encodes with orjson where installed: the bytes may differ (UTF-8 for non-ASCII, float
    spelling), the decoded document may not."""
    pytest.importorskip("orjson")
    fast = schemas.dumps(document)
    plain = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    assert json.loads(fast) == json.loads(plain)


def test_dumps_falls_back_and_nan_becomes_null(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("orjson")
    huge = {"n": 2**70, 3: "int key"}
    assert json.loads(schemas.dumps(huge)) == {"n": 2**70, "3": "int key"}  # beyond orjson: the library
    assert json.loads(schemas.dumps({"x": math.nan, "y": [math.inf]})) == {"x": None, "y": [None]}
    monkeypatch.setattr(schemas, "_orjson", None)  # a gateway without orjson
    assert json.loads(schemas.dumps({"a": "ü", 1: 2.5})) == {"a": "ü", "1": 2.5}
    with pytest.raises(ValueError):
        schemas.dumps({"x": math.nan})
