"""The numba kernels against the pure-Python reference (twin/core/reference.py).

Hypothesis draws fleets of samples with out-of-order and late timestamps, duplicates, NaN/inf,
bad indices, counter resets and state changes; the kernel and the reference must agree on every
count, every rolling-window total, every score and every event.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.core import CoreConfig, FleetCore, WindowSpec
from twin.core.config import DETECTORS
from twin.core.fleet import oee_from_totals
from twin.core.kernels import batch_is_ordered
from twin.core.layout import BV_BUSY_MS, BV_GOOD, BV_KNOWN_MS, BV_PRODUCED, BV_PRODUCING_MS, BV_SCRAP, DF_N
from twin.core.reference import ReferenceFleet, reference_scores

T0 = 1_700_000_000_000_000
CHANNELS = ["state", "nozzle_temp", "bed_temp", "produced_total", "good_total", "scrap_total", "layer", "x_vib"]
SMALL = CoreConfig(
    windows=(WindowSpec(60, 10), WindowSpec(300, 60)),
    kpi_window_s=60,
    shift_length_s=120,
    shift_origin_s=7,
    state_hold_s=40,
    silence_s=15,
    reorder_depth=3,
    halflife_samples=4.0,
    warmup_samples=3,
    event_min_samples=2,
)


samples = st.lists(
    st.tuples(
        st.integers(-1, 2),  # device (-1 and 2 are unknown)
        st.integers(-1, len(CHANNELS)),  # slot (-1 and len are unknown)
        st.integers(0, 400),  # time in units of 0.5 s
        st.one_of(
            st.floats(-50, 50, allow_nan=False, allow_infinity=False),
            st.integers(0, 7).map(float),  # state codes, counters, also invalid ones
            st.sampled_from([math.nan, math.inf, -math.inf, 250.0, 0.5]),
        ),
    ),
    max_size=250,
)


def _fleets(config: CoreConfig) -> tuple[FleetCore, ReferenceFleet]:
    core = FleetCore(max_devices=2, channels_per_device=len(CHANNELS), config=config)
    for i in range(2):
        core.add_device(f"acme/s/a/d{i}", technology="FDM", channels=CHANNELS, planned_cycle_time_s=3.0)
    return core, ReferenceFleet([CHANNELS, CHANNELS], config)


def _feed(core: FleetCore, ref: ReferenceFleet, batch: list[tuple[int, int, int, float]]) -> None:
    device = np.array([s[0] for s in batch], dtype=np.int32)
    slot = np.array([s[1] for s in batch], dtype=np.int32)
    t_us = np.array([T0 + s[2] * 500_000 for s in batch], dtype=np.int64)
    values = np.array([s[3] for s in batch], dtype=np.float64)
    core.ingest(device, slot, t_us, values)
    order = np.arange(len(batch))
    if len(batch) and not batch_is_ordered(device, t_us, 2):
        order = np.lexsort((t_us, device))
    ref.ingest([(int(device[i]), int(slot[i]), int(t_us[i]), float(values[i])) for i in order])


def _compare(core: FleetCore, ref: ReferenceFleet, config: CoreConfig) -> None:
    totals = core._stats
    assert [int(totals[i]) for i in range(5)] == list(ref.stats.values())
    now = core.now_us
    if now is None:
        return
    for d in range(2):
        for level, spec in enumerate([*config.windows, None]):
            got = core._totals(level, now // 1000, np.array([d]))[0]
            want = ref.window_totals(d, spec.length_s if spec else None, now, shift=spec is None)
            assert got[BV_PRODUCING_MS] == want["producing"]
            assert got[BV_BUSY_MS] == want["busy"]
            assert got[BV_KNOWN_MS] == want["known"]
            assert (got[BV_PRODUCED], got[BV_GOOD], got[BV_SCRAP]) == (want["produced"], want["good"], want["scrap"])
            assert got[6] == want["calendar"]
        assert core.devf[d, DF_N] == ref.devices[d].n
        assert core.channel_scores(d) == pytest.approx(
            {
                name: ref.channel_score(d, c)
                for c, name in enumerate(CHANNELS)
                if name in ("nozzle_temp", "bed_temp", "x_vib")
            },
            rel=1e-12,
            abs=1e-15,
        )
        assert float(core.devf[d, 4]) == pytest.approx(ref.device_score(d), rel=1e-12, abs=1e-15)
    events = [(e.device, e.phase, e.t_us, e.score) for e in core.drain_events()]
    assert [(d, p, t) for d, p, t, _ in events] == [(d, p, t) for d, p, t, _ in ref.events]
    assert [s for *_, s in events] == pytest.approx([s for *_, s in ref.events], rel=1e-12)
    ref.events.clear()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(samples, min_size=1, max_size=4), detector=st.sampled_from(list(DETECTORS)))
def test_kernel_matches_reference(batches: list[list[tuple[int, int, int, float]]], detector: str) -> None:
    config = CoreConfig(**{**SMALL.__dict__, "detector": detector})
    core, ref = _fleets(config)
    for batch in batches:
        _feed(core, ref, batch)
        _compare(core, ref, config)


@settings(max_examples=30, deadline=None)
@given(
    codes=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    gaps=st.lists(st.integers(1, 90), min_size=30, max_size=30),
    seed=st.integers(0, 2**31),
)
def test_state_timeline_any_arrival_order_within_reorder_depth(codes: list[int], gaps: list[int], seed: int) -> None:
    """Swapping neighbours (displacement below the reorder depth) changes no window total."""
    config = SMALL
    times = np.cumsum(gaps[: len(codes)])
    rows = [(0, 0, int(t), float(c)) for t, c in zip(times, codes, strict=True)]
    rng = np.random.default_rng(seed)
    shuffled = list(rows)
    for i in range(0, len(shuffled) - 1, 2):
        if rng.random() < 0.5:
            shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    results = []
    for order in (rows, shuffled):
        core, ref = _fleets(config)
        for row in order:
            _feed(core, ref, [row])
        _compare(core, ref, config)
        now = core.now_us
        results.append([core.window_kpis(0, w, now) for w in (60, 300, "shift")])
    assert results[0] == results[1]


def test_edge_cases_empty_constant_nan_inf() -> None:
    core, ref = _fleets(SMALL)
    _feed(core, ref, [])
    _compare(core, ref, SMALL)
    # a constant channel: zero variance must not divide by zero, and a later change is anomalous
    constant = [(0, 1, i, 5.0) for i in range(20)] + [(0, 1, 20, 6.0)]
    _feed(core, ref, constant)
    _compare(core, ref, SMALL)
    assert core.channel_scores(0)["nozzle_temp"] > 0.99
    _feed(core, ref, [(0, 1, 21, math.nan), (0, 1, 22, math.inf), (0, 0, 23, math.nan), (0, 3, 23, -math.inf)])
    _compare(core, ref, SMALL)
    assert core._stats[1] == 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(-1e4, 1e4), min_size=3, max_size=3), max_size=80))
def test_offline_scores_match_reference(rows: list[list[float]]) -> None:
    from twin.core.offline import score_table

    config = CoreConfig(warmup_samples=3, halflife_samples=5.0)
    got = score_table(np.array(rows, dtype=np.float64).reshape(-1, 3), ["a", "b", "c"], config)
    want = reference_scores(rows, config)
    assert list(got) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert all(0.0 <= s <= 1.0 for s in got)


def test_oee_formulas_follow_iso_22400() -> None:
    totals = np.array([1800e3, 3000e3, 3600e3, 50, 45, 0, 3600e3])
    k = oee_from_totals(totals, planned_cycle_s=30.0, has_good=True)
    assert k["availability"] == pytest.approx(0.6)  # APT / PBT
    assert k["effectiveness"] == pytest.approx(30 * 50 / 1800)  # planned run time per item × quantity / APT
    assert k["quality"] == pytest.approx(0.9)
    assert k["oee"] == pytest.approx(0.6 * 30 * 50 / 1800 * 0.9)
    assert k["utilization"] == pytest.approx(0.5)
    none = oee_from_totals(np.zeros(7), planned_cycle_s=math.nan, has_good=False)
    assert set(none.values()) == {None}


@settings(max_examples=400, deadline=None)
@given(
    mean=st.floats(1e-6, 1e6),
    var=st.floats(0.0, 1e6),
    offset=st.floats(-1e-9, 1e-9) | st.floats(-0.5, 0.5),
)
def test_combined_score_matches_reference_at_the_z_zero_boundary(mean: float, var: float, offset: float) -> None:
    """The kernel skips the cube root when the sum is clearly below the z = 0 point; the score must
    be the reference's exactly, also for sums a hair either side of that point."""
    from twin.core.kernels import combined_score
    from twin.core.reference import combined

    cfg = CoreConfig(warmup_samples=3)
    params = FleetCore(max_devices=1, channels_per_device=1, config=cfg)._params
    floor = 0.01 * mean
    spread = 2.0 / (9.0 * (2.0 * mean * mean / (var + floor * floor + 1e-12)))
    at_zero = mean * (1.0 - spread) ** 3 if spread < 1.0 else 0.0  # total where z = 0
    total = max(0.0, at_zero * (1.0 + offset))
    assert combined_score(total, mean, var, 10.0, params) == combined(total, mean, var, 10.0, cfg)
