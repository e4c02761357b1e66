"""The streaming detectors, one stream at a time, behind one contract (the river habit).

Every detector:

* ``score_one(x)`` returns a score in [0, 1], higher = more anomalous, without learning;
* ``learn_one(x)`` updates the baseline (O(1) time and memory, one pass, no look-ahead);
* scores 0 during its warm-up: the first ``warmup_samples`` samples (default 60).

Detectors: ``zscore`` (distance of a sample from the exponentially weighted baseline), ``cusum``
(two-sided CUSUM of standardised deviations, for shifts), ``ewma`` (EWMA control chart, for small
persistent shifts) and ``ensemble`` (the larger of zscore and ewma; the twin's default). They are
the very kernels the fleet runs (:func:`twin.core.kernels.channel_step`), on a single channel.

Example:
    >>> detector = StreamingDetector("zscore")
    >>> for x in [10.0, 10.2, 9.9, 10.1] * 20:
    ...     detector.learn_one(x)
    >>> detector.score_one(10.05) < 0.1, detector.score_one(25.0) > 0.9
    (True, True)
"""

from __future__ import annotations

import numpy as np

from twin.core.config import DETECTORS, CoreConfig
from twin.core.fleet import _params
from twin.core.kernels import channel_step
from twin.core.layout import CH_CUSUM_REGIME, CH_FIELDS, CH_SCORE


class StreamingDetector:
    """One channel's detector with the ``learn_one``/``score_one`` contract."""

    def __init__(self, name: str = "ensemble", config: CoreConfig | None = None, *, regime: int = 0):
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
        base = config or CoreConfig()
        self.config = CoreConfig(**{**base.__dict__, "detector": name})
        self._params = _params(self.config)
        self._row = np.zeros(CH_FIELDS, dtype=np.float64)
        self._row[CH_CUSUM_REGIME] = -1.0
        self.regime = regime

    def score_one(self, x: float) -> float:
        """The score ``x`` would get now; the detector's state is left untouched."""
        trial = self._row.copy()
        channel_step(trial, self.regime, float(x), self._params)
        return float(trial[CH_SCORE])

    def learn_one(self, x: float) -> None:
        channel_step(self._row, self.regime, float(x), self._params)
