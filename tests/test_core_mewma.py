"""The ``mewma`` detector (MEWMA chart of per-channel AR(1) residuals) against its reference and on the fleet."""

from __future__ import annotations

import math

import numpy as np
import pytest
from core_support import rewrite_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_core_reference import SMALL as REF_SMALL
from test_core_reference import _feed as ref_feed
from test_core_reference import _fleets as ref_fleets
from test_core_reference import samples as ref_samples

from twin.core import CoreConfig, FleetCore
from twin.core.detectors import MultivariateDetector, StreamingDetector
from twin.core.layout import MA_LEVEL, MA_LOCAL, MA_PHI, MA_PREV, MV_K, MV_N, MV_UCL_T2
from twin.core.offline import score_table
from twin.core.reference import ReferenceFleet, reference_scores

T0 = 1_700_000_000_000_000
S = 1_000_000
SMALL = CoreConfig(detector="mewma", mv_warmup_samples=60, mv_halflife_samples=50.0)


def _plant(n: int, seed: int, shift_at: int | None = None, shift: float = 1.5) -> np.ndarray:
    """Three channels like a pump's: a slowly wandering temperature (a random walk, its previous
    value explains nearly all of it), a noisy flow, and a current tied to the flow. After
    ``shift_at`` the flow drops by ``shift`` of its σ (the current follows)."""
    rng = np.random.default_rng(seed)
    temperature = 60.0 + np.cumsum(rng.normal(0.0, 0.05, n))
    flow = 32.0 + rng.normal(0.0, 1.0, n)
    if shift_at is not None:
        flow[shift_at:] -= shift
    current = 2.0 + 0.05 * flow + rng.normal(0.0, 0.02, n)
    return np.column_stack([temperature, flow, current])


def _send(target: FleetCore, rows: np.ndarray, lo: int, hi: int) -> None:
    """Rows ``lo:hi`` of a three-channel plant to device 0, one tick per second."""
    block = rows[lo:hi]
    t = T0 + np.repeat(np.arange(lo, hi), 3) * S
    target.ingest(np.zeros(block.size, np.int32), np.tile(np.arange(3, dtype=np.int32), hi - lo), t, block.ravel())


def test_kernel_matches_reference_on_plant_data() -> None:
    rows = _plant(300, 0, shift_at=200)
    got = score_table(rows, ["t", "f", "c"], SMALL)
    want = reference_scores(rows.tolist(), SMALL)
    assert list(got) == pytest.approx(want, rel=1e-7, abs=1e-9)
    assert max(want) > 0.9  # the reference is not trivially zero


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.lists(st.floats(-1e3, 1e3) | st.sampled_from([0.0, 1.0, 7.5]), min_size=3, max_size=3), max_size=60
    ),
    warmup=st.integers(3, 20),
    stable=st.sampled_from([1, 3, 30]),
    recede=st.sampled_from([0.0, 0.25, 0.9]),
    adopt=st.sampled_from([0, 4, 900]),
)
def test_kernel_matches_reference_property(
    rows: list[list[float]], warmup: int, stable: int, recede: float, adopt: int
) -> None:
    """Random rows; short stable periods and adoption ticks drive the re-baselining branches too."""
    config = CoreConfig(
        detector="mewma",
        mv_warmup_samples=warmup,
        mv_halflife_samples=5.0,
        mewma_stable_ticks=stable,
        mewma_recede=recede,
        mewma_adopt_ticks=adopt,
    )
    got = score_table(np.array(rows, dtype=np.float64).reshape(-1, 3), ["a", "b", "c"], config)
    want = reference_scores(rows, config)
    assert list(got) == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert all(0.0 <= s <= 1.0 and not math.isnan(s) for s in got)


def test_fit_differences_the_slow_channel_only() -> None:
    core = FleetCore(max_devices=1, channels_per_device=3, config=SMALL)
    d = core.add_device("acme/s/a/pump", technology="line", channels=["t", "f", "c"])
    rows = _plant(80, 1)
    t = T0 + np.repeat(np.arange(80), 3) * S
    core.ingest(np.zeros(rows.size, np.int32), np.tile(np.arange(3, dtype=np.int32), 80), t, rows.ravel())
    assert core.mv_dev[d, MV_N] == 80 and core.mv_dev[d, MV_K] == 3
    phi = core.mv_aux[d, :, MA_PHI]
    assert phi[0] == 1.0  # the random walk is judged by its changes
    assert abs(phi[1]) < 0.4 and abs(phi[2]) < 0.4  # white noise keeps its level
    assert core.mv_dev[d, MV_UCL_T2] == pytest.approx(16.27 * 0.2 / 1.8, rel=0.02)  # χ²₃(0.999) · λ/(2−λ)


