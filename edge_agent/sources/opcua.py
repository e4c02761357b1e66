"""OPC UA adapter (asyncua client): data-change subscriptions on the nodes of a tag map.

The server pushes a value when it changes (sampled at ``sampling_interval_ms``, published every
``publishing_interval_ms``); each becomes a sample at the server's source timestamp (the agent's
clock when the server gives none). Values can be scaled, and a ``state`` tag can be translated from
the PLC's own codes with ``state_map``. When the connection is lost the device reports ``state``
OFFLINE (if it has a ``state`` tag) and the client reconnects with a growing delay.

With a ``units`` section every increase of a counter tag becomes a ``unit_produced`` event: when the
counter's data change arrives, the unit's nodes (serial, pass/fail, measurements) are read in one
Read request and handed to the shared rules of :mod:`edge_agent.sources._units`.

Config (``type: opcua``)::

    tenant: oven-plant
    site: plant1
    area: line1
    device: power
    url: opc.tcp://192.168.10.30:4840
    username: agent                      # optional
    password_file: opcua.password
    security: Basic256Sha256,SignAndEncrypt,client-cert.der,client-key.pem   # optional, asyncua format
    publishing_interval_ms: 500
    sampling_interval_ms: 100
    technology: line
    product_model: MW-20
    product_revision: B
    tags:
      state:            {node: "ns=2;s=Power.State", state_map: {0: offline, 1: idle, 2: producing, 3: error}}
      magnetron_power:  "ns=2;s=Power.MagnetronW"           # a node id alone
      cavity_temp_rise: {node: "ns=2;s=Power.RiseCentiK", scale: 0.01}
      produced_total:   "ns=2;s=Power.Produced"
    units:                               # optional: unit_produced events (see edge_agent/sources/_units.py)
      trigger: produced_total
      serial: {node: "ns=2;s=Power.Serial"}   # a string, or a number with serial_format
      good: {node: "ns=2;s=Power.UnitOk"}
      measurements: [magnetron_power, cavity_temp_rise]
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_agent.sources._printer import read_secret
from edge_agent.sources._units import StationAdapter, UnitSpec, check_product, parse_units
from edge_agent.sources.base import DeviceStream, Sink
from edge_agent.sources.modbus import device_info
from forgeline.contract.vocabulary import DeviceState, Technology

log = logging.getLogger(__name__)

STATE_NAMES = {s.name.lower(): s for s in DeviceState} | {"producing": DeviceState.PRINTING}


@dataclass(frozen=True)
class OpcTag:
    channel: str
    node: str
    scale: float = 1.0
    offset: float = 0.0
    state_map: Mapping[int, DeviceState] = field(default_factory=dict)

    def convert(self, value: Any) -> float | None:
        """The channel value of an OPC UA value (None for one that is not a number)."""
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float):
            return None
        if self.state_map:
            mapped = self.state_map.get(int(value))
            return float(mapped) if mapped is not None else None
        result = float(value) * self.scale + self.offset
        return result if math.isfinite(result) else None

    def unit_value(self, value: Any) -> Any:
        """A value for a unit's fields: text as it is (a serial, a defect name), numbers converted."""
        return value.strip() if isinstance(value, str) else self.convert(value)


class _Handler:
    """asyncua's data-change callback: turns notifications into samples."""

    def __init__(self, source: OpcUaSource, stream: DeviceStream, tags_by_node: Mapping[str, OpcTag]) -> None:
        self.source = source
        self.stream = stream
        self.tags_by_node = tags_by_node
        self.index = {name: i for i, name in enumerate(stream.info.channels)}
        # (counter value, time) of each data change of the unit counter, read by the unit reader task
        self.unit_counts: asyncio.Queue[tuple[float, float]] = asyncio.Queue()

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        tag = self.tags_by_node.get(node.nodeid.to_string())
        if tag is None:
            return
        value = tag.convert(val)
        if value is None:
            self.source.rejected += 1
            return
        stamp = getattr(getattr(getattr(data, "monitored_item", None), "Value", None), "SourceTimestamp", None)
        t_s = stamp.timestamp() if isinstance(stamp, datetime) else time.time()
        self.source.notifications += 1
        self.stream.add(self.index[tag.channel], int(t_s * 1_000_000), value)
        if self.source.units is not None and tag.channel == self.source.units.trigger:
            self.unit_counts.put_nowait((value, t_s))


