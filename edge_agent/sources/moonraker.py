"""Moonraker/Klipper adapter: HTTP for the first status query, the JSON-RPC websocket for live updates
and for starting jobs.

Protocol (Moonraker API): ``GET /printer/objects/query?print_stats&extruder&...`` answers
``{"result": {"eventtime": ..., "status": {...}}}``; on ``ws://host:port/websocket`` the agent calls
``printer.objects.subscribe`` (JSON-RPC 2.0) and then merges every ``notify_status_update``
notification into its copy of the status; ``notify_klippy_disconnected``/``_shutdown`` mark the
printer offline/in error. ``dispatch_job`` calls ``printer.print.start`` with a file name. An
``X-Api-Key`` header is sent when ``api_key`` is configured.

Mapping:

=====================================  =================================================
Klipper object                         forgeline
=====================================  =================================================
print_stats.state standby/complete/    ``state`` IDLE (complete/cancelled end the job)
cancelled
print_stats.state printing             PRINTING, or HEATING while the extruder is > 5 K
                                       below target and the print has not progressed
print_stats.state paused / error       PAUSED / ERROR
webhooks.state shutdown/error; lost    ERROR; OFFLINE
extruder / heater_bed .temperature     ``nozzle_temp`` / ``bed_temp``
chamber sensor .temperature            ``chamber_temp`` (``chamber_sensor`` option)
virtual_sdcard.progress                ``layer_progress``
print_stats.info.current_layer         ``layer``
=====================================  =================================================

Config (``type: moonraker``)::

    tenant: factory-a
    site: plant-a
    area: hall1
    device: voron-02
    url: http://voron.local:7125
    api_key_file: moonraker.key          # optional
    poll_s: 1                            # sampling period of the merged status
    chamber_sensor: temperature_sensor chamber
    technology: FDM
"""

from __future__ import annotations

import itertools
import json
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

OBJECTS = ("webhooks", "print_stats", "extruder", "heater_bed", "virtual_sdcard", "display_status")


def map_state(status: Mapping[str, Any] | None) -> tuple[DeviceState, str | None]:
    """(DeviceState, job outcome) of a merged Klipper status (None: Moonraker or Klippy not reachable)."""
    if status is None:
        return DeviceState.OFFLINE, None
    webhooks = str((status.get("webhooks") or {}).get("state", "ready"))
    if webhooks in ("shutdown", "error"):
        return DeviceState.ERROR, "error"
    if webhooks == "startup":
        return DeviceState.OFFLINE, None
    stats = status.get("print_stats") or {}
    state = str(stats.get("state", "standby"))
    if state == "printing":
        extruder = status.get("extruder") or {}
        actual, target = extruder.get("temperature"), extruder.get("target")
        progress = (status.get("virtual_sdcard") or {}).get("progress") or 0.0
        if isinstance(actual, int | float) and isinstance(target, int | float) and target > 0 \
                and actual < target - 5 and progress < 0.005:
            return DeviceState.HEATING, None
        return DeviceState.PRINTING, None
    if state == "paused":
        return DeviceState.PAUSED, None
    if state == "error":
        return DeviceState.ERROR, "error"
    if state in ("complete", "cancelled"):
        return DeviceState.IDLE, state
    return DeviceState.IDLE, None


