"""OctoPrint adapter: polls the REST API (``X-Api-Key``) and maps printer and job state onto telemetry.

Endpoints (OctoPrint REST API): ``GET /api/printer`` (temperatures and state flags; HTTP 409 while no
printer is connected), ``GET /api/job`` (file, progress ``completion`` in percent, filament volume),
and for ``dispatch_job`` ``POST /api/files/local/{file}`` with ``{"command": "select", "print": true}``.

Mapping:

===============================  ============================================================
OctoPrint                        forgeline
===============================  ============================================================
unreachable, HTTP 409, Offline   ``state`` OFFLINE
flags.error / closedOrError      ERROR
flags.paused / pausing           PAUSED
flags.printing                   PRINTING, or HEATING while the tool is > 5 K below its target
                                 and the job has not progressed
operational                      IDLE
tool0 / bed / chamber .actual    ``nozzle_temp`` / ``bed_temp`` / ``chamber_temp`` (degC)
progress.completion (%)          ``layer_progress`` (ratio)
job start / end                  ``job_started`` / ``job_finished`` / ``job_aborted`` events,
                                 ``produced_total``/``good_total``/``scrap_total`` counters
===============================  ============================================================

Config (``type: octoprint``)::

    tenant: factory-a
    site: plant-a
    area: hall1
    device: mk4-07
    url: http://octopi.local        # the OctoPrint base URL
    api_key_file: octoprint.key     # or api_key: ...
    poll_s: 2
    timeout_s: 5
    technology: FDM
    materials: [PLA]
    build_volume_mm: [250, 210, 220]
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.device import DeviceInfo
from edge_agent.sources._http import HttpError, request_json
from edge_agent.sources._printer import JobTracker, job_tags, printer_info, read_secret
from edge_agent.sources.base import CommandError, DeviceAdapter, Sink
from forgeline.contract.vocabulary import DeviceState

log = logging.getLogger(__name__)


def map_state(printer: Mapping[str, Any] | None, job: Mapping[str, Any] | None) -> DeviceState:
    """The DeviceState of an OctoPrint ``/api/printer`` answer (None: not reachable or not connected)."""
    if printer is None:
        return DeviceState.OFFLINE
    state = printer.get("state") or {}
    flags = state.get("flags") or {}
    text = str(state.get("text", ""))
    if flags.get("error") or (flags.get("closedOrError") and not text.lower().startswith("offline")):
        return DeviceState.ERROR
    if flags.get("closedOrError") or not flags.get("operational", False):
        return DeviceState.OFFLINE
    if flags.get("paused") or flags.get("pausing"):
        return DeviceState.PAUSED
    if flags.get("printing") or flags.get("cancelling"):
        tool = (printer.get("temperature") or {}).get("tool0") or {}
        actual, target = tool.get("actual"), tool.get("target")
        completion = ((job or {}).get("progress") or {}).get("completion") or 0.0
        if isinstance(actual, int | float) and isinstance(target, int | float) and target > 0 \
                and actual < target - 5 and completion < 0.5:
            return DeviceState.HEATING
        return DeviceState.PRINTING
    return DeviceState.IDLE


class OctoPrintSource(DeviceAdapter):
    kind = "octoprint"

    def __init__(self, info: DeviceInfo, url: str, api_key: str | None, *, timeout_s: float = 5.0) -> None:
        super().__init__(info)
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.tracker = JobTracker(info.ref.device, job_tags(info))
        self.polls = 0
        self._lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        return {"X-Api-Key": self.api_key} if self.api_key else {}

    def _get(self, path: str) -> Any:
        return request_json("GET", f"{self.url}{path}", headers=self._headers(), timeout=self.timeout_s)

    def poll(self) -> tuple[DeviceState, dict[str, Any] | None, dict[str, Any] | None]:
        """One poll: (state, /api/printer answer or None, /api/job answer or None)."""
        printer: dict[str, Any] | None
        job: dict[str, Any] | None = None
        try:
            printer = self._get("/api/printer")
        except HttpError as exc:
            if exc.status in (401, 403):
                raise  # a wrong API key is a config problem, not an offline printer
            printer = None
            if exc.status != 409:  # 409: OctoPrint runs, the printer is not connected
                self._error(str(exc))
        try:
            job = self._get("/api/job")
        except HttpError as exc:
            if exc.status in (401, 403):
                raise
        return map_state(printer, job), printer, job

    def run(self, sink: Sink, stop: threading.Event) -> None:
        stream = sink.stream(self.info)
        index = {name: i for i, name in enumerate(self.info.channels)}
        while not stop.is_set():
            began = time.monotonic()
            try:
                state, printer, job = self.poll()
            except HttpError as exc:
                self._error(f"{exc} (check api_key)")
                state, printer, job = DeviceState.OFFLINE, None, None
            self.polls += 1
            now = time.time()
            t_us = int(now * 1_000_000)
            samples: list[tuple[int, float]] = [(index["state"], float(state))]
            temperatures = (printer or {}).get("temperature") or {}
            for source_key, channel in (("tool0", "nozzle_temp"), ("bed", "bed_temp"), ("chamber", "chamber_temp")):
                actual = (temperatures.get(source_key) or {}).get("actual")
                if isinstance(actual, int | float) and not isinstance(actual, bool):
                    samples.append((index[channel], float(actual)))
            progress = ((job or {}).get("progress") or {}).get("completion")
            ratio = min(1.0, max(0.0, float(progress) / 100.0)) if isinstance(progress, int | float) else None
            if ratio is not None:
                samples.append((index["layer_progress"], ratio))
            file = (((job or {}).get("job") or {}).get("file") or {}).get("name")
            volume = ((((job or {}).get("job") or {}).get("filament") or {}).get("tool0") or {}).get("volume")
            outcome = None
            if job is not None and state is DeviceState.IDLE and self.tracker.job is not None:
                job_state = str(job.get("state", "")).lower()
                outcome = "complete" if (ratio or 0) >= 0.999 else "cancelled" if "cancel" in job_state else None
            with self._lock:
                events = self.tracker.observe(state, file, ratio, outcome, now,
                                              volume if isinstance(volume, int | float) else None)
                counters = self.tracker.counters()
            for event in events:
                stream.event(event)
            samples += [(index[name], float(value)) for name, value in counters.items()]
            stream.extend([i for i, _ in samples], [t_us] * len(samples), [v for _, v in samples])
            period = 1.0 / self.rate_hz(self.info.key)
            stop.wait(max(0.0, period - (time.monotonic() - began)))

    def dispatch_job(self, device_key: str, job: Mapping[str, Any]) -> dict[str, Any]:
        """Select and print a file on the OctoPrint host: ``{"file": "x.gcode", "job_id": ..., "parts": [...]}``."""
        file = job.get("file")
        if not isinstance(file, str) or not file or ".." in file.split("/"):
            raise CommandError("dispatch_job on OctoPrint needs 'file': the name of a file on the printer")
        job_id = job.get("job_id") or f"{self.info.ref.device}-{file}"
        parts = job.get("parts") or []
        if not isinstance(job_id, str) or not isinstance(parts, list):
            raise CommandError("job_id must be a string and parts a list")
        path = urllib.parse.quote(file.strip("/"))
        try:
            request_json("POST", f"{self.url}/api/files/local/{path}", headers=self._headers(),
                         body={"command": "select", "print": True}, timeout=self.timeout_s)
        except HttpError as exc:
            raise CommandError(f"OctoPrint refused the job: {exc}") from None
        with self._lock:
            self.tracker.expect(file, job_id, [dict(p) for p in parts if isinstance(p, Mapping)])
        return {"job_id": job_id, "file": file, "started": True}

    def status(self) -> dict[str, Any]:
        return {"polls": self.polls, "errors": self.errors, "last_error": self.last_error}


def from_config(section: Any, base_dir: Path) -> OctoPrintSource:
    url = section.text("url")
    if not url.startswith(("http://", "https://")):
        raise section.error("url", f"must be an http:// or https:// URL, not {url!r}")
    api_key = read_secret(section, "api_key", base_dir)
    timeout = section.number("timeout_s", 5.0, positive=True, maximum=120)
    return OctoPrintSource(printer_info(section, "Prusa/OctoPrint"), url, api_key, timeout_s=timeout)
