"""Helpers shared by the core's tests."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

SNAPSHOT_MAGIC = b"FLCORE1\n"


def rewrite_snapshot(blob: bytes, edit: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> bytes:
    """``blob`` (a :meth:`FleetCore.snapshot`) with its arrays passed through ``edit``: how the tests
    make snapshots of an older state layout (fewer fields, no multivariate arrays) to restore."""
    assert blob.startswith(SNAPSHOT_MAGIC)
    size = int.from_bytes(blob[len(SNAPSHOT_MAGIC) : len(SNAPSHOT_MAGIC) + 8], "little")
    head = blob[: len(SNAPSHOT_MAGIC) + 8 + size]
    with np.load(io.BytesIO(blob[len(head) :])) as data:
        arrays = {name: data[name] for name in data.files}
    buffer = io.BytesIO()
    np.savez(buffer, **edit(arrays))
    return head + buffer.getvalue()
