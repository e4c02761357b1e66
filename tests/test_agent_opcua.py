"""The OPC UA adapter against a real asyncua server started in the test."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import RecordingSink
from asyncua import Server, ua

from edge_agent.config import ConfigError, Section
from edge_agent.sources.opcua import OpcUaSource, from_config
from forgeline.broker import free_port
from forgeline.contract.vocabulary import DeviceState


def nid(name: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(ns))


class PlcServer:
    """An asyncua server with a 'Power' object (state code, magnetron power, temperature rise in cK)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"opc.tcp://127.0.0.1:{port}/forgeline/"
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.nodes: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "OPC UA server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(self.url)
        ns = await server.register_namespace("urn:forgeline:test")
        power = await server.nodes.objects.add_object(nid("Power", ns), "Power")
        self.nodes["state"] = await power.add_variable(nid("Power.State", ns), "State", 1, ua.VariantType.Int32)
        self.nodes["power"] = await power.add_variable(nid("Power.MagnetronW", ns), "MagnetronW", 800.0)
        self.nodes["rise"] = await power.add_variable(nid("Power.RiseCentiK", ns), "RiseCentiK", 1150,
                                                      ua.VariantType.Int32)
        self.nodes["text"] = await power.add_variable(nid("Power.Text", ns), "Text", "hello")
        self.ns = ns
        async with server:
            self.ready.set()
            while not self.stopped.is_set():
                await asyncio.sleep(0.05)

    def write(self, name: str, value: Any, variant: Any = None) -> None:
        node = self.nodes[name]
        value = ua.Variant(value, variant) if variant is not None else value
        asyncio.run_coroutine_threadsafe(node.write_value(value), self.loop).result(10)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(20)


@pytest.fixture(scope="module")
def plc() -> Iterator[PlcServer]:
    server = PlcServer(free_port())
    yield server
    server.stop()


def make_source(url: str, **extra: Any) -> OpcUaSource:
    section = Section({
        "tenant": "oven-plant", "site": "plant1", "area": "line1", "device": "power", "url": url,
        "publishing_interval_ms": 50, "sampling_interval_ms": 10, "timeout_s": 2,
        "product_model": "MW-20", "product_revision": "B",
        "tags": {
            "state": {"node": "ns=2;s=Power.State", "state_map": {0: "offline", 1: "idle", 2: "producing", 3: "error"}},
            "magnetron_power": "ns=2;s=Power.MagnetronW",
            "cavity_temp_rise": {"node": "ns=2;s=Power.RiseCentiK", "scale": 0.01},
            "x_label": "ns=2;s=Power.Text",
        },
        "custom_units": {"x_label": ""},
        **extra,
    }, "sources[0]")
    source = from_config(section, Path("."))
    section.done()
    return source


def wait(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_subscribed_tags_become_samples(plc: PlcServer) -> None:
    source = make_source(plc.url)
    sink = RecordingSink()
    stream = sink.stream(source.info)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        wait(lambda: bool(stream.values("magnetron_power")) and bool(stream.values("cavity_temp_rise")))
        assert stream.values("magnetron_power")[-1] == 800.0
        assert stream.values("cavity_temp_rise")[-1] == pytest.approx(11.5)
        assert stream.values("state")[-1] == DeviceState.IDLE
        plc.write("power", 812.5)
        plc.write("state", 2, ua.VariantType.Int32)
        wait(lambda: 812.5 in stream.values("magnetron_power"))
        wait(lambda: DeviceState.PRINTING in stream.values("state"))
        plc.write("state", 3, ua.VariantType.Int32)
        wait(lambda: DeviceState.ERROR in stream.values("state"))
        plc.write("state", 1, ua.VariantType.Int32)
        stamps = [t for c, t, _ in stream.samples if c == "magnetron_power"]
        assert all(abs(t / 1e6 - time.time()) < 60 for t in stamps)  # server source timestamps, µs
        assert stream.values("x_label") == [] and source.status()["rejected"] >= 1  # text is not a sample
    finally:
        stop.set()
        thread.join(10)
    assert source.status()["connects"] == 1


def test_unreachable_server_reports_offline() -> None:
    source = make_source(f"opc.tcp://127.0.0.1:{free_port()}/none/")
    sink = RecordingSink()
    stream = sink.stream(source.info)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        wait(lambda: float(DeviceState.OFFLINE) in stream.values("state"))
    finally:
        stop.set()
        thread.join(10)
    assert source.status()["errors"] >= 1 and "cannot connect" in (source.status()["last_error"] or "")


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"magnetron_power": {"node": "ns=2;s=X", "state_map": {0: "idle"}}}, "only the 'state' tag"),
        ({"state": {"node": "ns=2;s=X", "state_map": {0: "sleeping"}}}, r"tags.state.state_map: 0: 'sleeping'"),
        ({"state": {"nod": "ns=2;s=X"}}, r"tags.state.node: required \(is 'nod' a typo\?\)"),
        ({"power_w": "ns=2;s=X"}, "unknown channel 'power_w'"),
    ],
)
def test_tag_map_errors_name_the_key(tags: dict[str, Any], message: str) -> None:
    section = Section({"tenant": "t", "site": "s", "area": "a", "device": "d", "url": "opc.tcp://h:4840",
                       "tags": tags}, "sources[1]")
    with pytest.raises(ConfigError, match=message):
        from_config(section, Path("."))
        section.done()
