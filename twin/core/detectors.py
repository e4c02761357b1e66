"""The streaming detectors, one stream at a time, behind one contract (the river habit).

Every detector:

* ``score_one(x)`` returns a score in [0, 1], higher = more anomalous, without learning;
* ``learn_one(x)`` updates the baseline (O(1) time and memory, one pass, no look-ahead);
* scores 0 during its warm-up: the first ``warmup_samples`` samples (default 60).

Detectors: ``zscore`` (distance of a sample from the exponentially weighted baseline), ``cusum``
(two-sided CUSUM of standardised deviations, for shifts), ``ewma`` (EWMA control chart, for small
persistent shifts) and ``ensemble`` (the larger of zscore and ewma; the twin's default). They are
the very kernels the fleet runs (:func:`twin.core.kernels.channel_step`), on a single channel.

``pca`` (Hotelling's T² + Q on a PCA fitted per device in its warm-up of ``mv_warmup_samples``
rows, see :func:`twin.core.kernels.pca_tick`) and ``mewma`` (a MEWMA chart of per-channel AR(1)
residuals, see :func:`twin.core.kernels.mewma_tick`) are multivariate: :class:`MultivariateDetector`
takes one row of all channels at a time; ``StreamingDetector("pca")`` is its one-channel case.

Example:
    >>> detector = StreamingDetector("zscore")
    >>> for x in [10.0, 10.2, 9.9, 10.1] * 20:
    ...     detector.learn_one(x)
    >>> detector.score_one(10.05) < 0.1, detector.score_one(25.0) > 0.9
    (True, True)
"""

from __future__ import annotations

import numpy as np

from twin.core.config import DETECTORS, MULTIVARIATE_DETECTORS, CoreConfig
from twin.core.fleet import _params, channel_score
from twin.core.kernels import channel_step, mewma_tick, pca_tick
from twin.core.layout import CH_CUSUM_REGIME, CH_FIELDS, CH_Q, MA_FIELDS, MV_FIELDS, P_Z_SCALE2, ROLE_ANALOG


class MultivariateDetector:
    """The ``pca`` (or ``mewma``) detector over rows of ``n_channels`` values, with the
    ``learn_one``/``score_one`` contract (score 0 during the warm-up of ``config.mv_warmup_samples``
    rows). ``name`` (default: ``config.detector`` when it is multivariate, else ``pca``).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> detector = MultivariateDetector(2, CoreConfig(mv_warmup_samples=50, mv_smoothing=1.0))
        >>> for _ in range(50):
        ...     a = rng.normal()
        ...     detector.learn_one([a, a + 0.1 * rng.normal()])
        >>> detector.score_one([1.0, 1.0]) < 0.5, detector.score_one([1.0, -1.0]) > 0.9
        (True, True)
    """

    def __init__(self, n_channels: int, config: CoreConfig | None = None, name: str | None = None):
        if n_channels < 1:
            raise ValueError("at least one channel")
        base = config or CoreConfig()
        chosen = name or (base.detector if base.multivariate else "pca")
        if chosen not in MULTIVARIATE_DETECTORS:
            choices = ", ".join(MULTIVARIATE_DETECTORS)
            raise ValueError(f"{chosen!r} is not a multivariate detector; choose from {choices}")
        self.config = CoreConfig(**{**base.__dict__, "detector": chosen})
        self._params = _params(self.config)
        self._role = np.full(n_channels, ROLE_ANALOG, dtype=np.int8)
        self._state = (
            np.zeros(n_channels),  # held row
            np.zeros(n_channels),  # means
            np.zeros(n_channels),  # scales
            np.zeros((n_channels, n_channels)),  # co-moments, then principal axes
            np.zeros(n_channels),  # eigenvalues
            np.zeros(MV_FIELDS),
        )
        mewma = chosen == "mewma"
        self._extra = (
            np.zeros((n_channels, MA_FIELDS)) if mewma else None,  # shift, previous row, φ, EWMA
            np.zeros((n_channels, n_channels)) if mewma else None,  # lag-1 co-moments
        )

    def _row(self, x: object) -> np.ndarray:
        row = np.asarray(x, dtype=np.float64).reshape(-1)
        if row.shape != self._role.shape:
            raise ValueError(f"expected {self._role.shape[0]} values, got {row.shape[0]}")
        if not np.isfinite(row).all():
            raise ValueError("values must be finite")
        return row

    def score_one(self, x: object) -> float:
        """The score the row ``x`` would get now; the detector's state is left untouched."""
        row = self._row(x)
        state = [a.copy() for a in self._state]
        state[0][:] = row
        return self._tick(state, [None if a is None else a.copy() for a in self._extra])

    def learn_one(self, x: object) -> None:
        self._state[0][:] = self._row(x)
        self._tick(list(self._state), list(self._extra))

    def _tick(self, state: list[np.ndarray], extra: list[np.ndarray | None]) -> float:
        aux, lag = extra
        if aux is not None and lag is not None:
            return float(mewma_tick(self._role, *state, aux, lag, self._params))
        return float(pca_tick(self._role, *state, self._params))


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
        self._multivariate = MultivariateDetector(1, self.config, name) if self.config.multivariate else None

    def score_one(self, x: float) -> float:
        """The score ``x`` would get now; the detector's state is left untouched."""
        if self._multivariate is not None:
            return self._multivariate.score_one([x])
        trial = self._row.copy()
        channel_step(trial, self.regime, float(x), self._params, True)
        return channel_score(float(trial[CH_Q]), float(self._params[P_Z_SCALE2]))

    def learn_one(self, x: float) -> None:
        if self._multivariate is not None:
            self._multivariate.learn_one([x])
            return
        channel_step(self._row, self.regime, float(x), self._params, True)
