"""FleetCore.ingest's one-argument entry (kernels.ingest_call on a CoreState): the same state, counts
and events as the batch kernel called directly with every array and fresh event buffers, whatever the
batch sizes (the kept event buffers grow; batches above EVENT_BUFFER_KEEP get their own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twin.core import CoreConfig, CoreError, FleetCore, kernels
from twin.core.layout import ST_ACCEPTED, ST_INDEX, ST_LATE, ST_NONFINITE, ST_VALUE

T0 = 1_700_000_000_000_000 - (1_700_000_000_000_000 % 3_600_000_000)
S = 1_000_000
CHANNELS = ["state", "chamber_temp", "laser_power"]
CONFIG = CoreConfig(warmup_samples=10, event_min_samples=1)
REPO = Path(__file__).resolve().parents[1]


def _core(n_devices: int) -> FleetCore:
    core = FleetCore(max_devices=n_devices, channels_per_device=4, config=CONFIG)
    for d in range(n_devices):
        core.add_device(f"t/s/a/d{d}", technology="SLS", channels=CHANNELS)
    return core


def _batch(n_devices: int, ticks: int, seed: int) -> tuple[np.ndarray, ...]:
    """Time-major ticks of every device; each device spikes for 3 ticks every 25 (many events), a
    few bad samples (NaN, unknown channel, late) mixed in."""
    rng = np.random.default_rng(seed)
    tick = np.repeat(np.arange(ticks, dtype=np.int64), n_devices * 3)
    device = np.tile(np.repeat(np.arange(n_devices, dtype=np.int32), 3), ticks)
    channel = np.tile(np.arange(3, dtype=np.int32), n_devices * ticks)
    values = rng.normal(100.0, 1.0, device.shape[0])
    values[channel == 0] = 3.0
    spiking = ((tick + device) % 25 >= 22) & (tick > 15) & (channel == 1)
    values[spiking] += 40.0
    values[rng.random(values.shape[0]) < 0.001] = np.nan
    channel[rng.random(values.shape[0]) < 0.001] = 3  # a slot without a channel
    return device, channel, T0 + tick * S, values


def _direct(core: FleetCore, device: np.ndarray, channel: np.ndarray, t_us: np.ndarray, values: np.ndarray) -> tuple:
    """What FleetCore.ingest did before the entry: every array to kernels.ingest_batch, fresh buffers."""
    n = device.shape[0]
    before = core._stats.copy()
    events = (
        np.empty(n, np.int32), np.empty(n, np.int8), np.empty(n, np.int64), np.empty(n, np.float64),
        np.empty(n, np.int64),
    )  # fmt: skip
    n_events = kernels.ingest_batch(
        device, channel, t_us, values, core.role, core.chan, core.devf, core.devi,
        core.st_t, core.st_code, core.bid, core.bval, core._levels, core._params, core._stats,
        *events, np.empty(0), core.mv_last, core.mv_mean, core.mv_scale, core.mv_cov, core.mv_eig, core.mv_dev,
        core.mv_aux, core.mv_lag, np.zeros((core._levels.shape[0], kernels.LC_FIELDS), np.int64),
    )  # fmt: skip
    delta = core._stats - before
    counts = tuple(int(delta[k]) for k in (ST_ACCEPTED, ST_NONFINITE, ST_INDEX, ST_LATE, ST_VALUE))
    listed = [
        (int(events[0][k]), "start" if events[1][k] == 0 else "end", int(events[2][k]), float(events[3][k]),
         tuple(CHANNELS[c] for c in range(len(CHANNELS)) if int(events[4][k]) >> c & 1))
        for k in range(n_events)
    ]  # fmt: skip
    return counts, listed


def _chunks(sizes: list[int], batch: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, ...]]:
    chunks = []
    start = 0
    n = batch[0].shape[0]
    while start < n:
        stop = min(n, start + sizes[len(chunks) % len(sizes)])
        chunks.append(tuple(a[start:stop] for a in batch))
        start = stop
    return chunks


def _via_entry(core: FleetCore, chunk: tuple[np.ndarray, ...]) -> tuple:
    stats = core.ingest(*chunk)
    assert stats.total == chunk[0].shape[0]
    counts = (stats.accepted, stats.rejected_nonfinite, stats.rejected_index, stats.late, stats.rejected_value)
    return counts, [(e.device, e.phase, e.t_us, e.score, e.channels) for e in core.drain_events()]


@pytest.mark.parametrize(
    "sizes",
    [
        [100_000],  # one batch above EVENT_BUFFER_KEEP with more events than the kept buffers hold
        [1, 7, 30, 999, 3000, 20_000],  # the kept buffers grow
    ],
)
def test_entry_matches_the_batch_kernel(sizes: list[int]) -> None:
    n_devices, ticks = 300, 130
    batch = _batch(n_devices, ticks, seed=1)
    assert batch[0].shape[0] > kernels.EVENT_BUFFER_KEEP
    direct = _core(n_devices)
    core = _core(n_devices)
    most = 0
    for chunk in _chunks(sizes, batch):
        want = _direct(direct, *chunk)
        assert _via_entry(core, chunk) == want
        most = max(most, len(want[1]))
    if len(sizes) == 1:
        assert most > 1024  # a large batch with more events than the first kept buffers hold
    for name in FleetCore._ARRAYS:
        np.testing.assert_array_equal(getattr(core, name), getattr(direct, name))
    np.testing.assert_array_equal(core._stats, direct._stats)
    # a second large batch (fewer events than the buffers kept from the first hold)
    more = _batch(n_devices, ticks, seed=2)
    more = (more[0], more[1], more[2] + ticks * S, more[3])
    assert _via_entry(core, more) == _direct(direct, *more)


def test_unordered_batch_is_sorted_and_tick_scores_views() -> None:
    device, channel, t_us, values = _batch(5, 40, seed=3)
    order = np.random.default_rng(4).permutation(device.shape[0])
    # the wrapper's sort: by device and time, stable (a tick's samples keep their order)
    by_device = order[np.lexsort((t_us[order], device[order]))]
    ordered = _core(5)
    want = ordered.ingest(device[by_device], channel[by_device], t_us[by_device], values[by_device])
    shuffled = _core(5)
    assert shuffled.ingest(device[order], channel[order], t_us[order], values[order]) == want
    for name in FleetCore._ARRAYS:
        np.testing.assert_array_equal(getattr(shuffled, name), getattr(ordered, name))
    with pytest.raises(CoreError, match="time order per device"):
        _core(5).ingest(device[order], channel[order], t_us[order], values[order], tick_scores=np.zeros(order.shape))
    # tick scores into a strided view are the same as into a contiguous array
    contiguous = np.full(device.shape[0], -1.0)
    _core(5).ingest(device, channel, t_us, values, tick_scores=contiguous)
    strided = np.full((device.shape[0], 2), -1.0)
    _core(5).ingest(device, channel, t_us, values, tick_scores=strided[:, 0])
    np.testing.assert_array_equal(strided[:, 0], contiguous)
    assert (strided[:, 1] == -1.0).all()
    frozen = np.zeros(device.shape[0])
    frozen.flags.writeable = False
    with pytest.raises(CoreError, match="writeable"):
        _core(5).ingest(device, channel, t_us, values, tick_scores=frozen)
    with pytest.raises(CoreError, match="1-d and of one length"):
        _core(5).ingest(device.reshape(-1, 3), channel, t_us, values)


_PLAIN = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_core_entry import _batch, _core
core = _core(4)
device, channel, t_us, values = _batch(4, 60, seed=5)
order = np.random.default_rng(6).permutation(device.shape[0])
stats = core.ingest(device[order], channel[order], t_us[order], values[order])
events = [(e.device, e.phase, e.t_us, e.score, list(e.channels)) for e in core.drain_events()]
print(json.dumps([stats.accepted, stats.rejected_nonfinite, stats.rejected_index, stats.late, events]))
"""


def test_plain_python_kernels_take_the_same_path() -> None:
    """NUMBA_DISABLE_JIT=1 (coverage runs): the state is a namespace, the entry a Python function."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    plain = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(REPO)], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    jit = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(REPO)], capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(plain.stdout.strip().splitlines()[-1])
    want = json.loads(jit.stdout.strip().splitlines()[-1])
    assert got[:4] == want[:4] and got[0] > 0
    # plain Python rounds a score differently in the last digit now and then (libm vs LLVM)
    assert [e[:3] + e[4:] for e in got[4]] == [e[:3] + e[4:] for e in want[4]] and len(got[4]) > 0
    assert [e[3] for e in got[4]] == pytest.approx([e[3] for e in want[4]], rel=1e-12)