class OpcUaSource(StationAdapter):
    kind = "opcua"

    def __init__(self, info: Any, url: str, tags: Sequence[OpcTag], *, username: str | None = None,
                 password: str | None = None, security: str | None = None, publishing_interval_ms: float = 500,
                 sampling_interval_ms: float = 100, timeout_s: float = 5.0, units: UnitSpec | None = None,
                 unit_tags: Mapping[str, OpcTag] | None = None) -> None:
        super().__init__(info, units)
        self.url = url
        self.tags = list(tags)
        self.units = units
        by_name = {tag.channel: tag for tag in self.tags} | dict(unit_tags or {})
        # what is read for a unit when the counter changes: channels of the tag map and units-only tags
        self.unit_reads = {key: by_name[key] for key in units.reads} if units is not None else {}
        self.username = username
        self.password = password
        self.security = security
        self.publishing_interval_ms = publishing_interval_ms
        self.sampling_interval_ms = sampling_interval_ms
        self.timeout_s = timeout_s
        self.connects = 0
        self.notifications = 0
        self.rejected = 0

    def run(self, sink: Sink, stop: threading.Event) -> None:
        stream = self.open_stream(sink)
        asyncio.run(self._main(stream, stop))

    def _offline(self, stream: DeviceStream) -> None:
        if "state" in self.info.channels:
            stream.add(self.info.channels.index("state"), int(time.time() * 1_000_000), float(DeviceState.OFFLINE))

    async def _main(self, stream: DeviceStream, stop: threading.Event) -> None:
        from asyncua import Client

        backoff = 0.5
        while not stop.is_set():
            client = Client(self.url, timeout=self.timeout_s)
            if self.username:
                client.set_user(self.username)
            if self.password:
                client.set_password(self.password)
            try:
                if self.security:
                    await client.set_security_string(self.security)
                await client.connect()
            except Exception as exc:  # OSError, TimeoutError, asyncua's UaError family
                self._error(f"cannot connect to {self.url}: {type(exc).__name__}: {exc}")
                self._offline(stream)
                await self._sleep(stop, backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            self.connects += 1
            try:
                nodes = [client.get_node(tag.node) for tag in self.tags]
                handler = _Handler(self, stream, {n.nodeid.to_string(): t for n, t in zip(nodes, self.tags,
                                                                                         strict=True)})
                subscription = await client.create_subscription(self.publishing_interval_ms, handler)
                from asyncua import ua

                results = await subscription.subscribe_data_change(
                    nodes, sampling_interval=ua.Double(self.sampling_interval_ms))
                for tag, result in zip(self.tags, results if isinstance(results, list) else [results], strict=False):
                    if not isinstance(result, int):
                        self._error(f"tag {tag.channel} ({tag.node}) not subscribed: {result}")
                reader = asyncio.create_task(self._read_units(client, handler.unit_counts, stream))
                try:
                    while not stop.is_set():
                        await self._sleep(stop, 0.5)
                        await client.check_connection()
                        if reader.done():
                            reader.result()  # raises what ended it
                finally:
                    reader.cancel()
            except Exception as exc:
                if not stop.is_set():
                    self._error(f"connection to {self.url} lost: {type(exc).__name__}: {exc}")
                    self._offline(stream)
            finally:
                try:
                    await asyncio.wait_for(client.disconnect(), self.timeout_s)
                except Exception:
                    pass

    async def _read_units(self, client: Any, counts: asyncio.Queue[tuple[float, float]], stream: DeviceStream) -> None:
        """Per data change of the unit counter: read the unit's nodes in one request, then apply the rules."""
        if self.units is None:
            return
        nodes = [client.get_node(tag.node) for tag in self.unit_reads.values()]
        while True:
            count, t_s = await counts.get()
            snapshot: dict[str, Any] = {self.units.trigger: count}
            if nodes:
                try:
                    results = await client.read_attributes(nodes)
                except Exception as exc:  # the unit goes unlinked (no serial); the connection check reconnects
                    self._error(f"reading the unit tags: {type(exc).__name__}: {exc}")
                    results = []
                for (key, tag), result in zip(self.unit_reads.items(), results, strict=False):
                    good = result.StatusCode.is_good() and result.Value is not None
                    snapshot[key] = tag.unit_value(result.Value.Value) if good else None
            self.report_units(stream, snapshot, t_s)

    @staticmethod
    async def _sleep(stop: threading.Event, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, seconds))

    def status(self) -> dict[str, Any]:
        return {"connects": self.connects, "errors": self.errors, "notifications": self.notifications,
                "rejected": self.rejected, "last_error": self.last_error, **self.units_status()}


def from_config(section: Any, base_dir: Path) -> OpcUaSource:
    url = section.text("url")
    if not url.startswith("opc.tcp://"):
        raise section.error("url", f"must be an opc.tcp:// URL, not {url!r}")
    tags_section = section.section("tags", required=True)
    tags: list[OpcTag] = []
    for channel in list(tags_section.data):
        raw = tags_section.raw(str(channel))
        if isinstance(raw, str):
            tags.append(OpcTag(str(channel), raw))
            continue
        entry = tags_section.section(str(channel), required=True)
        state_map: dict[int, DeviceState] = {}
        mapping = entry.raw("state_map", {})
        if not isinstance(mapping, Mapping):
            raise entry.error("state_map", "must map PLC codes to states")
        for code, name in mapping.items():
            if not isinstance(code, int) or str(name).lower() not in STATE_NAMES:
                raise entry.error("state_map", f"{code!r}: {name!r} must map an integer to one of "
                                               f"{', '.join(sorted(STATE_NAMES))}")
            state_map[code] = STATE_NAMES[str(name).lower()]
        if state_map and channel != "state":
            raise entry.error("state_map", "only the 'state' tag takes a state_map")
        tags.append(OpcTag(str(channel), entry.text("node"), entry.number("scale", 1.0), entry.number("offset", 0.0),
                           state_map))
        entry.done()
    if not tags:
        raise section.error("tags", "needs at least one tag")
    username = section.text("username", None)
    password = read_secret(section, "password", base_dir)
    if password is not None and username is None:
        raise section.error("password", "requires username")
    channels = [t.channel for t in tags]
    units, unit_tags = parse_units(section, channels, _unit_tag)
    info = device_info(section, channels, Technology.LINE.value)
    check_product(section, info, units)
    return OpcUaSource(
        info, url, tags, username=username, password=password, security=section.text("security", None),
        publishing_interval_ms=section.number("publishing_interval_ms", 500.0, positive=True, maximum=60_000),
        sampling_interval_ms=section.number("sampling_interval_ms", 100.0, minimum=0, maximum=60_000),
        timeout_s=section.number("timeout_s", 5.0, positive=True, maximum=120), units=units, unit_tags=unit_tags,
    )


def _unit_tag(entry: Any, name: str) -> OpcTag:
    """A tag read only for units: ``{node, scale?, offset?}``."""
    return OpcTag(name, entry.text("node"), entry.number("scale", 1.0), entry.number("offset", 0.0))
