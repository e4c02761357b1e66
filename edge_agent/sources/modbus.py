"""Modbus TCP adapter (pymodbus): polls holding or input registers from a tag map.

Each tag maps a channel to a register address, a type and a linear scale. Tags of one table that lie
close together are read in one request (at most 125 registers), so a PLC with twenty tags costs one
or two round trips per poll. A failed read reports ``state`` OFFLINE (when a ``state`` tag exists) or
nothing, and the client reconnects.

With a ``units`` section every increase of a counter tag between two polls becomes a
``unit_produced`` event, built from the same poll's values of the unit's tags (serial, pass/fail,
measurements) by the shared rules of :mod:`edge_agent.sources._units`. Units-only tags (a serial
number, a pass bit) are read with the others but not published as telemetry.

Config (``type: modbus``)::

    tenant: oven-plant
    site: plant1
    area: line1
    device: leak
    host: 192.168.10.21
    port: 502
    unit_id: 1                    # the Modbus device (slave) id
    poll_s: 1
    word_order: big               # for 32-bit types: big = high word first
    technology: line
    product_model: MW-20
    product_revision: B
    tags:
      state:          {address: 0, type: uint16}               # a DeviceState code
      door_leakage:   {address: 2, type: float32, table: input}
      cycle_time:     {address: 4, type: uint16, scale: 0.1}   # tenths of a second in the PLC
      produced_total: {address: 6, type: uint32}
    units:                        # optional: unit_produced events (see edge_agent/sources/_units.py)
      trigger: produced_total
      serial: {address: 20, type: uint32}
      serial_format: "MW-20-{:07d}"
      good: {address: 22, type: uint16}      # nonzero = passed
      cycle_time: cycle_time
      measurements: [door_leakage]
"""

from __future__ import annotations

import inspect
import logging
import math
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.device import DeviceInfo
from edge_agent.sources._units import StationAdapter, UnitSpec, check_product, parse_units
from edge_agent.sources.base import Sink
from forgeline.contract.vocabulary import DeviceState, Technology

log = logging.getLogger(__name__)

TYPES: dict[str, tuple[int, str]] = {  # name -> (registers, struct code)
    "uint16": (1, "H"), "int16": (1, "h"), "uint32": (2, "I"), "int32": (2, "i"), "float32": (2, "f"),
    "float64": (4, "d"),
}
TABLES = ("holding", "input")
MAX_READ = 125  # registers per request (Modbus limit)


@dataclass(frozen=True)
class Tag:
    channel: str
    address: int
    type: str = "uint16"
    table: str = "holding"
    scale: float = 1.0
    offset: float = 0.0

    @property
    def width(self) -> int:
        return TYPES[self.type][0]


def decode(registers: Sequence[int], tag_type: str, word_order: str = "big") -> float:
    """Decode 16-bit registers (big-endian bytes within a word) into a number.

    >>> decode([0x4148, 0x0000], "float32")
    12.5
    >>> decode([0x0000, 0x4148], "float32", "little"), decode([0xFFFF], "int16"), decode([1, 0], "uint32")
    (12.5, -1.0, 65536.0)
    """
    width, code = TYPES[tag_type]
    words = list(registers[:width])
    if word_order == "little":
        words.reverse()
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    return float(struct.unpack(f">{code}", raw)[0])


def plan_reads(tags: Sequence[Tag]) -> list[tuple[str, int, int, list[Tag]]]:
    """Group tags into requests: (table, start, count, tags), each at most MAX_READ registers.

    >>> [(t, s, c) for t, s, c, _ in plan_reads([Tag("a", 0), Tag("b", 10, "float32"), Tag("c", 300)])]
    [('holding', 0, 12), ('holding', 300, 1)]
    """
    reads: list[tuple[str, int, int, list[Tag]]] = []
    for table in TABLES:
        group: list[Tag] = []
        for tag in sorted((t for t in tags if t.table == table), key=lambda t: t.address):
            if group and tag.address + tag.width - group[0].address > MAX_READ:
                reads.append(_read(table, group))
                group = []
            group.append(tag)
        if group:
            reads.append(_read(table, group))
    return reads


def _read(table: str, group: list[Tag]) -> tuple[str, int, int, list[Tag]]:
    start = group[0].address
    end = max(t.address + t.width for t in group)
    return table, start, end - start, list(group)