def test_drift_is_not_an_anomaly_but_a_small_shift_is() -> None:
    """The wandering temperature leaves its warm-up range: pca alarms on it nearly all the time,
    mewma (which judges that channel by its changes) at about its per-tick false-alarm rate
    (1 − mv_p_value = 0.1 %); a 2 σ drop of the flow is seen."""
    names = ["t", "f", "c"]
    quiet = _plant(1500, 2)
    shifted = _plant(1500, 2, shift_at=1000, shift=2.0)
    mewma = CoreConfig(detector="mewma", mv_warmup_samples=200)
    pca = CoreConfig(detector="pca", mv_warmup_samples=200)
    assert np.ptp(quiet[200:, 0]) > 3 * np.ptp(quiet[:200, 0])  # the drift leaves the warm-up's range
    quiet_mewma = score_table(quiet, names, mewma)
    assert (quiet_mewma[200:] >= 0.8).mean() < 0.005
    assert (score_table(quiet, names, pca)[200:] >= 0.8).mean() > 0.8
    shifted_mewma = score_table(shifted, names, mewma)
    assert (shifted_mewma[1020:] >= 0.8).mean() > 0.9
    assert shifted_mewma[:1000].tolist() == quiet_mewma[:1000].tolist()  # no look-ahead


def _excursion(n: int, seed: int, start: int, end: int, size: float, remainder: float) -> np.ndarray:
    """The plant with a collective anomaly: the flow drops by ``size`` σ from ``start`` to ``end`` and
    comes back only to ``remainder`` σ below its old level (SKAB's pump after a fault: the levels
    have moved on)."""
    rows = _plant(n, seed)
    drop = np.zeros(n)
    drop[start:end] = size
    drop[end:] = remainder
    rows[:, 1] -= drop
    rows[:, 2] -= 0.05 * drop  # the current follows the flow
    return rows


def test_rebaselines_after_an_excursion_recedes() -> None:
    """A 6 σ drop of the flow for 300 ticks, then back to 2 σ below the old level for good. Without
    re-baselining (recede 0, adoption never) the chart stays alarmed after the excursion; with the
    defaults it alarms through the excursion, and once the process has been stable for
    ``mewma_stable_ticks`` at a level nearer than half way, it adopts that level and is quiet."""
    names = ["t", "f", "c"]
    rows = _excursion(1400, 5, start=500, end=800, size=6.0, remainder=2.0)
    config = CoreConfig(detector="mewma", mv_warmup_samples=200)
    never = CoreConfig(detector="mewma", mv_warmup_samples=200, mewma_recede=0.0, mewma_adopt_ticks=0)
    scores = score_table(rows, names, config)
    plain = score_table(rows, names, never)
    assert (scores[510:800] >= 0.8).mean() > 0.95  # the excursion alarms throughout
    assert (plain[900:] >= 0.8).mean() > 0.8  # the moved-on level alarms for ever without re-baselining
    settled = 800 + config.mewma_stable_ticks + 30
    assert (scores[settled:] >= 0.8).mean() < 0.01  # re-baselined: quiet on the new level
    assert scores[:800].tolist() == plain[:800].tolist()  # nothing changes before the excursion is over
    assert list(scores) == pytest.approx(reference_scores(rows.tolist(), config), rel=1e-7, abs=1e-9)
    # a real anomaly on the new level still alarms: a second drop of 4 σ after the adoption
    again = rows.copy()
    again[1100:1250, 1] -= 4.0
    later = score_table(again, names, config)
    assert (later[1110:1250] >= 0.8).mean() > 0.95
    assert list(later) == pytest.approx(reference_scores(again.tolist(), config), rel=1e-7, abs=1e-9)


