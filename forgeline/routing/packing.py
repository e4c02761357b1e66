"""Bounding-box packing of parts into build chambers, with rotations and part spacing.

A :class:`Build` is one chamber (or build plate) that parts are added to one at a time, so a build
can stay open while later orders arrive. Placement follows the extreme-point method (Crainic,
Perboli and Tadei 2008): the candidate positions are the corners that placed boxes create, projected
back onto the chamber walls and neighbouring boxes; each new part goes to the candidate position and
orientation that keeps the build lowest, then most compact in y and x. For powder-bed processes
(SLS, MJF, metal) parts stack in 3D and build time follows build height, so "lowest" is what
matters; on plate processes (SLA, DLP, FDM) every part stands on the plate (``stacking=False``).

Spacing: each part is inflated by the printer's ``part_spacing_mm`` along +x, +y and +z, and so is
the chamber, so parts keep the spacing between each other while they may touch the chamber walls
(the wall margin is part of the printer's declared build volume).

Three layers as elsewhere in forgeline: :class:`Build` validates and keeps state; :func:`choose_position`
is the numpy kernel; :func:`choose_position_reference` is the slow, obviously-correct version it is
tested against, and :func:`check_build` verifies any packing from scratch.

Example::

    >>> build = Build((100, 100, 100), spacing_mm=2)
    >>> build.add("a", [(50, 50, 50)]).position_mm
    (0.0, 0.0, 0.0)
    >>> build.add("b", [(50, 50, 50)]).position_mm
    (52.0, 0.0, 0.0)
    >>> round(build.fill, 3)
    0.25
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations

import numpy as np
from numpy.typing import NDArray

Vec3 = tuple[float, float, float]
Array = NDArray[np.float64]

EPS = 1e-6  # mm; touching boxes (within float noise) do not overlap
_CHUNK = 32  # candidates first checked against the placed boxes at once
_AXES = np.arange(3)
_ONE_HOT = np.eye(3, dtype=bool)
# (corner of axis a) projected along each other axis: corners 0,0,1,1,2,2 along axes 1,2,0,2,0,1
_PROJECT_AXES = np.array([1, 2, 0, 2, 0, 1], dtype=np.intp)


@dataclass(frozen=True)
class Placement:
    """Where one part sits: its corner nearest the origin and its oriented extents (no spacing)."""

    item_id: str
    position_mm: Vec3
    size_mm: Vec3

    @property
    def top_mm(self) -> float:
        return self.position_mm[2] + self.size_mm[2]


def _score(top: Array, scale: float) -> Array:
    # Lexicographic (top z, then far y, then far x) folded into one float: the lowest build first.
    return np.asarray(top[..., 2] * scale * scale + top[..., 1] * scale + top[..., 0], dtype=np.float64)


def choose_position(
    points: Array, dims: Array, lower: Array, upper: Array, bound: Array
) -> tuple[int, int] | None:
    """The (point index, orientation index) to place a box of one of ``dims`` (r x 3, inflated) at,
    among extreme ``points`` (m x 3), given placed boxes ``[lower, upper)`` (n x 3) and the inflated
    chamber ``bound``; None if no candidate fits. Ties go to the lowest flat index (point-major)."""
    if len(points) == 0 or len(dims) == 0:
        return None
    far = points[:, None, :] + dims[None, :, :]  # (m, r, 3)
    # Per-axis comparisons instead of np.all(axis=...): several times faster on these small arrays.
    limit = bound + EPS
    inside = (far[:, :, 0] <= limit[0]) & (far[:, :, 1] <= limit[1]) & (far[:, :, 2] <= limit[2])
    flat = np.flatnonzero(inside)
    if flat.size == 0:
        return None
    scale = float(bound.max()) * 2.0 + 1.0
    scores = _score(far.reshape(-1, 3)[flat], scale)
    r = dims.shape[0]
    if len(lower) == 0:
        best = int(flat[int(np.argmin(scores))])  # argmin returns the first of equal minima
        return best // r, best % r
    if flat.size > 4 * _CHUNK:
        # Usually one of the best few fits: rank only the candidates scoring below the _CHUNK-th
        # smallest score first. Every other candidate scores at least that, so a hit here is the
        # same one the full stable sort would find.
        kth = np.partition(scores, _CHUNK)[_CHUNK]
        head = scores < kth
        ranked = flat[head][np.argsort(scores[head], kind="stable")]
        hit = _first_free(ranked, points, dims, lower, upper)
        if hit is not None:
            return hit // r, hit % r
        flat, scores = flat[~head], scores[~head]
    hit = _first_free(flat[np.argsort(scores, kind="stable")], points, dims, lower, upper)
    return None if hit is None else (hit // r, hit % r)


def _first_free(ranked: NDArray[np.intp], points: Array, dims: Array, lower: Array, upper: Array) -> int | None:
    """The first flat candidate index in ``ranked`` whose box overlaps no placed box."""
    r = dims.shape[0]
    upper_tight = upper - EPS
    lower_x, lower_y, lower_z = lower[None, :, 0], lower[None, :, 1], lower[None, :, 2]
    upper_x, upper_y, upper_z = upper_tight[None, :, 0], upper_tight[None, :, 1], upper_tight[None, :, 2]
    start, size = 0, _CHUNK
    while start < ranked.size:
        # Growing chunks: the best few candidates usually fit; a crowded build pays for fewer calls.
        chunk = ranked[start : start + size]
        lo = points[chunk // r]
        hi = lo + dims[chunk % r] - EPS
        overlap = (
            (lo[:, 0, None] < upper_x) & (lo[:, 1, None] < upper_y) & (lo[:, 2, None] < upper_z)
            & (lower_x < hi[:, 0, None]) & (lower_y < hi[:, 1, None]) & (lower_z < hi[:, 2, None])
        )
        free = ~overlap.any(axis=1)
        if free.any():
            return int(chunk[int(np.argmax(free))])
        start += size
        size *= 4
    return None


def choose_position_reference(
    points: Sequence[Vec3], dims: Sequence[Vec3], lower: Sequence[Vec3], upper: Sequence[Vec3], bound: Vec3
) -> tuple[int, int] | None:
    """Plain-Python :func:`choose_position`: try every candidate, best score first."""
    scale = max(bound) * 2.0 + 1.0
    candidates = []
    for i, p in enumerate(points):
        for j, d in enumerate(dims):
            far = [p[k] + d[k] for k in range(3)]
            if all(far[k] <= bound[k] + EPS for k in range(3)):
                score = far[2] * scale * scale + far[1] * scale + far[0]
                candidates.append((score, i * len(dims) + j, i, j))
    candidates.sort()
    for _, _, i, j in candidates:
        lo = points[i]
        hi = [lo[k] + dims[j][k] for k in range(3)]
        clash = False
        for a, b in zip(lower, upper, strict=True):
            if all(lo[k] < b[k] - EPS and a[k] < hi[k] - EPS for k in range(3)):
                clash = True
                break
        if not clash:
            return i, j
    return None


@dataclass
class Build:
    """One build chamber being filled. Add parts with :meth:`add`; read :attr:`fill` and :attr:`height_mm`."""

    chamber_mm: Vec3
    spacing_mm: float = 0.0
    stacking: bool = True  # False: every part stands on the plate (z = 0)
    build_id: str = ""
    placements: list[Placement] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if len(self.chamber_mm) != 3 or any(not (0 < c < math.inf) for c in self.chamber_mm):
            raise ValueError(f"chamber_mm must be three positive numbers, not {self.chamber_mm!r}")
        if not 0 <= self.spacing_mm < math.inf:
            raise ValueError(f"spacing_mm must be >= 0, not {self.spacing_mm!r}")
        self.chamber_mm = (float(self.chamber_mm[0]), float(self.chamber_mm[1]), float(self.chamber_mm[2]))
        self._bound = np.array(self.chamber_mm, dtype=np.float64) + self.spacing_mm
        self._chamber_bound = self._bound.copy()  # _bound may be lowered in z by limit_height()
        self._lower_buffer = np.empty((16, 3))
        self._upper_buffer = np.empty((16, 3))
        self._lower = self._lower_buffer[:0]
        self._upper = self._upper_buffer[:0]
        self._points = np.zeros((1, 3))
        self._part_volume_mm3 = 0.0
        self._inflated_volume_mm3 = 0.0
        self._height = 0.0
        # Sorted extents of parts that did not fit: anything at least as large in every sorted
        # dimension cannot fit either (only valid for freely rotating parts, see add()).
        self._failed: list[Vec3] = []

    # --- reading ---------------------------------------------------------------------------------

    @property
    def chamber_volume_cm3(self) -> float:
        x, y, z = self.chamber_mm
        return x * y * z / 1000.0

    @property
    def packed_volume_cm3(self) -> float:
        """Sum of the parts' bounding-box volumes."""
        return self._part_volume_mm3 / 1000.0

    @property
    def fill(self) -> float:
        """Bounding-box chamber fill: packed bounding-box volume over the whole chamber volume."""
        return self._part_volume_mm3 / (self.chamber_volume_cm3 * 1000.0)

    @property
    def height_mm(self) -> float:
        """Build height: the top of the highest part."""
        return self._height

    @property
    def height_fill(self) -> float:
        """Fill of the chamber up to the build height (what a powder-bed build actually sinters through)."""
        if self._height <= 0:
            return 0.0
        x, y, _ = self.chamber_mm
        return self._part_volume_mm3 / (x * y * self._height)

    @property
    def plate_fill(self) -> float:
        """Share of the plate area covered by parts standing on it (plate processes)."""
        x, y, _ = self.chamber_mm
        return sum(p.size_mm[0] * p.size_mm[1] for p in self.placements if p.position_mm[2] == 0) / (x * y)

    def __len__(self) -> int:
        return len(self.placements)

    @property
    def height_limit_mm(self) -> float:
        return float(self._bound[2]) - self.spacing_mm

    def limit_height(self, height_mm: float | None) -> None:
        """Accept parts only up to ``height_mm`` (None: the whole chamber); never below the parts
        already placed. Routing uses it to keep a build short enough to meet its due dates."""
        limit = self.chamber_mm[2] if height_mm is None else min(self.chamber_mm[2], max(height_mm, self._height))
        if limit > self.height_limit_mm:
            self._failed.clear()  # parts that did not fit under the lower limit may fit now
        self._bound = self._bound.copy()
        self._bound[2] = limit + self.spacing_mm

    # --- adding ----------------------------------------------------------------------------------

    def add(self, item_id: str, orientations: Sequence[Vec3]) -> Placement | None:
        """Place a part given its allowed oriented extents (mm); None if it does not fit."""
        if not orientations:
            raise ValueError(f"{item_id}: no orientation given")
        inflated = np.asarray(orientations, dtype=np.float64).reshape(-1, 3) + self.spacing_mm
        if not np.all(np.isfinite(inflated)) or np.any(inflated <= self.spacing_mm):
            raise ValueError(f"{item_id}: extents must be positive, not {list(orientations)!r}")
        item_volume = float(np.prod(inflated[0]))
        if self._inflated_volume_mm3 + item_volume > self._bound_volume() * (1 + 1e-9):
            return None
        sorted_dims = tuple(sorted(orientations[0]))
        # With every orientation allowed, a part at least as large as one that failed fails too.
        free_rotation = {tuple(o) for o in orientations} == set(permutations(orientations[0]))
        if free_rotation and any(all(s >= f for s, f in zip(sorted_dims, failed, strict=True))
                                 for failed in self._failed):
            return None
        choice = choose_position(self._points, inflated, self._lower, self._upper, self._bound)
        if choice is None:
            if free_rotation:
                self._failed.append((sorted_dims[0], sorted_dims[1], sorted_dims[2]))
            return None
        point_index, orientation_index = choice
        corner = self._points[point_index].copy()
        extent = inflated[orientation_index]
        self._place(corner, extent)
        size = tuple(float(v) for v in orientations[orientation_index])
        placement = Placement(item_id, (float(corner[0]), float(corner[1]), float(corner[2])),
                              (size[0], size[1], size[2]))
        self.placements.append(placement)
        self._part_volume_mm3 += size[0] * size[1] * size[2]
        self._inflated_volume_mm3 += item_volume
        self._height = max(self._height, placement.top_mm)
        return placement

    def place_at(self, item_id: str, position_mm: Vec3, size_mm: Vec3) -> Placement:
        """Put a part back where a saved packing had it (restoring a build from a snapshot); refuses a
        position that leaves the chamber or collides with the parts already there."""
        corner = np.asarray(position_mm, dtype=np.float64)
        extent = np.asarray(size_mm, dtype=np.float64) + self.spacing_mm
        if not (np.all(np.isfinite(corner)) and np.all(corner >= -EPS) and np.all(extent > self.spacing_mm)
                and np.all(corner + extent <= self._chamber_bound + EPS)):
            raise ValueError(f"{item_id}: {position_mm} + {size_mm} does not fit the chamber {self.chamber_mm}")
        if len(self._lower) and bool(np.any(np.all(corner < self._upper - EPS, axis=1)
                                            & np.all(self._lower < corner + extent - EPS, axis=1))):
            raise ValueError(f"{item_id}: {position_mm} collides with a placed part")
        self._place(corner, extent)
        placement = Placement(item_id, (float(corner[0]), float(corner[1]), float(corner[2])),
                              (float(size_mm[0]), float(size_mm[1]), float(size_mm[2])))
        self.placements.append(placement)
        self._part_volume_mm3 += placement.size_mm[0] * placement.size_mm[1] * placement.size_mm[2]
        self._inflated_volume_mm3 += float(np.prod(extent))
        self._height = max(self._height, placement.top_mm)
        return placement

    def _bound_volume(self) -> float:
        return float(self._bound[0] * self._bound[1] * self._bound[2])

    def _place(self, corner: Array, extent: Array) -> None:
        far = corner + extent
        count = len(self._lower)
        if count == len(self._lower_buffer):  # amortised growth instead of a copy per part
            self._lower_buffer = np.vstack([self._lower_buffer, np.empty_like(self._lower_buffer)])
            self._upper_buffer = np.vstack([self._upper_buffer, np.empty_like(self._upper_buffer)])
        self._lower_buffer[count] = corner
        self._upper_buffer[count] = far
        self._lower = self._lower_buffer[: count + 1]
        self._upper = self._upper_buffer[: count + 1]
        # The corners the new box creates, each projected back along the two other axes until it meets
        # a box or a wall, so holes beside and under existing parts become candidate positions.
        corners = np.repeat(corner[None, :], 3, axis=0)
        corners[_AXES, _AXES] = far
        projected = self._project_all(np.repeat(corners, 2, axis=0), _PROJECT_AXES)
        new_points = [corners, projected]
        fresh = np.vstack(new_points)
        if not self.stacking:
            fresh = fresh[fresh[:, 2] <= EPS]
        # A point inside a placed box or outside the chamber can never take a part. Old points were
        # checked against the older boxes already, so they are checked against the new box only.
        old = self._points
        kept = old[~_inside(old, corner[None, :], far[None, :])]
        edge = self._chamber_bound - EPS
        fresh = fresh[~_inside(fresh, self._lower, self._upper)
                      & (fresh[:, 0] < edge[0]) & (fresh[:, 1] < edge[1]) & (fresh[:, 2] < edge[2])]
        if len(fresh) and len(kept):
            close = np.ones((len(fresh), len(kept)), dtype=bool)
            for k in range(3):
                close &= np.abs(fresh[:, k, None] - kept[None, :, k]) <= EPS
            known = close.any(axis=1)
            fresh = fresh[~known]
        if len(fresh):
            # duplicates among the new points themselves (keys on a 0.1 um grid, one numpy call)
            keys = np.round(fresh * 1e4).astype(np.int64).tolist()
            first = {tuple(key): i for i, key in reversed(list(enumerate(keys)))}
            fresh = fresh[sorted(first.values())]
            self._points = np.vstack([kept, fresh])
        else:
            self._points = kept

    def _project_all(self, points: Array, axes: NDArray[np.intp]) -> Array:
        """Each of ``points`` moved towards 0 along its axis in ``axes`` until it meets a placed box (whose
        extent in the other two axes covers it) or the chamber wall."""
        lower, upper = self._lower, self._upper
        q = points[:, None, :]
        within = (lower[None] <= q + EPS) & (q < upper[None] - EPS)  # (k, n, 3)
        below = upper[None] <= q + EPS
        along = _ONE_HOT[axes][:, None, :]  # (k, 1, 3)
        blocks = np.where(along, below, within).all(axis=2)  # (k, n)
        stops = np.where(blocks, upper[:, axes].T, 0.0).max(axis=1)
        out = points.copy()
        out[np.arange(len(points)), axes] = stops
        return out


