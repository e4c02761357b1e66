"""The multivariate detector (``pca``: Hotelling's T² + Q) against its reference and on the fleet."""

from __future__ import annotations

import math

import numpy as np
import pytest
from core_support import rewrite_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.core import CoreConfig, FleetCore
from twin.core.detectors import MultivariateDetector
from twin.core.layout import MV_FIELDS, MV_K, MV_N, MV_UCL_Q, MV_UCL_T2
from twin.core.offline import score_table
from twin.core.reference import ReferenceFleet, reference_scores

T0 = 1_700_000_000_000_000
S = 1_000_000
SMALL = CoreConfig(detector="pca", mv_warmup_samples=40, mv_halflife_samples=30.0, mv_smoothing=0.3)


def _correlated_rows(n: int, seed: int, break_at: int | None = None) -> np.ndarray:
    """Three channels: two tied together, one independent; after ``break_at`` the tie flips sign
    (each channel's own distribution is unchanged, only their relation breaks)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(0.0, 1.0, n)
    rows = np.column_stack(
        [50.0 + common + 0.05 * rng.normal(size=n), 20.0 + common + 0.05 * rng.normal(size=n), rng.normal(size=n)]
    )
    if break_at is not None:
        rows[break_at:, 1] = 40.0 - rows[break_at:, 1]
    return rows


def test_kernel_matches_reference_on_correlated_data() -> None:
    rows = _correlated_rows(300, 0, break_at=200)
    got = score_table(rows, ["a", "b", "c"], SMALL)
    want = reference_scores(rows.tolist(), SMALL)
    assert list(got) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert max(want) > 0.9  # the reference is not trivially zero


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.lists(st.floats(-1e3, 1e3) | st.sampled_from([0.0, 1.0, 7.5]), min_size=3, max_size=3), max_size=60
    ),
    warmup=st.integers(3, 20),
)
def test_kernel_matches_reference_property(rows: list[list[float]], warmup: int) -> None:
    config = CoreConfig(detector="pca", mv_warmup_samples=warmup, mv_halflife_samples=5.0, mv_smoothing=0.5)
    got = score_table(np.array(rows, dtype=np.float64).reshape(-1, 3), ["a", "b", "c"], config)
    want = reference_scores(rows, config)
    assert list(got) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert all(0.0 <= s <= 1.0 and not math.isnan(s) for s in got)


def test_relation_break_is_seen_by_pca_not_by_single_channels() -> None:
    rows = _correlated_rows(400, 1, break_at=250)
    pca = score_table(rows, ["a", "b", "c"], SMALL)
    univariate = score_table(rows, ["a", "b", "c"], CoreConfig(detector="zscore", warmup_samples=40))
    assert pca[:40].max() == 0.0  # warm-up
    assert pca[60:250].max() < 0.8 < pca[260:].min()
    assert univariate[260:].mean() < 0.5  # each channel on its own still looks normal


def test_edge_cases_constant_missing_and_nonfinite() -> None:
    config = CoreConfig(detector="pca", mv_warmup_samples=10, event_min_samples=2)
    core = FleetCore(max_devices=2, channels_per_device=5, config=config)
    d = core.add_device("acme/s/a/p1", technology="FDM", channels=["state", "flat", "x", "y"])
    quiet = core.add_device("acme/s/a/p2", technology="FDM", channels=["x", "silent"])
    rng = np.random.default_rng(2)
    for i in range(30):
        values = [2.0, 5.0, rng.normal(), rng.normal()]  # state PRINTING, a constant channel
        core.ingest(np.full(4, d), np.arange(4), np.full(4, T0 + i * S), np.array(values))
        core.ingest(np.array([quiet]), np.array([0]), np.array([T0 + i * S]), np.array([rng.normal()]))
    assert core.mv_dev[d, MV_N] == 30 and core.mv_dev[d, MV_K] >= 1
    assert core.mv_scale[d, 1] == 0.0 and core.mv_scale[d, 0] == 0.0  # constant and state slots take no part
    assert math.isfinite(core.mv_dev[d, MV_UCL_T2]) and core.mv_dev[d, MV_UCL_Q] >= 0.0
    assert 0.0 <= core.kpis(d)["anomaly_score"] < 0.8  # type: ignore[operator]
    # a device whose second channel never speaks has no complete row: no warm-up, no score
    assert core.mv_dev[quiet, MV_N] == 0 and core.kpis(quiet)["anomaly_score"] is None
    stats = core.ingest(np.array([d, d]), np.array([2, 3]), np.array([T0 + 40 * S] * 2), np.array([np.nan, np.inf]))
    assert stats.rejected_nonfinite == 2
    # the constant channel moving is seen through the other slots only: it has no scale, no NaN
    core.ingest(np.full(2, d), np.array([1, 2]), np.full(2, T0 + 41 * S), np.array([9.0, 0.0]))
    assert not math.isnan(core.kpis(d)["anomaly_score"])  # type: ignore[arg-type]


def test_fleet_events_and_snapshot_with_pca() -> None:
    rows = _correlated_rows(400, 3, break_at=250)
    core = FleetCore(max_devices=1, channels_per_device=3, config=SMALL)
    d = core.add_device("acme/s/a/p1", technology="FDM", channels=["a", "b", "c"])

    def send(target: FleetCore, lo: int, hi: int) -> None:
        block = rows[lo:hi]
        t = T0 + np.repeat(np.arange(lo, hi), 3) * S
        target.ingest(np.zeros(block.size, np.int32), np.tile(np.arange(3, dtype=np.int32), hi - lo), t, block.ravel())

    send(core, 0, 200)
    restored = FleetCore.restore(core.snapshot())
    for name in FleetCore._ARRAYS:
        np.testing.assert_array_equal(getattr(restored, name), getattr(core, name))
    send(core, 200, 400)
    send(restored, 200, 400)
    assert restored.kpis(d) == core.kpis(d)
    events = core.drain_events()
    assert [e.phase for e in events][:1] == ["start"]
    assert 250 * S <= events[0].t_us - T0 <= 260 * S
    reference = ReferenceFleet([["a", "b", "c"]], SMALL)
    reference.ingest([(0, c, T0 + i * S, float(rows[i, c])) for i in range(400) for c in range(3)])
    assert [(e.phase, e.t_us) for e in events] == [(p, t) for _, p, t, _ in reference.events]


def test_multivariate_detector_contract() -> None:
    config = CoreConfig(mv_warmup_samples=30)
    detector = MultivariateDetector(3, config)
    rows = _correlated_rows(80, 4, break_at=60)
    for row in rows[:30]:
        assert detector.score_one(row) == 0.0
        detector.learn_one(row)
    first = detector.score_one(rows[40])
    assert detector.score_one(rows[40]) == first
    for row in rows[30:]:
        score = detector.score_one(row)
        assert 0.0 <= score <= 1.0
        detector.learn_one(row)
    assert detector.score_one(rows[-1]) > 0.8
    with pytest.raises(ValueError, match="expected 3 values"):
        detector.learn_one([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        detector.score_one([1.0, math.nan, 2.0])


def test_memory_only_when_multivariate() -> None:
    plain = FleetCore(max_devices=10, channels_per_device=20)
    pca = FleetCore(max_devices=10, channels_per_device=20, config=CoreConfig(detector="pca"))
    assert plain.mv_cov.size == 0
    # slots² co-moments/axes plus four slot vectors and the device fields, float64
    assert pca.state_bytes() - plain.state_bytes() == 10 * (20 * 20 + 4 * 20 + MV_FIELDS) * 8


def test_snapshot_without_multivariate_arrays_still_restores() -> None:
    """A snapshot written before the pca detector existed has no mv_* arrays; it restores exactly."""
    core = FleetCore(max_devices=1, channels_per_device=2)
    d = core.add_device("acme/s/a/p1", technology="FDM", channels=["x"])
    core.ingest(np.array([d]), np.array([0]), np.array([T0]), np.array([1.5]))
    blob = core.snapshot()
    old = rewrite_snapshot(blob, lambda arrays: {k: v for k, v in arrays.items() if not k.startswith("mv_")})
    restored = FleetCore.restore(old)
    assert restored.snapshot() == blob
