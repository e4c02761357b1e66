"""The store-and-forward queue: every batch and event goes to disk before it goes to the broker.

SQLite in WAL mode, one table in arrival order (``INTEGER PRIMARY KEY AUTOINCREMENT``, so ids are
never reused and order survives deletes). A row is deleted only when the broker has acknowledged
it (PUBACK), so a broker outage, a lost link or a SIGKILLed agent loses nothing that reached the
spool: on the next connection the rows are sent again, in order, telemetry marked historical.

Sequence numbers live here too. Each device's next batch number is stored in the same transaction
as the batch, so a restarted agent continues the numbering in the same epoch and the twin can tell
a replayed duplicate (same epoch and seq) from new data. The epoch is chosen when the spool file is
created; a new spool file is a new epoch.

Overflow policy (the spool is bounded by ``max_bytes`` of payload):

``drop_oldest`` (default)
    Delete the oldest telemetry batches until the new one fits; events are dropped only when no
    telemetry is left. Recent data is worth more to monitoring than old data.
``drop_newest``
    Refuse the new batch or event and keep the backlog intact.

Either way every dropped batch, sample and event is counted (persistently, in the ``meta`` table),
logged, and reported by :meth:`Spool.take_unreported_drops` so the agent publishes an ``alarm``
event; dropped batches also leave a gap in the sequence numbers the twin sees.

Example:
    >>> spool = Spool(":memory:", max_bytes=1000)
    >>> seq = spool.append_batch("acme/p/a/d1", lambda seq: b"x" * 600, samples=10)
    >>> seq, spool.stats()["queued_samples"]
    (0, 10)
    >>> _ = spool.append_batch("acme/p/a/d1", lambda seq: b"y" * 600, samples=10)  # drops the first
    >>> [row.seq for row in spool.pending("acme/p/a/d1")], spool.stats()["dropped_samples"]
    ([1], 10)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("drop_oldest", "drop_newest")
SYNCHRONOUS_MODES = ("normal", "full")


class RowKind(IntEnum):
    TELEMETRY = 0
    EVENT = 1


@dataclass(frozen=True)
class SpoolRow:
    id: int
    device: str
    kind: RowKind
    seq: int | None
    samples: int
    payload: bytes


@dataclass(frozen=True)
class Drops:
    """Drops not yet reported, per device: (batches, samples, events)."""

    device: str
    batches: int
    samples: int
    events: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS streams (device TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    kind INTEGER NOT NULL,
    seq INTEGER,
    samples INTEGER NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_device ON queue (device, id);
CREATE TABLE IF NOT EXISTS jobs (
    device TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created REAL NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (device, job_id)
);
"""

MAX_JOBS = 10_000  # dispatched jobs remembered for de-duplication (the oldest are forgotten first)

_COUNTERS = ("dropped_batches", "dropped_samples", "dropped_events", "appended_batches", "appended_samples")


