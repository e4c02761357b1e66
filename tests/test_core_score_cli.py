"""`forgeline score` end to end through the real CLI entry point."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forgeline.cli import main


def _write(path: Path, sep: str, rows: int, spike: int | None) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as handle:
        handle.write(sep.join(["datetime", "pressure", "flow", "label"]) + "\n")
        for i in range(rows):
            bump = 30.0 if spike is not None and spike <= i < spike + 5 else 0.0
            handle.write(sep.join([f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}", f"{rng.normal(3, 0.1):.4f}",
                                   f"{rng.normal(20, 1) + bump:.4f}", "0"]) + "\n")  # fmt: skip


@pytest.mark.parametrize("sep", [",", ";"])
def test_score_writes_one_score_per_row(tmp_path: Path, sep: str) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    _write(source, sep, 300, spike=200)
    assert main(["score", str(source), "-o", str(target), "--exclude", "label", "--quiet"]) == 0
    with target.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["timestamp", "anomaly_score"]
    assert len(rows) == 301
    assert rows[1][0] == "2024-01-01T00:00:00"
    scores = np.array([float(r[1]) for r in rows[1:]])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[:60].max() == 0.0  # warm-up
    assert scores[200:205].min() > 0.8 > scores[100:190].max()


def test_score_detector_choice_and_bad_input(tmp_path: Path) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    _write(source, ",", 120, spike=None)
    assert main(["score", str(source), "-o", str(target), "--detector", "cusum"]) == 0
    assert main(["score", str(tmp_path / "missing.csv"), "-o", str(target)]) == 2
    assert main(["score", str(source), "-o", str(target), "--exclude", "nope"]) == 2
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("time,a\n1,2\n3\n")
    assert main(["score", str(ragged), "-o", str(target)]) == 2


def test_score_shows_progress_on_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    _write(source, ",", 3000, spike=None)
    result = subprocess.run(
        [sys.executable, "-c", "import twin.score_cli as s; s.PROGRESS_MIN_BYTES = 1; from forgeline.cli import main; "
         f"raise SystemExit(main(['score', {str(source)!r}, '-o', {str(target)!r}]))"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scored 3000 rows (100 %)" in result.stderr


def test_score_with_the_mewma_detector(tmp_path: Path) -> None:
    """``--detector mewma``: 400 warm-up rows (mv_warmup_samples) score 0, then a burst is found."""
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    _write(source, ";", 600, spike=500)
    assert main(["score", str(source), "-o", str(target), "--exclude", "label", "--detector", "mewma", "--quiet"]) == 0
    with target.open() as handle:
        scores = np.array([float(r[1]) for r in list(csv.reader(handle))[1:]])
    assert len(scores) == 600 and scores[:400].max() == 0.0
    assert scores[500:505].min() > 0.8 > scores[410:495].max()
