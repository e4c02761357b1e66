"""The ingest kernels against their slow references (hypothesis + edge cases), and the (epoch, seq)
tracker against a naive set model."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.contract import telemetry
from twin.sequence import DeviceSequences, Verdict
from twin.unpack import Columns, Scratch, accumulate_latest, bucket_means, reference_accumulate, reference_unpack

_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from([0.0, -0.0, 1e308]))


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, int, np.ndarray]:
    n_channels = draw(st.integers(1, 5))
    names = [f"x_c{i}" for i in range(n_channels)]
    n = draw(st.integers(0, 40))
    t0 = draw(st.integers(0, 2**50))
    t = [t0 + draw(st.integers(0, 10**9)) for _ in range(n)]
    c = [draw(st.integers(0, n_channels - 1)) for _ in range(n)]
    v = [draw(_values) for _ in range(n)]
    payload = telemetry.encode(names, t, c, v, seq=draw(st.integers(0, 2**40)))
    slots = np.array([draw(st.integers(-1, 7)) for _ in range(n_channels)], dtype=np.int32)
    return payload, draw(st.integers(0, 9)), slots


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=60, deadline=None)
@given(st.lists(payloads(), min_size=0, max_size=6), st.data())
def test_unpack_matches_the_reference(messages: list[tuple[bytes, int, np.ndarray]], data: st.DataObject) -> None:
    columns = Columns()
    for payload, device_index, slots in messages:
        header = telemetry.read_header(payload)
        columns.add(payload, header.data_offset, header.n_samples, header.t_base_us, device_index, slots)
    use = np.array([data.draw(st.booleans()) for _ in messages], dtype=np.bool_)
    device, slot, t_us, values = columns.unpack(use)
    ref = reference_unpack([m for m, u in zip(messages, use, strict=True) if u])
    assert device.tolist() == ref[0] and slot.tolist() == ref[1] and t_us.tolist() == ref[2]
    assert all(_same(a, b) for a, b in zip(values.tolist(), ref[3], strict=True))
    max_channel, max_offset = columns.check()
    for i, (payload, _d, _s) in enumerate(messages):
        batch = telemetry.decode(payload)
        assert max_channel[i] == (max(batch.channel_idx) if batch.channel_idx else -1)
        assert max_offset[i] == (max(batch.t_us) - batch.header.t_base_us if batch.t_us else 0)


_SCRATCH = Scratch()  # shared by every example: cycles of every size one after another, as in the ingest


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(payloads(), min_size=0, max_size=6), min_size=1, max_size=4))
def test_unpack_with_a_kept_scratch_matches_the_reference(cycles: list[list[tuple[bytes, int, np.ndarray]]]) -> None:
    # the buffers grow, shrink back to a view, and hold the previous cycle's bytes: none of it may show
    for messages in cycles:
        columns = Columns(_SCRATCH)
        for payload, device_index, slots in messages:
            header = telemetry.read_header(payload)
            columns.add(payload, header.data_offset, header.n_samples, header.t_base_us, device_index, slots)
        max_channel, max_offset = columns.check()
        device, slot, t_us, values = columns.unpack()
        ref = reference_unpack(messages)
        assert device.tolist() == ref[0] and slot.tolist() == ref[1] and t_us.tolist() == ref[2]
        assert all(_same(a, b) for a, b in zip(values.tolist(), ref[3], strict=True))
        plain = Columns()
        for payload, device_index, slots in messages:
            header = telemetry.read_header(payload)
            plain.add(payload, header.data_offset, header.n_samples, header.t_base_us, device_index, slots)
        plain_channel, plain_offset = plain.check()
        assert max_channel.tolist() == plain_channel.tolist() and max_offset.tolist() == plain_offset.tolist()


def test_unpack_of_nothing_is_empty() -> None:
    columns = Columns()
    assert [c.shape[0] for c in columns.unpack()] == [0, 0, 0, 0]
    assert columns.check()[0].shape == (0,)
    payload = telemetry.encode(["a"], [], [], [], seq=0)
    columns.add(payload, telemetry.read_header(payload).data_offset, 0, 0, 0, np.zeros(1, np.int32))
    assert [c.shape[0] for c in columns.unpack()] == [0, 0, 0, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1, 2), st.integers(0, 50), _values), max_size=60),
       st.booleans())
def test_accumulate_matches_the_reference(rows: list[tuple[int, int, int, float]], add: bool) -> None:
    device = np.array([r[0] for r in rows], dtype=np.int32)
    slot = np.array([r[1] for r in rows], dtype=np.int32)
    t_us = np.array([r[2] for r in rows], dtype=np.int64)
    values = np.array([r[3] for r in rows], dtype=np.float64)
    last_value = np.full((4, 3), np.nan)
    last_t = np.full((4, 3), np.iinfo(np.int64).min, dtype=np.int64)
    sums = np.zeros((4, 3))
    counts = np.zeros((4, 3), dtype=np.int64)
    accumulate_latest(device, slot, t_us, values, last_value, last_t, sums, counts, add)
    ref_last: dict[tuple[int, int], tuple[int, float]] = {}
    ref_sums: dict[tuple[int, int], tuple[float, int]] = {}
    reference_accumulate(device.tolist(), slot.tolist(), t_us.tolist(), values.tolist(), ref_last, ref_sums, add)
    for d in range(4):
        for s in range(3):
            if (d, s) in ref_last:
                assert (int(last_t[d, s]), float(last_value[d, s])) == ref_last[(d, s)]
            else:
                assert math.isnan(last_value[d, s])
            total, n = ref_sums.get((d, s), (0.0, 0))
            assert counts[d, s] == n and (sums[d, s] == total or math.isclose(sums[d, s], total, rel_tol=1e-12))


def test_bucket_means_against_a_loop() -> None:
    rng = np.random.default_rng(1)
    device = rng.integers(0, 3, 500).astype(np.int32)
    slot = rng.integers(-1, 4, 500).astype(np.int32)
    t_us = rng.integers(0, 100_000_000, 500).astype(np.int64)
    values = rng.normal(size=500)
    values[::17] = np.nan
    got = {(d, s, t): m for d, s, t, m in bucket_means(device, slot, t_us, values, 10_000_000, 4)}
    expected: dict[tuple[int, int, int], list[float]] = {}
    for d, s, t, v in zip(device.tolist(), slot.tolist(), t_us.tolist(), values.tolist(), strict=True):
        if s >= 0 and math.isfinite(v):
            expected.setdefault((d, s, t // 10_000_000 * 10_000_000), []).append(v)
    assert got.keys() == expected.keys()
    for key, vals in expected.items():
        assert math.isclose(got[key], sum(vals) / len(vals), rel_tol=1e-9)
    assert bucket_means(device[:0], slot[:0], t_us[:0], values[:0], 10, 4) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), max_size=120), st.integers(2, 16))
def test_sequences_against_a_set_model(arrivals: list[tuple[int, int]], max_pending: int) -> None:
    tracker = DeviceSequences(max_pending=max_pending, max_epochs=8)
    seen: set[tuple[int, int]] = set()
    refused = 0
    for epoch, seq in arrivals:
        verdict = tracker.admit(epoch, seq)
        if (epoch, seq) in seen:
            # a seen batch is refused, unless it was forgotten (bounded memory below the first seen)
            assert verdict is Verdict.DUPLICATE or (tracker.forgotten > 0 and seq < tracker.epochs[epoch].floor)
            refused += verdict is Verdict.DUPLICATE
        elif verdict is Verdict.DUPLICATE:
            # only a seq given up as lost below the watermark may be refused without having been seen
            assert tracker.lost > 0 and seq <= tracker.epochs[epoch].watermark
            refused += 1
        else:
            assert verdict is Verdict.NEW
            seen.add((epoch, seq))
        for window in tracker.epochs.values():
            assert len(window.above) <= max_pending and len(window.below) <= max_pending
            assert all(s > window.watermark + 1 for s in window.above)
            assert all(s < window.floor for s in window.below)
    assert tracker.duplicates == refused  # every refused arrival is counted exactly once
    assert tracker.missing >= 0
    restored = DeviceSequences.from_json(tracker.to_json(), max_pending=max_pending)
    restored.max_epochs = tracker.max_epochs
    assert restored == tracker