class Spool:
    """A bounded, durable, ordered queue of outgoing messages. Thread-safe."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        overflow: str = "drop_oldest",
        synchronous: str = "normal",
        epoch: int | None = None,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"spool overflow policy must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"spool synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        if max_bytes < 1:
            raise ValueError(f"spool max_bytes must be positive, not {max_bytes}")
        self.path = str(path)
        self.max_bytes = max_bytes
        self.overflow = overflow
        self._lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: explicit BEGIN/COMMIT, one transaction per append.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a killed process (the WAL is in the OS cache); FULL also survives power loss.
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        self._counters: dict[str, int] = {name: 0 for name in _COUNTERS}
        for key, value in self._db.execute("SELECT key, value FROM meta"):
            if key in self._counters:
                self._counters[key] = int(value)
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row is None:
            self.epoch = int(time.time()) & 0xFFFFFFFF if epoch is None else epoch
            self._db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (self.epoch,))
        else:
            self.epoch = int(row[0])
        self._next_seq: dict[str, int] = dict(self._db.execute("SELECT device, next_seq FROM streams"))
        total = self._db.execute(
            "SELECT COALESCE(SUM(length(payload)), 0), COUNT(*), COALESCE(SUM(samples), 0) FROM queue"
        ).fetchone()
        self._bytes, self._rows, self._samples = int(total[0]), int(total[1]), int(total[2])
        self._unreported: dict[str, list[int]] = {}
        self._closed = False

    # --- writing -----------------------------------------------------------------------------------

    def append_batch(self, device: str, build: Callable[[int], bytes], samples: int) -> int | None:
        """Number, build and store one telemetry batch; return its seq (None if the policy refused it).

        ``build(seq)`` returns the encoded batch; numbering and storing happen in one transaction.
        """
        with self._lock:
            self._check_open()
            seq = self._next_seq.get(device, 0)
            payload = build(seq)
            self._next_seq[device] = seq + 1
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO streams (device, next_seq) VALUES (?, ?) "
                    "ON CONFLICT(device) DO UPDATE SET next_seq=excluded.next_seq",
                    (device, seq + 1),
                )
                stored = self._make_room(device, len(payload), samples, RowKind.TELEMETRY)
                if stored:
                    self._insert(device, RowKind.TELEMETRY, seq, samples, payload)
                self._save_counters()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._next_seq[device] = seq
                raise
            return seq if stored else None

    def append_event(self, device: str, payload: bytes) -> bool:
        """Store one JSON event; False if the overflow policy refused it (counted)."""
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stored = self._make_room(device, len(payload), 0, RowKind.EVENT)
                if stored:
                    self._insert(device, RowKind.EVENT, None, 0, payload)
                self._save_counters()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return stored

    def _insert(self, device: str, kind: RowKind, seq: int | None, samples: int, payload: bytes) -> None:
        self._db.execute(
            "INSERT INTO queue (device, kind, seq, samples, created, payload) VALUES (?, ?, ?, ?, ?, ?)",
            (device, int(kind), seq, samples, time.time(), payload),
        )
        self._bytes += len(payload)
        self._rows += 1
        self._samples += samples
        if kind is RowKind.TELEMETRY:
            self._counters["appended_batches"] += 1
            self._counters["appended_samples"] += samples

    def _make_room(self, device: str, size: int, samples: int, kind: RowKind) -> bool:
        """Apply the overflow policy so ``size`` more bytes fit; False if the new row is refused."""
        if self._bytes + size <= self.max_bytes:
            return True
        if self.overflow == "drop_newest" or size > self.max_bytes:
            self._count_drop(device, kind, samples)
            log.warning("spool full (%d of %d bytes): dropped a new %s of %s", self._bytes, self.max_bytes,
                        kind.name.lower(), device)
            return False
        # drop_oldest: free a little more than needed (1% of the bound) so we do not delete on every append.
        need = self._bytes + size - self.max_bytes + self.max_bytes // 100
        for drop_kind in (RowKind.TELEMETRY, RowKind.EVENT):
            freed = 0
            victims: list[tuple[int, str, int, int]] = []
            for row_id, row_device, row_samples, row_size in self._db.execute(
                "SELECT id, device, samples, length(payload) FROM queue WHERE kind=? ORDER BY id",
                (int(drop_kind),),
            ):
                victims.append((row_id, row_device, row_samples, row_size))
                freed += row_size
                if freed >= need:
                    break
            self._db.executemany("DELETE FROM queue WHERE id=?", [(v[0],) for v in victims])
            for _, row_device, row_samples, row_size in victims:
                self._bytes -= row_size
                self._rows -= 1
                self._samples -= row_samples
                self._count_drop(row_device, drop_kind, row_samples)
            need -= freed
            if victims:
                log.warning("spool full: dropped the %d oldest %s rows (%d bytes)", len(victims),
                            drop_kind.name.lower(), freed)
            if need <= 0 or self._bytes + size <= self.max_bytes:
                return True
        return self._bytes + size <= self.max_bytes

    def _count_drop(self, device: str, kind: RowKind, samples: int) -> None:
        counts = self._unreported.setdefault(device, [0, 0, 0])
        if kind is RowKind.TELEMETRY:
            self._counters["dropped_batches"] += 1
            self._counters["dropped_samples"] += samples
            counts[0] += 1
            counts[1] += samples
        else:
            self._counters["dropped_events"] += 1
            counts[2] += 1

    def _save_counters(self) -> None:
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            list(self._counters.items()),
        )

    # --- reading and acknowledging ---------------------------------------------------------------

    def pending(self, device: str, after_id: int = 0, limit: int = 1000) -> list[SpoolRow]:
        """Rows of ``device`` with id greater than ``after_id``, oldest first."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, device, kind, seq, samples, payload FROM queue WHERE device=? AND id>? ORDER BY id LIMIT ?",
                (device, after_id, limit),
            ).fetchall()
        return [SpoolRow(r[0], r[1], RowKind(r[2]), r[3], r[4], bytes(r[5])) for r in rows]

    def last_id(self, device: str) -> int:
        """The id of the newest row of ``device`` (0 when none): the replay boundary on reconnect."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT MAX(id) FROM queue WHERE device=?", (device,)).fetchone()
        return int(row[0] or 0)

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows; return how many were still there."""
        id_list = list(ids)
        if not id_list:
            return 0
        with self._lock:
            if self._closed:
                return 0
            placeholders = ",".join("?" * len(id_list))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(length(payload)), 0), COALESCE(SUM(samples), 0) FROM queue "
                    f"WHERE id IN ({placeholders})",
                    id_list,
                ).fetchone()
                self._db.execute(f"DELETE FROM queue WHERE id IN ({placeholders})", id_list)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._rows -= int(found[0])
            self._bytes -= int(found[1])
            self._samples -= int(found[2])
            return int(found[0])

    def next_seq(self, device: str) -> int:
        with self._lock:
            return self._next_seq.get(device, 0)

    # --- dispatched jobs ---------------------------------------------------------------------------

    def dispatched(self, device: str, job_id: str) -> dict[str, Any] | None:
        """The result recorded when ``job_id`` was dispatched to ``device``, or None if it never was."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT result FROM jobs WHERE device=? AND job_id=?", (device, job_id)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def record_dispatch(self, device: str, job_id: str, result: Mapping[str, Any]) -> None:
        """Remember that ``job_id`` went to ``device`` (durably: a redelivered command after a restart
        finds it); the newest :data:`MAX_JOBS` are kept."""
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO jobs (device, job_id, created, result) VALUES (?, ?, ?, ?)",
                                 (device, job_id, time.time(), json.dumps(dict(result))))
                self._db.execute("DELETE FROM jobs WHERE created < (SELECT created FROM jobs ORDER BY created DESC "
                                 "LIMIT 1 OFFSET ?)", (MAX_JOBS - 1,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # --- reporting ---------------------------------------------------------------------------------

    def take_unreported_drops(self) -> list[Drops]:
        """Drops since the last call, per device (for the agent's alarm events)."""
        with self._lock:
            drops = [Drops(device, c[0], c[1], c[2]) for device, c in self._unreported.items()]
            self._unreported.clear()
        return drops

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "epoch": self.epoch,
                "queued_rows": self._rows,
                "queued_samples": self._samples,
                "queued_bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "overflow": self.overflow,
                **self._counters,
            }

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("spool is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
