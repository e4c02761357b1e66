"""Route order parts to partner printers and builds, keep builds open, release them, re-route failures.

The objective is a weighted sum per candidate printer (weights in :class:`RoutingConfig`, all
scores in [0, 1] except the due-date score, which goes negative when a printer would be late)::

    score = w_fill * fill + w_utilization * (1 - utilization) + w_due * due + w_cost * cost
            - w_anomaly * anomaly_score / threshold

``fill``: the chamber fill the printer's open build would reach with the parts, over the release
target (consolidates parts into fewer, fuller builds); ``utilization``: the twin's utilization KPI
(balances work across factories); ``due``: slack of the expected completion before the earliest due
date over ``horizon_h`` (late is strongly negative); ``cost``: the cheapest candidate's machine cost
over this printer's. A printer that is offline, in error or maintenance, or whose anomaly score is
above its threshold, is never a candidate. Every assignment carries the score components of the
chosen printer and the runner-up, and a sentence that says why.

Builds stay open (parts of later orders join them) until a release rule fires: fill target
reached, due-date pressure (the latest start that still meets the earliest due date minus a margin),
or a maximum holding time. Released builds queue on their printer; a printer that fails has its
queue re-routed (:meth:`Router.fail_printer`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from forgeline.routing.model import (
    DEFAULT_MATERIALS,
    Fleet,
    Material,
    Order,
    PartProblem,
    Printer,
    Rotation,
    Unit,
)
from forgeline.routing.packing import Build

HOUR = 3600.0


class ConfigError(ValueError):
    """A routing configuration value out of range; the message names it."""


@dataclass(frozen=True)
class ObjectiveWeights:
    fill: float = 0.35
    utilization: float = 0.2
    due: float = 0.3
    cost: float = 0.15
    anomaly: float = 0.1


@dataclass(frozen=True)
class ReleaseRule:
    fill: float = 0.5  # powder bed: bounding-box chamber fill that releases a build
    plate_fill: float = 0.55  # plate processes: plate area covered
    due_margin_h: float = 2.0  # release this long before the latest start that meets the earliest due date
    max_hold_h: float = 24.0  # never hold a build open longer than this
    # Plate processes (SLA, DLP, FDM) start a plate when the printer has nothing else to do: an idle
    # printer waiting for fill earns nothing. Release after this long open on an idle printer.
    idle_plate_release_h: float = 1.0


@dataclass(frozen=True)
class RoutingConfig:
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    release: ReleaseRule = field(default_factory=ReleaseRule)
    horizon_h: float = 48.0  # due-date slack that counts as fully comfortable
    materials: Mapping[str, Material] = field(default_factory=lambda: dict(DEFAULT_MATERIALS))
    keep_open: bool = True  # False: release every build right after routing (no consolidation)

    def __post_init__(self) -> None:
        for f in fields(self.weights):
            value = getattr(self.weights, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"weights.{f.name} must be a non-negative number, not {value!r}")
        if not 0 < self.release.fill <= 1 or not 0 < self.release.plate_fill <= 1:
            raise ConfigError("release.fill and release.plate_fill must be in (0, 1]")
        if self.release.max_hold_h <= 0 or self.release.due_margin_h < 0 or self.horizon_h <= 0:
            raise ConfigError("release.max_hold_h and horizon_h must be positive, release.due_margin_h >= 0")

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> RoutingConfig:
        """``{"weights": {...}, "release": {...}, "horizon_h": 48, "materials": {"PA12": {"density_g_cm3":
        1.01, "technologies": ["SLS", "MJF"], "price_per_kg": 60}}, "keep_open": true}``."""
        unknown = set(doc) - {"weights", "release", "horizon_h", "materials", "keep_open"}
        if unknown:
            raise ConfigError(f"unknown routing config key {sorted(unknown)[0]!r}")
        try:
            weights = ObjectiveWeights(**doc.get("weights", {}))
            release = ReleaseRule(**doc.get("release", {}))
        except TypeError as exc:
            raise ConfigError(f"routing config: {exc}") from None
        materials = dict(DEFAULT_MATERIALS)
        for name, spec in (doc.get("materials") or {}).items():
            try:
                materials[name] = Material(name, float(spec["density_g_cm3"]), frozenset(spec["technologies"]),
                                           float(spec.get("price_per_kg", 0.0)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"materials.{name}: needs density_g_cm3 and technologies ({exc})") from None
        return cls(weights, release, float(doc.get("horizon_h", 48.0)), materials, bool(doc.get("keep_open", True)))

    @classmethod
    def load(cls, path: str | Path) -> RoutingConfig:
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{path}: a routing config is a mapping")
        return cls.from_document(doc)

    def describe(self) -> dict[str, Any]:
        return {"weights": asdict(self.weights), "release": asdict(self.release), "horizon_h": self.horizon_h,
                "keep_open": self.keep_open}


# --- builds -----------------------------------------------------------------------------------------


@dataclass
class PlannedBuild:
    """A build on one printer: open (taking parts), released (queued, dispatched), printing, done, failed."""

    build_id: str
    printer_key: str
    technology: str
    material: str
    build: Build
    opened_ts: float
    units: dict[str, Unit] = field(default_factory=dict)  # by placement id
    status: str = "open"
    released_ts: float | None = None
    release_reason: str | None = None
    expected_start_ts: float | None = None
    expected_end_ts: float | None = None  # machine done
    expected_ready_ts: float | None = None  # after cool-down and post-processing
    dispatch_result: dict[str, Any] | None = None  # the agent's acknowledgement

    @property
    def earliest_due_ts(self) -> float | None:
        dues = [u.due_ts for u in self.units.values() if u.due_ts is not None]
        return min(dues) if dues else None

    @property
    def volume_cm3(self) -> float:
        return sum(u.part.volume_cm3 for u in self.units.values())

    def fill_for_release(self, printer: Printer) -> float:
        return self.build.fill if printer.powder_bed else self.build.plate_fill

    def machine_hours(self, printer: Printer) -> float:
        return printer.build_hours(self.build.height_mm, self.volume_cm3)

    def document(self) -> dict[str, Any]:
        return {
            "build_id": self.build_id,
            "printer": self.printer_key,
            "factory": self.printer_key.split("/", 1)[0],
            "technology": self.technology,
            "material": self.material,
            "status": self.status,
            "parts": len(self.units),
            "fill": round(self.build.fill, 4),
            "plate_fill": round(self.build.plate_fill, 4),
            "height_mm": round(self.build.height_mm, 2),
            "release_reason": self.release_reason,
            "expected_start_ts": self.expected_start_ts,
            "expected_end_ts": self.expected_end_ts,
            "expected_ready_ts": self.expected_ready_ts,
        }

    def job_document(self, density_g_cm3: float | None) -> dict[str, Any]:
        """The ``dispatch_job`` arguments for the printer's agent (see edge_agent/commands.py)."""
        parts = []
        for placement in self.build.placements:
            unit = self.units[placement.item_id]
            entry: dict[str, Any] = {
                "part_id": f"{unit.order_id}.{unit.unit_id}",
                "order_id": unit.order_id,
                "bbox_mm": [round(v, 3) for v in placement.size_mm],
                "position_mm": [round(v, 3) for v in placement.position_mm],
                "volume_cm3": unit.part.volume_cm3,
                "material": self.material,
            }
            if unit.part.mass_g is not None:
                entry["mass_g"] = unit.part.mass_g
            parts.append(entry)
        job: dict[str, Any] = {"job_id": self.build_id, "parts": parts, "material": self.material,
                               "build_height_mm": round(max(self.build.height_mm, 0.1), 3)}
        if density_g_cm3 is not None:
            job["material_density_g_cm3"] = density_g_cm3
        return job


