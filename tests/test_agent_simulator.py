"""The simulator and anomaly injection, driven by a synthetic clock (no broker needed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from agent_support import RecordingSink

from edge_agent.anomalies import KINDS, AnomalyInjector, Episode, RandomSchedule
from edge_agent.sources.base import CommandError
from edge_agent.sources.simulator import (
    AnomalySpec,
    EpisodeSpec,
    FleetSpec,
    LineSpec,
    PrinterSpec,
    SimulatorSource,
    demo_fleet,
)
from forgeline.contract import schemas
from forgeline.contract.vocabulary import CHANNELS, DeviceState, Technology

START = 1_700_000_000.0


def run(source: SimulatorSource, seconds: float, tick: float = 0.5) -> RecordingSink:
    sink = RecordingSink()
    source.attach(sink)
    steps = int(seconds / tick)
    for i in range(steps + 1):
        source.step(START + i * tick)
    return sink


def all_tech_fleet(**kw: object) -> FleetSpec:
    printers = tuple(PrinterSpec(f"{t.value.lower()}-01", t.value) for t in Technology if t is not Technology.LINE)
    return FleetSpec("acme", "p1", "hall1", printers, (LineSpec("MW-20", "B"),), **kw)  # type: ignore[arg-type]


def test_every_technology_runs_jobs_through_the_state_machine() -> None:
    source = SimulatorSource(all_tech_fleet(), seed=3, speed=5000, start_s=START)
    sink = run(source, 250)
    for key, stream in sink.streams.items():
        info = stream.info
        schemas.validate("status", info.birth(START, 1))
        states = {int(v) for v in stream.values("state")}
        assert states <= {int(s) for s in DeviceState}
        for counter in ("produced_total", "good_total", "scrap_total"):
            series = stream.values(counter)
            assert series == sorted(series), f"{key}: {counter} is cumulative"
        for channel, _, value in stream.samples:
            entry = CHANNELS[channel]
            assert math.isnan(value) or entry.low <= value <= entry.high, (key, channel, value)
        if info.technology == "line":
            continue
        assert {DeviceState.HEATING, DeviceState.PRINTING} <= {DeviceState(s) for s in states}, key
        types = [e["type"] for e in stream.events]
        assert "job_started" in types and "job_finished" in types, (key, types)
        started = next(e for e in stream.events if e["type"] == "job_started")
        assert started["parts"] and started["build_height_mm"] > 0 and started["material_density_g_cm3"] > 0
        for part in started["parts"]:
            assert len(part["bbox_mm"]) == 3 and part["volume_cm3"] > 0
            assert part["mass_g"] == pytest.approx(part["volume_cm3"] * started["material_density_g_cm3"], rel=1e-3)
            assert sorted(part["bbox_mm"])[-1] <= max(info.build_volume_mm or (0,))
        progress = stream.values("layer_progress")
        assert max(progress) == pytest.approx(1.0) and min(progress) >= 0


def test_printer_channels_follow_the_state() -> None:
    source = SimulatorSource(FleetSpec("acme", "p", "a", (PrinterSpec("f1", "FDM"),)), seed=1, speed=50,
                             start_s=START)
    sink = run(source, 900)
    stream = sink.streams["acme/p/a/f1"]
    by_t: dict[int, dict[str, float]] = {}
    for channel, t, value in stream.samples:
        by_t.setdefault(t, {})[channel] = value
    printing = [row["nozzle_temp"] for row in by_t.values() if row.get("state") == DeviceState.PRINTING]
    idle_cold = [row["nozzle_temp"] for row in by_t.values() if row.get("state") == DeviceState.IDLE]
    assert printing and min(printing) > 180  # heated before printing starts
    assert idle_cold and min(idle_cold) < 60


def test_oven_line_units_carry_model_revision_and_flow_through_stations() -> None:
    fleet = FleetSpec("ovens", "plant1", "x", lines=(LineSpec("MW-20", "B", area="line1"),))
    source = SimulatorSource(fleet, seed=5, speed=100, start_s=START)
    sink = run(source, 600)
    stations = {key.rsplit("/", 1)[1]: stream for key, stream in sink.streams.items()}
    assert list(stations) == ["assembly", "power", "leak", "safety"]
    serials: dict[str, list[str]] = {}
    for name, stream in stations.items():
        assert stream.info.product_model == "MW-20" and stream.info.product_revision == "B"
        units = [e for e in stream.events if e["type"] == "unit_produced"]
        assert units, name
        for unit in units:
            assert unit["product_model"] == "MW-20" and unit["product_revision"] == "B"
            assert unit["good"] == ("defect" not in unit)
        serials[name] = [u["serial"] for u in units]
        produced = stream.values("produced_total")[-1]
        good, scrap = stream.values("good_total")[-1], stream.values("scrap_total")[-1]
        assert produced == good + scrap
    power = [e for e in stations["power"].events if e["type"] == "unit_produced"]
    assert all(set(u["measurements"]) == {"magnetron_power", "cavity_temp_rise"} for u in power)
    # A unit reaches a station only after passing the one before it.
    passed_assembly = {
        e["serial"] for e in stations["assembly"].events if e["type"] == "unit_produced" and e["good"]
    }
    assert set(serials["power"]) <= passed_assembly
    assert set(serials["safety"]) <= set(serials["leak"]) <= set(serials["power"])


def test_line_revision_change_is_announced() -> None:
    fleet = FleetSpec("ovens", "plant1", "x", lines=(LineSpec("MW-20", "B"),))
    source = SimulatorSource(fleet, seed=5, speed=100, start_s=START)
    sink = run(source, 100)
    applied = source.set_config("ovens/plant1/line1/power", {"product_revision": "C"})
    assert applied == {"product_revision": "C"}
    for i in range(200):
        source.step(START + 100 + i)
    for stream in sink.streams.values():
        assert stream.births and stream.births[-1].product_revision == "C"
    late = [e for e in sink.streams["ovens/plant1/line1/assembly"].events if e["type"] == "unit_produced"]
    assert late[-1]["product_revision"] == "C"
    with pytest.raises(CommandError, match="non-empty string"):
        source.set_config("ovens/plant1/line1/power", {"product_revision": 3})
    printer = SimulatorSource(FleetSpec("acme", "p", "a", (PrinterSpec("f1", "FDM"),)), start_s=START)
    # A printer's revision is the version of its process profiles; the profile is named by the material.
    assert printer.set_config("acme/p/a/f1", {"product_revision": "C"}) == {"product_revision": "C"}
    with pytest.raises(CommandError, match="named by their material"):
        printer.set_config("acme/p/a/f1", {"product_model": "PLA-fast"})
    with pytest.raises(CommandError, match="invalid product_revision"):
        printer.set_config("acme/p/a/f1", {"product_revision": "v 2"})
    with pytest.raises(CommandError, match="does not support"):
        source.set_config("ovens/plant1/line1/power", {"colour": "red"})


def test_same_seed_same_data_different_seed_different_data(tmp_path: Path) -> None:
    def once(seed: int, name: str) -> tuple[list[tuple[str, int, float]], str]:
        labels = tmp_path / name
        fleet = all_tech_fleet(anomalies=AnomalySpec(str(labels), RandomSchedule(rate_per_hour=60)))
        source = SimulatorSource(fleet, seed=seed, speed=500, start_s=START)
        sink = run(source, 150)
        source.injector.close()  # type: ignore[union-attr]
        samples = [s for stream in sink.streams.values() for s in stream.samples]
        return samples, labels.read_text()

    first, labels_a = once(7, "a.jsonl")
    again, labels_b = once(7, "b.jsonl")
    other, labels_c = once(8, "c.jsonl")
    assert first == again and labels_a == labels_b and labels_a
    assert first != other and labels_a != labels_c


def test_dispatched_job_is_printed_with_its_parts() -> None:
    source = SimulatorSource(FleetSpec("acme", "p", "a", (PrinterSpec("s1", "SLS"),)), seed=1, speed=1000,
                             auto_jobs=False, start_s=START)
    sink = run(source, 5)
    stream = sink.streams["acme/p/a/s1"]
    assert not [e for e in stream.events if e["type"] == "job_started"]
    parts = [{"part_id": "order7-bracket", "bbox_mm": [40, 30, 20], "volume_cm3": 8.5},
             {"part_id": "order7-cover", "bbox_mm": [120, 90, 15], "volume_cm3": 30.0, "mass_g": 30.2}]
    reply = source.dispatch_job("acme/p/a/s1", {"job_id": "J-7", "parts": parts, "material": "PA12"})
    assert reply["job_id"] == "J-7" and reply["queued"] == 1
    for i in range(1, 200):
        source.step(START + 5 + i)
    started = [e for e in stream.events if e["type"] == "job_started"]
    assert [e["job_id"] for e in started] == ["J-7"]
    assert [p["part_id"] for p in started[0]["parts"]] == ["order7-bracket", "order7-cover"]
    assert started[0]["parts"][0]["mass_g"] == pytest.approx(8.5 * 1.01)
    assert started[0]["build_height_mm"] == 20
    assert any(e["type"] in ("job_finished", "job_aborted") and e["job_id"] == "J-7" for e in stream.events)


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"parts": [{"part_id": "a", "bbox_mm": [1, 1, 1], "volume_cm3": 1}]}, "job_id"),
        ({"job_id": "j", "parts": []}, "non-empty parts"),
        ({"job_id": "j", "parts": [{"part_id": "a", "bbox_mm": [1, 1], "volume_cm3": 1}]}, r"parts\[0\].bbox_mm"),
        ({"job_id": "j", "parts": [{"part_id": "a", "bbox_mm": [900, 1, 1], "volume_cm3": 1}]}, "does not fit"),
        ({"job_id": "j", "parts": [{"part_id": "a", "bbox_mm": [1, 1, 1], "volume_cm3": -1}]}, "volume_cm3"),
        ({"job_id": "j", "material": "Ti64", "parts": [{"part_id": "a", "bbox_mm": [1, 1, 1], "volume_cm3": 1}]},
         "not loaded"),
    ],
)
def test_bad_jobs_are_refused_with_the_reason(job: dict[str, object], message: str) -> None:
    source = SimulatorSource(FleetSpec("acme", "p", "a", (PrinterSpec("s1", "SLS"),)), start_s=START)
    with pytest.raises(CommandError, match=message):
        source.dispatch_job("acme/p/a/s1", job)


# --- anomaly injection ---------------------------------------------------------------------------


def injected(kind: str, values: list[float], magnitude: float = 5.0, sigma: float = 2.0) -> list[float]:
    injector = AnomalyInjector(seed=0, start_s=0.0)
    injector.register("t/s/a/d", {"x_temp": sigma})
    injector.add_episode(Episode("t/s/a/d", "x_temp", kind, 10.0, 20.0, magnitude, 1, sigma))
    return [injector.apply("t/s/a/d", "x_temp", float(t), v) for t, v in enumerate(values)]


def test_each_anomaly_kind_changes_only_its_episode() -> None:
    base = [100.0 + (t % 3) for t in range(30)]
    for kind in KINDS:
        out = injected(kind, base)
        assert out[:10] == base[:10] and out[20:] == base[20:], kind
    assert injected("level_shift", base)[10:20] == [v + 10.0 for v in base[10:20]]
    assert injected("spike", base)[10:20] == [v + 10.0 for v in base[10:20]]
    drift = injected("drift", base)
    assert [d - b for d, b in zip(drift[10:20], base[10:20], strict=True)] == pytest.approx(
        [10.0 * i / 10 for i in range(10)])
    assert injected("stuck", base)[10:20] == [base[10]] * 10
    noisy = [d - b for d, b in zip(injected("noise", base * 100)[10:20], base[10:20], strict=True)]
    assert noisy[0] == 0.0 and any(abs(n) > 0 for n in noisy[1:])


def test_random_schedule_labels_match_the_injected_samples(tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    fleet = FleetSpec("acme", "p", "a", (PrinterSpec("f1", "FDM"),),
                      anomalies=AnomalySpec(str(labels), RandomSchedule(rate_per_hour=120, kinds=("level_shift",),
                                                                        min_magnitude=50, max_magnitude=60)))
    clean = SimulatorSource(FleetSpec("acme", "p", "a", (PrinterSpec("f1", "FDM"),)), seed=4, speed=5,
                            start_s=START)
    dirty = SimulatorSource(fleet, seed=4, speed=5, start_s=START)
    a, b = run(clean, 900, tick=1.0), run(dirty, 900, tick=1.0)
    dirty.injector.close()  # type: ignore[union-attr]
    episodes = [json.loads(line) for line in labels.read_text().splitlines()]
    assert episodes and all(e["kind"] == "level_shift" for e in episodes)
    inside = 0
    for (channel, t, v_clean), (_, t2, v_dirty) in zip(
        a.streams["acme/p/a/f1"].samples, b.streams["acme/p/a/f1"].samples, strict=True
    ):
        assert t == t2
        hit = [e for e in episodes if e["channel"] == channel and e["start_ts"] <= t / 1e6 < e["end_ts"]]
        if hit:
            inside += 1
            entry = CHANNELS[channel]
            shifted = v_clean + hit[0]["direction"] * hit[0]["magnitude"] * hit[0]["sigma"]
            assert v_dirty == pytest.approx(min(max(shifted, entry.low), entry.high))
        else:
            assert v_dirty == v_clean, (channel, t)
    assert inside > 0


def test_explicit_episode_from_spec(tmp_path: Path) -> None:
    fleet = FleetSpec("acme", "p", "a", (PrinterSpec("f1", "FDM"),), anomalies=AnomalySpec(
        str(tmp_path / "l.jsonl"), None, (EpisodeSpec("f1", "bed_temp", "stuck", 10, 30),)))
    source = SimulatorSource(fleet, seed=1, speed=10, start_s=START)
    sink = run(source, 60, tick=1.0)
    bed = [(t / 1e6 - START, v) for c, t, v in sink.streams["acme/p/a/f1"].samples if c == "bed_temp"]
    stuck = [v for dt, v in bed if 10 <= dt < 40]
    assert len(set(stuck)) == 1 and len({v for dt, v in bed if dt < 10}) > 1


def test_demo_fleet_spans_two_factories_and_an_oven_line() -> None:
    source = SimulatorSource(demo_fleet(), seed=0, speed=10, start_s=START)
    tenants = {info.ref.tenant for info in source.devices()}
    assert tenants == {"factory-a", "factory-b", "oven-plant"}
    technologies = {info.technology for info in source.devices()}
    assert technologies == {t.value for t in Technology}


def test_agent_package_stays_light() -> None:
    """Importing the agent and the simulator pulls in neither numpy nor the twin."""
    import subprocess

    code = ("import sys, edge_agent, edge_agent.cli, edge_agent.sources.simulator; "
            "bad = [m for m in ('numpy', 'numba', 'twin', 'jsonschema') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
