"""Periodic snapshots of the whole twin state, and restore after a crash.

A snapshot holds the core (:meth:`FleetCore.snapshot`), the registry, every device's (epoch, seq)
bookkeeping, the latest reported values and twin documents. It is taken by the ingest thread
between two cycles, so it is consistent: the sequence trackers say exactly which batches the
core has counted. It is written to a temporary file, fsynced and renamed over the previous one,
so a SIGKILL at any moment leaves either the old or the new snapshot, never a torn one.

Recovery bound: messages are acknowledged to the broker after they are processed, not after they
are snapshotted. After a SIGKILL the twin restarts from the last snapshot; batches processed after
it were acknowledged and are not redelivered by the broker, so at most ``snapshot_interval_s`` of
data is missing from the KPIs (the agents' spools can replay it: replayed batches are accepted as
they are new to the restored trackers). Nothing is counted twice, because the trackers and the core
are restored together.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twin.core import FleetCore
from twin.ingest import DeviceRuntime
from twin.registry import Registry
from twin.sequence import DeviceSequences

if TYPE_CHECKING:
    from twin.service import TwinService

log = logging.getLogger(__name__)

MAGIC = b"FLTWIN1\n"
FILE_NAME = "twin.snapshot"


class SnapshotError(RuntimeError):
    """A snapshot file that cannot be read; the message says which and why."""


def _section(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def encode(service: TwinService) -> bytes:
    ingestor = service.ingestor
    meta: dict[str, Any] = {
        "taken_at": time.time(),
        "worker": service.worker_id,
        "registry": ingestor.registry.to_json(),
        "runtime": {
            str(index): {
                "sequences": r.sequences.to_json(),
                "samples": r.samples,
                "job": r.job,
                "last_event_ts": r.last_event_ts,
            }
            for index, r in ingestor.runtime.items()
        },
        "latest": service.state.latest,
        "active_anomalies": service.state.active_anomalies,
    }
    arrays = io.BytesIO()
    np.savez(arrays, last_value=ingestor.last_value, last_t=ingestor.last_t)
    return (MAGIC + _section(json.dumps(meta).encode()) + _section(ingestor.core.snapshot())
            + _section(arrays.getvalue()))


def decode_into(service: TwinService, blob: bytes) -> None:
    if not blob.startswith(MAGIC):
        raise SnapshotError("not a twin snapshot (bad magic)")
    pos = len(MAGIC)
    sections: list[bytes] = []
    for _ in range(3):
        size = int.from_bytes(blob[pos : pos + 8], "little")
        pos += 8
        if pos + size > len(blob):
            raise SnapshotError("twin snapshot truncated")
        sections.append(blob[pos : pos + size])
        pos += size
    meta = json.loads(sections[0])
    core = FleetCore.restore(sections[1])
    ingestor = service.ingestor
    ingestor.core = core
    ingestor.registry = Registry(core)
    ingestor.registry.load_json(meta["registry"])
    ingestor.runtime = {
        int(index): DeviceRuntime(
            sequences=DeviceSequences.from_json(doc["sequences"]),
            samples=int(doc["samples"]),
            job=doc["job"],
            last_event_ts=doc["last_event_ts"],
        )
        for index, doc in meta["runtime"].items()
    }
    with np.load(io.BytesIO(sections[2]), allow_pickle=False) as data:
        last_value, last_t = data["last_value"], data["last_t"]
    ingestor.last_value = np.full((core.capacity, core.channels_per_device), np.nan)
    ingestor.last_t = np.full((core.capacity, core.channels_per_device), np.iinfo(np.int64).min, dtype=np.int64)
    rows = min(last_value.shape[0], core.capacity)
    ingestor.last_value[:rows] = last_value[:rows]
    ingestor.last_t[:rows] = last_t[:rows]
    ingestor.interval_sum = np.zeros_like(ingestor.last_value)
    ingestor.interval_count = np.zeros(ingestor.last_value.shape, dtype=np.int64)
    service.state.latest = dict(meta["latest"])
    service.state.active_anomalies = dict(meta["active_anomalies"])


class Snapshotter:
    """Writes ``DIR/twin.snapshot`` every ``interval_s`` and reads it back at start."""

    def __init__(self, directory: str | Path, interval_s: float) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        self.interval_s = interval_s
        self.last_saved = time.time()
        self.saved = 0
        self.last_bytes = 0
        self.last_duration_s = 0.0

    def due(self, now: float) -> bool:
        return now - self.last_saved >= self.interval_s

    def save(self, service: TwinService) -> None:
        started = time.perf_counter()
        blob = encode(service)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.last_saved = time.time()
        self.saved += 1
        self.last_bytes = len(blob)
        self.last_duration_s = time.perf_counter() - started

    def restore(self, service: TwinService) -> bool:
        """Load the snapshot if there is one; a corrupt file is moved aside (and logged), not fatal."""
        if not self.path.exists():
            return False
        blob = self.path.read_bytes()
        try:
            decode_into(service, blob)
        except Exception as exc:  # corrupt or from an incompatible version: start empty, keep the file
            aside = self.path.with_suffix(f".bad-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("twin snapshot %s unreadable (%s); moved to %s, starting empty", self.path, exc, aside)
            return False
        return True
