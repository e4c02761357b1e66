"""Where every number of the fleet state lives: field offsets, channel roles, regimes.

The state is a handful of numpy arrays (struct of arrays at the fleet level); the kernels index
them with the constants below, which numba folds in at compile time.

Per channel (``chan[device, slot, :]``, float64, 16 fields = 128 bytes = two cache lines): the
detector state of one channel. One device's channels follow each other, so the samples of one
MQTT message touch one contiguous block of ``channels × 128`` bytes, and a random sample touches
exactly the two cache lines of its channel (the array base is 64-byte aligned).
"""

from __future__ import annotations

from typing import Final

from forgeline.contract.vocabulary import DeviceState

# ---- channel roles (``role[device, slot]``, int8) --------------------------------------------
ROLE_UNUSED: Final = 0
ROLE_ANALOG: Final = 1  # feeds the anomaly detectors
ROLE_STATE: Final = 2  # DeviceState code, feeds utilization/OEE and the regime
ROLE_PRODUCED: Final = 3  # cumulative counters
ROLE_GOOD: Final = 4
ROLE_SCRAP: Final = 5
ROLE_LAYER_PROGRESS: Final = 6  # share of the build done, feeds fill_realised
ROLE_IGNORED: Final = 7  # 'layer' and other layer* channels: monotone by design, not scored
# A measurement of each unit a line station completes (feeds the detectors like ROLE_ANALOG). Its
# value changes once per unit and agents that poll a register repeat it until the next unit, so:
# a repeat of the last value is the same unit (accepted, neither scored nor learned again: learning
# it would weigh units by how long they are held, shrink the variance during stops and make the
# EWMA chart converge on any held value), and it has one baseline whatever the station's state (a
# station flips to idle between units, often in the very tick that reports the unit's values).
ROLE_UNIT: Final = 8

COUNTER_ROLES: Final = {"produced_total": ROLE_PRODUCED, "good_total": ROLE_GOOD, "scrap_total": ROLE_SCRAP}
# the catalog's per-unit measurements (forgeline/contract/vocabulary.py, oven-line stations); custom
# per-unit channels are named x_unit_*
UNIT_CHANNELS: Final = frozenset(
    {"magnetron_power", "cavity_temp_rise", "door_leakage", "hipot_current", "insulation_resistance", "cycle_time"}
)
DETECTOR_ROLES: Final = (ROLE_ANALOG, ROLE_UNIT)


def role_of_channel(name: str) -> int:
    """The role a channel name implies.

    >>> role_of_channel("state"), role_of_channel("nozzle_temp"), role_of_channel("layer")
    (2, 1, 7)
    >>> role_of_channel("cavity_temp_rise"), role_of_channel("x_unit_torque")
    (8, 8)
    """
    if name == "state":
        return ROLE_STATE
    if name in COUNTER_ROLES:
        return COUNTER_ROLES[name]
    if name == "layer_progress":
        return ROLE_LAYER_PROGRESS
    if name.startswith("layer"):
        return ROLE_IGNORED
    if name in UNIT_CHANNELS or name.startswith("x_unit_"):
        return ROLE_UNIT
    return ROLE_ANALOG


# ---- regimes: state-aware baselines ---------------------------------------------------------
# A heating printer is not a printing printer: each channel keeps one baseline per regime.
N_REGIMES: Final = 3
REGIME_REST: Final = 0  # offline, idle, paused, error, maintenance, or no state reported
REGIME_TRANSITION: Final = 1  # heating
REGIME_PRODUCING: Final = 2  # printing / producing
REGIME_OF_STATE: Final = tuple(
    REGIME_PRODUCING if s is DeviceState.PRINTING else REGIME_TRANSITION if s is DeviceState.HEATING else REGIME_REST
    for s in DeviceState
)
N_STATES: Final = len(DeviceState)
PRODUCING_STATE: Final = int(DeviceState.PRINTING)
PLANNED_BUSY: Final = tuple(1 if s.planned_busy else 0 for s in DeviceState)

# ---- per-channel fields: chan[device, slot, FIELD] (float64) -----------------------------------
# Regime r uses [3r] mean, [3r + 1] variance, [3r + 2] sample count.
CH_CUSUM_POS: Final = 9
CH_CUSUM_NEG: Final = 10
CH_CUSUM_REGIME: Final = 11  # the regime the CUSUM sums belong to (reset on a regime change)
CH_Q: Final = 12  # the channel's last statistic in z² units (its share of the device sum)
# last accepted value (NaN before the first): a sample is a replayed duplicate only when both its time
# and its value repeat, so several values at one timestamp (units measured within one tick) all count.
# (Field 13 held the channel score before the score was derived from CH_Q on read.)
CH_LAST_X: Final = 13
CH_LAST_T: Final = 14  # last accepted timestamp, µs (exact in float64 until the year 2255)
CH_EWMA: Final = 15  # fast exponentially weighted mean of the channel (EWMA control chart)
CH_FIELDS: Final = 16

