"""Part geometry from STL meshes (binary and ASCII): volume, bounding box, mass; broken meshes refused.

Parsing is numpy-stl's (``stl.mesh.Mesh``); the checks and measures are ours, on numpy arrays:

* closed and consistently oriented: after welding vertices, every directed edge ``a -> b`` appears
  exactly once and its reverse ``b -> a`` exactly once (a watertight, manifold, oriented surface);
* volume: the divergence theorem, the sum of signed tetrahedra ``v0 . (v1 x v2) / 6`` (exact for a
  closed polyhedron); a surface wound inside-out gives a negative sum and is accepted with its
  absolute value;
* zero volume (a flat or degenerate mesh) is an error.

STL carries no unit; ``unit`` says what one file unit is (mm by default).

Example::

    >>> info = mesh_info_from_triangles(cube_triangles(10.0))
    >>> round(info.volume_cm3, 6), info.bbox_mm
    (1.0, (10.0, 10.0, 10.0))
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

UNITS_MM = {"mm": 1.0, "cm": 10.0, "inch": 25.4}
MAX_TRIANGLES = 5_000_000
_WELD_MM = 1e-6  # vertices closer than this (after scaling) are the same vertex


class MeshError(ValueError):
    """A mesh that cannot be quoted: unreadable, not closed, zero volume; the message says which."""


@dataclass(frozen=True)
class MeshInfo:
    triangles: int
    volume_cm3: float
    bbox_mm: tuple[float, float, float]
    area_cm2: float
    inverted: bool  # the surface was wound inside-out (volume taken as its absolute value)

    def mass_g(self, density_g_cm3: float) -> float:
        return self.volume_cm3 * density_g_cm3


def load_triangles(source: str | Path | bytes, name: str = "part.stl") -> NDArray[np.float64]:
    """Triangles (n x 3 x 3, file units) from an STL file path or its bytes (binary or ASCII)."""
    from stl import mesh as stl_mesh

    try:
        if isinstance(source, bytes):
            if not source.strip():
                raise MeshError(f"{name}: empty file")
            loaded = stl_mesh.Mesh.from_file(name, fh=io.BytesIO(source), calculate_normals=False)
        else:
            if not Path(source).is_file():
                raise MeshError(f"{source}: no such file")
            loaded = stl_mesh.Mesh.from_file(str(source), calculate_normals=False)
    except MeshError:
        raise
    except Exception as exc:  # numpy-stl raises assorted errors for malformed files
        raise MeshError(f"{name if isinstance(source, bytes) else source}: not a readable STL file ({exc})") from None
    vectors = np.asarray(loaded.vectors, dtype=np.float64)
    if vectors.ndim != 3 or vectors.shape[1:] != (3, 3) or len(vectors) == 0:
        raise MeshError(f"{name}: no triangles")
    if len(vectors) > MAX_TRIANGLES:
        raise MeshError(f"{name}: {len(vectors)} triangles exceed the limit of {MAX_TRIANGLES}")
    return vectors


def mesh_info_from_triangles(triangles: NDArray[np.float64], unit: str = "mm", name: str = "mesh") -> MeshInfo:
    """Measure a triangle soup (n x 3 x 3); :class:`MeshError` if it is not a closed, non-empty solid."""
    if unit not in UNITS_MM:
        raise MeshError(f"{name}: unit must be one of {sorted(UNITS_MM)}, not {unit!r}")
    tri = np.asarray(triangles, dtype=np.float64) * UNITS_MM[unit]
    if tri.ndim != 3 or tri.shape[1:] != (3, 3) or len(tri) == 0:
        raise MeshError(f"{name}: expected triangles (n x 3 x 3)")
    if not np.all(np.isfinite(tri)):
        raise MeshError(f"{name}: vertices with NaN or infinite coordinates")
    boundary, non_manifold = _open_edges(tri)
    if boundary or non_manifold:
        raise MeshError(f"{name}: the mesh is not closed ({boundary} boundary or flipped edges, "
                        f"{non_manifold} edges shared by more than two faces); repair it before quoting")
    signed = float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum()) / 6.0
    lower, upper = tri.reshape(-1, 3).min(axis=0), tri.reshape(-1, 3).max(axis=0)
    extent = upper - lower
    bbox_volume = float(np.prod(extent))
    if not abs(signed) > 1e-9 * max(bbox_volume, 1e-30) or not np.all(extent > 0):
        raise MeshError(f"{name}: the mesh encloses no volume (flat or degenerate)")
    area = float(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()) / 2.0
    return MeshInfo(len(tri), abs(signed) / 1000.0, (float(extent[0]), float(extent[1]), float(extent[2])),
                    area / 100.0, signed < 0)


def mesh_info(source: str | Path | bytes, unit: str = "mm", name: str = "part.stl") -> MeshInfo:
    label = name if isinstance(source, bytes) else str(source)
    return mesh_info_from_triangles(load_triangles(source, name=label), unit=unit, name=label)


def _open_edges(tri: NDArray[np.float64]) -> tuple[int, int]:
    """(directed edges without exactly one reverse partner, directed edges used more than once)."""
    points = np.round(tri.reshape(-1, 3) / _WELD_MM).astype(np.int64)
    _, vertex = np.unique(points, axis=0, return_inverse=True)
    vertex = vertex.reshape(-1, 3).astype(np.int64)
    count = int(vertex.max()) + 1
    heads = vertex.reshape(-1)
    tails = vertex[:, [1, 2, 0]].reshape(-1)
    degenerate = heads == tails
    heads, tails = heads[~degenerate], tails[~degenerate]
    forward = heads * count + tails
    backward = tails * count + heads
    unique_edges, uses = np.unique(forward, return_counts=True)
    non_manifold = int((uses > 1).sum())
    unmatched = int((~np.isin(backward, unique_edges)).sum())
    return unmatched, non_manifold


def volume_reference(triangles: list[list[list[float]]]) -> float:
    """Plain-Python signed-tetrahedra volume (file units cubed), for tests against the numpy version."""
    total = 0.0
    for (ax, ay, az), (bx, by, bz), (cx, cy, cz) in triangles:
        total += ax * (by * cz - bz * cy) - ay * (bx * cz - bz * cx) + az * (bx * cy - by * cx)
    return total / 6.0


# --- analytic solids (tests, docs, the demo) ------------------------------------------------------


def cube_triangles(size: float) -> NDArray[np.float64]:
    """A closed, outward-oriented cube of edge ``size`` with a corner at the origin (12 triangles)."""
    s = size
    v = np.array([[0, 0, 0], [s, 0, 0], [s, s, 0], [0, s, 0], [0, 0, s], [s, 0, s], [s, s, s], [0, s, s]], float)
    faces = [(0, 2, 1), (0, 3, 2), (4, 5, 6), (4, 6, 7), (0, 1, 5), (0, 5, 4),
             (2, 3, 7), (2, 7, 6), (1, 2, 6), (1, 6, 5), (0, 4, 7), (0, 7, 3)]
    return v[np.array(faces)]


def cylinder_triangles(radius: float, height: float, segments: int = 512) -> NDArray[np.float64]:
    """A closed, outward-oriented cylinder (a regular ``segments``-gon prism) on the xy plane."""
    angles = np.linspace(0.0, 2 * math.pi, segments, endpoint=False)
    ring = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    tris: list[list[list[float]]] = []
    for i in range(segments):
        (x0, y0), (x1, y1) = ring[i], ring[(i + 1) % segments]
        tris.append([[0, 0, 0], [x1, y1, 0], [x0, y0, 0]])  # bottom, facing down
        tris.append([[0, 0, height], [x0, y0, height], [x1, y1, height]])  # top, facing up
        tris.append([[x0, y0, 0], [x1, y1, 0], [x1, y1, height]])  # side
        tris.append([[x0, y0, 0], [x1, y1, height], [x0, y0, height]])
    return np.array(tris, dtype=np.float64)


def prism_volume(radius: float, height: float, segments: int) -> float:
    """Exact volume of :func:`cylinder_triangles` (the inscribed polygon's area times the height)."""
    return segments / 2 * radius**2 * math.sin(2 * math.pi / segments) * height


def write_stl(triangles: NDArray[np.float64], path: str | Path, *, ascii: bool = False) -> None:
    from stl import Mode
    from stl import mesh as stl_mesh

    data = np.zeros(len(triangles), dtype=stl_mesh.Mesh.dtype)
    data["vectors"] = triangles
    solid = stl_mesh.Mesh(data)
    solid.update_normals()
    solid.save(str(path), mode=Mode.ASCII if ascii else Mode.BINARY)
