"""Turn many telemetry payloads into the core's columns with one numba call per ingest cycle.

A Python loop over samples would cap the twin far below a million samples per second, and one
``numpy.frombuffer`` per message costs several microseconds, which matters for single-sample
messages. So the ingest thread joins the cycle's payloads into one buffer, each payload starting
at a multiple of 8 bytes. The FLT1 value block starts at a multiple of 8 inside its payload
(``forgeline.contract.telemetry``), so the value, offset and channel columns of every message are
aligned views of that one buffer, and the kernels below index them directly.

Three layers as elsewhere in the twin: :func:`Columns` prepares, the ``@njit`` kernels loop,
:mod:`twin.unpack` ``reference_*`` functions are the slow, obviously-correct versions the tests
compare against.

Examples:
    >>> from forgeline.contract import telemetry
    >>> payload = telemetry.encode(["a", "b"], [10, 11], [1, 0], [1.5, 2.5], seq=0)
    >>> header = telemetry.read_header(payload)
    >>> cols = Columns()
    >>> cols.add(payload, header.data_offset, header.n_samples, header.t_base_us, device=3,
    ...          slots=np.array([7, 8], dtype=np.int32))
    0
    >>> device, slot, t_us, values = cols.unpack()
    >>> slot.tolist(), t_us.tolist(), values.tolist()
    ([8, 7], [10, 11], [1.5, 2.5])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from twin.core.config import NJIT_OPTIONS

_PAD = b"\0" * 8


@njit(**NJIT_OPTIONS)
def _check_messages(u2, u4, chan_start, off_start, count, max_channel, max_offset):
    """Per message: the highest channel index and the highest time offset (for validation)."""
    for m in range(chan_start.shape[0]):
        top_channel = -1
        top_offset = 0
        c0 = chan_start[m]
        o0 = off_start[m]
        for i in range(count[m]):
            c = int(u2[c0 + i])
            if c > top_channel:
                top_channel = c
            o = int(u4[o0 + i])
            if o > top_offset:
                top_offset = o
        max_channel[m] = top_channel
        max_offset[m] = top_offset


@njit(**NJIT_OPTIONS)
def _unpack(f8, u4, u2, value_start, off_start, chan_start, count, t_base, device, slot_start, slot_table,
            use, out_device, out_slot, out_t, out_value, accumulate, last_value, last_t, interval_sum,
            interval_count, add_to_interval):
    """Scatter the used messages' samples into the output columns; returns the number written.

    With ``accumulate``, also what :func:`accumulate_latest` does, in the same pass (one read of the
    samples fewer per cycle: measured ~5 µs per 1000-sample message).
    """
    k = 0
    for m in range(count.shape[0]):
        if not use[m]:
            continue
        v0 = value_start[m]
        o0 = off_start[m]
        c0 = chan_start[m]
        s0 = slot_start[m]
        base = t_base[m]
        d = device[m]
        for i in range(count[m]):
            s = slot_table[s0 + np.int64(u2[c0 + i])]
            t = base + np.int64(u4[o0 + i])
            v = f8[v0 + i]
            out_device[k] = d
            out_slot[k] = s
            out_t[k] = t
            out_value[k] = v
            k += 1
            if accumulate and s >= 0 and np.isfinite(v):
                if t >= last_t[d, s]:
                    last_t[d, s] = t
                    last_value[d, s] = v
                if add_to_interval:
                    interval_sum[d, s] += v
                    interval_count[d, s] += 1
    return k


@njit(**NJIT_OPTIONS)
def accumulate_latest(device, slot, t_us, values, last_value, last_t, interval_sum, interval_count, add_to_interval):
    """Latest value per (device, slot) by sample time, and the interval's sum and count of finite values.

    Rows with a negative slot or a non-finite value are skipped (the core counts them). Replayed data
    (``add_to_interval`` False) updates the latest values only: its means go to their own time buckets.
    """
    for k in range(device.shape[0]):
        s = slot[k]
        v = values[k]
        if s < 0 or not np.isfinite(v):
            continue
        d = device[k]
        if t_us[k] >= last_t[d, s]:
            last_t[d, s] = t_us[k]
            last_value[d, s] = v
        if add_to_interval:
            interval_sum[d, s] += v
            interval_count[d, s] += 1


class Latest(NamedTuple):
    """Where :meth:`Columns.unpack` accumulates latest values and interval sums (the ingest's arrays)."""

    last_value: np.ndarray
    last_t: np.ndarray
    interval_sum: np.ndarray
    interval_count: np.ndarray
    add_to_interval: bool


_NO_LATEST = Latest(np.full((1, 1), np.nan), np.zeros((1, 1), np.int64), np.zeros((1, 1)),
                    np.zeros((1, 1), np.int64), False)


class Scratch:
    """Memory an ingest keeps from cycle to cycle: the joined payloads and the unpacked columns.

    A cycle of large batches joins megabytes; allocating them anew every cycle costs page faults
    (measured offline, 450 messages of 1000 samples per cycle: ~9 minor faults and ~10-18 µs per
    message, a quarter of the cycle). The buffers only grow (to the largest cycle seen). What
    :meth:`Columns.unpack` returns with a scratch is a view of it, valid until the next unpack.
    """

    def __init__(self) -> None:
        self.buffer = np.zeros(0, dtype=np.uint8)
        self.device = np.empty(0, dtype=np.int32)
        self.slot = np.empty(0, dtype=np.int32)
        self.t_us = np.empty(0, dtype=np.int64)
        self.values = np.empty(0, dtype=np.float64)

    def join(self, parts: list[bytes], size: int) -> np.ndarray:
        """``parts`` copied one after another into the buffer; its first ``size`` bytes."""
        if self.buffer.shape[0] < size:
            self.buffer = np.zeros(max(size, self.buffer.shape[0] * 3 // 2), dtype=np.uint8)
        view = memoryview(self.buffer)  # type: ignore[arg-type]
        pos = 0
        for part in parts:
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        return self.buffer[:size]

    def columns(self, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.device.shape[0] < total:
            grown = max(total, self.device.shape[0] * 3 // 2)
            self.device = np.empty(grown, dtype=np.int32)
            self.slot = np.empty(grown, dtype=np.int32)
            self.t_us = np.empty(grown, dtype=np.int64)
            self.values = np.empty(grown, dtype=np.float64)
        return self.device[:total], self.slot[:total], self.t_us[:total], self.values[:total]


class Columns:
    """Payloads of one ingest cycle, collected and then unpacked in one kernel call.

    With a :class:`Scratch`, the joined buffer and the returned columns live in it (no allocation per
    cycle; the columns are overwritten by the next unpack with the same scratch).
    """

    def __init__(self, scratch: Scratch | None = None) -> None:
        self._scratch = scratch
        self._parts: list[bytes] = []
        self._size = 0
        self._value_start: list[int] = []
        self._count: list[int] = []
        self._t_base: list[int] = []
        self._device: list[int] = []
        self._slot_key: list[int] = []
        self._slot_tables: dict[int, tuple[int, np.ndarray]] = {}
        self._joined: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.samples = 0

    def __len__(self) -> int:
        return len(self._count)

    def add(self, payload: bytes, data_offset: int, n_samples: int, t_base_us: int, device: int,
            slots: np.ndarray) -> int:
        """Add one payload (``slots`` maps its channel table to core slots, -1 = reject); returns its index."""
        start = self._size
        self._joined = None
        self._parts.append(payload)
        pad = -len(payload) % 8
        if pad:
            self._parts.append(_PAD[:pad])
        self._size += len(payload) + pad
        self._value_start.append((start + data_offset) // 8)
        self._count.append(n_samples)
        self._t_base.append(t_base_us)
        self._device.append(device)
        key = id(slots)
        if key not in self._slot_tables:
            self._slot_tables[key] = (0, slots)
        self._slot_key.append(key)
        self.samples += n_samples
        return len(self._count) - 1

    def _views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # check() and unpack() of one cycle share one joined buffer (a cycle of large batches is MBs)
        if self._joined is None:
            self._joined = self._join()
        return self._joined

    def _join(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._scratch is not None and self._parts:
            joined = self._scratch.join(self._parts, self._size)
            f8 = joined.view("<f8")
            u4 = joined.view("<u4")
            u2 = joined.view("<u2")
        else:
            buffer = b"".join(self._parts) if self._parts else _PAD
            f8 = np.frombuffer(buffer, dtype="<f8")
            u4 = np.frombuffer(buffer, dtype="<u4")
            u2 = np.frombuffer(buffer, dtype="<u2")
        value_start = np.array(self._value_start, dtype=np.int64)
        count = np.array(self._count, dtype=np.int64)
        off_start = (value_start * 8 + 8 * count) // 4
        chan_start = (value_start * 8 + 12 * count) // 2
        return f8, u4, u2, value_start, off_start, chan_start

    def check(self) -> tuple[np.ndarray, np.ndarray]:
        """Per message: highest channel index (-1 when empty) and highest time offset in µs."""
        _f8, u4, u2, _v, off_start, chan_start = self._views()
        n = len(self._count)
        max_channel = np.empty(n, dtype=np.int64)
        max_offset = np.empty(n, dtype=np.int64)
        _check_messages(u2, u4, chan_start, off_start, np.array(self._count, dtype=np.int64), max_channel, max_offset)
        return max_channel, max_offset

    def unpack(self, use: np.ndarray | None = None, latest: Latest | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The columns ``(device int32, slot int32, t_us int64, values float64)`` of the used messages.

        With ``latest``, the rows are also accumulated into it as by :func:`accumulate_latest`.
        """
        f8, u4, u2, value_start, off_start, chan_start = self._views()
        count = np.array(self._count, dtype=np.int64)
        if use is None:
            use = np.ones(count.shape[0], dtype=np.bool_)
        tables: list[np.ndarray] = []
        offset = 0
        for key, (_, slots) in self._slot_tables.items():
            self._slot_tables[key] = (offset, slots)
            tables.append(slots)
            offset += slots.shape[0]
        slot_table = np.concatenate(tables).astype(np.int32) if tables else np.zeros(1, np.int32)
        slot_start = np.array([self._slot_tables[k][0] for k in self._slot_key], dtype=np.int64)
        total = int(count[use].sum()) if count.shape[0] else 0
        if self._scratch is not None:
            out_device, out_slot, out_t, out_value = self._scratch.columns(total)
        else:
            out_device = np.empty(total, dtype=np.int32)
            out_slot = np.empty(total, dtype=np.int32)
            out_t = np.empty(total, dtype=np.int64)
            out_value = np.empty(total, dtype=np.float64)
        if total:
            if latest is None:
                latest = _NO_LATEST
            _unpack(f8, u4, u2, value_start, off_start, chan_start, count, np.array(self._t_base, dtype=np.int64),
                    np.array(self._device, dtype=np.int32), slot_start, slot_table, use,
                    out_device, out_slot, out_t, out_value, latest is not _NO_LATEST, latest.last_value,
                    latest.last_t, latest.interval_sum, latest.interval_count, latest.add_to_interval)  # fmt: skip
        return out_device, out_slot, out_t, out_value


def reference_unpack(
    payloads: list[tuple[bytes, int, np.ndarray]],
) -> tuple[list[int], list[int], list[int], list[float]]:
    """Slow reference of :meth:`Columns.unpack`: ``payloads`` are ``(payload, device, slots)``."""
    from forgeline.contract import telemetry

    devices: list[int] = []
    slots_out: list[int] = []
    times: list[int] = []
    values: list[float] = []
    for payload, device, slots in payloads:
        batch = telemetry.decode(payload)
        for t, c, v in zip(batch.t_us, batch.channel_idx, batch.values, strict=True):
            devices.append(device)
            slots_out.append(int(slots[c]))
            times.append(t)
            values.append(v)
    return devices, slots_out, times, values


def reference_accumulate(
    device: list[int], slot: list[int], t_us: list[int], values: list[float],
    last: dict[tuple[int, int], tuple[int, float]], sums: dict[tuple[int, int], tuple[float, int]],
    add_to_interval: bool = True,
) -> None:
    """Slow reference of :func:`accumulate_latest` on dictionaries."""
    import math

    for d, s, t, v in zip(device, slot, t_us, values, strict=True):
        if s < 0 or not math.isfinite(v):
            continue
        if (d, s) not in last or t >= last[(d, s)][0]:
            last[(d, s)] = (t, v)
        if add_to_interval:
            total, n = sums.get((d, s), (0.0, 0))
            sums[(d, s)] = (total + v, n + 1)


def bucket_means(
    device: np.ndarray, slot: np.ndarray, t_us: np.ndarray, values: np.ndarray, interval_us: int, width: int
) -> list[tuple[int, int, int, float]]:
    """Means of finite samples per (device, slot, time bucket): ``(device, slot, bucket_start_us, mean)``.

    For replayed data, whose samples belong to past intervals rather than the current one.
    """
    keep = (slot >= 0) & np.isfinite(values)
    if not keep.any():
        return []
    device, slot, t_us, values = device[keep], slot[keep], t_us[keep], values[keep]
    bucket = t_us // interval_us
    low = int(bucket.min())
    combined = (bucket - low) * (int(device.max()) + 1) * width + device.astype(np.int64) * width + slot
    unique, inverse = np.unique(combined, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse)
    out: list[tuple[int, int, int, float]] = []
    stride = (int(device.max()) + 1) * width
    for k, code in enumerate(unique.tolist()):
        b, rest = divmod(code, stride)
        d, s = divmod(rest, width)
        out.append((d, s, (b + low) * interval_us, float(sums[k] / counts[k])))
    return out
