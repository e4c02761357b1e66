"""The Modbus TCP adapter against a real pymodbus server started in the test."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import RecordingSink
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.config import ConfigError, Section
from edge_agent.sources.modbus import ModbusSource, from_config
from forgeline.broker import free_port
from forgeline.contract.vocabulary import DeviceState


def words(fmt: str, value: float) -> list[int]:
    raw = struct.pack(f">{fmt}", value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


class PlcServer:
    """A pymodbus TCP server on its own event loop in a thread, with registers the test sets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.registers = {"holding": [0] * 200, "input": [0] * 200}
        self.lock = threading.Lock()

        async def serve_registers(function_code: int, start_address: int, address: int, count: int,
                                  current_registers: list[int], set_values: Any) -> None:
            # The device answers from the registers this test sets (copied in on every request).
            table = {3: "holding", 4: "input"}.get(function_code)
            if table is not None:
                with self.lock:
                    current_registers[:] = self.registers[table][start_address : start_address + len(
                        current_registers)]

        def block(kind: DataType, value: Any) -> list[SimData]:
            return [SimData(0, count=200, values=value, datatype=kind)]

        self.device = SimDevice(3, simdata=(block(DataType.BITS, False), block(DataType.BITS, False),
                                            block(DataType.REGISTERS, 0), block(DataType.REGISTERS, 0)),
                                action=serve_registers)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.server: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve() -> None:
            self.server = ModbusTcpServer(self.device, address=("127.0.0.1", self.port))  # needs a running loop
            self.ready.set()
            await self.server.serve_forever()

        self.loop.run_until_complete(serve())

    def set(self, table: str, address: int, values: list[int]) -> None:
        with self.lock:
            self.registers[table][address : address + len(values)] = values

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop)
        fut.result(10)
        self.thread.join(10)


@pytest.fixture
def plc() -> Iterator[PlcServer]:
    server = PlcServer(free_port())
    yield server
    try:
        server.stop()
    except Exception:
        pass


def make_source(port: int, **extra: Any) -> ModbusSource:
    section = Section({
        "tenant": "oven-plant", "site": "plant1", "area": "line1", "device": "leak", "host": "127.0.0.1",
        "port": port, "unit_id": 3, "poll_s": 0.05, "product_model": "MW-20", "product_revision": "B",
        "tags": {
            "state": {"address": 0, "type": "uint16"},
            "door_leakage": {"address": 2, "type": "float32", "table": "input"},
            "cycle_time": {"address": 4, "type": "uint16", "scale": 0.1},
            "produced_total": {"address": 6, "type": "uint32"},
            "cavity_temp_rise": {"address": 150, "type": "int16", "scale": 0.01},
        },
        **extra,
    }, "sources[0]")
    source = from_config(section, Path("."))
    section.done()
    return source


def run_until(source: ModbusSource, sink: RecordingSink, condition: Any, timeout: float = 10.0) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"condition not reached; {source.status()}"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)


def test_tags_are_read_decoded_and_scaled(plc: PlcServer) -> None:
    plc.set("holding", 0, [int(DeviceState.PRINTING)])
    plc.set("input", 2, words("f", 0.375))
    plc.set("holding", 4, [183])
    plc.set("holding", 6, words("I", 70_001))
    plc.set("holding", 150, words("h", -250))
    source = make_source(plc.port)
    assert [(t, s, c) for t, s, c, _ in source.reads] == [("holding", 0, 8), ("holding", 150, 1), ("input", 2, 2)]
    sink = RecordingSink()
    stream = sink.stream(source.info)
    run_until(source, sink, lambda: len(stream.values("state")) >= 2)
    assert stream.values("state")[-1] == DeviceState.PRINTING
    assert stream.values("door_leakage")[-1] == 0.375
    assert stream.values("cycle_time")[-1] == pytest.approx(18.3)
    assert stream.values("produced_total")[-1] == 70_001
    assert stream.values("cavity_temp_rise")[-1] == pytest.approx(-2.5)
    assert source.info.product_revision == "B" and source.info.technology == "line"
    plc.set("holding", 6, words("I", 70_002))
    run_until(source, sink, lambda: 70_002 in stream.values("produced_total"))


def test_word_order_little(plc: PlcServer) -> None:
    plc.set("input", 2, list(reversed(words("f", 1.5))))
    source = make_source(plc.port, word_order="little")
    sink = RecordingSink()
    run_until(source, sink, lambda: bool(sink.stream(source.info).values("door_leakage")))
    assert sink.stream(source.info).values("door_leakage")[-1] == 1.5


