"""Routing benchmark: packing quality against py3dbp, routing speed, and a simulated day against a
least-loaded-printer baseline, all measured in one run on seeded instances.

    python bench/routing_bench.py [--seed 1] [--quick]

Parts (:mod:`forgeline.routing.instances`): clips, brackets, covers, housings and manifolds, sized
like a service bureau's jobs. Progress goes to stderr; the figures are ONE JSON object on the last
line of stdout.

1. **Packing** (HP MJF 5200 chamber 380 x 284 x 380 mm, 3 mm spacing, instances of 1.5 chambers of
   bounding-box volume): fill of the first build by our extreme-point packer vs py3dbp 1.1 on the
   same parts inflated by the same spacing (its default ``pack()`` and ``bigger_first=True``), and
   the number of builds for all the parts vs the volume lower bound (ceil of inflated volume over the
   chamber volume). Target: first-build fill >= 1.15 x py3dbp's.
2. **Time to route** a 1,000-unit order over a 200-printer fleet (median of 3; wall and CPU time).
   Target: < 1 s.
3. **Simulated day**: orders arrive for 24 h (Poisson) at a 40-printer fleet; every build runs FIFO on
   its printer for the time the printer model gives, then cools down and is post-processed. Our router
   keeps builds open until a release rule fires (ticks every 10 min, run on until every build is
   released); the baseline routes each order's parts to the least-loaded capable printer (earliest
   free) and releases its builds at once, packed with the same packer. Compared: mean fill of
   released powder-bed builds (target >= 1.3 x baseline) and the on-time rate (target: not lower).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from itertools import permutations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forgeline.routing.instances import PART_FAMILIES, generate_fleet, generate_order
from forgeline.routing.model import Fleet, Order, Printer, Unit
from forgeline.routing.packing import Build, check_build, pack_first_fit
from forgeline.routing.router import HOUR, PlannedBuild, Router, RoutingConfig

CHAMBER = (380.0, 284.0, 380.0)
SPACING = 3.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- 1. packing -------------------------------------------------------------------------------------


def packing_instance(seed: int, chambers: float = 1.5) -> list[tuple[float, float, float]]:
    rng = random.Random(seed)
    limit = chambers * CHAMBER[0] * CHAMBER[1] * CHAMBER[2]
    parts: list[tuple[float, float, float]] = []
    volume = 0.0
    while volume < limit:
        family = rng.choices(PART_FAMILIES, weights=[f[1] for f in PART_FAMILIES])[0]
        dims = tuple(rng.uniform(lo, hi) for lo, hi in family[2])
        parts.append((dims[0], dims[1], dims[2]))
        volume += dims[0] * dims[1] * dims[2]
    return parts


def _orientations(dims: tuple[float, float, float]) -> list[tuple[float, float, float]]:
    return list(dict.fromkeys((a, b, c) for a, b, c in permutations(dims)))


def ours_builds(parts: list[tuple[float, float, float]]) -> list[Build]:
    builds, left = pack_first_fit([(f"p{i}", _orientations(d)) for i, d in enumerate(parts)], CHAMBER, SPACING)
    assert not left and all(check_build(b) == [] for b in builds)
    return builds


def py3dbp_bin(parts: list[tuple[float, float, float]], bigger_first: bool) -> tuple[float, list[int]]:
    """Fill of one py3dbp bin and the indices of the parts it could not place."""
    from py3dbp import Bin, Item, Packer

    packer = Packer()
    packed_bin = Bin("chamber", CHAMBER[0] + SPACING, CHAMBER[1] + SPACING, CHAMBER[2] + SPACING, 1e12)
    packer.add_bin(packed_bin)
    for i, (x, y, z) in enumerate(parts):
        packer.add_item(Item(str(i), x + SPACING, y + SPACING, z + SPACING, 1))
    packer.pack(bigger_first=bigger_first)
    volume = sum(math.prod(parts[int(item.name)]) for item in packed_bin.items)
    placed = {int(item.name) for item in packed_bin.items}
    return volume / math.prod(CHAMBER), [i for i in range(len(parts)) if i not in placed]


def py3dbp_build_count(parts: list[tuple[float, float, float]]) -> int:
    left = list(range(len(parts)))
    count = 0
    while left:
        _, unplaced = py3dbp_bin([parts[i] for i in left], bigger_first=True)
        if len(unplaced) == len(left):
            raise RuntimeError("py3dbp placed nothing in an empty bin")
        left = [left[i] for i in unplaced]
        count += 1
    return count


def bench_packing(seeds: Iterable[int]) -> dict[str, float]:
    ours, default, bigger, builds, py_builds, lower_bounds, our_times, py_times = [], [], [], [], [], [], [], []
    for seed in seeds:
        parts = packing_instance(seed)
        started = time.perf_counter()
        packed = ours_builds(parts)
        our_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        fill_default, _ = py3dbp_bin(parts, bigger_first=False)
        py_times.append(time.perf_counter() - started)
        fill_bigger, _ = py3dbp_bin(parts, bigger_first=True)
        inflated = sum(math.prod(v + SPACING for v in d) for d in parts)
        lower_bound = math.ceil(inflated / math.prod(v + SPACING for v in CHAMBER))
        count = py3dbp_build_count(parts)
        log(f"packing seed {seed}: {len(parts)} parts; first-build fill ours {packed[0].fill:.3f}, py3dbp "
            f"{fill_default:.3f} (bigger_first {fill_bigger:.3f}); builds ours {len(packed)}, py3dbp {count}, "
            f"lower bound {lower_bound}")
        ours.append(packed[0].fill)
        default.append(fill_default)
        bigger.append(fill_bigger)
        builds.append(len(packed))
        py_builds.append(count)
        lower_bounds.append(lower_bound)
    return {
        "packing_instances": len(ours),
        "first_build_fill": round(statistics.mean(ours), 4),
        "py3dbp_first_build_fill": round(statistics.mean(default), 4),
        "py3dbp_bigger_first_first_build_fill": round(statistics.mean(bigger), 4),
        "first_build_fill_ratio": round(statistics.mean(ours) / statistics.mean(default), 3),
        "first_build_fill_ratio_vs_bigger_first": round(statistics.mean(ours) / statistics.mean(bigger), 3),
        "builds": sum(builds),
        "py3dbp_bigger_first_builds": sum(py_builds),
        "volume_lower_bound_builds": sum(lower_bounds),
        "pack_time_s": round(statistics.mean(our_times), 4),
        "py3dbp_pack_time_s": round(statistics.mean(py_times), 4),
    }


# --- 2. time to route --------------------------------------------------------------------------------


def bench_route_time(seed: int, repeats: int = 3) -> dict[str, float]:
    fleet = generate_fleet(200, seed=seed, now=0.0)
    order = generate_order(1000, seed=seed + 1, now=0.0)
    walls, cpus = [], []
    assigned = 0
    for _ in range(repeats):
        router = Router(fleet)
        wall, cpu = time.perf_counter(), time.process_time()
        result = router.route(order, 0.0)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assigned = len(result.assignments)
    log(f"route 1000 units over 200 printers: wall {statistics.median(walls):.3f} s, "
        f"cpu {statistics.median(cpus):.3f} s, {assigned} assigned, {len(result.touched)} builds")
    return {"route_1000x200_wall_s": round(statistics.median(walls), 4),
            "route_1000x200_cpu_s": round(statistics.median(cpus), 4),
            "route_1000x200_assigned": assigned}


# --- 3. simulated day --------------------------------------------------------------------------------


class Schedule:
    """FIFO execution of released builds on each printer, shared by both policies."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.free_at: dict[str, float] = {}
        self.runs: list[tuple[PlannedBuild | Build, str, float, float, float, list[Unit]]] = []

    def run(self, printer: Printer, build: Build, units: list[Unit], volume: float, released: float,
            planned: PlannedBuild | Build) -> tuple[float, float]:
        start = max(released, self.free_at.get(printer.key, 0.0))
        end = start + printer.build_hours(build.height_mm, volume) * HOUR
        rates = printer.process
        ready = end + (rates.cooldown_h + rates.post_processing_h) * HOUR
        self.free_at[printer.key] = end
        self.runs.append((planned, printer.key, start, end, ready, units))
        return start, end


