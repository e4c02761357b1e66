"""One contract test suite, parametrised over every detector (the river habit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.core import CoreConfig
from twin.core.config import DETECTORS
from twin.core.detectors import StreamingDetector


@pytest.mark.parametrize("name", DETECTORS)
def test_warm_up_scores_zero(name: str) -> None:
    detector = StreamingDetector(name, CoreConfig(warmup_samples=10))
    for x in range(10):
        assert detector.score_one(1e9 if x % 2 else -1e9) == 0.0
        detector.learn_one(float(x))


@pytest.mark.parametrize("name", DETECTORS)
def test_score_one_does_not_learn(name: str) -> None:
    detector = StreamingDetector(name)
    rng = np.random.default_rng(0)
    for x in rng.normal(0, 1, 200):
        detector.learn_one(x)
    first = detector.score_one(3.0)
    assert detector.score_one(3.0) == first


@pytest.mark.parametrize("name", DETECTORS)
def test_shift_scores_higher_than_noise(name: str) -> None:
    detector = StreamingDetector(name)
    rng = np.random.default_rng(1)
    for x in rng.normal(50, 1, 400):
        detector.learn_one(x)
    normal = detector.score_one(50.5)
    for x in rng.normal(58, 1, 30):  # a persistent 8 σ shift
        detector.learn_one(x)
    assert detector.score_one(58.0) > 0.8 > normal


@pytest.mark.parametrize("name", DETECTORS)
@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6) | st.sampled_from([0.0, 1.0]), max_size=150))
def test_scores_stay_in_unit_interval(name: str, values: list[float]) -> None:
    detector = StreamingDetector(name, CoreConfig(warmup_samples=3))
    for x in values:
        score = detector.score_one(x)
        assert 0.0 <= score <= 1.0 and not math.isnan(score)
        detector.learn_one(x)


def test_unknown_detector_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        StreamingDetector("oracle")