def _inside(points: Array, lower: Array, upper: Array) -> NDArray[np.bool_]:
    """Which ``points`` lie inside any of the boxes ``[lower, upper)``."""
    if len(points) == 0 or len(lower) == 0:
        return np.zeros(len(points), dtype=bool)
    low, high = lower - EPS, upper - EPS
    within = np.ones((len(points), len(lower)), dtype=bool)
    for k in range(3):
        within &= (points[:, k, None] >= low[None, :, k]) & (points[:, k, None] < high[None, :, k])
    return np.asarray(within.any(axis=1))


def check_build(build: Build) -> list[str]:
    """Problems with a packing, checked from scratch in plain Python (empty list = valid): every part
    inside the chamber, on the plate if not stacking, and at least ``spacing_mm`` from every other part
    along some axis."""
    problems = []
    cx, cy, cz = build.chamber_mm
    s = build.spacing_mm
    for p in build.placements:
        (x, y, z), (dx, dy, dz) = p.position_mm, p.size_mm
        if min(x, y, z) < -EPS or x + dx > cx + EPS or y + dy > cy + EPS or z + dz > cz + EPS:
            problems.append(f"{p.item_id} leaves the chamber")
        if not build.stacking and z > EPS:
            problems.append(f"{p.item_id} does not stand on the plate")
    items = build.placements
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            a, b = items[i], items[j]
            separated = False
            for k in range(3):
                a_lo, a_hi = a.position_mm[k], a.position_mm[k] + a.size_mm[k]
                b_lo, b_hi = b.position_mm[k], b.position_mm[k] + b.size_mm[k]
                if a_hi + s <= b_lo + EPS or b_hi + s <= a_lo + EPS:
                    separated = True
                    break
            if not separated:
                problems.append(f"{a.item_id} and {b.item_id} are closer than {s} mm")
    return problems


def pack_first_fit(
    items: Sequence[tuple[str, Sequence[Vec3]]],
    chamber_mm: Vec3,
    spacing_mm: float = 0.0,
    *,
    stacking: bool = True,
    sort: bool = True,
    max_builds: int | None = None,
) -> tuple[list[Build], list[str]]:
    """Pack ``(item_id, orientations)`` into as many builds as needed (first fit, largest first when
    ``sort``); returns the builds and the ids of items that fit no empty chamber (or exceed ``max_builds``)."""
    order = list(items)
    if sort:
        order.sort(key=lambda item: -float(np.prod(item[1][0])))
    builds: list[Build] = []
    left: list[str] = []
    for item_id, orientations in order:
        for build in builds:
            if build.add(item_id, orientations) is not None:
                break
        else:
            if max_builds is not None and len(builds) >= max_builds:
                left.append(item_id)
                continue
            build = Build(chamber_mm, spacing_mm, stacking=stacking, build_id=f"b{len(builds) + 1}")
            if build.add(item_id, orientations) is None:
                left.append(item_id)
                continue
            builds.append(build)
    return builds, left