def day_orders(seed: int, orders: int) -> list[tuple[float, Order]]:
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, 24 * HOUR) for _ in range(orders))
    out = []
    for i, ts in enumerate(arrivals):
        units = max(1, min(60, int(rng.lognormvariate(1.6, 0.9))))
        order = generate_order(units, seed=seed * 1000 + i, now=ts, order_id=f"d{i}", due_days=(2.0, 5.0))
        out.append((ts, order))
    return out


def simulate_ours(fleet: Fleet, orders: list[tuple[float, Order]]) -> tuple[Schedule, float]:
    schedule = Schedule(fleet)
    router = Router(fleet, RoutingConfig())
    started: set[str] = set()

    def on_release(planned: PlannedBuild) -> None:
        printer = fleet.printers[planned.printer_key]
        units = list(planned.units.values())
        schedule.run(printer, planned.build, units, planned.volume_cm3, planned.released_ts or 0.0, planned)

    router.on_release = on_release
    route_time = 0.0

    def advance(now: float) -> None:
        # printers report progress: builds that started / finished by now, and when each is free
        for planned, _key, start, end, _, _ in schedule.runs:
            assert isinstance(planned, PlannedBuild)
            if start <= now and planned.build_id not in started:
                started.add(planned.build_id)
                router.mark_started(planned.build_id, start)
            if end <= now and planned.status != "done":
                router.mark_done(planned.build_id)
        # the twin reports the end of the build running now; queued builds the router knows itself
        running: dict[str, float] = {}
        for _, key, start, end, _, _ in schedule.runs:
            if start <= now < end:
                running[key] = end
        for key in schedule.free_at:
            running_end = running.get(key)
            fleet.update(key, busy_until_ts=running_end, state="printing" if running_end is not None else "idle")
        router.tick(now)

    tick = 600.0
    clock = 0.0
    for ts, order in orders:
        while clock + tick <= ts:
            clock += tick
            advance(clock)
        advance(ts)
        started_at = time.perf_counter()
        router.route(order, ts)
        route_time += time.perf_counter() - started_at
    while router.open and clock < 30 * 24 * HOUR:  # every build must be released by a rule
        clock += tick
        advance(clock)
    return schedule, route_time


