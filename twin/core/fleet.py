"""FleetCore: the public, validating layer over the numba kernels.

Examples:
    >>> import numpy as np
    >>> core = FleetCore(max_devices=4, channels_per_device=4)
    >>> d = core.add_device("acme/berlin/hall1/p1", technology="FDM", channels=["state", "nozzle_temp"])
    >>> core.channel_index(d, "nozzle_temp")
    1
    >>> t = np.arange(3, dtype=np.int64) * 1_000_000 + 1_700_000_000_000_000
    >>> stats = core.ingest(np.zeros(3, np.int32), np.ones(3, np.int32), t, np.array([210.0, 211.0, np.nan]))
    >>> stats.accepted, stats.rejected_nonfinite
    (2, 1)
"""

from __future__ import annotations

import io
import json
import math
import mmap
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from types import SimpleNamespace
from typing import Any, Literal

import numba
import numpy as np
from numba import config as numba_config

from forgeline.contract.vocabulary import DeviceState, Technology
from twin.core import kernels
from twin.core.config import CoreConfig, WindowSpec
from twin.core.fill import (
    BuildError,
    BuildRecord,
    bed_volume_used,
    mean_fill,
    packing_density,
    planned_fill,
    realised_fill,
)
from twin.core.layout import (
    BV_BUSY_MS,
    BV_FIELDS,
    BV_GOOD,
    BV_PRODUCED,
    BV_PRODUCING_MS,
    BV_SCRAP,
    CH_CUSUM_REGIME,
    CH_FIELDS,
    CH_LAST_T,
    CH_LAST_X,
    CH_Q,
    DETECTOR_CODES,
    DETECTOR_ROLES,
    DF_BASE_N,
    DF_FIELDS,
    DF_HOT,
    DF_LAYER_PROGRESS,
    DF_N,
    DF_PEAK,
    DF_PLANNED_CYCLE_S,
    DF_SCORE,
    DI_COUNTER_T,
    DI_FIELDS,
    DI_HAS_GOOD,
    DI_HOT_SINCE,
    DI_LAST_TICK_T,
    DI_LAYER_T,
    DI_STATE_COUNT,
    LV_BUCKET_MS,
    LV_COUNT,
    LV_FIELDS,
    LV_OFFSET,
    LV_ORIGIN_MS,
    MA_FIELDS,
    MA_LEVEL,
    MA_PREV,
    MV_FIELDS,
    MV_N,
    NULL_MEAN_Q,
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
    P_FIELDS,
    P_GATED_FACTOR,
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
    P_SILENCE_MS,
    P_WARMUP,
    P_Z_SCALE2,
    SHIFT_BUCKETS,
    ST_FIELDS,
    ST_MAX_T,
    role_of_channel,
)

KPI_KEYS = (
    "utilization",
    "availability",
    "effectiveness",
    "quality",
    "oee",
    "chamber_fill",
    "packing_density",
    "fill_realised",
    "anomaly_score",
)
OEE_KEYS = ("utilization", "availability", "effectiveness", "quality", "oee")
_SNAPSHOT_MAGIC = b"FLCORE1\n"
_NO_SCORES = np.empty(0, dtype=np.float64)
_LAYERWISE = frozenset(t.value for t in Technology if t is not Technology.LINE)


class CoreError(ValueError):
    """Bad input to the core: unknown device or channel, capacity exceeded, wrong shapes …"""


@dataclass(frozen=True)
class IngestStats:
    """What one :meth:`FleetCore.ingest` call did with its samples; the counts add up to the batch.

    ``late``: samples too old to place (older than a channel's newest sample for detector channels,
    older than the reorder buffer for ``state``, older than the last value for counters).
    ``rejected_value``: a state code or counter value that cannot be right (not 0..6, negative).
    """

    accepted: int
    rejected_nonfinite: int
    rejected_index: int
    late: int
    rejected_value: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.rejected_nonfinite + self.rejected_index + self.late + self.rejected_value


@dataclass(frozen=True)
class AnomalyEvent:
    """Start or end of one incident on one device; ``score`` is the device score (at the end: the peak)."""

    device: int
    phase: Literal["start", "end"]
    t_us: int
    score: float
    channels: tuple[str, ...]


_new = object.__new__


def _ingest_stats(accepted: int, nonfinite: int, index: int, late: int, value: int) -> IngestStats:
    """``IngestStats(...)`` without the frozen dataclass's ``object.__setattr__`` per field (~0.5 µs
    of a small ingest call); the same object: fields, equality, repr, ``asdict``."""
    stats = _new(IngestStats)
    fields = stats.__dict__
    fields["accepted"] = accepted
    fields["rejected_nonfinite"] = nonfinite
    fields["rejected_index"] = index
    fields["late"] = late
    fields["rejected_value"] = value
    return stats


