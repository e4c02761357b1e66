"""Build packing: the numpy kernel against the plain-Python reference, validity from scratch, edge cases."""

from __future__ import annotations

import math
import random
from itertools import permutations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.routing.packing import (
    Build,
    check_build,
    choose_position,
    choose_position_reference,
    pack_first_fit,
)

dims = st.tuples(*[st.floats(1, 120, allow_nan=False)] * 3)


def _orientations(d: tuple[float, float, float], free: bool) -> list[tuple[float, float, float]]:
    return list(dict.fromkeys((a, b, c) for a, b, c in permutations(d))) if free else [d]


@settings(max_examples=40, deadline=None)
@given(st.lists(dims, min_size=1, max_size=40), st.floats(0, 6), st.booleans(), st.booleans(),
       st.sampled_from([(200.0, 200.0, 200.0), (150.0, 90.0, 300.0), (60.0, 60.0, 60.0)]))
def test_kernel_matches_reference_step_by_step(parts: list[tuple[float, float, float]], spacing: float,
                                               free: bool, stacking: bool,
                                               chamber: tuple[float, float, float]) -> None:
    build = Build(chamber, spacing, stacking=stacking)
    for i, d in enumerate(parts):
        orientations = _orientations(d, free)
        inflated = np.asarray(orientations) + spacing
        expected = choose_position_reference([tuple(p) for p in build._points], [tuple(o) for o in inflated],
                                             [tuple(b) for b in build._lower], [tuple(b) for b in build._upper],
                                             tuple(build._bound))
        got = choose_position(build._points, inflated, build._lower, build._upper, build._bound)
        assert got == expected
        placed = build.add(f"p{i}", orientations)
        # add() may refuse early (volume bound, a larger part already failed) only when nothing fits
        if placed is None:
            assert expected is None or build._inflated_volume_mm3 + np.prod(inflated[0]) > np.prod(build._bound)
        else:
            assert expected is not None
    assert check_build(build) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(dims, min_size=1, max_size=60), st.floats(0, 8), st.booleans())
def test_packings_are_valid_and_fill_is_the_sum_of_boxes(parts: list[tuple[float, float, float]], spacing: float,
                                                         stacking: bool) -> None:
    items = [(f"p{i}", _orientations(d, True)) for i, d in enumerate(parts)]
    builds, left = pack_first_fit(items, (250, 250, 250), spacing, stacking=stacking)
    placed = [p.item_id for b in builds for p in b.placements]
    assert sorted(placed + left) == sorted(i for i, _ in items)  # nothing lost, nothing twice
    for build in builds:
        assert check_build(build) == []
        boxes = sum(p.size_mm[0] * p.size_mm[1] * p.size_mm[2] for p in build.placements)
        assert build.fill == pytest.approx(boxes / 250**3)
        assert build.height_mm == pytest.approx(max(p.position_mm[2] + p.size_mm[2] for p in build.placements))
        for p in build.placements:  # each placement is one of the part's orientations
            assert tuple(sorted(p.size_mm)) == pytest.approx(tuple(sorted(parts[int(p.item_id[1:])])))


def test_spacing_is_kept_between_parts_and_not_to_walls() -> None:
    build = Build((100, 100, 100), spacing_mm=5)
    a = build.add("a", [(50, 100, 100)])
    b = build.add("b", [(45, 100, 100)])
    assert a is not None and b is not None
    assert b.position_mm == (55.0, 0.0, 0.0)  # 5 mm gap, touching the far wall exactly
    assert build.add("c", [(1, 1, 1)]) is None  # nothing left
    assert build.fill == pytest.approx(0.95)


def test_exact_fit_and_too_large() -> None:
    build = Build((100, 50, 20))
    assert build.add("exact", [(20, 100, 50), (100, 50, 20)]) is not None
    assert Build((100, 50, 20)).add("big", [(101, 50, 20)]) is None


def test_rotation_makes_it_fit_only_when_allowed() -> None:
    assert Build((300, 50, 50)).add("rod", [(50, 50, 300)]) is None
    placed = Build((300, 50, 50)).add("rod", _orientations((50, 50, 300), True))
    assert placed is not None and placed.size_mm == (300, 50, 50)


def test_plate_processes_keep_parts_on_the_plate() -> None:
    build = Build((100, 100, 100), stacking=False)
    for i in range(4):
        assert build.add(f"p{i}", [(50, 50, 30)]) is not None
    assert build.add("p4", [(50, 50, 30)]) is None  # would need stacking
    assert build.plate_fill == pytest.approx(1.0)
    assert all(p.position_mm[2] == 0 for p in build.placements)


def test_lowest_build_first() -> None:
    # Flat parts go side by side before anything stacks: build height drives powder-bed build time.
    build = Build((100, 100, 100))
    for i in range(4):
        build.add(f"p{i}", _orientations((50, 50, 10), True))
    assert build.height_mm == pytest.approx(10)


@pytest.mark.parametrize("bad", [(0, 10, 10), (-1, 10, 10), (math.nan, 10, 10), (math.inf, 1, 1)])
def test_bad_part_sizes_are_refused(bad: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="extents"):
        Build((100, 100, 100)).add("bad", [bad])


@pytest.mark.parametrize("chamber", [(0, 10, 10), (math.nan, 10, 10), (10, 10, math.inf)])
def test_bad_chambers_are_refused(chamber: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="chamber"):
        Build(chamber)


def test_empty_inputs() -> None:
    assert pack_first_fit([], (100, 100, 100)) == ([], [])
    build = Build((100, 100, 100))
    assert build.fill == 0 and build.height_mm == 0 and build.height_fill == 0 and len(build) == 0
    assert choose_position(np.empty((0, 3)), np.ones((1, 3)), np.empty((0, 3)), np.empty((0, 3)),
                           np.ones(3) * 10) is None


def test_dense_instance_fills_well() -> None:
    # Many small parts in a chamber: bounding-box fill well above what a loose packing reaches.
    rng = random.Random(3)
    items = [(f"p{i}", _orientations((rng.uniform(10, 40), rng.uniform(10, 40), rng.uniform(5, 20)), True))
             for i in range(300)]
    builds, _ = pack_first_fit(items, (160, 160, 80), 2.0)
    assert check_build(builds[0]) == []
    assert builds[0].fill > 0.6


def test_height_limit_keeps_builds_short_and_can_be_lifted() -> None:
    build = Build((100, 100, 100))
    build.limit_height(30)
    assert build.add("tall", [(20, 20, 40)]) is None
    assert build.add("low", [(20, 20, 30)]) is not None
    assert build.add("tall2", _orientations((20, 20, 40), False)) is None
    build.limit_height(None)
    assert build.add("tall", [(20, 20, 40)]) is not None  # a part that failed under the limit fits now
    build.limit_height(5)  # never below what is placed
    assert build.height_limit_mm == pytest.approx(40)
    assert check_build(build) == []