def merge(status: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge a ``notify_status_update`` (only changed fields) into ``status``."""
    for name, fields in update.items():
        if isinstance(fields, Mapping):
            target = status.setdefault(name, {})
            for key, value in fields.items():
                if isinstance(value, Mapping) and isinstance(target.get(key), dict):
                    target[key].update(value)
                else:
                    target[key] = value


class MoonrakerSource(DeviceAdapter):
    kind = "moonraker"

    def __init__(self, info: DeviceInfo, url: str, api_key: str | None, *, chamber_sensor: str | None = None,
                 timeout_s: float = 5.0) -> None:
        super().__init__(info)
        self.url = url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        self.ws_url = f"{'wss' if parsed.scheme == 'https' else 'ws'}://{parsed.netloc}/websocket"
        self.api_key = api_key
        self.chamber_sensor = chamber_sensor
        self.timeout_s = timeout_s
        self.objects = (*OBJECTS, chamber_sensor) if chamber_sensor else OBJECTS
        self.tracker = JobTracker(info.ref.device, job_tags(info))
        self.status_doc: dict[str, Any] | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[threading.Event, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.connects = 0
        self.notifications = 0

    def _headers(self) -> dict[str, str]:
        return {"X-Api-Key": self.api_key} if self.api_key else {}

    # --- the connection ----------------------------------------------------------------------------

    def _query(self) -> dict[str, Any]:
        query = "&".join(urllib.parse.quote(name) for name in self.objects)
        answer = request_json("GET", f"{self.url}/printer/objects/query?{query}", headers=self._headers(),
                              timeout=self.timeout_s)
        status = ((answer or {}).get("result") or {}).get("status")
        if not isinstance(status, dict):
            raise HttpError("objects query answer has no result.status")
        return status

    def _connect(self) -> Any:
        from websockets.sync.client import connect as ws_connect

        ws = ws_connect(self.ws_url, additional_headers=self._headers(), open_timeout=self.timeout_s)
        request_id = next(self._ids)
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "printer.objects.subscribe",
                            "params": {"objects": dict.fromkeys(self.objects)}, "id": request_id}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == request_id:
                if "error" in message:
                    raise HttpError(f"printer.objects.subscribe failed: {message['error']}")
                status = (message.get("result") or {}).get("status") or {}
                with self._lock:
                    if self.status_doc is None:
                        self.status_doc = {}
                    merge(self.status_doc, status)
                return ws
            self._handle(message)

    def _handle(self, message: Mapping[str, Any]) -> None:
        method = message.get("method")
        if method == "notify_status_update":
            params = message.get("params") or []
            if params and isinstance(params[0], Mapping):
                self.notifications += 1
                with self._lock:
                    if self.status_doc is not None:
                        merge(self.status_doc, params[0])
        elif method in ("notify_klippy_disconnected", "notify_klippy_shutdown"):
            with self._lock:
                if self.status_doc is not None:
                    merge(self.status_doc, {"webhooks": {
                        "state": "shutdown" if method.endswith("shutdown") else "startup"}})
        elif method == "notify_klippy_ready":
            with self._lock:
                if self.status_doc is not None:
                    merge(self.status_doc, {"webhooks": {"state": "ready"}})
        elif "id" in message:
            waiter = self._pending.get(int(message["id"]))
            if waiter is not None:
                waiter[1].update(message)
                waiter[0].set()

    def run(self, sink: Sink, stop: threading.Event) -> None:
        stream = sink.stream(self.info)
        backoff = 0.5
        next_sample = time.monotonic()
        while not stop.is_set():
            try:
                status = self._query()
                with self._lock:
                    self.status_doc = status
                ws = self._connect()
            except Exception as exc:  # HTTP, socket, timeout, JSON and websockets' own errors alike
                self._error(f"cannot reach Moonraker at {self.url}: {type(exc).__name__}: {exc}")
                with self._lock:
                    self.status_doc = None
                self._sample(stream)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            self.connects += 1
            self._ws = ws
            try:
                while not stop.is_set():
                    now = time.monotonic()
                    if now >= next_sample:
                        self._sample(stream)
                        period = 1.0 / self.rate_hz(self.info.key)
                        next_sample = next_sample + period if now - next_sample < period else now + period
                    try:
                        raw = ws.recv(timeout=max(0.0, min(next_sample - time.monotonic(), 0.5)))
                    except TimeoutError:
                        continue
                    self._handle(json.loads(raw))
            except Exception as exc:  # the connection dropped: report offline, reconnect
                self._error(f"websocket to {self.ws_url} lost: {type(exc).__name__}: {exc}")
                with self._lock:
                    self.status_doc = None
                self._sample(stream)
            finally:
                self._ws = None
                try:
                    ws.close()
                except Exception:
                    pass

    def _sample(self, stream: Any) -> None:
        index = {name: i for i, name in enumerate(self.info.channels)}
        now = time.time()
        with self._lock:
            status = json.loads(json.dumps(self.status_doc)) if self.status_doc is not None else None
        state, outcome = map_state(status)
        samples: list[tuple[int, float]] = [(index["state"], float(state))]
        status = status or {}
        sensors = [("extruder", "nozzle_temp"), ("heater_bed", "bed_temp")]
        if self.chamber_sensor:
            sensors.append((self.chamber_sensor, "chamber_temp"))
        for name, channel in sensors:
            value = (status.get(name) or {}).get("temperature")
            if isinstance(value, int | float) and not isinstance(value, bool):
                samples.append((index[channel], float(value)))
        progress = (status.get("virtual_sdcard") or {}).get("progress")
        if progress is None:
            progress = (status.get("display_status") or {}).get("progress")
        ratio = min(1.0, max(0.0, float(progress))) if isinstance(progress, int | float) else None
        if ratio is not None:
            samples.append((index["layer_progress"], ratio))
        layer = ((status.get("print_stats") or {}).get("info") or {}).get("current_layer")
        if isinstance(layer, int | float) and not isinstance(layer, bool):
            samples.append((index["layer"], float(layer)))
        file = (status.get("print_stats") or {}).get("filename") or None
        with self._lock:
            events = self.tracker.observe(state, file, ratio, outcome, now)
            counters = self.tracker.counters()
        for event in events:
            stream.event(event)
        samples += [(index[name], float(value)) for name, value in counters.items()]
        t_us = int(now * 1_000_000)
        stream.extend([i for i, _ in samples], [t_us] * len(samples), [v for _, v in samples])

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        ws = self._ws
        if ws is None:
            raise CommandError(f"not connected to Moonraker at {self.url}")
        request_id = next(self._ids)
        done = threading.Event()
        answer: dict[str, Any] = {}
        self._pending[request_id] = (done, answer)
        try:
            ws.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}))
            if not done.wait(self.timeout_s):
                raise CommandError(f"Moonraker did not answer {method} within {self.timeout_s:.0f} s")
        finally:
            self._pending.pop(request_id, None)
        if "error" in answer:
            error = answer["error"]
            raise CommandError(f"Moonraker refused {method}: {error.get('message', error)}")
        return answer.get("result")

    def dispatch_job(self, device_key: str, job: Mapping[str, Any]) -> dict[str, Any]:
        """Start a file in Moonraker's gcodes root: ``{"file": "x.gcode", "job_id": ..., "parts": [...]}``."""
        file = job.get("file")
        if not isinstance(file, str) or not file or ".." in file.split("/"):
            raise CommandError("dispatch_job on Moonraker needs 'file': the name of a file in its gcodes root")
        job_id = job.get("job_id") or f"{self.info.ref.device}-{file}"
        parts = job.get("parts") or []
        if not isinstance(job_id, str) or not isinstance(parts, list):
            raise CommandError("job_id must be a string and parts a list")
        with self._lock:
            self.tracker.expect(file, job_id, [dict(p) for p in parts if isinstance(p, Mapping)])
        self._call("printer.print.start", {"filename": file})
        return {"job_id": job_id, "file": file, "started": True}

    def status(self) -> dict[str, Any]:
        return {"connects": self.connects, "errors": self.errors, "notifications": self.notifications,
                "last_error": self.last_error}


def from_config(section: Any, base_dir: Path) -> MoonrakerSource:
    url = section.text("url")
    if not url.startswith(("http://", "https://")):
        raise section.error("url", f"must be an http:// or https:// URL (Moonraker's port), not {url!r}")
    api_key = read_secret(section, "api_key", base_dir)
    timeout = section.number("timeout_s", 5.0, positive=True, maximum=120)
    chamber = section.text("chamber_sensor", None)
    return MoonrakerSource(printer_info(section, "Klipper/Moonraker"), url, api_key, chamber_sensor=chamber,
                           timeout_s=timeout)
