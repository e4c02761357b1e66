"""The agent's SQLite spool: order, durability across reopen and SIGKILL, sequence numbers, overflow policy."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.spool import RowKind, Spool


def payload(tag: int, size: int = 100) -> bytes:
    return tag.to_bytes(4, "little") * (size // 4)


def builder(tag: int, size: int = 100) -> Callable[[int], bytes]:
    return lambda _seq: payload(tag, size)


def test_rows_come_back_in_order_per_device_and_ack_deletes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    for i in range(10):
        spool.append_batch("a", builder(i), samples=5)
        spool.append_event("a" if i % 2 else "b", b'{"type":"alarm","ts":1}')
    rows = spool.pending("a")
    assert [r.seq for r in rows if r.kind is RowKind.TELEMETRY] == list(range(10))
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert spool.pending("a", after_id=rows[3].id) == rows[4:]
    assert spool.ack([r.id for r in rows[:4]]) == 4
    assert spool.ack([rows[0].id]) == 0  # a repeated acknowledgement is harmless
    assert spool.pending("a")[0] == rows[4]
    stats = spool.stats()
    assert stats["queued_samples"] == 5 * 10 - 5 * sum(r.kind is RowKind.TELEMETRY for r in rows[:4])
    spool.close()


def test_reopen_keeps_rows_epoch_and_sequence(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    epoch = spool.epoch
    for i in range(3):
        spool.append_batch("dev", builder(i), samples=1)
    spool.ack([spool.pending("dev")[0].id])
    spool.close()
    again = Spool(tmp_path / "s.db")
    assert again.epoch == epoch
    assert [r.seq for r in again.pending("dev")] == [1, 2]
    assert again.append_batch("dev", lambda seq: payload(9), samples=1) == 3  # numbering continues
    assert again.stats()["appended_batches"] == 4
    again.close()
    fresh = Spool(tmp_path / "other.db", epoch=12345)
    assert fresh.epoch == 12345 and fresh.append_batch("dev", lambda seq: b"x", samples=1) == 0
    fresh.close()


def test_build_receives_the_sequence_number(tmp_path: Path) -> None:
    spool = Spool(":memory:")
    seen: list[int] = []

    def build(seq: int) -> bytes:
        seen.append(seq)
        return seq.to_bytes(8, "little")

    for _ in range(3):
        spool.append_batch("d", build, samples=1)
    assert seen == [0, 1, 2]
    assert [int.from_bytes(r.payload, "little") for r in spool.pending("d")] == [0, 1, 2]


def test_drop_oldest_makes_room_counts_and_reports(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=10_000, overflow="drop_oldest")
    for i in range(30):
        spool.append_batch("d", builder(i, 1000), samples=10)
    spool.append_event("d", b"e" * 100)
    rows = spool.pending("d")
    stats = spool.stats()
    assert stats["queued_bytes"] <= 10_000
    kept = [r.seq for r in rows if r.kind is RowKind.TELEMETRY]
    assert kept == list(range(30 - len(kept), 30))  # the newest survive, in order
    assert stats["dropped_batches"] == 30 - len(kept) and stats["dropped_samples"] == 10 * (30 - len(kept))
    assert any(r.kind is RowKind.EVENT for r in rows)  # events outlive telemetry
    drops = spool.take_unreported_drops()
    assert [(d.device, d.batches, d.samples) for d in drops] == [("d", 30 - len(kept), 10 * (30 - len(kept)))]
    assert spool.take_unreported_drops() == []  # reported once
    spool.close()
    assert Spool(tmp_path / "s.db").stats()["dropped_batches"] == 30 - len(kept)  # counters persist


def test_drop_newest_keeps_the_backlog(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=5_000, overflow="drop_newest")
    results = [spool.append_batch("d", builder(i, 1000), samples=10) for i in range(8)]
    assert results[:5] == [0, 1, 2, 3, 4] and results[5:] == [None, None, None]
    assert [r.seq for r in spool.pending("d")] == [0, 1, 2, 3, 4]
    assert spool.stats()["dropped_batches"] == 3
    # A refused batch still used its sequence number: the twin sees the gap.
    spool.ack([r.id for r in spool.pending("d")])
    assert spool.append_batch("d", lambda seq: payload(0, 1000), samples=1) == 8


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overflow"):
        Spool(tmp_path / "a.db", overflow="drop_random")
    with pytest.raises(ValueError, match="synchronous"):
        Spool(tmp_path / "a.db", synchronous="off")


def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    """A writer process killed with SIGKILL mid-stream loses no committed row (WAL, synchronous=normal)."""
    path = tmp_path / "s.db"
    progress = tmp_path / "progress"
    code = textwrap.dedent(f"""
        from edge_agent.spool import Spool
        spool = Spool({str(path)!r})
        i = 0
        while True:
            spool.append_batch("d", lambda seq: seq.to_bytes(8, "little") * 64, samples=64)
            i += 1
            if i % 50 == 0:
                open({str(progress)!r}, "w").write(str(i))
    """)
    writer = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while (not progress.exists() or int(progress.read_text() or 0) < 500) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
    written = int(progress.read_text())
    with sqlite3.connect(path) as db:
        seqs = [row[0] for row in db.execute("SELECT seq FROM queue ORDER BY id")]
        (next_seq,) = db.execute("SELECT next_seq FROM streams WHERE device='d'").fetchone()
    assert len(seqs) >= written and seqs == list(range(len(seqs)))
    assert next_seq == len(seqs)  # numbering and rows were committed together
    reopened = Spool(path)
    assert reopened.append_batch("d", lambda seq: b"x", samples=1) == len(seqs)
