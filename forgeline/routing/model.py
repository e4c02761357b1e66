"""Orders, printers and the fleet view that routing works on, plus routing configuration.

Everything here is plain dataclasses so routing can run from a fleet file, from retained twin and
status messages read over MQTT, or from a simulation, without knowing which.

Example::

    >>> order = parse_order({"order_id": "o1", "customer": "bigco", "due_ts": 1e9, "parts": [
    ...     {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [40, 30, 12],
    ...      "volume_cm3": 6.5, "quantity": 2}]})
    >>> [unit.unit_id for unit in order.units()]
    ['bracket#1', 'bracket#2']
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from itertools import permutations
from pathlib import Path
from typing import Any

from forgeline.contract import topics
from forgeline.contract.topics import DeviceRef, Kind, TopicError
from forgeline.contract.vocabulary import POWDER_BED, DeviceState, Technology


class OrderError(ValueError):
    """An order or part that cannot be read; the message names the field."""


class FleetError(ValueError):
    """A fleet file or printer description that cannot be read; the message names the field."""


class Rotation(StrEnum):
    """Which orientations a part may be built in."""

    ANY = "any"  # all six axis-aligned orientations
    Z = "z"  # only about the vertical axis (a fixed build direction, common for SLA/DLP/FDM)
    NONE = "none"  # exactly as given


# --- materials --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    name: str
    density_g_cm3: float
    technologies: frozenset[str]
    price_per_kg: float  # used by quotes; routing uses density for masses


DEFAULT_MATERIALS: dict[str, Material] = {
    m.name: m
    for m in [
        Material("PA12", 1.01, frozenset({"SLS", "MJF"}), 60.0),
        Material("PA11", 1.03, frozenset({"SLS", "MJF"}), 75.0),
        Material("PA12-GB", 1.30, frozenset({"SLS", "MJF"}), 70.0),
        Material("TPU", 1.20, frozenset({"SLS", "MJF", "FDM"}), 90.0),
        Material("Standard-Resin", 1.15, frozenset({"SLA", "DLP"}), 150.0),
        Material("Tough-Resin", 1.18, frozenset({"SLA", "DLP"}), 190.0),
        Material("PLA", 1.24, frozenset({"FDM"}), 25.0),
        Material("PETG", 1.27, frozenset({"FDM"}), 28.0),
        Material("ABS", 1.04, frozenset({"FDM"}), 27.0),
        Material("Ti64", 4.43, frozenset({"metal"}), 350.0),
        Material("316L", 7.99, frozenset({"metal"}), 90.0),
        Material("AlSi10Mg", 2.67, frozenset({"metal"}), 110.0),
    ]
}


# --- orders -----------------------------------------------------------------------------------------


def _number(value: Any, where: str, *, positive: bool = True, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OrderError(f"{where}: must be a finite number, not {value!r}")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise OrderError(f"{where}: must be {'non-negative' if allow_zero else 'positive'}, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class Part:
    """One part line of an order (``quantity`` identical units)."""

    part_id: str
    bbox_mm: tuple[float, float, float]
    volume_cm3: float
    technology: str | None = None  # None: routing may choose any technology that runs the material
    material: str | None = None
    mass_g: float | None = None
    quantity: int = 1
    due_ts: float | None = None
    priority: int = 0  # higher first
    rotation: Rotation = Rotation.ANY

    @property
    def bbox_volume_cm3(self) -> float:
        return self.bbox_mm[0] * self.bbox_mm[1] * self.bbox_mm[2] / 1000.0

    def orientations(self) -> list[tuple[float, float, float]]:
        """The distinct (x, y, z) extents the part may be built with, the given one first."""
        return list(self._orientations)

    @cached_property
    def _orientations(self) -> tuple[tuple[float, float, float], ...]:
        x, y, z = self.bbox_mm
        if self.rotation is Rotation.NONE:
            candidates = [(x, y, z)]
        elif self.rotation is Rotation.Z:
            candidates = [(x, y, z), (y, x, z)]
        else:
            candidates = [(x, y, z), *[(a, b, c) for a, b, c in permutations((x, y, z)) if (a, b, c) != (x, y, z)]]
        return tuple(dict.fromkeys(candidates))

    def fits(self, chamber_mm: tuple[float, float, float]) -> bool:
        """True if some allowed orientation fits inside ``chamber_mm``."""
        cx, cy, cz = chamber_mm[0] + 1e-9, chamber_mm[1] + 1e-9, chamber_mm[2] + 1e-9
        return any(o[0] <= cx and o[1] <= cy and o[2] <= cz for o in self._orientations)


@dataclass(frozen=True)
class Unit:
    """One physical piece to print: a part line expanded by quantity."""

    unit_id: str
    part: Part
    order_id: str
    customer: str
    due_ts: float | None
    priority: int


@dataclass(frozen=True)
class PartProblem:
    """A part the order cannot route, with the reason (reported per part in the response)."""

    part_id: str
    reason: str
    code: str  # invalid | unknown_material | no_capable_printer | too_large | no_printer_available


@dataclass(frozen=True)
class Order:
    order_id: str
    customer: str
    parts: tuple[Part, ...]
    due_ts: float | None = None
    priority: int = 0
    problems: tuple[PartProblem, ...] = ()  # parts that could not even be read

    def units(self) -> Iterator[Unit]:
        for part in self.parts:
            due = part.due_ts if part.due_ts is not None else self.due_ts
            priority = max(part.priority, self.priority)
            for k in range(part.quantity):
                unit_id = f"{part.part_id}#{k + 1}" if part.quantity > 1 else part.part_id
                yield Unit(unit_id, part, self.order_id, self.customer, due, priority)


def parse_part(doc: Mapping[str, Any], index: int = 0) -> Part:
    """One part from its JSON form; :class:`OrderError` names the bad field."""
    if not isinstance(doc, Mapping):
        raise OrderError(f"parts[{index}]: must be an object")
    part_id = doc.get("part_id")
    if not isinstance(part_id, str) or not 1 <= len(part_id) <= 128:
        raise OrderError(f"parts[{index}].part_id: required, a string of 1-128 characters")
    where = f"part {part_id!r}"
    bbox = doc.get("bbox_mm")
    if not isinstance(bbox, list | tuple) or len(bbox) != 3:
        raise OrderError(f"{where}: bbox_mm must be three numbers (x, y, z in millimetres)")
    dims = tuple(_number(v, f"{where}: bbox_mm") for v in bbox)
    volume = _number(doc.get("volume_cm3"), f"{where}: volume_cm3")
    if volume > dims[0] * dims[1] * dims[2] / 1000.0 * (1 + 1e-6):
        raise OrderError(f"{where}: volume_cm3 {volume} exceeds its bounding box "
                         f"({dims[0] * dims[1] * dims[2] / 1000.0:.3f} cm3): wrong units?")
    technology = doc.get("technology")
    if technology is not None:
        try:
            technology = Technology(technology).value
        except ValueError:
            raise OrderError(f"{where}: unknown technology {technology!r} "
                             f"(one of {', '.join(t.value for t in Technology if t is not Technology.LINE)})") from None
        if technology == Technology.LINE.value:
            raise OrderError(f"{where}: technology 'line' is a production line, not a printer")
    material = doc.get("material")
    if material is not None and (not isinstance(material, str) or not material):
        raise OrderError(f"{where}: material must be a non-empty string")
    mass = doc.get("mass_g")
    quantity = doc.get("quantity", 1)
    if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= 100000:
        raise OrderError(f"{where}: quantity must be an integer in 1..100000")
    due = doc.get("due_ts")
    priority = doc.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise OrderError(f"{where}: priority must be an integer")
    rotation_doc = doc.get("rotation", doc.get("rotation_allowed", "any"))
    if rotation_doc is True:
        rotation = Rotation.ANY
    elif rotation_doc is False:
        rotation = Rotation.NONE
    else:
        try:
            rotation = Rotation(rotation_doc)
        except ValueError:
            raise OrderError(
                f"{where}: rotation must be 'any', 'z' or 'none' (or rotation_allowed true/false)"
            ) from None
    return Part(
        part_id=part_id,
        bbox_mm=(dims[0], dims[1], dims[2]),
        volume_cm3=volume,
        technology=technology,
        material=material,
        mass_g=None if mass is None else _number(mass, f"{where}: mass_g"),
        quantity=quantity,
        due_ts=None if due is None else _number(due, f"{where}: due_ts"),
        priority=priority,
        rotation=rotation,
    )


def parse_order(doc: Mapping[str, Any]) -> Order:
    """An order from its JSON form. Order-level errors raise :class:`OrderError`; a part that cannot be
    read becomes a :class:`PartProblem` so the rest of the order still routes."""
    if not isinstance(doc, Mapping):
        raise OrderError("an order must be a JSON object")
    order_id = doc.get("order_id")
    customer = doc.get("customer", "anonymous")
    try:
        order_id = topics.check_ident(str(order_id) if order_id is not None else "", "order_id")
        customer = topics.check_customer(customer)
    except TopicError as exc:
        raise OrderError(str(exc)) from None
    raw_parts = doc.get("parts")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise OrderError("parts: required, a non-empty list")
    if len(raw_parts) > 10000:
        raise OrderError(f"parts: {len(raw_parts)} part lines exceed the limit of 10000")
    due = doc.get("due_ts")
    priority = doc.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise OrderError("priority must be an integer")
    parts: list[Part] = []
    problems: list[PartProblem] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_parts):
        try:
            part = parse_part(raw, i)
        except OrderError as exc:
            pid = raw.get("part_id") if isinstance(raw, Mapping) else None
            problems.append(PartProblem(pid if isinstance(pid, str) else f"parts[{i}]", str(exc), "invalid"))
            continue
        if part.part_id in seen:
            problems.append(PartProblem(part.part_id, f"part {part.part_id!r}: duplicate part_id", "invalid"))
            continue
        seen.add(part.part_id)
        parts.append(part)
    return Order(
        order_id=order_id,
        customer=customer,
        parts=tuple(parts),
        due_ts=None if due is None else _number(due, "due_ts"),
        priority=priority,
        problems=tuple(problems),
    )


def load_order(path: str | Path) -> Order:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OrderError(f"{path}: {exc}") from None
    return parse_order(doc)


# --- printers and the fleet view ---------------------------------------------------------------------


# Typical vertical build rates (mm of build height per hour), setup and cool-down, used when a
# printer does not announce its own. Powder-bed and vat builds take time by height; FDM by volume.
@dataclass(frozen=True)
class ProcessRates:
    z_mm_per_h: float  # vertical build rate
    setup_h: float  # warm-up, recoating, plate changes per build
    cooldown_h: float  # after the build, before parts can be unpacked
    post_processing_h: float  # depowdering, washing/curing, support removal (per build)
    volume_cm3_per_h: float = 0.0  # FDM: extrusion rate (time adds by volume); 0 = height only


DEFAULT_RATES: dict[str, ProcessRates] = {
    "SLS": ProcessRates(12.0, 1.5, 8.0, 3.0),
    "MJF": ProcessRates(16.0, 1.0, 5.0, 2.0),
    "metal": ProcessRates(5.0, 2.0, 2.0, 8.0),
    "SLA": ProcessRates(20.0, 0.3, 0.0, 1.5),
    "DLP": ProcessRates(45.0, 0.2, 0.0, 1.0),
    "FDM": ProcessRates(30.0, 0.2, 0.0, 0.3, volume_cm3_per_h=12.0),
}

_BUSY_STATES = {DeviceState.PRINTING, DeviceState.HEATING, DeviceState.PAUSED}
_BLOCKED_STATES = {DeviceState.ERROR, DeviceState.MAINTENANCE, DeviceState.OFFLINE}


@dataclass(frozen=True)
class Printer:
    """A partner printer: capabilities from its birth message, live state from the twin."""

    ref: DeviceRef
    technology: str
    materials: tuple[str, ...]
    build_volume_mm: tuple[float, float, float]
    part_spacing_mm: float = 2.0
    cost_per_hour: float = 20.0
    # live state
    online: bool = True
    state: str = "idle"
    utilization: float | None = None
    anomaly_score: float | None = None
    anomaly_threshold: float = 0.8
    busy_until_ts: float | None = None  # expected end of the current job and queue (from the twin)
    layer_progress: float | None = None
    job_id: str | None = None
    rates: ProcessRates | None = None  # None: DEFAULT_RATES of the technology

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def factory(self) -> str:
        return self.ref.tenant

    @property
    def powder_bed(self) -> bool:
        return self.technology in {t.value for t in POWDER_BED}

    @property
    def process(self) -> ProcessRates:
        return self.rates or DEFAULT_RATES.get(self.technology, ProcessRates(20.0, 0.5, 0.0, 1.0))

    @property
    def chamber_volume_cm3(self) -> float:
        x, y, z = self.build_volume_mm
        return x * y * z / 1000.0

    def unavailable_reason(self) -> str | None:
        """Why routing must not use this printer now, or None if it may."""
        if not self.online:
            return "offline"
        try:
            state = DeviceState[self.state.upper()]
        except KeyError:
            return f"unknown state {self.state!r}"
        if state in _BLOCKED_STATES:
            return f"state {state.name.lower()}"
        if self.anomaly_score is not None and self.anomaly_score > self.anomaly_threshold:
            return f"anomaly score {self.anomaly_score:.2f} above its threshold {self.anomaly_threshold:.2f}"
        return None

    def build_hours(self, height_mm: float, volume_cm3: float) -> float:
        """Expected machine time of one build (setup + layers, + extrusion for FDM), hours."""
        rates = self.process
        hours = rates.setup_h + height_mm / rates.z_mm_per_h
        if rates.volume_cm3_per_h > 0:
            hours += volume_cm3 / rates.volume_cm3_per_h
        return hours


def _vec3(value: Any, where: str) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise FleetError(f"{where}: must be three numbers (x, y, z in millimetres)")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise FleetError(f"{where}: must be three positive numbers, not {list(value)!r}")
        out.append(float(v))
    return (out[0], out[1], out[2])


def _optional_ratio(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def printer_from_capabilities(ref: DeviceRef, caps: Mapping[str, Any]) -> Printer:
    """A printer from a birth message (or the ``capabilities`` of its twin state / fleet file entry)."""
    where = ref.key
    technology = caps.get("technology")
    if technology not in {t.value for t in Technology} or technology == Technology.LINE.value:
        raise FleetError(f"{where}: technology must be a printer technology, not {technology!r}")
    materials = caps.get("materials", [])
    if not isinstance(materials, list) or not all(isinstance(m, str) for m in materials):
        raise FleetError(f"{where}: materials must be a list of strings")
    spacing = caps.get("part_spacing_mm", 2.0)
    cost = caps.get("cost_per_hour", 20.0)
    for name, value in (("part_spacing_mm", spacing), ("cost_per_hour", cost)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise FleetError(f"{where}: {name} must be a non-negative number")
    threshold = caps.get("anomaly_threshold", 0.8)
    rates = None
    if isinstance(caps.get("z_mm_per_h"), int | float) and caps["z_mm_per_h"] > 0:
        base = DEFAULT_RATES.get(technology, ProcessRates(20.0, 0.5, 0.0, 1.0))
        rates = replace(base, z_mm_per_h=float(caps["z_mm_per_h"]))
    return Printer(
        ref=ref,
        technology=technology,
        materials=tuple(materials),
        build_volume_mm=_vec3(caps.get("build_volume_mm"), f"{where}: build_volume_mm"),
        part_spacing_mm=float(spacing),
        cost_per_hour=float(cost),
        anomaly_threshold=float(threshold) if isinstance(threshold, int | float) else 0.8,
        rates=rates,
    )


def apply_twin_state(printer: Printer, twin: Mapping[str, Any]) -> Printer:
    """The printer with live state from a ``twin_state`` document.

    Read: ``online``, ``state``, ``kpis.utilization``, ``kpis.anomaly_score``, ``reported.layer_progress``
    and, in ``job``, the expected end: ``busy_until_ts`` / ``estimated_end_ts`` or ``remaining_s``
    (relative to ``ts``); without them the end is estimated from layer progress and ``started_ts``.
    """
    kpis = twin.get("kpis") or {}
    reported = twin.get("reported") or {}
    job = twin.get("job") or {}
    ts = _optional_ratio(twin.get("ts"))
    progress = _optional_ratio(reported.get("layer_progress"))
    busy_until: float | None = None
    for key in ("busy_until_ts", "estimated_end_ts", "eta_ts"):
        if _optional_ratio(job.get(key)) is not None:
            busy_until = float(job[key])
            break
    if busy_until is None and ts is not None:
        remaining = _optional_ratio(job.get("remaining_s"))
        started = _optional_ratio(job.get("started_ts") or job.get("ts"))
        if remaining is not None:
            busy_until = ts + remaining
        elif started is not None and progress is not None and 0.01 < progress < 1:
            busy_until = ts + (ts - started) * (1 - progress) / progress
    state = twin.get("state", printer.state)
    return replace(
        printer,
        online=bool(twin.get("online", printer.online)),
        state=state if isinstance(state, str) else printer.state,
        utilization=_optional_ratio(kpis.get("utilization")),
        anomaly_score=_optional_ratio(kpis.get("anomaly_score")),
        busy_until_ts=busy_until if state in ("printing", "heating", "paused") else None,
        layer_progress=progress,
        job_id=job.get("job_id") if isinstance(job.get("job_id"), str) else None,
    )


@dataclass
class Fleet:
    """The fleet view routing reads: printers by device key."""

    printers: dict[str, Printer] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Printer]:
        return iter(self.printers.values())

    def __len__(self) -> int:
        return len(self.printers)

    def get(self, key: str) -> Printer | None:
        return self.printers.get(key)

    def add(self, printer: Printer) -> None:
        self.printers[printer.key] = printer

    def update(self, key: str, **changes: Any) -> Printer:
        printer = replace(self.printers[key], **changes)
        self.printers[key] = printer
        return printer

    def materials(self) -> set[str]:
        return {m for p in self for m in p.materials}

    # --- sources --------------------------------------------------------------------------------

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Fleet:
        """A fleet file: ``{"printers": [{"device": "tenant/site/area/device", "technology": ...,
        "materials": [...], "build_volume_mm": [...], ..., "state": "idle", "utilization": 0.4,
        "anomaly_score": 0.1, "busy_until_ts": ...}]}``."""
        entries = doc.get("printers") if isinstance(doc, Mapping) else None
        if not isinstance(entries, list):
            raise FleetError("a fleet file is an object with a 'printers' list")
        fleet = cls()
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise FleetError(f"printers[{i}]: must be an object")
            try:
                ref = DeviceRef.from_key(str(entry.get("device")))
            except TopicError as exc:
                raise FleetError(f"printers[{i}].device: {exc}") from None
            if ref.key in fleet.printers:
                raise FleetError(f"printers[{i}]: duplicate device {ref.key}")
            printer = printer_from_capabilities(ref, entry)
            state = entry.get("state", "idle")
            if not isinstance(state, str) or state.upper() not in DeviceState.__members__:
                raise FleetError(f"{ref.key}: state must be one of {[s.name.lower() for s in DeviceState]}")
            printer = replace(
                printer,
                online=bool(entry.get("online", True)),
                state=state,
                utilization=_optional_ratio(entry.get("utilization")),
                anomaly_score=_optional_ratio(entry.get("anomaly_score")),
                busy_until_ts=_optional_ratio(entry.get("busy_until_ts")),
            )
            fleet.add(printer)
        return fleet

    @classmethod
    def load(cls, path: str | Path) -> Fleet:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise FleetError(f"{path}: {exc}") from None
        return cls.from_document(doc)

    def to_document(self) -> dict[str, Any]:
        out = []
        for p in self:
            out.append({
                "device": p.key, "technology": p.technology, "materials": list(p.materials),
                "build_volume_mm": list(p.build_volume_mm), "part_spacing_mm": p.part_spacing_mm,
                "cost_per_hour": p.cost_per_hour, "online": p.online, "state": p.state,
                "utilization": p.utilization, "anomaly_score": p.anomaly_score, "busy_until_ts": p.busy_until_ts,
                "anomaly_threshold": p.anomaly_threshold,
            })
        return {"printers": out}


@dataclass
class FleetBuilder:
    """Builds a :class:`Fleet` from retained status (birth) and twin messages, in any order.

    Status messages carry the capabilities; twin state carries live state. A device seen only in
    the twin is used if its twin state has ``capabilities``; line stations are ignored.
    """

    births: dict[str, dict[str, Any]] = field(default_factory=dict)
    twins: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def apply(self, topic: str, document: Mapping[str, Any]) -> None:
        parsed = topics.parse(topic)
        if parsed.device is None:
            return
        key = parsed.device.key
        if parsed.kind == Kind.STATUS.value:
            if document.get("status") == "offline":
                self.births.setdefault(key, {})["_offline"] = True
            else:
                self.births[key] = dict(document)
        elif parsed.kind == Kind.TWIN.value:
            self.twins[key] = dict(document)

    def fleet(self) -> Fleet:
        fleet = Fleet()
        for key in sorted(set(self.births) | set(self.twins)):
            birth = self.births.get(key, {})
            twin = self.twins.get(key)
            caps: dict[str, Any] = dict((twin or {}).get("capabilities") or {})
            caps.update({k: v for k, v in birth.items() if not k.startswith("_")})
            if caps.get("technology") in (None, Technology.LINE.value):
                continue
            try:
                printer = printer_from_capabilities(DeviceRef.from_key(key), caps)
            except (FleetError, TopicError) as exc:
                self.problems[key] = str(exc)
                continue
            if twin is not None:
                printer = apply_twin_state(printer, twin)
            if birth.get("_offline"):
                printer = replace(printer, online=False, state="offline")
            fleet.add(printer)
        return fleet


def units_of(orders: Iterable[Order]) -> list[Unit]:
    return [u for o in orders for u in o.units()]
