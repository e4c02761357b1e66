"""The Moonraker adapter against a small real HTTP + websocket server speaking Moonraker's JSON-RPC API."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from agent_support import RecordingSink
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection, serve

from edge_agent.config import Section
from edge_agent.sources.base import CommandError
from edge_agent.sources.moonraker import MoonrakerSource, from_config, map_state, merge
from forgeline.contract.vocabulary import DeviceState

API_KEY = "moon-key-1"


class FakeMoonraker:
    """``GET /printer/objects/query`` over HTTP and a JSON-RPC ``/websocket`` on the same port."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {
            "webhooks": {"state": "ready", "state_message": "Printer is ready"},
            "print_stats": {"state": "standby", "filename": "", "print_duration": 0.0,
                            "info": {"current_layer": None, "total_layer": None}},
            "extruder": {"temperature": 25.1, "target": 0.0, "power": 0.0},
            "heater_bed": {"temperature": 24.0, "target": 0.0, "power": 0.0},
            "virtual_sdcard": {"progress": 0.0, "is_active": False},
            "display_status": {"progress": 0.0, "message": None},
            "temperature_sensor chamber": {"temperature": 31.5},
        }
        self.files = {"cube.gcode", "vase.gcode"}
        self.lock = threading.Lock()
        self.clients: list[ServerConnection] = []
        self.calls: list[dict[str, Any]] = []
        self.queries: list[str] = []

        def process_request(connection: ServerConnection, request: Request) -> Response | None:
            if request.headers.get("X-Api-Key") != API_KEY:
                return connection.respond(HTTPStatus.UNAUTHORIZED, json.dumps({"error": {"code": 401}}))
            if request.path.startswith("/printer/objects/query"):
                self.queries.append(request.path)
                names = [part.split("=")[0].replace("%20", " ") for part in request.path.split("?", 1)[1].split("&")]
                with self.lock:
                    status = {n: copy.deepcopy(self.status[n]) for n in names if n in self.status}
                return connection.respond(HTTPStatus.OK, json.dumps(
                    {"result": {"eventtime": time.monotonic(), "status": status}}))
            if request.path == "/websocket":
                return None  # go on with the websocket handshake
            return connection.respond(HTTPStatus.NOT_FOUND, json.dumps({"error": {"code": 404}}))

        def handler(connection: ServerConnection) -> None:
            with self.lock:
                self.clients.append(connection)
            for raw in connection:
                message = json.loads(raw)
                with self.lock:
                    self.calls.append(message)
                method, params, request_id = message["method"], message.get("params") or {}, message.get("id")
                if method == "printer.objects.subscribe":
                    with self.lock:
                        status = {n: copy.deepcopy(self.status[n]) for n in params["objects"] if n in self.status}
                    connection.send(json.dumps({"jsonrpc": "2.0", "id": request_id,
                                                "result": {"eventtime": time.monotonic(), "status": status}}))
                elif method == "printer.print.start":
                    if params.get("filename") not in self.files:
                        connection.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {
                            "code": 400, "message": f"File not found: {params.get('filename')}"}}))
                    else:
                        connection.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": "ok"}))
                        self.update({"print_stats": {"state": "printing", "filename": params["filename"]},
                                     "extruder": {"temperature": 80.0, "target": 240.0}})
                else:
                    connection.send(json.dumps({"jsonrpc": "2.0", "id": request_id,
                                                "error": {"code": -32601, "message": "Method not found"}}))

        self.server = serve(handler, "127.0.0.1", 0, process_request=process_request)
        self.port = self.server.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def update(self, changes: dict[str, Any]) -> None:
        """Change the printer and push a ``notify_status_update`` with only the changed fields."""
        with self.lock:
            merge(self.status, changes)
            clients = list(self.clients)
        note = json.dumps({"jsonrpc": "2.0", "method": "notify_status_update", "params": [changes, time.monotonic()]})
        for client in clients:
            try:
                client.send(note)
            except Exception:
                pass

    def notify(self, method: str) -> None:
        with self.lock:
            clients = list(self.clients)
        for client in clients:
            try:
                client.send(json.dumps({"jsonrpc": "2.0", "method": method}))
            except Exception:
                pass

    def drop_clients(self) -> None:
        with self.lock:
            clients, self.clients = self.clients, []
        for client in clients:
            client.close()

    def close(self) -> None:
        self.drop_clients()
        self.server.shutdown()


@pytest.fixture
def moonraker() -> Iterator[FakeMoonraker]:
    fake = FakeMoonraker()
    yield fake
    fake.close()


def make_source(url: str, key: str = API_KEY) -> MoonrakerSource:
    section = Section({"tenant": "acme", "site": "s", "area": "a", "device": "voron", "url": url, "api_key": key,
                       "poll_s": 0.05, "chamber_sensor": "temperature_sensor chamber"}, "sources[0]")
    source = from_config(section, Path("."))
    section.done()
    return source


