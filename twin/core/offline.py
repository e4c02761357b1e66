"""Offline scoring: a table of rows (one per time step, one column per channel) through the very
detectors and defaults the twin uses, one device score per row.

Rows get strictly increasing synthetic timestamps inside the core (the detectors look at order,
not at clock values), so duplicate or missing timestamps in a file cannot merge or drop rows.

Example:
    >>> import numpy as np
    >>> scorer = StreamScorer(["pressure", "flow_rate"])
    >>> rows = np.random.default_rng(0).normal(size=(200, 2))
    >>> rows[150] += 12.0
    >>> scores = scorer.score(rows)
    >>> bool(scores[:60].max() == 0.0), bool(scores[150] > 0.8), bool(scores[140] < 0.5)
    (True, True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twin.core.config import CoreConfig
from twin.core.fleet import FleetCore

_T_BASE_US = 1_600_000_000_000_000
_STEP_US = 1_000_000


class StreamScorer:
    """Scores successive chunks of rows of one stream; the state carries over between chunks."""

    def __init__(self, channels: Sequence[str], config: CoreConfig | None = None, *, technology: str = "line"):
        if not channels:
            raise ValueError("at least one channel to score")
        self.core = FleetCore(max_devices=1, channels_per_device=max(len(channels), 1), config=config)
        self.device = self.core.add_device("offline/file/table/stream", technology=technology, channels=channels)
        self.slots = np.array([self.core.channel_index(self.device, c) for c in channels], dtype=np.int32)
        self.rows_done = 0

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Device score in [0, 1] of each row (0 while warming up; a row with no finite value
        repeats the previous score)."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.slots.shape[0]:
            raise ValueError(f"rows must be 2-d with {self.slots.shape[0]} columns, got shape {rows.shape}")
        n_rows, n_cols = rows.shape
        t_row = _T_BASE_US + (self.rows_done + np.arange(n_rows, dtype=np.int64)) * _STEP_US
        device = np.full(n_rows * n_cols, self.device, dtype=np.int32)
        channel = np.tile(self.slots, n_rows)
        t_us = np.repeat(t_row, n_cols)
        tick = np.full(n_rows * n_cols, np.nan)
        self.core.ingest(device, channel, t_us, rows.reshape(-1), tick_scores=tick)
        per_row = tick.reshape(n_rows, n_cols)
        # a row's score sits at the slot of its last scored sample; rows without one (warm-up,
        # all values missing) carry the score before them
        filled = np.full(n_rows, np.nan)
        have = ~np.isnan(per_row)
        any_row = have.any(axis=1)
        last_col = n_cols - 1 - np.argmax(have[:, ::-1], axis=1)
        filled[any_row] = per_row[any_row, last_col[any_row]]
        previous = self._last
        for i in range(n_rows):
            if np.isnan(filled[i]):
                filled[i] = previous
            previous = filled[i]
        self._last = previous
        self.rows_done += n_rows
        return filled

    _last: float = 0.0


def score_table(rows: np.ndarray, channels: Sequence[str], config: CoreConfig | None = None) -> np.ndarray:
    """Score a whole table at once; see :class:`StreamScorer`."""
    return StreamScorer(channels, config).score(rows)
