"""Anomaly injection for simulated channels, reproducible from a seed, with ground-truth labels.

Five kinds, sized in units of the channel's noise (``magnitude`` × sigma), over an episode
``[start, end)`` in sample time (seconds since the Unix epoch):

=============  ===============================================================================
drift          a ramp from 0 to ``magnitude`` σ over the episode
spike          ``magnitude`` σ added to every sample of a short episode (a few seconds at most)
stuck          the sensor repeats the first value it reported in the episode
level_shift    ``magnitude`` σ added for the whole episode
noise          extra Gaussian noise whose σ rises from 0 to ``magnitude`` σ over the episode
=============  ===============================================================================

Episodes come from the config (explicit ``episodes``) and/or a seeded random schedule per device
(``rate_per_hour``). The schedule is drawn from its own random stream per device, so it does not
depend on how many samples were taken. Every episode is written, when it is scheduled, as one JSON
line to the labels file, so detectors can be scored against ground truth:

    {"device": "factory-a/plant-a/hall1/fdm-01", "channel": "nozzle_temp", "kind": "drift",
     "start_ts": 1700000123.4, "end_ts": 1700000243.4, "magnitude": 6.0, "direction": 1, "sigma": 0.4}

Example:
    >>> injector = AnomalyInjector(seed=1, start_s=0.0)
    >>> injector.register("t/s/a/d", {"bed_temp": 0.5})
    >>> injector.add_episode(Episode("t/s/a/d", "bed_temp", "level_shift", 10.0, 20.0, 4.0, 1, 0.5))
    >>> injector.apply("t/s/a/d", "bed_temp", 5.0, 60.0), injector.apply("t/s/a/d", "bed_temp", 15.0, 60.0)
    (60.0, 62.0)
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

KINDS = ("drift", "spike", "stuck", "level_shift", "noise")
SPIKE_MAX_S = 3.0


@dataclass(frozen=True)
class Episode:
    device: str
    channel: str
    kind: str
    start_ts: float
    end_ts: float
    magnitude: float
    direction: int  # +1 or -1
    sigma: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"anomaly kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.end_ts > self.start_ts:
            raise ValueError("an anomaly episode must end after it starts")


@dataclass(frozen=True)
class RandomSchedule:
    """Random episodes: on average ``rate_per_hour`` per device (wall-clock hours)."""

    rate_per_hour: float = 4.0
    kinds: tuple[str, ...] = KINDS
    min_duration_s: float = 20.0
    max_duration_s: float = 120.0
    min_magnitude: float = 4.0
    max_magnitude: float = 8.0
    channels: tuple[str, ...] = ()  # empty: every analog channel of the device

    def __post_init__(self) -> None:
        if self.rate_per_hour <= 0:
            raise ValueError(f"rate_per_hour must be positive, not {self.rate_per_hour}")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"anomaly kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not 0 < self.min_duration_s <= self.max_duration_s:
            raise ValueError("min_duration_s must be positive and at most max_duration_s")
        if not 0 < self.min_magnitude <= self.max_magnitude:
            raise ValueError("min_magnitude must be positive and at most max_magnitude")


class _DeviceEpisodes:
    def __init__(self, sigmas: dict[str, float], schedule_rng: random.Random, noise_rng: random.Random) -> None:
        self.sigmas = sigmas
        self.schedule_rng = schedule_rng
        self.noise_rng = noise_rng
        self.episodes: list[Episode] = []  # sorted by start, non-overlapping per channel is not required
        self.stuck_values: dict[tuple[str, float], float] = {}
        self.next_random_start: float | None = None


class AnomalyInjector:
    """Applies scheduled anomaly episodes to sample values and writes their labels. Thread-safe."""

    def __init__(
        self,
        seed: int,
        start_s: float,
        *,
        schedule: RandomSchedule | None = None,
        labels_path: str | Path | None = None,
    ) -> None:
        self.seed = seed
        self.start_s = start_s
        self.schedule = schedule
        self._devices: dict[str, _DeviceEpisodes] = {}
        self._lock = threading.Lock()
        self._labels: IO[str] | None = None
        self.labels_path = Path(labels_path) if labels_path is not None else None
        self.labels: list[Episode] = []
        self._unwritten: list[Episode] = []

    def register(self, device: str, sigmas: dict[str, float]) -> None:
        """Declare the analog channels of a device (name -> noise σ) that anomalies may hit."""
        with self._lock:
            self._devices[device] = _DeviceEpisodes(
                dict(sigmas),
                random.Random(f"{self.seed}/{device}/schedule"),
                random.Random(f"{self.seed}/{device}/anomaly-noise"),
            )
            if self.schedule is not None:
                self._schedule_next(device, self.start_s)

    def add_episode(self, episode: Episode) -> None:
        with self._lock:
            entry = self._devices.get(episode.device)
            if entry is None:
                raise ValueError(f"anomaly for unknown device {episode.device!r}")
            if episode.channel not in entry.sigmas:
                raise ValueError(
                    f"anomaly on channel {episode.channel!r} of {episode.device}: choose one of {sorted(entry.sigmas)}"
                )
            self._record(entry, episode)

    def _record(self, entry: _DeviceEpisodes, episode: Episode) -> None:
        entry.episodes.append(episode)
        entry.episodes.sort(key=lambda e: e.start_ts)
        self.labels.append(episode)
        self._unwritten.append(episode)

    def _write_labels(self) -> None:
        # Written from the first sample on, so building a source (``forgeline agent --check``) writes nothing.
        if self.labels_path is None:
            self._unwritten.clear()
            return
        if self._labels is None:
            self.labels_path.parent.mkdir(parents=True, exist_ok=True)
            self._labels = open(self.labels_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        for episode in self._unwritten:
            self._labels.write(json.dumps(asdict(episode), separators=(",", ":")) + "\n")
        self._unwritten.clear()
        self._labels.flush()

    def _schedule_next(self, device: str, after_s: float) -> None:
        schedule = self.schedule
        entry = self._devices[device]
        if schedule is None:
            return
        channels = [c for c in (schedule.channels or tuple(entry.sigmas)) if c in entry.sigmas]
        if not channels:
            return
        rng = entry.schedule_rng
        start = after_s + rng.expovariate(schedule.rate_per_hour / 3600.0)
        kind = rng.choice(schedule.kinds)
        duration = rng.uniform(schedule.min_duration_s, schedule.max_duration_s)
        if kind == "spike":
            duration = min(duration, SPIKE_MAX_S)
        channel = rng.choice(channels)
        magnitude = rng.uniform(schedule.min_magnitude, schedule.max_magnitude)
        direction = rng.choice((1, -1))
        episode = Episode(device, channel, kind, round(start, 6), round(start + duration, 6), round(magnitude, 4),
                          direction, entry.sigmas[channel])
        self._record(entry, episode)
        entry.next_random_start = episode.end_ts

    def apply(self, device: str, channel: str, t_s: float, value: float) -> float:
        """The value a sensor reports at ``t_s`` given the episodes active then."""
        if self._unwritten:
            with self._lock:
                self._write_labels()
        entry = self._devices.get(device)
        if entry is None:
            return value
        if entry.next_random_start is not None and t_s >= entry.next_random_start:
            with self._lock:
                if entry.next_random_start is not None and t_s >= entry.next_random_start:
                    self._schedule_next(device, entry.next_random_start)
        if not entry.episodes or t_s < entry.episodes[0].start_ts:
            return value
        for episode in entry.episodes:
            if episode.start_ts > t_s:
                break
            if episode.channel != channel or t_s >= episode.end_ts:
                continue
            value = self._effect(entry, episode, t_s, value)
        # Forget episodes that are over (keeps apply() cheap on a months-long run).
        while entry.episodes and entry.episodes[0].end_ts <= t_s:
            over = entry.episodes.pop(0)
            entry.stuck_values.pop((over.channel, over.start_ts), None)
        return value

    def _effect(self, entry: _DeviceEpisodes, episode: Episode, t_s: float, value: float) -> float:
        size = episode.magnitude * episode.sigma * episode.direction
        progress = (t_s - episode.start_ts) / (episode.end_ts - episode.start_ts)
        if episode.kind == "drift":
            return value + size * progress
        if episode.kind in ("spike", "level_shift"):
            return value + size
        if episode.kind == "stuck":
            key = (episode.channel, episode.start_ts)
            if key not in entry.stuck_values:
                entry.stuck_values[key] = value
            return entry.stuck_values[key]
        # rising noise
        return value + entry.noise_rng.gauss(0.0, abs(size) * progress)

    def status(self) -> dict[str, Any]:
        return {"episodes": len(self.labels)}

    def close(self) -> None:
        with self._lock:
            if self._unwritten:
                self._write_labels()
        if self._labels is not None:
            self._labels.close()
            self._labels = None
