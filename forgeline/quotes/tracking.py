"""Order tracking: the state of every order, part and unit from routing results, build events and the
printers' twin state, with an ETA that follows the builds as they advance.

No MQTT here (see :mod:`forgeline.quotes.service`): feed it routing responses (:meth:`OrderTracker.
apply_routing`), device events (:meth:`~OrderTracker.apply_event`) and twin state
(:meth:`~OrderTracker.apply_twin`), call :meth:`~OrderTracker.tick` as time passes, and publish what
:meth:`~OrderTracker.documents` returns for the orders that changed.

Unit states, in order: ``received`` -> ``routed`` (in an open build) -> ``queued`` (build released to
its printer) -> ``printing`` (build progress from the printer's layer progress) -> ``post_processing``
(cool-down, depowdering, finishing) -> ``done``; ``rejected`` when routing could not place the part. A
part or order shows the least advanced state of its units, and ``delayed`` instead while its ETA is
past its due date. The ETA of a unit is its build's expected ready time from routing, re-estimated
from the layer progress while printing, and from the end of the print after it.

A customer's documents contain only that customer's units: never other customers of a shared build
(nor build ids, which would let customers find each other); the factory is named.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from forgeline.contract import topics
from forgeline.routing.model import DEFAULT_RATES, ProcessRates

STATES = ("rejected", "received", "routed", "queued", "printing", "post_processing", "done")
_RANK = {s: i for i, s in enumerate(STATES)}
_BUILD_TO_UNIT = {"open": "routed", "released": "queued", "dispatched": "queued", "printing": "printing",
                  "post_processing": "post_processing", "done": "done"}


def _rank_of_build(status: str) -> int:
    return _RANK.get(_BUILD_TO_UNIT.get(status, "routed"), 0)


@dataclass
class BuildTrack:
    build_id: str
    printer: str
    technology: str
    status: str = "open"
    expected_ready_ts: float | None = None
    started_ts: float | None = None
    finished_ts: float | None = None
    progress: float | None = None

    @property
    def rates(self) -> ProcessRates:
        return DEFAULT_RATES.get(self.technology, ProcessRates(20.0, 0.5, 0.0, 1.0))

    def eta(self, now: float) -> float | None:
        rates = self.rates
        after_print = (rates.cooldown_h + rates.post_processing_h) * 3600.0
        if self.status == "done":
            return self.finished_ts
        if self.finished_ts is not None:
            return self.finished_ts + after_print
        if self.status == "printing" and self.started_ts is not None and self.progress and self.progress > 0.02:
            remaining = (now - self.started_ts) * (1.0 - self.progress) / self.progress
            return now + remaining + after_print
        return self.expected_ready_ts


@dataclass
class UnitTrack:
    unit_id: str
    part_id: str
    status: str = "received"
    build_id: str | None = None
    factory: str | None = None
    reason: str | None = None


@dataclass
class OrderTrack:
    order_id: str
    customer: str
    due_ts: float | None
    received_ts: float
    part_quantities: dict[str, int]  # part_id -> quantity, in order
    part_dues: dict[str, float | None]
    units: dict[str, UnitTrack] = field(default_factory=dict)
    error: str | None = None
    notified_eta: float | None = None  # the ETA of the last eta_past_due event
    done_notified: bool = False


@dataclass
class Notice:
    """Something to tell the customer: an event document, optionally waiting for re-routing options."""

    customer: str
    order_id: str
    event: dict[str, Any]
    delayed_units: list[str] = field(default_factory=list)


class OrderTracker:
    def __init__(self) -> None:
        self.orders: dict[tuple[str, str], OrderTrack] = {}
        self.builds: dict[str, BuildTrack] = {}
        self.units_of_build: dict[str, set[tuple[str, str, str]]] = {}  # build -> (customer, order, unit)
        self.by_order_id: dict[str, tuple[str, str]] = {}  # routing knows order ids only

    # --- state ---------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every order, unit and build the tracker knows, JSON-ready (see :meth:`restore`)."""
        return {
            "orders": [{**{k: v for k, v in asdict(t).items() if k != "units"},
                        "units": [asdict(u) for u in t.units.values()]} for t in self.orders.values()],
            "builds": [asdict(b) for b in self.builds.values()],
            "by_order_id": {k: list(v) for k, v in self.by_order_id.items()},
        }

    def restore(self, document: Mapping[str, Any]) -> None:
        for doc in document.get("orders", []):
            units = {u["unit_id"]: UnitTrack(**u) for u in doc["units"]}
            track = OrderTrack(**{**doc, "units": units})
            self.orders[(track.customer, track.order_id)] = track
            for unit in units.values():
                if unit.build_id is not None:
                    self.units_of_build.setdefault(unit.build_id, set()).add(
                        (track.customer, track.order_id, unit.unit_id))
        for doc in document.get("builds", []):
            self.builds[doc["build_id"]] = BuildTrack(**doc)
        self.by_order_id.update({k: (v[0], v[1]) for k, v in document.get("by_order_id", {}).items()})

    # --- inputs ------------------------------------------------------------------------------------

    def order_received(self, customer: str, order_id: str, parts: Iterable[Mapping[str, Any]],
                       due_ts: float | None, now: float) -> OrderTrack:
        quantities: dict[str, int] = {}
        dues: dict[str, float | None] = {}
        for part in parts:
            quantities[str(part["part_id"])] = int(part.get("quantity", 1))
            dues[str(part["part_id"])] = part.get("due_ts", due_ts)
        track = OrderTrack(order_id, customer, due_ts, now, quantities, dues)
        for part_id, quantity in quantities.items():
            for k in range(quantity):
                unit_id = f"{part_id}#{k + 1}" if quantity > 1 else part_id
                track.units[unit_id] = UnitTrack(unit_id, part_id)
        self.orders[(customer, order_id)] = track
        self.by_order_id[order_id] = (customer, order_id)
        return track

    def order_failed(self, customer: str, order_id: str, error: str, now: float) -> OrderTrack:
        track = self.orders.get((customer, order_id)) or OrderTrack(order_id, customer, None, now, {}, {})
        track.error = error
        self.orders[(customer, order_id)] = track
        return track

    def apply_routing(self, document: Mapping[str, Any]) -> set[tuple[str, str]]:
        """A routing response or routing event: assignments move units into builds, rejected parts are
        marked, build entries update build state. Returns the orders that changed."""
        changed: set[tuple[str, str]] = set()
        for build in document.get("builds") or []:
            changed |= self._update_build(build)
        for assignment in document.get("assignments") or []:
            key = self.by_order_id.get(str(assignment.get("order_id")))
            if key is None:
                continue
            unit = self.orders[key].units.get(str(assignment.get("unit_id")))
            if unit is None:
                continue
            old = unit.build_id
            if old is not None and old in self.units_of_build:
                self.units_of_build[old].discard((key[0], key[1], unit.unit_id))
            build_id = str(assignment["build_id"])
            unit.build_id = build_id
            unit.factory = str(assignment.get("factory") or str(assignment["printer"]).split("/", 1)[0])
            self.units_of_build.setdefault(build_id, set()).add((key[0], key[1], unit.unit_id))
            if build_id not in self.builds:
                self.builds[build_id] = BuildTrack(build_id, str(assignment["printer"]), "",
                                                   expected_ready_ts=assignment.get("expected_ready_ts"))
            unit.status = _BUILD_TO_UNIT.get(self.builds[build_id].status, "routed")
            changed.add(key)
        order_id = document.get("order_id")
        for problem in document.get("rejected") or []:
            key = self.by_order_id.get(str(order_id))
            if key is None:
                continue
            for unit in self.orders[key].units.values():
                if unit.part_id == problem.get("part_id") and unit.build_id is None:
                    unit.status = "rejected"
                    unit.reason = str(problem.get("reason", "rejected"))
                    changed.add(key)
        return changed

    def _update_build(self, doc: Mapping[str, Any]) -> set[tuple[str, str]]:
        build_id = str(doc.get("build_id"))
        track = self.builds.get(build_id)
        if track is None:
            track = BuildTrack(build_id, str(doc.get("printer")), str(doc.get("technology", "")))
            self.builds[build_id] = track
        if doc.get("technology"):
            track.technology = str(doc["technology"])
        status = str(doc.get("status", track.status))
        if status == "failed":
            # its units are re-routed by the same or a following routing event
            track.status = "failed"
            return set()
        # never move back (an event about a release can arrive after the printer reported the start)
        if _rank_of_build(status) >= _rank_of_build(track.status):
            track.status = status
        if doc.get("expected_ready_ts") is not None:
            track.expected_ready_ts = float(doc["expected_ready_ts"])
        return self._sync_units(build_id)

    def _sync_units(self, build_id: str) -> set[tuple[str, str]]:
        track = self.builds[build_id]
        changed = set()
        for customer, order_id, unit_id in self.units_of_build.get(build_id, set()):
            unit = self.orders[(customer, order_id)].units[unit_id]
            unit.status = _BUILD_TO_UNIT.get(track.status, unit.status)
            changed.add((customer, order_id))
        return changed

    def apply_event(self, printer_key: str, event: Mapping[str, Any]) -> set[tuple[str, str]]:
        """A device event: job_started / job_finished / job_aborted of one of our builds."""
        build = self.builds.get(str(event.get("job_id")))
        if build is None or build.printer != printer_key:
            return set()
        ts = float(event.get("ts", 0.0))
        kind = event.get("type")
        if kind == "job_started":
            build.status, build.started_ts, build.progress = "printing", ts, 0.0
        elif kind == "job_finished":
            build.status, build.finished_ts, build.progress = "post_processing", ts, 1.0
        elif kind == "job_aborted":
            build.status = "failed"  # routing re-routes its parts; the event that moves them follows
            return set()
        return self._sync_units(build.build_id)

    def apply_twin(self, printer_key: str, twin: Mapping[str, Any]) -> set[tuple[str, str]]:
        """Layer progress of the build printing on ``printer_key``."""
        reported = twin.get("reported") or {}
        progress = reported.get("layer_progress")
        if not isinstance(progress, int | float) or isinstance(progress, bool) or not math.isfinite(progress):
            return set()
        job = twin.get("job") or {}
        candidates = [b for b in self.builds.values() if b.printer == printer_key and b.status == "printing"]
        if isinstance(job.get("job_id"), str):
            candidates = [b for b in candidates if b.build_id == job["job_id"]]
        if len(candidates) != 1:
            return set()
        candidates[0].progress = min(1.0, max(0.0, float(progress)))
        return self._sync_units(candidates[0].build_id)

    def tick(self, now: float) -> set[tuple[str, str]]:
        """Builds whose post-processing time has passed are done."""
        changed: set[tuple[str, str]] = set()
        for build in self.builds.values():
            if build.status == "post_processing" and build.finished_ts is not None:
                eta = build.eta(now)
                if eta is not None and eta <= now:
                    build.status = "done"
                    build.finished_ts = eta
                    changed |= self._sync_units(build.build_id)
        return changed

    # --- outputs -----------------------------------------------------------------------------------

    def unit_eta(self, unit: UnitTrack, now: float) -> float | None:
        if unit.build_id is None:
            return None
        build = self.builds.get(unit.build_id)
        return build.eta(now) if build is not None else None

    def _unit_progress(self, unit: UnitTrack) -> float:
        if unit.status in ("post_processing", "done"):
            return 1.0
        build = self.builds.get(unit.build_id or "")
        if unit.status == "printing" and build is not None:
            return build.progress or 0.0
        return 0.0

    def documents(self, key: tuple[str, str], now: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(order_status, {part key: part_status}) of one order, for its customer only."""
        track = self.orders[key]
        if track.error is not None:
            return ({"order_id": track.order_id, "customer": track.customer, "ts": now, "status": "error",
                     "error": track.error}, {})
        parts: dict[str, dict[str, Any]] = {}
        summaries = []
        all_etas: list[float] = []
        for part_id, quantity in track.part_quantities.items():
            units = [u for u in track.units.values() if u.part_id == part_id]
            etas = [e for u in units
                    if u.status not in ("rejected", "done") and (e := self.unit_eta(u, now)) is not None]
            done_etas = [e for u in units if u.status == "done" and (e := self.unit_eta(u, now)) is not None]
            eta = max(etas) if etas else (max(done_etas) if done_etas and len(done_etas) == len(units) else None)
            status = min((u.status for u in units), key=lambda s: _RANK[s]) if units else "received"
            due = track.part_dues.get(part_id)
            if status not in ("done", "rejected") and eta is not None and due is not None and eta > due:
                status = "delayed"
            progress = sum(self._unit_progress(u) for u in units) / max(len(units), 1)
            doc: dict[str, Any] = {
                "order_id": track.order_id, "part_id": part_id, "ts": now, "status": status, "quantity": quantity,
                "done": sum(1 for u in units if u.status == "done"), "progress": round(progress, 4),
                "eta_ts": eta, "due_ts": due,
                "units": [{"unit_id": u.unit_id, "status": u.status, "factory": u.factory,
                           "progress": round(self._unit_progress(u), 4), "eta_ts": self.unit_eta(u, now)}
                          for u in units],
            }
            reasons = {u.reason for u in units if u.reason}
            if reasons:
                doc["reason"] = "; ".join(sorted(reasons))
            parts[topics.part_key(part_id)] = doc
            summaries.append({"part_id": part_id, "part": topics.part_key(part_id), "status": status,
                              "progress": doc["progress"], "eta_ts": eta})
            if eta is not None and status != "rejected":
                all_etas.append(eta)
        units_all = list(track.units.values())
        live = [u for u in units_all if u.status != "rejected"]
        status = min((u.status for u in units_all), key=lambda s: _RANK[s]) if units_all else "received"
        if live and status == "rejected":
            status = min((u.status for u in live), key=lambda s: _RANK[s])
        eta = max(all_etas) if all_etas else None
        if status not in ("done", "rejected") and eta is not None and track.due_ts is not None and eta > track.due_ts:
            status = "delayed"
        order_doc = {
            "order_id": track.order_id, "customer": track.customer, "ts": now, "status": status,
            "due_ts": track.due_ts, "eta_ts": eta,
            "progress": round(sum(self._unit_progress(u) for u in live) / max(len(live), 1), 4),
            "units": len(units_all), "units_done": sum(1 for u in units_all if u.status == "done"),
            "factories": len({u.factory for u in units_all if u.factory}),
            "parts": summaries,
        }
        return order_doc, parts

    def notices(self, key: tuple[str, str], now: float) -> list[Notice]:
        """Events due for this order: ETA past the due date (once per later ETA), order done (once)."""
        track = self.orders[key]
        order_doc, part_docs = self.documents(key, now)
        out: list[Notice] = []
        eta, due = order_doc.get("eta_ts"), track.due_ts
        if order_doc["status"] == "done" and not track.done_notified:
            track.done_notified = True
            out.append(Notice(track.customer, track.order_id, {
                "type": "order_done", "ts": now, "order_id": track.order_id, "eta_ts": eta, "due_ts": due,
                "message": f"order {track.order_id} is done"}))
        late_parts = [p["part_id"] for p in part_docs.values() if p["status"] == "delayed"]
        if late_parts and eta is not None and (track.notified_eta is None or eta > track.notified_eta + 60):
            track.notified_eta = eta
            late_units = [u.unit_id for u in track.units.values() if u.part_id in late_parts
                          and u.status not in ("done", "rejected")]
            out.append(Notice(track.customer, track.order_id, {
                "type": "eta_past_due", "ts": now, "order_id": track.order_id, "part_ids": late_parts,
                "eta_ts": eta, "due_ts": due,
                "message": f"order {track.order_id}: expected ready {(eta - (due or eta)) / 3600:.1f} h after its due "
                           f"date ({len(late_units)} units of {len(late_parts)} parts)",
                "options": [{"option": "keep", "eta_ts": eta, "on_time": False,
                             "description": "keep the current plan"}],
            }, delayed_units=late_units))
        return out
