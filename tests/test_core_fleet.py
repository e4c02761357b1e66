"""FleetCore end to end: validation, utilization/OEE, chamber fill, events, snapshot/restore."""

from __future__ import annotations

import numpy as np
import pytest

from forgeline.contract.vocabulary import DeviceState
from twin.core import BuildError, CoreConfig, CoreError, FleetCore

T0 = 1_700_000_000_000_000 - (1_700_000_000_000_000 % 3_600_000_000)  # on an hour boundary
S = 1_000_000  # one second in µs


def _core(**config: object) -> tuple[FleetCore, int]:
    core = FleetCore(max_devices=2, channels_per_device=8, config=CoreConfig(**config))  # type: ignore[arg-type]
    d = core.add_device(
        "acme/berlin/hall1/p1",
        technology="SLS",
        channels=["state", "chamber_temp", "laser_power", "produced_total", "good_total", "layer_progress"],
        planned_cycle_time_s=30.0,
    )
    return core, d


def _send(core: FleetCore, d: int, rows: list[tuple[str, int, float]], **kw: bool) -> None:
    dev = np.full(len(rows), d, dtype=np.int32)
    ch = np.array([core.channel_index(d, name) for name, _, _ in rows], dtype=np.int32)
    t = np.array([t for _, t, _ in rows], dtype=np.int64)
    v = np.array([v for _, _, v in rows], dtype=np.float64)
    core.ingest(dev, ch, t, v, **kw)


def test_add_device_is_idempotent_and_validates() -> None:
    core, d = _core()
    assert core.add_device("acme/berlin/hall1/p1", technology="SLS") == d
    with pytest.raises(CoreError, match="tenant/site/area/device"):
        core.add_device("nope", technology="SLS")
    with pytest.raises(CoreError, match="unknown technology"):
        core.add_device("acme/b/h/p2", technology="laser-magic")
    with pytest.raises(CoreError, match="is SLS, not FDM"):
        core.add_device("acme/berlin/hall1/p1", technology="FDM")
    for i in range(2):
        core.channel_index(d, f"x_extra{i}")
    with pytest.raises(CoreError, match="already has 8 channels"):
        core.channel_index(d, "x_one_too_many")


def test_capacity_grows_and_keeps_state() -> None:
    core = FleetCore(max_devices=1, channels_per_device=2)
    first = core.add_device("a/b/c/d0", technology="FDM", channels=["nozzle_temp"])
    core.ingest(np.array([first]), np.array([0]), np.array([T0]), np.array([200.0]))
    for i in range(1, 40):
        core.add_device(f"a/b/c/d{i}", technology="FDM", channels=["nozzle_temp"])
    assert core.capacity >= 40
    assert core.chan[first, 0, 0] == 200.0  # the regime-0 mean survived the move
    assert core.devices[39] == "a/b/c/d39"


def test_rejections_are_counted_not_raised() -> None:
    core, d = _core()
    slot = core.channel_index(d, "chamber_temp")
    assert core.capacity == 2 and len(core.devices) == 1  # device 1: within the capacity, not registered
    stats = core.ingest(
        np.array([d, d, d, 7, d, d, 1], dtype=np.int32),
        np.array([slot, slot, slot, slot, 30, core.channel_index(d, "state"), slot], dtype=np.int32),
        np.array([T0, T0 + S, T0 + 2 * S, T0, T0, T0, T0], dtype=np.int64),
        np.array([170.0, np.nan, np.inf, 1.0, 1.0, 9.0, 1.0]),
    )
    assert (stats.accepted, stats.rejected_nonfinite, stats.rejected_index, stats.rejected_value) == (1, 2, 3, 1)
    assert stats.total == 7
    late = core.ingest(np.array([d]), np.array([slot]), np.array([T0 - S]), np.array([171.0]))
    assert late.late == 1 and late.accepted == 0
    with pytest.raises(CoreError, match="one length"):
        core.ingest(np.array([d]), np.array([slot, slot]), np.array([T0]), np.array([1.0]))
    assert core.ingest(np.array([], np.int32), np.array([], np.int32), np.array([], np.int64), np.array([])).total == 0


