"""STL geometry: volume against analytic solids (within 0.1 %), the numpy measure against the plain-Python
reference, binary and ASCII files, broken meshes refused with a clear reason."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.quotes.stl import (
    MeshError,
    cube_triangles,
    cylinder_triangles,
    mesh_info,
    mesh_info_from_triangles,
    prism_volume,
    volume_reference,
    write_stl,
)


@pytest.mark.parametrize("ascii", [False, True])
def test_cube_file_matches_analytic_volume(tmp_path: Path, ascii: bool) -> None:
    path = tmp_path / "cube.stl"
    write_stl(cube_triangles(20.0), path, ascii=ascii)
    info = mesh_info(path)
    assert info.volume_cm3 == pytest.approx(8.0, rel=1e-3)
    assert info.bbox_mm == pytest.approx((20, 20, 20))
    assert info.area_cm2 == pytest.approx(24.0, rel=1e-6)
    assert info.triangles == 12 and not info.inverted


@pytest.mark.parametrize("ascii", [False, True])
def test_cylinder_file_matches_analytic_volume_within_a_tenth_of_a_percent(tmp_path: Path, ascii: bool) -> None:
    path = tmp_path / "cylinder.stl"
    write_stl(cylinder_triangles(15.0, 40.0, segments=512), path, ascii=ascii)
    info = mesh_info(path)
    analytic = math.pi * 15.0**2 * 40.0 / 1000.0
    assert abs(info.volume_cm3 - analytic) / analytic < 1e-3
    assert info.volume_cm3 == pytest.approx(prism_volume(15.0, 40.0, 512) / 1000.0, rel=1e-5)  # float32 file
    assert info.bbox_mm == pytest.approx((30, 30, 40), rel=1e-4)


def test_units() -> None:
    info = mesh_info_from_triangles(cube_triangles(1.0), unit="inch")
    assert info.volume_cm3 == pytest.approx(2.54**3) and info.bbox_mm == pytest.approx((25.4,) * 3)
    with pytest.raises(MeshError, match="unit"):
        mesh_info_from_triangles(cube_triangles(1.0), unit="furlong")


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 200), st.floats(0.5, 200), st.integers(3, 64),
       st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(-500, 500)))
def test_numpy_volume_matches_reference_and_is_translation_invariant(
    radius: float, height: float, segments: int, shift: tuple[float, float, float]
) -> None:
    tri = cylinder_triangles(radius, height, segments) + np.array(shift)
    info = mesh_info_from_triangles(tri)
    reference = volume_reference(tri.tolist()) / 1000.0
    assert info.volume_cm3 == pytest.approx(reference, rel=1e-9)
    assert info.volume_cm3 == pytest.approx(prism_volume(radius, height, segments) / 1000.0, rel=1e-6)


def test_inside_out_mesh_is_measured_and_flagged() -> None:
    info = mesh_info_from_triangles(cube_triangles(10.0)[:, ::-1, :])
    assert info.inverted and info.volume_cm3 == pytest.approx(1.0)


def test_open_mesh_is_refused() -> None:
    with pytest.raises(MeshError, match="not closed"):
        mesh_info_from_triangles(cube_triangles(10.0)[:-1])


def test_inconsistently_wound_mesh_is_refused() -> None:
    tri = cube_triangles(10.0).copy()
    tri[0] = tri[0][::-1]
    with pytest.raises(MeshError, match="not closed"):
        mesh_info_from_triangles(tri)


def test_flat_mesh_has_no_volume() -> None:
    sheet = np.array([[[0, 0, 0], [10, 0, 0], [0, 10, 0]], [[0, 0, 0], [0, 10, 0], [10, 0, 0]]], float)
    with pytest.raises(MeshError, match="no volume"):
        mesh_info_from_triangles(sheet)


def test_nan_and_garbage_are_refused(tmp_path: Path) -> None:
    tri = cube_triangles(10.0).copy()
    tri[3, 1, 2] = np.nan
    with pytest.raises(MeshError, match="NaN"):
        mesh_info_from_triangles(tri)
    with pytest.raises(MeshError, match="empty"):
        mesh_info(b"   ")
    with pytest.raises(MeshError):
        mesh_info(b"solid x\n facet normal 0 0 1\n outer loop\n vertex 1 2\n")
    with pytest.raises(MeshError, match="no such file"):
        mesh_info(tmp_path / "missing.stl")


def test_bytes_source(tmp_path: Path) -> None:
    path = tmp_path / "c.stl"
    write_stl(cube_triangles(10.0), path)
    assert mesh_info(path.read_bytes(), name="c.stl").volume_cm3 == pytest.approx(1.0)