def simulate_least_loaded(fleet: Fleet, orders: list[tuple[float, Order]]) -> Schedule:
    schedule = Schedule(fleet)
    checker = Router(fleet)  # only for the per-part capability checks, shared with ours
    for ts, order in orders:
        groups: dict[tuple[str, str], tuple[list[Unit], list[Printer]]] = {}
        for unit in order.units():
            available, problem = checker._check_part(unit)
            if problem is None:
                key = (str(unit.part.technology), str(unit.part.material))
                groups.setdefault(key, ([], available))[0].append(unit)
        for units, printers in groups.values():
            left = sorted(units, key=lambda u: -u.part.bbox_volume_cm3)
            while left:
                printer = min(printers, key=lambda p: (max(ts, schedule.free_at.get(p.key, 0.0)), p.key))
                build = Build(printer.build_volume_mm, printer.part_spacing_mm, stacking=printer.powder_bed)
                placed = [u for u in left if build.add(f"{u.order_id}.{u.unit_id}", u.part.orientations())]
                if not placed:
                    printers = [p for p in printers if p.key != printer.key]
                    if not printers:
                        break
                    continue
                placed_ids = {id(u) for u in placed}
                left = [u for u in left if id(u) not in placed_ids]
                schedule.run(printer, build, placed, sum(u.part.volume_cm3 for u in placed), ts, build)
    return schedule


def day_figures(schedule: Schedule) -> dict[str, float]:
    powder_fills, plate_fills, on_time, units = [], [], 0, 0
    for planned, key, _, _, ready, unit_list in schedule.runs:
        build = planned.build if isinstance(planned, PlannedBuild) else planned
        if schedule.fleet.printers[key].powder_bed:
            powder_fills.append(build.fill)
        else:
            plate_fills.append(build.plate_fill)
        for unit in unit_list:
            units += 1
            on_time += unit.due_ts is None or ready <= unit.due_ts
    return {"powder_fill": statistics.mean(powder_fills), "plate_fill": statistics.mean(plate_fills),
            "builds": len(schedule.runs), "on_time": on_time / max(units, 1), "units": units}


def bench_day(seed: int, orders: int) -> dict[str, float]:
    base = generate_fleet(40, seed=seed, live=False)
    fleet_ours = Fleet(dict(base.printers))
    fleet_base = Fleet({k: replace(p) for k, p in base.printers.items()})
    schedule = day_orders(seed + 7, orders)
    ours_schedule, route_time = simulate_ours(fleet_ours, schedule)
    ours = day_figures(ours_schedule)
    baseline = day_figures(simulate_least_loaded(fleet_base, schedule))
    log(f"day: {orders} orders, {ours['units']} units; powder-bed fill ours {ours['powder_fill']:.3f} vs "
        f"least-loaded {baseline['powder_fill']:.3f}; plate fill {ours['plate_fill']:.3f} vs "
        f"{baseline['plate_fill']:.3f}; builds {ours['builds']} vs {baseline['builds']}; on time "
        f"{ours['on_time']:.3f} vs {baseline['on_time']:.3f}")
    return {
        "day_orders": orders,
        "day_units": ours["units"],
        "day_mean_fill": round(ours["powder_fill"], 4),
        "day_baseline_mean_fill": round(baseline["powder_fill"], 4),
        "day_fill_ratio": round(ours["powder_fill"] / baseline["powder_fill"], 3),
        "day_plate_fill": round(ours["plate_fill"], 4),
        "day_baseline_plate_fill": round(baseline["plate_fill"], 4),
        "day_builds": ours["builds"],
        "day_baseline_builds": baseline["builds"],
        "day_on_time": round(ours["on_time"], 4),
        "day_baseline_on_time": round(baseline["on_time"], 4),
        "day_route_time_s": round(route_time, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer instances (a smoke run)")
    args = parser.parse_args()
    started = time.perf_counter()
    figures: dict[str, object] = {"bench": "routing", "seed": args.seed}
    figures.update(bench_packing(range(args.seed, args.seed + (1 if args.quick else 3))))
    figures.update(bench_route_time(args.seed, repeats=1 if args.quick else 3))
    figures.update(bench_day(args.seed, 60 if args.quick else 150))
    figures["targets"] = {
        "route_1000x200_under_1s": figures["route_1000x200_wall_s"] < 1.0,  # type: ignore[operator]
        "first_build_fill_ratio_ge_1_15": figures["first_build_fill_ratio"] >= 1.15,  # type: ignore[operator]
        "day_fill_ratio_ge_1_3": figures["day_fill_ratio"] >= 1.3,  # type: ignore[operator]
        "day_on_time_not_lower": figures["day_on_time"] >= figures["day_baseline_on_time"],  # type: ignore[operator]
    }
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