_NO_SAMPLES = IngestStats(0, 0, 0, 0, 0)
# dtype objects, not types: np.ascontiguousarray converts a type to a dtype on every call (~80 ns)
_contiguous = np.ascontiguousarray
_INT32 = np.dtype(np.int32)
_INT64 = np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)
_EVENT_BUFFER = 1024  # initial event slots (kernels.ingest_call grows them up to EVENT_BUFFER_KEEP)


def _core_state(core: FleetCore) -> Any:
    """The core's arrays as one :class:`kernels.CoreState` (a namespace when numba is off)."""
    arrays = {
        "role": core.role, "chan": core.chan, "devf": core.devf, "devi": core.devi, "st_t": core.st_t,
        "st_code": core.st_code, "bid": core.bid, "bval": core.bval, "levels": core._levels,
        "params": core._params, "stats": core._stats, "mv_last": core.mv_last, "mv_mean": core.mv_mean,
        "mv_scale": core.mv_scale, "mv_cov": core.mv_cov, "mv_eig": core.mv_eig, "mv_dev": core.mv_dev,
        "mv_aux": core.mv_aux, "mv_lag": core.mv_lag, "order_scratch": core._order_scratch, "call": core._call,
        "level_cache": np.zeros((core._levels.shape[0], kernels.LC_FIELDS), dtype=np.int64),
        "ev_device": np.empty(_EVENT_BUFFER, dtype=np.int32), "ev_phase": np.empty(_EVENT_BUFFER, dtype=np.int8),
        "ev_t": np.empty(_EVENT_BUFFER, dtype=np.int64), "ev_score": np.empty(_EVENT_BUFFER, dtype=np.float64),
        "ev_mask": np.empty(_EVENT_BUFFER, dtype=np.int64),
    }  # fmt: skip
    assert tuple(arrays) == kernels.CORE_STATE_FIELDS
    if getattr(numba_config, "DISABLE_JIT", False):
        return SimpleNamespace(**arrays)
    return kernels.new_core_state(*arrays.values())


_ENTRIES: dict[Any, Any] = {}


def _ingest_entry(state: Any) -> Any:
    """``kernels.ingest_call``'s compiled entry point for this state's type and FleetCore's argument
    types, called without the dispatcher's per-call type look-up (~0.5 µs for the state). Safe only
    because FleetCore.ingest passes exactly these types: the state it was looked up for, C-contiguous
    1-d int32, int32, int64, float64 and float64 arrays (converted and checked first), an int and a
    bool. Looked up once per state (``numba.typeof`` of a structref runs in Python, ~µs)."""
    if getattr(numba_config, "DISABLE_JIT", False):
        return kernels.ingest_call
    state_type = numba.typeof(state)
    entry = _ENTRIES.get(state_type)
    if entry is None:
        array = numba.typeof(np.empty(0, dtype=np.int32))
        signature = (
            state_type, array, array, numba.typeof(np.empty(0, dtype=np.int64)),
            numba.typeof(np.empty(0, dtype=np.float64)), numba.typeof(_NO_SCORES), numba.int64, numba.boolean,
        )  # fmt: skip
        entry = _ENTRIES[state_type] = kernels.ingest_call.compile(signature)
    return entry


def _aligned_zeros(shape: tuple[int, ...], dtype: type[np.generic], align: int = 64) -> np.ndarray:
    """Zeros whose first byte sits on a cache-line boundary, so a channel's 128 bytes are 2 lines."""
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape))
    raw = np.zeros(count * itemsize + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + count * itemsize].view(dtype).reshape(shape)


_HUGE_PAGE = 2 << 20


