"""The one time-series writer: line protocol for the measurements of :mod:`forgeline.contract.timeseries`,
written in batches to InfluxDB (or anything speaking its write API) with retry, backoff and a disk spill
that is replayed in order when the database is back. The twin (:mod:`twin.influx`), the iteration loop
(:mod:`forgeline.loop.timeseries_out`) and order routing (:mod:`forgeline.routing.metrics`) all write
through it; each keeps only its own point builders.

Life of a point: the producer renders it to line protocol and calls :meth:`TimeSeriesWriter.add`
(cheap, never blocks, safe from any thread); the writer thread sends batches of ``batch_size`` lines
or every ``flush_interval_s``. A failed write (connection refused, timeout, 5xx, 429, and 401/403/404,
which are configuration an operator fixes: token, bucket, database, URL) is retried ``max_retries`` times
with exponential backoff; then the batch goes to ``spill_dir`` as a file and the writer is *down*: new
batches are spilled too (keeping the order), and the oldest spill file is retried with backoff (capped
at ``max_retry_delay_s``). When a retry succeeds, the spill is drained oldest first, then live writing
resumes. A batch the database rejects as malformed (400, 413, 422) can never be written: it is kept in
``spill_dir/rejected`` and counted, never retried forever. Without a spill directory the backlog is
held in memory up to ``max_spill_bytes``; beyond that batches are dropped *and counted*.

Several writers may share one spill directory (the demo's twin, loop and routing do): each names its
files ``{name}-{sequence}.lp`` and replays only its own, so a restarted writer of the same name picks up
its backlog.

Two write APIs: ``v2`` (``/api/v2/write`` with bucket, org and token: InfluxDB 2.x/3.x, 1.8+,
VictoriaMetrics), sent through influxdb-client when it is installed (the twin extra) and through the
standard library otherwise, so a service without that package still writes; and ``v1`` (``/write?db=``:
InfluxDB 1.x, Debian's ``influxdb``), through the standard library.

Example:
    >>> line("kpi", {"tenant": "acme", "device": "p 1"}, {"oee": 0.5, "state": 3, "skip": None}, 10)
    'kpi,device=p\\\\ 1,tenant=acme oee=0.5,state=3i 10'
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from forgeline.contract.timeseries import MEASUREMENTS

log = logging.getLogger(__name__)

_TAG_ESCAPE = str.maketrans({",": "\\,", " ": "\\ ", "=": "\\=", "\n": "\\n"})
_MEASUREMENT_ESCAPE = str.maketrans({",": "\\,", " ": "\\ ", "\n": "\\n"})
_NAME = re.compile(r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*")


def escape_tag(value: str) -> str:
    return value.translate(_TAG_ESCAPE)


def field_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(measurement: str, tags: dict[str, Any], fields: dict[str, Any], t_ns: int) -> str | None:
    """One line of line protocol (tags sorted, empty ones left out; ints as ``i``; non-finite floats left
    out, InfluxDB has no NaN); None when no field has a value (a point needs one). Rendered here rather
    than with ``influxdb_client.Point``: several times faster, and the escaping rules are short."""
    parts: list[str] = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"{escape_tag(key)}={'true' if value else 'false'}")
        elif isinstance(value, numbers.Integral):  # also numpy integers, without importing numpy
            parts.append(f"{escape_tag(key)}={int(value)}i")
        elif isinstance(value, numbers.Real):
            if math.isfinite(value):
                parts.append(f"{escape_tag(key)}={float(value)!r}")
        else:
            parts.append(f"{escape_tag(key)}={field_string(str(value))}")
    if not parts:
        return None
    tag_text = "".join(f",{escape_tag(k)}={escape_tag(str(v))}" for k, v in sorted(tags.items())
                       if v is not None and str(v) != "")
    return f"{measurement.translate(_MEASUREMENT_ESCAPE)}{tag_text} {','.join(parts)} {int(t_ns)}"


def _escape_key(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _escape_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def contract_line(measurement: str, tags: Mapping[str, str | None], fields: Mapping[str, Any], ts: float) -> str | None:
    """One line-protocol point at ``ts`` seconds (nanosecond precision), checked against the contract of
    :mod:`forgeline.contract.timeseries`: an unknown tag or field is a ``ValueError``; values take the
    contract's type. Tags in the contract's order; empty tags and non-finite fields are left out (InfluxDB
    has no NaN); a point with no field left is ``None``."""
    spec = MEASUREMENTS[measurement]
    unknown_tags = set(tags) - set(spec.tags)
    unknown_fields = set(fields) - set(spec.fields)
    if unknown_tags or unknown_fields:
        raise ValueError(f"{measurement}: not in the contract: tags {sorted(unknown_tags)} fields "
                         f"{sorted(unknown_fields)}")
    tag_text = "".join(f",{_escape_key(k)}={_escape_key(str(tags[k]))}" for k in spec.tags if tags.get(k))
    parts = []
    for name, value in fields.items():
        kind = spec.fields[name]
        if value is None:
            continue
        if kind == "int":
            parts.append(f"{_escape_key(name)}={int(value)}i")
        elif kind == "float":
            if not math.isfinite(float(value)):
                continue
            parts.append(f"{_escape_key(name)}={float(value)!r}")
        elif kind == "bool":
            parts.append(f"{_escape_key(name)}={'true' if value else 'false'}")
        else:
            parts.append(f"{_escape_key(name)}={_escape_string(str(value))}")
    if not parts:
        return None
    return f"{_escape_key(measurement)}{tag_text} {','.join(parts)} {round(ts * 1e9)}"


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number or not finite."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class InfluxSettings:
    """Where and how to write. ``api`` is ``v2`` (bucket, org, token) or ``v1`` (database, optional
    user/password). The rest is the batching, retry and spill behaviour of the module docstring."""

    url: str
    api: str = "v2"
    bucket: str = "forgeline"
    org: str = "forgeline"
    token: str | None = field(default=None, repr=False)  # a secret: never in logs
    database: str = "forgeline"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0
    batch_size: int = 5000
    flush_interval_s: float = 1.0
    max_retries: int = 5
    retry_interval_s: float = 0.5
    max_retry_delay_s: float = 30.0
    spill_dir: str | None = None
    max_spill_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.api not in ("v1", "v2"):
            raise ValueError(f"influx api must be v1 or v2, not {self.api!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"influx url must start with http:// or https://, not {self.url!r}")
        for name in ("batch_size", "max_spill_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"influx {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_retries < 0:
            raise ValueError(f"influx max_retries must be >= 0, got {self.max_retries!r}")
        for name in ("timeout_s", "flush_interval_s", "retry_interval_s", "max_retry_delay_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"influx {name} must be > 0, got {getattr(self, name)!r}")

    def __repr__(self) -> str:  # never print secrets
        return (f"InfluxSettings(url={self.url!r}, api={self.api!r}, bucket={self.bucket!r}, "
                f"database={self.database!r}, spill_dir={self.spill_dir!r})")


class WriteRejected(RuntimeError):
    """The database refused a batch as malformed: retrying cannot help."""


@dataclass
class WriterStats:
    points_queued: int = 0
    points_written: int = 0
    batches_written: int = 0
    write_errors: int = 0
    retries: int = 0
    spilled_batches: int = 0
    spilled_points: int = 0  # points in the spill now (not yet written)
    replayed_batches: int = 0
    rejected_points: int = 0
    dropped_points: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# Answers that mean "this batch can never be written"; every other failure keeps the data and retries.
_REJECTED_STATUS = (400, 413, 422)


class _Sender(Protocol):
    def send(self, body: bytes) -> None: ...

    def close(self) -> None: ...


class _HttpSender:
    """Standard-library HTTP: both write APIs."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        s = settings
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if s.api == "v2":
            query = urllib.parse.urlencode({"bucket": s.bucket, "org": s.org, "precision": "ns"})
            self.url = f"{s.url.rstrip('/')}/api/v2/write?{query}"
            if s.token:
                self.headers["Authorization"] = f"Token {s.token}"
        else:
            params = {"db": s.database, "precision": "ns"}
            if s.username:
                params |= {"u": s.username, "p": s.password or ""}
            self.url = f"{s.url.rstrip('/')}/write?{urllib.parse.urlencode(params)}"

    def send(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if exc.code in _REJECTED_STATUS:
                raise WriteRejected(f"HTTP {exc.code}: {detail}") from None
            raise ConnectionError(f"{self.settings.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"cannot write to {self.settings.url}: {exc}") from None
        if status >= 300:
            raise ConnectionError(f"{self.settings.url} answered HTTP {status} to a write")

    def close(self) -> None:
        pass


class _ClientSender:
    """influxdb-client's synchronous v2 write API (connection pooling through urllib3)."""

    def __init__(self, settings: InfluxSettings) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.settings = settings
        self._client = InfluxDBClient(url=settings.url, token=settings.token or "none", org=settings.org,
                                      timeout=int(settings.timeout_s * 1000))
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def send(self, body: bytes) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._write_api.write(bucket=self.settings.bucket, org=self.settings.org, record=body,
                                  write_precision=cast(Any, WritePrecision.NS))
        except ApiException as exc:
            status = int(exc.status or 0)
            if status in _REJECTED_STATUS:
                raise WriteRejected(f"HTTP {status}: {str(exc.body)[:300]}") from None
            raise ConnectionError(f"{self.settings.url} answered HTTP {status}: {str(exc.body)[:300]}") from None
        except (HTTPError, OSError) as exc:
            raise ConnectionError(f"cannot write to {self.settings.url}: {exc}") from None

    def close(self) -> None:
        self._client.close()


def _sender(settings: InfluxSettings) -> _Sender:
    if settings.api == "v2":
        try:
            return _ClientSender(settings)
        except ImportError:  # a service installed without the twin extra
            pass
    return _HttpSender(settings)


class TimeSeriesWriter:
    """Queues line protocol and writes it from its own thread; see the module docstring.

    ``name`` names the thread, the log lines and the spill files (letters, digits, ``_`` and ``-``)."""

    def __init__(self, settings: InfluxSettings, name: str = "influx") -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"writer name must be letters, digits, '_' and '-', not {name!r}")
        self.settings = settings
        self.name = name
        self.stats = WriterStats()
        self.last_error: str | None = None
        self._queue: deque[str] = deque()
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._memory_spill: deque[bytes] = deque()
        self._memory_spill_bytes = 0
        self._sending = False
        self.down_since: float | None = None
        self._next_retry = 0.0
        self._delay = settings.retry_interval_s
        self._spill_seq = 0
        self.spill_dir = Path(settings.spill_dir) if settings.spill_dir else None
        if self.spill_dir is not None:
            (self.spill_dir / "rejected").mkdir(parents=True, exist_ok=True)
            existing = self._spill_files()
            if existing:
                self._spill_seq = int(existing[-1].stem.rsplit("-", 1)[1]) + 1
                self.down_since = time.time()  # a backlog from a previous run: catch up first
                self.stats.spilled_points = sum(_points_in(p.read_bytes()) for p in existing)
        self._sender = _sender(settings)

    # ---- producer side --------------------------------------------------------------------------------

    def add(self, lines: list[str | None] | list[str]) -> int:
        """Queue points (None entries are skipped); returns how many were queued."""
        count = 0
        for text in lines:
            if text:
                self._queue.append(text)
                count += 1
        with self._count_lock:
            self.stats.points_queued += count
        if len(self._queue) >= self.settings.batch_size:
            self._wake.set()
        return count

    @property
    def backlog_points(self) -> int:
        """Points not yet in the database: queued plus spilled."""
        return len(self._queue) + self.stats.spilled_points

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> TimeSeriesWriter:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-influx", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (or spill it) and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:  # never started: what was queued still goes to the database or the spill
            self._drain(stopping=True)
        self._sender.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue and the spill are empty (tests, orderly shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        self._next_retry = 0.0
        while time.monotonic() < deadline:
            self._wake.set()
            if not self._queue and self.stats.spilled_points == 0 and not self._sending:
                return True
            time.sleep(0.02)
        return False

    # ---- writer thread --------------------------------------------------------------------------------

    def _take_batch(self) -> list[str]:
        queue = self._queue
        count = min(len(queue), self.settings.batch_size)
        return [queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self._drain(stopping)
            except Exception:  # never let the writer die: the backlog stays spilled
                log.exception("%s: influx writer cycle failed", self.name)
            if stopping:
                return

    def _drain(self, stopping: bool) -> None:
        while True:
            if self.down_since is not None:
                if time.monotonic() < self._next_retry and not stopping:
                    self._spill_queue()
                    return
                if not self._replay_one():
                    self._spill_queue()
                    return
                continue
            batch = self._take_batch()
            if not batch:
                return
            body = ("\n".join(batch)).encode()
            self._sending = True
            try:
                self._send_with_retry(body, len(batch), stopping)
            finally:
                self._sending = False

    def _send_with_retry(self, body: bytes, points: int, stopping: bool) -> None:
        delay = self.settings.retry_interval_s
        for attempt in range(self.settings.max_retries + 1):
            try:
                self._sender.send(body)
            except WriteRejected as exc:
                self._reject(body, points, str(exc))
                return
            except ConnectionError as exc:
                self.stats.write_errors += 1
                self.last_error = str(exc)
                if attempt == self.settings.max_retries or stopping:
                    log.warning("%s: influx write failed after %d attempts (%s): spilling", self.name, attempt + 1,
                                exc)
                    self._spill(body, points)
                    self._go_down()
                    return
                self.stats.retries += 1
                time.sleep(min(delay, self.settings.max_retry_delay_s))
                delay *= 2
                continue
            self.stats.points_written += points
            self.stats.batches_written += 1
            return

    def _go_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            self._delay = self.settings.retry_interval_s
        self._next_retry = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.settings.max_retry_delay_s)

    def _reject(self, body: bytes, points: int, reason: str) -> None:
        self.stats.rejected_points += points
        self.last_error = reason
        log.error("%s: influx rejected a batch of %d points: %s", self.name, points, reason)
        if self.spill_dir is not None:
            path = self.spill_dir / "rejected" / f"{self.name}-{int(time.time() * 1000)}-{self._spill_seq}.lp"
            self._spill_seq += 1
            path.write_bytes(body)

    # ---- spill ----------------------------------------------------------------------------------------

    def _spill_files(self) -> list[Path]:
        assert self.spill_dir is not None
        own = []
        for path in self.spill_dir.glob(f"{self.name}-*.lp"):
            prefix, _, number = path.stem.rpartition("-")
            if prefix == self.name and number.isdigit():
                own.append(path)
        return sorted(own)

    def _spill_queue(self) -> None:
        while self._queue:
            batch = self._take_batch()
            self._spill(("\n".join(batch)).encode(), len(batch))

    def _spill(self, body: bytes, points: int) -> None:
        self.stats.spilled_batches += 1
        if self.spill_dir is not None:
            path = self.spill_dir / f"{self.name}-{self._spill_seq:012d}.lp"
            self._spill_seq += 1
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(body)
            tmp.replace(path)
            self.stats.spilled_points += points
            return
        if self._memory_spill_bytes + len(body) > self.settings.max_spill_bytes:
            self.stats.dropped_points += points
            log.error("%s: influx backlog over %d bytes in memory: dropped %d points", self.name,
                      self.settings.max_spill_bytes, points)
            return
        self._memory_spill.append(body)
        self._memory_spill_bytes += len(body)
        self.stats.spilled_points += points

    def _replay_one(self) -> bool:
        """Send the oldest spilled batch; True when it went through (or the spill is empty)."""
        files: list[Path] = []
        if self.spill_dir is not None:
            files = self._spill_files()
            if not files:
                self._up()
                return True
            body = files[0].read_bytes()
        else:
            if not self._memory_spill:
                self._up()
                return True
            body = self._memory_spill[0]
        points = _points_in(body)
        try:
            self._sender.send(body)
        except WriteRejected as exc:
            self._reject(body, points, str(exc))
        except ConnectionError as exc:
            self.stats.write_errors += 1
            self.last_error = str(exc)
            self._go_down()
            return False
        else:
            self.stats.points_written += points
            self.stats.batches_written += 1
            self.stats.replayed_batches += 1
        if self.spill_dir is not None:
            files[0].unlink()
        else:
            self._memory_spill.popleft()
            self._memory_spill_bytes -= len(body)
        self.stats.spilled_points = max(0, self.stats.spilled_points - points)
        return True

    def _up(self) -> None:
        if self.down_since is not None:
            log.info("%s: influx is back after %.1f s; spill drained", self.name, time.time() - self.down_since)
        self.down_since = None
        self._delay = self.settings.retry_interval_s
        self.stats.spilled_points = 0


def _points_in(body: bytes) -> int:
    return body.count(b"\n") + 1 if body else 0
