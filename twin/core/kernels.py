"""The numba kernels: one call processes a whole batch of samples for the whole fleet.

Three layers (the stumpy habit): :class:`twin.core.fleet.FleetCore` validates and prepares input;
``ingest_batch`` is the private driver; the small ``_helpers`` do one thing each. Only numpy
arrays and scalars cross into this module. ``twin/core/reference.py`` holds the slow, obviously
correct twin of each kernel, and the tests compare the two.

Timestamps are µs (int64) at the boundary; the state timeline and the rolling-window buckets
work in whole milliseconds, so every time sum is an exact integer whatever the arrival order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.core import cgutils
from numba.experimental import structref
from numba.extending import intrinsic

from twin.core.config import NJIT_INLINE, NJIT_OPTIONS
from twin.core.layout import (
    BV_BUSY_MS,
    BV_FIELDS,
    BV_GOOD,
    BV_KNOWN_MS,
    BV_PRODUCED,
    BV_PRODUCING_MS,
    BV_SCRAP,
    CH_CUSUM_NEG,
    CH_CUSUM_POS,
    CH_CUSUM_REGIME,
    CH_EWMA,
    CH_FIELDS,
    CH_LAST_T,
    CH_LAST_X,
    CH_Q,
    DET_CUSUM,
    DET_EWMA,
    DET_MEWMA,
    DET_MULTIVARIATE,
    DET_ZSCORE,
    DF_BASE_N,
    DF_COUNTER,
    DF_EVENT_PEAK,
    DF_HOT,
    DF_LAYER_PROGRESS,
    DF_MEAN,
    DF_N,
    DF_PEAK,
    DF_PLANNED_CYCLE_S,
    DF_SCORE,
    DF_SUM,
    DF_VAR,
    DI_COUNTER_T,
    DI_EVENT_ACTIVE,
    DI_EVENT_MASK,
    DI_EVENT_PENDING_T,
    DI_EVENT_RUN,
    DI_EVENT_START_T,
    DI_FIRST_STATE_MS,
    DI_HAS_GOOD,
    DI_HOT_SINCE,
    DI_LAST_SEEN_MS,
    DI_LAST_TICK_T,
    DI_LAYER_T,
    DI_STATE_COUNT,
    LV_BUCKET_MS,
    LV_COUNT,
    LV_OFFSET,
    LV_ORIGIN_MS,
    MA_EWMA,
    MA_LEVEL,
    MA_LOCAL,
    MA_PHI,
    MA_PREV,
    MA_SHIFT,
    MV_DISTANCE,
    MV_EPISODE,
    MV_K,
    MV_N,
    MV_PEAK,
    MV_QUIET,
    MV_SETTLE,
    MV_SMOOTH,
    MV_UCL_Q,
    MV_UCL_T2,
    N_STATES,
    P_ADOPT_US,
    P_ALPHA,
    P_CUSUM_CAP,
    P_CUSUM_DRIFT,
    P_CUSUM_SCALE,
    P_DETECTOR,
    P_EVENT_MIN,
    P_EVENT_OFF,
    P_EVENT_ON,
    P_EWMA_FACTOR,
    P_EWMA_LAMBDA,
    P_GATED_FACTOR,
    P_HISTORICAL,
    P_HOLD_MS,
    P_LEARN_GATE,
    P_MEWMA_ADOPT,
    P_MEWMA_LAMBDA,
    P_MEWMA_R2,
    P_MEWMA_RECEDE,
    P_MEWMA_STABLE,
    P_MV_ALPHA,
    P_MV_EXPLAINED,
    P_MV_GATE,
    P_MV_LAMBDA,
    P_MV_SCORE_BASE,
    P_MV_WARMUP,
    P_MV_Z,
    P_NULL_Q,
    P_Q_EVENT_OFF,
    P_Q_GATE,
    P_REL_FLOOR,
    P_WARMUP,
    P_Z_SCALE2,
    PLANNED_BUSY,
    PRODUCING_STATE,
    Q_CAP,
    REGIME_OF_STATE,
    REGIME_PRODUCING,
    ROLE_ANALOG,
    ROLE_GOOD,
    ROLE_LAYER_PROGRESS,
    ROLE_PRODUCED,
    ROLE_SCRAP,
    ROLE_STATE,
    ROLE_UNIT,
    ROLE_UNUSED,
    ST_ACCEPTED,
    ST_INDEX,
    ST_LATE,
    ST_MAX_T,
    ST_NONFINITE,
    ST_VALUE,
)

# The batch driver asks for the state of the sample PREFETCH_AHEAD places ahead while it works on
# this one: the random pattern touches a different device per sample (state far larger than the
# caches), the arrival pattern a new device per message.
PREFETCH_AHEAD = 64


# LLVM mangles the pointer type into an overloaded intrinsic's name: "p0" with opaque pointers (the
# LLVM 20+ of llvmlite >= 0.45), "p0i8" with typed ones (LLVM 14/15 of llvmlite <= 0.44, numba <= 0.61)
_PREFETCH_INTRINSIC = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 16 else "llvm.prefetch.p0i8"


def _prefetch_codegen(context, builder, signature, args):
    array = context.make_array(signature.args[0])(context, builder, args[0])
    index = context.cast(builder, args[1], signature.args[1], types.intp)
    address = builder.bitcast(builder.gep(array.data, [index]), ir.IntType(8).as_pointer())
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH_INTRINSIC)
    # read, keep in every cache level, data cache
    builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


if getattr(numba_config, "DISABLE_JIT", False):

    def prefetch(array: np.ndarray, index: int) -> None:
        """No-op when the kernels run as plain Python."""

else:

    @intrinsic
    def prefetch(typingctx, array, index):
        """Software prefetch of the cache line holding ``array.flat[index]`` (C-contiguous ``array``;
        a hint: never faults, loads nothing into a register). numba has no prefetch of its own."""
        if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
            return None
        return types.void(array, index), _prefetch_codegen


def _borrowed_codegen(context, builder, signature, args):
    array = context.make_array(signature.args[0])(context, builder, args[0])  # a copy of the struct
    array.meminfo = cgutils.get_null_value(array.meminfo.type)
    array.parent = cgutils.get_null_value(array.parent.type)
    return array._getvalue()


if getattr(numba_config, "DISABLE_JIT", False):

    def borrowed(array: np.ndarray) -> np.ndarray:
        """The array itself when the kernels run as plain Python."""
        return array

else:

    @intrinsic
    def borrowed(typingctx, array):
        """A view of ``array`` that holds no reference (no NRT meminfo): for the batch driver's
        arrays, which the caller keeps alive for the whole call.

        numba's IR inlining binds each array argument of an inlined helper to a new variable, and
        each binding is an atomic increment and decrement of the array's reference count. The hot
        loop inlines a dozen helpers; those locked instructions took a fifth of the driver's time
        (perf: NRT_incref/NRT_decref) and, being full barriers, kept the loop's loads from
        overlapping. On a borrowed view the count calls find no meminfo and return at once.
        """
        if not isinstance(array, types.Array):
            return None
        return array(array), _borrowed_codegen


LEARN_CLIP = 3.0
CALIBRATION_SLACK = 3.0  # how much hotter than calibrated a device's channel sum may run, see below
_REGIME_OF_STATE = np.array(REGIME_OF_STATE, dtype=np.int64)
_PLANNED_BUSY = np.array(PLANNED_BUSY, dtype=np.int64)
EARLIEST = -(2**63)  # before every int64 timestamp


# ================================================================================================
# Anomaly detection helpers
# ================================================================================================


@njit(**NJIT_INLINE)
def ew_update(mean: float, var: float, n: float, x: float, alpha: float, factor: float) -> tuple[float, float]:
    """One step of the exponentially weighted mean/variance (West 1979), exact mean while warming up.

    The weight of a new sample is ``max(alpha, 1/(n+1)) * factor``: the first samples average
    exactly, then the memory settles at the half-life the config asks for; ``factor`` < 1 slows
    learning down while the stream looks anomalous.
    """
    # max(alpha, 1/(n+1)) without a division once the warm-up average has handed over to alpha
    weight = (alpha if (n + 1.0) * alpha >= 1.0 else 1.0 / (n + 1.0)) * factor
    delta = x - mean
    return mean + weight * delta, (1.0 - weight) * (var + weight * delta * delta)


@njit(**NJIT_INLINE)
def score_of_q(q: float, z_scale2: float) -> float:
    """Map a statistic in z² units to [0, 1]: 0.5 at z = z_scale, rising smoothly towards 1."""
    return q / (q + z_scale2)


@njit(**NJIT_INLINE)
def channel_update(
    chan: np.ndarray,
    d: int,
    c: int,
    regime: int,
    x: float,
    gate: bool,
    detector: int,
    warmup: float,
    alpha: float,
    z_scale2: float,
    rel_floor: float,
    lam: float,
    ewma_factor: float,
    drift: float,
    cap: float,
    cusum_scale: float,
    q_gate: float,
    gated_factor: float,
) -> float:
    """:func:`channel_step` on ``chan[d, c]`` with the parameters already read (the batch driver
    reads them once per batch). Indexes the 3-d state directly: a row view per sample would cost a
    reference-count increment and decrement (atomic) each."""
    base = 3 * regime
    mean = chan[d, c, base]
    var = chan[d, c, base + 1]
    n = chan[d, c, base + 2]
    if chan[d, c, CH_CUSUM_REGIME] != regime:
        # a new regime: the sums and the fast mean belong to the old one
        chan[d, c, CH_CUSUM_POS] = 0.0
        chan[d, c, CH_CUSUM_NEG] = 0.0
        chan[d, c, CH_CUSUM_REGIME] = regime
        chan[d, c, CH_EWMA] = mean if n > 0 else x
    q = 0.0
    warm = n >= warmup
    learn_x = x
    if warm:
        deviation = x - mean
        floor = rel_floor * mean
        var_eff = var + floor * floor + 1e-12
        inv_var = 1.0 / var_eff
        if detector & DET_ZSCORE:
            q = deviation * deviation * inv_var
        if detector & DET_CUSUM:
            z = deviation / np.sqrt(var_eff)
            pos = min(max(0.0, chan[d, c, CH_CUSUM_POS] + z - drift), cap)
            neg = min(max(0.0, chan[d, c, CH_CUSUM_NEG] - z - drift), cap)
            chan[d, c, CH_CUSUM_POS] = pos
            chan[d, c, CH_CUSUM_NEG] = neg
            q = max(q, max(pos, neg) / cusum_scale * z_scale2)
        if detector & DET_EWMA:
            # EWMA control chart: the fast mean's distance from the baseline in units of its own
            # standard error, sensitive to small persistent shifts a single sample cannot show
            old_fast = chan[d, c, CH_EWMA]
            fast = old_fast + lam * (x - old_fast)
            chan[d, c, CH_EWMA] = fast
            shift = fast - mean
            q = max(q, shift * shift * inv_var * ewma_factor)
        q = min(q, Q_CAP)
        # Huber-style: learn at most LEARN_CLIP sigmas of a deviation, so a level shift is adopted
        # gradually and one wild sample cannot blow the variance up
        if deviation * deviation > LEARN_CLIP * LEARN_CLIP * var:  # rare: only then pay for the square root
            reach = LEARN_CLIP * np.sqrt(var)
            learn_x = min(max(x, mean - reach), mean + reach)
    else:
        old_fast = chan[d, c, CH_EWMA]
        chan[d, c, CH_EWMA] = old_fast + max(lam, 1.0 / (n + 1.0)) * (x - old_fast)
    factor = 1.0
    # score q / (q + z_scale²) > learn_gate, compared as a statistic: no division per sample
    if gate and warm and q > q_gate:
        factor = gated_factor  # an incident must not become the new normal while it lasts
    new_mean, new_var = ew_update(mean, var, n, learn_x, alpha, factor)
    chan[d, c, base] = new_mean
    chan[d, c, base + 1] = new_var
    chan[d, c, base + 2] = n + 1.0
    chan[d, c, CH_Q] = q
    return q


@njit(**NJIT_OPTIONS)
def channel_step(row: np.ndarray, regime: int, x: float, params: np.ndarray, gate: bool) -> float:
    """Score ``x`` against the channel's baseline for ``regime``, then learn it; return the new q
    (also stored in ``row[CH_Q]``). ``gate``: a sample over the learning gate learns slowly (False
    once the device's incident has lasted P_ADOPT_US: the change is adopted).

    ``row`` is one channel's 16 float64 fields (contiguous). Scoring comes first, so a sample never
    sees itself (no look-ahead). While a regime has fewer than ``warmup`` samples its statistic q is 0.
    """
    return channel_update(
        row.reshape((1, 1, row.shape[0])), 0, 0, regime, x, gate, int(params[P_DETECTOR]), params[P_WARMUP],
        params[P_ALPHA], params[P_Z_SCALE2], params[P_REL_FLOOR], params[P_EWMA_LAMBDA], params[P_EWMA_FACTOR],
        params[P_CUSUM_DRIFT], params[P_CUSUM_CAP], params[P_CUSUM_SCALE], params[P_Q_GATE], params[P_GATED_FACTOR],
    )  # fmt: skip


@njit(**NJIT_INLINE)
def combined_score(total: float, mean: float, var: float, n: float, params: np.ndarray) -> float:
    """Device score from the sum of channel statistics, allowing for correlated channels.

    Brown's method: the sum of correlated χ²-like terms is close to a scaled χ² whose degrees of
    freedom ``f = 2·mean²/var`` come from the sum's own learned mean and variance (correlated
    channels inflate the variance and so lower ``f``); the Wilson–Hilferty cube root turns it into
    a normal z, scored like a channel.
    """
    if n < params[P_WARMUP]:
        return 0.0
    floor = 0.01 * mean
    var_eff = var + floor * floor + 1e-12
    if mean <= 1e-12:
        return 0.0 if total <= 1e-9 else 1.0 - 1e-9
    dof = 2.0 * mean * mean / var_eff
    spread = 2.0 / (9.0 * dof)
    ratio = total / mean
    below = 1.0 - spread
    # z <= 0 (score 0) for about half the ticks of a quiet device: known without the cube root (a
    # libm call) when the ratio is clearly below below³ — 1e-12 relative keeps the rounding of
    # cbrt and of the cube far from deciding, so the score is the same as computing z
    if ratio < below * below * below * (1.0 - 1e-12):
        return 0.0
    z = (np.cbrt(ratio) - below) / np.sqrt(spread)
    if z <= 0.0:
        return 0.0
    return score_of_q(z * z, params[P_Z_SCALE2])


@njit(**NJIT_OPTIONS)
def strongest_channel_score(d: int, chan: np.ndarray, role: np.ndarray, mean_sum: float, params: np.ndarray) -> float:
    """The device's strongest unit channel as one of m tests: q = κ·q_max − 2·ln m, scored q / (q + z_scale²).

    Only per-unit measurements (ROLE_UNIT) take part: one value per independent unit, no dynamics,
    so their statistics are calibrated. Continuous channels are not (trends, transients after a
    state change, spreads a short warm-up underestimates: on SKAB and the simulated printers the
    test over all channels tripled the false alarms); for them the sum's self-calibrating test
    (Brown's method) decides alone.

    The sum of channel statistics (Brown's method) dilutes an incident on one channel among many
    (a 10 σ excursion on one of five channels scored 0.6, below event_on). The largest of m
    χ²₁-like statistics exceeds x about m times as often as one does, and a χ²₁ tail falls by e
    per 2 units of x, so subtracting 2·ln m keeps the false-alarm rate of one channel (Bonferroni).
    That reading needs calibrated statistics (mean P_NULL_Q per channel without anomalies). A
    device whose channels run far hotter (trends, spreads its warm-up underestimated: the learned
    mean of the sum, ``mean_sum``, says so) has q_max scaled down by
    κ = min(1, CALIBRATION_SLACK·m·P_NULL_Q / mean_sum)²: on SKAB, whose temperature channels drift
    all the time (sums 100× the calibrated one), the test then fades and Brown's self-calibrating
    one decides; a line whose incidents are frequent (sums 2–3× calibrated) keeps it.
    Called only while a channel is over the learning gate: quiet ticks do not pay for the scan.
    """
    q_max = 0.0
    m = 0  # the tests: unit channels
    m_all = 0  # every detector channel (the sum's terms)
    for c in range(role.shape[1]):
        r = role[d, c]
        if r == ROLE_UNIT:
            m += 1
            q_max = max(q_max, chan[d, c, CH_Q])
        if r in (ROLE_ANALOG, ROLE_UNIT):
            m_all += 1
    if m == 0:
        return 0.0
    tolerated = CALIBRATION_SLACK * m_all * params[P_NULL_Q]
    if mean_sum > tolerated:
        q_max *= (tolerated / mean_sum) ** 2
    q = q_max - 2.0 * np.log(m)
    return score_of_q(q, params[P_Z_SCALE2]) if q > 0.0 else 0.0


@njit(**NJIT_INLINE)
def device_tick(
    d: int,
    t_us: int,
    chan: np.ndarray,
    role: np.ndarray,
    devf: np.ndarray,
    devi: np.ndarray,
    params: np.ndarray,
    ev_device: np.ndarray,
    ev_phase: np.ndarray,
    ev_t: np.ndarray,
    ev_score: np.ndarray,
    ev_mask: np.ndarray,
    n_events: int,
    mv_score: float,
) -> int:
    """Close one device tick (its samples at one timestamp): combined score, baseline, hysteresis.

    ``mv_score`` is the multivariate detector's score of the tick, or NaN when the device score
    comes from the channel statistics (Brown's method).
    """
    n = devf[d, DF_N]
    if np.isnan(mv_score):
        total = max(devf[d, DF_SUM], 0.0)
        mean = devf[d, DF_MEAN]
        var = devf[d, DF_VAR]
        base_n = devf[d, DF_BASE_N]
        score = combined_score(total, mean, var, base_n, params)
        # A channel over the learning gate is evidence of an incident that does not depend on this
        # baseline: judged by the baseline alone, an incident in the device's first ticks became its
        # normal (a huge variance), later incidents then scored too low to close the gate and kept
        # the variance inflated through the clip at mean + 3 sd — the device never alarmed again.
        hot = devf[d, DF_HOT] > 0.0
        if base_n < params[P_WARMUP]:
            # the warm-up averages exactly, so it learns only from quiet ticks — unless the device
            # has had twice the warm-up's ticks: then hot channels are its normal (chronic, not an
            # incident) and every tick counts
            if not hot or n >= 2.0 * params[P_WARMUP]:
                new_mean, new_var = ew_update(mean, var, base_n, total, params[P_ALPHA], 1.0)
                devf[d, DF_MEAN] = new_mean
                devf[d, DF_VAR] = new_var
                devf[d, DF_BASE_N] = base_n + 1.0
        else:
            factor = 1.0
            adopted = hot and t_us - devi[d, DI_HOT_SINCE] >= params[P_ADOPT_US]
            if not adopted and (hot or score > params[P_LEARN_GATE]):
                factor = params[P_GATED_FACTOR]
            learn_total = min(total, mean + LEARN_CLIP * np.sqrt(var))
            new_mean, new_var = ew_update(mean, var, base_n, learn_total, params[P_ALPHA], factor)
            devf[d, DF_MEAN] = new_mean
            devf[d, DF_VAR] = new_var
            devf[d, DF_BASE_N] = base_n + 1.0
        if hot and devf[d, DF_BASE_N] >= params[P_WARMUP]:  # (κ needs the learned mean of the sum)
            score = max(score, strongest_channel_score(d, chan, role, devf[d, DF_MEAN], params))
        if n < params[P_WARMUP]:
            score = 0.0  # the documented warm-up: no device score before warmup ticks
    else:
        score = mv_score
    devf[d, DF_N] = n + 1.0
    devf[d, DF_SCORE] = score
    if score > devf[d, DF_PEAK]:
        devf[d, DF_PEAK] = score
    devi[d, DI_LAST_TICK_T] = t_us
    if params[P_HISTORICAL] != 0.0:
        return n_events
    # hysteresis: event_min consecutive ticks over event_on open an event, as many under
    # event_off close it, so one incident is one event however its score wobbles
    needed = int(params[P_EVENT_MIN])
    if devi[d, DI_EVENT_ACTIVE] == 0:
        if score >= params[P_EVENT_ON]:
            if devi[d, DI_EVENT_RUN] == 0:
                devi[d, DI_EVENT_PENDING_T] = t_us
            devi[d, DI_EVENT_RUN] += 1
            if devi[d, DI_EVENT_RUN] >= needed:
                mask = 0
                q_off = params[P_Q_EVENT_OFF]  # a channel score of at least event_off
                for c in range(min(chan.shape[1], 63)):
                    if chan[d, c, CH_Q] >= q_off:
                        mask |= 1 << c
                devi[d, DI_EVENT_ACTIVE] = 1
                devi[d, DI_EVENT_RUN] = 0
                devi[d, DI_EVENT_START_T] = devi[d, DI_EVENT_PENDING_T]
                devi[d, DI_EVENT_MASK] = mask
                devf[d, DF_EVENT_PEAK] = score
                ev_device[n_events] = d
                ev_phase[n_events] = 0
                ev_t[n_events] = devi[d, DI_EVENT_PENDING_T]
                ev_score[n_events] = score
                ev_mask[n_events] = mask
                n_events += 1
        else:
            devi[d, DI_EVENT_RUN] = 0
    else:
        if score > devf[d, DF_EVENT_PEAK]:
            devf[d, DF_EVENT_PEAK] = score
        if score < params[P_EVENT_OFF]:
            if devi[d, DI_EVENT_RUN] == 0:
                devi[d, DI_EVENT_PENDING_T] = t_us
            devi[d, DI_EVENT_RUN] += 1
            if devi[d, DI_EVENT_RUN] >= needed:
                devi[d, DI_EVENT_ACTIVE] = 0
                devi[d, DI_EVENT_RUN] = 0
                ev_device[n_events] = d
                ev_phase[n_events] = 1
                ev_t[n_events] = devi[d, DI_EVENT_PENDING_T]
                ev_score[n_events] = devf[d, DF_EVENT_PEAK]
                ev_mask[n_events] = devi[d, DI_EVENT_MASK]
                n_events += 1
        else:
            devi[d, DI_EVENT_RUN] = 0
    return n_events


# ================================================================================================
# Multivariate detector: PCA with Hotelling's T² and Q (SPE), fitted per device in a warm-up
# ================================================================================================


@njit(**NJIT_OPTIONS)
def chi2_quantile(dof: float, z: float) -> float:
    """Wilson–Hilferty: the χ² quantile with ``dof`` degrees of freedom at standard normal quantile z."""
    spread = 2.0 / (9.0 * dof)
    base = 1.0 - spread + z * np.sqrt(spread)
    return dof * base * base * base


@njit(**NJIT_OPTIONS)
def pca_fit(
    n: float, mean: np.ndarray, scale: np.ndarray, cov: np.ndarray, eig: np.ndarray, dev: np.ndarray, params: np.ndarray
) -> None:
    """End of the warm-up: co-moments -> scales, correlation matrix -> principal axes and limits.

    Slots with no variance (unused, constant or not a detector channel) get scale 0 and take no
    part. The axes overwrite the co-moments in ``cov`` (column j = axis j, by falling variance).
    T² limit: (n−1)(n+1)/(n(n−k)) × χ²_k quantile (the F-based limit of the SKAB T²+Q baseline
    with its F quantile approximated by χ²/k); Q limit: Jackson–Mudholkar from the residual
    eigenvalues, or Box's scaled χ² when Jackson–Mudholkar's h0 is not positive.
    """
    p = mean.shape[0]
    for i in range(p):
        var = cov[i, i] / (n - 1.0)
        scale[i] = np.sqrt(var) if var > 1e-300 and var * 1e24 > mean[i] * mean[i] else 0.0
    corr = np.zeros((p, p))
    for i in range(p):
        if scale[i] > 0.0:
            for j in range(p):
                if scale[j] > 0.0:
                    corr[i, j] = cov[i, j] / ((n - 1.0) * scale[i] * scale[j])
            corr[i, i] = 1.0
    values, vectors = np.linalg.eigh(corr)
    total = 0.0
    active = 0
    for i in range(p):
        eig[i] = max(values[p - 1 - i], 0.0)
        total += eig[i]
        if scale[i] > 0.0:
            active += 1
        for j in range(p):
            cov[j, i] = vectors[j, p - 1 - i]
    k = 0
    kept = 0.0
    while k < active and (k == 0 or kept < params[P_MV_EXPLAINED] * total) and eig[k] > 1e-12:
        kept += eig[k]
        k += 1
    z = params[P_MV_Z]
    dev[MV_K] = k
    dev[MV_UCL_T2] = 0.0
    if k > 0:
        dev[MV_UCL_T2] = (n - 1.0) * (n + 1.0) / (n * (n - k)) * chi2_quantile(float(k), z) if n > k else np.inf
    theta1 = 0.0
    theta2 = 0.0
    theta3 = 0.0
    for j in range(k, p):
        theta1 += eig[j]
        theta2 += eig[j] * eig[j]
        theta3 += eig[j] * eig[j] * eig[j]
    dev[MV_UCL_Q] = 0.0
    if theta1 > 1e-9:
        h0 = 1.0 - 2.0 * theta1 * theta3 / (3.0 * theta2 * theta2)
        if h0 > 1e-6:
            inner = 1.0 + z * h0 * np.sqrt(2.0 * theta2) / theta1 + theta2 * h0 * (h0 - 1.0) / (theta1 * theta1)
            dev[MV_UCL_Q] = theta1 * inner ** (1.0 / h0)
        else:
            dev[MV_UCL_Q] = theta2 / theta1 * chi2_quantile(theta1 * theta1 / theta2, z)


@njit(**NJIT_OPTIONS)
def pca_tick(
    role: np.ndarray,
    last: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    cov: np.ndarray,
    eig: np.ndarray,
    dev: np.ndarray,
    params: np.ndarray,
) -> float:
    """One device tick of the multivariate detector on the held values ``last``; returns the score.

    Warm-up (the first ``P_MV_WARMUP`` complete ticks, those where every detector channel has a
    value): exact running means and co-moments (Welford), score 0; then :func:`pca_fit`. After it:
    z = (x − mean) / scale; T² = Σ_j<k (axis_j·z)² / eig_j; Q = |z|² − Σ_j<k (axis_j·z)²; the
    statistic max(T²/limit, Q/limit) is smoothed (EWMA) to s and scored 1 − base**s, where base
    = 1 − event_on, so a smoothed statistic at its control limit scores event_on. The means then
    follow slow drifts, only while s is below the learning gate (no look-ahead, O(slots × k)).
    """
    p = last.shape[0]
    for i in range(p):
        if (role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT) and np.isnan(last[i]):
            return 0.0  # not every channel has spoken yet: no complete vector
    n = dev[MV_N]
    if n < params[P_MV_WARMUP]:
        n += 1.0
        inv_n = 1.0 / n
        for i in range(p):
            if role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT:
                # keep the pre-update deviation in eig (scratch until the fit) for the co-moments
                eig[i] = last[i] - mean[i]
                mean[i] += eig[i] * inv_n
        for i in range(p):
            if role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT:
                after = last[i] - mean[i]
                for j in range(p):
                    if role[j] == ROLE_ANALOG or role[j] == ROLE_UNIT:
                        cov[j, i] += eig[j] * after
        dev[MV_N] = n
        if n >= params[P_MV_WARMUP]:
            pca_fit(n, mean, scale, cov, eig, dev, params)
        return 0.0
    dev[MV_N] = n + 1.0
    k = int(dev[MV_K])
    norm2 = 0.0
    t2 = 0.0
    explained = 0.0
    for j in range(k):
        projection = 0.0
        for i in range(p):
            if scale[i] > 0.0:
                projection += cov[i, j] * ((last[i] - mean[i]) / scale[i])
        t2 += projection * projection / eig[j]
        explained += projection * projection
    for i in range(p):
        if scale[i] > 0.0:
            zi = (last[i] - mean[i]) / scale[i]
            norm2 += zi * zi
    ratio = 0.0
    if dev[MV_UCL_T2] > 0.0:
        ratio = t2 / dev[MV_UCL_T2]
    if dev[MV_UCL_Q] > 0.0:
        ratio = max(ratio, max(norm2 - explained, 0.0) / dev[MV_UCL_Q])
    ratio = min(ratio, Q_CAP)
    smooth = dev[MV_SMOOTH] + params[P_MV_LAMBDA] * (ratio - dev[MV_SMOOTH])
    dev[MV_SMOOTH] = smooth
    if smooth < params[P_MV_GATE]:
        alpha = params[P_MV_ALPHA]
        for i in range(p):
            if scale[i] > 0.0:
                mean[i] += alpha * (last[i] - mean[i])
    base = params[P_MV_SCORE_BASE]
    if base <= 0.0:
        return 1.0 if smooth > 0.0 else 0.0
    return 1.0 - base**smooth


@njit(**NJIT_OPTIONS)
def mewma_fit(
    n: float,
    mean: np.ndarray,
    scale: np.ndarray,
    cov: np.ndarray,
    eig: np.ndarray,
    dev: np.ndarray,
    aux: np.ndarray,
    lag: np.ndarray,
    active: np.ndarray,
    params: np.ndarray,
) -> None:
    """End of the MEWMA warm-up: sums of the shifted rows -> means, AR(1) coefficients, residual
    scales, the residual correlation's axes and the chart's limit.

    With y = x − shift (y of the first row is 0), m = Σy / n and x̃ = y − m: G = Σ x̃ x̃ᵀ over all
    rows, A = G − x̃₁x̃₁ᵀ and C = G − x̃ₙx̃ₙᵀ (rows 2..n and 1..n−1), B = Σ x̃_t x̃_{t−1}ᵀ. φ_i =
    B_ii / C_ii (least squares) clipped to [0, 1], and 1 when φ_i² >= ``P_MEWMA_R2``. The residual
    e_t = x̃_t − φ∘x̃_{t−1} has Σ_e = (A − BΦ − ΦBᵀ + ΦCΦ) / (n − 1); its correlation's eigenvalues
    above 1e−6 of the largest are kept (k directions); limit = χ²_k quantile × λ/(2−λ) (the
    steady-state covariance of the EWMA vector).
    """
    p = mean.shape[0]
    m = np.zeros(p)
    last = np.zeros(p)
    for i in range(p):
        if active[i]:
            m[i] = mean[i] / n
            last[i] = aux[i, MA_PREV] - aux[i, MA_SHIFT] - m[i]  # x̃ of the last row
    # the sums are turned into the centred moments in place: cov -> G, lag -> B
    for i in range(p):
        for j in range(p):
            if active[i] and active[j]:
                cov[i, j] -= n * m[i] * m[j]
                lag[i, j] += -mean[i] * m[j] - m[i] * (mean[j] - (last[j] + m[j])) + (n - 1.0) * m[i] * m[j]
    varies = np.zeros(p, dtype=np.bool_)
    for i in range(p):
        scale[i] = 0.0
        aux[i, MA_PHI] = 0.0
        aux[i, MA_EWMA] = 0.0
        aux[i, MA_LOCAL] = 0.0
        aux[i, MA_LEVEL] = aux[i, MA_PREV]  # the local level starts at the last warm-up row
        if not active[i]:
            mean[i] = 0.0
            continue
        centre = aux[i, MA_SHIFT] + m[i]
        var = cov[i, i] / (n - 1.0)
        mean[i] = centre
        if not (var > 1e-300 and var * 1e24 > centre * centre):
            continue  # constant in the warm-up: no part in the chart
        varies[i] = True
        before = cov[i, i] - last[i] * last[i]
        phi = lag[i, i] / before if before > 0.0 else 0.0
        phi = min(max(phi, 0.0), 1.0)
        if phi * phi >= params[P_MEWMA_R2]:
            phi = 1.0
        aux[i, MA_PHI] = phi
    # residual covariance (only the channels with a variance), then its scales
    sigma = np.zeros((p, p))
    for i in range(p):
        phi_i = aux[i, MA_PHI]
        for j in range(p):
            phi_j = aux[j, MA_PHI]
            if active[i] and active[j]:
                a = cov[i, j] - m[i] * m[j]  # rows 2..n (x̃₁ = −m)
                c = cov[i, j] - last[i] * last[j]  # rows 1..n−1
                sigma[i, j] = (a - lag[i, j] * phi_j - phi_i * lag[j, i] + phi_i * phi_j * c) / (n - 1.0)
    for i in range(p):
        # a channel whose residual has (next to) no variance, e.g. a perfect ramp, takes no part either
        if varies[i] and sigma[i, i] > 1e-12 * cov[i, i] / (n - 1.0):
            scale[i] = np.sqrt(sigma[i, i])
    corr = np.zeros((p, p))
    for i in range(p):
        if scale[i] > 0.0:
            for j in range(p):
                if scale[j] > 0.0:
                    corr[i, j] = sigma[i, j] / (scale[i] * scale[j])
            corr[i, i] = 1.0
    values, vectors = np.linalg.eigh(corr)
    for i in range(p):
        eig[i] = max(values[p - 1 - i], 0.0)
        for j in range(p):
            cov[j, i] = vectors[j, p - 1 - i]
    k = 0
    while k < p and eig[k] > 1e-6 * eig[0]:
        k += 1
    lam = params[P_MEWMA_LAMBDA]
    dev[MV_K] = k
    dev[MV_UCL_T2] = chi2_quantile(float(k), params[P_MV_Z]) * lam / (2.0 - lam) if k > 0 else 0.0
    dev[MV_UCL_Q] = 0.0
    dev[MV_SMOOTH] = 0.0
    dev[MV_QUIET] = 0.0
    dev[MV_DISTANCE] = 0.0
    dev[MV_PEAK] = 0.0
    dev[MV_EPISODE] = 0.0
    dev[MV_SETTLE] = 0.0


@njit(**NJIT_OPTIONS)
def mewma_t2(vector: np.ndarray, scale: np.ndarray, cov: np.ndarray, eig: np.ndarray, k: int, limit: float) -> float:
    """T² / limit of a residual-scale vector in the chart's metric: Σ_j<k (axis_j·(v/s))² / eig_j."""
    if limit <= 0.0:
        return 0.0
    t2 = 0.0
    for j in range(k):
        projection = 0.0
        for i in range(vector.shape[0]):
            if scale[i] > 0.0:
                projection += cov[i, j] * (vector[i] / scale[i])
        t2 += projection * projection / eig[j]
    return min(t2 / limit, Q_CAP)


@njit(**NJIT_OPTIONS)
def mewma_offset_t2(
    aux: np.ndarray, mean: np.ndarray, scale: np.ndarray, cov: np.ndarray, eig: np.ndarray, k: int, limit: float
) -> float:
    """T² / limit of the local level's offset from the baseline as the chart sees it in steady
    state, (1 − φ)(level − mean): the distance of a stable level from the baseline."""
    if limit <= 0.0:
        return 0.0
    t2 = 0.0
    for j in range(k):
        projection = 0.0
        for i in range(mean.shape[0]):
            if scale[i] > 0.0:
                projection += cov[i, j] * ((1.0 - aux[i, MA_PHI]) * (aux[i, MA_LEVEL] - mean[i]) / scale[i])
        t2 += projection * projection / eig[j]
    return min(t2 / limit, Q_CAP)


@njit(**NJIT_OPTIONS)
def mewma_tick(
    role: np.ndarray,
    last: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    cov: np.ndarray,
    eig: np.ndarray,
    dev: np.ndarray,
    aux: np.ndarray,
    lag: np.ndarray,
    params: np.ndarray,
) -> float:
    """One device tick of the ``mewma`` detector on the held values ``last``; returns the score.

    A MEWMA chart (Lowry et al. 1992) of per-channel AR(1) residuals (the residual chart for
    autocorrelated data): warm-up (the first ``P_MV_WARMUP`` complete ticks) accumulates the sums
    of the shifted rows, their products and their lag-1 products; then :func:`mewma_fit`. After it:
    e_i = (x_i − mean_i) − φ_i (x_prev,i − mean_i), Z = λe + (1−λ)Z, T² = Σ_j<k (axis_j·(Z/s))² /
    eig_j, r = T² / limit, score = 1 − base**r (base = 1 − event_on: r = 1 scores event_on). The
    means follow slow drifts while r is below the learning gate.

    Re-baselining after an episode (r ≥ 1 opens one): the same chart restarted on a local level
    (an EWMA of the values, weight λ) judges stability — the process is stable once that local
    chart has been in control for ``P_MEWMA_STABLE`` ticks. The local level's distance from the
    baseline (T²/limit of (1 − φ)(level − mean), the chart's steady state, smoothed with weight
    λ/4) is tracked; its largest stable value in the episode is the excursion's peak (fading at
    the drift half-life). Once stable and below ``P_MEWMA_RECEDE`` × peak (the excursion has come
    back most of the way), or stable after ``P_MEWMA_ADOPT`` episode ticks, the stable level is
    adopted: means = local level, the chart restarts at 0, and for ``P_MEWMA_STABLE`` ticks of
    settling the baseline follows the local level (the score is the local chart's). Receded but
    not yet stable, the score is the local chart's too (the fault is over, the process is judged
    by its changes until the new level can be adopted). O(slots × k)
    per tick after the warm-up (O(slots²) during it), no look-ahead.
    """
    p = last.shape[0]
    for i in range(p):
        if (role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT) and np.isnan(last[i]):
            return 0.0  # not every channel has spoken yet: no complete vector
    n = dev[MV_N]
    if n < params[P_MV_WARMUP]:
        for i in range(p):
            if role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT:
                if n == 0.0:
                    aux[i, MA_SHIFT] = last[i]
                    aux[i, MA_PREV] = last[i]
                eig[i] = last[i] - aux[i, MA_SHIFT]  # y of this row (eig is scratch until the fit)
                mean[i] += eig[i]
        for i in range(p):
            if role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT:
                for j in range(p):
                    if role[j] == ROLE_ANALOG or role[j] == ROLE_UNIT:
                        cov[i, j] += eig[i] * eig[j]
                        lag[i, j] += eig[i] * (aux[j, MA_PREV] - aux[j, MA_SHIFT])
        for i in range(p):
            if role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT:
                aux[i, MA_PREV] = last[i]
        n += 1.0
        dev[MV_N] = n
        if n >= params[P_MV_WARMUP]:
            active = np.zeros(p, dtype=np.bool_)
            for i in range(p):
                active[i] = role[i] == ROLE_ANALOG or role[i] == ROLE_UNIT
            mewma_fit(n, mean, scale, cov, eig, dev, aux, lag, active, params)
        return 0.0
    dev[MV_N] = n + 1.0
    lam = params[P_MEWMA_LAMBDA]
    for i in range(p):
        if scale[i] > 0.0:
            phi = aux[i, MA_PHI]
            residual = (last[i] - mean[i]) - phi * (aux[i, MA_PREV] - mean[i])
            aux[i, MA_EWMA] = lam * residual + (1.0 - lam) * aux[i, MA_EWMA]
            # the same chart restarted on the local level: it judges whether the process is stable
            level = aux[i, MA_LEVEL]
            local = (last[i] - level) - phi * (aux[i, MA_PREV] - level)
            aux[i, MA_LOCAL] = lam * local + (1.0 - lam) * aux[i, MA_LOCAL]
            aux[i, MA_LEVEL] = level + lam * (last[i] - level)
        aux[i, MA_PREV] = last[i]
    k = int(dev[MV_K])
    limit = dev[MV_UCL_T2]
    ratio = mewma_t2(aux[:, MA_EWMA], scale, cov, eig, k, limit)
    local_ratio = mewma_t2(aux[:, MA_LOCAL], scale, cov, eig, k, limit)
    quiet = dev[MV_QUIET] + 1.0 if local_ratio < 1.0 else 0.0
    dev[MV_QUIET] = quiet
    stable = quiet >= params[P_MEWMA_STABLE]
    if dev[MV_SETTLE] > 0.0:
        # settling after an adoption: the baseline is the local level, the chart the local chart
        dev[MV_SETTLE] -= 1.0
        for i in range(p):
            if scale[i] > 0.0:
                mean[i] = aux[i, MA_LEVEL]
                aux[i, MA_EWMA] = 0.0
        ratio = local_ratio
    else:
        # the local level's distance from the baseline, smoothed (weight λ/4, ~40 ticks) so that
        # the episode's peak is the level's and not a maximum of its noise
        distance = dev[MV_DISTANCE]
        distance += 0.25 * lam * (mewma_offset_t2(aux, mean, scale, cov, eig, k, limit) - distance)
        dev[MV_DISTANCE] = distance
        peak = dev[MV_PEAK] * (1.0 - params[P_MV_ALPHA])  # fades at the drift half-life
        episode = dev[MV_EPISODE]
        if ratio >= 1.0 or episode > 0.0:
            episode += 1.0  # an episode opens when the chart crosses its limit and counts its ticks
            if stable:
                peak = max(peak, distance)
            receded = distance < params[P_MEWMA_RECEDE] * peak
            adopt = params[P_MEWMA_ADOPT]
            if stable and (receded or (adopt > 0.0 and episode >= adopt)):
                # the excursion has receded (or lasted long) and the process is stable: the
                # remaining offset is the new normal, the chart restarts on it
                for i in range(p):
                    if scale[i] > 0.0:
                        mean[i] = aux[i, MA_LEVEL]
                        aux[i, MA_EWMA] = 0.0
                ratio = 0.0
                episode = 0.0
                dev[MV_SETTLE] = params[P_MEWMA_STABLE]
            elif stable:
                if ratio < 1.0:
                    episode = 0.0  # back in control by itself
            elif receded:
                ratio = local_ratio  # came back most of the way, not stable yet: judged by its changes
        dev[MV_PEAK] = peak
        dev[MV_EPISODE] = episode
    dev[MV_SMOOTH] = ratio
    if ratio < params[P_MV_GATE]:
        alpha = params[P_MV_ALPHA]
        for i in range(p):
            if scale[i] > 0.0:
                mean[i] += alpha * (last[i] - mean[i])
    base = params[P_MV_SCORE_BASE]
    if base <= 0.0:
        return 1.0 if ratio > 0.0 else 0.0
    return 1.0 - base**ratio


@njit(**NJIT_OPTIONS)
def multivariate_tick(
    d: int,
    role: np.ndarray,
    mv_last: np.ndarray,
    mv_mean: np.ndarray,
    mv_scale: np.ndarray,
    mv_cov: np.ndarray,
    mv_eig: np.ndarray,
    mv_dev: np.ndarray,
    mv_aux: np.ndarray,
    mv_lag: np.ndarray,
    params: np.ndarray,
) -> float:
    """The device score of the configured multivariate detector (``pca`` or ``mewma``) for device d."""
    if (int(params[P_DETECTOR]) & DET_MEWMA) != 0:
        return mewma_tick(
            role[d], mv_last[d], mv_mean[d], mv_scale[d], mv_cov[d], mv_eig[d], mv_dev[d], mv_aux[d], mv_lag[d], params
        )
    return pca_tick(role[d], mv_last[d], mv_mean[d], mv_scale[d], mv_cov[d], mv_eig[d], mv_dev[d], params)


# ================================================================================================
# Utilization / OEE helpers
# ================================================================================================


# lvc[level, LC_*] (int64, one per batch): the bucket the batch touched last on each level, so the
# samples of one bucket (nearly all of a batch) locate it with two compares instead of two divisions
LC_BUCKET = 0
LC_START = 1  # first ms of the bucket
LC_END = 2  # first ms after it
LC_SLOT = 3  # its slot in the bucket axis
LC_FIELDS = 4


@njit(**NJIT_INLINE)
def bucket_of(levels: np.ndarray, lvc: np.ndarray, lv: int, t_ms: int) -> int:
    """The bucket of level ``lv`` holding ``t_ms`` (the floor division, cached in ``lvc``)."""
    if lvc[lv, LC_START] <= t_ms < lvc[lv, LC_END]:
        return lvc[lv, LC_BUCKET]
    size = levels[lv, LV_BUCKET_MS]
    bucket = (t_ms - levels[lv, LV_ORIGIN_MS]) // size
    start = levels[lv, LV_ORIGIN_MS] + bucket * size
    lvc[lv, LC_BUCKET] = bucket
    lvc[lv, LC_START] = start
    lvc[lv, LC_END] = start + size
    lvc[lv, LC_SLOT] = levels[lv, LV_OFFSET] + bucket % levels[lv, LV_COUNT]
    return bucket


@njit(**NJIT_INLINE)
def bucket_of_passing(levels: np.ndarray, lvc: np.ndarray, lv: int, t_ms: int) -> int:
    """:func:`bucket_of` for a look-up that should not replace the cached bucket (the start of a
    state interval: an older bucket the next look-ups will not ask for again)."""
    if lvc[lv, LC_START] <= t_ms < lvc[lv, LC_END]:
        return lvc[lv, LC_BUCKET]
    return (t_ms - levels[lv, LV_ORIGIN_MS]) // levels[lv, LV_BUCKET_MS]


@njit(**NJIT_INLINE)
def slot_of(levels: np.ndarray, lvc: np.ndarray, lv: int, bucket: int) -> int:
    """The slot of ``bucket`` in level ``lv``'s ring of the bucket axis."""
    if bucket == lvc[lv, LC_BUCKET]:
        return lvc[lv, LC_SLOT]
    return levels[lv, LV_OFFSET] + bucket % levels[lv, LV_COUNT]


@njit(**NJIT_INLINE)
def reset_level_cache(lvc: np.ndarray) -> None:
    """Empty the bucket look-up cache (levels × LC_FIELDS) a batch starts with."""
    for lv in range(lvc.shape[0]):
        for f in range(LC_FIELDS):
            lvc[lv, f] = 0
        lvc[lv, LC_START] = 1  # an empty interval: the first look-up of each level divides


@njit(**NJIT_INLINE)
def bucket_add(
    bid: np.ndarray, bval: np.ndarray, d: int, levels: np.ndarray, lvc: np.ndarray, t_ms: int, field: int, amount: int
) -> None:
    """Add ``amount`` to ``field`` of the bucket holding ``t_ms`` on every level."""
    for lv in range(levels.shape[0]):
        bucket = bucket_of(levels, lvc, lv, t_ms)
        slot = slot_of(levels, lvc, lv, bucket)
        if bid[d, slot] != bucket:
            if bid[d, slot] > bucket:
                continue  # the ring moved on: that bucket is out of every window already
            bid[d, slot] = bucket
            for f in range(bval.shape[2]):
                bval[d, slot, f] = 0
        bval[d, slot, field] += amount


@njit(**NJIT_INLINE)
def attribute_interval(
    bid: np.ndarray,
    bval: np.ndarray,
    d: int,
    levels: np.ndarray,
    lvc: np.ndarray,
    start_ms: int,
    end_ms: int,
    state: int,
    sign: int,
    hold_ms: int,
) -> None:
    """Add (sign=+1) or take back (sign=-1) the time ``[start, end)`` spent in ``state``.

    A state holds for at most ``hold_ms`` after its sample; the rest of a longer gap is unknown
    time and is attributed to nothing.
    """
    end_ms = min(end_ms, start_ms + hold_ms)
    if end_ms <= start_ms:
        return
    producing = state == PRODUCING_STATE
    busy = _PLANNED_BUSY[state] == 1
    for lv in range(levels.shape[0]):
        if lvc[lv, LC_START] <= start_ms and end_ms <= lvc[lv, LC_END]:
            # the whole interval inside the level's cached bucket (a device's consecutive state
            # samples): what the loop below does for one bucket, without its look-ups and clamps
            overlap = (end_ms - start_ms) * sign
            credit_bucket(bid, bval, d, lvc[lv, LC_SLOT], lvc[lv, LC_BUCKET], overlap, busy, producing)
            continue
        size = levels[lv, LV_BUCKET_MS]
        origin = levels[lv, LV_ORIGIN_MS]
        count = levels[lv, LV_COUNT]
        # the end's bucket is the one the next samples ask for: it goes to the cache, the start's
        # (a device's previous state point, often minutes back) does not push it out
        first = bucket_of_passing(levels, lvc, lv, start_ms)
        last = bucket_of(levels, lvc, lv, end_ms - 1)
        # only the newest `count` buckets of the interval can still be in the ring
        first = max(first, last - count + 1)
        slot = slot_of(levels, lvc, lv, first)
        ring_end = levels[lv, LV_OFFSET] + count
        for bucket in range(first, last + 1):
            lo = max(start_ms, origin + bucket * size)
            hi = min(end_ms, origin + (bucket + 1) * size)
            credit_bucket(bid, bval, d, slot, bucket, (hi - lo) * sign, busy, producing)
            slot += 1  # the next bucket's slot, without a division
            if slot == ring_end:
                slot = levels[lv, LV_OFFSET]


@njit(**NJIT_INLINE)
def credit_bucket(
    bid: np.ndarray,
    bval: np.ndarray,
    d: int,
    slot: int,
    bucket: int,
    overlap: int,
    busy: bool,
    producing: bool,
) -> None:
    """Add ``overlap`` ms of a state to ``bucket`` (in ``slot`` of the ring); a slot holding an older
    bucket is emptied first, a slot already holding a newer one ignores it (out of every window)."""
    if bid[d, slot] != bucket:
        if bid[d, slot] > bucket:
            return
        bid[d, slot] = bucket
        for f in range(bval.shape[2]):
            bval[d, slot, f] = 0
    bval[d, slot, BV_KNOWN_MS] += overlap
    if busy:
        bval[d, slot, BV_BUSY_MS] += overlap
    if producing:
        bval[d, slot, BV_PRODUCING_MS] += overlap


@njit(**NJIT_INLINE)
def state_sample(
    d: int,
    t_ms: int,
    code: int,
    st_t: np.ndarray,
    st_code: np.ndarray,
    devi: np.ndarray,
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    lvc: np.ndarray,
    hold_ms: int,
) -> bool:
    """Put a state sample in its place in the device's reorder buffer; False if it is too late.

    The buffer keeps the newest ``depth`` state points in time order. A sample between two of them
    takes back the interval it splits and attributes the two halves; a sample older than a full
    buffer's oldest point cannot be placed exactly and is refused (counted as late).
    """
    depth = st_t.shape[1]
    count = devi[d, DI_STATE_COUNT]
    if count == 0:
        st_t[d, 0] = t_ms
        st_code[d, 0] = code
        devi[d, DI_STATE_COUNT] = 1
        devi[d, DI_FIRST_STATE_MS] = t_ms
        return True
    last = count - 1
    if t_ms > st_t[d, last]:
        attribute_interval(bid, bval, d, levels, lvc, st_t[d, last], t_ms, st_code[d, last], 1, hold_ms)
        if count == depth:
            for i in range(depth - 1):
                st_t[d, i] = st_t[d, i + 1]
                st_code[d, i] = st_code[d, i + 1]
            st_t[d, last] = t_ms
            st_code[d, last] = code
        else:
            st_t[d, count] = t_ms
            st_code[d, count] = code
            devi[d, DI_STATE_COUNT] = count + 1
        return True
    # not newer than the newest point: find the first point at or after t
    pos = 0
    while st_t[d, pos] < t_ms:
        pos += 1
    if st_t[d, pos] == t_ms:
        old = st_code[d, pos]
        if old != code:
            if pos < last:
                attribute_interval(bid, bval, d, levels, lvc, t_ms, st_t[d, pos + 1], old, -1, hold_ms)
                attribute_interval(bid, bval, d, levels, lvc, t_ms, st_t[d, pos + 1], code, 1, hold_ms)
            st_code[d, pos] = code
        return True
    if pos == 0:
        if count == depth:
            return False
        attribute_interval(bid, bval, d, levels, lvc, t_ms, st_t[d, 0], code, 1, hold_ms)
        devi[d, DI_FIRST_STATE_MS] = min(devi[d, DI_FIRST_STATE_MS], t_ms)
    else:
        before = st_code[d, pos - 1]
        attribute_interval(bid, bval, d, levels, lvc, st_t[d, pos - 1], st_t[d, pos], before, -1, hold_ms)
        attribute_interval(bid, bval, d, levels, lvc, st_t[d, pos - 1], t_ms, before, 1, hold_ms)
        attribute_interval(bid, bval, d, levels, lvc, t_ms, st_t[d, pos], code, 1, hold_ms)
    # insert at pos; a full buffer drops its oldest point
    if count == depth:
        for i in range(pos - 1):
            st_t[d, i] = st_t[d, i + 1]
            st_code[d, i] = st_code[d, i + 1]
        st_t[d, pos - 1] = t_ms
        st_code[d, pos - 1] = code
    else:
        for i in range(count, pos, -1):
            st_t[d, i] = st_t[d, i - 1]
            st_code[d, i] = st_code[d, i - 1]
        st_t[d, pos] = t_ms
        st_code[d, pos] = code
        devi[d, DI_STATE_COUNT] = count + 1
    return True


@njit(**NJIT_INLINE)
def counter_sample(
    d: int,
    which: int,
    t_ms: int,
    value: float,
    devf: np.ndarray,
    devi: np.ndarray,
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    lvc: np.ndarray,
    field: int,
) -> int:
    """A cumulative counter value: 0 accepted, 1 late (older than the last value), 2 invalid.

    The increment since the previous value goes to the bucket of this sample; a value below the
    previous one is a counter reset (agent restart), counted from zero. A late value's increment is
    already inside the newer cumulative value, so dropping it loses no units.
    """
    if value < 0.0:
        return 2
    last_t = devi[d, DI_COUNTER_T + which]
    if last_t == -1:
        devi[d, DI_COUNTER_T + which] = t_ms
        devf[d, DF_COUNTER + which] = value
        return 0
    if t_ms < last_t:
        return 1
    previous = devf[d, DF_COUNTER + which]
    if t_ms == last_t:
        return 0 if value == previous else 1
    increment = value - previous if value >= previous else value
    devi[d, DI_COUNTER_T + which] = t_ms
    devf[d, DF_COUNTER + which] = value
    amount = int(np.floor(increment + 0.5))
    if amount != 0:
        bucket_add(bid, bval, d, levels, lvc, t_ms, field, amount)
    return 0


# ================================================================================================
# The driver
# ================================================================================================


@njit(**NJIT_INLINE)
def prefetch_device(d: int, devf: np.ndarray, devi: np.ndarray, st_code: np.ndarray) -> None:
    """Prefetch the per-device state every sample of device ``d`` touches (besides its channel's row)."""
    prefetch(devf, d * devf.shape[1])
    prefetch(devf, d * devf.shape[1] + devf.shape[1] - 1)
    prefetch(devi, d * devi.shape[1])
    prefetch(devi, d * devi.shape[1] + devi.shape[1] - 1)
    prefetch(st_code, d * st_code.shape[1])


@njit(**NJIT_INLINE)
def prefetch_timeline(d: int, st_t: np.ndarray, bid: np.ndarray, bval: np.ndarray, lvc: np.ndarray) -> None:
    """Prefetch what a state or counter sample of device ``d`` touches: its state timeline and, on
    every level, the bucket the batch is in (where nearly all of its samples go)."""
    prefetch(st_t, d * st_t.shape[1])
    prefetch(st_t, d * st_t.shape[1] + st_t.shape[1] - 1)
    n_buckets = bid.shape[1]
    for lv in range(lvc.shape[0]):
        cell = d * n_buckets + lvc[lv, LC_SLOT]
        prefetch(bid, cell)
        prefetch(bval, cell * BV_FIELDS)
        prefetch(bval, cell * BV_FIELDS + BV_FIELDS - 1)


@njit(**NJIT_INLINE)  # into ingest_call: no call passing ~30 arrays as flattened structs
def ingest_batch(
    device: np.ndarray,
    channel: np.ndarray,
    t_us: np.ndarray,
    values: np.ndarray,
    role: np.ndarray,
    chan: np.ndarray,
    devf: np.ndarray,
    devi: np.ndarray,
    st_t: np.ndarray,
    st_code: np.ndarray,
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    params: np.ndarray,
    stats: np.ndarray,
    ev_device: np.ndarray,
    ev_phase: np.ndarray,
    ev_t: np.ndarray,
    ev_score: np.ndarray,
    ev_mask: np.ndarray,
    tick_scores: np.ndarray,
    mv_last: np.ndarray,
    mv_mean: np.ndarray,
    mv_scale: np.ndarray,
    mv_cov: np.ndarray,
    mv_eig: np.ndarray,
    mv_dev: np.ndarray,
    mv_aux: np.ndarray,
    mv_lag: np.ndarray,
    lvc: np.ndarray,
) -> int:
    """Process one batch; return the number of events written to the ``ev_*`` arrays.

    A device tick is a run of consecutive samples with the same device and timestamp; the combined
    device score is computed once per tick, after all its channels have been scored. When
    ``tick_scores`` has one slot per sample, each tick's device score is written at the index of
    the tick's last sample (offline scoring); pass an empty array otherwise. The ``mv_*`` arrays
    are the multivariate detector's state (zero-width when the detector is not ``pca`` or
    ``mewma``; ``mv_aux`` and ``mv_lag`` only for ``mewma``). ``lvc`` (levels × ``LC_FIELDS``
    int64) is scratch for the bucket look-ups, emptied here. A device index past the registered
    devices finds only ``ROLE_UNUSED`` slots and is counted as a bad index like one past the capacity.
    """
    detector = int(params[P_DETECTOR])
    multivariate = (detector & DET_MULTIVARIATE) != 0
    n = device.shape[0]
    record = tick_scores.shape[0] == n
    n_channels = role.shape[1]
    hold_ms = int(params[P_HOLD_MS])
    # the parameters, read once per batch
    warmup = params[P_WARMUP]
    alpha = params[P_ALPHA]
    z_scale2 = params[P_Z_SCALE2]
    rel_floor = params[P_REL_FLOOR]
    lam = params[P_EWMA_LAMBDA]
    ewma_factor = params[P_EWMA_FACTOR]
    drift = params[P_CUSUM_DRIFT]
    cap = params[P_CUSUM_CAP]
    cusum_scale = params[P_CUSUM_SCALE]
    q_gate = params[P_Q_GATE]
    gated_factor = params[P_GATED_FACTOR]
    adopt_us = params[P_ADOPT_US]
    n_devices = role.shape[0]  # the capacity; unregistered devices' slots are all ROLE_UNUSED
    reset_level_cache(lvc)
    prefetched = -1  # the device (and its highest channel) of the last prefetch, and of the role's
    prefetched_channel = -1
    prefetched_far = -1
    # counters in registers, written back once per batch (a counter in memory would chain every
    # sample to the previous one through a store and a load)
    n_accepted = 0
    n_index = 0
    n_nonfinite = 0
    n_late = 0
    n_value = 0
    max_t = stats[ST_MAX_T]
    tick_last = 0
    n_events = 0
    tick_device = -1
    tick_t = 0
    tick_scored = False
    # the (device, timestamp) group of the last valid sample; its device's channel-statistic sum and
    # hot-channel count live in g_sum and g_hot until the group ends (devf written back then)
    group_device = -1
    group_t = 0
    g_sum = 0.0
    g_hot = 0.0
    t_ms = 0
    regime = 0
    gate = True
    for i in range(n + 1):  # i == n closes the last tick
        if i < n:
            d = device[i]
            c = channel[i]
            t = t_us[i]
            # two stages: the role of a sample 2·PREFETCH_AHEAD ahead, then (its line in the cache by
            # now) whether the sample PREFETCH_AHEAD ahead is a state or counter sample that needs
            # the device's timeline and buckets too. A device's later ticks in a message revisit
            # channels already fetched (channel numbers do not rise): nothing to ask for then.
            far = i + 2 * PREFETCH_AHEAD
            if far < n:
                d_far = device[far]
                if d_far != prefetched_far and 0 <= d_far < n_devices:
                    prefetched_far = d_far
                    prefetch(role, d_far * n_channels)
            ahead = i + PREFETCH_AHEAD
            if ahead < n:
                d_ahead = device[ahead]
                c_ahead = channel[ahead]
                if d_ahead != prefetched:
                    prefetched = d_ahead
                    prefetched_channel = -1
                    if 0 <= d_ahead < n_devices:
                        prefetch_device(d_ahead, devf, devi, st_code)
                if c_ahead > prefetched_channel and 0 <= d_ahead < n_devices and c_ahead < n_channels:
                    prefetched_channel = c_ahead
                    cell = (d_ahead * n_channels + c_ahead) * CH_FIELDS  # the channel's two cache lines
                    prefetch(chan, cell)
                    prefetch(chan, cell + CH_FIELDS - 1)
                    if ROLE_STATE <= role[d_ahead, c_ahead] <= ROLE_SCRAP:
                        prefetch_timeline(d_ahead, st_t, bid, bval, lvc)
        else:
            d = -1
            c = -1
            t = 0
        if tick_device >= 0 and (d != tick_device or t != tick_t):
            if tick_scored:
                # the tick's device is the group's: its sums must be in devf for the tick
                devf[group_device, DF_SUM] = g_sum
                devf[group_device, DF_HOT] = g_hot
                mv_score = np.nan
                if multivariate:
                    mv_score = multivariate_tick(
                        tick_device, role, mv_last, mv_mean, mv_scale, mv_cov, mv_eig, mv_dev, mv_aux, mv_lag, params
                    )
                n_events = device_tick(
                    tick_device, tick_t, chan, role, devf, devi, params, ev_device, ev_phase, ev_t, ev_score, ev_mask,
                    n_events, mv_score,
                )  # fmt: skip
                if record:
                    tick_scores[tick_last] = devf[tick_device, DF_SCORE]
            tick_device = -1
            tick_scored = False
        if i == n:
            break
        if d < 0 or d >= n_devices or c < 0 or c >= n_channels:
            n_index += 1
            continue
        r = role[d, c]
        if r == ROLE_UNUSED:
            n_index += 1
            continue
        x = values[i]
        if not np.isfinite(x):
            n_nonfinite += 1
            continue
        if d != group_device or t != group_t:
            # once per (device, timestamp) group, not per sample: the newest times and the regime
            if group_device >= 0:
                devf[group_device, DF_SUM] = g_sum
                devf[group_device, DF_HOT] = g_hot
            group_device = d
            group_t = t
            g_sum = devf[d, DF_SUM]
            g_hot = devf[d, DF_HOT]
            t_ms = t // 1000
            if t > max_t:
                max_t = t
            if t_ms > devi[d, DI_LAST_SEEN_MS]:
                devi[d, DI_LAST_SEEN_MS] = t_ms
            regime = current_regime(d, st_code, devi)
            # the learning gate holds until the device's incident (a channel over the gate without
            # a break) has lasted adopt_us; a gate without an end latched channels for good
            gate = not (g_hot > 0.0 and t - devi[d, DI_HOT_SINCE] >= adopt_us)
        if r in (ROLE_ANALOG, ROLE_UNIT):
            last_t = chan[d, c, CH_LAST_T]
            if t < last_t:
                n_late += 1
                continue
            n_accepted += 1
            last_x = chan[d, c, CH_LAST_X]
            if t == last_t and x == last_x:
                continue  # a replayed duplicate: already learned
            # (another value at the same time is a new measurement: a station that completed
            # several units since its last report sends their values with one timestamp)
            chan[d, c, CH_LAST_T] = t
            chan[d, c, CH_LAST_X] = x
            unit = r == ROLE_UNIT
            # a unit's measurement has one baseline whatever the station does between units
            channel_regime = REGIME_PRODUCING if unit else regime
            # the device baseline learns only from ticks with a warmed-up channel, so the sum does
            # not jump when channels leave their warm-up
            warm = chan[d, c, 3 * channel_regime + 2] >= warmup
            if not (unit and x == last_x):  # a held unit value: the same unit, polled again
                old_q = chan[d, c, CH_Q]
                q = channel_update(
                    chan, d, c, channel_regime, x, gate, detector, warmup, alpha, z_scale2, rel_floor, lam,
                    ewma_factor, drift, cap, cusum_scale, q_gate, gated_factor,
                )  # fmt: skip
                g_sum += q - old_q
                if (q > q_gate) != (old_q > q_gate):  # the count of channels over the learning gate
                    if q > q_gate:
                        if g_hot == 0.0:
                            devi[d, DI_HOT_SINCE] = t  # an incident begins
                        g_hot += 1.0
                    else:
                        g_hot -= 1.0
            if multivariate:
                mv_last[d, c] = x
                warm = True  # the multivariate detector counts its own warm-up in complete ticks
            tick_device = d
            tick_t = t
            tick_last = i
            tick_scored = tick_scored or warm
        elif r == ROLE_STATE:
            if x < 0.0 or x >= N_STATES or x != np.floor(x):
                n_value += 1
                continue
            code = int(x)
            if state_sample(d, t_ms, code, st_t, st_code, devi, bid, bval, levels, lvc, hold_ms):
                n_accepted += 1
                regime = current_regime(d, st_code, devi)  # the rest of the group sees the new state
            else:
                n_late += 1
        elif ROLE_PRODUCED <= r <= ROLE_SCRAP:  # the three cumulative counters
            which = r - ROLE_PRODUCED
            field = BV_PRODUCED if r == ROLE_PRODUCED else BV_GOOD if r == ROLE_GOOD else BV_SCRAP
            outcome = counter_sample(d, which, t_ms, x, devf, devi, bid, bval, levels, lvc, field)
            if outcome == 0:
                n_accepted += 1
                if r == ROLE_GOOD:
                    devi[d, DI_HAS_GOOD] = 1
            elif outcome == 1:
                n_late += 1
            else:
                n_value += 1
        elif r == ROLE_LAYER_PROGRESS:
            if x < 0.0 or x > 1.0:
                n_value += 1
                continue
            n_accepted += 1
            if t >= devi[d, DI_LAYER_T]:
                devi[d, DI_LAYER_T] = t
                devf[d, DF_LAYER_PROGRESS] = x
        else:
            n_accepted += 1
    if group_device >= 0:
        devf[group_device, DF_SUM] = g_sum
        devf[group_device, DF_HOT] = g_hot
    stats[ST_ACCEPTED] += n_accepted
    stats[ST_NONFINITE] += n_nonfinite
    stats[ST_INDEX] += n_index
    stats[ST_LATE] += n_late
    stats[ST_VALUE] += n_value
    stats[ST_MAX_T] = max_t
    return n_events


@njit(**NJIT_INLINE)
def current_regime(d: int, st_code: np.ndarray, devi: np.ndarray) -> int:
    """The regime of the device's newest state point (rest when it has reported no state)."""
    count = devi[d, DI_STATE_COUNT]
    if count == 0:
        return 0
    return int(_REGIME_OF_STATE[st_code[d, count - 1]])


@njit(**NJIT_OPTIONS)
def batch_is_ordered(device: np.ndarray, t_us: np.ndarray, n_devices: int) -> bool:
    """True when every device's samples appear in non-decreasing time order (devices may interleave
    in any way); otherwise the wrapper sorts the batch by device and time before the kernel runs."""
    return batch_is_ordered_into(device, t_us, np.zeros((max(n_devices, 0), 2), dtype=np.int64), 1)


@njit(**NJIT_OPTIONS)
def batch_is_ordered_into(device: np.ndarray, t_us: np.ndarray, scratch: np.ndarray, generation: int) -> bool:
    """:func:`batch_is_ordered` with a kept per-device scratch (``scratch[d] = (generation, newest
    time)``, an entry of another generation is unset), so a batch costs no O(devices) fill: the
    caller passes a new ``generation`` (> 0, zeros = never) per batch. A run of one device's
    samples (a message) is checked in registers."""
    n_devices = scratch.shape[0]
    run_device = -1  # a valid device, or -1
    run_t = EARLIEST
    for i in range(device.shape[0]):
        d = device[i]
        t = t_us[i]
        if d == run_device and run_device >= 0:
            if t < run_t:
                return False
            run_t = t
        elif 0 <= d < n_devices:
            if run_device >= 0:
                scratch[run_device, 0] = generation
                scratch[run_device, 1] = run_t
            if scratch[d, 0] == generation and t < scratch[d, 1]:
                return False
            run_device = d
            run_t = t
    return True


# ================================================================================================
# The ingest entry: one argument for the whole state
# ================================================================================================

# Calling a numba function from Python costs ~35 ns per array argument (unboxing) plus the
# dispatcher's type look-up; ingest_batch takes ~30 arrays. CoreState holds them (and the call's
# scratch, counters and event buffers) behind one pointer, so FleetCore.ingest passes one state
# and the batch: ~0.3 µs per call instead of ~1.8 µs, which a 1000-sample message notices.
CORE_STATE_FIELDS = (
    "role", "chan", "devf", "devi", "st_t", "st_code", "bid", "bval", "levels", "params", "stats",
    "mv_last", "mv_mean", "mv_scale", "mv_cov", "mv_eig", "mv_dev", "mv_aux", "mv_lag",
    "order_scratch", "call", "level_cache",
    "ev_device", "ev_phase", "ev_t", "ev_score", "ev_mask",
)  # fmt: skip
# call: the last call's counts in ST_* order (ST_ACCEPTED .. ST_VALUE, read with one tolist), then
# the order check's generation
assert (ST_ACCEPTED, ST_NONFINITE, ST_INDEX, ST_LATE, ST_VALUE) == (0, 1, 2, 3, 4)  # FleetCore.ingest reads them so
CALL_GENERATION = ST_VALUE + 1
CALL_FIELDS = CALL_GENERATION + 1
# event buffers kept between calls up to this many samples; a larger batch gets its own for the
# call (one event per device tick at most, so the buffers need one slot per sample)
EVENT_BUFFER_KEEP = 1 << 16


@structref.register
class CoreStateType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(t)) for name, t in fields)


class CoreState(structref.StructRefProxy):
    """The arrays of one FleetCore as one numba argument (the fields of ``CORE_STATE_FIELDS``).
    It references the very arrays FleetCore holds: writes on either side are seen by the other;
    only the event buffers may be replaced inside :func:`ingest_call` (read them with
    :func:`core_events`)."""


structref.define_proxy(CoreState, CoreStateType, list(CORE_STATE_FIELDS))


@njit(**NJIT_OPTIONS)
def new_core_state(
    role: np.ndarray,
    chan: np.ndarray,
    devf: np.ndarray,
    devi: np.ndarray,
    st_t: np.ndarray,
    st_code: np.ndarray,
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    params: np.ndarray,
    stats: np.ndarray,
    mv_last: np.ndarray,
    mv_mean: np.ndarray,
    mv_scale: np.ndarray,
    mv_cov: np.ndarray,
    mv_eig: np.ndarray,
    mv_dev: np.ndarray,
    mv_aux: np.ndarray,
    mv_lag: np.ndarray,
    order_scratch: np.ndarray,
    call: np.ndarray,
    level_cache: np.ndarray,
    ev_device: np.ndarray,
    ev_phase: np.ndarray,
    ev_t: np.ndarray,
    ev_score: np.ndarray,
    ev_mask: np.ndarray,
) -> CoreState:
    """``CoreState(...)`` through a cached function (the proxy's own constructor compiles anew in
    every process, ~0.8 s)."""
    return CoreState(
        role, chan, devf, devi, st_t, st_code, bid, bval, levels, params, stats, mv_last, mv_mean, mv_scale,
        mv_cov, mv_eig, mv_dev, mv_aux, mv_lag, order_scratch, call, level_cache, ev_device, ev_phase, ev_t,
        ev_score, ev_mask,
    )  # fmt: skip


@njit(**NJIT_OPTIONS)
def ingest_call(
    state: Any,
    device: np.ndarray,
    channel: np.ndarray,
    t_us: np.ndarray,
    values: np.ndarray,
    tick_scores: np.ndarray,
    n_devices: int,
    historical: bool,
) -> int:
    """What FleetCore.ingest runs per batch: the order check, then :func:`ingest_batch` on the
    state's arrays. Returns the number of events (read them with :func:`core_events`), or -1 when
    the batch is not in time order per device (nothing done: the caller sorts and calls again).
    The call's counts go to ``state.call[:CALL_GENERATION]``."""
    call = state.call
    generation = call[CALL_GENERATION] + 1
    call[CALL_GENERATION] = generation
    if not batch_is_ordered_into(device, t_us, state.order_scratch[:n_devices], generation):
        return -1
    params = state.params
    params[P_HISTORICAL] = 1.0 if historical else 0.0
    stats = state.stats
    accepted = stats[ST_ACCEPTED]
    nonfinite = stats[ST_NONFINITE]
    index = stats[ST_INDEX]
    late = stats[ST_LATE]
    value = stats[ST_VALUE]
    n = device.shape[0]
    kept = state.ev_device.shape[0]
    if n > kept and n <= EVENT_BUFFER_KEEP:
        kept = max(n, 2 * kept)
        state.ev_device = np.empty(kept, dtype=np.int32)
        state.ev_phase = np.empty(kept, dtype=np.int8)
        state.ev_t = np.empty(kept, dtype=np.int64)
        state.ev_score = np.empty(kept, dtype=np.float64)
        state.ev_mask = np.empty(kept, dtype=np.int64)
    if n <= kept:
        ev_device = state.ev_device
        ev_phase = state.ev_phase
        ev_t = state.ev_t
        ev_score = state.ev_score
        ev_mask = state.ev_mask
    else:
        ev_device = np.empty(n, dtype=np.int32)
        ev_phase = np.empty(n, dtype=np.int8)
        ev_t = np.empty(n, dtype=np.int64)
        ev_score = np.empty(n, dtype=np.float64)
        ev_mask = np.empty(n, dtype=np.int64)
    # every array borrowed (no reference counting in the loop). Safe because each has an owner
    # for the whole call: the batch arrays are this call's arguments, the state's arrays belong to
    # `state` (an argument too: a FleetCore that grows meanwhile builds a new state and leaves this
    # one whole), and the event buffers are held by `state` or by the locals used after the call.
    n_events = ingest_batch(
        borrowed(device), borrowed(channel), borrowed(t_us), borrowed(values),
        borrowed(state.role), borrowed(state.chan), borrowed(state.devf), borrowed(state.devi),
        borrowed(state.st_t), borrowed(state.st_code), borrowed(state.bid), borrowed(state.bval),
        borrowed(state.levels), borrowed(params), borrowed(stats),
        borrowed(ev_device), borrowed(ev_phase), borrowed(ev_t), borrowed(ev_score), borrowed(ev_mask),
        borrowed(tick_scores),
        borrowed(state.mv_last), borrowed(state.mv_mean), borrowed(state.mv_scale), borrowed(state.mv_cov),
        borrowed(state.mv_eig), borrowed(state.mv_dev), borrowed(state.mv_aux), borrowed(state.mv_lag),
        borrowed(state.level_cache),
    )  # fmt: skip
    if n > kept:  # keep only the events of the large batch
        if n_events > kept:
            state.ev_device = ev_device[:n_events].copy()
            state.ev_phase = ev_phase[:n_events].copy()
            state.ev_t = ev_t[:n_events].copy()
            state.ev_score = ev_score[:n_events].copy()
            state.ev_mask = ev_mask[:n_events].copy()
        else:
            state.ev_device[:n_events] = ev_device[:n_events]
            state.ev_phase[:n_events] = ev_phase[:n_events]
            state.ev_t[:n_events] = ev_t[:n_events]
            state.ev_score[:n_events] = ev_score[:n_events]
            state.ev_mask[:n_events] = ev_mask[:n_events]
    call[ST_ACCEPTED] = stats[ST_ACCEPTED] - accepted
    call[ST_NONFINITE] = stats[ST_NONFINITE] - nonfinite
    call[ST_INDEX] = stats[ST_INDEX] - index
    call[ST_LATE] = stats[ST_LATE] - late
    call[ST_VALUE] = stats[ST_VALUE] - value
    return n_events


@njit(**NJIT_OPTIONS)
def core_events(state: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The event buffers of the last :func:`ingest_call` (its return value says how many are set)."""
    return state.ev_device, state.ev_phase, state.ev_t, state.ev_score, state.ev_mask


# ================================================================================================
# Queries
# ================================================================================================


@njit(**NJIT_INLINE)
def _row_totals(
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    level: int,
    now_ms: int,
    st_t: np.ndarray,
    st_code: np.ndarray,
    devi: np.ndarray,
    hold_ms: int,
    silence_ms: int,
    d: int,
    out: np.ndarray,
    i: int,
) -> None:
    size = levels[level, LV_BUCKET_MS]
    origin = levels[level, LV_ORIGIN_MS]
    count = levels[level, LV_COUNT]
    offset = levels[level, LV_OFFSET]
    current = (now_ms - origin) // size
    oldest = current - count + 1
    window_start = origin + oldest * size
    for f in range(out.shape[1]):
        out[i, f] = 0.0
    for k in range(count):
        slot = offset + k
        b = bid[d, slot]
        if oldest <= b <= current:
            for f in range(bval.shape[2]):
                out[i, f] += bval[d, slot, f]
    n_points = devi[d, DI_STATE_COUNT]
    if n_points == 0:
        return
    last_t = st_t[d, n_points - 1]
    state = st_code[d, n_points - 1]
    lo = max(last_t, window_start)
    hi = min(now_ms, last_t + hold_ms, max(devi[d, DI_LAST_SEEN_MS], last_t) + silence_ms)
    if hi > lo:
        out[i, BV_KNOWN_MS] += hi - lo
        if _PLANNED_BUSY[state] == 1:
            out[i, BV_BUSY_MS] += hi - lo
        if state == PRODUCING_STATE:
            out[i, BV_PRODUCING_MS] += hi - lo
    start = max(window_start, devi[d, DI_FIRST_STATE_MS])
    out[i, 6] = max(now_ms - start, 0)


@njit(**NJIT_OPTIONS)
def window_totals(
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    level: int,
    now_ms: int,
    st_t: np.ndarray,
    st_code: np.ndarray,
    devi: np.ndarray,
    hold_ms: int,
    silence_ms: int,
    rows: np.ndarray,
    out: np.ndarray,
) -> None:
    """Per device ``rows[i]``, in ``out[i]``: the bucket sums of one level's window ending at
    ``now_ms``, plus the still-open state interval ``[last state sample, now)``, and in ``out[i, 6]``
    the calendar time (ms) the window covers for that device (from the window start or the device's
    first state, if later).

    The window is the level's whole ring: the current bucket and the ``count - 1`` before it (for
    15 min in 1-min buckets: the current minute and the 15 before it, so it spans 15 to 16 min).
    """
    for i in range(rows.shape[0]):
        _row_totals(bid, bval, levels, level, now_ms, st_t, st_code, devi, hold_ms, silence_ms, rows[i], out, i)


# the columns of kpi_table's output (FleetCore.KPI_COLUMNS names them; the build's fill columns are
# set by FleetCore.kpi_table from its build records)
(KPI_UTILIZATION, KPI_AVAILABILITY, KPI_EFFECTIVENESS, KPI_QUALITY, KPI_OEE, KPI_CHAMBER_FILL,
 KPI_PACKING_DENSITY, KPI_FILL_REALISED, KPI_SCORE, KPI_STATE) = range(10)
KPI_FIELDS = 10


@njit(**NJIT_OPTIONS)
def kpi_table(
    bid: np.ndarray,
    bval: np.ndarray,
    levels: np.ndarray,
    level: int,
    now_ms: int,
    st_t: np.ndarray,
    st_code: np.ndarray,
    devi: np.ndarray,
    devf: np.ndarray,
    warm_n: np.ndarray,
    warm_min: float,
    hold_ms: int,
    silence_ms: int,
    rows: np.ndarray,
    totals: np.ndarray,
    out: np.ndarray,
) -> None:
    """The KPIs of devices ``rows[i]`` in ``out[i, KPI_*]`` (NaN where not defined; the fill columns
    NaN, the caller sets them from its build records), in one call: the
    window totals as :func:`window_totals`, then ISO 22400-2 as ``fleet.oee_from_totals``, the
    combined anomaly score once past warm-up (``warm_n[d] >= warm_min``) and the latest state code."""
    nan = np.nan
    for i in range(rows.shape[0]):
        d = rows[i]
        _row_totals(bid, bval, levels, level, now_ms, st_t, st_code, devi, hold_ms, silence_ms, d, totals, i)
        producing = totals[i, BV_PRODUCING_MS]
        busy = totals[i, BV_BUSY_MS]
        produced = totals[i, BV_PRODUCED]
        good = totals[i, BV_GOOD] if devi[d, DI_HAS_GOOD] == 1 else produced - totals[i, BV_SCRAP]
        calendar = totals[i, 6]
        utilization = producing / calendar if calendar > 0 else nan
        availability = producing / busy if busy > 0 else nan
        effectiveness = devf[d, DF_PLANNED_CYCLE_S] * 1000.0 * produced / producing if producing > 0 else nan
        quality = max(good, 0.0) / produced if produced > 0 else nan
        out[i, KPI_UTILIZATION] = utilization
        out[i, KPI_AVAILABILITY] = availability
        out[i, KPI_EFFECTIVENESS] = effectiveness
        out[i, KPI_QUALITY] = quality
        out[i, KPI_OEE] = availability * effectiveness * quality
        out[i, KPI_CHAMBER_FILL] = nan
        out[i, KPI_PACKING_DENSITY] = nan
        out[i, KPI_FILL_REALISED] = nan
        out[i, KPI_SCORE] = devf[d, DF_SCORE] if warm_n[d] >= warm_min else nan
        count = devi[d, DI_STATE_COUNT]
        out[i, KPI_STATE] = st_code[d, count - 1] if count > 0 else nan
