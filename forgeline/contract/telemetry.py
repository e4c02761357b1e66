"""Batched telemetry encoding: many samples of one device in one MQTT message.

A Python MQTT subscriber tops out near 30k messages/s here, so samples travel in batches. The
encoding is columnar and little-endian so the twin turns a payload into numpy arrays without a
per-sample Python loop, and the agent builds it with ``array``/``struct`` alone (no numpy on a
gateway).

Layout, version 1 (all little-endian)::

    offset size  field
    0      4     magic  b"FLT1"
    4      1     flags  bit 0: historical (replayed from the agent's spool)
    5      1     reserved (0)
    6      2     n_channels  (u16, 1..1024)
    8      4     epoch       (u32, the agent's stream epoch; a new epoch restarts sequence numbers)
    12     8     seq         (u64, per-device batch sequence number, +1 per batch)
    20     4     n_samples   (u32, 0..MAX_SAMPLES)
    24     8     t_base_us   (i64, microseconds since the Unix epoch)
    32     ...   channel table: n_channels × (u8 length, UTF-8 name)
    ...    ...   zero padding to a multiple of 8
    ...    8n    values      f64[n]
    ...    4n    t_offset_us u32[n]   (sample time = t_base_us + t_offset_us)
    ...    2n    channel     u16[n]   (index into the channel table)

14 bytes a sample plus a small header. The sequence number numbers batches, not samples: a batch
is the unit the agent spools, replays and the twin de-duplicates.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = b"FLT1"
FLAG_HISTORICAL = 0x01
HEADER = struct.Struct("<4sBBHIQIq")
assert HEADER.size == 32
MAX_CHANNELS = 1024
MAX_SAMPLES = 1_000_000
MAX_SPAN_US = 2**32 - 1  # a batch spans at most ~71 minutes
MAX_PAYLOAD = 16 * 1024 * 1024

_LITTLE = sys.byteorder == "little"


class TelemetryError(ValueError):
    """A telemetry batch that cannot be encoded or decoded; the message says why."""


@dataclass(frozen=True)
class Header:
    flags: int
    epoch: int
    seq: int
    n_samples: int
    t_base_us: int
    channels: tuple[str, ...]
    data_offset: int

    @property
    def historical(self) -> bool:
        return bool(self.flags & FLAG_HISTORICAL)


def _pad8(n: int) -> int:
    return (-n) % 8


def _le(arr: array[Any]) -> bytes:
    if not _LITTLE:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def encode(
    channels: Sequence[str],
    t_us: Sequence[int],
    channel_idx: Sequence[int],
    values: Sequence[float],
    *,
    seq: int,
    epoch: int = 0,
    historical: bool = False,
) -> bytes:
    """Encode one batch. ``t_us`` are absolute microsecond timestamps, ``channel_idx`` index ``channels``.

    Values may be NaN (a sensor that reports "no reading"); validation of ranges is the twin's job.
    """
    n = len(values)
    if not (len(t_us) == len(channel_idx) == n):
        raise TelemetryError(f"column lengths differ: t={len(t_us)} channel={len(channel_idx)} value={n}")
    if not 1 <= len(channels) <= MAX_CHANNELS:
        raise TelemetryError(f"a batch needs 1..{MAX_CHANNELS} channels, got {len(channels)}")
    if n > MAX_SAMPLES:
        raise TelemetryError(f"a batch holds at most {MAX_SAMPLES} samples, got {n}")
    if not 0 <= seq < 2**64:
        raise TelemetryError(f"seq out of range: {seq}")
    if not 0 <= epoch < 2**32:
        raise TelemetryError(f"epoch out of range: {epoch}")
    t_base = min(t_us) if n else 0
    offsets = array("I")
    try:
        offsets.extend(t - t_base for t in t_us)
    except OverflowError:
        raise TelemetryError(f"a batch may span at most {MAX_SPAN_US} µs") from None
    chan = array("H")
    try:
        chan.extend(channel_idx)
    except OverflowError:
        raise TelemetryError("channel index out of range") from None
    if n and max(chan) >= len(channels):
        raise TelemetryError(f"channel index {max(chan)} not in the channel table of {len(channels)}")
    table = bytearray()
    for name in channels:
        raw = name.encode("utf-8")
        if not 1 <= len(raw) <= 255:
            raise TelemetryError(f"channel name must be 1..255 bytes: {name!r}")
        table.append(len(raw))
        table += raw
    head = HEADER.pack(
        MAGIC, FLAG_HISTORICAL if historical else 0, 0, len(channels), epoch, seq, n, t_base
    )
    pad = b"\0" * _pad8(len(head) + len(table))
    vals = array("d", values)
    return b"".join((head, table, pad, _le(vals), _le(offsets), _le(chan)))


def read_header(payload: bytes | bytearray | memoryview) -> Header:
    """Parse and check the header and channel table; raise :class:`TelemetryError` if malformed."""
    if len(payload) > MAX_PAYLOAD:
        raise TelemetryError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    if len(payload) < HEADER.size:
        raise TelemetryError(f"payload of {len(payload)} bytes is shorter than the 32-byte header")
    magic, flags, _reserved, n_channels, epoch, seq, n, t_base = HEADER.unpack_from(payload, 0)
    if magic != MAGIC:
        raise TelemetryError(f"bad magic {bytes(magic)!r}: not a forgeline v1 telemetry batch")
    if not 1 <= n_channels <= MAX_CHANNELS:
        raise TelemetryError(f"channel count {n_channels} out of range 1..{MAX_CHANNELS}")
    if n > MAX_SAMPLES:
        raise TelemetryError(f"sample count {n} exceeds {MAX_SAMPLES}")
    pos = HEADER.size
    names: list[str] = []
    for _ in range(n_channels):
        if pos >= len(payload):
            raise TelemetryError("channel table truncated")
        length = payload[pos]
        pos += 1
        raw = bytes(payload[pos : pos + length])
        if length == 0 or len(raw) != length:
            raise TelemetryError("channel table truncated or empty channel name")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise TelemetryError("channel name is not valid UTF-8") from None
        pos += length
    pos += _pad8(pos)
    expected = pos + 14 * n
    if len(payload) != expected:
        raise TelemetryError(f"payload is {len(payload)} bytes, header says {expected} for {n} samples")
    return Header(flags, epoch, seq, n, t_base, tuple(names), pos)


@dataclass(frozen=True)
class Batch:
    """A decoded batch as plain Python lists (for tools and tests; the twin uses numpy views)."""

    header: Header
    t_us: list[int]
    channel_idx: list[int]
    values: list[float]

    @property
    def channels(self) -> tuple[str, ...]:
        return self.header.channels

    def samples(self) -> list[tuple[int, str, float]]:
        return [(t, self.channels[c], v) for t, c, v in zip(self.t_us, self.channel_idx, self.values, strict=True)]


def decode(payload: bytes | bytearray | memoryview) -> Batch:
    """Decode a batch into Python lists, checking every channel index."""
    h = read_header(payload)
    n, pos = h.n_samples, h.data_offset
    mv = memoryview(payload)
    vals, offs, chan = array("d"), array("I"), array("H")
    vals.frombytes(mv[pos : pos + 8 * n])
    offs.frombytes(mv[pos + 8 * n : pos + 12 * n])
    chan.frombytes(mv[pos + 12 * n : pos + 14 * n])
    if not _LITTLE:
        for a in (vals, offs, chan):
            a.byteswap()
    if n and max(chan) >= len(h.channels):
        raise TelemetryError(f"channel index {max(chan)} not in the channel table of {len(h.channels)}")
    return Batch(h, [h.t_base_us + o for o in offs], list(chan), list(vals))


def decode_numpy(payload: bytes | bytearray | memoryview) -> tuple[Header, Any, Any, Any]:
    """Decode into numpy arrays ``(header, t_us int64, channel_idx uint16, values float64)``.

    Zero-copy for the value and channel columns; checks every channel index.
    """
    import numpy as np

    h = read_header(payload)
    n, pos = h.n_samples, h.data_offset
    values = np.frombuffer(payload, dtype="<f8", count=n, offset=pos)
    offsets = np.frombuffer(payload, dtype="<u4", count=n, offset=pos + 8 * n)
    channel_idx = np.frombuffer(payload, dtype="<u2", count=n, offset=pos + 12 * n)
    if n and int(channel_idx.max()) >= len(h.channels):
        raise TelemetryError(
            f"channel index {int(channel_idx.max())} not in the channel table of {len(h.channels)}"
        )
    t_us = offsets.astype(np.int64) + np.int64(h.t_base_us)
    return h, t_us, channel_idx, values


def mark_historical(payload: bytes) -> bytes:
    """Return the same batch with the historical flag set (used when the agent replays its spool)."""
    if len(payload) < HEADER.size or payload[:4] != MAGIC:
        raise TelemetryError("not a forgeline v1 telemetry batch")
    return payload[:4] + bytes([payload[4] | FLAG_HISTORICAL]) + payload[5:]


def is_finite(value: float) -> bool:
    return math.isfinite(value)
