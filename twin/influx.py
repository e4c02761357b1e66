"""Time series out: line protocol for the measurements of ``forgeline.contract.timeseries``, written in
batches through influxdb-client's v2 write API, with retry and backoff, and a disk spill that is
replayed in order when the database is back.

Life of a point: the ingest thread renders it to line protocol and queues it (cheap, never
blocks); the writer thread sends batches of ``batch_size`` lines or every ``flush_interval_s``.
A failed write (connection refused, timeout, 5xx, 429) is retried ``max_retries`` times with
exponential backoff; then the batch goes to ``spill_dir`` as a file and the writer is *down*: new
batches are spilled too (keeping the order), and the oldest spill file is retried with backoff
(capped at ``max_retry_delay_s``). When a retry succeeds, the spill is drained oldest first, then
live writing resumes. A batch the database rejects as malformed (4xx other than 429) is kept in
``spill_dir/rejected`` and counted, never retried forever (400, 413, 422; an authentication or
not-found answer is a configuration problem, so that data is spilled and retried). Without a spill directory the backlog
is held in memory up to ``max_spill_bytes``; beyond that batches are dropped *and counted*.

Line protocol is rendered here rather than with ``influxdb_client.Point``: it is several times
faster and the escaping rules are short.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from forgeline.contract.topics import DeviceRef
from twin.config import InfluxConfig

if TYPE_CHECKING:
    from twin.ingest import Ingestor
    from twin.registry import Device
    from twin.service import TwinService

log = logging.getLogger(__name__)

_TAG_ESCAPE = str.maketrans({",": "\\,", " ": "\\ ", "=": "\\=", "\n": "\\n"})
_MEASUREMENT_ESCAPE = str.maketrans({",": "\\,", " ": "\\ ", "\n": "\\n"})


def escape_tag(value: str) -> str:
    return value.translate(_TAG_ESCAPE)


def field_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(measurement: str, tags: dict[str, Any], fields: dict[str, Any], t_ns: int) -> str | None:
    """One line of line protocol; None when no field has a value (a point needs one).

    >>> line("kpi", {"tenant": "acme", "device": "p 1"}, {"oee": 0.5, "state": 3, "skip": None}, 10)
    'kpi,device=p\\\\ 1,tenant=acme oee=0.5,state=3i 10'
    """
    parts: list[str] = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"{escape_tag(key)}={'true' if value else 'false'}")
        elif isinstance(value, int | np.integer):
            parts.append(f"{escape_tag(key)}={int(value)}i")
        elif isinstance(value, float | np.floating):
            if math.isfinite(value):
                parts.append(f"{escape_tag(key)}={float(value)!r}")
        else:
            parts.append(f"{escape_tag(key)}={field_string(str(value))}")
    if not parts:
        return None
    tag_text = "".join(f",{escape_tag(k)}={escape_tag(str(v))}" for k, v in sorted(tags.items())
                       if v is not None and str(v) != "")
    return f"{measurement.translate(_MEASUREMENT_ESCAPE)}{tag_text} {','.join(parts)} {int(t_ns)}"


def device_tags(device: Device) -> dict[str, Any]:
    ref = device.ref
    return {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device,
            "technology": device.capabilities.get("technology")}


KPI_FIELDS = ("utilization", "availability", "effectiveness", "quality", "oee", "chamber_fill", "fill_realised",
              "anomaly_score")


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
    spilled_points: int = 0
    replayed_batches: int = 0
    rejected_points: int = 0
    dropped_points: int = 0


class InfluxWriter:
    """Queues line protocol and writes it from its own thread; see the module docstring."""

    def __init__(self, config: InfluxConfig, worker: str = "twin") -> None:
        self.config = config
        self.worker = worker
        self.stats = WriterStats()
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._memory_spill: deque[bytes] = deque()
        self._memory_spill_bytes = 0
        self.down_since: float | None = None
        self._next_retry = 0.0
        self._delay = config.retry_interval_s
        self._spill_seq = 0
        self.spill_dir = Path(config.spill_dir) if config.spill_dir else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            (self.spill_dir / "rejected").mkdir(exist_ok=True)
            existing = sorted(self.spill_dir.glob("*.lp"))
            if existing:
                self._spill_seq = int(existing[-1].stem) + 1
                self.down_since = time.time()  # a backlog from a previous run: catch up first
                self.stats.spilled_points = sum(p.read_bytes().count(b"\n") + 1 for p in existing)
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self._client = InfluxDBClient(url=config.url, token=config.token or "none", org=config.org,
                                      timeout=int(config.timeout_s * 1000))
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    # ---- producer side (ingest thread) ---------------------------------------------------------------

    def add(self, lines: list[str | None] | list[str]) -> None:
        count = 0
        for text in lines:
            if text:
                self._queue.append(text)
                count += 1
        self.stats.points_queued += count
        if len(self._queue) >= self.config.batch_size:
            self._wake.set()

    @property
    def backlog_points(self) -> int:
        """Points not yet in the database: queued plus spilled."""
        return len(self._queue) + self.stats.spilled_points

    def anomaly(self, ref: DeviceRef, device: Device, document: dict[str, Any]) -> None:
        tags = {**device_tags(device), "phase": document["phase"]}
        fields = {"score": float(document["score"]), "channels": ",".join(document.get("channels", [])),
                  "event_id": document.get("event_id", "")}
        self.add([line("anomaly", tags, fields, int(document["ts"] * 1e9))])

    def device_event(self, device: Device, document: dict[str, Any], ingestor: Ingestor) -> None:
        kind = document["type"]
        t_ns = int(document["ts"] * 1e9)
        if kind == "unit_produced":
            ref = device.ref
            tags = {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device,
                    "product_model": document.get("product_model") or device.capabilities.get("product_model"),
                    "product_revision": document.get("product_revision")
                    or device.capabilities.get("product_revision")}
            fields = {"good": int(bool(document.get("good", True))), "cycle_time": _float(document.get("cycle_time")),
                      "serial": document.get("serial"), "defect": document.get("defect")}
            self.add([line("unit", tags, fields, t_ns)])
        elif kind in ("job_started", "job_finished", "job_aborted"):
            kpis = ingestor.core.kpis(device.index)
            parts = document.get("parts") or []
            tags = {**device_tags(device), "material": document.get("material"),
                    "phase": "start" if kind == "job_started" else "finish"}
            fields = {"job_id": document.get("job_id"), "chamber_fill": _float(kpis.get("chamber_fill")),
                      "packing_density": _float(kpis.get("packing_density")),
                      "build_height_mm": _float(document.get("build_height_mm")),
                      "parts": sum(int(p.get("quantity", 1)) for p in parts) if parts else None}
            self.add([line("build", tags, fields, t_ns)])

    def fleet(self, summary: dict[str, Any]) -> None:
        kpis = summary["kpis"]
        fields = {"devices": int(summary["devices"]), "online": int(summary["online"]),
                  "utilization": _float(kpis.get("utilization")), "oee": _float(kpis.get("oee")),
                  "chamber_fill": _float(kpis.get("chamber_fill")), "anomalous": len(summary["anomalous"])}
        self.add([line("fleet", {"tenant": summary["tenant"]}, fields, int(summary["ts"] * 1e9))])

    def interval(self, service: TwinService, now: float) -> None:
        """Per device: channel means since the last interval, KPIs, channel scores; the twin's own counters."""
        ingestor = service.ingestor
        means, counts = ingestor.take_interval_means()
        now_ns = int(now * 1e9)
        lines: list[str | None] = []
        owned = service.cluster.owned_indices() if service.cluster is not None else None
        indices = [d.index for d in ingestor.registry.devices.values() if owned is None or d.index in owned]
        rows = service.state.kpi_rows(indices) if indices else {}
        for index in indices:
            device = ingestor.registry.by_index[index]
            tags = device_tags(device)
            names = ingestor.core.channels(index)
            if counts.shape[0] > index and counts[index, : len(names)].any():
                newest = int(ingestor.last_t[index, : len(names)].max())
                channel_fields = {name: float(means[index, slot]) for slot, name in enumerate(names)
                                  if counts[index, slot] > 0}
                telemetry_tags = {**tags, "product_model": device.capabilities.get("product_model"),
                                  "product_revision": device.capabilities.get("product_revision")}
                lines.append(line("telemetry", telemetry_tags, channel_fields, newest * 1000))
            kpis = rows[index]
            state = kpis.get("state")
            fields: dict[str, Any] = {key: _float(kpis.get(key)) for key in KPI_FIELDS}
            fields["state"] = int(state) if state is not None and math.isfinite(state) else None
            fields["online"] = int(device.online)
            lines.append(line("kpi", tags, fields, now_ns))
            scores = ingestor.core.channel_scores(index)
            if scores:
                lines.append(line("channel_score", tags, {k: float(v) for k, v in scores.items()}, now_ns))
        counters = ingestor.counters
        lines.append(line("twin_ops", {"worker": self.worker}, {
            "samples": counters.samples_accepted, "messages": counters.messages,
            "dead_letters": sum(counters.dead_letters.values()), "lag_s": float(service.lag_s)}, now_ns))
        self.add(lines)

    def historical(self, ingestor: Ingestor, means: list[tuple[int, int, int, float]]) -> None:
        """Telemetry points of replayed data, one per device and past interval."""
        by_point: dict[tuple[int, int], dict[str, float]] = {}
        for index, slot, t_us, mean in means:
            names = ingestor.core.channels(index)
            if slot < len(names):
                by_point.setdefault((index, t_us), {})[names[slot]] = mean
        lines: list[str | None] = []
        for (index, t_us), fields in by_point.items():
            device = ingestor.registry.by_index[index]
            tags = {**device_tags(device), "product_model": device.capabilities.get("product_model"),
                    "product_revision": device.capabilities.get("product_revision")}
            lines.append(line("telemetry", tags, fields, t_us * 1000))
        self.add(lines)

    # ---- writer thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="twin-influx", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (or spill it) and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._client.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue and the spill are empty (tests); False on timeout."""
        deadline = time.monotonic() + timeout
        self._next_retry = 0.0
        while time.monotonic() < deadline:
            self._wake.set()
            if not self._queue and self.stats.spilled_points == 0 and not self._sending:
                return True
            time.sleep(0.02)
        return False

    _sending = False

    def _take_batch(self) -> list[str]:
        queue = self._queue
        count = min(len(queue), self.config.batch_size)
        return [queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self._drain(stopping)
            except Exception:  # never let the writer die: the backlog stays spilled
                log.exception("influx writer cycle failed")
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
                self._send_with_retry(body, len(batch))
            finally:
                self._sending = False

    def _send(self, body: bytes) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._write_api.write(bucket=self.config.bucket, org=self.config.org, record=body,
                                   write_precision=cast(Any, WritePrecision.NS))
        except ApiException as exc:
            status = int(exc.status or 0)
            # 400/413/422: this batch can never be written. 401/403/404 are configuration problems
            # (token, bucket, URL) that an operator fixes: keep the data and retry.
            if status in (400, 413, 422):
                raise WriteRejected(f"{status}: {str(exc.body)[:300]}") from None
            raise ConnectionError(f"influx answered {status}") from None
        except (HTTPError, OSError) as exc:
            raise ConnectionError(str(exc)) from None

    def _send_with_retry(self, body: bytes, points: int) -> None:
        delay = self.config.retry_interval_s
        for attempt in range(self.config.max_retries + 1):
            try:
                self._send(body)
            except WriteRejected as exc:
                self._reject(body, points, str(exc))
                return
            except ConnectionError as exc:
                self.stats.write_errors += 1
                if attempt == self.config.max_retries or self._stop.is_set():
                    log.warning("influx write failed after %d attempts (%s): spilling", attempt + 1, exc)
                    self._spill(body, points)
                    self._go_down()
                    return
                self.stats.retries += 1
                time.sleep(min(delay, self.config.max_retry_delay_s))
                delay *= 2
                continue
            self.stats.points_written += points
            self.stats.batches_written += 1
            return

    def _go_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            self._delay = self.config.retry_interval_s
        self._next_retry = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.config.max_retry_delay_s)

    def _reject(self, body: bytes, points: int, reason: str) -> None:
        self.stats.rejected_points += points
        log.error("influx rejected a batch of %d points: %s", points, reason)
        if self.spill_dir is not None:
            path = self.spill_dir / "rejected" / f"{int(time.time() * 1000)}-{self._spill_seq}.lp"
            self._spill_seq += 1
            path.write_bytes(body)

    # ---- spill ------------------------------------------------------------------------------------------

    def _spill_queue(self) -> None:
        while self._queue:
            batch = self._take_batch()
            self._spill(("\n".join(batch)).encode(), len(batch))

    def _spill(self, body: bytes, points: int) -> None:
        self.stats.spilled_batches += 1
        if self.spill_dir is not None:
            path = self.spill_dir / f"{self._spill_seq:012d}.lp"
            self._spill_seq += 1
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(body)
            tmp.replace(path)
            self.stats.spilled_points += points
            return
        if self._memory_spill_bytes + len(body) > self.config.max_spill_bytes:
            self.stats.dropped_points += points
            log.error("influx backlog over %d bytes in memory: dropped %d points", self.config.max_spill_bytes,
                      points)
            return
        self._memory_spill.append(body)
        self._memory_spill_bytes += len(body)
        self.stats.spilled_points += points

    def _replay_one(self) -> bool:
        """Send the oldest spilled batch; True when it went through (or the spill is empty)."""
        if self.spill_dir is not None:
            files = sorted(self.spill_dir.glob("*.lp"))
            if not files:
                self._up()
                return True
            body = files[0].read_bytes()
        else:
            if not self._memory_spill:
                self._up()
                return True
            body = self._memory_spill[0]
        points = body.count(b"\n") + 1 if body else 0
        try:
            self._send(body)
        except WriteRejected as exc:
            self._reject(body, points, str(exc))
        except ConnectionError:
            self.stats.write_errors += 1
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
            log.info("influx is back after %.1f s; spill drained", time.time() - self.down_since)
        self.down_since = None
        self._delay = self.config.retry_interval_s
        self.stats.spilled_points = 0


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None