class ModbusSource(StationAdapter):
    kind = "modbus"

    def __init__(self, info: DeviceInfo, host: str, port: int, tags: Sequence[Tag], *, unit_id: int = 1,
                 word_order: str = "big", timeout_s: float = 3.0, units: UnitSpec | None = None,
                 unit_tags: Sequence[Tag] = ()) -> None:
        super().__init__(info, units)
        self.host, self.port = host, port
        self.tags = list(tags)
        self.unit_id = unit_id
        self.word_order = word_order
        self.timeout_s = timeout_s
        self.reads = plan_reads([*self.tags, *unit_tags])  # units-only tags are read, not published
        self.polls = 0

    def poll(self, client: Any) -> list[tuple[int, float]]:
        """One poll of every tag: the samples of the channels (finite values only)."""
        index = {name: i for i, name in enumerate(self.info.channels)}
        return [(index[name], value) for name, value in self.read_tags(client).items()
                if name in index and math.isfinite(value)]

    def read_tags(self, client: Any) -> dict[str, float]:
        """Every tag's scaled value by name (channel, or ``units.<field>``); raises ConnectionError when a
        request fails."""
        unit = {self._unit_keyword: self.unit_id}
        values: dict[str, float] = {}
        for table, start, count, group in self.reads:
            read = client.read_holding_registers if table == "holding" else client.read_input_registers
            try:
                answer = read(start, count=count, **unit)
            except Exception as exc:  # pymodbus raises its own ModbusException family and OSError
                raise ConnectionError(f"reading {count} {table} registers at {start}: {exc}") from None
            if answer.isError():
                raise ConnectionError(f"reading {count} {table} registers at {start}: {answer}")
            registers = answer.registers
            for tag in group:
                at = tag.address - start
                value = decode(registers[at : at + tag.width], tag.type, self.word_order)
                values[tag.channel] = value * tag.scale + tag.offset
        return values

    def run(self, sink: Sink, stop: threading.Event) -> None:
        from pymodbus.client import ModbusTcpClient

        stream = self.open_stream(sink)
        client = ModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s, retries=0)
        params = inspect.signature(client.read_holding_registers).parameters
        self._unit_keyword = "device_id" if "device_id" in params else "slave"  # renamed in pymodbus 3.10
        index = {name: i for i, name in enumerate(self.info.channels)}
        state_index = index.get("state")
        try:
            while not stop.is_set():
                began = time.monotonic()
                samples: list[tuple[int, float]] = []
                values: dict[str, float] = {}
                try:
                    if not client.connected and not client.connect():
                        raise ConnectionError(f"cannot connect to {self.host}:{self.port}")
                    values = self.read_tags(client)
                    samples = [(index[name], value) for name, value in values.items()
                               if name in index and math.isfinite(value)]
                except ConnectionError as exc:
                    self._error(str(exc))
                    client.close()
                    if state_index is not None:
                        samples = [(state_index, float(DeviceState.OFFLINE))]
                self.polls += 1
                now = time.time()
                if samples:
                    t_us = int(now * 1_000_000)
                    stream.extend([i for i, _ in samples], [t_us] * len(samples), [v for _, v in samples])
                if values:
                    self.report_units(stream, values, now)
                period = 1.0 / self.rate_hz(self.info.key)
                stop.wait(max(0.0, period - (time.monotonic() - began)))
        finally:
            client.close()

    _unit_keyword = "device_id"

    def status(self) -> dict[str, Any]:
        return {"polls": self.polls, "errors": self.errors, "last_error": self.last_error, **self.units_status()}


def device_info(section: Any, channels: Sequence[str], default_technology: str) -> DeviceInfo:
    """A DeviceInfo for an industrial source (OPC UA, Modbus) from its config section."""
    technology = section.text("technology", default_technology, choices=[t.value for t in Technology])
    custom_units = section.mapping_of_str("custom_units")
    try:
        return DeviceInfo(
            section.device_ref(), technology, tuple(channels), vendor=section.text("vendor", None),
            model=section.text("model", None), product_model=section.text("product_model", None),
            product_revision=section.text("product_revision", None), materials=section.strings("materials", ()),
            build_volume_mm=section.vec3("build_volume_mm", None),
            planned_cycle_time_s=section.number("planned_cycle_time_s", None, positive=True),
            rate_hz=1.0 / section.number("poll_s", 1.0, positive=True, maximum=3600),
            custom_units=custom_units, labels=section.mapping_of_str("labels"),
        )
    except ValueError as exc:
        raise section.error("tags", str(exc)) from None


def from_config(section: Any, base_dir: Path) -> ModbusSource:
    host = section.text("host")
    port = section.number("port", 502, minimum=1, maximum=65535, integer=True)
    unit_id = section.number("unit_id", 1, minimum=0, maximum=255, integer=True)
    word_order = section.text("word_order", "big", choices=("big", "little"))
    timeout = section.number("timeout_s", 3.0, positive=True, maximum=60)
    tags_section = section.section("tags", required=True)
    tags: list[Tag] = []
    for channel in list(tags_section.data):
        entry = tags_section.section(str(channel), required=True)
        tags.append(_tag(entry, str(channel)))
        entry.done()
    if not tags:
        raise section.error("tags", "needs at least one tag")
    channels = [t.channel for t in tags]
    units, unit_tags = parse_units(section, channels, _tag)
    info = device_info(section, channels, Technology.LINE.value)
    check_product(section, info, units)
    return ModbusSource(info, host, port, tags, unit_id=unit_id, word_order=word_order, timeout_s=timeout,
                        units=units, unit_tags=list(unit_tags.values()))


def _tag(entry: Any, name: str) -> Tag:
    """``{address, type?, table?, scale?, offset?}``: a channel of the tag map or a units-only tag."""
    return Tag(
        channel=name,
        address=entry.number("address", minimum=0, maximum=65535, integer=True),
        type=entry.text("type", "uint16", choices=tuple(TYPES)),
        table=entry.text("table", "holding", choices=TABLES),
        scale=entry.number("scale", 1.0),
        offset=entry.number("offset", 0.0),
    )

