"""Ingest: decode, validate, de-duplicate and feed the core, one cycle of messages at a time.

The MQTT thread only queues raw messages; the ingest thread takes what has arrived (up to
``cycle_max_messages``) and hands it to :meth:`Ingestor.process`, which

1. parses every topic (cached) and checks the tenant is one this twin serves;
2. handles births/wills (:mod:`twin.registry`) and device events (builds) in arrival order;
3. checks each telemetry batch's header (size, magic, channel table, length), holds batches of a
   device whose birth has not arrived yet for ``unknown_device_hold_s``;
4. collects the payloads into :class:`twin.unpack.Columns`, checks every channel index and the
   clock skew in one kernel call, de-duplicates by (epoch, seq) (:mod:`twin.sequence`), and
5. unpacks and ingests the new batches with one core call for live and one for replayed
   (historical) data.

Anything rejected becomes a :class:`DeadLetter` with the reason; nothing raises out of
:meth:`Ingestor.process` for bad input.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgeline.contract import schemas, telemetry, topics
from forgeline.contract.topics import DeviceRef, TopicError
from twin.config import TwinConfig
from twin.core import BuildError, CoreError, FleetCore
from twin.registry import Device, Registry
from twin.sequence import DeviceSequences, Verdict
from twin.unpack import Columns, Latest, Scratch, bucket_means

log = logging.getLogger(__name__)

_HEADER = telemetry.HEADER
_MAGIC = telemetry.MAGIC


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    reason: str
    payload: bytes
    tenant: str | None
    ts: float
    size: int = -1  # of the whole payload (``payload`` keeps only its head)

    def document(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "topic": self.topic[:1024],
            "reason": self.reason[:2000],
            "size": self.size if self.size >= 0 else len(self.payload),
            "payload_head": base64.b64encode(self.payload[:64]).decode("ascii"),
        }


@dataclass
class Counters:
    """Cumulative counts, exported as Prometheus metrics and in the ops measurement."""

    messages: int = 0
    telemetry_messages: int = 0
    samples_accepted: int = 0
    samples_rejected: dict[str, int] = field(default_factory=dict)  # reason -> samples
    batches_duplicate: int = 0
    batches_historical: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)  # reason class -> messages
    births: int = 0
    events: int = 0
    anomaly_events: int = 0
    cycles: int = 0

    def reject_samples(self, reason: str, count: int) -> None:
        if count:
            self.samples_rejected[reason] = self.samples_rejected.get(reason, 0) + count


@dataclass
class DeviceRuntime:
    """Per device what the ingest knows beyond the core: sequences, job, sample counters."""

    sequences: DeviceSequences = field(default_factory=DeviceSequences)
    samples: int = 0
    last_table: bytes = b""
    last_slots: np.ndarray | None = None
    last_data_offset: int = 0
    job: dict[str, Any] | None = None
    last_event_ts: float | None = None


@dataclass
class CycleResult:
    touched: set[int] = field(default_factory=set)  # core device indices with news
    dead_letters: list[DeadLetter] = field(default_factory=list)
    anomaly_events: list[Any] = field(default_factory=list)  # twin.core.AnomalyEvent
    device_events: list[tuple[Device, dict[str, Any]]] = field(default_factory=list)
    samples: int = 0
    historical_means: list[tuple[int, int, int, float]] = field(default_factory=list)  # device, slot, t_us, mean


@dataclass(slots=True)
class _Pending:
    topic: str
    device: Device
    runtime: DeviceRuntime
    header: tuple[int, int, int, int, int]  # flags, epoch, seq, n, t_base
    channels_key: bytes
    slots: np.ndarray
    payload: bytes


def _reason_class(reason: str) -> str:
    return reason.split(":", 1)[0]


class Ingestor:
    """Everything between raw MQTT messages and the core; owned by the ingest thread."""

    def __init__(self, config: TwinConfig, core: FleetCore | None = None) -> None:
        self.config = config
        self.core = core or FleetCore(max_devices=config.max_devices, channels_per_device=config.channels_per_device)
        self.registry = Registry(self.core)
        self.runtime: dict[int, DeviceRuntime] = {}
        self.counters = Counters()
        self._topic_cache: dict[str, tuple[str, DeviceRef | None, str | None]] = {}
        self._message_limit = min(config.max_message_bytes, telemetry.MAX_PAYLOAD)
        self._unknown: dict[str, deque[tuple[float, str, bytes]]] = {}
        self._tenants = frozenset(config.tenants) if config.tenants else None
        capacity = self.core.capacity
        width = self.core.channels_per_device
        self.last_value = np.full((capacity, width), np.nan)
        self.last_t = np.full((capacity, width), np.iinfo(np.int64).min, dtype=np.int64)
        self.interval_sum = np.zeros((capacity, width))
        self.interval_count = np.zeros((capacity, width), dtype=np.int64)
        self.historical_interval_us = 0  # set when a time-series writer wants replayed data per time bucket
        self._scratch = Scratch()  # the cycles' joined payloads and columns, kept (no page faults per cycle)

    def warm_up(self) -> None:
        """Run one tiny batch through scratch copies of the kernels so numba compiles (or loads its
        cache) now, not when the first messages are waiting."""
        scratch = Ingestor(self.config.with_overrides(tenants=None), FleetCore(max_devices=1, channels_per_device=2))
        ref = DeviceRef("warmup", "s", "a", "d")
        birth = schemas.dumps({"status": "online", "ts": 0.0, "technology": "FDM",
                               "channels": [{"name": "state", "unit": "code"}]})
        now = time.time()
        payload = telemetry.encode(["state"], [int(now * 1e6)], [0], [3.0], seq=0)
        historical = telemetry.encode(["state"], [int(now * 1e6) - 1], [0], [3.0], seq=1, historical=True)
        scratch.historical_interval_us = 1_000_000
        scratch.process([(ref.status_topic, birth), (ref.telemetry_topic, payload),
                         (ref.telemetry_topic, historical)], now)
        scratch.core.kpis_all()
        scratch.core.kpis(0)

    # ---- helpers ------------------------------------------------------------------------------------

    def _ensure_capacity(self) -> None:
        capacity = self.core.capacity
        if self.last_value.shape[0] >= capacity:
            return
        grow = capacity - self.last_value.shape[0]
        width = self.core.channels_per_device
        self.last_value = np.vstack([self.last_value, np.full((grow, width), np.nan)])
        self.last_t = np.vstack([self.last_t, np.full((grow, width), np.iinfo(np.int64).min, dtype=np.int64)])
        self.interval_sum = np.vstack([self.interval_sum, np.zeros((grow, width))])
        self.interval_count = np.vstack([self.interval_count, np.zeros((grow, width), dtype=np.int64)])

    def runtime_of(self, device: Device) -> DeviceRuntime:
        runtime = self.runtime.get(device.index)
        if runtime is None:
            runtime = self.runtime[device.index] = DeviceRuntime()
        return runtime

    def _parse(self, topic: str) -> tuple[str, DeviceRef | None, str | None]:
        cached = self._topic_cache.get(topic)
        if cached is None:
            parsed = topics.parse(topic)
            cached = (parsed.kind, parsed.device, parsed.tenant)
            if len(self._topic_cache) > 200_000:
                self._topic_cache.clear()
            self._topic_cache[topic] = cached
        return cached

    def _dead(self, result: CycleResult, topic: str, reason: str, payload: bytes, tenant: str | None,
              now: float) -> None:
        result.dead_letters.append(DeadLetter(topic, reason, bytes(payload[:4096]), tenant, now, len(payload)))
        cls = _reason_class(reason)
        self.counters.dead_letters[cls] = self.counters.dead_letters.get(cls, 0) + 1

    # ---- the cycle ----------------------------------------------------------------------------------

    def process(self, messages: list[tuple[str, bytes]], now: float | None = None) -> CycleResult:
        """Process one cycle of ``(topic, payload)`` messages in arrival order."""
        now = time.time() if now is None else now
        result = CycleResult()
        batches: list[_Pending] = []
        columns = Columns(self._scratch)
        work: deque[tuple[str, bytes]] = deque(messages)
        self.counters.cycles += 1
        while work:
            topic, payload = work.popleft()
            self.counters.messages += 1
            try:
                kind, ref, tenant = self._parse(topic)
            except TopicError as exc:
                self._dead(result, topic, f"bad topic: {exc}", payload, None, now)
                continue
            if tenant is not None and self._tenants is not None and tenant not in self._tenants:
                self._dead(result, topic, f"wrong tenant: {tenant!r} is not served by this twin", payload, tenant, now)
                continue
            try:
                if kind == "telemetry" and ref is not None:
                    self._telemetry(ref, topic, payload, now, result, batches, columns)
                elif kind == "status" and ref is not None:
                    replay = self._status(ref, topic, payload, now, result)
                    work.extendleft(reversed(replay))
                elif kind == "event" and ref is not None:
                    self._event(ref, topic, payload, now, result)
                else:
                    self._dead(result, topic, f"unexpected topic: the twin does not consume {kind}", payload,
                               tenant, now)
            except (schemas.PayloadError, telemetry.TelemetryError, CoreError, BuildError) as exc:
                self._dead(result, topic, f"{type(exc).__name__}: {exc}", payload, tenant, now)
            except Exception as exc:  # a bug must not stop ingest for everyone: dead-letter and log
                log.exception("unexpected error on %s", topic)
                self._dead(result, topic, f"internal error: {type(exc).__name__}: {exc}", payload, tenant, now)
        self._expire_unknown(now, result)
        if batches:
            self._ingest_batches(batches, columns, now, result)
        events = self.core.drain_events()
        if events:
            self.counters.anomaly_events += len(events)
            result.anomaly_events.extend(events)
        return result

    # ---- telemetry ----------------------------------------------------------------------------------

    def _telemetry(self, ref: DeviceRef, topic: str, payload: bytes, now: float, result: CycleResult,
                   batches: list[_Pending], columns: Columns) -> None:
        self.counters.telemetry_messages += 1
        size = len(payload)
        limit = self._message_limit
        if size > limit:
            raise telemetry.TelemetryError(f"oversized: {size} bytes exceeds the {limit}-byte limit")
        device = self.registry.devices.get(ref.key)
        if device is None:
            self._hold_unknown(ref, topic, payload, now, result)
            return
        if size < _HEADER.size:
            raise telemetry.TelemetryError(f"payload of {size} bytes is shorter than the 32-byte header")
        magic, flags, _r, n_channels, epoch, seq, n, t_base = _HEADER.unpack_from(payload, 0)
        if magic != _MAGIC:
            raise telemetry.TelemetryError(f"bad magic {bytes(magic)!r}: not a forgeline v1 telemetry batch")
        runtime = self.runtime_of(device)
        table = runtime.last_table
        if table and payload.startswith(table, 32) and runtime.last_slots is not None \
                and runtime.last_slots.shape[0] == n_channels:
            data_offset = runtime.last_data_offset
            if size != data_offset + 14 * n or n > telemetry.MAX_SAMPLES:
                telemetry.read_header(payload)  # raises with the precise reason
            slots = runtime.last_slots
        else:
            header = telemetry.read_header(payload)
            data_offset = header.data_offset
            table = bytes(payload[32:data_offset])
            slots = self.registry.slots_for(device, table, header.channels)
            runtime.last_table, runtime.last_slots, runtime.last_data_offset = table, slots, data_offset
        if (t_base - now * 1e6) > self.config.max_clock_skew_s * 1e6:
            raise telemetry.TelemetryError(
                f"clock skew: batch starts {(t_base / 1e6 - now):.0f} s in the future "
                f"(limit {self.config.max_clock_skew_s:.0f} s)"
            )
        columns.add(payload, data_offset, n, t_base, device.index, slots)
        batches.append(_Pending(topic, device, runtime, (flags, epoch, seq, n, t_base), table, slots, payload))

    def _hold_unknown(self, ref: DeviceRef, topic: str, payload: bytes, now: float, result: CycleResult) -> None:
        held = self._unknown.get(ref.key)
        if held is None:
            if len(self._unknown) >= 10_000:
                self._dead(result, topic, "unknown device: no birth message (too many unknown devices held)",
                           payload, ref.tenant, now)
                return
            held = self._unknown[ref.key] = deque()
        if len(held) >= self.config.unknown_device_max_messages:
            _t, old_topic, old_payload = held.popleft()
            self._dead(result, old_topic, "unknown device: no birth message (hold buffer full)", old_payload,
                       ref.tenant, now)
        held.append((now, topic, payload))

    def expire_unknown(self, now: float) -> list[DeadLetter]:
        """Dead-letter held batches of devices whose birth did not come in time (between cycles)."""
        result = CycleResult()
        self._expire_unknown(now, result)
        return result.dead_letters

    def _expire_unknown(self, now: float, result: CycleResult) -> None:
        if not self._unknown:
            return
        limit = now - self.config.unknown_device_hold_s
        for key in list(self._unknown):
            held = self._unknown[key]
            while held and held[0][0] < limit:
                _t, topic, payload = held.popleft()
                self._dead(result, topic,
                           f"unknown device: no birth message within {self.config.unknown_device_hold_s:.0f} s",
                           payload, key.split("/", 1)[0], now)
            if not held:
                del self._unknown[key]

    def _ingest_batches(self, batches: list[_Pending], columns: Columns, now: float, result: CycleResult) -> None:
        max_channel, max_offset = columns.check()
        n = len(batches)
        # the checks of every batch at once; the loop below only looks at the few that fail
        table_sizes = np.fromiter((b.slots.shape[0] for b in batches), dtype=np.int64, count=n)
        starts = np.fromiter((b.header[4] for b in batches), dtype=np.int64, count=n)
        bad_channel = max_channel >= table_sizes  # an empty batch reports -1
        future = (starts + max_offset) - int(now * 1e6) > int(self.config.max_clock_skew_s * 1e6)
        rejected = (bad_channel | future).tolist()
        live_list = [False] * n
        historical_list = [False] * n
        counters = self.counters
        touched = result.touched
        for i, batch in enumerate(batches):
            flags, epoch, seq, count, _t_base = batch.header
            if rejected[i]:
                if bad_channel[i]:
                    reason = (f"TelemetryError: channel index {max_channel[i]} not in the channel table of "
                              f"{batch.slots.shape[0]}")
                else:
                    reason = (f"TelemetryError: clock skew: samples more than {self.config.max_clock_skew_s:.0f} s "
                              "in the future")
                self._dead(result, batch.topic, reason, batch.payload, batch.device.ref.tenant, now)
                continue
            verdict = batch.runtime.sequences.admit(epoch, seq)
            if verdict is Verdict.DUPLICATE:
                counters.batches_duplicate += 1
                touched.add(batch.device.index)  # its duplicate count changed
                continue
            if verdict is Verdict.STALE_EPOCH:
                self._dead(result, batch.topic, f"stale epoch: epoch {epoch} is older than every epoch still "
                           "tracked for this device", batch.payload, batch.device.ref.tenant, now)
                continue
            if flags & telemetry.FLAG_HISTORICAL:
                historical_list[i] = True
                counters.batches_historical += 1
            else:
                live_list[i] = True
            batch.runtime.samples += count
            touched.add(batch.device.index)
        live = np.array(live_list, dtype=np.bool_)
        historical = np.array(historical_list, dtype=np.bool_)
        self._ensure_capacity()
        for use, is_historical in ((live, False), (historical, True)):
            if not use.any():
                continue
            # the latest values and interval sums are accumulated while unpacking (one pass)
            latest = Latest(self.last_value, self.last_t, self.interval_sum, self.interval_count, not is_historical)
            device, slot, t_us, values = columns.unpack(use, latest)
            bad = slot < 0
            if bad.any():
                self.counters.reject_samples("channel", int(bad.sum()))
                keep = ~bad
                device, slot, t_us, values = device[keep], slot[keep], t_us[keep], values[keep]
            stats = self.core.ingest(device, slot, t_us, values, historical=is_historical)
            self.counters.samples_accepted += stats.accepted
            self.counters.reject_samples("nonfinite", stats.rejected_nonfinite)
            self.counters.reject_samples("index", stats.rejected_index)
            self.counters.reject_samples("value", stats.rejected_value)
            self.counters.reject_samples("late", stats.late)
            result.samples += stats.accepted
            if is_historical and self.historical_interval_us:
                result.historical_means.extend(bucket_means(device, slot, t_us, values, self.historical_interval_us,
                                                            self.core.channels_per_device))

    # ---- births and events ------------------------------------------------------------------------

    def _status(self, ref: DeviceRef, topic: str, payload: bytes, now: float,
                result: CycleResult) -> list[tuple[str, bytes]]:
        if not payload:  # a cleared retained status: the device was decommissioned; keep its twin
            return []
        known = self.registry.get(ref.key)
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        if known is not None and known.online and known.birth_digest == digest:
            return []  # the same birth again (a retained redelivery): schema validation costs ~ms
        document = schemas.loads("status", payload)
        if document["status"] == "offline":
            device = self.registry.get(ref.key)
            if device is not None:
                device.online = False
                result.touched.add(device.index)
            return []
        device, problems = self.registry.register(ref, document)
        device.birth_digest = digest
        self._ensure_capacity()
        self.counters.births += 1
        runtime = self.runtime_of(device)
        runtime.last_table, runtime.last_slots = b"", None
        result.touched.add(device.index)
        if problems:
            self._dead(result, topic, "wrong unit: " + "; ".join(problems), payload, ref.tenant, now)
        held = self._unknown.pop(ref.key, None)
        return [(t, p) for _ts, t, p in held] if held else []

    def _event(self, ref: DeviceRef, topic: str, payload: bytes, now: float, result: CycleResult) -> None:
        document = schemas.loads("event", payload)
        device = self.registry.get(ref.key)
        if device is None:
            raise CoreError(f"unknown device: event from {ref.key} before its birth message")
        self.counters.events += 1
        runtime = self.runtime_of(device)
        kind = document["type"]
        t_us = int(document["ts"] * 1e6)
        if kind == "job_started" and device.capabilities.get("technology") != "line":
            volume_mm = device.capabilities.get("build_volume_mm")
            parts = document.get("parts") or []
            volumes = [p["volume_cm3"] for p in parts for _ in range(int(p.get("quantity", 1)))]
            masses = [p.get("mass_g") for p in parts for _ in range(int(p.get("quantity", 1)))]
            job: dict[str, Any] = {"job_id": document.get("job_id"), "started": document["ts"], "parts": len(volumes)}
            if volume_mm and volumes:
                chamber_cm3 = volume_mm[0] * volume_mm[1] * volume_mm[2] / 1000.0
                self.core.start_build(
                    device.index,
                    t_us=t_us,
                    job_id=str(document.get("job_id", "")),
                    chamber_volume_cm3=chamber_cm3,
                    part_volumes_cm3=volumes,
                    part_masses_g=masses if all(m is not None for m in masses) else None,
                    material_density_g_cm3=document.get("material_density_g_cm3"),
                    build_height_mm=document.get("build_height_mm"),
                    chamber_height_mm=volume_mm[2],
                )
            runtime.job = job
        elif kind in ("job_finished", "job_aborted") and runtime.job is not None:
            try:
                self.core.finish_build(device.index, t_us=t_us)
            except CoreError:
                pass  # a job without parts never started a build in the core
            runtime.job = None
        runtime.last_event_ts = document["ts"]
        result.device_events.append((device, document))
        result.touched.add(device.index)

    # ---- read side ----------------------------------------------------------------------------------

    def reported(self, index: int) -> dict[str, float | None]:
        names = self.core.channels(index)
        row = self.last_value[index].tolist()
        return {name: (row[i] if math.isfinite(row[i]) else None) for i, name in enumerate(names)}

    def take_interval_means(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean per (device, slot) since the last call (NaN where no sample) and the counts; resets."""
        counts = self.interval_count.copy()
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, self.interval_sum / np.maximum(counts, 1), np.nan)
        self.interval_sum[:] = 0.0
        self.interval_count[:] = 0
        return means, counts
