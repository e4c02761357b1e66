"""Property-based fuzzing of every payload decoder: whatever the bytes, a decoder returns a result or
raises its own clear error (TelemetryError, PayloadError), never anything else, within bounded time
and memory."""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgeline.contract import schemas, telemetry
from forgeline.contract.schemas import PayloadError
from forgeline.contract.telemetry import TelemetryError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON_SCHEMAS = sorted(name for name in schemas.SCHEMAS if name != "telemetry")


# --- telemetry ------------------------------------------------------------------------------------

channel_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20).filter(
    lambda s: 1 <= len(s.encode()) <= 255
)


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    channels = draw(st.lists(channel_names, min_size=1, max_size=6))
    n = draw(st.integers(0, 40))
    t0 = draw(st.integers(-(2**50), 2**50))
    t_us = [t0 + draw(st.integers(0, 2**32 - 1)) for _ in range(n)]
    idx = [draw(st.integers(0, len(channels) - 1)) for _ in range(n)]
    values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n))
    return telemetry.encode(channels, t_us, idx, values, seq=draw(st.integers(0, 2**64 - 1)),
                            epoch=draw(st.integers(0, 2**32 - 1)), historical=draw(st.booleans()))


def _decode_both(payload: bytes) -> tuple[Any, Any]:
    """Decode with both decoders; each result is the value or the TelemetryError it raised."""
    results: list[Any] = []
    for decoder in (telemetry.decode, telemetry.decode_numpy):
        try:
            results.append(decoder(payload))
        except TelemetryError as exc:
            assert str(exc), "a TelemetryError must say why"
            results.append(exc)
    return results[0], results[1]


def _agree(py: Any, numpy_result: Any) -> None:
    """Both decoders accept or both refuse; when they accept, they return the same samples."""
    assert isinstance(py, TelemetryError) == isinstance(numpy_result, TelemetryError), (py, numpy_result)
    if isinstance(py, TelemetryError):
        return
    header, t_us, channel_idx, values = numpy_result
    assert header == py.header
    assert t_us.tolist() == py.t_us and channel_idx.tolist() == py.channel_idx
    assert np.array_equal(values, np.array(py.values, dtype=np.float64), equal_nan=True)


@FUZZ
@given(st.binary(max_size=2048))
def test_telemetry_decoders_on_arbitrary_bytes(payload: bytes) -> None:
    _agree(*_decode_both(payload))


@FUZZ
@given(st.binary(max_size=200))
def test_telemetry_decoders_on_bytes_behind_a_valid_magic(tail: bytes) -> None:
    """Past the magic, so the fuzzer exercises the header and channel-table checks."""
    _agree(*_decode_both(telemetry.MAGIC + tail))


@FUZZ
@given(batches(), st.data())
def test_telemetry_decoders_on_mutated_batches(payload: bytes, data: st.DataObject) -> None:
    """Valid batches with flipped bytes, truncation, extension, or rewritten header fields."""
    mutated = bytearray(payload)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "field"]))
    if how == "flip" and mutated:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated))):]
    elif how == "extend":
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    else:
        offset, fmt = data.draw(st.sampled_from([(6, "<H"), (20, "<I"), (8, "<I"), (12, "<Q"), (24, "<q")]))
        size = struct.calcsize(fmt)
        mutated[offset:offset + size] = data.draw(st.binary(min_size=size, max_size=size))
    _agree(*_decode_both(bytes(mutated)))


@FUZZ
@given(batches())
def test_telemetry_valid_batches_round_trip(payload: bytes) -> None:
    py, numpy_result = _decode_both(payload)
    assert not isinstance(py, TelemetryError), py
    _agree(py, numpy_result)


def test_telemetry_header_claims_are_checked_before_allocation() -> None:
    """A 40-byte payload claiming a million samples fails fast without allocating for them."""
    claims = telemetry.HEADER.pack(telemetry.MAGIC, 0, 0, 1, 0, 0, telemetry.MAX_SAMPLES, 0) + b"\x01a" + b"\0" * 6
    tracemalloc.start()
    try:
        for decoder in (telemetry.decode, telemetry.decode_numpy):
            with pytest.raises(TelemetryError, match="header says"):
                decoder(claims)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


def test_telemetry_oversized_payload_is_refused_unread() -> None:
    big = telemetry.MAGIC + bytes(telemetry.MAX_PAYLOAD)
    start = time.perf_counter()
    for decoder in (telemetry.decode, telemetry.decode_numpy):
        with pytest.raises(TelemetryError, match="exceeds"):
            decoder(big)
    assert time.perf_counter() - start < 0.5


def test_telemetry_channel_index_out_of_table_is_refused() -> None:
    payload = bytearray(telemetry.encode(["a", "b"], [1, 2], [0, 1], [1.0, 2.0], seq=1))
    payload[-2:] = struct.pack("<H", 7)  # the last sample's channel index
    for decoder in (telemetry.decode, telemetry.decode_numpy):
        with pytest.raises(TelemetryError, match="channel index 7"):
            decoder(bytes(payload))