# --- results ----------------------------------------------------------------------------------------


@dataclass
class Assignment:
    unit_id: str
    part_id: str
    order_id: str
    printer: str
    build_id: str
    position_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    score: float
    components: dict[str, float]
    explanation: str
    runner_up: dict[str, Any] | None
    due_ts: float | None
    expected_ready_ts: float | None = None

    def document(self) -> dict[str, Any]:
        return {
            "unit_id": self.unit_id,
            "part_id": self.part_id,
            "order_id": self.order_id,
            "printer": self.printer,
            "factory": self.printer.split("/", 1)[0],
            "build_id": self.build_id,
            "position_mm": [round(v, 3) for v in self.position_mm],
            "size_mm": [round(v, 3) for v in self.size_mm],
            "score": round(self.score, 4),
            "components": {k: round(v, 4) for k, v in self.components.items()},
            "explanation": self.explanation,
            "runner_up": self.runner_up,
            "due_ts": self.due_ts,
            "expected_ready_ts": self.expected_ready_ts,
            "on_time": None if self.due_ts is None or self.expected_ready_ts is None
            else self.expected_ready_ts <= self.due_ts,
        }


@dataclass
class RoutingResult:
    order_id: str
    assignments: list[Assignment] = field(default_factory=list)
    rejected: list[PartProblem] = field(default_factory=list)
    released: list[PlannedBuild] = field(default_factory=list)
    touched: dict[str, PlannedBuild] = field(default_factory=dict)  # builds that got parts
    elapsed_s: float = 0.0

    def document(self, config: RoutingConfig | None = None) -> dict[str, Any]:
        # Expected times are read from the builds now: a later release in the same call updates them.
        for a in self.assignments:
            build = self.touched.get(a.build_id)
            if build is not None:
                a.expected_ready_ts = build.expected_ready_ts
        doc: dict[str, Any] = {
            "order_id": self.order_id,
            "assignments": [a.document() for a in self.assignments],
            "rejected": [{"part_id": p.part_id, "code": p.code, "reason": p.reason} for p in self.rejected],
            "builds": [b.document() for b in self.touched.values()],
            "released": [b.build_id for b in self.released],
            "elapsed_s": round(self.elapsed_s, 6),
        }
        if config is not None:
            doc["objective"] = config.describe()
        return doc


