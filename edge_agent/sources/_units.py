"""Produced units from PLC tags: what the OPC UA and Modbus line-station adapters share.

A line station's PLC counts the units it has finished and keeps, for the last one, its serial number,
its pass/fail result and its test values. With a ``units`` section an adapter turns every increase of
that counter into a ``unit_produced`` event (schema ``event``) shaped like the line simulator's, so the
iteration loop (``forgeline/loop/intake.py``) gets first-pass yield, cycle times and measurements per
product model and revision from a real line too. Model and revision come from the source's config
(``product_model``, ``product_revision``) and follow ``set_config``.

Config (in an ``opcua`` or ``modbus`` source)::

    units:
      trigger: produced_total                 # a counter channel of `tags`: each increase by k is k units
      serial: {node: "ns=2;s=Power.Serial"}   # Modbus: {address: 20, type: uint32}
      serial_format: "MW-20-{:07d}"           # for a numeric serial (default: the number)
      good: {node: "ns=2;s=Power.UnitOk"}     # nonzero = passed; or `scrap: scrap_total` (a counter)
      defect: {node: "ns=2;s=Power.FailCode"} # 0 = none; a code (or an OPC UA string) naming the failure
      defect_map: {1: magnetron_power, 2: cavity_temp_rise}
      cycle_time: cycle_time                  # seconds
      measurements: [magnetron_power, cavity_temp_rise]

A field given as a string names a channel of ``tags`` (its value as published, scaled); a field given
as a mapping is a tag read only for units, in the adapter's tag syntax, and not published as telemetry
(a serial number or a pass bit is no catalog channel). ``trigger`` and ``measurements`` are channels.

The PLC handshake this assumes: the PLC writes a unit's tags before (or in the same scan as) it
increments the counter. The adapter reads them when it sees the counter change — Modbus from the same
poll, OPC UA with one Read of the unit's nodes when the counter's data change arrives.

Rules (:class:`UnitTracker`):

- The first counter reading after the agent starts is a baseline, not a unit (the agent cannot know
  what was built while it was away). After a reconnect the old baseline stays, so units built during a
  short outage count (see the next rule).
- An increase by k is k units, but only the last one's tags are still in the PLC. The adapter reports
  that one and counts the other k - 1 as ``units_unlinked``. It does not invent serials for them: a
  station downstream of a scrapping test does not see consecutive serials, and their pass/fail and
  test values are unknown — reporting them as good would inflate the first-pass yield.
- A decrease is a counter reset (a PLC restart, a wrapping 16-bit counter): a new baseline, no units
  (``counter_resets``). Non-numeric or NaN counter values are ignored.
- A unit is reported only with a serial (the loop files units by serial) and a known pass/fail result;
  a missing serial (empty string, 0, NaN, unreadable), a serial unchanged since the last unit (the PLC
  did not update it), or an unreadable result make it unlinked instead.

Every unlinked unit is also reported as an ``alarm`` event (``units_unlinked``: the running total) and
in the source's status, so a loop's unit counts are never short without a trace.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from edge_agent.device import DeviceInfo
from edge_agent.sources.base import CommandError, DeviceAdapter, DeviceStream, Sink
from forgeline.contract.topics import TopicError, check_ident

log = logging.getLogger(__name__)

PRODUCT_KEYS = ("product_model", "product_revision")
MAX_SERIAL = 64  # characters (a feedback message's serial has the same limit)

T = TypeVar("T")


@dataclass(frozen=True)
class UnitSpec:
    """Where each field of a unit comes from: a key of the adapter's value snapshot (a channel name, or
    ``units.<field>`` for a tag read only for units)."""

    trigger: str
    serial: str
    serial_format: str | None = None
    good: str | None = None
    scrap: str | None = None
    defect: str | None = None
    defect_map: Mapping[int, str] = field(default_factory=dict)
    cycle_time: str | None = None
    measurements: tuple[str, ...] = ()

    @property
    def reads(self) -> list[str]:
        """The snapshot keys a unit needs besides the trigger, each once."""
        keys = [self.serial, self.good, self.scrap, self.defect, self.cycle_time, *self.measurements]
        return list(dict.fromkeys(k for k in keys if k is not None and k != self.trigger))


def parse_units(section: Any, channels: Sequence[str],
                parse_tag: Callable[[Any, str], T]) -> tuple[UnitSpec | None, dict[str, T]]:
    """The ``units`` section of a source (None if it has none) and the units-only tags it declares.

    ``parse_tag(entry, name)`` reads one tag mapping in the adapter's syntax (OPC UA ``{node, ...}``,
    Modbus ``{address, type, ...}``) as a tag called ``name``.
    """
    if not section.has("units"):
        return None, {}
    units = section.section("units")
    own_tags: dict[str, T] = {}

    def channel(key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise units.error(key, f"must name a channel of tags, not {value!r}")
        if value not in channels:
            raise units.error(key, f"{value!r} is not a channel of tags (channels: {', '.join(channels)})")
        if value == "state":
            raise units.error(key, "the state code is not a unit value")
        return value

    def ref(key: str, required: bool = False) -> str | None:
        value = units.raw(key) if required else units.raw(key, None)
        if value is None:
            return None
        if isinstance(value, Mapping):
            entry = units.section(key)
            own_tags[f"units.{key}"] = parse_tag(entry, f"units.{key}")
            entry.done()
            return f"units.{key}"
        if not isinstance(value, str):
            raise units.error(key, f"must name a channel of tags or be a tag of its own (a mapping), not {value!r}")
        return channel(key, value)

    trigger = channel("trigger", units.raw("trigger"))
    serial = ref("serial", required=True)
    assert serial is not None
    serial_format = units.text("serial_format", None)
    if serial_format is not None:
        try:
            example = serial_format.format(1234567)
        except (IndexError, KeyError, ValueError) as exc:
            raise units.error("serial_format", f"{serial_format!r} cannot format a number: {exc}") from None
        if example == serial_format or not 0 < len(example) <= MAX_SERIAL:
            raise units.error("serial_format", f"must place the number in 1-{MAX_SERIAL} characters with {{}}, "
                                               f"like 'MW-20-{{:07d}}'")
    good = ref("good")
    scrap = ref("scrap")
    if good is not None and scrap is not None:
        raise units.error("scrap", "give good (a pass tag) or scrap (a scrap counter), not both")
    defect = ref("defect")
    defect_map: dict[int, str] = {}
    raw_map = units.raw("defect_map", {})
    if not isinstance(raw_map, Mapping):
        raise units.error("defect_map", "must map PLC failure codes to defect names")
    for code, name in raw_map.items():
        if isinstance(code, bool) or not isinstance(code, int) or code == 0 or not isinstance(name, str) or not name:
            raise units.error("defect_map", f"{code!r}: {name!r} must map a nonzero integer code to a name")
        defect_map[code] = name
    if defect_map and defect is None:
        raise units.error("defect_map", "requires defect (the tag holding the failure code)")
    cycle_time = ref("cycle_time")
    measurements = units.strings("measurements", ())
    for i, name in enumerate(measurements):
        channel(f"measurements[{i}]", name)
    if len(set(measurements)) != len(measurements):
        raise units.error("measurements", "lists a channel twice")
    units.done()
    spec = UnitSpec(trigger, serial, serial_format, good, scrap, defect, defect_map, cycle_time, tuple(measurements))
    return spec, own_tags


def check_product(section: Any, info: DeviceInfo, units: UnitSpec | None) -> None:
    """Units carry the product model and revision: with ``units`` both are required, and both must be
    names the loop accepts (they become topic levels of feedback and insights)."""
    for key in PRODUCT_KEYS:
        value = getattr(info, key)
        if value is None:
            if units is not None:
                raise section.error(key, "required with units (every unit carries product model and revision)")
            continue
        try:
            check_ident(value, key)
        except TopicError as exc:
            raise section.error(key, str(exc)) from None


def _number(value: Any) -> float | None:
    """A finite number, or None (missing, NaN, text)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class UnitTracker:
    """Turns snapshots of a station's unit tags into ``unit_produced`` events (rules: module docstring).

    :meth:`observe` is called with the values read when the counter was read (Modbus: every poll; OPC
    UA: every data change of the counter). Not thread-safe: one adapter thread calls it.

    >>> tracker = UnitTracker(UnitSpec("produced_total", "units.serial", serial_format="MW-{:04d}"))
    >>> from edge_agent.device import DeviceInfo
    >>> from forgeline.contract.topics import DeviceRef
    >>> info = DeviceInfo(DeviceRef("t", "s", "a", "leak"), "line", ("produced_total",), product_model="MW-20",
    ...                   product_revision="B")
    >>> tracker.observe({"produced_total": 41, "units.serial": 17}, 1.0, info)  # a baseline
    []
    >>> [e["serial"] for e in tracker.observe({"produced_total": 42, "units.serial": 18}, 2.0, info)]
    ['MW-0018']
    """

    def __init__(self, spec: UnitSpec) -> None:
        self.spec = spec
        self.count: float | None = None  # the counter's last reading (the baseline)
        self.scrap: float | None = None
        self.last_serial: str | None = None
        self.units = 0
        self.unlinked = 0
        self.resets = 0
        self._last_problem: str | None = None

    def observe(self, snapshot: Mapping[str, Any], ts: float, info: DeviceInfo) -> list[dict[str, Any]]:
        spec = self.spec
        scrap_before = self.scrap
        if spec.scrap is not None:
            scrap_now = _number(snapshot.get(spec.scrap))
            if scrap_now is not None:
                self.scrap = scrap_now
        count = _number(snapshot.get(spec.trigger))
        if count is None:
            return []
        previous, self.count = self.count, count
        if previous is None:
            return []
        if count < previous - 0.5:
            self.resets += 1
            self._problem(f"unit counter {spec.trigger} fell from {previous:g} to {count:g}: a reset, not units")
            return []
        produced = round(count - previous)
        if produced <= 0:
            self.count = previous  # a fraction of a unit (a scaled counter) waits for the rest
            return []
        serial = self._serial(snapshot.get(spec.serial))
        good = self._good(snapshot, produced, scrap_before)
        reasons: list[str] = []
        events: list[dict[str, Any]] = []
        if serial is None:
            reasons.append(f"no serial in {spec.serial} ({snapshot.get(spec.serial)!r})")
        elif serial == self.last_serial:
            reasons.append(f"serial {serial} unchanged since the last unit")
        elif good is None:
            reasons.append("pass/fail unknown")
        else:
            events.append(self._unit(snapshot, ts, info, serial, good))
        if serial is not None:
            self.last_serial = serial
        unlinked = produced - len(events)
        if unlinked:
            if produced > 1:
                reasons.insert(0, f"the counter rose by {produced} and only the last unit's tags are readable")
            self.unlinked += unlinked
            message = f"{unlinked} unit(s) not reported: {'; '.join(reasons)}"
            self._problem(message)
            events.append({"type": "alarm", "ts": round(ts, 6), "severity": "warning", "message": message,
                           "units_unlinked": self.unlinked, "product_model": info.product_model,
                           "product_revision": info.product_revision})
        return events

    def _unit(self, snapshot: Mapping[str, Any], ts: float, info: DeviceInfo, serial: str,
              good: bool) -> dict[str, Any]:
        spec = self.spec
        event: dict[str, Any] = {"type": "unit_produced", "ts": round(ts, 6), "serial": serial,
                                 "product_model": info.product_model, "product_revision": info.product_revision,
                                 "good": good}
        if not good:
            _, defect = self._defect(snapshot)
            if defect is not None:
                event["defect"] = defect
        if spec.cycle_time is not None:
            cycle_time = _number(snapshot.get(spec.cycle_time))
            if cycle_time is not None and cycle_time >= 0:
                event["cycle_time"] = round(cycle_time, 6)
        if spec.measurements:
            event["measurements"] = {name: _number(snapshot.get(name)) for name in spec.measurements}
        self.units += 1
        return event

    def _serial(self, value: Any) -> str | None:
        if isinstance(value, str):
            value = value.strip()
            return value if 0 < len(value) <= MAX_SERIAL else None
        if isinstance(value, bool):
            return None
        number = _number(value)
        if number is None or number <= 0 or number != int(number):
            return None  # 0 is what a PLC holds before its first serial
        text = self.spec.serial_format.format(int(number)) if self.spec.serial_format else str(int(number))
        return text if len(text) <= MAX_SERIAL else None

    def _defect(self, snapshot: Mapping[str, Any]) -> tuple[bool, str | None]:
        """(readable, defect name or None for no failure)."""
        if self.spec.defect is None:
            return False, None
        value = snapshot.get(self.spec.defect)
        if isinstance(value, str):
            value = value.strip()
            return True, (value[:MAX_SERIAL] or None)
        number = _number(value)
        if number is None:
            return False, None
        code = int(number)
        if code == 0:
            return True, None
        return True, self.spec.defect_map.get(code, f"code_{code}")

    def _good(self, snapshot: Mapping[str, Any], produced: int, scrap_before: float | None) -> bool | None:
        spec = self.spec
        if spec.good is not None:
            value = _number(snapshot.get(spec.good))
            return None if value is None else value != 0
        if spec.scrap is not None:
            if scrap_before is None or self.scrap is None:
                return None
            scrapped = round(self.scrap - scrap_before)
            if scrapped == 0:
                return True
            return False if scrapped == produced else None  # which of the k units failed is unknown
        if spec.defect is not None:
            readable, defect = self._defect(snapshot)
            return (defect is None) if readable else None
        return True

    def _problem(self, message: str) -> None:
        if message != self._last_problem:
            log.warning("%s", message)
        self._last_problem = message

    def status(self) -> dict[str, Any]:
        return {"units": self.units, "units_unlinked": self.unlinked, "counter_resets": self.resets}


