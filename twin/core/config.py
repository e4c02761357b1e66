"""Configuration of the twin core: numba compile options and the core's typed settings.

numba options live here and only here (the stumpy habit): every kernel decorates itself with
``@njit(**NJIT_OPTIONS)``. ``FORGELINE_NUMBA_CACHE=0`` turns the on-disk cache off (for example on a
read-only install); ``NUMBA_DISABLE_JIT=1`` runs the kernels as plain Python, which is how coverage
of the kernel bodies is measured.

Examples:
    >>> CoreConfig().kpi_window_s
    3600
    >>> CoreConfig(event_on=0.4, event_off=0.6)
    Traceback (most recent call last):
    ...
    ValueError: event_off (0.6) must be below event_on (0.4): hysteresis needs a gap
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

# fastmath stays off: the kernels must match the pure-Python reference to the last bit where the
# maths allows it, and reassociation would make snapshot/restore comparisons flaky.
NJIT_OPTIONS: Final[dict[str, Any]] = {
    "cache": os.environ.get("FORGELINE_NUMBA_CACHE", "1") != "0",
    "nogil": True,
    "fastmath": False,
    "boundscheck": False,
    "error_model": "numpy",
}
# the small helpers of the hot path are inlined into the batch driver at numba IR level: a call to a
# separate numba function passes every array as a flattened struct (dozens of arguments) and keeps
# LLVM from seeing the loop as one piece
NJIT_INLINE: Final[dict[str, Any]] = {**NJIT_OPTIONS, "inline": "always"}

_MAX_BUCKET_S: Final = 7 * 86400
DETECTORS: Final[tuple[str, ...]] = ("zscore", "cusum", "ewma", "ensemble", "pca", "mewma")
MULTIVARIATE_DETECTORS: Final[tuple[str, ...]] = ("pca", "mewma")


@dataclass(frozen=True)
class WindowSpec:
    """A rolling window of ``length_s`` seconds kept as a ring of buckets of ``bucket_s`` seconds.

    The window ending at ``now`` covers the buckets whose start lies in ``(now - length_s, now]``
    aligned to the bucket size, so its start is exact to one bucket.
    """

    length_s: int
    bucket_s: int

    def __post_init__(self) -> None:
        if self.bucket_s <= 0 or self.length_s <= 0:
            raise ValueError(f"window {self.length_s}s / bucket {self.bucket_s}s: both must be positive")
        if self.bucket_s > _MAX_BUCKET_S:
            raise ValueError(f"bucket {self.bucket_s}s is too long: buckets hold int32 milliseconds (max 7 days)")
        if self.length_s % self.bucket_s:
            raise ValueError(f"window {self.length_s}s is not a multiple of its bucket {self.bucket_s}s")

    @property
    def n_buckets(self) -> int:
        # one spare bucket: the current, partly filled bucket plus the whole window behind it
        return self.length_s // self.bucket_s + 1


@dataclass(frozen=True)
class CoreConfig:
    """Settings of :class:`twin.core.FleetCore`. Defaults are the twin's defaults, not tuned per device.

    Utilization/OEE:
        windows: rolling windows (15 min, 1 h, 24 h by default).
        kpi_window_s: which window the plain KPI keys (``oee``, ``utilization`` …) report.
        shift_length_s, shift_origin_s: shifts are ``[origin + k·length, origin + (k+1)·length)`` in UTC.
        state_hold_s: a state holds until the next state sample (states may be sent on change
            only), but at most this long; time after that is unknown (neither producing nor busy).
        silence_s: the current state counts until the device's newest sample of any channel plus
            this long; a device silent for longer is in unknown state until it speaks again (the
            twin also feeds an OFFLINE state when a device's last will arrives).
        reorder_depth: out-of-order state samples newer than the last ``reorder_depth`` state samples
            of a device are put in their place exactly; older ones are counted as late and dropped.

    Anomaly detection:
        detector: ``zscore``, ``cusum``, ``ewma``, ``ensemble`` (max of zscore and ewma, the default)
            or the multivariate ``pca`` and ``mewma`` (see below).
        halflife_samples: memory of the baselines (exponentially weighted mean and variance).
        warmup_samples: samples per channel and regime before a score is given (score 0 until then).
        z_scale: the z-score that maps to a score of 0.5 (score = z² / (z² + z_scale²)).
        cusum_drift, cusum_scale: CUSUM allowance k (in σ) and the sum that maps to 0.5.
        learn_gate: channels scoring above this (and the device baseline, while one does or the
            device score is above it) learn ``gated_learn_factor`` times slower, so an incident
            does not become the new normal while it lasts.
        incident_adopt_s: ... but an incident lasts at most this long: once some channel of the
            device has been over the gate for this long without a break, the gate lets go and the
            baselines adopt a change that persists (without it, a channel whose baseline
            underestimated its spread, or that shifted for good, stayed "anomalous" forever).
        event_on, event_off, event_min_samples: hysteresis of anomaly events.

    Multivariate detector (``detector="pca"``; Hotelling's T² + Q on a PCA fitted per device):
        mv_warmup_samples: device ticks (rows) of the warm-up: the means, scales and correlation
            matrix of the device's detector channels are learned exactly over these ticks, then the
            principal axes and both control limits are fixed; the device score is 0 until then.
        mv_explained_variance: share of the (standardised) variance the principal subspace keeps.
        mv_p_value: coverage of the control limits (T²: χ² quantile with a finite-sample factor;
            Q: Jackson–Mudholkar).
        mv_smoothing: EWMA weight of the statistic max(T²/limit, Q/limit); collective anomalies
            persist, single spikes do not.
        mv_halflife_samples: after the warm-up the means follow slow drifts with this half-life,
            only while the smoothed statistic is below ``mv_learn_gate`` (share of the limit).

    Multivariate detector ``mewma`` (a MEWMA chart of per-channel AR(1) residuals; shares
    ``mv_warmup_samples``, ``mv_p_value``, ``mv_halflife_samples`` and ``mv_learn_gate``):
        mewma_lambda: EWMA weight of the residual vector (0.2: the textbook MEWMA weight for
            shifts of about one residual σ; ~9 ticks of memory).
        mewma_integrated_r2: a channel whose previous value explains at least this share of its
            warm-up variance (lag-1 autocorrelation φ with φ² >= this) is judged by its changes
            (φ = 1, differenced): its level is a slow drift the warm-up cannot know.
        mewma_stable_ticks: re-baselining after an alarm episode. The same chart restarted on the
            local level (an EWMA of the values with weight λ) judges whether the process is stable:
            in control for this many ticks in a row (30 ≈ three memories of the level; 0.8³⁰ =
            0.1 % of a level before the plateau is left in it). Also the ticks of settling after
            an adoption (the baseline follows the local level meanwhile).
        mewma_recede: an episode is over, and the stable level adopted as the new baseline, once
            the stable level's distance from the baseline (T² in the chart's units) is below this
            share of the episode's largest stable distance (0.25: the excursion has come back at
            least half way); that peak fades at ``mv_halflife_samples``.
        mewma_adopt_ticks: an episode this many ticks long adopts its stable level anyway (900 =
            the univariate ``incident_adopt_s`` at 1 Hz: a level held for 15 min is the new
            normal); 0 = never.
    """

    windows: tuple[WindowSpec, ...] = (WindowSpec(900, 60), WindowSpec(3600, 300), WindowSpec(86400, 3600))
    kpi_window_s: int = 3600
    shift_length_s: int = 8 * 3600
    shift_origin_s: int = 6 * 3600
    state_hold_s: int = 86400
    silence_s: int = 300
    reorder_depth: int = 8
    detector: str = "ensemble"
    halflife_samples: float = 600.0
    warmup_samples: int = 60
    z_scale: float = 4.0
    cusum_drift: float = 1.0
    cusum_scale: float = 20.0
    ewma_lambda: float = 0.1
    learn_gate: float = 0.5
    gated_learn_factor: float = 0.05
    incident_adopt_s: float = 900.0
    relative_noise_floor: float = 1e-4
    event_on: float = 0.8
    event_off: float = 0.5
    event_min_samples: int = 3
    build_history: int = 4096
    mv_warmup_samples: int = 400
    mv_explained_variance: float = 0.85
    mv_p_value: float = 0.999
    mv_smoothing: float = 0.1
    mv_halflife_samples: float = 2000.0
    mv_learn_gate: float = 0.5
    mewma_lambda: float = 0.2
    mewma_integrated_r2: float = 0.5
    mewma_stable_ticks: int = 30
    mewma_recede: float = 0.25
    mewma_adopt_ticks: int = 900

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; choose from {', '.join(DETECTORS)}")
        if not self.windows:
            raise ValueError("at least one rolling window is needed")
        if self.kpi_window_s not in {w.length_s for w in self.windows}:
            raise ValueError(f"kpi_window_s={self.kpi_window_s} is not one of the windows")
        if not 0.0 < self.event_off < self.event_on <= 1.0:
            if self.event_off >= self.event_on:
                raise ValueError(
                    f"event_off ({self.event_off}) must be below event_on ({self.event_on}): hysteresis needs a gap"
                )
            raise ValueError("event thresholds must lie in (0, 1]")
        if self.halflife_samples <= 1.0:
            raise ValueError("halflife_samples must be above 1")
        if self.warmup_samples < 2:
            raise ValueError("warmup_samples must be at least 2 (a variance needs two samples)")
        if self.silence_s <= 0:
            raise ValueError("silence_s must be positive")
        if self.state_hold_s <= 0 or not 0 < self.shift_length_s <= _MAX_BUCKET_S:
            raise ValueError("state_hold_s must be positive and shift_length_s in (0, 7 days]")
        if not 1 <= self.reorder_depth <= 64:
            raise ValueError("reorder_depth must be in 1..64")
        if self.z_scale <= 0 or self.cusum_scale <= 0 or self.cusum_drift < 0:
            raise ValueError("z_scale and cusum_scale must be positive, cusum_drift non-negative")
        if not 0 < self.ewma_lambda <= 1:
            raise ValueError("ewma_lambda must be in (0, 1]")
        if not 0 <= self.gated_learn_factor <= 1:
            raise ValueError("gated_learn_factor must be in [0, 1]")
        if not self.incident_adopt_s > 0:
            raise ValueError("incident_adopt_s must be positive")
        if self.mv_warmup_samples < 3:
            raise ValueError("mv_warmup_samples must be at least 3 (a correlation matrix needs them)")
        if not 0 < self.mv_explained_variance <= 1 or not 0.5 < self.mv_p_value < 1:
            raise ValueError("mv_explained_variance must be in (0, 1] and mv_p_value in (0.5, 1)")
        if not 0 < self.mv_smoothing <= 1 or self.mv_halflife_samples <= 1 or self.mv_learn_gate < 0:
            raise ValueError("mv_smoothing must be in (0, 1], mv_halflife_samples above 1, mv_learn_gate >= 0")
        if not 0 < self.mewma_lambda <= 1 or not 0 < self.mewma_integrated_r2 <= 1:
            raise ValueError("mewma_lambda and mewma_integrated_r2 must be in (0, 1]")
        if self.mewma_stable_ticks < 1 or not 0 <= self.mewma_recede <= 1 or self.mewma_adopt_ticks < 0:
            raise ValueError("mewma_stable_ticks must be at least 1, mewma_recede in [0, 1], mewma_adopt_ticks >= 0")

    @property
    def multivariate(self) -> bool:
        """Whether the device score comes from the multivariate detector (which needs its own state)."""
        return self.detector in MULTIVARIATE_DETECTORS

    @property
    def mv_alpha(self) -> float:
        """Weight of a tick in the slow update of the multivariate detector's means."""
        return float(1.0 - 0.5 ** (1.0 / self.mv_halflife_samples))

    @property
    def alpha(self) -> float:
        """Weight of a new sample in the exponentially weighted baselines (from the half-life)."""
        return float(1.0 - 0.5 ** (1.0 / self.halflife_samples))