def test_a_sustained_fault_is_not_adopted_before_adopt_ticks() -> None:
    """A shift that does not recede (a valve left half closed) stays an anomaly until it has lasted
    ``mewma_adopt_ticks``; then the stable level is the new normal."""
    names = ["t", "f", "c"]
    rows = _excursion(1600, 6, start=300, end=1600, size=3.0, remainder=0.0)
    config = CoreConfig(detector="mewma", mv_warmup_samples=200, mewma_adopt_ticks=600)
    scores = score_table(rows, names, config)
    assert (scores[320:900] >= 0.8).mean() > 0.95
    assert (scores[1000:] >= 0.8).mean() < 0.01
    default = score_table(rows, names, CoreConfig(detector="mewma", mv_warmup_samples=200))
    assert (default[320:1150] >= 0.8).mean() > 0.95 and (default[1300:] >= 0.8).mean() < 0.01  # 900 ticks


def test_edge_cases_constant_missing_and_nonfinite() -> None:
    config = CoreConfig(detector="mewma", mv_warmup_samples=10, event_min_samples=2)
    core = FleetCore(max_devices=2, channels_per_device=5, config=config)
    d = core.add_device("acme/s/a/p1", technology="FDM", channels=["state", "flat", "x", "y"])
    quiet = core.add_device("acme/s/a/p2", technology="FDM", channels=["x", "silent"])
    rng = np.random.default_rng(2)
    for i in range(30):
        values = [2.0, 5.0, rng.normal(), rng.normal()]  # state PRINTING, a constant channel
        core.ingest(np.full(4, d), np.arange(4), np.full(4, T0 + i * S), np.array(values))
        core.ingest(np.array([quiet]), np.array([0]), np.array([T0 + i * S]), np.array([rng.normal()]))
    assert core.mv_dev[d, MV_N] == 30 and core.mv_dev[d, MV_K] == 2
    assert core.mv_scale[d, 1] == 0.0 and core.mv_scale[d, 0] == 0.0  # constant and state slots take no part
    assert 0.0 <= core.kpis(d)["anomaly_score"] < 0.8  # type: ignore[operator]
    assert core.mv_dev[quiet, MV_N] == 0 and core.kpis(quiet)["anomaly_score"] is None
    stats = core.ingest(np.array([d, d]), np.array([2, 3]), np.array([T0 + 40 * S] * 2), np.array([np.nan, np.inf]))
    assert stats.rejected_nonfinite == 2
    core.ingest(np.full(2, d), np.array([1, 2]), np.full(2, T0 + 41 * S), np.array([9.0, 0.0]))
    assert not math.isnan(core.kpis(d)["anomaly_score"])  # type: ignore[arg-type]


def test_fleet_events_and_snapshot_with_mewma() -> None:
    rows = _plant(400, 3, shift_at=250, shift=3.0)
    core = FleetCore(max_devices=1, channels_per_device=3, config=SMALL)
    d = core.add_device("acme/s/a/p1", technology="FDM", channels=["t", "f", "c"])

    _send(core, rows, 0, 200)
    restored = FleetCore.restore(core.snapshot())
    for name in FleetCore._ARRAYS:
        np.testing.assert_array_equal(getattr(restored, name), getattr(core, name))
    _send(core, rows, 200, 400)
    _send(restored, rows, 200, 400)
    assert restored.kpis(d) == core.kpis(d)
    events = core.drain_events()
    assert [e.phase for e in events][:1] == ["start"]
    assert 250 * S <= events[0].t_us - T0 <= 262 * S
    reference = ReferenceFleet([["t", "f", "c"]], SMALL)
    reference.ingest([(0, c, T0 + i * S, float(rows[i, c])) for i in range(400) for c in range(3)])
    assert [(e.phase, e.t_us) for e in events] == [(p, t) for _, p, t, _ in reference.events]


def test_snapshot_from_before_the_rebaselining_fields_restores() -> None:
    """A mewma snapshot written before the re-baselining fields existed (5 device fields, 4 per
    channel) restores: the old fields as they were, no episode open, the local level at the last
    complete row (as the fit leaves it), and the restored core keeps scoring."""
    rows = _plant(400, 5, shift_at=300, shift=4.0)
    core = FleetCore(max_devices=1, channels_per_device=3, config=SMALL)
    d = core.add_device("acme/s/a/p1", technology="FDM", channels=["t", "f", "c"])

    _send(core, rows, 0, 200)
    assert core.mv_dev[d, MV_K] > 0  # fitted
    old = rewrite_snapshot(core.snapshot(), lambda arrays: {
        **arrays, "mv_dev": arrays["mv_dev"][:, :5], "mv_aux": arrays["mv_aux"][:, :, :4]})
    restored = FleetCore.restore(old)
    np.testing.assert_array_equal(restored.mv_dev[d, :5], core.mv_dev[d, :5])
    assert not restored.mv_dev[d, 5:].any()  # no episode open
    np.testing.assert_array_equal(restored.mv_aux[d, :, :4], core.mv_aux[d, :, :4])
    np.testing.assert_array_equal(restored.mv_aux[d, :, MA_LEVEL], core.mv_aux[d, :, MA_PREV])
    assert not restored.mv_aux[d, :, MA_LOCAL].any()
    _send(restored, rows, 200, 400)
    assert restored.drain_events()[0].phase == "start"  # the flow drop at row 300 still alarms
    assert restored.kpis(d)["anomaly_score"] > 0.8  # type: ignore[operator]


