"""The OctoPrint adapter against a small real HTTP server speaking OctoPrint's documented REST shapes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agent_support import RecordingSink

from edge_agent.config import ConfigError, Section
from edge_agent.sources.base import CommandError
from edge_agent.sources.octoprint import OctoPrintSource, from_config, map_state
from forgeline.contract.vocabulary import DeviceState

API_KEY = "0123456789ABCDEF"


class FakeOctoPrint:
    """OctoPrint's /api/printer, /api/job and /api/files/local/{file} with state the test sets."""

    def __init__(self) -> None:
        self.connected = True
        self.flags = {"operational": True, "printing": False, "paused": False, "pausing": False,
                      "cancelling": False, "error": False, "closedOrError": False, "ready": True, "sdReady": True}
        self.text = "Operational"
        self.tool = {"actual": 24.0, "target": 0.0, "offset": 0}
        self.bed = {"actual": 23.0, "target": 0.0, "offset": 0}
        self.file: str | None = None
        self.completion: float | None = None
        self.job_state = "Operational"
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorised(self) -> bool:
                if self.headers.get("X-Api-Key") != API_KEY:
                    self._send(403, {"error": "Forbidden"})
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                with fake.lock:
                    fake.requests.append(("GET", self.path, None))
                    if self.path == "/api/printer":
                        if not fake.connected:
                            self._send(409, {"error": "Printer is not operational"})
                            return
                        self._send(200, {"temperature": {"tool0": fake.tool, "bed": fake.bed},
                                         "sd": {"ready": True}, "state": {"text": fake.text, "flags": fake.flags}})
                    elif self.path == "/api/job":
                        self._send(200, {
                            "job": {"file": {"name": fake.file, "origin": "local", "size": 1468987},
                                    "estimatedPrintTime": 8811,
                                    "filament": {"tool0": {"length": 810, "volume": 5.36}} if fake.file else None},
                            "progress": {"completion": fake.completion, "filepos": 337942, "printTime": 276,
                                         "printTimeLeft": 912},
                            "state": fake.job_state})
                    else:
                        self._send(404, {"error": "Not found"})

            def do_POST(self) -> None:
                if not self._authorised():
                    return
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with fake.lock:
                    fake.requests.append(("POST", self.path, body))
                    if self.path.startswith("/api/files/local/") and body == {"command": "select", "print": True}:
                        name = self.path.rsplit("/", 1)[1]
                        if name == "missing.gcode":
                            self._send(404, {"error": "File not found"})
                            return
                        fake.file = name
                        fake.completion = 0.0
                        fake.set_printing()
                        self._send(204, None)
                    else:
                        self._send(400, {"error": "bad request"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_printing(self) -> None:
        self.flags.update(printing=True, ready=False)
        self.text = self.job_state = "Printing"
        self.tool = {"actual": 60.0, "target": 215.0, "offset": 0}

    def set_idle(self) -> None:
        self.flags.update(printing=False, paused=False, ready=True)
        self.text = self.job_state = "Operational"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def octoprint() -> Iterator[FakeOctoPrint]:
    fake = FakeOctoPrint()
    yield fake
    fake.close()


def make_source(url: str, key: str = API_KEY, poll_s: float = 0.05, **extra: Any) -> OctoPrintSource:
    section = Section({"tenant": "acme", "site": "s", "area": "a", "device": "mk4", "url": url, "api_key": key,
                       "poll_s": poll_s, "materials": ["PLA"], "build_volume_mm": [250, 210, 220], **extra},
                      "sources[0]")
    source = from_config(section, Path("."))
    section.done()
    return source


def run_until(source: OctoPrintSource, sink: RecordingSink, condition: Any, timeout: float = 10.0) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)


def test_states_temperatures_progress_and_job_lifecycle(octoprint: FakeOctoPrint) -> None:
    source = make_source(octoprint.url)
    sink = RecordingSink()
    stream = sink.stream(source.info)

    def states() -> list[int]:
        return [int(v) for v in stream.values("state")]

    run_until(source, sink, lambda: DeviceState.IDLE in states())
    assert stream.values("nozzle_temp")[-1] == 24.0 and stream.values("bed_temp")[-1] == 23.0

    reply = source.dispatch_job("acme/s/a/mk4", {"file": "bracket.gcode", "job_id": "R-9",
                                                  "parts": [{"part_id": "bracket", "volume_cm3": 5.4}]})
    assert reply == {"job_id": "R-9", "file": "bracket.gcode", "started": True}
    assert ("POST", "/api/files/local/bracket.gcode", {"command": "select", "print": True}) in octoprint.requests
    run_until(source, sink, lambda: DeviceState.HEATING in states())  # tool far below target, no progress
    with octoprint.lock:
        octoprint.tool = {"actual": 215.0, "target": 215.0, "offset": 0}
        octoprint.completion = 42.0
    run_until(source, sink, lambda: 0.42 in stream.values("layer_progress"))
    assert states()[-1] == DeviceState.PRINTING
    with octoprint.lock:
        octoprint.flags["paused"] = True
    run_until(source, sink, lambda: states()[-1] == DeviceState.PAUSED)
    with octoprint.lock:
        octoprint.flags["paused"] = False
        octoprint.completion = 100.0
    run_until(source, sink, lambda: 1.0 in stream.values("layer_progress"))
    with octoprint.lock:
        octoprint.set_idle()
    run_until(source, sink, lambda: any(e["type"] == "job_finished" for e in stream.events))
    started = next(e for e in stream.events if e["type"] == "job_started")
    assert started["job_id"] == "R-9" and started["parts"] == [{"part_id": "bracket", "volume_cm3": 5.4}]
    finished = next(e for e in stream.events if e["type"] == "job_finished")
    assert finished["job_id"] == "R-9"
    assert stream.values("produced_total")[-1] == 1 and stream.values("good_total")[-1] == 1


def test_a_job_started_at_the_printer_and_cancelled_is_reported(octoprint: FakeOctoPrint) -> None:
    source = make_source(octoprint.url)
    sink = RecordingSink()
    stream = sink.stream(source.info)
    with octoprint.lock:
        octoprint.file, octoprint.completion = "vase.gcode", 10.0
        octoprint.set_printing()
        octoprint.tool = {"actual": 210.0, "target": 210.0, "offset": 0}
    run_until(source, sink, lambda: any(e["type"] == "job_started" for e in stream.events))
    started = next(e for e in stream.events if e["type"] == "job_started")
    assert started["parts"][0]["volume_cm3"] == 5.36  # from the filament volume OctoPrint estimates
    with octoprint.lock:
        octoprint.set_idle()
        octoprint.job_state = "Cancelling"
    run_until(source, sink, lambda: any(e["type"] == "job_aborted" for e in stream.events))
    assert stream.values("scrap_total")[-1] == 1


def test_unreachable_or_disconnected_printer_reports_offline(octoprint: FakeOctoPrint) -> None:
    with octoprint.lock:
        octoprint.connected = False
    source = make_source(octoprint.url)
    sink = RecordingSink()
    stream = sink.stream(source.info)
    run_until(source, sink, lambda: len(stream.values("state")) >= 2)
    assert set(stream.values("state")) == {float(DeviceState.OFFLINE)}
    dead = make_source("http://127.0.0.1:9")  # nothing listens there
    sink2 = RecordingSink()
    run_until(dead, sink2, lambda: len(sink2.stream(dead.info).values("state")) >= 2)
    assert set(sink2.stream(dead.info).values("state")) == {float(DeviceState.OFFLINE)}
    assert dead.status()["errors"] >= 2


def test_wrong_api_key_is_reported_not_crashed(octoprint: FakeOctoPrint) -> None:
    source = make_source(octoprint.url, key="wrong")
    sink = RecordingSink()
    run_until(source, sink, lambda: source.status()["errors"] >= 1)
    assert "403" in (source.status()["last_error"] or "")
    with pytest.raises(CommandError, match="403"):
        source.dispatch_job("acme/s/a/mk4", {"file": "a.gcode"})


def test_dispatch_errors(octoprint: FakeOctoPrint) -> None:
    source = make_source(octoprint.url)
    with pytest.raises(CommandError, match="404"):
        source.dispatch_job("acme/s/a/mk4", {"file": "missing.gcode"})
    with pytest.raises(CommandError, match="needs 'file'"):
        source.dispatch_job("acme/s/a/mk4", {"file": "../etc/passwd"})


def test_state_mapping_table() -> None:
    def printer(**flags: bool) -> dict[str, Any]:
        return {"state": {"text": "x", "flags": {"operational": True, **flags}}, "temperature": {}}

    assert map_state(None, None) is DeviceState.OFFLINE
    assert map_state(printer(), None) is DeviceState.IDLE
    assert map_state(printer(printing=True), None) is DeviceState.PRINTING
    assert map_state(printer(printing=True, paused=True), None) is DeviceState.PAUSED
    assert map_state(printer(error=True), None) is DeviceState.ERROR
    assert map_state({"state": {"text": "Offline", "flags": {"closedOrError": True}}}, None) is DeviceState.OFFLINE


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sources\[0\].url: must be an http"):
        from_config(Section({"tenant": "a", "site": "s", "area": "x", "device": "d", "url": "ftp://x"},
                            "sources[0]"), Path("."))
    with pytest.raises(ConfigError, match=r"sources\[0\].device: required"):
        from_config(Section({"tenant": "a", "site": "s", "area": "x", "url": "http://x"}, "sources[0]"), Path("."))


def test_job_events_carry_the_material_and_the_configured_process_profile_version() -> None:
    """Issue 7: print jobs carry material and process profile version, so the loop compares versions."""
    from forgeline.contract import schemas
    from forgeline.contract.topics import DeviceRef
    from forgeline.loop.intake import LoopStore

    source = make_source("http://127.0.0.1:9", product_model="PLA-fine", product_revision="3")
    assert (source.info.product_model, source.info.product_revision) == ("PLA-fine", "3")  # in the birth too
    tracker = source.tracker
    events = tracker.observe(DeviceState.PRINTING, "a.gcode", 0.1, None, 1.0)
    events += tracker.observe(DeviceState.IDLE, "a.gcode", 1.0, "complete", 2.0)
    events += tracker.observe(DeviceState.PRINTING, "b.gcode", 0.1, None, 3.0)
    events += tracker.observe(DeviceState.IDLE, "b.gcode", 0.5, "cancelled", 4.0)
    assert [e["type"] for e in events] == ["job_started", "job_finished", "job_started", "job_aborted"]
    assert all((e["material"], e["product_model"], e["product_revision"]) == ("PLA", "PLA-fine", "3")
               for e in events)
    store = LoopStore()
    topic = DeviceRef("acme", "s", "a", "mk4").event_topic
    assert [store.ingest(topic, schemas.dumps(e)) for e in events] == ["status", "unit", "status", "unit"]
    revision = store.model("acme", "PLA-fine").revisions["3"]
    assert (revision.units, revision.good) == (2, 1)
    plain = make_source("http://127.0.0.1:9").tracker.observe(DeviceState.PRINTING, "c.gcode", 0.1, None, 5.0)
    assert plain[0]["material"] == "PLA" and "product_model" not in plain[0]
    with pytest.raises(ConfigError, match="together"):
        make_source("http://127.0.0.1:9", product_revision="3")
    with pytest.raises(ConfigError, match="invalid product_model"):
        make_source("http://127.0.0.1:9", product_model="PLA fine", product_revision="3")
