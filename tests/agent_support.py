"""Helpers for the edge agent tests: a recording sink for sources, and telemetry bookkeeping."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from edge_agent.device import DeviceInfo
from edge_agent.sources.base import Sink, Source
from forgeline.contract import schemas, telemetry, topics
from forgeline.contract.topics import DeviceRef


@dataclass
class RecordingStream:
    """A DeviceStream that keeps everything in lists (sources are tested against it without MQTT)."""

    _info: DeviceInfo
    samples: list[tuple[str, int, float]] = field(default_factory=list)  # (channel, t_us, value)
    events: list[dict[str, Any]] = field(default_factory=list)
    births: list[DeviceInfo] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def add(self, channel: int, t_us: int, value: float) -> None:
        with self.lock:
            self.samples.append((self._info.channels[channel], t_us, value))

    def extend(self, channels: Sequence[int], t_us: Sequence[int], values: Sequence[float]) -> None:
        for c, t, v in zip(channels, t_us, values, strict=True):
            self.add(c, t, v)

    def event(self, document: dict[str, Any]) -> None:
        schemas.validate("event", document)
        with self.lock:
            self.events.append(document)

    def announce(self, info: DeviceInfo) -> None:
        self._info = info
        self.births.append(info)

    def values(self, channel: str) -> list[float]:
        with self.lock:
            return [v for c, _, v in self.samples if c == channel]


@dataclass
class RecordingSink:
    streams: dict[str, RecordingStream] = field(default_factory=dict)

    def stream(self, info: DeviceInfo) -> RecordingStream:
        return self.streams.setdefault(info.key, RecordingStream(info))


@dataclass
class DeviceLog:
    """What a subscriber saw of one device's telemetry: batches by (epoch, seq)."""

    batches: dict[tuple[int, int], telemetry.Batch] = field(default_factory=dict)
    deliveries: int = 0
    historical: int = 0

    @property
    def duplicates(self) -> int:
        return self.deliveries - len(self.batches)

    def seqs(self, epoch: int) -> list[int]:
        return sorted(seq for e, seq in self.batches if e == epoch)

    def samples(self) -> int:
        return sum(b.header.n_samples for b in self.batches.values())


def telemetry_by_device(messages: Sequence[paho.MQTTMessage]) -> dict[str, DeviceLog]:
    """De-duplicate telemetry by (epoch, seq) per device, as the twin does; identical payloads required."""
    logs: dict[str, DeviceLog] = defaultdict(DeviceLog)
    for message in messages:
        parsed = topics.parse(message.topic)
        if parsed.kind != "telemetry" or parsed.device is None:
            continue
        batch = telemetry.decode(message.payload)
        log = logs[parsed.device.key]
        log.deliveries += 1
        log.historical += batch.header.historical
        key = (batch.header.epoch, batch.header.seq)
        previous = log.batches.get(key)
        if previous is not None:
            assert previous.values == batch.values or all(
                (a != a and b != b) or a == b for a, b in zip(previous.values, batch.values, strict=True)
            ), f"{parsed.device.key}: two different batches with seq {key}"
            assert previous.t_us == batch.t_us
        log.batches[key] = batch
    return dict(logs)


class CounterSource(Source):
    """A source whose one device reports ``x_counter`` = 0, 1, 2, ... (every sample identifiable)."""

    kind = "counter"

    def __init__(self, ref: DeviceRef, per_tick: int = 100, tick_s: float = 0.01, total: int | None = None) -> None:
        super().__init__()
        self.info = DeviceInfo(ref, "FDM", ("state", "x_counter"), custom_units={"x_counter": "count"})
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.total = total
        self.emitted = 0
        self.done = threading.Event()

    def devices(self) -> list[DeviceInfo]:
        return [self.info]

    def run(self, sink: Sink, stop: threading.Event) -> None:
        stream = sink.stream(self.info)
        while not stop.is_set():
            n = self.per_tick if self.total is None else min(self.per_tick, self.total - self.emitted)
            if n <= 0:
                self.done.set()
                stop.wait(0.05)
                continue
            t_us = int(time.time() * 1e6)
            stream.extend([1] * n, [t_us + i for i in range(n)], [float(self.emitted + i) for i in range(n)])
            self.emitted += n
            stop.wait(self.tick_s)

    def status(self) -> dict[str, Any]:
        return {"emitted": self.emitted}


def counter_values(log: DeviceLog) -> list[float]:
    """The x_counter values of a de-duplicated device log, in (epoch, seq) order."""
    out: list[float] = []
    for key in sorted(log.batches):
        batch = log.batches[key]
        index = batch.channels.index("x_counter") if "x_counter" in batch.channels else -1
        out += [v for c, v in zip(batch.channel_idx, batch.values, strict=True) if c == index]
    return out
