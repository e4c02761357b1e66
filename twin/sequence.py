"""De-duplication and gap detection per device by (epoch, seq).

An edge agent numbers its batches per device: ``seq`` grows by one per batch within an ``epoch``
(a new epoch restarts the numbering, for example after the agent lost its spool). QoS 1 delivers
at least once and agents replay their spool after an outage, so the twin sees duplicates, gaps
and late arrivals; this module decides, per batch, whether it is new.

Per epoch the tracker keeps a watermark (every seq up to it has been seen) and the set of seqs
seen above it. A seq at or below the watermark or in the set is a duplicate. A seq beyond the
highest seen opens a gap of the seqs skipped; a later arrival inside a gap fills it (late data,
accepted). The set is bounded (``max_pending``): past it, the oldest gap is given up as lost and
the watermark moves past it, so memory stays bounded however long a gap stays open.

Examples:
    >>> tracker = DeviceSequences()
    >>> [tracker.admit(0, s).name for s in (5, 6, 6, 9, 7)]
    ['NEW', 'NEW', 'DUPLICATE', 'NEW', 'NEW']
    >>> tracker.gaps, tracker.missing, tracker.filled
    (1, 1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Verdict(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    STALE_EPOCH = "stale_epoch"


@dataclass
class EpochWindow:
    """What has been seen of one epoch: every seq from ``floor`` up to ``watermark``, the seqs in
    ``above`` (beyond the watermark) and in ``below`` (older than the first one seen)."""

    watermark: int
    highest: int
    above: set[int] = field(default_factory=set)
    floor: int = 0
    below: set[int] = field(default_factory=set)


@dataclass
class DeviceSequences:
    """The (epoch, seq) bookkeeping of one device. Counters are cumulative."""

    max_pending: int = 4096
    max_epochs: int = 4
    epochs: dict[int, EpochWindow] = field(default_factory=dict)
    current_epoch: int | None = None
    duplicates: int = 0
    gaps: int = 0  # gap events: a batch arrived with seqs skipped before it
    missing: int = 0  # batches currently missing inside open gaps
    filled: int = 0  # batches that arrived late inside a gap
    lost: int = 0  # batches given up (gap older than max_pending, or left behind by a new epoch)
    forgotten: int = 0  # replayed batches older than the first seen, dropped from memory (bounded)

    def admit(self, epoch: int, seq: int) -> Verdict:
        """Record batch (epoch, seq) and say whether it is new."""
        window = self.epochs.get(epoch)
        if window is None:
            if self.epochs and epoch < min(self.epochs) and len(self.epochs) >= self.max_epochs:
                return Verdict.STALE_EPOCH
            # The first batch seen of an epoch starts it: nothing before it counts as missing,
            # because the twin may simply have started after the agent. Older batches (the agent
            # replaying its spool) are still new to the twin: ``below`` remembers them.
            window = EpochWindow(watermark=seq - 1, highest=seq - 1, floor=seq)
            self.epochs[epoch] = window
            if self.current_epoch is None or epoch > self.current_epoch:
                self.current_epoch = epoch
            while len(self.epochs) > self.max_epochs:
                # an epoch no longer tracked: its open gaps can no longer be filled
                dropped = self.epochs.pop(min(self.epochs))
                still_missing = dropped.highest - dropped.watermark - len(dropped.above)
                self.lost += still_missing
                self.missing -= still_missing
        if seq == window.watermark + 1 and not window.above:  # the common case: in order
            window.watermark = window.highest = seq
            return Verdict.NEW
        if seq < window.floor:
            if seq in window.below:
                self.duplicates += 1
                return Verdict.DUPLICATE
            window.below.add(seq)
            if len(window.below) > self.max_pending:
                # bounded memory: the oldest is forgotten (a second replay of it would count again)
                window.below.discard(min(window.below))
                self.forgotten += 1
            return Verdict.NEW
        if seq <= window.watermark or seq in window.above:
            self.duplicates += 1
            return Verdict.DUPLICATE
        if seq > window.highest:
            skipped = seq - window.highest - 1
            if skipped:
                self.gaps += 1
                self.missing += skipped
            window.highest = seq
        else:
            self.filled += 1
            self.missing -= 1
        window.above.add(seq)
        self._advance(window)
        while len(window.above) > self.max_pending:
            # give up the oldest gap: every seq below the lowest pending one is declared lost
            lowest = min(window.above)
            given_up = lowest - window.watermark - 1
            self.lost += given_up
            self.missing -= given_up
            window.watermark = lowest - 1
            self._advance(window)
        return Verdict.NEW

    @staticmethod
    def _advance(window: EpochWindow) -> None:
        while window.watermark + 1 in window.above:
            window.watermark += 1
            window.above.discard(window.watermark)

    @property
    def last_seq(self) -> int | None:
        if self.current_epoch is None:
            return None
        return self.epochs[self.current_epoch].highest

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": {str(e): [w.watermark, w.highest, sorted(w.above), w.floor, sorted(w.below)]
                       for e, w in self.epochs.items()},
            "current_epoch": self.current_epoch,
            "counters": [self.duplicates, self.gaps, self.missing, self.filled, self.lost, self.forgotten],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], max_pending: int = 4096) -> DeviceSequences:
        tracker = cls(max_pending=max_pending)
        tracker.epochs = {
            int(e): EpochWindow(int(w[0]), int(w[1]), {int(s) for s in w[2]}, int(w[3]), {int(s) for s in w[4]})
            for e, w in doc["epochs"].items()
        }
        tracker.current_epoch = doc["current_epoch"]
        (tracker.duplicates, tracker.gaps, tracker.missing, tracker.filled, tracker.lost,
         tracker.forgotten) = doc["counters"]
        return tracker

    @classmethod
    def resume(cls, epoch: int, last_seq: int, max_pending: int = 4096) -> DeviceSequences:
        """A tracker that has seen every batch of ``epoch`` up to ``last_seq`` (taking a device over)."""
        tracker = cls(max_pending=max_pending)
        tracker.epochs[epoch] = EpochWindow(last_seq, last_seq, floor=0)
        tracker.current_epoch = epoch
        return tracker