@dataclass
class _Choice:
    printer: Printer
    score: float
    components: dict[str, float]
    notes: dict[str, Any]


def _fmt_ts(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + "Z"


def _inflated_cm3(unit: Unit, spacing: float) -> float:
    x, y, z = unit.part.bbox_mm
    return (x + spacing) * (y + spacing) * (z + spacing) / 1000.0


class Router:
    """Stateful router over a fleet view. Not thread-safe: one owner (the service) calls it."""

    def __init__(
        self,
        fleet: Fleet,
        config: RoutingConfig | None = None,
        *,
        on_release: Callable[[PlannedBuild], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.config = config or RoutingConfig()
        self.on_release = on_release
        self.builds: dict[str, PlannedBuild] = {}
        self.open: dict[tuple[str, str], PlannedBuild] = {}  # (printer key, material) -> open build
        self.queues: dict[str, list[PlannedBuild]] = {}  # printer key -> released, not finished
        self.unit_build: dict[tuple[str, str], str] = {}  # (order_id, unit_id) -> build_id
        self._build_numbers = itertools.count(1)
        self.suspended: dict[str, tuple[float, str]] = {}  # printer key -> (until, why)
        self._now = 0.0  # the time of the routing call in progress
        self.limit_heights = True  # cap build heights to meet due dates (off for the late fallback pass)

    # --- helpers -----------------------------------------------------------------------------------

    def free_ts(self, printer: Printer, now: float) -> float:
        """When the printer finishes its current job and every released build queued on it."""
        start = max(now, printer.busy_until_ts or now)
        for planned in self.queues.get(printer.key, []):
            if planned.status in ("released", "dispatched"):
                start += planned.machine_hours(printer) * HOUR
        return start

    def _ready_after(self, printer: Printer, start_ts: float, height_mm: float, volume_cm3: float) -> float:
        rates = printer.process
        machine_h = printer.build_hours(height_mm, volume_cm3)
        return start_ts + (machine_h + rates.cooldown_h + rates.post_processing_h) * HOUR

    def _density(self, material: str) -> float | None:
        entry = self.config.materials.get(material)
        return entry.density_g_cm3 if entry else None

    # --- decomposition and checks ----------------------------------------------------------------

    def _check_part(
        self, unit: Unit, exclude: frozenset[str] = frozenset()
    ) -> tuple[list[Printer], PartProblem | None]:
        """Printers that may take this part now, or the reason none can."""
        part = unit.part
        if part.material is None:
            return [], PartProblem(part.part_id, f"part {part.part_id!r}: material is required for routing "
                                   "(ask for a quote to get material options)", "invalid")
        known = part.material in self.config.materials or part.material in self.fleet.materials()
        if not known:
            return [], PartProblem(part.part_id, f"part {part.part_id!r}: unknown material {part.material!r}",
                                   "unknown_material")
        capable = [p for p in self.fleet if part.material in p.materials
                   and (part.technology is None or p.technology == part.technology)]
        if not capable:
            tech = part.technology or "any technology"
            return [], PartProblem(part.part_id, f"part {part.part_id!r}: no printer runs {part.material} on {tech}",
                                   "no_capable_printer")
        fitting = [p for p in capable if part.fits(p.build_volume_mm)]
        if not fitting:
            largest = max(capable, key=lambda p: p.chamber_volume_cm3)
            dims = "x".join(f"{v:g}" for v in part.bbox_mm)
            chamber = "x".join(f"{v:g}" for v in largest.build_volume_mm)
            return [], PartProblem(part.part_id, f"part {part.part_id!r} ({dims} mm) is larger than every chamber of "
                                   f"the {len(capable)} capable printers (largest {chamber} mm)", "too_large")
        available = [p for p in fitting if self.unavailable_reason(p) is None and p.key not in exclude]
        if not available:
            reasons = "; ".join(f"{p.key}: {self.unavailable_reason(p) or 'excluded'}" for p in fitting[:5])
            more = f" and {len(fitting) - 5} more" if len(fitting) > 5 else ""
            return [], PartProblem(part.part_id, f"part {part.part_id!r}: no capable printer is available ({reasons}"
                                   f"{more})", "no_printer_available")
        return available, None

    def unavailable_reason(self, printer: Printer) -> str | None:
        """The printer's own reason (offline, error, anomaly) or a suspension after a refused job."""
        reason = printer.unavailable_reason()
        if reason is None and printer.key in self.suspended:
            until, why = self.suspended[printer.key]
            if self._now < until:
                return f"suspended until {_fmt_ts(until)}: {why}"
            del self.suspended[printer.key]
        return reason

    def suspend(self, printer_key: str, until_ts: float, why: str) -> None:
        """Keep a printer out of routing until ``until_ts`` (its agent refused a job)."""
        self.suspended[printer_key] = (until_ts, why)

    # --- scoring -----------------------------------------------------------------------------------

    def _score(self, printer: Printer, material: str, units: list[Unit], now: float,
               fits_all: bool = False) -> _Choice:
        w = self.config.weights
        rule = self.config.release
        open_build = self.open.get((printer.key, material))
        spacing = printer.part_spacing_mm
        chamber_cm3 = printer.chamber_volume_cm3
        fitting = units if fits_all else [u for u in units if u.part.fits(printer.build_volume_mm)]
        volume = sum(u.part.bbox_volume_cm3 for u in fitting)
        inflated = sum(_inflated_cm3(u, spacing) for u in fitting)
        packed = open_build.build.packed_volume_cm3 if open_build else 0.0
        target = rule.fill if printer.powder_bed else rule.plate_fill
        if printer.powder_bed:
            # Inflated volume can exceed the chamber: what fits is bounded by a realistic density.
            expected_fill = min(packed + volume, chamber_cm3 * 0.85) / chamber_cm3
        else:
            x, y, _ = printer.build_volume_mm
            footprint = sum(min(u.part.bbox_mm[0] * u.part.bbox_mm[1], u.part.bbox_mm[0] * u.part.bbox_mm[2],
                                u.part.bbox_mm[1] * u.part.bbox_mm[2]) for u in fitting)
            current = open_build.build.plate_fill if open_build else 0.0
            expected_fill = min(current + footprint / (x * y), 0.85)
        fill_score = min(1.0, expected_fill / target)
        utilization = printer.utilization if printer.utilization is not None else 0.0
        # Expected completion if the group's parts go here: a rough build height from volume.
        x, y, z = printer.build_volume_mm
        min_dims = [min(u.part.bbox_mm) for u in fitting] or [0.0]
        if printer.powder_bed:
            height = min(z, max(max(min_dims), (packed * 1000 + inflated * 1000) / (x * y * 0.5)))
        else:
            height = min(z, max(u.part.bbox_mm[2] for u in fitting) if fitting else 0.0)
        dues = [u.due_ts for u in fitting if u.due_ts is not None]
        if open_build is not None and open_build.earliest_due_ts is not None:
            dues.append(open_build.earliest_due_ts)
        earliest_due = min(dues) if dues else None
        if self.limit_heights:
            # the router keeps the build short enough for the due date where it can (see _route_group)
            cap = self._due_height_mm(printer, earliest_due, now)
            if cap is not None:
                floor = open_build.build.height_mm if open_build else max(min_dims)
                height = min(height, max(cap, floor))
        start = self.free_ts(printer, now)
        ready = self._ready_after(printer, start, height, volume)
        if earliest_due is None:
            due_score = 1.0
            slack_h = None
        else:
            slack_h = (earliest_due - ready) / HOUR
            # Late is much worse than tight: every 6 h late costs as much as the whole due range.
            due_score = min(1.0, slack_h / self.config.horizon_h) if slack_h >= 0 else -1.0 + slack_h / 6.0
        # Machine cost per cm3 of the whole build the parts would be in: joining an open build shares
        # its setup and height, which is what consolidation saves.
        build_volume = packed + volume
        machine_h = printer.build_hours(height, build_volume)
        rate = printer.cost_per_hour * machine_h / max(build_volume, 1e-9)
        anomaly = (printer.anomaly_score or 0.0) / max(printer.anomaly_threshold, 1e-9)
        components = {
            "fill": fill_score,
            "utilization": 1.0 - utilization,
            "due": due_score,
            "cost": 1.0,  # relative to the cheapest candidate: set by _with_cost
            "anomaly": anomaly,
        }
        score = (w.fill * fill_score + w.utilization * (1.0 - utilization) + w.due * due_score
                 - w.anomaly * anomaly)
        notes = {"expected_fill": expected_fill, "open_fill": open_build.build.fill if open_build else None,
                 "open_build": open_build.build_id if open_build else None, "utilization": printer.utilization,
                 "ready_ts": ready, "slack_h": slack_h, "cost_per_cm3": rate, "anomaly_score": printer.anomaly_score}
        return _Choice(printer, score, components, notes)

    def _due_height_mm(self, printer: Printer, due_ts: float | None, now: float) -> float | None:
        """The tallest build that still makes ``due_ts`` on this printer after its queue (None: no limit)."""
        if due_ts is None:
            return None
        rates = printer.process
        hours = (due_ts - self.free_ts(printer, now)) / HOUR
        hours -= rates.setup_h + rates.cooldown_h + rates.post_processing_h + self.config.release.due_margin_h
        return max(0.0, hours * rates.z_mm_per_h)

    def _with_cost(self, choices: list[_Choice]) -> list[_Choice]:
        """Add the cost component (cheapest candidate's rate over this one's) and rank, best first."""
        cheapest = min(c.notes["cost_per_cm3"] for c in choices)
        for c in choices:
            rate = c.notes["cost_per_cm3"]
            c.components["cost"] = min(1.0, cheapest / rate) if rate > 0 else 1.0
            c.score += self.config.weights.cost * c.components["cost"]
        return sorted(choices, key=lambda c: (-c.score, c.printer.key))

    def _explain(self, choice: _Choice, runner_up: _Choice | None, material: str, technology: str,
                 build: PlannedBuild, fill_before: float) -> str:
        n = choice.notes
        parts = [f"{technology}/{material} -> {choice.printer.key} (score {choice.score:.2f})"]
        if n["open_build"] == build.build_id and fill_before > 0:
            parts.append(f"joins open build {build.build_id} (fill {fill_before:.2f} -> {build.build.fill:.2f})")
        else:
            parts.append(f"new build {build.build_id} (fill {build.build.fill:.2f})")
        util = n["utilization"]
        parts.append(f"utilization {util:.2f}" if util is not None else "utilization unknown")
        if n["slack_h"] is not None:
            parts.append(f"ready ~{_fmt_ts(n['ready_ts'])}, {n['slack_h']:+.1f} h against the due date")
        parts.append(f"{choice.printer.cost_per_hour:g}/h machine rate")
        if n["anomaly_score"] is not None:
            parts.append(f"anomaly {n['anomaly_score']:.2f} (threshold {choice.printer.anomaly_threshold:.2f})")
        text = "; ".join(parts)
        if runner_up is not None:
            best = max(choice.components, key=lambda k: self._weighted(choice, k) - self._weighted(runner_up, k))
            text += (f". Runner-up {runner_up.printer.key} scored {runner_up.score:.2f}; "
                     f"the largest difference is {best}")
        return text

    def _weighted(self, choice: _Choice, component: str) -> float:
        weight = getattr(self.config.weights, component)
        value = choice.components[component]
        return -weight * value if component == "anomaly" else weight * value

    # --- routing -----------------------------------------------------------------------------------

    def route(self, order: Order, now: float | None = None, *, dry_run: bool = False) -> RoutingResult:
        """Route every part of ``order``. With ``dry_run`` the router's state is left unchanged."""
        if dry_run:
            return self._dry_run(order, now)
        started = time.perf_counter()
        now = time.time() if now is None else now
        result = RoutingResult(order.order_id, rejected=list(order.problems))
        result.released += self.tick(now)
        # A repeated request (a retry after a lost answer) routes nothing twice: units already in a
        # live build are answered from it.
        fresh: list[Unit] = []
        for unit in order.units():
            planned = self.build_of(unit.order_id, unit.unit_id)
            if planned is None or planned.status == "failed":
                fresh.append(unit)
                continue
            placement = next(p for p in planned.build.placements if p.item_id == f"{unit.order_id}.{unit.unit_id}")
            result.assignments.append(Assignment(
                unit.unit_id, unit.part.part_id, unit.order_id, planned.printer_key, planned.build_id,
                placement.position_mm, placement.size_mm, 0.0, {}, f"already routed to {planned.printer_key} "
                f"(build {planned.build_id}, {planned.status})", None, unit.due_ts))
            result.touched[planned.build_id] = planned
        self._route_units(fresh, now, result)
        self._release_unless_kept_open(result, now)
        result.elapsed_s = time.perf_counter() - started
        return result

    def _release_unless_kept_open(self, result: RoutingResult, now: float) -> None:
        if not self.config.keep_open:
            for planned in list(result.touched.values()):
                if planned.status == "open":
                    self._release(planned, now, "consolidation off: released at once", result)

    def _dry_run(self, order: Order, now: float | None) -> RoutingResult:
        saved = (self.builds, self.open, self.queues, self.unit_build, self._build_numbers, self.on_release)
        import copy

        self.builds, self.open, self.queues = copy.deepcopy((self.builds, self.open, self.queues))
        self.unit_build = dict(self.unit_build)
        self._build_numbers = copy.copy(self._build_numbers)
        self.on_release = None
        try:
            return self.route(order, now)
        finally:
            self.builds, self.open, self.queues, self.unit_build, self._build_numbers, self.on_release = saved

    def _route_units(self, units: list[Unit], now: float, result: RoutingResult, note: str = "",
                     exclude: frozenset[str] = frozenset()) -> None:
        self._now = now
        groups: dict[tuple[str, tuple[str, ...]], list[Unit]] = {}
        candidates_of: dict[tuple[str, tuple[str, ...]], list[Printer]] = {}
        reported: set[tuple[str, str]] = set()
        checked: dict[int, tuple[list[Printer], PartProblem | None]] = {}
        for unit in units:
            # Units of one part line share the Part object and so the check.
            if id(unit.part) not in checked:
                checked[id(unit.part)] = self._check_part(unit, exclude)
            available, problem = checked[id(unit.part)]
            if problem is not None:
                if (unit.order_id, unit.part.part_id) not in reported:
                    reported.add((unit.order_id, unit.part.part_id))
                    result.rejected.append(problem)
                continue
            key = (str(unit.part.material), tuple(sorted(p.key for p in available)))
            groups.setdefault(key, []).append(unit)
            candidates_of[key] = available
        for key, group in groups.items():
            self._route_group(key[0], group, candidates_of[key], now, result, note)

    def _route_group(self, material: str, units: list[Unit], printers: list[Printer], now: float,
                     result: RoutingResult, note: str) -> None:
        # Priority first, then earliest due, then largest first (large parts first pack better).
        remaining = sorted(units, key=lambda u: (-u.priority, u.due_ts if u.due_ts is not None else math.inf,
                                                 -u.part.bbox_volume_cm3))
        excluded: set[str] = set()
        distinct = {id(u.part): u.part for u in units}.values()
        everything_fits = {p.key for p in printers if all(part.fits(p.build_volume_mm) for part in distinct)}
        for _ in range(len(units) + 2 * len(printers) + 10):
            if not remaining:
                return
            pool = [p for p in printers if p.key not in excluded]
            if not pool:
                break
            choices = self._with_cost([self._score(p, material, remaining, now, fits_all=p.key in everything_fits)
                                       for p in pool])
            choice = choices[0]
            runner_up = choices[1] if len(choices) > 1 else None
            printer = choice.printer
            planned = self.open.get((printer.key, material))
            fresh = planned is None
            if planned is None:
                planned = self._open_build(printer, material, now)
            fill_before = planned.build.fill
            dues = [u.due_ts for u in remaining if u.due_ts is not None]
            if planned.earliest_due_ts is not None:
                dues.append(planned.earliest_due_ts)
            height_cap = self._due_height_mm(printer, min(dues) if dues else None, now) if self.limit_heights else None
            planned.build.limit_height(height_cap)
            # Where time adds by volume (FDM), the due date also bounds the build's volume.
            volume_budget = math.inf
            rate = printer.process.volume_cm3_per_h
            if height_cap is not None and rate > 0:
                volume_budget = height_cap / printer.process.z_mm_per_h * rate
            volume = planned.volume_cm3
            placed: list[Unit] = []
            left: list[Unit] = []
            for unit in remaining:
                if volume + unit.part.volume_cm3 > volume_budget:
                    left.append(unit)
                    continue
                placement = planned.build.add(f"{unit.order_id}.{unit.unit_id}", unit.part.orientations())
                if placement is None:
                    left.append(unit)
                    continue
                placed.append(unit)
                volume += unit.part.volume_cm3
                planned.units[placement.item_id] = unit
                self.unit_build[(unit.order_id, unit.unit_id)] = planned.build_id
            if placed:
                text = self._explain(choice, runner_up, material, printer.technology, planned, fill_before)
                if note:
                    text = f"{note}. {text}"
                ru = None if runner_up is None else {
                    "printer": runner_up.printer.key, "score": round(runner_up.score, 4),
                    "components": {k: round(v, 4) for k, v in runner_up.components.items()}}
                by_id = {p.item_id: p for p in planned.build.placements}
                for unit in placed:
                    p = by_id[f"{unit.order_id}.{unit.unit_id}"]
                    result.assignments.append(Assignment(
                        unit.unit_id, unit.part.part_id, unit.order_id, printer.key, planned.build_id,
                        p.position_mm, p.size_mm, choice.score, dict(choice.components), text, ru, unit.due_ts))
                result.touched[planned.build_id] = planned
                self._update_expectation(planned, printer, now)
            if fresh and not placed:
                # Even an empty build of this printer takes none of these parts: stop offering it.
                self.open.pop((printer.key, material), None)
                self.builds.pop(planned.build_id, None)
                excluded.add(printer.key)
            elif left and placed and planned.status == "open":
                # The build is as full as these parts can make it: release it, the rest go on.
                self._release(planned, now, f"full (fill {planned.build.fill:.2f})", result)
            elif not placed:
                self._release(planned, now, f"full (fill {planned.build.fill:.2f})", result)
            elif planned.status == "open":
                reason = self._release_reason(planned, printer, now)
                if reason is not None:
                    self._release(planned, now, reason, result)
            remaining = left
        if remaining and self.limit_heights:
            # No printer can make the due date for these: route them anyway, as early as possible.
            self.limit_heights = False
            try:
                self._route_group(material, remaining, printers, now, result, note or "late for its due date")
            finally:
                self.limit_heights = True
            return
        for unit in remaining:
            result.rejected.append(PartProblem(unit.part.part_id, f"part {unit.part.part_id!r} ({unit.unit_id}): "
                                               "no capable printer could place it", "no_printer_available"))

    def _open_build(self, printer: Printer, material: str, now: float) -> PlannedBuild:
        number = next(self._build_numbers)
        build_id = f"B{number:06d}-{printer.ref.device}"
        planned = PlannedBuild(build_id, printer.key, printer.technology, material,
                               Build(printer.build_volume_mm, printer.part_spacing_mm, stacking=printer.powder_bed,
                                     build_id=build_id), now)
        self.builds[build_id] = planned
        self.open[(printer.key, material)] = planned
        return planned

    def _update_expectation(self, planned: PlannedBuild, printer: Printer, now: float) -> None:
        start = self.free_ts(printer, now) if planned.status == "open" else planned.expected_start_ts or now
        planned.expected_start_ts = start
        planned.expected_end_ts = start + planned.machine_hours(printer) * HOUR
        planned.expected_ready_ts = self._ready_after(printer, start, planned.build.height_mm, planned.volume_cm3)

    # --- release -----------------------------------------------------------------------------------

    def _release_reason(self, planned: PlannedBuild, printer: Printer, now: float) -> str | None:
        rule = self.config.release
        fill = planned.fill_for_release(printer)
        target = rule.fill if printer.powder_bed else rule.plate_fill
        if fill >= target:
            return f"fill {fill:.2f} reached the release target {target:.2f}"
        due = planned.earliest_due_ts
        if due is not None:
            rates = printer.process
            need_h = planned.machine_hours(printer) + rates.cooldown_h + rates.post_processing_h
            latest_start = due - need_h * HOUR
            queue_free = self.free_ts(printer, now)
            if queue_free + rule.due_margin_h * HOUR >= latest_start:
                return (f"due-date pressure: must start by {_fmt_ts(latest_start)} to meet {_fmt_ts(due)} "
                        f"(fill {fill:.2f})")
        if (not printer.powder_bed and now - planned.opened_ts >= rule.idle_plate_release_h * HOUR
                and self.free_ts(printer, now) <= now):
            return f"printer idle for a plate build open {rule.idle_plate_release_h:g} h (plate fill {fill:.2f})"
        if now - planned.opened_ts >= rule.max_hold_h * HOUR:
            return f"held open {rule.max_hold_h:g} h (fill {fill:.2f})"
        return None

    def _release(self, planned: PlannedBuild, now: float, reason: str, result: RoutingResult | None) -> None:
        printer = self.fleet.get(planned.printer_key)
        self.open.pop((planned.printer_key, planned.material), None)
        planned.status = "released"
        planned.released_ts = now
        planned.release_reason = reason
        if printer is not None:
            planned.expected_start_ts = self.free_ts(printer, now)
            self._update_expectation(planned, printer, now)
        self.queues.setdefault(planned.printer_key, []).append(planned)
        if result is not None:
            result.released.append(planned)
            result.touched[planned.build_id] = planned
        if self.on_release is not None:
            self.on_release(planned)

    def tick(self, now: float | None = None) -> list[PlannedBuild]:
        """Apply the release rules to every open build; return the builds released now."""
        now = time.time() if now is None else now
        released: list[PlannedBuild] = []
        for planned in list(self.open.values()):
            printer = self.fleet.get(planned.printer_key)
            if printer is None:
                continue
            reason = self._release_reason(planned, printer, now)
            if reason is not None:
                self._release(planned, now, reason, None)
                released.append(planned)
        return released

    def release_all(self, now: float, reason: str = "released on request") -> list[PlannedBuild]:
        released = list(self.open.values())
        for planned in released:
            self._release(planned, now, reason, None)
        return released

    # --- printer progress and failure ----------------------------------------------------------------

    def mark_started(self, build_id: str, now: float) -> None:
        planned = self.builds.get(build_id)
        if planned is not None and planned.status in ("released", "dispatched"):
            planned.status = "printing"
            printer = self.fleet.get(planned.printer_key)
            planned.expected_start_ts = now
            if printer is not None:
                self._update_expectation(planned, printer, now)

    def mark_done(self, build_id: str) -> None:
        planned = self.builds.get(build_id)
        if planned is not None:
            planned.status = "done"
            queue = self.queues.get(planned.printer_key, [])
            if planned in queue:
                queue.remove(planned)

    def fail_printer(self, printer_key: str, now: float | None = None, reason: str = "printer failed") -> RoutingResult:
        """Re-route every part on ``printer_key`` that is not done (open, queued and printing builds).

        The caller updates the fleet view first (the printer must no longer be available)."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        result = RoutingResult(f"reroute:{printer_key}")
        affected = [b for b in self.builds.values()
                    if b.printer_key == printer_key and b.status in ("open", "released", "dispatched", "printing")]
        units: list[Unit] = []
        for planned in affected:
            planned.status = "failed"
            planned.release_reason = reason
            self.open.pop((planned.printer_key, planned.material), None)
            units.extend(planned.units.values())
            result.touched[planned.build_id] = planned
        self.queues.pop(printer_key, None)
        self._route_units(units, now, result, note=f"re-routed from {printer_key} ({reason})")
        self._release_unless_kept_open(result, now)
        result.elapsed_s = time.perf_counter() - started
        return result

    def reroute_build(self, build_id: str, now: float | None = None, reason: str = "build failed") -> RoutingResult:
        """Re-route the parts of one build (refused or aborted job) to other printers."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        planned = self.builds[build_id]
        result = RoutingResult(f"reroute:{build_id}")
        if planned.status in ("done", "failed"):
            return result
        planned.status = "failed"
        planned.release_reason = reason
        self.open.pop((planned.printer_key, planned.material), None)
        queue = self.queues.get(planned.printer_key, [])
        if planned in queue:
            queue.remove(planned)
        result.touched[build_id] = planned
        self._route_units(list(planned.units.values()), now, result, note=f"re-routed from {build_id} ({reason})",
                          exclude=frozenset({planned.printer_key}))
        self._release_unless_kept_open(result, now)
        result.elapsed_s = time.perf_counter() - started
        return result

    def build_of(self, order_id: str, unit_id: str) -> PlannedBuild | None:
        build_id = self.unit_build.get((order_id, unit_id))
        return self.builds.get(build_id) if build_id else None

    def open_builds(self) -> Iterable[PlannedBuild]:
        return self.open.values()


# --- snapshot / restore ------------------------------------------------------------------------------

SNAPSHOT_VERSION = 1


def _part_doc(part: Any) -> dict[str, Any]:
    return {"part_id": part.part_id, "bbox_mm": list(part.bbox_mm), "volume_cm3": part.volume_cm3,
            "technology": part.technology, "material": part.material, "mass_g": part.mass_g,
            "quantity": part.quantity, "due_ts": part.due_ts, "priority": part.priority,
            "rotation": part.rotation.value}


def snapshot(router: Router) -> dict[str, Any]:
    """Everything the router must not forget across a restart: builds that are not done (with their
    placements and units), the build counter and suspensions. JSON-ready."""
    builds = []
    for planned in router.builds.values():
        if planned.status in ("done", "failed"):
            continue
        units = {}
        for item_id, unit in planned.units.items():
            units[item_id] = {"unit_id": unit.unit_id, "order_id": unit.order_id, "customer": unit.customer,
                              "due_ts": unit.due_ts, "priority": unit.priority, "part": _part_doc(unit.part)}
        builds.append({
            "build_id": planned.build_id, "printer": planned.printer_key, "technology": planned.technology,
            "material": planned.material, "opened_ts": planned.opened_ts, "status": planned.status,
            "released_ts": planned.released_ts, "release_reason": planned.release_reason,
            "expected_start_ts": planned.expected_start_ts, "expected_end_ts": planned.expected_end_ts,
            "expected_ready_ts": planned.expected_ready_ts, "dispatch_result": planned.dispatch_result,
            "chamber_mm": list(planned.build.chamber_mm), "spacing_mm": planned.build.spacing_mm,
            "stacking": planned.build.stacking,
            "placements": [{"item_id": p.item_id, "position_mm": list(p.position_mm), "size_mm": list(p.size_mm)}
                           for p in planned.build.placements],
            "units": units,
        })
    next_number = next(router._build_numbers)
    router._build_numbers = itertools.count(next_number)
    return {"version": SNAPSHOT_VERSION, "next_build": next_number, "builds": builds,
            "suspended": {k: list(v) for k, v in router.suspended.items()}}


def restore(router: Router, document: Mapping[str, Any]) -> None:
    """Load a :func:`snapshot` into an empty router (builds keep their ids, placements and queue order)."""
    from forgeline.routing.model import parse_part

    if document.get("version") != SNAPSHOT_VERSION:
        raise ConfigError(f"routing snapshot version {document.get('version')!r} is not {SNAPSHOT_VERSION}")
    parts: dict[tuple[str, str], Any] = {}  # one Part object per order line, as routing made them
    for doc in document["builds"]:
        x, y, z = (float(v) for v in doc["chamber_mm"])
        build = Build((x, y, z), float(doc["spacing_mm"]), stacking=bool(doc["stacking"]), build_id=doc["build_id"])
        for p in doc["placements"]:
            build.place_at(p["item_id"], tuple(p["position_mm"]), tuple(p["size_mm"]))
        planned = PlannedBuild(doc["build_id"], doc["printer"], doc["technology"], doc["material"], build,
                               doc["opened_ts"], status=doc["status"], released_ts=doc["released_ts"],
                               release_reason=doc["release_reason"], expected_start_ts=doc["expected_start_ts"],
                               expected_end_ts=doc["expected_end_ts"], expected_ready_ts=doc["expected_ready_ts"],
                               dispatch_result=doc["dispatch_result"])
        for item_id, u in doc["units"].items():
            key = (u["order_id"], u["part"]["part_id"])
            if key not in parts:
                parts[key] = parse_part(u["part"])
            unit = Unit(u["unit_id"], parts[key], u["order_id"], u["customer"], u["due_ts"], u["priority"])
            planned.units[item_id] = unit
            router.unit_build[(unit.order_id, unit.unit_id)] = planned.build_id
        router.builds[planned.build_id] = planned
        if planned.status == "open":
            router.open[(planned.printer_key, planned.material)] = planned
        elif planned.status in ("released", "dispatched", "printing"):
            router.queues.setdefault(planned.printer_key, []).append(planned)
    for queue in router.queues.values():  # the printer runs them in the order they were released
        queue.sort(key=lambda b: (b.released_ts or 0.0, b.expected_start_ts or 0.0))
    router._build_numbers = itertools.count(int(document.get("next_build", 1)))
    router.suspended = {k: (float(v[0]), str(v[1])) for k, v in (document.get("suspended") or {}).items()}


def result_json(result: RoutingResult, config: RoutingConfig | None = None) -> str:
    return json.dumps(result.document(config), indent=2)


__all__ = [
    "Assignment",
    "ConfigError",
    "ObjectiveWeights",
    "PlannedBuild",
    "ReleaseRule",
    "Rotation",
    "Router",
    "RoutingConfig",
    "RoutingResult",
]