class Running:
    def __init__(self, source: MoonrakerSource) -> None:
        self.source = source
        self.sink = RecordingSink()
        self.stream = self.sink.stream(source.info)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=source.run, args=(self.sink, self.stop), daemon=True)
        self.thread.start()

    def wait(self, condition: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.02)

    def state(self) -> int | None:
        values = self.stream.values("state")
        return int(values[-1]) if values else None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_status_updates_jobs_and_dispatch_over_json_rpc(moonraker: FakeMoonraker) -> None:
    running = Running(make_source(moonraker.url))
    try:
        running.wait(lambda: running.source.connects >= 1 and running.state() == DeviceState.IDLE)
        assert moonraker.queries and "print_stats" in moonraker.queries[0]
        assert running.stream.values("chamber_temp")[-1] == 31.5
        subscribe = next(c for c in moonraker.calls if c["method"] == "printer.objects.subscribe")
        assert "temperature_sensor chamber" in subscribe["params"]["objects"]

        reply = running.source.dispatch_job("acme/s/a/voron", {"file": "cube.gcode", "job_id": "R-3",
                                                                "parts": [{"part_id": "cube", "volume_cm3": 8.0}]})
        assert reply["started"] and reply["job_id"] == "R-3"
        running.wait(lambda: running.state() == DeviceState.HEATING)  # extruder 80 of 240 degC
        moonraker.update({"extruder": {"temperature": 240.0}, "virtual_sdcard": {"progress": 0.25},
                          "print_stats": {"info": {"current_layer": 12}}})
        running.wait(lambda: 0.25 in running.stream.values("layer_progress"))
        assert running.state() == DeviceState.PRINTING and 12.0 in running.stream.values("layer")
        assert 240.0 in running.stream.values("nozzle_temp")
        moonraker.update({"print_stats": {"state": "paused"}})
        running.wait(lambda: running.state() == DeviceState.PAUSED)
        moonraker.update({"print_stats": {"state": "printing"}, "virtual_sdcard": {"progress": 1.0}})
        moonraker.update({"print_stats": {"state": "complete"}})
        running.wait(lambda: any(e["type"] == "job_finished" for e in running.stream.events))
        started = next(e for e in running.stream.events if e["type"] == "job_started")
        assert started["job_id"] == "R-3" and started["parts"][0]["part_id"] == "cube"
        assert running.stream.values("good_total")[-1] == 1

        with pytest.raises(CommandError, match="File not found"):
            running.source.dispatch_job("acme/s/a/voron", {"file": "nope.gcode"})
    finally:
        running.close()


def test_klippy_shutdown_and_lost_connection(moonraker: FakeMoonraker) -> None:
    running = Running(make_source(moonraker.url))
    try:
        running.wait(lambda: running.state() == DeviceState.IDLE)
        moonraker.notify("notify_klippy_shutdown")
        running.wait(lambda: running.state() == DeviceState.ERROR)
        moonraker.notify("notify_klippy_ready")
        running.wait(lambda: running.state() == DeviceState.IDLE)
        connects = running.source.connects
        moonraker.drop_clients()  # the websocket goes away: offline, then a reconnect
        running.wait(lambda: running.source.connects > connects)
        assert float(DeviceState.OFFLINE) in running.stream.values("state")
        running.wait(lambda: running.state() == DeviceState.IDLE)
    finally:
        running.close()


def test_unreachable_and_unauthorised(moonraker: FakeMoonraker) -> None:
    for source in (make_source("http://127.0.0.1:9"), make_source(moonraker.url, key="wrong")):
        running = Running(source)
        try:
            running.wait(lambda running=running: len(running.stream.values("state")) >= 1)
            assert set(running.stream.values("state")) == {float(DeviceState.OFFLINE)}
        finally:
            running.close()
        assert source.status()["errors"] >= 1
    assert "401" in (source.status()["last_error"] or "")
    with pytest.raises(CommandError, match="not connected"):
        source.dispatch_job("acme/s/a/voron", {"file": "cube.gcode"})


def test_state_mapping() -> None:
    assert map_state(None) == (DeviceState.OFFLINE, None)
    assert map_state({"print_stats": {"state": "standby"}}) == (DeviceState.IDLE, None)
    assert map_state({"print_stats": {"state": "cancelled"}}) == (DeviceState.IDLE, "cancelled")
    assert map_state({"print_stats": {"state": "error"}}) == (DeviceState.ERROR, "error")
    assert map_state({"webhooks": {"state": "startup"}}) == (DeviceState.OFFLINE, None)
    assert map_state({"print_stats": {"state": "printing"}, "extruder": {"temperature": 200, "target": 200}}) == (
        DeviceState.PRINTING, None)