# --- JSON payloads --------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)


def _loads(name: str, payload: bytes | str) -> Any:
    """schemas.loads; any exception other than PayloadError fails the test (hypothesis shows it)."""
    try:
        return schemas.loads(name, payload)
    except PayloadError as exc:
        assert str(exc).startswith(f"{name}:") or "unknown schema" in str(exc), exc
        return exc


@FUZZ
@given(st.sampled_from(JSON_SCHEMAS), st.binary(max_size=512))
def test_json_loads_on_arbitrary_bytes(name: str, payload: bytes) -> None:
    _loads(name, payload)


@FUZZ
@given(st.sampled_from(JSON_SCHEMAS), json_values)
def test_json_loads_on_arbitrary_documents(name: str, document: Any) -> None:
    _loads(name, json.dumps(document).encode())


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, bytes]:
    """Documents shaped like the schema's required fields with arbitrary values: past the first
    'required' check, so the fuzzer reaches the deeper constraints."""
    name = draw(st.sampled_from(JSON_SCHEMAS))
    schema = schemas.SCHEMAS[name]
    variants = schema.get("oneOf", [schema])
    variant = draw(st.sampled_from(variants))
    keys = list(variant.get("properties", {}))
    required = variant.get("required", [])
    doc = {k: draw(json_values) for k in required}
    for k in draw(st.lists(st.sampled_from(keys), max_size=4)) if keys else []:
        doc[k] = draw(json_values)
    return name, json.dumps(doc).encode()


@FUZZ
@given(near_valid())
def test_json_loads_on_near_valid_documents(case: tuple[str, bytes]) -> None:
    _loads(*case)


@pytest.mark.parametrize("name", JSON_SCHEMAS)
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_non_finite_numbers_are_refused(name: str, constant: str) -> None:
    """NaN compares false with every bound, so a schema's minimum/maximum would let it through."""
    doc = {"ts": 1.0, "value": 0}
    payload = json.dumps(doc).replace("0}", constant + "}").replace("1.0", constant)
    with pytest.raises(PayloadError, match=r"not a finite number|not valid JSON"):
        schemas.loads(name, payload)


@pytest.mark.parametrize("name", JSON_SCHEMAS)
@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
def test_json_deep_nesting_is_bounded(name: str, depth: int) -> None:
    """Deeply nested arrays and objects inside the size limit: a clear error or a result, quickly."""
    for payload in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth,
                    '{"args":' + '{"a":' * depth + "1" + "}" * depth + "}"):
        start = time.perf_counter()
        _loads(name, payload)
        assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", JSON_SCHEMAS)
def test_json_oversized_payload_is_refused_unparsed(name: str) -> None:
    big = b'{"ts": 1, "pad": "' + b"x" * schemas.MAX_JSON_PAYLOAD + b'"}'
    with pytest.raises(PayloadError, match="exceeds"):
        schemas.loads(name, big)
    # characters are counted as UTF-8 bytes: 4-byte characters do not multiply the limit
    wide = '{"pad": "' + "\U0001f600" * (schemas.MAX_JSON_PAYLOAD // 4 + 1) + '"}'
    with pytest.raises(PayloadError, match="exceeds"):
        schemas.loads(name, wide)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400 + ".0"])
def test_json_numbers_that_overflow_to_infinity_are_refused(number: str) -> None:
    """1e400 parses to inf, which passes "type: number" and every bound, like NaN would."""
    payload = '{"ts": 1, "topic": "t", "reason": "r", "size": 1, "x": 0}'.replace('"ts": 1', f'"ts": {number}')
    with pytest.raises(PayloadError, match="not a finite number"):
        schemas.loads("deadletter", payload)


def test_json_huge_integer_is_refused_quickly() -> None:
    payload = '{"ts": ' + "9" * 200_000 + "}"
    start = time.perf_counter()
    with pytest.raises(PayloadError):
        schemas.loads("deadletter", payload)
    assert time.perf_counter() - start < 1.0


def test_json_memory_is_bounded_by_the_size_limit() -> None:
    """Parsing the largest accepted payload allocates a bounded multiple of it."""
    items = ",".join(["[]"] * ((schemas.MAX_JSON_PAYLOAD - 100) // 3))
    payload = '{"ts": 1, "topic": "t", "reason": "r", "size": 1, "x": [' + items + "]}"
    assert len(payload) <= schemas.MAX_JSON_PAYLOAD
    tracemalloc.start()
    try:
        _loads("deadletter", payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, peak


def test_json_valid_documents_still_load() -> None:
    """The control: hardening refuses nothing the contract allows."""
    doc = {"ts": 1.5, "topic": "fl/v1/a/telemetry/s/a/d", "reason": "bad magic", "size": 10}
    assert schemas.loads("deadletter", json.dumps(doc)) == doc
    assert math.isfinite(schemas.loads("deadletter", json.dumps(doc).encode())["ts"])