def test_outage_reports_offline_and_recovers(plc: PlcServer) -> None:
    plc.set("holding", 0, [int(DeviceState.IDLE)])
    port = plc.port
    source = make_source(port)
    sink = RecordingSink()
    stream = sink.stream(source.info)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while DeviceState.IDLE not in stream.values("state"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        plc.stop()
        while DeviceState.OFFLINE not in stream.values("state"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        again = PlcServer(port)
        again.set("holding", 0, [int(DeviceState.MAINTENANCE)])
        try:
            while DeviceState.MAINTENANCE not in stream.values("state"):
                assert time.monotonic() < deadline + 10, source.status()
                time.sleep(0.02)
        finally:
            again.stop()
    finally:
        stop.set()
        thread.join(5)
    assert source.status()["errors"] >= 1


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({}, "tags: needs at least one tag"),
        ({"state": {"address": 70000}}, r"tags.state.address: must be at most 65535"),
        ({"state": {"address": 1, "type": "float16"}}, r"tags.state.type: must be one of"),
        ({"state": {"address": 1, "table": "coils"}}, r"tags.state.table: must be one of holding, input"),
        ({"state": {"adress": 1}}, r"tags.state.address: required \(is 'adress' a typo\?\)"),
        ({"temp_f": {"address": 1}}, "unknown channel 'temp_f'"),
    ],
)
def test_tag_map_errors_name_the_key(tags: dict[str, Any], message: str) -> None:
    section = Section({"tenant": "t", "site": "s", "area": "a", "device": "d", "host": "h", "tags": tags},
                      "sources[2]")
    with pytest.raises(ConfigError, match=message):
        from_config(section, Path("."))
        section.done()


# --- units ---------------------------------------------------------------------------------------------


def test_counter_increases_become_units(plc: PlcServer) -> None:
    # The leak tester's PLC: serial number (uint32) and pass bit next to the counter; the handshake
    # writes a unit's registers first and counts it last.
    plc.set("holding", 6, words("I", 5000))
    source = make_source(plc.port, units={
        "trigger": "produced_total", "serial": {"address": 20, "type": "uint32"}, "serial_format": "MW-20-{:07d}",
        "good": {"address": 22}, "defect": {"address": 23}, "defect_map": {3: "door_leakage"},
        "cycle_time": "cycle_time", "measurements": ["door_leakage"]})
    assert source.info.channels == ("state", "door_leakage", "cycle_time", "produced_total", "cavity_temp_rise")
    sink = RecordingSink()
    stream = sink.stream(source.info)
    tracker = source.unit_tracker
    assert tracker is not None

    def build(count: int, serial: int, ok: bool, leakage: float, defect: int = 0) -> None:
        plc.set("holding", 20, [*words("I", serial), int(ok), defect])
        plc.set("input", 2, words("f", leakage))
        plc.set("holding", 4, [180 + count % 10])
        plc.set("holding", 6, words("I", count))
        deadline = time.monotonic() + 10
        while tracker.count != count:
            assert time.monotonic() < deadline, source.status()
            time.sleep(0.01)

    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while tracker.count != 5000:  # the first poll: a baseline, not a unit
            assert time.monotonic() < deadline, source.status()
            time.sleep(0.01)
        build(5001, 1201, True, 0.25)
        build(5002, 1202, False, 1.75, defect=3)
        build(0, 1202, False, 1.75, defect=3)  # the PLC restarts: no negative units
        build(1, 1203, True, 0.5)
        build(2, 1203, True, 0.5)  # counted, but the serial was not updated: not reported as a unit
    finally:
        stop.set()
        thread.join(5)
    units = [e for e in stream.events if e["type"] == "unit_produced"]
    assert [(u["serial"], u["good"], u.get("defect"), u["measurements"]["door_leakage"], u["cycle_time"])
            for u in units] == [("MW-20-0001201", True, None, 0.25, pytest.approx(18.1)),
                                ("MW-20-0001202", False, "door_leakage", 1.75, pytest.approx(18.2)),
                                ("MW-20-0001203", True, None, 0.5, pytest.approx(18.1))]
    assert all(u["product_model"] == "MW-20" and u["product_revision"] == "B" for u in units)
    [alarm] = [e for e in stream.events if e["type"] == "alarm"]
    assert "serial MW-20-0001203 unchanged" in alarm["message"]
    assert source.status() | {"polls": 0} == {"polls": 0, "errors": 0, "last_error": None, "units": 3,
                                              "units_unlinked": 1, "counter_resets": 1}
    assert not any(c.startswith("units.") for c, _, _ in stream.samples)  # serial and pass bit: no telemetry