def _state_zeros(shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """Zeros for a state array: a large one in an anonymous mapping advised to use transparent huge
    pages (2 MB), so that samples of random devices do not each miss the TLB (a page walk per
    sample: the random pattern ran 30-40 % slower on 4 kB pages); small ones as
    :func:`_aligned_zeros`. Both start on a cache-line boundary."""
    itemsize = np.dtype(dtype).itemsize
    nbytes = int(np.prod(shape)) * itemsize
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return _aligned_zeros(shape, dtype)
    # zero-filled, kept alive by the array; private: shared anonymous memory (the default of
    # mmap(-1, n)) gets no transparent huge pages
    area = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(area, dtype=np.uint8)
    start = (-raw.ctypes.data) % _HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _params(config: CoreConfig) -> np.ndarray:
    params = np.zeros(P_FIELDS, dtype=np.float64)
    params[P_ALPHA] = config.alpha
    params[P_WARMUP] = config.warmup_samples
    params[P_Z_SCALE2] = config.z_scale**2
    params[P_CUSUM_DRIFT] = config.cusum_drift
    params[P_CUSUM_SCALE] = config.cusum_scale
    # capped (score 0.83) so that a long incident decays in about cap/drift samples once it is over
    params[P_CUSUM_CAP] = config.cusum_scale * 5.0
    params[P_LEARN_GATE] = config.learn_gate
    params[P_GATED_FACTOR] = config.gated_learn_factor
    params[P_ADOPT_US] = config.incident_adopt_s * 1e6
    params[P_NULL_Q] = NULL_MEAN_Q[config.detector]
    params[P_REL_FLOOR] = config.relative_noise_floor
    params[P_EVENT_ON] = config.event_on
    params[P_EVENT_OFF] = config.event_off
    params[P_EVENT_MIN] = config.event_min_samples
    params[P_HOLD_MS] = config.state_hold_s * 1000
    params[P_SILENCE_MS] = config.silence_s * 1000
    params[P_DETECTOR] = DETECTOR_CODES[config.detector]
    params[P_EWMA_LAMBDA] = config.ewma_lambda
    params[P_MV_WARMUP] = config.mv_warmup_samples
    params[P_MV_EXPLAINED] = config.mv_explained_variance
    params[P_MV_Z] = NormalDist().inv_cdf(config.mv_p_value)
    params[P_MV_LAMBDA] = config.mv_smoothing
    params[P_MV_ALPHA] = config.mv_alpha
    params[P_MV_GATE] = config.mv_learn_gate
    params[P_MV_SCORE_BASE] = 1.0 - config.event_on
    params[P_MEWMA_LAMBDA] = config.mewma_lambda
    params[P_MEWMA_R2] = config.mewma_integrated_r2
    params[P_MEWMA_STABLE] = config.mewma_stable_ticks
    params[P_MEWMA_RECEDE] = config.mewma_recede
    params[P_MEWMA_ADOPT] = config.mewma_adopt_ticks
    # the hot loop keeps each channel's statistic q and compares it with these thresholds; the
    # score q / (q + z_scale²) is only computed when someone reads it
    z_scale2 = config.z_scale**2
    params[P_EWMA_FACTOR] = (2.0 - config.ewma_lambda) / config.ewma_lambda
    params[P_Q_GATE] = q_threshold(config.learn_gate, z_scale2)
    params[P_Q_EVENT_OFF] = q_threshold(config.event_off, z_scale2)
    return params


def q_threshold(score: float, z_scale2: float) -> float:
    """The statistic q at which a channel's score q / (q + z_scale²) reaches ``score``.

    >>> q_threshold(0.5, 16.0)
    16.0
    """
    return score * z_scale2 / (1.0 - score) if score < 1.0 else math.inf


def channel_score(q: float, z_scale2: float) -> float:
    """A channel's score in [0, 1] from its statistic (the kernel's ``score_of_q``)."""
    return q / (q + z_scale2)


def _levels(config: CoreConfig) -> np.ndarray:
    rows = [(w.n_buckets, w.bucket_s * 1000, 0) for w in config.windows]
    rows.append((SHIFT_BUCKETS, config.shift_length_s * 1000, config.shift_origin_s * 1000))
    levels = np.zeros((len(rows), LV_FIELDS), dtype=np.int64)
    offset = 0
    for i, (count, bucket_ms, origin_ms) in enumerate(rows):
        levels[i, LV_OFFSET] = offset
        levels[i, LV_COUNT] = count
        levels[i, LV_BUCKET_MS] = bucket_ms
        levels[i, LV_ORIGIN_MS] = origin_ms
        offset += count
    return levels


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def oee_from_totals(totals: np.ndarray, planned_cycle_s: float, has_good: bool) -> dict[str, float | None]:
    """ISO 22400-2 KPIs from one row of window totals (see :func:`kernels.window_totals`)."""
    producing = float(totals[BV_PRODUCING_MS])
    busy = float(totals[BV_BUSY_MS])
    produced = float(totals[BV_PRODUCED])
    good = float(totals[BV_GOOD]) if has_good else produced - float(totals[BV_SCRAP])
    utilization = _ratio(producing, float(totals[6]))
    availability = _ratio(producing, busy)
    effectiveness = _ratio(planned_cycle_s * 1000.0 * produced, producing) if math.isfinite(planned_cycle_s) else None
    quality = _ratio(max(good, 0.0), produced)
    oee = (
        availability * effectiveness * quality
        if availability is not None and effectiveness is not None and quality is not None
        else None
    )
    return {
        "utilization": utilization,
        "availability": availability,
        "effectiveness": effectiveness,
        "quality": quality,
        "oee": oee,
    }


class FleetCore:
    """State and KPIs of a whole fleet; see the module docstring and ``docs/core.md``."""

    def __init__(self, max_devices: int = 1024, channels_per_device: int = 32, config: CoreConfig | None = None):
        if max_devices < 1:
            raise CoreError("max_devices must be at least 1")
        if not 1 <= channels_per_device <= 1024:
            raise CoreError("channels_per_device must be in 1..1024")
        self.config = config or CoreConfig()
        self.channels_per_device = channels_per_device
        self.devices: list[str] = []
        self._index: dict[str, int] = {}
        self._technology: list[str] = []
        self._channel_names: list[list[str]] = []
        self._slots: list[dict[str, int]] = []
        self._params = _params(self.config)
        self._levels = _levels(self.config)
        self._kpi_level = [w.length_s for w in self.config.windows].index(self.config.kpi_window_s)
        self._stats = np.zeros(ST_FIELDS, dtype=np.int64)
        self._stats[ST_MAX_T] = np.iinfo(np.int64).min
        self._events: list[AnomalyEvent] = []
        self._active_builds: dict[int, BuildRecord] = {}
        self._builds: deque[BuildRecord] = deque(maxlen=self.config.build_history)
        self._allocate(max_devices)

    # ---- state arrays ---------------------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        n_channels = self.channels_per_device
        n_buckets = int(self._levels[:, LV_COUNT].sum())
        depth = self.config.reorder_depth
        self.role = _state_zeros((capacity, n_channels), np.int8)
        self.chan = _state_zeros((capacity, n_channels, CH_FIELDS), np.float64)
        self.chan[:, :, CH_LAST_T] = -np.inf
        self.chan[:, :, CH_LAST_X] = np.nan
        self.chan[:, :, CH_CUSUM_REGIME] = -1.0
        self.devf = _state_zeros((capacity, DF_FIELDS), np.float64)
        self.devf[:, DF_PLANNED_CYCLE_S] = np.nan
        self.devi = _state_zeros((capacity, DI_FIELDS), np.int64)
        self.devi[:, DI_COUNTER_T : DI_COUNTER_T + 3] = -1
        self.devi[:, DI_LAYER_T] = -1
        self.st_t = _state_zeros((capacity, depth), np.int64)
        self.st_code = _state_zeros((capacity, depth), np.int8)
        self.bid = _state_zeros((capacity, n_buckets), np.int32)
        self.bid[:] = -1
        self.bval = _state_zeros((capacity, n_buckets, BV_FIELDS), np.int32)
        # scratch of kernels.batch_is_ordered_into (not state: not in snapshots or state_bytes); its
        # generation counter and the last call's counts live in self._call (kernels.CALL_*)
        self._order_scratch = np.zeros((capacity, 2), dtype=np.int64)
        self._call = np.zeros(kernels.CALL_FIELDS, dtype=np.int64)
        # the multivariate detector's state exists only when it is the detector (slots² per device)
        width = n_channels if self.config.multivariate else 0
        self.mv_last = np.full((capacity, width), np.nan)
        self.mv_mean = np.zeros((capacity, width))
        self.mv_scale = np.zeros((capacity, width))
        self.mv_cov = np.zeros((capacity, width, width))
        self.mv_eig = np.zeros((capacity, width))
        self.mv_dev = np.zeros((capacity, MV_FIELDS if width else 0))
        # mewma also keeps lag-1 co-moments (slots²) and four values per slot
        extra = n_channels if self.config.detector == "mewma" else 0
        self.mv_aux = np.zeros((capacity, extra, MA_FIELDS if extra else 0))
        self.mv_lag = np.zeros((capacity, extra, extra))
        # the arrays are shared with self._state (one numba argument, see kernels.CoreState):
        # change them in place, never rebind them without a new state
        self._state = _core_state(self)
        self._entry: Any = None  # kernels.ingest_call's entry point for this state, at the first ingest

    _ARRAYS = (
        "role", "chan", "devf", "devi", "st_t", "st_code", "bid", "bval",
        "mv_last", "mv_mean", "mv_scale", "mv_cov", "mv_eig", "mv_dev", "mv_aux", "mv_lag",
    )  # fmt: skip

    def _grow(self, capacity: int) -> None:
        old = {name: getattr(self, name) for name in self._ARRAYS}
        used = len(self.devices)
        self._allocate(capacity)
        for name, array in old.items():
            getattr(self, name)[:used] = array[:used]

    @property
    def capacity(self) -> int:
        return int(self.role.shape[0])

    def state_bytes(self) -> int:
        """Bytes of numeric state held for the current capacity (all arrays)."""
        return int(sum(getattr(self, name).nbytes for name in self._ARRAYS))

    # ---- devices and channels -------------------------------------------------------------------

    def add_device(
        self,
        key: str,
        *,
        technology: str,
        channels: Sequence[str] = (),
        planned_cycle_time_s: float | None = None,
    ) -> int:
        """Register a device (idempotent per key ``tenant/site/area/device``); return its index."""
        if technology not in {t.value for t in Technology}:
            raise CoreError(f"unknown technology {technology!r}; choose from {', '.join(t.value for t in Technology)}")
        if planned_cycle_time_s is not None and not (math.isfinite(planned_cycle_time_s) and planned_cycle_time_s > 0):
            raise CoreError(f"planned_cycle_time_s must be positive, got {planned_cycle_time_s!r}")
        if key.count("/") != 3 or any(not part for part in key.split("/")):
            raise CoreError(f"device key {key!r} must be tenant/site/area/device")
        index = self._index.get(key)
        if index is None:
            index = len(self.devices)
            if index >= self.capacity:
                self._grow(max(2 * self.capacity, 16))
            self.devices.append(key)
            self._index[key] = index
            self._technology.append(technology)
            self._channel_names.append([])
            self._slots.append({})
        elif self._technology[index] != technology:
            raise CoreError(f"device {key!r} is {self._technology[index]}, not {technology}")
        if planned_cycle_time_s is not None:
            self.devf[index, DF_PLANNED_CYCLE_S] = planned_cycle_time_s
        for name in channels:
            self.channel_index(index, name)
        return index

    def device_index(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise CoreError(f"unknown device {key!r}") from None

    def _check_device(self, device: int) -> None:
        if not 0 <= device < len(self.devices):
            raise CoreError(f"unknown device index {device} (the core has {len(self.devices)} devices)")

    def channel_index(self, device: int, name: str) -> int:
        """The device's slot for channel ``name``, assigned on first use."""
        self._check_device(device)
        slots = self._slots[device]
        slot = slots.get(name)
        if slot is None:
            if not name:
                raise CoreError("a channel needs a name")
            slot = len(slots)
            if slot >= self.channels_per_device:
                raise CoreError(
                    f"device {self.devices[device]!r} already has {self.channels_per_device} channels; "
                    f"cannot add {name!r} (raise channels_per_device)"
                )
            slots[name] = slot
            self._channel_names[device].append(name)
            self.role[device, slot] = role_of_channel(name)
        return slot

    def channels(self, device: int) -> list[str]:
        self._check_device(device)
        return list(self._channel_names[device])

    # ---- ingest ---------------------------------------------------------------------------------

    def ingest(
        self,
        device: np.ndarray,
        channel: np.ndarray,
        t_us: np.ndarray,
        values: np.ndarray,
        *,
        historical: bool = False,
        tick_scores: np.ndarray | None = None,
    ) -> IngestStats:
        """Process a batch of samples in one kernel call; see :class:`IngestStats` for the counts.

        ``historical=True`` marks replayed data: it updates KPIs and baselines but opens or closes
        no anomaly events (an incident of an hour ago is reported by the KPIs, not paged now).
        ``tick_scores`` (float64, one slot per sample, batch already in time order per device)
        receives each device tick's combined score at the tick's last sample; other slots are
        left as they are. Offline scoring uses it.
        """
        device = _contiguous(device, _INT32)
        channel = _contiguous(channel, _INT32)
        t_us = _contiguous(t_us, _INT64)
        values = _contiguous(values, _FLOAT64)
        shape = device.shape
        if len(shape) != 1 or channel.shape != shape or t_us.shape != shape or values.shape != shape:
            raise CoreError(
                f"device, channel, t_us and values must be 1-d and of one length, got shapes "
                f"{device.shape}, {channel.shape}, {t_us.shape}, {values.shape}"
            )
        n = shape[0]
        if n == 0:
            return _NO_SAMPLES
        scores = _NO_SCORES
        if tick_scores is not None:
            if tick_scores.shape != (n,) or tick_scores.dtype != np.float64:
                raise CoreError("tick_scores must be a float64 array with one slot per sample")
            if not tick_scores.flags.writeable:
                raise CoreError("tick_scores must be writeable")
            # the compiled entry takes C-contiguous arrays: a strided view gets a copy, copied back
            scores = tick_scores if tick_scores.flags.c_contiguous else np.ascontiguousarray(tick_scores)
        call = self._entry or self._bind_entry()
        n_events = call(self._state, device, channel, t_us, values, scores, len(self.devices), historical)
        if n_events < 0:  # not in time order per device: nothing was done
            if tick_scores is not None:
                raise CoreError("tick_scores needs a batch in time order per device")
            order = np.lexsort((t_us, device))
            device, channel, t_us, values = device[order], channel[order], t_us[order], values[order]
            n_events = call(self._state, device, channel, t_us, values, scores, len(self.devices), historical)
        if scores is not tick_scores and tick_scores is not None:
            tick_scores[:] = scores
        if n_events:
            self._take_events(n_events)
        # the counts in ST_* order (ST_ACCEPTED = 0 .. ST_VALUE = 4), then the order generation
        accepted, nonfinite, index, late, value, _ = self._call.tolist()
        return _ingest_stats(accepted, nonfinite, index, late, value)

    def _bind_entry(self) -> Any:
        self._entry = _ingest_entry(self._state)
        return self._entry

    def _take_events(self, n_events: int) -> None:
        ev_device, ev_phase, ev_t, ev_score, ev_mask = kernels.core_events(self._state)
        for k in range(n_events):
            d = int(ev_device[k])
            names = self._channel_names[d]
            mask = int(ev_mask[k])
            self._events.append(
                AnomalyEvent(
                    device=d,
                    phase="start" if ev_phase[k] == 0 else "end",
                    t_us=int(ev_t[k]),
                    score=float(ev_score[k]),
                    channels=tuple(names[c] for c in range(len(names)) if mask >> c & 1),
                )
            )

    @property
    def now_us(self) -> int | None:
        """The newest accepted timestamp: the default "now" of every query (data time, not wall time)."""
        value = int(self._stats[ST_MAX_T])
        return None if value == np.iinfo(np.int64).min else value

    def drain_events(self) -> list[AnomalyEvent]:
        events, self._events = self._events, []
        return events

    # ---- builds ---------------------------------------------------------------------------------

    def start_build(
        self,
        device: int,
        *,
        t_us: int,
        job_id: str,
        chamber_volume_cm3: float,
        part_volumes_cm3: Sequence[float],
        part_masses_g: Sequence[float] | None = None,
        material_density_g_cm3: float | None = None,
        build_height_mm: float | None = None,
        chamber_height_mm: float | None = None,
    ) -> None:
        """Start a build: planned fill now, packing density when masses or a density are known."""
        self._check_device(device)
        if self._technology[device] not in _LAYERWISE:
            raise CoreError(f"device {self.devices[device]!r} is a {self._technology[device]} station, not a printer")
        fill = planned_fill(chamber_volume_cm3, part_volumes_cm3)
        density: float | None = None
        if material_density_g_cm3 is not None:
            masses = (
                list(part_masses_g)
                if part_masses_g is not None
                else [v * material_density_g_cm3 for v in part_volumes_cm3]
            )
            if len(masses) != len(part_volumes_cm3):
                raise BuildError("part_masses_g and part_volumes_cm3 must list the same parts")
            density = packing_density(
                masses,
                material_density_g_cm3=material_density_g_cm3,
                bed_volume_cm3=bed_volume_used(chamber_volume_cm3, build_height_mm, chamber_height_mm),
            )
        record = BuildRecord(
            device=device,
            tenant=self.devices[device].split("/", 1)[0],
            job_id=job_id,
            start_us=int(t_us),
            chamber_fill=fill,
            packing_density=density,
            build_height_mm=build_height_mm,
            parts=len(part_volumes_cm3),
        )
        self._active_builds[device] = record
        self._builds.append(record)
        # a new build starts from layer 0, whatever the previous build reported last
        self.devf[device, DF_LAYER_PROGRESS] = 0.0
        self.devi[device, DI_LAYER_T] = int(t_us)

    def finish_build(self, device: int, *, t_us: int) -> None:
        self._check_device(device)
        record = self._active_builds.pop(device, None)
        if record is None:
            raise CoreError(f"device {self.devices[device]!r} has no build in progress")
        record.finish_us = int(t_us)

    def fleet_fill(self, tenant: str, *, since_us: int, until_us: int) -> float | None:
        """Mean planned fill of the tenant's builds started in ``[since, until)``, weighted by height."""
        return mean_fill((b for b in self._builds if b.tenant == tenant), since_us, until_us)

    def device_fill(self, device: int, *, since_us: int, until_us: int) -> float | None:
        self._check_device(device)
        return mean_fill((b for b in self._builds if b.device == device), since_us, until_us)

    # ---- KPIs -----------------------------------------------------------------------------------

    def _now_ms(self, now_us: int | None) -> int:
        if now_us is None:
            now_us = self.now_us
        return 0 if now_us is None else int(now_us) // 1000

    def _totals(self, level: int, now_ms: int, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), 7), dtype=np.float64)
        kernels.window_totals(
            self.bid, self.bval, self._levels, level, now_ms, self.st_t, self.st_code, self.devi,
            int(self._params[P_HOLD_MS]), int(self._params[P_SILENCE_MS]), rows, out,
        )  # fmt: skip
        return out

    def window_kpis(
        self, device: int, window: int | Literal["shift"] | None = None, now_us: int | None = None
    ) -> dict[str, float | None]:
        """Utilization and OEE over one rolling window (its length in seconds) or the current shift."""
        self._check_device(device)
        if window is None:
            level = self._kpi_level
        elif window == "shift":
            level = len(self.config.windows)
        else:
            lengths = [w.length_s for w in self.config.windows]
            if window not in lengths:
                raise CoreError(f"no rolling window of {window} s; configured: {lengths}")
            level = lengths.index(window)
        totals = self._totals(level, self._now_ms(now_us), np.array([device], dtype=np.int64))[0]
        return oee_from_totals(
            totals, float(self.devf[device, DF_PLANNED_CYCLE_S]), bool(self.devi[device, DI_HAS_GOOD])
        )

    def _build_kpis(self, device: int) -> tuple[float | None, float | None, float | None]:
        record = self._active_builds.get(device)
        if record is None:
            return None, None, None
        progress = float(self.devf[device, DF_LAYER_PROGRESS]) if self.devi[device, DI_LAYER_T] >= 0 else None
        return record.chamber_fill, record.packing_density, realised_fill(record.chamber_fill, progress)

    def _warm(self, rows: slice) -> np.ndarray:
        """Whether each device's score is past its warm-up (the multivariate detector counts its own)."""
        if self.config.multivariate:
            return np.asarray(self.mv_dev[rows, MV_N] >= self.config.mv_warmup_samples)
        return np.asarray(self.devf[rows, DF_N] >= self.config.warmup_samples)

    def _anomaly_score(self, device: int) -> float | None:
        if not self._warm(slice(device, device + 1))[0]:
            return None
        return float(self.devf[device, DF_SCORE])

    def kpis(self, device: int, now_us: int | None = None) -> dict[str, float | None]:
        """The device's KPIs (None where not defined yet); OEE keys over ``config.kpi_window_s``."""
        result = self.window_kpis(device, None, now_us)
        fill, density, realised = self._build_kpis(device)
        result["chamber_fill"] = fill
        result["packing_density"] = density
        result["fill_realised"] = realised
        result["anomaly_score"] = self._anomaly_score(device)
        count = int(self.devi[device, DI_STATE_COUNT])
        result["state"] = float(self.st_code[device, count - 1]) if count else None
        return result

    KPI_COLUMNS: tuple[str, ...] = ("utilization", "availability", "effectiveness", "quality", "oee",
                                    "chamber_fill", "packing_density", "fill_realised", "anomaly_score", "state")

    def kpi_table(self, devices: Sequence[int] | np.ndarray, now_us: int | None = None) -> np.ndarray:
        """The KPIs of ``devices`` as one float64 array, a row per device in that order and a column per
        name in :attr:`KPI_COLUMNS` (NaN where not defined), from one compiled pass
        (``kernels.kpi_table``): about 1 µs per device plus a few µs per call, where :meth:`kpis` costs
        ~7 µs per device. The values equal :meth:`kpis`'s."""
        rows = np.asarray(devices, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(self.devices))):
            raise CoreError(f"unknown device index among {rows.tolist()[:10]}")
        n = rows.size
        table = np.empty((n, kernels.KPI_FIELDS), dtype=np.float64)
        if self.config.multivariate:
            warm_n, warm_min = self.mv_dev[:, MV_N], float(self.config.mv_warmup_samples)
        else:
            warm_n, warm_min = self.devf[:, DF_N], float(self.config.warmup_samples)
        kernels.kpi_table(
            self.bid, self.bval, self._levels, self._kpi_level, self._now_ms(now_us), self.st_t, self.st_code,
            self.devi, self.devf, warm_n, warm_min, int(self._params[P_HOLD_MS]), int(self._params[P_SILENCE_MS]),
            rows, np.empty((n, 7), dtype=np.float64), table,
        )  # fmt: skip
        builds = self._active_builds
        if builds:
            for k, d in [(k, d) for k, d in enumerate(rows.tolist()) if d in builds]:
                for column, value in zip((kernels.KPI_CHAMBER_FILL, kernels.KPI_PACKING_DENSITY,
                                          kernels.KPI_FILL_REALISED), self._build_kpis(d), strict=True):
                    table[k, column] = np.nan if value is None else value
        return table

    def kpis_all(self, now_us: int | None = None) -> dict[str, np.ndarray]:
        """Every KPI for every device as float64 arrays (NaN where not defined), index = device."""
        table = self.kpi_table(np.arange(len(self.devices)), now_us)
        return {name: table[:, k] for k, name in enumerate(self.KPI_COLUMNS)}

    def channel_scores(self, device: int) -> dict[str, float]:
        """The latest score in [0, 1] of each detector channel of the device (0 while warming up)."""
        self._check_device(device)
        return {
            name: channel_score(float(self.chan[device, slot, CH_Q]), float(self._params[P_Z_SCALE2]))
            for slot, name in enumerate(self._channel_names[device])
            if self.role[device, slot] in DETECTOR_ROLES
        }

    def take_peak(self, device: int) -> float:
        """Highest device score since the last call (for "max over the interval" time series)."""
        self._check_device(device)
        peak = float(self.devf[device, DF_PEAK])
        self.devf[device, DF_PEAK] = 0.0
        return peak

    # ---- snapshot / restore -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything the core knows, as bytes; :meth:`restore` gives back an identical core."""
        config = asdict(self.config)
        meta: dict[str, Any] = {
            "config": config,
            "channels_per_device": self.channels_per_device,
            "devices": self.devices,
            "technology": self._technology,
            "channels": self._channel_names,
            "builds": [asdict(b) for b in self._builds],
            "active": {str(d): self._builds_index(r) for d, r in self._active_builds.items()},
            "events": [asdict(e) for e in self._events],
        }
        buffer = io.BytesIO()
        used = len(self.devices)
        arrays = {name: getattr(self, name)[:used] for name in self._ARRAYS}
        np.savez(buffer, stats=self._stats, **arrays)
        header = json.dumps(meta).encode()
        return _SNAPSHOT_MAGIC + len(header).to_bytes(8, "little") + header + buffer.getvalue()

    def _upgrade_devf(self, stored: np.ndarray) -> None:
        """Restore device fields of a snapshot taken before DF_HOT and DF_BASE_N existed."""
        used = stored.shape[0]
        self.devf[:used, : stored.shape[1]] = stored
        # the old baseline learned from every tick; hot channels are those over the gate now
        self.devf[:used, DF_BASE_N] = stored[:, DF_N]
        detector = np.isin(self.role[:used], DETECTOR_ROLES)
        over = self.chan[:used, :, CH_Q] > self._params[P_Q_GATE]
        self.devf[:used, DF_HOT] = np.count_nonzero(detector & over, axis=1)
        self.chan[:used, :, CH_LAST_X] = np.nan  # the field held the unused score then

    def _builds_index(self, record: BuildRecord) -> int:
        for i, b in enumerate(self._builds):
            if b is record:
                return i
        self._builds.append(record)  # only when the history dropped an active build
        return len(self._builds) - 1

    @classmethod
    def restore(cls, blob: bytes) -> FleetCore:
        if not blob.startswith(_SNAPSHOT_MAGIC):
            raise CoreError("not a FleetCore snapshot")
        start = len(_SNAPSHOT_MAGIC)
        size = int.from_bytes(blob[start : start + 8], "little")
        meta = json.loads(blob[start + 8 : start + 8 + size])
        config_dict = dict(meta["config"])
        config_dict["windows"] = tuple(WindowSpec(**w) for w in config_dict["windows"])
        config = CoreConfig(**config_dict)
        devices = meta["devices"]
        core = cls(max_devices=max(len(devices), 1), channels_per_device=meta["channels_per_device"], config=config)
        core.devices = list(devices)
        core._index = {key: i for i, key in enumerate(devices)}
        core._technology = list(meta["technology"])
        core._channel_names = [list(c) for c in meta["channels"]]
        core._slots = [{name: i for i, name in enumerate(c)} for c in core._channel_names]
        with np.load(io.BytesIO(blob[start + 8 + size :]), allow_pickle=False) as data:
            core._stats[:] = data["stats"]
            for name in cls._ARRAYS:
                if name in data.files or not name.startswith("mv_"):
                    # snapshots from before a multivariate detector carry no mv_* arrays (or no
                    # mv_aux / mv_lag): their detector did not use them, so the fresh arrays are exact
                    stored = data[name]
                    target = getattr(core, name)
                    if name == "devf" and stored.shape[1] < target.shape[1]:
                        core._upgrade_devf(stored)
                    elif name == "devi" and stored.shape[1] < target.shape[1]:
                        # before DI_HOT_SINCE: a running incident counts from the newest tick
                        target[: len(devices), : stored.shape[1]] = stored
                        target[: len(devices), DI_HOT_SINCE] = stored[:, DI_LAST_TICK_T]
                    elif name in ("mv_dev", "mv_aux") and stored.ndim == target.ndim \
                            and 0 < stored.shape[-1] < target.shape[-1]:
                        # before mewma's re-baselining fields (appended): no episode open, the
                        # local level at the last complete row, as its fit leaves them
                        target[: len(devices), ..., : stored.shape[-1]] = stored
                        if name == "mv_aux":
                            target[: len(devices), :, MA_LEVEL] = stored[:, :, MA_PREV]
                    else:
                        target[: len(devices)] = stored
        for d, names in enumerate(core._channel_names):
            # roles follow from the names: a snapshot from before a role existed gets it here
            core.role[d, : len(names)] = [role_of_channel(name) for name in names]
        core._builds.extend(BuildRecord(**b) for b in meta["builds"])
        builds = list(core._builds)
        core._active_builds = {int(d): builds[i] for d, i in meta["active"].items()}
        core._events = [AnomalyEvent(**{**e, "channels": tuple(e["channels"])}) for e in meta["events"]]
        return core


def state_name(code: float | None) -> str | None:
    """The DeviceState name of a state code as reported in :meth:`FleetCore.kpis` (None stays None)."""
    return None if code is None else DeviceState(int(code)).name.lower()


__all__ = ["AnomalyEvent", "CoreError", "FleetCore", "IngestStats", "oee_from_totals"]
