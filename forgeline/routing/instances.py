"""Seeded, realistic routing instances: partner fleets and service-bureau orders.

Used by ``bench/routing_bench.py``, the tests and ``docs/examples``. Chamber sizes follow common
machines (HP MJF 5200, EOS P396 / Formiga P110, Formlabs Form 3/3L, EOS M290, desktop and large
FDM); part sizes run from small clips and brackets to large housings, with quantities skewed low.

Example::

    >>> fleet = generate_fleet(20, seed=1)
    >>> len(fleet)
    20
    >>> order = generate_order(50, seed=2, now=0.0)
    >>> sum(p.quantity for p in order.parts)
    50
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from forgeline.contract.topics import DeviceRef
from forgeline.routing.model import Fleet, Order, Part, Printer, Rotation

# technology -> (share of the fleet, chambers, materials, cost per hour, spacing mm)
FLEET_MIX: dict[str, tuple[float, list[tuple[float, float, float]], list[str], float, float]] = {
    "MJF": (0.25, [(380, 284, 380)], ["PA12", "PA11", "PA12-GB"], 35.0, 3.0),
    "SLS": (0.20, [(340, 340, 600), (200, 250, 330)], ["PA12", "TPU"], 30.0, 4.0),
    "SLA": (0.20, [(145, 145, 185), (335, 200, 300)], ["Standard-Resin", "Tough-Resin"], 8.0, 5.0),
    "FDM": (0.20, [(256, 256, 256), (350, 350, 350)], ["PLA", "PETG", "ABS"], 3.0, 5.0),
    "DLP": (0.05, [(192, 120, 200)], ["Standard-Resin"], 10.0, 4.0),
    "metal": (0.10, [(250, 250, 325)], ["Ti64", "316L", "AlSi10Mg"], 90.0, 5.0),
}

# part families: (share, size ranges x/y/z mm, solidity = volume / bbox volume)
PART_FAMILIES: list[tuple[str, float, tuple[tuple[float, float], ...], tuple[float, float]]] = [
    ("clip", 0.25, ((8, 30), (5, 20), (3, 15)), (0.25, 0.6)),
    ("bracket", 0.35, ((20, 80), (15, 60), (5, 40)), (0.15, 0.45)),
    ("cover", 0.2, ((50, 150), (40, 120), (10, 50)), (0.08, 0.25)),
    ("housing", 0.15, ((100, 250), (80, 200), (40, 150)), (0.05, 0.2)),
    ("manifold", 0.05, ((30, 120), (30, 100), (30, 100)), (0.3, 0.6)),
]

# technology shares of order lines (a service bureau's mix)
ORDER_TECH: list[tuple[str, float]] = [("MJF", 0.35), ("SLS", 0.25), ("SLA", 0.15), ("FDM", 0.15),
                                       ("DLP", 0.03), ("metal", 0.07)]


def _pick(rng: random.Random, weighted: list[tuple[str, float]]) -> str:
    return rng.choices([k for k, _ in weighted], weights=[w for _, w in weighted])[0]


def generate_fleet(printers: int, seed: int = 0, *, factories: int | None = None, live: bool = True,
                   now: float = 0.0) -> Fleet:
    """``printers`` printers across ``factories`` tenants (default one per ten printers), technologies in
    the shares of :data:`FLEET_MIX`; with ``live``, utilization, anomaly scores, queues and a few
    offline / failed printers like a real fleet's twin."""
    rng = random.Random(seed)
    factories = factories or max(2, printers // 10)
    techs = list(FLEET_MIX)
    counts = {t: max(1, round(FLEET_MIX[t][0] * printers)) for t in techs}
    while sum(counts.values()) > printers:
        counts[max(counts, key=lambda t: counts[t])] -= 1
    while sum(counts.values()) < printers:
        counts["MJF"] += 1
    fleet = Fleet()
    n = 0
    for tech in techs:
        _, chambers, materials, cost, spacing = FLEET_MIX[tech]
        for i in range(counts[tech]):
            factory = f"factory{(n % factories) + 1:02d}"
            ref = DeviceRef(factory, "site1", "hall1", f"{tech.lower()}-{i + 1:03d}")
            printer = Printer(
                ref=ref, technology=tech, materials=(materials[i % len(materials)],),
                build_volume_mm=chambers[i % len(chambers)], part_spacing_mm=spacing,
                cost_per_hour=round(cost * rng.uniform(0.8, 1.25), 2),
            )
            if live:
                roll = rng.random()
                state = "offline" if roll < 0.04 else "error" if roll < 0.07 else rng.choice(["idle", "printing"])
                printer = replace(
                    printer, online=state != "offline", state=state,
                    utilization=round(rng.uniform(0.2, 0.9), 3), anomaly_score=round(rng.betavariate(1.2, 12), 3),
                    busy_until_ts=now + rng.uniform(0.5, 12) * 3600 if state == "printing" else None,
                )
            fleet.add(printer)
            n += 1
    return fleet


def _part(rng: random.Random, part_id: str, technology: str, material: str, quantity: int,
          due_ts: float | None) -> Part:
    family = rng.choices(PART_FAMILIES, weights=[f[1] for f in PART_FAMILIES])[0]
    _, _, ranges, solidity = family
    dims = tuple(round(rng.uniform(lo, hi), 1) for lo, hi in ranges)
    bbox = (dims[0], dims[1], dims[2])
    if technology == "metal":  # metal parts are small and expensive
        bbox = (round(bbox[0] * 0.6, 1), round(bbox[1] * 0.6, 1), round(bbox[2] * 0.6, 1))
    volume = round(bbox[0] * bbox[1] * bbox[2] / 1000 * rng.uniform(*solidity), 3)
    rotation = Rotation.ANY if technology in ("MJF", "SLS", "metal") else Rotation.Z
    return Part(part_id, bbox, max(volume, 0.01), technology, material, None, quantity, due_ts, 0, rotation)


def generate_order(units: int, seed: int = 0, *, now: float = 0.0, order_id: str | None = None,
                   customer: str = "customer1", technology: str | None = None,
                   due_days: tuple[float, float] = (2.0, 7.0)) -> Order:
    """An order of ``units`` units in part lines with quantities 1-50 (skewed low)."""
    rng = random.Random(seed)
    due = now + rng.uniform(*due_days) * 86400
    parts: list[Part] = []
    left = units
    while left > 0:
        tech = technology or _pick(rng, ORDER_TECH)
        material = rng.choice(FLEET_MIX[tech][2])
        quantity = min(left, max(1, int(rng.paretovariate(1.3)) if rng.random() < 0.7 else rng.randint(1, 50)))
        parts.append(_part(rng, f"p{len(parts) + 1:04d}", tech, material, quantity, None))
        left -= quantity
    return Order(order_id or f"order-{seed}", customer, tuple(parts), due_ts=due)


def order_document(order: Order) -> dict[str, Any]:
    """The JSON form of an order (what ``forgeline route ORDER.json`` reads)."""
    return {
        "order_id": order.order_id,
        "customer": order.customer,
        "due_ts": order.due_ts,
        "priority": order.priority,
        "parts": [
            {"part_id": p.part_id, "technology": p.technology, "material": p.material, "bbox_mm": list(p.bbox_mm),
             "volume_cm3": p.volume_cm3, "quantity": p.quantity, "rotation": p.rotation.value,
             **({"mass_g": p.mass_g} if p.mass_g is not None else {}),
             **({"due_ts": p.due_ts} if p.due_ts is not None else {})}
            for p in order.parts
        ],
    }
