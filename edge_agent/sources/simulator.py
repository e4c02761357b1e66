"""Simulated 3D printers (FDM, SLA, DLP, SLS, MJF, metal powder bed) and a microwave-oven line.

Printers run a state machine (idle → heating → printing ⇄ paused → idle, with error, maintenance and
offline periods) and print jobs with a part list (bounding box, volume, mass, material) and layer
progress. Jobs come from ``dispatch_job`` commands (order routing) or, with ``auto_jobs``, from a
seeded generator. Channels follow first-order dynamics towards per-state targets plus Gaussian
noise, so a heating printer looks like one.

The oven line passes units (serial numbers, tagged with product model and revision) through stations
in order: ``assembly`` → ``power`` (magnetron output power, cavity temperature rise) → ``leak``
(door-seal leakage) → ``safety`` (hipot current, insulation resistance). A unit that fails a test
leaves the line as scrap; each station reports ``unit_produced`` events with its measurements and
keeps cumulative ``produced_total``/``good_total``/``scrap_total`` counters.

Process time runs ``speed`` times faster than the wall clock (a 3 h build takes 18 s at
``speed: 600``); sample timestamps are wall-clock time, sampled at ``rate_hz``. Everything random is
drawn from streams seeded by ``seed`` and the device key, and :meth:`SimulatorSource.step` can be
driven with any clock, so a run is reproducible. Anomalies are injected by
:class:`edge_agent.anomalies.AnomalyInjector`, which writes ground-truth labels.

Config (``type: simulator``)::

    tenant: factory-a            # defaults for the devices below
    site: plant-a
    area: hall1
    seed: 42
    speed: 60                    # process time / wall time
    rate_hz: 1                   # samples per channel per second (wall clock)
    tick_s: 0.1                  # how often the simulation advances
    auto_jobs: true              # printers start generated jobs when idle
    printers:
      - {device: fdm-01, technology: FDM}
      - {device: sls-01, technology: SLS, tenant: factory-b, materials: [PA12], build_volume_mm: [340, 340, 600]}
        # profile_revision: the version of the process profiles its jobs are printed with (default 1);
        # each job's events carry material, product_model (the profile, "<material>-standard" unless the
        # dispatch_job names one) and product_revision (the version): set_config product_revision changes it
    lines:
      - {area: line1, product_model: MW-20, product_revision: B, stations: [assembly, power, leak, safety]}
    anomalies:
      labels_file: anomaly-labels.jsonl
      rate_per_hour: 4           # random episodes per device and hour (omit for none)
      kinds: [drift, spike, stuck, level_shift, noise]
      episodes:                  # explicit episodes, start_s after the source starts
        - {device: fdm-01, channel: nozzle_temp, kind: drift, start_s: 30, duration_s: 60, magnitude: 6}
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_agent.anomalies import KINDS, AnomalyInjector, Episode, RandomSchedule
from edge_agent.device import DeviceInfo
from edge_agent.sources.base import CommandError, DeviceStream, Sink, Source
from forgeline.contract.topics import DeviceRef, TopicError, check_ident
from forgeline.contract.vocabulary import CHANNELS, DeviceState, Technology

COUNTERS = ("produced_total", "good_total", "scrap_total")
_REST, _HEAT, _PRINT = 0, 1, 2


@dataclass(frozen=True)
class Dynamics:
    """A channel that moves towards a target per state group (rest, heating, printing)."""

    targets: tuple[float, float, float]
    tau_s: float  # process seconds
    sigma: float  # measurement noise


@dataclass(frozen=True)
class TechProfile:
    vendor: str
    model: str
    build_volume_mm: tuple[float, float, float]
    materials: Mapping[str, float]  # name -> density g/cm³
    heat_time_s: float
    layer_height_mm: float
    layer_time_s: float
    build_height_mm: tuple[float, float]
    parts: tuple[int, int]
    powder_bed: bool
    dynamics: Mapping[str, Dynamics]
    level_channel: str | None  # resin_level / powder_level
    cost_per_hour: float


def _vib(rest: float, printing: float) -> Dynamics:
    return Dynamics((rest, rest * 1.5, printing), 5.0, 0.05 + printing * 0.05)


PROFILES: dict[Technology, TechProfile] = {
    Technology.FDM: TechProfile(
        "Prusa", "CORE One", (250, 220, 270), {"PLA": 1.24, "PETG": 1.27}, 180, 0.2, 40, (10, 60), (1, 6), False,
        {"nozzle_temp": Dynamics((25, 215, 215), 60, 0.4), "bed_temp": Dynamics((25, 60, 60), 120, 0.3),
         "chamber_temp": Dynamics((24, 28, 35), 600, 0.2), "vibration": _vib(0.1, 2.5)},
        None, 4.0),
    Technology.SLA: TechProfile(
        "Formlabs", "Form 4", (200, 125, 210), {"standard-resin": 1.18, "tough-resin": 1.15}, 600, 0.05, 10,
        (10, 50), (1, 8), False,
        {"lamp_power": Dynamics((0, 0, 1.2), 1, 0.01), "chamber_temp": Dynamics((24, 31, 31), 300, 0.1),
         "vibration": _vib(0.05, 0.4)},
        "resin_level", 6.0),
    Technology.DLP: TechProfile(
        "Carbon", "M2", (189, 118, 326), {"rigid-resin": 1.2, "elastic-resin": 1.05}, 300, 0.05, 4, (5, 40),
        (2, 12), False,
        {"lamp_power": Dynamics((0, 0, 18), 1, 0.2), "chamber_temp": Dynamics((24, 30, 30), 300, 0.1),
         "vibration": _vib(0.05, 0.3)},
        "resin_level", 12.0),
    Technology.SLS: TechProfile(
        "EOS", "P 396", (340, 340, 600), {"PA12": 1.01, "PA11": 1.05}, 3600, 0.1, 12, (40, 150), (8, 40), True,
        {"laser_power": Dynamics((0, 0, 30), 1, 0.8), "bed_temp": Dynamics((25, 172, 172), 900, 0.3),
         "chamber_temp": Dynamics((25, 150, 160), 1200, 0.5), "oxygen": Dynamics((209000, 30000, 10000), 600, 200),
         "vibration": _vib(0.2, 1.5)},
        "powder_level", 30.0),
    Technology.MJF: TechProfile(
        "HP", "Jet Fusion 5200", (380, 284, 380), {"PA12": 1.01, "PA11": 1.05}, 2400, 0.08, 10, (40, 150),
        (10, 60), True,
        {"lamp_power": Dynamics((0, 800, 1500), 20, 15), "bed_temp": Dynamics((25, 165, 168), 900, 0.3),
         "chamber_temp": Dynamics((25, 120, 140), 1200, 0.5), "vibration": _vib(0.2, 3.0)},
        "powder_level", 35.0),
    Technology.METAL: TechProfile(
        "EOS", "M 290", (250, 250, 325), {"316L": 7.99, "Ti64": 4.43}, 1800, 0.04, 60, (10, 40), (4, 20), True,
        {"laser_power": Dynamics((0, 0, 280), 1, 3), "bed_temp": Dynamics((25, 80, 80), 600, 0.3),
         "chamber_temp": Dynamics((25, 35, 40), 900, 0.2), "oxygen": Dynamics((209000, 800, 500), 300, 20),
         "vibration": _vib(0.2, 1.2)},
        "powder_level", 60.0),
}

# Oven line stations: their measurement channels, nominal cycle time (s) and continuous channels.
STATIONS: dict[str, tuple[tuple[str, ...], float]] = {
    "assembly": ((), 42.0),
    "power": (("magnetron_power", "cavity_temp_rise"), 65.0),
    "leak": (("door_leakage",), 18.0),
    "safety": (("hipot_current", "insulation_resistance"), 24.0),
}
STATION_DYNAMICS: dict[str, Dynamics] = {
    "vibration": Dynamics((0.1, 0.1, 1.8), 3.0, 0.1),
    "current": Dynamics((0.3, 0.3, 4.5), 2.0, 0.1),
}
MEASUREMENT_SIGMA = {
    "magnetron_power": 15.0, "cavity_temp_rise": 0.3, "door_leakage": 0.1, "hipot_current": 0.3,
    "insulation_resistance": 200.0, "cycle_time": 2.0,
}


def _group(state: DeviceState) -> int:
    if state is DeviceState.PRINTING:
        return _PRINT
    if state is DeviceState.HEATING:
        return _HEAT
    return _REST


def _hazard(rng: random.Random, rate_per_hour: float, dt_s: float) -> bool:
    """True with the probability of at least one event of a Poisson process in ``dt_s``."""
    return rng.random() < 1.0 - math.exp(-rate_per_hour * dt_s / 3600.0)


def _clamp(channel: str, value: float) -> float:
    entry = CHANNELS.get(channel)
    if entry is None or math.isnan(value):
        return value
    return min(max(value, entry.low), entry.high)


@dataclass
class Job:
    job_id: str
    parts: list[dict[str, Any]]
    material: str
    density: float
    build_height_mm: float
    layers: int
    layer_time_s: float
    process_profile: str  # the loop's product model of a print job ...
    profile_revision: str  # ... and its revision: the version of that process profile
    elapsed_s: float = 0.0

    @property
    def print_time_s(self) -> float:
        return self.layers * self.layer_time_s

    def tags(self) -> dict[str, Any]:
        """What every event of the job carries: its material and process profile version."""
        return {"material": self.material, "product_model": self.process_profile,
                "product_revision": self.profile_revision}

    def started_event(self, ts: float) -> dict[str, Any]:
        return {
            "type": "job_started", "ts": ts, "job_id": self.job_id, "parts": self.parts, **self.tags(),
            "material_density_g_cm3": self.density, "build_height_mm": round(self.build_height_mm, 3),
        }


class Unit:
    """One simulated device: its state, process model and the samples it reports."""

    info: DeviceInfo
    state: DeviceState

    def advance(self, dt_s: float, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        raise NotImplementedError

    def sample(self, now_s: float) -> list[tuple[int, float]]:
        raise NotImplementedError


class SimulatedPrinter(Unit):
    """A 3D printer of one technology."""

    def __init__(self, info: DeviceInfo, profile: TechProfile, seed: int, *, auto_jobs: bool,
                 idle_mean_s: float = 1200.0, profile_revision: str = "1") -> None:
        self.info = info
        self.profile = profile
        self.profile_revision = profile_revision  # version of the process profiles new jobs are printed with
        self.rng = random.Random(f"{seed}/{info.key}/process")
        self.noise = random.Random(f"{seed}/{info.key}/noise")
        self.auto_jobs = auto_jobs
        self.idle_mean_s = idle_mean_s
        self.state = DeviceState.IDLE
        self.timer_s = self.rng.uniform(0, idle_mean_s / 4)  # time left in a timed state
        self.job: Job | None = None
        self.queue: deque[Job] = deque()
        self.values = {name: dyn.targets[_REST] for name, dyn in profile.dynamics.items()}
        self.level = 1.0
        self.produced = self.good = self.scrap = 0
        self.jobs_done = 0
        self.jobs_since_maintenance = 0
        self.job_counter = 0
        self.lock = threading.Lock()
        self.layer_progress = 0.0
        self.layer = 0

    # --- jobs ------------------------------------------------------------------------------------

    def generate_job(self) -> Job:
        rng = self.rng
        profile = self.profile
        material = rng.choice(list(self.info.materials) or list(profile.materials))
        density = profile.materials.get(material, 1.1)
        self.job_counter += 1
        height = rng.uniform(*profile.build_height_mm)
        bx, by, bz = self.info.build_volume_mm or profile.build_volume_mm
        n_parts = rng.randint(*profile.parts)
        if profile.powder_bed:
            # Service bureaus stack polymer powder-bed builds (SLS, MJF) most of the chamber high and nest
            # parts until the used bed is 6-16 % product; metal builds stay low (supports, hours per mm).
            if self.info.technology != Technology.METAL.value:
                height = rng.uniform(0.35, 0.95) * bz
            target_cm3 = bx * by * height / 1000 * rng.uniform(0.06, 0.16)
            n_parts = 10_000
        parts = []
        total_cm3 = 0.0
        for i in range(n_parts):
            if profile.powder_bed and total_cm3 >= target_cm3:
                break
            size_x = rng.uniform(10, bx / (3 if profile.powder_bed else 2.5))
            size_y = rng.uniform(10, by / (3 if profile.powder_bed else 2.5))
            size_z = rng.uniform(5, min(height, 120)) if (profile.powder_bed or i) else height
            volume_cm3 = size_x * size_y * size_z / 1000 * rng.uniform(0.08, 0.35)
            total_cm3 += volume_cm3
            parts.append({
                "part_id": f"{self.info.ref.device}-j{self.job_counter}-p{i + 1}",
                "bbox_mm": [round(size_x, 2), round(size_y, 2), round(size_z, 2)],
                "volume_cm3": round(volume_cm3, 3),
                "mass_g": round(volume_cm3 * density, 3),
                "material": material,
            })
        return self._job(f"{self.info.ref.device}-job{self.job_counter}", parts, material, density, height)

    def _job(self, job_id: str, parts: list[dict[str, Any]], material: str, density: float, height: float,
             process_profile: str | None = None, profile_revision: str | None = None) -> Job:
        layers = max(1, math.ceil(height / self.profile.layer_height_mm))
        return Job(job_id, parts, material, density, height, layers, self.profile.layer_time_s,
                   process_profile or f"{material}-standard", profile_revision or self.profile_revision)

    def dispatch(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Queue a job from a ``dispatch_job`` command (validated here; errors name the bad field)."""
        job_id = spec.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise CommandError("dispatch_job needs a job_id string")
        parts = spec.get("parts")
        if not isinstance(parts, list) or not parts:
            raise CommandError("dispatch_job needs a non-empty parts list")
        volume = self.info.build_volume_mm or self.profile.build_volume_mm
        material = spec.get("material") or (self.info.materials[0] if self.info.materials else None)
        if material not in (self.info.materials or tuple(self.profile.materials)):
            raise CommandError(f"material {material!r} is not loaded on {self.info.ref.device}: "
                               f"loaded {list(self.info.materials)}")
        density = spec.get("material_density_g_cm3", self.profile.materials.get(str(material), 1.1))
        if isinstance(density, bool) or not isinstance(density, int | float) or density <= 0:
            raise CommandError("material_density_g_cm3 must be a positive number")
        clean: list[dict[str, Any]] = []
        for i, part in enumerate(parts):
            if not isinstance(part, Mapping):
                raise CommandError(f"parts[{i}] must be an object")
            part_id = part.get("part_id")
            bbox = part.get("bbox_mm")
            part_volume = part.get("volume_cm3")
            if not isinstance(part_id, str) or not part_id:
                raise CommandError(f"parts[{i}].part_id must be a non-empty string")
            if (not isinstance(bbox, list) or len(bbox) != 3
                    or any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in bbox)):
                raise CommandError(f"parts[{i}].bbox_mm must be three positive numbers")
            if any(a > b for a, b in zip(sorted(bbox), sorted(volume), strict=True)):
                raise CommandError(f"parts[{i}] ({bbox} mm) does not fit the build volume {list(volume)} mm")
            if isinstance(part_volume, bool) or not isinstance(part_volume, int | float) or part_volume <= 0:
                raise CommandError(f"parts[{i}].volume_cm3 must be a positive number")
            entry = dict(part)
            entry.setdefault("mass_g", round(float(part_volume) * float(density), 3))
            entry.setdefault("material", material)
            clean.append(entry)
        height = spec.get("build_height_mm", max(float(p["bbox_mm"][2]) for p in clean))
        if isinstance(height, bool) or not isinstance(height, int | float) or not 0 < height <= volume[2]:
            raise CommandError(f"build_height_mm must be in (0, {volume[2]}]")
        tags = {key: spec.get(key) for key in ("product_model", "product_revision")}
        for key, value in tags.items():
            if value is not None:
                try:
                    check_ident(value, key)
                except TopicError as exc:
                    raise CommandError(f"{key} (the process profile and its version): {exc}") from None
        job = self._job(job_id, clean, str(material), float(density), float(height), tags["product_model"],
                        tags["product_revision"])
        with self.lock:
            self.queue.append(job)
            position = len(self.queue)
        return {"job_id": job_id, "queued": position, "layers": job.layers,
                "estimated_print_time_s": round(job.print_time_s, 1)}

    # --- process -----------------------------------------------------------------------------------

    def _enter(self, state: DeviceState, now_s: float, emit: Callable[[dict[str, Any]], None],
               duration_s: float = 0.0) -> None:
        self.state = state
        self.timer_s = duration_s
        emit({"type": "state_changed", "ts": now_s, "state": state.name.lower()})

    def _start_next(self, now_s: float, emit: Callable[[dict[str, Any]], None]) -> bool:
        with self.lock:
            job = self.queue.popleft() if self.queue else None
        if job is None and self.auto_jobs:
            job = self.generate_job()
        if job is None:
            return False
        self.job = job
        if self.profile.level_channel and self.level < 0.3:
            self.level = 1.0  # the operator refills resin / powder before a build
        emit(job.started_event(now_s))
        self._enter(DeviceState.HEATING, now_s, emit, self.profile.heat_time_s * self.rng.uniform(0.9, 1.1))
        return True

    def _finish(self, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        job = self.job
        assert job is not None
        good = sum(1 for _ in job.parts if self.rng.random() > 0.02)
        count = len(job.parts)
        self.produced += count
        self.good += good
        self.scrap += count - good
        self.jobs_done += 1
        self.jobs_since_maintenance += 1
        finished: dict[str, Any] = {"type": "job_finished", "ts": now_s, "job_id": job.job_id, **job.tags(),
                                    "good": good == count, "parts_good": good, "parts_scrap": count - good,
                                    "print_time_s": round(job.print_time_s, 1)}
        if good < count:
            finished["defect"] = "parts_scrap"
        emit(finished)
        self.job = None
        self.layer_progress = 1.0
        self._after_job(now_s, emit)

    def _after_job(self, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        if self.jobs_since_maintenance >= 5:
            self.jobs_since_maintenance = 0
            emit({"type": "maintenance", "ts": now_s, "message": "planned maintenance after 5 builds"})
            self._enter(DeviceState.MAINTENANCE, now_s, emit, self.rng.uniform(1800, 3600))
        elif self.rng.random() < 0.03:
            self._enter(DeviceState.OFFLINE, now_s, emit, self.rng.uniform(600, 1800))
        else:
            self._enter(DeviceState.IDLE, now_s, emit, self.rng.expovariate(1.0 / self.idle_mean_s))

    def _transition(self, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        """Take the transitions that are due now (they take no process time)."""
        for _ in range(8):
            state = self.state
            if state is DeviceState.IDLE:
                if (self.queue or (self.auto_jobs and self.timer_s <= 0)) and not self._start_next(now_s, emit):
                    self.timer_s = self.idle_mean_s
            elif state is DeviceState.PRINTING:
                if self.job is not None and self.job.elapsed_s >= self.job.print_time_s - 1e-9:
                    self._finish(now_s, emit)
            elif self.timer_s <= 0:
                if state in (DeviceState.HEATING, DeviceState.PAUSED):
                    self._enter(DeviceState.PRINTING, now_s, emit)
                else:  # error, maintenance, offline
                    if state is DeviceState.MAINTENANCE:
                        self.level = 1.0
                    if state is DeviceState.ERROR:
                        self.layer_progress = 0.0
                    self._enter(DeviceState.IDLE, now_s, emit, self.rng.expovariate(1.0 / self.idle_mean_s))
            if self.state is state:
                return

    def advance(self, dt_s: float, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        remaining = dt_s
        while True:
            self._transition(now_s, emit)
            if remaining <= 1e-9:
                return
            state = self.state
            step = min(remaining, 60.0)
            if state is DeviceState.PRINTING and self.job is not None:
                step = min(step, self.job.print_time_s - self.job.elapsed_s)
            elif state is not DeviceState.IDLE or self.auto_jobs:
                step = min(step, self.timer_s)
            step = max(step, 1e-6)
            remaining -= step
            self.timer_s -= step
            self._relax(step)
            if state is DeviceState.PRINTING and self.job is not None:
                job = self.job
                job.elapsed_s += step
                self.layer = min(job.layers, int(job.elapsed_s / job.layer_time_s))
                self.layer_progress = min(1.0, job.elapsed_s / job.print_time_s)
                if self.profile.level_channel:
                    used = sum(p["volume_cm3"] for p in job.parts) / 20000.0
                    self.level = max(0.0, self.level - used * step / job.print_time_s)
                if job.elapsed_s >= job.print_time_s - 1e-9:
                    continue
                if _hazard(self.rng, 0.05, step):
                    emit({"type": "alarm", "ts": now_s, "severity": "critical", "job_id": job.job_id,
                          "message": "simulated fault: build aborted"})
                    emit({"type": "job_aborted", "ts": now_s, "job_id": job.job_id, **job.tags()})
                    self.produced += len(job.parts)
                    self.scrap += len(job.parts)
                    self.job = None
                    self._enter(DeviceState.ERROR, now_s, emit, self.rng.uniform(900, 3600))
                elif _hazard(self.rng, 0.2, step):
                    self._enter(DeviceState.PAUSED, now_s, emit, self.rng.uniform(120, 600))

    def _relax(self, step: float) -> None:
        group = _group(self.state)
        for name, dyn in self.profile.dynamics.items():
            target = dyn.targets[group]
            if self.state is DeviceState.PAUSED and name in ("nozzle_temp", "bed_temp", "chamber_temp"):
                target = dyn.targets[_PRINT]  # a paused printer holds its temperatures
            self.values[name] += (target - self.values[name]) * (1.0 - math.exp(-step / dyn.tau_s))

    def sample(self, now_s: float) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        if self.state is DeviceState.OFFLINE:
            return [(self.info.channels.index("state"), float(DeviceState.OFFLINE))]
        for index, name in enumerate(self.info.channels):
            if name == "state":
                value = float(self.state)
            elif name == "layer_progress":
                value = self.layer_progress if self.job is not None or self.layer_progress >= 1.0 else 0.0
            elif name == "layer":
                value = float(self.layer if self.job is not None else 0)
            elif name == "produced_total":
                value = float(self.produced)
            elif name == "good_total":
                value = float(self.good)
            elif name == "scrap_total":
                value = float(self.scrap)
            elif name == self.profile.level_channel:
                value = _clamp(name, self.level + self.noise.gauss(0, 0.002))
            else:
                dyn = self.profile.dynamics[name]
                value = _clamp(name, self.values[name] + self.noise.gauss(0, dyn.sigma))
            out.append((index, value))
        return out


@dataclass
class RevisionEffects:
    """How a product revision differs from nominal on the line (for iteration-loop demos)."""

    door_leakage_scale: float = 1.0
    magnetron_power_shift_w: float = 0.0
    cycle_time_scale: float = 1.0


@dataclass
class _Oven:
    serial: str
    product_model: str
    product_revision: str


class Station(Unit):
    """One station of the oven line."""

    def __init__(self, info: DeviceInfo, name: str, line: OvenLine, seed: int) -> None:
        self.info = info
        self.name = name
        self.line = line
        self.measures, self.nominal_cycle_s = STATIONS[name]
        self.rng = random.Random(f"{seed}/{info.key}/process")
        self.noise = random.Random(f"{seed}/{info.key}/noise")
        self.state = DeviceState.IDLE
        self.inbox: deque[_Oven] = deque()
        self.current: _Oven | None = None
        self.done: _Oven | None = None  # a good unit waiting for room downstream
        self.timer_s = 0.0
        self.cycle_s = 0.0
        self.produced = self.good = self.scrap = 0
        self.last_cycle_time = math.nan
        self.values = {name: dyn.targets[_REST] for name, dyn in STATION_DYNAMICS.items()}
        self.pending_samples: list[tuple[int, float]] = []
        self.next_station: Station | None = None

    def _measure(self, oven: _Oven, now_s: float) -> tuple[dict[str, float], str | None]:
        rng = self.rng
        effects = self.line.effects.get(oven.product_revision, RevisionEffects())
        values: dict[str, float] = {}
        if self.name == "power":
            power = rng.gauss(800 + effects.magnetron_power_shift_w, 15)
            values = {"magnetron_power": power, "cavity_temp_rise": power * 60 / 4186 * 0.985 * rng.gauss(1, 0.025)}
        elif self.name == "leak":
            values = {"door_leakage": 0.2 * effects.door_leakage_scale * rng.lognormvariate(0, 0.6)}
        elif self.name == "safety":
            values = {"hipot_current": max(0.0, rng.gauss(1.2, 0.3)),
                      "insulation_resistance": 500 * rng.lognormvariate(0, 0.4)}
        measured = {
            name: round(_clamp(name, self.line.inject(self.info.key, name, now_s, value)), 4)
            for name, value in values.items()
        }
        defect: str | None = None
        if self.name == "assembly" and rng.random() < 0.003:
            defect = "assembly"
        elif self.name == "power":
            if measured["magnetron_power"] < 750:
                defect = "magnetron_power"
            elif not 10 <= measured["cavity_temp_rise"] <= 13:
                defect = "cavity_temp_rise"
        elif self.name == "leak" and measured["door_leakage"] > 1.0:
            defect = "door_leakage"
        elif self.name == "safety":
            if measured["hipot_current"] > 3:
                defect = "hipot_current"
            elif measured["insulation_resistance"] < 2:
                defect = "insulation_resistance"
        return measured, defect

    def advance(self, dt_s: float, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        remaining = dt_s
        while remaining > 1e-9:
            step = remaining if self.timer_s <= 0 else min(remaining, self.timer_s)
            step = max(min(step, 30.0), 1e-6)
            remaining -= step
            self.timer_s -= step
            self._relax(step)
            if self.state in (DeviceState.ERROR, DeviceState.MAINTENANCE):
                if self.timer_s <= 0:
                    self._set(DeviceState.IDLE, now_s, emit)
                continue
            if self.done is not None:  # blocked: waiting for room downstream
                if self._pass_on(self.done):
                    self.done = None
                else:
                    continue
            if self.current is not None:
                if self.timer_s > 0:
                    continue
                self._complete(now_s, emit)
                if _hazard(self.rng, 0.1, self.cycle_s):
                    emit({"type": "alarm", "ts": now_s, "severity": "warning",
                          "message": f"simulated {self.name} station stop"})
                    self._set(DeviceState.ERROR, now_s, emit)
                    self.timer_s = self.rng.uniform(300, 1200)
                    continue
            if self.current is None and self.done is None:
                oven = self.line.next_unit() if self.name == self.line.first else (
                    self.inbox.popleft() if self.inbox else None)
                if oven is None:
                    self._set(DeviceState.IDLE, now_s, emit)
                    continue
                self.current = oven
                effects = self.line.effects.get(oven.product_revision, RevisionEffects())
                self.cycle_s = self.nominal_cycle_s * effects.cycle_time_scale * self.rng.lognormvariate(0, 0.05)
                self.timer_s = self.cycle_s
                self._set(DeviceState.PRINTING, now_s, emit)

    def _pass_on(self, oven: _Oven) -> bool:
        if self.next_station is None:
            return True
        if len(self.next_station.inbox) >= 3:
            return False
        self.next_station.inbox.append(oven)
        return True

    def _complete(self, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        oven = self.current
        assert oven is not None
        self.current = None
        measured, defect = self._measure(oven, now_s)
        cycle_time = round(_clamp("cycle_time", self.line.inject(self.info.key, "cycle_time", now_s, self.cycle_s)), 3)
        self.last_cycle_time = cycle_time
        self.produced += 1
        good = defect is None
        self.good += good
        self.scrap += not good
        event: dict[str, Any] = {
            "type": "unit_produced", "ts": now_s, "serial": oven.serial, "product_model": oven.product_model,
            "product_revision": oven.product_revision, "good": good, "cycle_time": cycle_time,
        }
        if measured:
            event["measurements"] = measured
        if defect:
            event["defect"] = defect
        emit(event)
        channels = self.info.channels
        self.pending_samples += [(channels.index(name), value) for name, value in measured.items()]
        self.pending_samples.append((channels.index("cycle_time"), cycle_time))
        if good and not self._pass_on(oven):
            self.done = oven

    def _set(self, state: DeviceState, now_s: float, emit: Callable[[dict[str, Any]], None]) -> None:
        # A station flips between producing and starved every unit: the state channel carries that;
        # an event is worth sending only for stops.
        if state is not self.state:
            self.state = state
            if state in (DeviceState.ERROR, DeviceState.MAINTENANCE):
                emit({"type": "state_changed", "ts": now_s, "state": state.name.lower()})

    def _relax(self, step: float) -> None:
        group = _group(self.state)
        for name, dyn in STATION_DYNAMICS.items():
            self.values[name] += (dyn.targets[group] - self.values[name]) * (1.0 - math.exp(-step / dyn.tau_s))

    def sample(self, now_s: float) -> list[tuple[int, float]]:
        out = self.pending_samples
        self.pending_samples = []
        for index, name in enumerate(self.info.channels):
            if name == "state":
                out.append((index, float(self.state)))
            elif name == "produced_total":
                out.append((index, float(self.produced)))
            elif name == "good_total":
                out.append((index, float(self.good)))
            elif name == "scrap_total":
                out.append((index, float(self.scrap)))
            elif name in STATION_DYNAMICS:
                value = self.values[name] + self.noise.gauss(0, STATION_DYNAMICS[name].sigma)
                out.append((index, _clamp(name, self.line.inject(self.info.key, name, now_s, value))))
        return out


class OvenLine:
    """The line: product model/revision being built, serial numbers, stations in order."""

    def __init__(self, ref: DeviceRef, product_model: str, product_revision: str, station_names: Sequence[str],
                 seed: int, injector: AnomalyInjector | None, effects: Mapping[str, RevisionEffects],
                 rate_hz: float, serial_prefix: str, speed: float = 1.0) -> None:
        self.product_model = product_model
        self.product_revision = product_revision
        self.effects = dict(effects)
        self.injector = injector
        self.serial_prefix = serial_prefix
        self.serial_counter = 0
        self.first = station_names[0]
        self.stations: list[Station] = []
        for name in station_names:
            measures, cycle_s = STATIONS[name]
            channels = ("state", *measures, "cycle_time", "vibration", "current", *COUNTERS)
            info = DeviceInfo(
                DeviceRef(ref.tenant, ref.site, ref.area, name), Technology.LINE.value, channels,
                vendor="forgeline-sim", model=f"{name} station", product_model=product_model,
                # Samples carry wall-clock time while the process runs `speed` times faster, so the planned
                # cycle time on that timeline is cycle_s / speed (else effectiveness reads `speed` × too high).
                product_revision=product_revision, planned_cycle_time_s=cycle_s / speed, rate_hz=rate_hz,
                labels={"station": name},
            )
            self.stations.append(Station(info, name, self, seed))
        for upstream, downstream in zip(self.stations, self.stations[1:], strict=False):
            upstream.next_station = downstream

    def next_unit(self) -> _Oven:
        self.serial_counter += 1
        return _Oven(f"{self.serial_prefix}{self.serial_counter:07d}", self.product_model, self.product_revision)

    def inject(self, device: str, channel: str, now_s: float, value: float) -> float:
        return self.injector.apply(device, channel, now_s, value) if self.injector else value

    def set_revision(self, product_model: str | None, product_revision: str | None) -> None:
        self.product_model = product_model or self.product_model
        self.product_revision = product_revision or self.product_revision
        for station in self.stations:
            station.info = replace(station.info, product_model=self.product_model,
                                   product_revision=self.product_revision)


@dataclass(frozen=True)
class PrinterSpec:
    device: str
    technology: str
    tenant: str | None = None
    site: str | None = None
    area: str | None = None
    materials: tuple[str, ...] = ()
    build_volume_mm: tuple[float, float, float] | None = None
    vendor: str | None = None
    model: str | None = None
    profile_revision: str = "1"  # version of the process profiles (one per material) jobs are printed with


@dataclass(frozen=True)
class LineSpec:
    product_model: str = "MW-20"
    product_revision: str = "A"
    stations: tuple[str, ...] = tuple(STATIONS)
    tenant: str | None = None
    site: str | None = None
    area: str = "line1"
    effects: Mapping[str, RevisionEffects] = field(default_factory=dict)


@dataclass(frozen=True)
class EpisodeSpec:
    device: str  # the device name (last level), or a full key
    channel: str
    kind: str
    start_s: float
    duration_s: float
    magnitude: float = 6.0
    direction: int = 1


@dataclass(frozen=True)
class AnomalySpec:
    labels_file: str | None = None
    schedule: RandomSchedule | None = None
    episodes: tuple[EpisodeSpec, ...] = ()


@dataclass(frozen=True)
class FleetSpec:
    """A simulated fleet: printers and lines; tenant/site/area of a device default to these."""

    tenant: str = "factory-a"
    site: str = "plant1"
    area: str = "hall1"
    printers: tuple[PrinterSpec, ...] = ()
    lines: tuple[LineSpec, ...] = ()
    anomalies: AnomalySpec = field(default_factory=AnomalySpec)


class SimulatorSource(Source):
    """Runs a :class:`FleetSpec` against the wall clock (or any clock, through :meth:`step`)."""

    kind = "simulator"

    def __init__(self, fleet: FleetSpec, *, seed: int = 0, speed: float = 1.0, rate_hz: float = 1.0,
                 tick_s: float = 0.1, auto_jobs: bool = True, start_s: float | None = None) -> None:
        super().__init__()
        if speed <= 0:
            raise ValueError(f"speed must be positive, not {speed}")
        self.fleet = fleet
        self.seed = seed
        self.speed = speed
        self.default_rate_hz = rate_hz
        self.tick_s = tick_s
        self.start_s = time.time() if start_s is None else start_s
        spec = fleet.anomalies
        self.injector: AnomalyInjector | None = None
        if spec.schedule is not None or spec.episodes or spec.labels_file:
            self.injector = AnomalyInjector(seed, self.start_s, schedule=spec.schedule, labels_path=spec.labels_file)
        self.units: list[Unit] = []
        self.lines: dict[str, OvenLine] = {}
        for printer in fleet.printers:
            self.units.append(self._printer(printer, auto_jobs))
        for number, line_spec in enumerate(fleet.lines):
            ref = DeviceRef(line_spec.tenant or fleet.tenant, line_spec.site or fleet.site, line_spec.area, "line")
            # Serial numbers are unique per line: two lines building one model must not number the same
            # oven twice (the loop counts units by serial). The first line keeps the plain prefix.
            prefix = f"{line_spec.product_model}-{seed}-" + (f"L{number + 1}-" if number else "")
            line = OvenLine(ref, line_spec.product_model, line_spec.product_revision, line_spec.stations, seed,
                            self.injector, line_spec.effects, rate_hz, prefix, speed=self.speed)
            for station in line.stations:
                self.lines[station.info.key] = line
                self.units.append(station)
        self._by_key = {unit.info.key: unit for unit in self.units}
        if len(self._by_key) != len(self.units):
            raise ValueError("two simulated devices have the same tenant/site/area/device")
        if self.injector is not None:
            for unit in self.units:
                self.injector.register(unit.info.key, _sigmas(unit))
            for episode in spec.episodes:
                key = self._resolve(episode.device)
                start = self.start_s + episode.start_s
                sigma = _sigmas(self._by_key[key]).get(episode.channel, 1.0)
                self.injector.add_episode(Episode(key, episode.channel, episode.kind, start,
                                                  start + episode.duration_s, episode.magnitude, episode.direction,
                                                  sigma))
        self._streams: dict[str, DeviceStream] = {}
        self._last_step: float | None = None
        self._next_sample: dict[str, float] = {}
        self._lock = threading.Lock()
        self.events_emitted = 0
        self.samples_emitted = 0

    def _printer(self, spec: PrinterSpec, auto_jobs: bool) -> SimulatedPrinter:
        technology = Technology(spec.technology)
        if technology is Technology.LINE:
            raise ValueError("technology 'line' is a line station: describe it under lines")
        profile = PROFILES[technology]
        channels = ["state", "layer_progress", "layer", *profile.dynamics]
        if profile.level_channel:
            channels.append(profile.level_channel)
        channels += COUNTERS
        materials = spec.materials or tuple(profile.materials)
        unknown = [m for m in materials if m not in profile.materials]
        if unknown:
            raise ValueError(f"{spec.device}: material {unknown[0]!r} is not a {technology.value} material "
                             f"(choose from {', '.join(profile.materials)})")
        fleet = self.fleet
        info = DeviceInfo(
            DeviceRef(spec.tenant or fleet.tenant, spec.site or fleet.site, spec.area or fleet.area, spec.device),
            technology.value, tuple(channels), vendor=spec.vendor or profile.vendor,
            model=spec.model or profile.model, materials=materials,
            build_volume_mm=spec.build_volume_mm or profile.build_volume_mm,
            part_spacing_mm=2.0 if profile.powder_bed else 5.0, cost_per_hour=profile.cost_per_hour,
            rate_hz=self.default_rate_hz,
        )
        check_ident(spec.profile_revision, "profile_revision")
        return SimulatedPrinter(info, profile, self.seed, auto_jobs=auto_jobs, profile_revision=spec.profile_revision)

    def _resolve(self, device: str) -> str:
        if device in self._by_key:
            return device
        matches = [key for key in self._by_key if key.rsplit("/", 1)[1] == device]
        if len(matches) != 1:
            raise ValueError(f"anomaly device {device!r} names {len(matches)} simulated devices; use the full key")
        return matches[0]

    # --- Source interface ----------------------------------------------------------------------------

    def devices(self) -> list[DeviceInfo]:
        return [unit.info for unit in self.units]

    def dispatch_job(self, device_key: str, job: Mapping[str, Any]) -> dict[str, Any]:
        unit = self._by_key.get(device_key)
        if not isinstance(unit, SimulatedPrinter):
            raise CommandError(f"{device_key} is not a simulated printer")
        return unit.dispatch(job)

    def set_config(self, device_key: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        line = self.lines.get(device_key)
        revision_keys = {"product_model", "product_revision"}
        applied: dict[str, Any] = {}
        printer = self._by_key.get(device_key)
        if revision_keys & set(settings):
            if line is None and not isinstance(printer, SimulatedPrinter):
                raise CommandError("product_model/product_revision apply to line stations and printers only")
            if line is None and "product_model" in settings:
                raise CommandError("a printer's jobs are named by their material's process profile: set "
                                   "product_revision (the profile version) only")
            for key in revision_keys & set(settings):
                value = settings[key]
                if not isinstance(value, str) or not value:
                    raise CommandError(f"{key} must be a non-empty string")
                try:
                    check_ident(value, key)
                except TopicError as exc:
                    raise CommandError(str(exc)) from None
        rest = {k: v for k, v in settings.items() if k not in revision_keys}
        applied.update(super().set_config(device_key, rest))  # raises before anything is changed
        if isinstance(printer, SimulatedPrinter) and "product_revision" in settings:
            with printer.lock:  # jobs started from now on; queued and running jobs keep their version
                printer.profile_revision = settings["product_revision"]
            applied["product_revision"] = settings["product_revision"]
        if line is not None and revision_keys & set(settings):
            with self._lock:
                line.set_revision(settings.get("product_model"), settings.get("product_revision"))
                for station in line.stations:
                    stream = self._streams.get(station.info.key)
                    if stream is not None:
                        stream.announce(station.info)
            applied.update({k: settings[k] for k in revision_keys & set(settings)})
        return applied

    def status(self) -> dict[str, Any]:
        return {"samples": self.samples_emitted, "events": self.events_emitted,
                "anomaly_episodes": len(self.injector.labels) if self.injector else 0}

    def run(self, sink: Sink, stop: threading.Event) -> None:
        self.attach(sink)
        try:
            while not stop.is_set():
                began = time.time()
                self.step(began)
                stop.wait(max(0.0, self.tick_s - (time.time() - began)))
        finally:
            if self.injector is not None:
                self.injector.close()

    def attach(self, sink: Sink) -> None:
        """Open a stream per device (done by :meth:`run`; tests call it to drive :meth:`step`)."""
        self._streams = {unit.info.key: sink.stream(unit.info) for unit in self.units}

    def step(self, now_s: float) -> None:
        """Advance the simulation to wall time ``now_s`` and emit what is due."""
        with self._lock:
            last = self._last_step if self._last_step is not None else now_s
            dt = max(0.0, now_s - last) * self.speed
            self._last_step = now_s
            t_us = int(now_s * 1_000_000)
            for unit in self.units:
                key = unit.info.key
                stream = self._streams[key]

                def emit(event: dict[str, Any], stream: DeviceStream = stream, unit: Unit = unit) -> None:
                    event["ts"] = round(float(event["ts"]), 6)
                    if isinstance(unit, Station):  # stops and alarms name what the line builds, like its units
                        event.setdefault("product_model", unit.line.product_model)
                        event.setdefault("product_revision", unit.line.product_revision)
                    self.events_emitted += 1
                    stream.event(event)

                unit.advance(dt, now_s, emit)
                due = self._next_sample.get(key, now_s)
                if now_s + 1e-9 >= due:
                    period = 1.0 / self.rate_hz(key)
                    self._next_sample[key] = due + period if now_s - due < period else now_s + period
                    samples = unit.sample(now_s)
                    if self.injector is not None and isinstance(unit, SimulatedPrinter):
                        channels = unit.info.channels
                        dynamics = unit.profile.dynamics
                        samples = [
                            (i, _clamp(channels[i], self.injector.apply(key, channels[i], now_s, v)))
                            if channels[i] in dynamics else (i, v)
                            for i, v in samples
                        ]
                    if samples:
                        self.samples_emitted += len(samples)
                        stream.extend([i for i, _ in samples], [t_us] * len(samples), [v for _, v in samples])


def _sigmas(unit: Unit) -> dict[str, float]:
    """The analog channels of a unit that anomalies may hit, with their noise σ."""
    if isinstance(unit, SimulatedPrinter):
        return {name: dyn.sigma for name, dyn in unit.profile.dynamics.items()}
    assert isinstance(unit, Station)
    sigmas = {name: MEASUREMENT_SIGMA[name] for name in unit.measures}
    sigmas["cycle_time"] = MEASUREMENT_SIGMA["cycle_time"]
    sigmas.update({name: dyn.sigma for name, dyn in STATION_DYNAMICS.items()})
    return sigmas


# --- the demo fleet ----------------------------------------------------------------------------------


def demo_fleet(labels_file: str | None = None, anomaly_rate_per_hour: float | None = 30.0) -> FleetSpec:
    """Printers of every technology across two partner factories, and an oven line.

    >>> sorted({p.tenant for p in demo_fleet().printers}), demo_fleet().lines[0].tenant
    (['factory-a', 'factory-b'], 'oven-plant')
    """
    printers = (
        PrinterSpec("fdm-01", "FDM", tenant="factory-a", site="plant-a", area="hall1"),
        PrinterSpec("fdm-02", "FDM", tenant="factory-a", site="plant-a", area="hall1", materials=("PETG",)),
        PrinterSpec("sla-01", "SLA", tenant="factory-a", site="plant-a", area="hall1"),
        PrinterSpec("sls-01", "SLS", tenant="factory-a", site="plant-a", area="hall2"),
        PrinterSpec("mjf-01", "MJF", tenant="factory-b", site="plant-b", area="hall1"),
        PrinterSpec("dlp-01", "DLP", tenant="factory-b", site="plant-b", area="hall1"),
        PrinterSpec("metal-01", "metal", tenant="factory-b", site="plant-b", area="metal", materials=("316L",)),
    )
    lines = (LineSpec("MW-20", "B", tenant="oven-plant", site="plant1", area="line1"),)
    schedule = RandomSchedule(rate_per_hour=anomaly_rate_per_hour) if anomaly_rate_per_hour else None
    return FleetSpec(printers=printers, lines=lines, anomalies=AnomalySpec(labels_file, schedule))


# --- config ------------------------------------------------------------------------------------------


def from_config(section: Any, base_dir: Path) -> SimulatorSource:
    """Build the simulator from its config section (see the module docstring)."""
    tenant = section.text("tenant", "factory-a")
    site = section.text("site", "plant1")
    area = section.text("area", "hall1")
    printers: list[PrinterSpec] = []
    for item in section.sections("printers", []):
        technology = item.text("technology", choices=[t.value for t in Technology if t is not Technology.LINE])
        printers.append(PrinterSpec(
            device=item.text("device"), technology=technology, tenant=item.text("tenant", None),
            site=item.text("site", None), area=item.text("area", None), materials=item.strings("materials", ()),
            build_volume_mm=item.vec3("build_volume_mm", None), vendor=item.text("vendor", None),
            model=item.text("model", None), profile_revision=item.text("profile_revision", "1"),
        ))
        profile = PROFILES[Technology(technology)]
        for material in printers[-1].materials:
            if material not in profile.materials:
                raise item.error("materials", f"{material!r} is not a {technology} material "
                                              f"(choose from {', '.join(profile.materials)})")
        item.done()
    lines: list[LineSpec] = []
    for item in section.sections("lines", []):
        stations = item.strings("stations", tuple(STATIONS))
        for i, station in enumerate(stations):
            if station not in STATIONS:
                raise item.error(f"stations[{i}]", f"must be one of {', '.join(STATIONS)}, not {station!r}")
        effects: dict[str, RevisionEffects] = {}
        effects_section = item.section("revision_effects")
        for revision in list(effects_section.data):
            entry = effects_section.section(str(revision))
            effects[str(revision)] = RevisionEffects(
                door_leakage_scale=entry.number("door_leakage_scale", 1.0, positive=True),
                magnetron_power_shift_w=entry.number("magnetron_power_shift_w", 0.0),
                cycle_time_scale=entry.number("cycle_time_scale", 1.0, positive=True),
            )
            entry.done()
        lines.append(LineSpec(
            product_model=item.text("product_model"), product_revision=item.text("product_revision"),
            stations=stations, tenant=item.text("tenant", None), site=item.text("site", None),
            area=item.text("area", "line1"), effects=effects,
        ))
        item.done()
    if not printers and not lines:
        raise section.error("printers", "the simulator needs at least one printer or line")
    anomalies = section.section("anomalies")
    labels_file = anomalies.text("labels_file", None)
    schedule = None
    if anomalies.has("rate_per_hour"):
        kinds = anomalies.strings("kinds", KINDS)
        for i, kind in enumerate(kinds):
            if kind not in KINDS:
                raise anomalies.error(f"kinds[{i}]", f"must be one of {', '.join(KINDS)}, not {kind!r}")
        min_duration = anomalies.number("min_duration_s", 20.0, positive=True)
        max_duration = anomalies.number("max_duration_s", max(120.0, min_duration), positive=True)
        if max_duration < min_duration:
            raise anomalies.error("max_duration_s", "must be at least min_duration_s")
        min_magnitude = anomalies.number("min_magnitude", 4.0, positive=True)
        max_magnitude = anomalies.number("max_magnitude", max(8.0, min_magnitude), positive=True)
        if max_magnitude < min_magnitude:
            raise anomalies.error("max_magnitude", "must be at least min_magnitude")
        schedule = RandomSchedule(
            rate_per_hour=anomalies.number("rate_per_hour", positive=True), kinds=kinds,
            min_duration_s=min_duration, max_duration_s=max_duration, min_magnitude=min_magnitude,
            max_magnitude=max_magnitude, channels=anomalies.strings("channels", ()),
        )
    episodes: list[EpisodeSpec] = []
    for item in anomalies.sections("episodes", []):
        direction = item.number("direction", 1, integer=True)
        if direction not in (1, -1):
            raise item.error("direction", f"must be 1 or -1, not {direction}")
        episodes.append(EpisodeSpec(
            device=item.text("device"), channel=item.text("channel"), kind=item.text("kind", choices=KINDS),
            start_s=item.number("start_s", minimum=0), duration_s=item.number("duration_s", positive=True),
            magnitude=item.number("magnitude", 6.0, positive=True), direction=direction,
        ))
        item.done()
    anomalies.done()
    fleet = FleetSpec(tenant, site, area, tuple(printers), tuple(lines),
                      AnomalySpec(str(base_dir / labels_file) if labels_file else None, schedule, tuple(episodes)))
    try:
        return SimulatorSource(
            fleet, seed=section.number("seed", 0, integer=True), speed=section.number("speed", 1.0, positive=True),
            rate_hz=section.number("rate_hz", 1.0, positive=True, maximum=1000),
            tick_s=section.number("tick_s", 0.1, positive=True, maximum=10), auto_jobs=section.flag("auto_jobs", True),
        )
    except ValueError as exc:
        raise section.error("printers", str(exc)) from None