def test_oee_from_state_changes_and_counters() -> None:
    core, d = _core()
    # 10 min heating, 40 min printing, 10 min idle; 70 units produced of which 63 good
    _send(core, d, [("state", T0, DeviceState.HEATING), ("produced_total", T0, 100), ("good_total", T0, 90)])
    _send(core, d, [("state", T0 + 600 * S, DeviceState.PRINTING)])
    _send(core, d, [("produced_total", T0 + 1800 * S, 130), ("good_total", T0 + 1800 * S, 117)])
    _send(core, d, [("produced_total", T0 + 3000 * S, 170), ("good_total", T0 + 3000 * S, 153)])
    _send(core, d, [("state", T0 + 3000 * S, DeviceState.IDLE)])
    now = T0 + 3600 * S - 1000
    # state_hold_s=300: the idle state seen at 50 min holds until 55 min, then the time is unknown
    k = core.window_kpis(d, 3600, now_us=now)
    producing, busy = 2400.0, 600.0 + 2400.0 + 300.0
    assert k["utilization"] == pytest.approx(producing / 3599.999)
    assert k["availability"] == pytest.approx(producing / busy)
    assert k["effectiveness"] == pytest.approx(30.0 * 70 / producing)
    assert k["quality"] == pytest.approx(63 / 70)
    assert k["oee"] == pytest.approx(k["availability"] * k["effectiveness"] * k["quality"])  # type: ignore[operator]
    every = core.kpis_all(now_us=now)
    assert every["oee"][d] == pytest.approx(k["oee"])
    assert every["utilization"][d] == pytest.approx(k["utilization"])
    # the 15-minute window is 16 one-minute buckets, 44..60 min: 6 min printing, 5 idle, 5 unknown
    short = core.window_kpis(d, 900, now_us=now)
    assert short["availability"] == pytest.approx(6 / 11)
    assert short["utilization"] == pytest.approx(360 / 959.999)
    assert short["quality"] == pytest.approx(36 / 40)
    assert core.kpis(d)["state"] == DeviceState.IDLE


def test_out_of_order_state_gives_the_same_kpis() -> None:
    rows = [("state", T0 + i * 60 * S, float([1, 2, 3, 3, 4, 3, 1, 5][i % 8])) for i in range(40)]
    in_order, d = _core()
    _send(in_order, d, rows)
    shuffled, d2 = _core()
    rng = np.random.default_rng(3)
    # swap neighbours only: within the reorder buffer every sample can be placed exactly
    order = list(range(len(rows)))
    for i in range(0, len(order) - 1, 2):
        if rng.random() < 0.7:
            order[i], order[i + 1] = order[i + 1], order[i]
    for i in order:
        _send(shuffled, d2, [rows[i]])
    now = T0 + 40 * 60 * S
    for window in (900, 3600, "shift"):
        assert shuffled.window_kpis(d2, window, now) == in_order.window_kpis(d, window, now)  # type: ignore[arg-type]


def test_kpis_of_chosen_devices_match_the_per_device_kpis() -> None:
    """kpi_table is the twin's one compiled pass per publishing round: for any subset, in any order,
    with repeats, each row equals kpis(device) (NaN where kpis says None)."""
    core = FleetCore(max_devices=6, channels_per_device=8, config=CoreConfig(warmup_samples=10))
    channels = ["state", "chamber_temp", "produced_total", "good_total", "layer_progress"]
    ids = [core.add_device(f"acme/b/h/p{i}", technology="SLS", channels=channels, planned_cycle_time_s=20.0 + i)
           for i in range(6)]
    for i, d in enumerate(ids[:5]):  # the last device never reports
        _send(core, d, [("state", T0, DeviceState.HEATING), ("produced_total", T0, 10 * i)])
        _send(core, d, [("state", T0 + (100 + 50 * i) * S, DeviceState.PRINTING)])
        _send(core, d, [("produced_total", T0 + 900 * S, 10 * i + 7 + i), ("good_total", T0 + 900 * S, 5 + i)])
        for k in range(60):
            hot = 40.0 if i == 3 and k > 50 else 0.0
            _send(core, d, [("chamber_temp", T0 + (k * 15 + 1) * S, 170.0 + (k % 5) + hot)])
    core.start_build(ids[2], t_us=T0, job_id="j", chamber_volume_cm3=20_000.0, part_volumes_cm3=[3000.0],
                     build_height_mm=100.0, chamber_height_mm=300.0)
    _send(core, ids[2], [("layer_progress", T0 + 950 * S, 0.5)])
    now = T0 + 1000 * S
    for chosen in ([ids[2]], [ids[5], ids[0], ids[3], ids[2]], [ids[2], ids[1], ids[2]], ids, []):
        table = core.kpi_table(chosen, now_us=now)
        assert table.shape == (len(chosen), len(core.KPI_COLUMNS))
        for row, d in enumerate(chosen):
            one = core.kpis(d, now_us=now)
            assert set(one) == set(core.KPI_COLUMNS)
            for column, key in enumerate(core.KPI_COLUMNS):
                if one[key] is None:
                    assert np.isnan(table[row, column]), (d, key)
                else:
                    assert table[row, column] == pytest.approx(one[key]), (d, key)
    fill = core.KPI_COLUMNS.index("chamber_fill")
    assert core.kpi_table([ids[2], ids[2]], now_us=now)[:, fill] == pytest.approx([0.15, 0.15])
    assert not np.isnan(core.kpis_all(now_us=now)["anomaly_score"][ids[0]])
    with pytest.raises(CoreError, match="unknown device"):
        core.kpi_table([len(core.devices)])