def test_multivariate_detector_contract() -> None:
    detector = MultivariateDetector(3, CoreConfig(mv_warmup_samples=50), name="mewma")
    rows = _plant(120, 4, shift_at=90, shift=4.0)
    for row in rows[:50]:
        assert detector.score_one(row) == 0.0
        detector.learn_one(row)
    first = detector.score_one(rows[60])
    assert detector.score_one(rows[60]) == first
    for row in rows[50:]:
        assert 0.0 <= detector.score_one(row) <= 1.0
        detector.learn_one(row)
    assert detector.score_one(rows[-1]) > 0.8
    assert MultivariateDetector(2, CoreConfig(detector="mewma")).config.detector == "mewma"
    assert StreamingDetector("mewma").config.detector == "mewma"
    with pytest.raises(ValueError, match="not a multivariate detector"):
        MultivariateDetector(2, name="ewma")


def test_memory_only_when_mewma() -> None:
    plain = FleetCore(max_devices=10, channels_per_device=20)
    pca = FleetCore(max_devices=10, channels_per_device=20, config=CoreConfig(detector="pca"))
    mewma = FleetCore(max_devices=10, channels_per_device=20, config=CoreConfig(detector="mewma"))
    assert pca.mv_lag.size == 0 and pca.mv_aux.size == 0
    # pca's state plus slots² lag co-moments and six values per slot, float64
    assert mewma.state_bytes() - pca.state_bytes() == 10 * (20 * 20 + 6 * 20) * 8
    assert plain.state_bytes() < pca.state_bytes()


value = st.floats(-50, 50) | st.sampled_from([0.0, 1.0, math.nan])
rows = st.lists(st.tuples(value, value, value), min_size=6, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows0=rows, rows1=rows, junk=ref_samples, cut=st.integers(0, 80))
def test_fleet_matches_reference_fleet(
    rows0: list[tuple[float, float, float]],
    rows1: list[tuple[float, float, float]],
    junk: list[tuple[int, int, int, float]],
    cut: int,
) -> None:
    """Two devices of the reference suite (state, counters, three analog channels), rows of the analog
    channels with NaN among them, mixed with the suite's junk (unknown slots, NaN/inf, state codes,
    late and out-of-order samples), fed in two batches; a warm-up short enough to fit and score."""
    config = CoreConfig(**{**REF_SMALL.__dict__, "detector": "mewma", "mv_warmup_samples": 4})
    core, ref = ref_fleets(config)
    analog = [1, 2, 7]  # nozzle_temp, bed_temp, x_vib
    batch = [(d, analog[c], 2 * i, row[c]) for d, table in ((0, rows0), (1, rows1)) for i, row in enumerate(table)
             for c in range(3)]  # fmt: skip
    batch = sorted(batch + junk, key=lambda s: (s[2], s[0], s[1]))
    for part in (batch[:cut], batch[cut:]):
        ref_feed(core, ref, part)
        for d in range(2):
            model = ref.devices[d].pca
            assert core.mv_dev[d, MV_N] == (model.n if model is not None else 0)
            assert float(core.devf[d, 4]) == pytest.approx(ref.device_score(d), rel=1e-6, abs=1e-9)
        events = [(e.device, e.phase, e.t_us) for e in core.drain_events()]
        assert events == [(d, p, t) for d, p, t, _ in ref.events]
        ref.events.clear()
    for d, table in ((0, rows0), (1, rows1)):
        # every row after the first complete one is a tick: six complete rows are past the warm-up
        if sum(not any(math.isnan(v) for v in row) for row in table) >= 6:
            assert core.mv_dev[d, MV_N] >= 6
