"""The ``routing`` measurement of :mod:`forgeline.contract.timeseries`: the order book per partner factory
(tenant) and technology, as the order-routing dashboard reads it.

Fields, for the printers of one tenant and technology:

* ``queued_parts`` — parts routed and not yet printing (in open, released or dispatched builds);
* ``open_builds`` — builds still taking parts; ``open_build_fill`` their mean fill (chamber fill for
  powder beds, plate fill otherwise: what the release rule compares), absent when there is none;
* ``released_builds`` — builds released to a printer and not finished (released, dispatched, printing);
* ``on_time_rate`` — share of parts with a due date that finish by it: finished builds by their
  ``job_finished`` time (counted by :class:`OnTimeTally` since the service started), the others by the
  router's expected ready time (machine time, cool-down, post-processing); absent without due dates.

Every tenant and technology of the fleet view gets a point, zeros included, so an idle factory shows 0
rather than no data.

Example:
    >>> from forgeline.routing.model import Fleet
    >>> from forgeline.routing.router import Router
    >>> routing_lines(Router(Fleet()), OnTimeTally(), now=1.0)
    []
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from forgeline.routing.router import PlannedBuild, Router
from forgeline.timeseries import contract_line

QUEUED = ("open", "released", "dispatched")
RELEASED = ("released", "dispatched", "printing")


def tenant_of(printer_key: str) -> str:
    return printer_key.split("/", 1)[0]


@dataclass
class OnTimeTally:
    """Parts of finished builds with a due date, per (tenant, technology): [on time, all]."""

    counts: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def finished(self, planned: PlannedBuild, finished_ts: float) -> None:
        dues = [u.due_ts for u in planned.units.values() if u.due_ts is not None]
        if not dues:
            return
        tally = self.counts.setdefault((tenant_of(planned.printer_key), planned.technology), [0, 0])
        tally[0] += sum(1 for due in dues if finished_ts <= due)
        tally[1] += len(dues)


def routing_lines(router: Router, tally: OnTimeTally, now: float) -> list[str]:
    """One ``routing`` point per tenant and technology of the fleet view (and of the builds), at ``now``."""
    keys: set[tuple[str, str]] = {(p.ref.tenant, p.technology) for p in router.fleet}
    queued: dict[tuple[str, str], int] = defaultdict(int)
    open_fills: dict[tuple[str, str], list[float]] = defaultdict(list)
    released: dict[tuple[str, str], int] = defaultdict(int)
    on_time: dict[tuple[str, str], list[int]] = {key: list(counts) for key, counts in tally.counts.items()}
    for planned in router.builds.values():
        key = (tenant_of(planned.printer_key), planned.technology)
        if planned.status in ("done", "failed"):
            continue
        keys.add(key)
        if planned.status in QUEUED:
            queued[key] += len(planned.units)
        if planned.status == "open":
            printer = router.fleet.get(planned.printer_key)
            open_fills[key].append(planned.fill_for_release(printer) if printer is not None else planned.build.fill)
        elif planned.status in RELEASED:
            released[key] += 1
        ready = planned.expected_ready_ts
        if ready is None:
            continue
        dues = [u.due_ts for u in planned.units.values() if u.due_ts is not None]
        if dues:
            counts = on_time.setdefault(key, [0, 0])
            counts[0] += sum(1 for due in dues if ready <= due)
            counts[1] += len(dues)
    lines = []
    for tenant, technology in sorted(keys):
        key = (tenant, technology)
        fills = open_fills.get(key, [])
        tally_of = on_time.get(key)
        point = contract_line("routing", {"tenant": tenant, "technology": technology}, {
            "queued_parts": queued.get(key, 0), "open_builds": len(fills),
            "open_build_fill": sum(fills) / len(fills) if fills else None,
            "released_builds": released.get(key, 0),
            "on_time_rate": tally_of[0] / tally_of[1] if tally_of and tally_of[1] else None,
        }, now)
        if point is not None:
            lines.append(point)
    return lines
