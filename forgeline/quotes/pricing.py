"""Instant quotes: price and lead-time options per technology and material from cost rates and the
live load of the capable printers.

Per unit of a part, for each (technology, material) that can make it::

    machine      printer rate x layer time of a typical build x the part's share of that build
    setup        printer rate x setup time x the part's share of the build      ("setup share")
    material     mass x price per kg x (powder refresh factor | support factor)
    post         post-processing per part + per cm3 of the technology
    cost         machine + setup + material + post
    unit price   cost x (1 + margin) x (1 + surge x busy_share)

A part's share of a build is its spacing-inflated bounding-box volume over the chamber volume at the
release fill (powder bed), or its footprint over the plate area at the plate fill (plate processes).
``busy_share`` is the mean load of the capable printers: their utilization, or their queue over the
horizon if larger, and 1 for a printer that cannot take work now. The lead time is when the
quantity would be ready on the capable printers that are free first (their queues from the twin,
the builds it needs spread over them, cool-down and post-processing), plus shipping.

Example::

    >>> from forgeline.routing.instances import generate_fleet
    >>> doc = quote_document([{"part_id": "b", "bbox_mm": [40, 30, 10], "volume_cm3": 5, "material": "PA12",
    ...                        "quantity": 10}], generate_fleet(20, seed=1, live=False), now=0.0)
    >>> sorted({o["technology"] for o in doc["parts"][0]["options"]})
    ['MJF', 'SLS']
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgeline.quotes.stl import MeshError, mesh_info
from forgeline.routing.model import Fleet, OrderError, Part, Printer, Rotation, parse_part
from forgeline.routing.router import HOUR, RoutingConfig

DEFAULT_POST_PER_PART = {"SLS": 1.5, "MJF": 1.2, "metal": 25.0, "SLA": 3.0, "DLP": 2.0, "FDM": 1.0}
DEFAULT_POST_PER_CM3 = {"SLS": 0.02, "MJF": 0.02, "metal": 0.5, "SLA": 0.05, "DLP": 0.05, "FDM": 0.0}


class QuoteError(ValueError):
    """A quote request that cannot be read at all (per-part problems are reported per part)."""


@dataclass(frozen=True)
class PricingConfig:
    margin: float = 0.3
    surge: float = 0.5  # at a fully loaded capable fleet prices are 1 + surge times the idle price
    currency: str = "EUR"
    powder_refresh: float = 1.3  # powder bought per powder used (unsintered powder ages)
    support_factor: float = 1.15  # plate processes: material in supports and rafts
    shipping_h: float = 24.0
    validity_h: float = 24.0
    post_per_part: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_POST_PER_PART))
    post_per_cm3: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_POST_PER_CM3))

    def __post_init__(self) -> None:
        for name in ("margin", "surge", "powder_refresh", "support_factor", "shipping_h", "validity_h"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise QuoteError(f"pricing.{name} must be a non-negative number, not {value!r}")


@dataclass
class QuotePart:
    part: Part
    error: str | None = None
    from_mesh: bool = False


def read_quote_part(doc: Mapping[str, Any], index: int) -> QuotePart:
    """A part of a quote request; STL content (``stl_base64``) replaces bbox and volume."""
    part_id = doc.get("part_id") if isinstance(doc, Mapping) else None
    label = part_id if isinstance(part_id, str) else f"parts[{index}]"
    if not isinstance(doc, Mapping):
        return QuotePart(Part(label, (1, 1, 1), 1.0), error=f"{label}: must be an object")
    data = dict(doc)
    from_mesh = False
    if "stl_base64" in data:
        try:
            raw = base64.b64decode(str(data.pop("stl_base64")), validate=True)
            info = mesh_info(raw, unit=str(data.pop("stl_unit", "mm")), name=f"{label}.stl")
        except (binascii.Error, ValueError) as exc:
            message = str(exc) if isinstance(exc, MeshError) else f"{label}: stl_base64 is not base64 ({exc})"
            return QuotePart(Part(label, (1, 1, 1), 1.0), error=message)
        data["bbox_mm"] = list(info.bbox_mm)
        data["volume_cm3"] = info.volume_cm3
        from_mesh = True
    try:
        return QuotePart(parse_part(data, index), from_mesh=from_mesh)
    except OrderError as exc:
        return QuotePart(Part(label, (1, 1, 1), 1.0), error=str(exc))


def _load(printer: Printer, now: float, horizon_h: float) -> float:
    if printer.unavailable_reason() is not None:
        return 1.0
    queue_h = max(0.0, ((printer.busy_until_ts or now) - now) / HOUR)
    return min(1.0, max(printer.utilization or 0.0, queue_h / horizon_h))


def _options_for(part: Part, fleet: Fleet, routing: RoutingConfig) -> list[tuple[str, str]]:
    pairs = sorted({(p.technology, m) for p in fleet for m in p.materials})
    return [(t, m) for t, m in pairs
            if (part.technology is None or t == part.technology) and (part.material is None or m == part.material)
            and (m not in routing.materials or t in routing.materials[m].technologies)]


def quote_option(part: Part, technology: str, material: str, fleet: Fleet, now: float, *,
                 pricing: PricingConfig, routing: RoutingConfig) -> dict[str, Any] | None:
    """Price and lead time of ``part`` (its quantity) in one technology and material; None if no printer
    of the fleet can make it (none runs the material, or the part fits no chamber)."""
    capable = [p for p in fleet if p.technology == technology and material in p.materials
               and part.fits(p.build_volume_mm)]
    if not capable:
        return None
    available = [p for p in capable if p.unavailable_reason() is None]
    busy_share = sum(_load(p, now, routing.horizon_h) for p in capable) / len(capable)
    entry = routing.materials.get(material)
    density = entry.density_g_cm3 if entry else 1.2
    price_per_kg = entry.price_per_kg if entry else 100.0
    reference = min(available or capable, key=lambda p: p.cost_per_hour)
    rates = reference.process
    x, y, z = part.bbox_mm
    spacing = reference.part_spacing_mm
    cx, cy, cz = reference.build_volume_mm
    inflated = (x + spacing) * (y + spacing) * (z + spacing)
    if reference.powder_bed:
        share = min(1.0, inflated / (cx * cy * cz * routing.release.fill))
        layer_h = cz / rates.z_mm_per_h
        height_per_build = cz
        per_build = max(1, int(cx * cy * cz * routing.release.fill // inflated))
        material_factor = pricing.powder_refresh
    else:
        # plate processes: standing on the plate in its lowest allowed orientation
        low = min(part.orientations(), key=lambda o: o[2])
        footprint = (low[0] + spacing) * (low[1] + spacing)
        share = min(1.0, footprint / (cx * cy * routing.release.plate_fill))
        layer_h = low[2] / rates.z_mm_per_h
        height_per_build = low[2]
        per_build = max(1, int(cx * cy * routing.release.plate_fill // footprint))
        material_factor = pricing.support_factor
    extrusion_h = part.volume_cm3 / rates.volume_cm3_per_h if rates.volume_cm3_per_h > 0 else 0.0
    machine = reference.cost_per_hour * (layer_h * share + extrusion_h)
    setup = reference.cost_per_hour * rates.setup_h * share
    mass = part.mass_g if part.mass_g is not None else part.volume_cm3 * density
    material_cost = mass / 1000.0 * price_per_kg * material_factor
    post = pricing.post_per_part.get(technology, 2.0) + pricing.post_per_cm3.get(technology, 0.0) * part.volume_cm3
    cost = machine + setup + material_cost + post
    surge = 1.0 + pricing.surge * busy_share
    unit_price = cost * (1.0 + pricing.margin) * surge
    # Lead time: the builds the quantity needs, spread over the printers that are free first.
    builds = math.ceil(part.quantity / per_build)
    pool = sorted(available, key=lambda p: max(now, p.busy_until_ts or now))
    if pool:
        ready = 0.0
        rounds: dict[str, float] = {p.key: max(now, p.busy_until_ts or now) for p in pool}
        build_h = reference.build_hours(height_per_build, part.volume_cm3 * min(part.quantity, per_build))
        for _ in range(builds):
            key = min(rounds, key=lambda k: rounds[k])
            rounds[key] += build_h * HOUR
            ready = max(ready, rounds[key])
        ready += (rates.cooldown_h + rates.post_processing_h + pricing.shipping_h) * HOUR
        lead_time_h: float | None = (ready - now) / HOUR
    else:
        ready, lead_time_h = math.nan, None
    return {
        "technology": technology,
        "material": material,
        "unit_price": round(unit_price, 2),
        "total_price": round(unit_price * part.quantity, 2),
        "lead_time_h": round(lead_time_h, 1) if lead_time_h is not None else 1e6,
        "ready_ts": round(ready, 1) if lead_time_h is not None else None,
        "available": bool(available),
        "capable_printers": len(capable),
        "available_printers": len(available),
        "busy_share": round(busy_share, 4),
        "mass_g": round(mass, 2),
        "breakdown": {"machine": round(machine, 4), "setup": round(setup, 4), "material": round(material_cost, 4),
                      "post_processing": round(post, 4), "margin": pricing.margin, "surge": round(surge, 4)},
    }


def quote_document(parts: Sequence[Mapping[str, Any]], fleet: Fleet, now: float | None = None, *,
                   pricing: PricingConfig | None = None, routing: RoutingConfig | None = None,
                   correlation_id: str = "quote") -> dict[str, Any]:
    """The ``quote_response`` document for the request's ``parts``."""
    now = time.time() if now is None else now
    pricing = pricing or PricingConfig()
    routing = routing or RoutingConfig()
    if not parts:
        raise QuoteError("a quote needs at least one part")
    out = []
    for index, raw in enumerate(parts):
        quoted = read_quote_part(raw, index)
        part = quoted.part
        entry: dict[str, Any] = {"part_id": part.part_id, "quantity": part.quantity}
        if quoted.error is not None:
            entry.update(options=[], error=quoted.error)
            out.append(entry)
            continue
        entry["bbox_mm"] = [round(v, 3) for v in part.bbox_mm]
        entry["volume_cm3"] = round(part.volume_cm3, 4)
        if quoted.from_mesh:
            entry["geometry"] = "stl"
        if part.material is not None and part.material not in routing.materials and part.material not in \
                fleet.materials():
            entry.update(options=[], error=f"part {part.part_id!r}: unknown material {part.material!r}")
            out.append(entry)
            continue
        options = [o for t, m in _options_for(part, fleet, routing)
                   if (o := quote_option(part, t, m, fleet, now, pricing=pricing, routing=routing)) is not None]
        options.sort(key=lambda o: (not o["available"], o["total_price"], o["lead_time_h"]))
        entry["options"] = options
        if not options:
            dims = "x".join(f"{v:g}" for v in part.bbox_mm)
            wanted = "/".join(v for v in (part.technology, part.material) if v) or "any technology"
            entry["error"] = f"part {part.part_id!r} ({dims} mm): no printer can make it in {wanted}"
        out.append(entry)
    return {
        "correlation_id": correlation_id,
        "ok": True,
        "quote_id": f"q-{uuid.uuid4().hex[:12]}",
        "ts": now,
        "valid_until_ts": now + pricing.validity_h * HOUR,
        "currency": pricing.currency,
        "parts": out,
    }


__all__ = ["PricingConfig", "QuoteError", "Rotation", "quote_document", "quote_option", "read_quote_part"]