def test_chamber_fill_packing_density_and_realised_fill() -> None:
    core, d = _core()
    core.start_build(
        d, t_us=T0, job_id="j1", chamber_volume_cm3=20_000.0, part_volumes_cm3=[1000.0, 1000.0, 2000.0],
        material_density_g_cm3=1.01, build_height_mm=150.0, chamber_height_mm=300.0,
    )  # fmt: skip
    k = core.kpis(d)
    assert k["chamber_fill"] == pytest.approx(0.2)
    # parts fill 4000 of the 10000 cm3 of bed used up to 150 mm of 300 mm
    assert k["packing_density"] == pytest.approx(0.4)
    assert k["fill_realised"] == pytest.approx(0.0)
    _send(core, d, [("layer_progress", T0 + 60 * S, 0.25)])
    assert core.kpis(d)["fill_realised"] == pytest.approx(0.05)
    core.finish_build(d, t_us=T0 + 3600 * S)
    assert core.kpis(d)["chamber_fill"] is None
    core.start_build(d, t_us=T0 + 4000 * S, job_id="j2", chamber_volume_cm3=20_000.0,
                     part_volumes_cm3=[10_000.0], build_height_mm=50.0)  # fmt: skip
    # height-weighted mean: (0.2·150 + 0.5·50) / 200
    assert core.fleet_fill("acme", since_us=T0, until_us=T0 + 5000 * S) == pytest.approx(0.275)
    assert core.fleet_fill("other", since_us=T0, until_us=T0 + 5000 * S) is None
    with pytest.raises(BuildError, match="exceed the chamber"):
        core.start_build(d, t_us=T0, job_id="j3", chamber_volume_cm3=10.0, part_volumes_cm3=[11.0])


def _noisy_rows(n: int, seed: int, spike_at: int | None) -> list[tuple[str, int, float]]:
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, int, float]] = []
    for i in range(n):
        t = T0 + i * S
        bump = 25.0 if spike_at is not None and spike_at <= i < spike_at + 10 else 0.0
        rows += [
            ("state", t, float(DeviceState.PRINTING)),
            ("chamber_temp", t, 170.0 + rng.normal(0.0, 0.5) + bump),
            ("laser_power", t, 30.0 + rng.normal(0.0, 0.3)),
        ]
    return rows


def test_one_incident_is_one_event_with_its_channel() -> None:
    core, d = _core()
    _send(core, d, _noisy_rows(1200, 0, spike_at=900))
    events = core.drain_events()
    assert [e.phase for e in events] == ["start", "end"]
    assert events[0].t_us == T0 + 900 * S
    assert events[0].channels == ("chamber_temp",)
    assert events[1].t_us > events[0].t_us
    assert core.drain_events() == []
    quiet, d2 = _core()
    _send(quiet, d2, _noisy_rows(1200, 0, spike_at=None))
    assert quiet.drain_events() == []
    assert 0.0 <= quiet.kpis(d2)["anomaly_score"] < 0.5  # type: ignore[operator]


def test_historical_data_opens_no_event() -> None:
    core, d = _core()
    _send(core, d, _noisy_rows(1200, 0, spike_at=900), historical=True)
    assert core.drain_events() == []


def test_snapshot_restore_is_exact_and_continues_identically() -> None:
    rows = _noisy_rows(1500, 1, spike_at=1000)
    whole, d = _core()
    _send(whole, d, rows)
    half, d2 = _core()
    _send(half, d2, rows[:2400])
    half.start_build(d2, t_us=T0, job_id="j", chamber_volume_cm3=100.0, part_volumes_cm3=[10.0])
    whole.start_build(d, t_us=T0, job_id="j", chamber_volume_cm3=100.0, part_volumes_cm3=[10.0])
    restored = FleetCore.restore(half.snapshot())
    assert restored.kpis(d2) == half.kpis(d2)
    assert restored.snapshot() == half.snapshot()
    _send(restored, d2, rows[2400:])
    assert restored.kpis(d) == whole.kpis(d)
    assert restored.channel_scores(d) == whole.channel_scores(d)
    for name in FleetCore._ARRAYS:
        np.testing.assert_array_equal(getattr(restored, name)[:1], getattr(whole, name)[:1])
    with pytest.raises(CoreError, match="not a FleetCore snapshot"):
        FleetCore.restore(b"garbage")
