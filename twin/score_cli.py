"""``forgeline score INPUT.csv -o OUTPUT.csv``: score a CSV file with the twin's anomaly detectors.

Input: a header row, a timestamp column, one or more numeric columns, comma- or semicolon-separated.
Output: ``timestamp,anomaly_score`` with one row per input row (the timestamp copied verbatim),
scores in [0, 1]; the first ``warmup_samples`` rows (``mv_warmup_samples`` = 400 for the multivariate
``pca`` and ``mewma``) score 0 while the baselines learn.

Example::

    forgeline score data/valve1/0.csv -o scores.csv --exclude anomaly,changepoint
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import IO

import numpy as np

from twin.core.config import DETECTORS, CoreConfig

CHUNK_ROWS = 20_000
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
_TIME_HINTS = ("timestamp", "datetime", "time", "date", "ts")


class ScoreInputError(ValueError):
    """The input file cannot be scored; the message says why and where."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="CSV file: header row, a timestamp column, numeric columns")
    parser.add_argument("-o", "--output", required=True, help="where to write timestamp,anomaly_score")
    parser.add_argument(
        "--detector", choices=DETECTORS, default=CoreConfig().detector, help="detector (default: %(default)s)"
    )
    parser.add_argument("--timestamp-column", help="name of the timestamp column (default: guessed from the header)")
    parser.add_argument("--exclude", default="", help="comma-separated columns not to score (labels, ids)")
    parser.add_argument("--delimiter", choices=[",", ";"], help="field separator (default: detected)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def detect_delimiter(header_line: str) -> str:
    """';' when the header has more semicolons than commas, else ','.

    >>> detect_delimiter("datetime;a;b"), detect_delimiter("time,a,b")
    (';', ',')
    """
    return ";" if header_line.count(";") > header_line.count(",") else ","


def pick_timestamp_column(header: list[str], requested: str | None) -> int:
    if requested is not None:
        if requested not in header:
            raise ScoreInputError(f"no column {requested!r}; the header has {header}")
        return header.index(requested)
    lowered = [h.strip().lower() for h in header]
    for hint in _TIME_HINTS:
        for i, name in enumerate(lowered):
            if name == hint:
                return i
    for i, name in enumerate(lowered):
        if "time" in name or "date" in name:
            return i
    return 0


def _parse(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


class _CountingReader:
    """Iterates lines of a text file and counts the characters read, for progress."""

    def __init__(self, handle: IO[str]):
        self.handle = handle
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.handle:
            self.chars += len(line)
            yield line


def run(args: argparse.Namespace) -> int:
    from twin.core.offline import StreamScorer

    size = os.path.getsize(args.input) if os.path.exists(args.input) else -1
    if size < 0:
        print(f"forgeline score: no such file {args.input!r}", file=sys.stderr)
        return 2
    show_progress = not args.quiet and size >= PROGRESS_MIN_BYTES
    with (
        open(args.input, newline="", encoding="utf-8-sig") as source,
        open(args.output, "w", newline="", encoding="utf-8") as sink,
    ):
        first = source.readline()
        if not first.strip():
            print(f"forgeline score: {args.input}: empty file, a header row is needed", file=sys.stderr)
            return 2
        delimiter = args.delimiter or detect_delimiter(first)
        header = next(csv.reader([first], delimiter=delimiter))
        try:
            ts_col = pick_timestamp_column(header, args.timestamp_column)
        except ScoreInputError as exc:
            print(f"forgeline score: {exc}", file=sys.stderr)
            return 2
        excluded = {c.strip() for c in args.exclude.split(",") if c.strip()}
        unknown = excluded - set(header)
        if unknown:
            print(f"forgeline score: --exclude names unknown columns {sorted(unknown)}", file=sys.stderr)
            return 2
        value_cols = [i for i, name in enumerate(header) if i != ts_col and name not in excluded]
        if not value_cols:
            print(f"forgeline score: {args.input}: no numeric column besides the timestamp", file=sys.stderr)
            return 2
        # custom-channel names keep the columns away from the roles of catalog names ('state' …)
        names = [f"x_{i}" for i in value_cols]
        scorer = StreamScorer(names, CoreConfig(detector=args.detector))
        counting = _CountingReader(source)
        reader = csv.reader(counting, delimiter=delimiter)
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow(["timestamp", "anomaly_score"])
        rows_done = 0
        last_report = time.monotonic()
        width = len(header)
        while True:
            stamps: list[str] = []
            block: list[list[float]] = []
            for record in reader:
                if not record:
                    continue
                if len(record) != width:
                    print(
                        f"forgeline score: {args.input}: line {rows_done + len(block) + 2} has {len(record)} "
                        f"fields, the header {width}",
                        file=sys.stderr,
                    )
                    return 2
                stamps.append(record[ts_col])
                block.append([_parse(record[i]) for i in value_cols])
                if len(block) >= CHUNK_ROWS:
                    break
            if not block:
                break
            scores = scorer.score(np.array(block, dtype=np.float64))
            writer.writerows(zip(stamps, (f"{s:.6f}" for s in scores), strict=True))
            rows_done += len(block)
            if show_progress and time.monotonic() - last_report > 1.0:
                last_report = time.monotonic()
                print(f"\rscored {rows_done} rows ({100.0 * counting.chars / size:.0f} %)", end="", file=sys.stderr)
        if show_progress:
            print(f"\rscored {rows_done} rows (100 %)", file=sys.stderr)
    return 0
