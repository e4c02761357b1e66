"""The OPC UA adapter against a real asyncua server started in the test (units: also through a real
Mosquitto into the iteration loop's intake)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import RecordingSink
from asyncua import Server, ua
from conftest import Collector
from test_agent_mqtt import Requester

from edge_agent import Agent, BatchSettings, wait_connected
from edge_agent.config import ConfigError, Section, SpoolSettings
from edge_agent.sources.opcua import OpcUaSource, from_config
from forgeline.broker import free_port
from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef
from forgeline.contract.vocabulary import DeviceState
from forgeline.loop.intake import LoopStore
from forgeline.mqtt import MqttSettings


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
        # The unit handshake: the PLC writes the unit's serial, result and cycle time, then counts it.
        self.nodes["produced"] = await power.add_variable(nid("Power.Produced", ns), "Produced", 100,
                                                          ua.VariantType.UInt32)
        self.nodes["serial"] = await power.add_variable(nid("Power.Serial", ns), "Serial", "")
        self.nodes["ok"] = await power.add_variable(nid("Power.UnitOk", ns), "UnitOk", False)
        self.nodes["cycle"] = await power.add_variable(nid("Power.CycleTimeS", ns), "CycleTimeS", 0.0)
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


# --- units ---------------------------------------------------------------------------------------------

UNITS = {"trigger": "produced_total", "serial": {"node": "ns=2;s=Power.Serial"},
         "good": {"node": "ns=2;s=Power.UnitOk"}, "cycle_time": {"node": "ns=2;s=Power.CycleTimeS"},
         "measurements": ["magnetron_power", "cavity_temp_rise"]}


def make_unit_source(url: str, tenant: str = "oven-plant") -> OpcUaSource:
    section = Section({
        "tenant": tenant, "site": "plant1", "area": "line1", "device": "power", "url": url,
        "publishing_interval_ms": 50, "sampling_interval_ms": 10, "timeout_s": 2,
        "product_model": "MW-20", "product_revision": "B",
        "tags": {"magnetron_power": "ns=2;s=Power.MagnetronW",
                 "cavity_temp_rise": {"node": "ns=2;s=Power.RiseCentiK", "scale": 0.01},
                 "produced_total": "ns=2;s=Power.Produced"},
        "units": UNITS,
    }, "sources[0]")
    source = from_config(section, Path("."))
    section.done()
    return source


def build(plc: PlcServer, source: OpcUaSource, count: int, serial: str, ok: bool, power: float) -> None:
    """One unit through the PLC handshake: its tags first, then the counter."""
    plc.write("serial", serial)
    plc.write("ok", ok)
    plc.write("power", power)
    plc.write("cycle", 60.0 + count % 10)
    plc.write("produced", count, ua.VariantType.UInt32)
    tracker = source.unit_tracker
    assert tracker is not None
    wait(lambda: tracker.count == count)


def test_counter_increases_become_units_over_mqtt_and_into_the_loop(
    plc: PlcServer, mqtt_settings: MqttSettings, collect: Callable[..., Collector], tenant: str
) -> None:
    plc.write("produced", 100, ua.VariantType.UInt32)
    plc.write("serial", "MW-20-B0000")  # the unit counted before the agent started
    source = make_unit_source(plc.url, tenant)
    tracker = source.unit_tracker
    assert tracker is not None
    ref = DeviceRef(tenant, "plant1", "line1", "power")
    collector = collect(f"fl/v1/{tenant}/#")
    agent = Agent(mqtt_settings, [source], spool=SpoolSettings(":memory:"), batch=BatchSettings(100, 0.1)).start()
    try:
        assert wait_connected(agent)
        wait(lambda: tracker.count == 100)  # the first reading: a baseline, not a unit
        time.sleep(0.2)  # the command subscription follows the CONNACK
        build(plc, source, 101, "MW-20-B0001", True, 801.0)
        build(plc, source, 102, "MW-20-B0002", False, 702.0)
        build(plc, source, 103, "MW-20-B0003", True, 803.0)
        reply = Requester(collector, ref).send("set_config", {"args": {"product_revision": "C"}})
        assert reply["ok"] and reply["result"]["applied"] == {"product_revision": "C"}, reply
        build(plc, source, 104, "MW-20-C0004", True, 804.0)
        build(plc, source, 0, "MW-20-C0004", True, 804.0)  # the PLC restarts: a reset, no units
        build(plc, source, 1, "MW-20-C0005", True, 805.0)
        build(plc, source, 4, "MW-20-C0008", False, 808.0)  # three units between two readings
        collector.wait_for(lambda ms: sum(b'"unit_produced"' in m.payload for m in ms) >= 6)
        collector.wait_for(lambda ms: any(b'"alarm"' in m.payload for m in ms))
        status = source.status()
    finally:
        agent.stop()
    messages = collector.wait_for(lambda ms: any(b'"offline"' in m.payload for m in ms))
    events = [json.loads(m.payload) for m in messages if m.topic == ref.event_topic]
    for event in events:
        schemas.validate("event", event)
    units = [e for e in events if e["type"] == "unit_produced"]
    assert [(u["serial"], u["product_model"], u["product_revision"], u["good"]) for u in units] == [
        ("MW-20-B0001", "MW-20", "B", True), ("MW-20-B0002", "MW-20", "B", False), ("MW-20-B0003", "MW-20", "B", True),
        ("MW-20-C0004", "MW-20", "C", True), ("MW-20-C0005", "MW-20", "C", True), ("MW-20-C0008", "MW-20", "C", False),
    ]
    assert units[1]["measurements"] == {"magnetron_power": 702.0, "cavity_temp_rise": pytest.approx(11.5)}
    assert units[1]["cycle_time"] == 62.0
    stamps = [u["ts"] for u in units]
    assert stamps == sorted(stamps) and all(abs(t - time.time()) < 60 for t in stamps)  # the counter's timestamps
    [alarm] = [e for e in events if e["type"] == "alarm"]
    assert alarm["units_unlinked"] == 2 and alarm["product_revision"] == "C"
    assert status["units"] == 6 and status["units_unlinked"] == 2 and status["counter_resets"] == 1
    births = [json.loads(m.payload) for m in messages if m.topic == ref.status_topic and b'"online"' in m.payload]
    assert births[0]["product_revision"] == "B" and births[-1]["product_revision"] == "C"

    # The loop files them per serial and revision, exactly as it does the simulator's.
    store = LoopStore()
    outcome = store.ingest_all((m.topic, bytes(m.payload)) for m in messages)
    assert outcome["unit"] == 6 and outcome["rejected"] == 0, outcome
    model = store.model(tenant, "MW-20")
    b, c = model.revisions["B"], model.revisions["C"]
    assert (b.units, b.good, dict(b.defects)) == (3, 2, {"unspecified": 1})
    assert (c.units, c.good) == (3, 2)
    assert sorted(b.samples["measurement/magnetron_power"].values) == [702.0, 801.0, 803.0]
    assert model.units["MW-20-C0004"].revision == "C"