# ---- per-device float fields: devf[device, FIELD] ----------------------------------------------
DF_SUM: Final = 0  # sum over channels of CH_Q
DF_MEAN: Final = 1  # baseline of DF_SUM
DF_VAR: Final = 2
DF_N: Final = 3
DF_SCORE: Final = 4  # combined device score of the last tick
DF_PEAK: Final = 5  # highest device score since the last read
DF_EVENT_PEAK: Final = 6
DF_PLANNED_CYCLE_S: Final = 7  # NaN when unknown
DF_COUNTER: Final = 8  # 8, 9, 10: last value of produced, good, scrap
DF_LAYER_PROGRESS: Final = 11
# detector channels whose statistic is over the learning gate now (kept up to date sample by sample,
# held values included): evidence of an incident that does not depend on the device baseline itself
DF_HOT: Final = 12
DF_BASE_N: Final = 13  # ticks the device baseline (DF_MEAN, DF_VAR) has learned from
DF_FIELDS: Final = 14

# ---- per-device integer fields: devi[device, FIELD] --------------------------------------------
DI_STATE_COUNT: Final = 0  # valid points in the state reorder buffer
DI_FIRST_STATE_MS: Final = 1
DI_COUNTER_T: Final = 2  # 2, 3, 4: time (ms) of the last value of produced, good, scrap; -1 = none
DI_HAS_GOOD: Final = 5
DI_LAYER_T: Final = 6  # time (µs) of the layer progress value; -1 = none
DI_EVENT_ACTIVE: Final = 7
DI_EVENT_RUN: Final = 8  # consecutive ticks across the threshold in force
DI_EVENT_PENDING_T: Final = 9  # µs of the first of those ticks
DI_EVENT_START_T: Final = 10
DI_EVENT_MASK: Final = 11  # channels (bit = slot) over event_off when the event started
DI_LAST_TICK_T: Final = 12
DI_LAST_SEEN_MS: Final = 13  # newest accepted sample of any channel
DI_HOT_SINCE: Final = 14  # µs since when some detector channel has been over the learning gate (DF_HOT > 0)
DI_FIELDS: Final = 15

# ---- rolling-window bucket fields: bval[device, bucket, FIELD] (int32; times in ms) -----------
BV_PRODUCING_MS: Final = 0
BV_BUSY_MS: Final = 1
BV_KNOWN_MS: Final = 2
BV_PRODUCED: Final = 3
BV_GOOD: Final = 4
BV_SCRAP: Final = 5
BV_FIELDS: Final = 6

# levels[level, FIELD] (int64): one row per rolling window and one for shifts
LV_OFFSET: Final = 0  # first bucket of the level in the bucket axis
LV_COUNT: Final = 1
LV_BUCKET_MS: Final = 2
LV_ORIGIN_MS: Final = 3
LV_FIELDS: Final = 4
SHIFT_BUCKETS: Final = 3  # current, previous and the one before

# ---- parameter vector: params[P] (float64) -----------------------------------------------------
P_ALPHA: Final = 0
P_WARMUP: Final = 1
P_Z_SCALE2: Final = 2
P_CUSUM_DRIFT: Final = 3
P_CUSUM_SCALE: Final = 4
P_CUSUM_CAP: Final = 5
P_LEARN_GATE: Final = 6
P_GATED_FACTOR: Final = 7
P_REL_FLOOR: Final = 8
P_EVENT_ON: Final = 9
P_EVENT_OFF: Final = 10
P_EVENT_MIN: Final = 11
P_HOLD_MS: Final = 12
P_DETECTOR: Final = 13  # bit mask of DETECTOR_BITS
P_HISTORICAL: Final = 14  # 1.0: replayed data, learns but opens/closes no events
P_SILENCE_MS: Final = 15
P_EWMA_LAMBDA: Final = 16
# the multivariate (PCA T² + Q) device detector
P_MV_WARMUP: Final = 17  # device ticks of the warm-up fit
P_MV_EXPLAINED: Final = 18  # share of the variance the principal subspace keeps
P_MV_Z: Final = 19  # standard normal quantile of the control limits' p value
P_MV_LAMBDA: Final = 20  # EWMA smoothing of the statistic (collective anomalies persist)
P_MV_ALPHA: Final = 21  # weight of a tick in the slow update of the means after the warm-up
P_MV_GATE: Final = 22  # the means learn only while the smoothed statistic is below this share of its limit
P_MV_SCORE_BASE: Final = 23  # 1 - event_on: score = 1 - base**s, so s = 1 (the control limit) scores event_on
P_EWMA_FACTOR: Final = 24  # (2 - lambda) / lambda: the EWMA chart's variance factor, once per batch
P_Q_GATE: Final = 25  # learn_gate as a statistic: score > learn_gate  <=>  q > P_Q_GATE
P_Q_EVENT_OFF: Final = 26  # event_off as a statistic (a channel takes part in an event)
# a channel over the learning gate for longer than this (µs, DI_HOT_SINCE) is the new normal: the gate lets go
P_ADOPT_US: Final = 27
P_NULL_Q: Final = 28  # mean channel statistic of a calibrated channel without anomalies (NULL_MEAN_Q)
# the multivariate EWMA (MEWMA) device detector on per-channel AR(1) residuals
P_MEWMA_LAMBDA: Final = 29  # EWMA weight of the residual vector
P_MEWMA_R2: Final = 30  # a channel whose previous value explains at least this share of its variance is differenced
P_MEWMA_STABLE: Final = 31  # ticks the chart around the local level must stay in control: the process is stable
P_MEWMA_RECEDE: Final = 32  # an episode is over once its stable distance is below this share of its peak
P_MEWMA_ADOPT: Final = 33  # an episode this many ticks long adopts its stable level anyway (0 = never)
P_FIELDS: Final = 34

