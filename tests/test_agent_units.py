"""Units from PLC tags (``edge_agent/sources/_units.py``): the counter rules on their own, and the
``units`` config of the OPC UA and Modbus sources. The adapters against real servers are in
test_agent_opcua.py and test_agent_modbus.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from agent_support import RecordingSink

from edge_agent.config import ConfigError, Section
from edge_agent.device import DeviceInfo
from edge_agent.sources import modbus, opcua
from edge_agent.sources._units import UnitSpec, UnitTracker
from edge_agent.sources.base import CommandError
from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef

INFO = DeviceInfo(DeviceRef("t", "s", "line1", "leak"), "line", ("produced_total", "scrap_total", "door_leakage",
                                                                  "cycle_time"),
                  product_model="MW-20", product_revision="B")
SPEC = UnitSpec("produced_total", "units.serial", serial_format="MW-20-{:07d}", good="units.good",
                cycle_time="cycle_time", measurements=("door_leakage",))


def tags(count: float, serial: Any = None, good: Any = 1, leakage: Any = 0.5, **extra: Any) -> dict[str, Any]:
    return {"produced_total": count, "units.serial": serial, "units.good": good, "door_leakage": leakage,
            "cycle_time": 18.25, **extra}


def units(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for event in events:
        schemas.validate("event", event)
    return [e for e in events if e["type"] == "unit_produced"]


def test_an_increase_is_a_unit_with_the_tags_of_that_poll() -> None:
    tracker = UnitTracker(SPEC)
    assert tracker.observe(tags(100, 41), 1.0, INFO) == []  # the first reading is a baseline
    assert tracker.observe(tags(100, 41), 2.0, INFO) == []
    [unit] = units(tracker.observe(tags(101, 42, good=0, leakage=1.31), 3.0, INFO))
    assert unit == {"type": "unit_produced", "ts": 3.0, "serial": "MW-20-0000042", "product_model": "MW-20",
                    "product_revision": "B", "good": False, "cycle_time": 18.25,
                    "measurements": {"door_leakage": 1.31}}
    [unit] = units(tracker.observe(tags(102, 43, leakage=math.nan), 4.0, INFO))
    assert unit["good"] is True and unit["measurements"] == {"door_leakage": None}  # NaN is "no value"
    assert tracker.status() == {"units": 2, "units_unlinked": 0, "counter_resets": 0}


def test_a_drop_is_a_reset_not_negative_units() -> None:
    tracker = UnitTracker(SPEC)
    tracker.observe(tags(65534, 7), 1.0, INFO)
    assert len(units(tracker.observe(tags(65535, 8), 2.0, INFO))) == 1
    assert tracker.observe(tags(0, 8), 3.0, INFO) == []  # PLC restart or a 16-bit wrap: a new baseline
    [unit] = units(tracker.observe(tags(1, 9), 4.0, INFO))
    assert unit["serial"] == "MW-20-0000009"
    assert tracker.status() == {"units": 2, "units_unlinked": 0, "counter_resets": 1}


def test_nan_and_missing_counter_values_are_ignored() -> None:
    tracker = UnitTracker(SPEC)
    assert tracker.observe(tags(math.nan, 1), 1.0, INFO) == []
    assert tracker.observe({"units.serial": 1}, 1.5, INFO) == []
    assert tracker.observe(tags(5, 1), 2.0, INFO) == []  # still the baseline
    assert tracker.observe(tags(math.nan, 2), 3.0, INFO) == []
    assert [u["serial"] for u in units(tracker.observe(tags(6, 2), 4.0, INFO))] == ["MW-20-0000002"]


def test_a_jump_reports_the_last_unit_and_counts_the_others_unlinked() -> None:
    tracker = UnitTracker(SPEC)
    tracker.observe(tags(10, 5), 1.0, INFO)
    events = tracker.observe(tags(13, 8), 2.0, INFO)
    [unit] = units(events)
    assert unit["serial"] == "MW-20-0000008"  # the only unit whose tags are still in the PLC
    [alarm] = [e for e in events if e["type"] == "alarm"]
    assert alarm["units_unlinked"] == 2 and "rose by 3" in alarm["message"]
    assert alarm["product_revision"] == "B"
    assert tracker.status()["units_unlinked"] == 2


@pytest.mark.parametrize(("serial", "reason"), [(None, "no serial"), (0, "no serial"), (math.nan, "no serial"),
                                                 (12.5, "no serial"), ("  ", "no serial"), (41, "unchanged")])
def test_a_unit_without_a_usable_serial_is_unlinked(serial: Any, reason: str) -> None:
    tracker = UnitTracker(SPEC)
    tracker.observe(tags(1, 40), 1.0, INFO)
    units(tracker.observe(tags(2, 41), 2.0, INFO))
    events = tracker.observe(tags(3, serial), 3.0, INFO)
    assert units(events) == [] and reason in events[0]["message"]
    assert tracker.status() == {"units": 1, "units_unlinked": 1, "counter_resets": 0}


def test_string_serials_and_an_unreadable_result() -> None:
    tracker = UnitTracker(UnitSpec("produced_total", "units.serial", good="units.good"))
    tracker.observe(tags(0, "MW-20-A1"), 1.0, INFO)
    assert units(tracker.observe(tags(1, " MW-20-A2 "), 2.0, INFO))[0]["serial"] == "MW-20-A2"
    events = tracker.observe(tags(2, "MW-20-A3", good=None), 3.0, INFO)
    assert units(events) == [] and "pass/fail unknown" in events[0]["message"]


def test_good_from_a_scrap_counter() -> None:
    tracker = UnitTracker(UnitSpec("produced_total", "units.serial", scrap="scrap_total"))
    tracker.observe(tags(10, 1, scrap_total=3), 1.0, INFO)
    assert units(tracker.observe(tags(11, 2, scrap_total=3), 2.0, INFO))[0]["good"] is True
    assert units(tracker.observe(tags(12, 3, scrap_total=4), 3.0, INFO))[0]["good"] is False
    assert units(tracker.observe(tags(14, 5, scrap_total=6), 4.0, INFO))[0]["good"] is False  # both scrapped
    events = tracker.observe(tags(16, 7, scrap_total=7), 5.0, INFO)  # one of two scrapped: which one?
    assert units(events) == [] and events[0]["units_unlinked"] == 3


def test_defect_codes() -> None:
    spec = UnitSpec("produced_total", "units.serial", defect="units.defect", defect_map={2: "door_leakage"})
    tracker = UnitTracker(spec)
    tracker.observe(tags(0, 1, defect=0), 1.0, INFO)
    assert "defect" not in units(tracker.observe(tags(1, 2, **{"units.defect": 0}), 2.0, INFO))[0]
    unit = units(tracker.observe(tags(2, 3, **{"units.defect": 2}), 3.0, INFO))[0]
    assert unit["good"] is False and unit["defect"] == "door_leakage"  # no pass tag: a failure code fails it
    assert units(tracker.observe(tags(3, 4, **{"units.defect": 9}), 4.0, INFO))[0]["defect"] == "code_9"
    assert units(tracker.observe(tags(4, 5, **{"units.defect": "hipot_current"}), 5.0, INFO))[0]["defect"] == \
        "hipot_current"


# --- config -----------------------------------------------------------------------------------------


def opcua_section(units_config: Any, **extra: Any) -> Section:
    return Section({"tenant": "t", "site": "s", "area": "a", "device": "power", "url": "opc.tcp://h:4840",
                    "product_model": "MW-20", "product_revision": "B",
                    "tags": {"state": "ns=2;s=S", "produced_total": "ns=2;s=P", "magnetron_power": "ns=2;s=M",
                             "cycle_time": "ns=2;s=C"},
                    "units": units_config, **extra}, "sources[0]")


def modbus_section(units_config: Any, **extra: Any) -> Section:
    return Section({"tenant": "t", "site": "s", "area": "a", "device": "leak", "host": "h",
                    "product_model": "MW-20", "product_revision": "B",
                    "tags": {"produced_total": {"address": 6, "type": "uint32"},
                             "door_leakage": {"address": 2, "type": "float32"}},
                    "units": units_config, **extra}, "sources[1]")


def test_units_config_of_both_adapters() -> None:
    source = opcua.from_config(opcua_section({
        "trigger": "produced_total", "serial": {"node": "ns=2;s=Serial"}, "good": {"node": "ns=2;s=Ok"},
        "cycle_time": "cycle_time", "measurements": ["magnetron_power"]}), Path("."))
    assert source.units is not None and source.units.reads == ["units.serial", "units.good", "cycle_time",
                                                               "magnetron_power"]
    assert source.unit_reads["units.serial"].node == "ns=2;s=Serial"
    assert source.unit_reads["magnetron_power"].node == "ns=2;s=M"
    assert "units.serial" not in source.info.channels  # units-only tags are no telemetry
    bus = modbus.from_config(modbus_section({
        "trigger": "produced_total", "serial": {"address": 20, "type": "uint32"}, "serial_format": "MW-20-{:07d}",
        "scrap": {"address": 24, "type": "uint32"}, "measurements": ["door_leakage"]}), Path("."))
    assert [(t, s, c) for t, s, c, _ in bus.reads] == [("holding", 2, 24)]  # one request with the units tags
    assert bus.info.channels == ("produced_total", "door_leakage")
    assert bus.status()["units"] == 0


@pytest.mark.parametrize(
    ("units_config", "message"),
    [
        ({"serial": {"node": "n"}}, r"units.trigger: required"),
        ({"trigger": "producd_total", "serial": {"node": "n"}}, r"units.trigger: 'producd_total' is not a channel"),
        ({"trigger": "state", "serial": {"node": "n"}}, r"units.trigger: the state code is not a unit value"),
        ({"trigger": "produced_total"}, r"units.serial: required"),
        ({"trigger": "produced_total", "serial": "ns=2;s=Serial"}, r"units.serial: 'ns=2;s=Serial' is not a channel"),
        ({"trigger": "produced_total", "serial": {"nod": "n"}}, r"units.serial.node: required"),
        ({"trigger": "produced_total", "serial": 5}, r"units.serial: must name a channel of tags or be a tag"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "serial_format": "MW-20"},
         r"units.serial_format: must place the number"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "serial_format": "MW-{x}"},
         r"units.serial_format: 'MW-\{x\}' cannot format a number"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "good": {"node": "g"}, "scrap": "produced_total"},
         r"units.scrap: give good .* or scrap"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "defect_map": {1: "door_leakage"}},
         r"units.defect_map: requires defect"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "defect": {"node": "d"}, "defect_map": {0: "x"}},
         r"units.defect_map: 0: 'x' must map a nonzero integer"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "measurements": ["cavity_temp_rise"]},
         r"units.measurements\[0\]: 'cavity_temp_rise' is not a channel"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "measurements": "magnetron_power"},
         r"units.measurements: must be a list"),
        ({"trigger": "produced_total", "serial": {"node": "n"}, "serials": 1}, r"units.serials: unknown key"),
    ],
)
def test_units_config_errors_name_the_key(units_config: dict[str, Any], message: str) -> None:
    section = opcua_section(units_config)
    with pytest.raises(ConfigError, match=r"sources\[0\]\." + message):
        opcua.from_config(section, Path("."))
        section.done()


def test_units_need_product_model_and_revision() -> None:
    section = modbus_section({"trigger": "produced_total", "serial": {"address": 20}})
    del section.data["product_revision"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"sources\[1\].product_revision: required with units"):
        modbus.from_config(section, Path("."))
    section = modbus_section({"trigger": "produced_total", "serial": {"address": 20, "type": "uint64"}})
    with pytest.raises(ConfigError, match=r"sources\[1\].units.serial.type: must be one of"):
        modbus.from_config(section, Path("."))
    section = modbus_section({"trigger": "produced_total", "serial": {"address": 20}}, product_revision="rev B")
    with pytest.raises(ConfigError, match=r"sources\[1\].product_revision: invalid product_revision"):
        modbus.from_config(section, Path("."))


def test_set_config_changes_the_revision_of_a_station() -> None:
    source = modbus.from_config(modbus_section({"trigger": "produced_total", "serial": {"address": 20}}), Path("."))
    sink = RecordingSink()
    stream = sink.stream(source.info)
    assert source.open_stream(sink) is stream
    with pytest.raises(CommandError, match="invalid product_revision"):
        source.set_config(source.info.key, {"product_revision": "C D", "rate_hz": 2})
    assert source.rate_hz(source.info.key) == 1.0 and stream.births == []  # nothing applied
    assert source.set_config(source.info.key, {"product_revision": "C"}) == {"product_revision": "C"}
    assert stream.births[-1].product_revision == "C" and stream.info.product_revision == "C"
    assert source.info.product_model == "MW-20"
    with pytest.raises(CommandError, match="does not support setting 'warp'"):
        source.set_config(source.info.key, {"warp": 1})


def test_a_revision_set_before_the_source_runs_is_announced_when_it_starts() -> None:
    source = opcua.from_config(opcua_section({"trigger": "produced_total", "serial": {"node": "n"}}), Path("."))
    sink = RecordingSink()
    stream = sink.stream(source.info)  # the agent opens every stream before its sources run
    source.set_config(source.info.key, {"product_model": "MW-30", "product_revision": "A"})
    assert stream.births == []
    source.open_stream(sink)
    assert [(b.product_model, b.product_revision) for b in stream.births] == [("MW-30", "A")]