class StationAdapter(DeviceAdapter):
    """A line station read from its PLC (OPC UA, Modbus): units from tags (optional) and the product
    model and revision it builds, which ``set_config`` changes (a new birth; later units carry it)."""

    def __init__(self, info: DeviceInfo, units: UnitSpec | None = None) -> None:
        super().__init__(info)
        self.unit_tracker = UnitTracker(units) if units is not None else None
        self._stream: DeviceStream | None = None
        self._info_lock = threading.Lock()

    def open_stream(self, sink: Sink) -> DeviceStream:
        """The device's stream (called by ``run``); announces a revision set before the source ran."""
        stream = sink.stream(self.info)
        with self._info_lock:
            self._stream = stream
            if stream.info != self.info:
                stream.announce(self.info)
        return stream

    def report_units(self, stream: DeviceStream, snapshot: Mapping[str, Any], ts: float) -> None:
        if self.unit_tracker is None:
            return
        with self._info_lock:
            info = self.info
        for event in self.unit_tracker.observe(snapshot, ts, info):
            stream.event(event)

    def set_config(self, device_key: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        product = {key: settings[key] for key in PRODUCT_KEYS if key in settings}
        for key, value in product.items():  # check everything before changing anything
            if not isinstance(value, str):
                raise CommandError(f"{key} must be a non-empty string, not {value!r}")
            try:
                check_ident(value, key)
            except TopicError as exc:
                raise CommandError(str(exc)) from None
        applied = super().set_config(device_key, {k: v for k, v in settings.items() if k not in PRODUCT_KEYS})
        if product:
            with self._info_lock:
                self.info = replace(self.info, **product)
                if self._stream is not None:
                    self._stream.announce(self.info)
            applied.update(product)
        return applied

    def units_status(self) -> dict[str, Any]:
        return self.unit_tracker.status() if self.unit_tracker is not None else {}