DET_ZSCORE: Final = 1
DET_CUSUM: Final = 2
DET_EWMA: Final = 4
DET_PCA: Final = 8  # device score from the multivariate PCA T² + Q detector (channel scores: z-score)
DET_MEWMA: Final = 16  # device score from the MEWMA chart of AR(1) residuals (channel scores: z-score)
DET_MULTIVARIATE: Final = DET_PCA | DET_MEWMA
# a detector name -> the statistics it takes the maximum of
DETECTOR_CODES: Final = {
    "zscore": DET_ZSCORE,
    "cusum": DET_CUSUM,
    "ewma": DET_EWMA,
    "ensemble": DET_ZSCORE | DET_EWMA,
    "pca": DET_PCA | DET_ZSCORE,
    "mewma": DET_MEWMA | DET_ZSCORE,
}
# Mean statistic q of one channel on Gaussian noise after its warm-up, per detector (measured: 20k
# samples, N(0, 1), default settings): the strongest-channel test reads q_max against this.
NULL_MEAN_Q: Final = {"zscore": 1.0, "cusum": 0.2, "ewma": 1.0, "ensemble": 1.57, "pca": 1.0, "mewma": 1.0}
Q_CAP: Final = 1.0e6  # one broken channel must not swamp the device sum forever
NO_TIME: Final = -(2**62)

# ---- multivariate detector, per device: mv_dev[device, FIELD] (float64) ----------------------------
# (per slot: mv_last, mv_mean, mv_scale, mv_eig [device, slot]; mv_cov [device, slot, slot] holds the
# co-moments during the warm-up and the principal axes, one per column, after it)
MV_N: Final = 0  # complete ticks seen (the fit happens when it reaches P_MV_WARMUP)
MV_K: Final = 1  # principal components kept
MV_UCL_T2: Final = 2  # control limit of Hotelling's T² in the principal subspace
MV_UCL_Q: Final = 3  # control limit of Q (SPE) in the residual subspace; 0 = no residual subspace
MV_SMOOTH: Final = 4  # EWMA of max(T²/limit, Q/limit)
# ``mewma`` only (re-baselining after an episode): ticks the local chart has been in control, the
# smoothed distance of the local level from the baseline, the fading peak of its stable values in
# the open episode, ticks of the open episode (0 = none), ticks of settling left after an adoption
MV_QUIET: Final = 5
MV_DISTANCE: Final = 6
MV_PEAK: Final = 7
MV_EPISODE: Final = 8
MV_SETTLE: Final = 9
MV_FIELDS: Final = 10
# ``mewma`` uses the same arrays (mv_mean: Σ of the shifted rows during the warm-up, the means after;
# mv_scale: residual scales; mv_cov: Σ y yᵀ of the shifted rows, then the axes of the residual
# correlation; mv_eig: its eigenvalues; MV_K: directions kept, MV_UCL_T2: the limit of the chart's T²,
# MV_SMOOTH: T² / limit of the last tick) plus two of its own, zero-width for every other detector:
# mv_lag [device, slot, slot] (Σ y_t y_{t-1}ᵀ during the warm-up) and mv_aux [device, slot, MA_*]
MA_SHIFT: Final = 0  # the first complete row: the warm-up sums are of y = x - shift (no cancellation)
MA_PREV: Final = 1  # the previous complete tick's value
MA_PHI: Final = 2  # AR(1) coefficient (1 = the channel is differenced)
MA_EWMA: Final = 3  # the EWMA of the channel's residual
MA_LEVEL: Final = 4  # the local level: an EWMA (weight λ) of the channel's values
MA_LOCAL: Final = 5  # the EWMA of the channel's residual around its local level (the local chart)
MA_FIELDS: Final = 6

# ---- stats[S] (int64) ----------------------------------------------------------------------------
ST_ACCEPTED: Final = 0
ST_NONFINITE: Final = 1
ST_INDEX: Final = 2
ST_LATE: Final = 3
ST_VALUE: Final = 4  # a state code or counter that is not a valid value
ST_MAX_T: Final = 5  # newest accepted timestamp (µs), carried from batch to batch
ST_FIELDS: Final = 6
