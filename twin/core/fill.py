"""Chamber fill of 3D-printer builds: planned fill, packing density, realised fill, fleet means.

Builds are rare events (a few a day per printer), so this is plain Python; the per-sample part
(the build's progress) comes from the ``layer_progress`` channel through the kernel.

Definitions:
    planned fill     = Σ part volumes / build-chamber volume
    packing density  = Σ part masses / (material density × bed volume used), where the bed volume
                       used is the chamber volume up to the build height (the whole chamber when
                       the chamber height is not given). For powder beds (SLS, MJF, metal) this is
                       the part mass over the mass of powder the build consumes.
    realised fill    = planned fill × layer progress, i.e. the fill built so far as the build rises
                       (parts taken as evenly spread over the build height).

Examples:
    >>> planned_fill(1000.0, [100.0, 50.0])
    0.15
    >>> round(packing_density([120.0], material_density_g_cm3=1.0, bed_volume_cm3=1000.0), 3)
    0.12
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class BuildError(ValueError):
    """A build description that cannot be right (negative volumes, parts larger than the chamber …)."""


@dataclass
class BuildRecord:
    """One build: what was planned, and when it started and finished (µs)."""

    device: int
    tenant: str
    job_id: str
    start_us: int
    chamber_fill: float
    packing_density: float | None
    build_height_mm: float | None
    parts: int
    finish_us: int | None = None


def _finite_non_negative(values: Iterable[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    for v in out:
        if not math.isfinite(v) or v < 0:
            raise BuildError(f"{what} must be finite and non-negative, got {v!r}")
    return out


def planned_fill(chamber_volume_cm3: float, part_volumes_cm3: Sequence[float]) -> float:
    """Σ part volumes / chamber volume; a fill above 1 is physically impossible and refused."""
    if not math.isfinite(chamber_volume_cm3) or chamber_volume_cm3 <= 0:
        raise BuildError(f"chamber volume must be positive, got {chamber_volume_cm3!r}")
    volumes = _finite_non_negative(part_volumes_cm3, "part volumes")
    fill = math.fsum(volumes) / chamber_volume_cm3
    if fill > 1.0:
        raise BuildError(f"parts ({math.fsum(volumes):.1f} cm3) exceed the chamber ({chamber_volume_cm3:.1f} cm3)")
    return fill


def packing_density(part_masses_g: Sequence[float], *, material_density_g_cm3: float, bed_volume_cm3: float) -> float:
    """Σ part masses / (material density × bed volume used)."""
    if not math.isfinite(material_density_g_cm3) or material_density_g_cm3 <= 0:
        raise BuildError(f"material density must be positive, got {material_density_g_cm3!r}")
    if not math.isfinite(bed_volume_cm3) or bed_volume_cm3 <= 0:
        raise BuildError(f"bed volume must be positive, got {bed_volume_cm3!r}")
    masses = _finite_non_negative(part_masses_g, "part masses")
    return math.fsum(masses) / (material_density_g_cm3 * bed_volume_cm3)


def bed_volume_used(chamber_volume_cm3: float, build_height_mm: float | None, chamber_height_mm: float | None) -> float:
    """The chamber volume up to the build height (the whole chamber without both heights)."""
    if build_height_mm is None or chamber_height_mm is None:
        return chamber_volume_cm3
    if chamber_height_mm <= 0 or build_height_mm < 0:
        raise BuildError("chamber height must be positive and build height non-negative")
    return chamber_volume_cm3 * min(1.0, build_height_mm / chamber_height_mm)


def realised_fill(planned: float, layer_progress: float | None) -> float | None:
    """The fill built so far: planned fill × progress (None before any progress was reported)."""
    if layer_progress is None or not math.isfinite(layer_progress):
        return None
    return planned * min(1.0, max(0.0, layer_progress))


def mean_fill(builds: Iterable[BuildRecord], since_us: int, until_us: int) -> float | None:
    """Mean planned fill of the builds started in ``[since, until)``, weighted by build height.

    A build without a height weighs as much as the mean height of the others (or 1 when no build
    has one), so a missing height neither dominates nor vanishes.

    >>> b = [BuildRecord(0, "t", "a", 10, 0.2, None, 100.0, 3), BuildRecord(0, "t", "b", 20, 0.5, None, 300.0, 5)]
    >>> mean_fill(b, 0, 100)
    0.425
    """
    chosen = [b for b in builds if since_us <= b.start_us < until_us]
    if not chosen:
        return None
    heights = [b.build_height_mm for b in chosen if b.build_height_mm is not None and b.build_height_mm > 0]
    default = sum(heights) / len(heights) if heights else 1.0
    weights = [
        b.build_height_mm if b.build_height_mm is not None and b.build_height_mm > 0 else default for b in chosen
    ]
    return math.fsum(w * b.chamber_fill for w, b in zip(weights, chosen, strict=True)) / math.fsum(weights)
