"""Columns.unpack with ``latest``: the one-pass unpack-and-accumulate the ingest uses gives the same
columns as the plain unpack and the same latest values and interval sums as the reference."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.contract import telemetry
from twin.unpack import Columns, Latest, reference_accumulate

_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from([0.0, -0.0, 1e308]))
DEVICES, SLOTS = 4, 6


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, int, np.ndarray]:
    n_channels = draw(st.integers(1, 4))
    n = draw(st.integers(0, 30))
    t0 = draw(st.integers(0, 2**40))
    t = [t0 + draw(st.integers(0, 50)) for _ in range(n)]  # few distinct times: ties on purpose
    c = [draw(st.integers(0, n_channels - 1)) for _ in range(n)]
    v = [draw(_values) for _ in range(n)]
    payload = telemetry.encode([f"x_c{i}" for i in range(n_channels)], t, c, v, seq=0)
    slots = np.array([draw(st.integers(-1, SLOTS - 1)) for _ in range(n_channels)], dtype=np.int32)
    return payload, draw(st.integers(0, DEVICES - 1)), slots


@settings(max_examples=80, deadline=None)
@given(st.lists(payloads(), max_size=6), st.data(), st.booleans())
def test_unpack_with_latest_matches_unpack_and_the_reference(
    messages: list[tuple[bytes, int, np.ndarray]], data: st.DataObject, add: bool
) -> None:
    plain, fused = Columns(), Columns()
    for payload, device_index, slots in messages:
        header = telemetry.read_header(payload)
        for columns in (plain, fused):
            columns.add(payload, header.data_offset, header.n_samples, header.t_base_us, device_index, slots)
    use = np.array([data.draw(st.booleans()) for _ in messages], dtype=np.bool_)
    latest = Latest(np.full((DEVICES, SLOTS), np.nan), np.full((DEVICES, SLOTS), np.iinfo(np.int64).min),
                    np.zeros((DEVICES, SLOTS)), np.zeros((DEVICES, SLOTS), dtype=np.int64), add)
    expected = plain.unpack(use)
    got = fused.unpack(use, latest)
    for a, b in zip(expected, got, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    ref_last: dict[tuple[int, int], tuple[int, float]] = {}
    ref_sums: dict[tuple[int, int], tuple[float, int]] = {}
    device, slot, t_us, values = expected
    reference_accumulate(device.tolist(), slot.tolist(), t_us.tolist(), values.tolist(), ref_last, ref_sums, add)
    for d in range(DEVICES):
        for s in range(SLOTS):
            if (d, s) in ref_last:
                assert (int(latest.last_t[d, s]), float(latest.last_value[d, s])) == ref_last[(d, s)]
            else:
                assert math.isnan(latest.last_value[d, s])
            total, n = ref_sums.get((d, s), (0.0, 0))
            assert latest.interval_count[d, s] == n
            assert latest.interval_sum[d, s] == total or math.isclose(latest.interval_sum[d, s], total, rel_tol=1e-12)
