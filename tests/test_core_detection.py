"""Detection regressions of the twin core: incidents the detectors must turn into events, found on
simulated line and printer telemetry (issue 9 follow-ups). Each scenario runs through the numba
kernel (FleetCore) and through the pure-Python reference, which must raise the same events."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from core_support import rewrite_snapshot

from twin.core import CoreConfig, FleetCore
from twin.core.reference import ReferenceFleet

T0 = 1_700_000_000_000_000
Sample = tuple[int, int, int, float]  # device, slot, t_us, value


def _run(channels: list[str], samples: list[Sample], config: CoreConfig | None = None) -> list[tuple[str, int]]:
    """Feed ``samples`` (one device, time order) to the kernel and to the reference in batches of
    a few hundred; return the kernel's events as (phase, t_us) after checking the reference agrees."""
    core = FleetCore(max_devices=1, channels_per_device=len(channels), config=config)
    core.add_device("acme/s/a/d0", technology="line", channels=channels)
    ref = ReferenceFleet([channels], config)
    for start in range(0, len(samples), 400):
        batch = samples[start : start + 400]
        core.ingest(
            np.array([s[0] for s in batch], np.int32),
            np.array([s[1] for s in batch], np.int32),
            np.array([s[2] for s in batch], np.int64),
            np.array([s[3] for s in batch]),
        )
        ref.ingest(batch)
    events: list[tuple[str, int]] = [(e.phase, e.t_us) for e in core.drain_events()]
    assert events == [(phase, t) for _, phase, t, _ in ref.events]
    return events


def _starts_in(events: list[tuple[str, int]], lo_tick: int, hi_tick: int, tick_us: int = 1_000_000) -> int:
    return sum(1 for phase, t in events if phase == "start" and T0 + lo_tick * tick_us <= t < T0 + hi_tick * tick_us)


def test_an_incident_in_the_device_warm_up_does_not_silence_the_device_for_good() -> None:
    """Bug: the device baseline (mean/variance of the sum of channel statistics) learned an incident
    in its warm-up as normal; later incidents then scored too low to close the learning gate and kept
    the variance inflated, so the device raised no event for the rest of the run (seen with the loop's
    line simulator, seed 3). Channel evidence now keeps incidents out of the device baseline."""
    rng = np.random.default_rng(3)
    channels = ["state", "a", "b", "c"]
    excursions = [70, 400, 700, 1000, 1300]  # the first one right after the channels' warm-up
    samples: list[Sample] = []
    for tick in range(1500):
        t = T0 + tick * 1_000_000
        shift = 7.0 if any(start <= tick < start + 6 for start in excursions) else 0.0
        samples.append((0, 0, t, 3.0))  # producing
        samples += [(0, 1, t, 100.0 + rng.normal() + shift), (0, 2, t, 50.0 + rng.normal()), (0, 3, t, rng.normal())]
    events = _run(channels, samples)
    for start in excursions[1:]:
        assert _starts_in(events, start, start + 12) == 1, (start, events)


def test_snapshot_from_before_the_device_gate_fields_restores() -> None:
    """Snapshots written before DF_HOT/DF_BASE_N existed (12 device fields) still restore: the
    baseline count is the tick count, the hot count is recomputed from the channel statistics."""

    from twin.core.layout import CH_Q, DF_BASE_N, DF_HOT, DF_N

    core = FleetCore(max_devices=1, channels_per_device=3)
    d = core.add_device("acme/s/a/d0", technology="FDM", channels=["x", "y"])
    rng = np.random.default_rng(0)
    t = T0 + np.repeat(np.arange(200), 2) * 1_000_000
    values = rng.normal(10, 1, 400)
    values[-2] = 40.0  # the last tick's x is far out: a hot channel at snapshot time
    core.ingest(np.zeros(400, np.int32), np.tile([0, 1], 200).astype(np.int32), t.astype(np.int64), values)
    old = rewrite_snapshot(core.snapshot(), lambda arrays: {**arrays, "devf": arrays["devf"][:, :12]})
    restored = FleetCore.restore(old)
    assert restored.devices == core.devices == ["acme/s/a/d0"]
    assert restored.devf[d, DF_BASE_N] == restored.devf[d, DF_N] == core.devf[d, DF_N]
    assert restored.chan[d, 0, CH_Q] > 100 and restored.devf[d, DF_HOT] == core.devf[d, DF_HOT] == 1.0


def test_several_values_of_a_channel_at_one_timestamp_are_all_measurements() -> None:
    """Bug: a line station that completed three units since its last report sends three values of
    each measurement with one timestamp; all but the first were dropped as "replayed duplicates",
    so the detectors saw a third of the units. Only a repeat of time *and* value is a duplicate."""
    from twin.core.layout import CH_FIELDS

    core = FleetCore(max_devices=1, channels_per_device=2)
    d = core.add_device("acme/s/a/d0", technology="FDM", channels=["x_a"])
    t = np.full(3, T0, np.int64)
    stats = core.ingest(np.zeros(3, np.int32), np.zeros(3, np.int32), t, np.array([1.0, 2.0, 3.0]))
    assert stats.accepted == 3
    assert core.chan[d, 0, 2] == 3.0  # rest regime: three samples learned
    core.ingest(np.zeros(1, np.int32), np.zeros(1, np.int32), t[:1], np.array([3.0]))  # a replay of the last
    assert core.chan[d, 0, 2] == 3.0 and CH_FIELDS == 16
    ref = ReferenceFleet([["x_a"]])
    ref.ingest([(0, 0, T0, 1.0), (0, 0, T0, 2.0), (0, 0, T0, 3.0), (0, 0, T0, 3.0)])
    assert ref.devices[0].channels[0].n[0] == 3.0


def test_unit_excursions_reported_three_per_tick_raise_events() -> None:
    """Three units per tick, one tick a second; a +7 σ excursion of 12 units (4 ticks) on one of
    three measurements must open an event each time (with a third of the units it did not)."""
    rng = np.random.default_rng(5)
    channels = ["state", "x_power", "x_rise", "x_cycle"]
    excursions = [300, 500, 700, 900]
    samples: list[Sample] = []
    for tick in range(1000):
        t = T0 + tick * 1_000_000
        shift = 7.0 if any(start <= tick < start + 4 for start in excursions) else 0.0
        for _ in range(3):
            samples += [(0, 1, t, 800 + 15 * rng.normal()), (0, 2, t, 11.3 + 0.3 * rng.normal() + 0.3 * shift)]
            samples.append((0, 3, t, 65 + 3 * rng.normal()))
        samples.append((0, 0, t, 3.0))
    events = _run(channels, samples)
    for start in excursions:
        assert _starts_in(events, start, start + 8) == 1, (start, events)


def _held_unit_samples(seed: int, excursion_units: range) -> list[Sample]:
    """A station polled once a second: a unit every 10 s whose measurement the agent repeats until the
    next unit (a PLC register), the state flipping to idle for the last 3 s of each cycle, and a
    continuous analog channel that follows the state."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    value = 11.3
    for tick in range(4000):
        t = T0 + tick * 1_000_000
        unit, phase = divmod(tick, 10)
        if phase == 0:  # a new unit's measurement
            value = round(11.3 + 0.3 * rng.normal() + (2.1 if unit in excursion_units else 0.0), 3)
        producing = phase < 7
        samples.append((0, 1, t, value))  # reported before the state, as the stations do
        samples.append((0, 0, t, 3.0 if producing else 1.0))
        samples.append((0, 2, t, (1.8 if producing else 0.1) + 0.1 * rng.normal()))
    return samples


@pytest.mark.parametrize("seed", [0, 1])
def test_held_unit_measurements_are_one_sample_per_unit(seed: int) -> None:
    """Bug: per-unit measurements repeated between units were learned as new samples (the baseline
    weighed units by how long they are held and the EWMA chart converged on every held value, so an
    ordinary unit 2 σ off scored as an incident) and scored against the baseline of the station's
    state, which flips to idle between units. A repeat of a unit channel's last value is the same
    unit now, and unit channels have one baseline."""
    from twin.core.layout import REGIME_PRODUCING, REGIME_REST

    channels = ["state", "cavity_temp_rise", "vibration"]
    events = _run(channels, _held_unit_samples(seed, range(300, 306)))
    starts = [t for phase, t in events if phase == "start"]
    assert len(starts) == 1 and T0 + 3000 * 1_000_000 <= starts[0] < T0 + 3060 * 1_000_000, events
    core = FleetCore(max_devices=1, channels_per_device=3)
    core.add_device("acme/s/a/d0", technology="line", channels=channels)
    samples = _held_unit_samples(seed, range(0))
    core.ingest(*(np.array(column) for column in zip(*samples, strict=True)))
    assert core.chan[0, 1, 3 * REGIME_PRODUCING + 2] == 400 and core.chan[0, 1, 3 * REGIME_REST + 2] == 0


def test_one_strong_channel_among_many_opens_an_event() -> None:
    """Bug: the device score compared only the sum of all channel statistics with its baseline
    (Brown's method), which dilutes an incident on one channel: a 9 σ shift of one of six unit
    measurements for four ticks scored about 0.6 and never reached event_on. The strongest unit
    channel now counts as one of m tests (q − 2 ln m) next to the sum."""
    rng = np.random.default_rng(11)
    channels = ["state", *[f"x_unit_{i}" for i in range(6)]]
    excursions = [200, 400, 600, 800]
    samples: list[Sample] = []
    for tick in range(1000):
        t = T0 + tick * 1_000_000
        samples.append((0, 0, t, 3.0))
        for c in range(6):
            shift = 9.0 if c == 2 and any(start <= tick < start + 4 for start in excursions) else 0.0
            samples.append((0, c + 1, t, 20.0 * c + rng.normal() + shift))
    events = _run(channels, samples)
    assert sum(1 for phase, _ in events if phase == "start") == len(excursions), events
    for start in excursions:
        assert _starts_in(events, start, start + 6) == 1, (start, events)


def test_a_change_that_persists_is_adopted_after_incident_adopt_s() -> None:
    """Bug: the learning gate held as long as a channel scored over it, so a change that persisted
    (or a spread the warm-up underestimated) stayed "anomalous" for good: the event never closed and
    the device could not report the next incident. After incident_adopt_s the gate lets go."""
    rng = np.random.default_rng(2)
    config = CoreConfig(incident_adopt_s=60.0)
    channels = ["state", "x_unit_a", "x_unit_b"]
    samples: list[Sample] = []
    for tick in range(1600):
        t = T0 + tick * 1_000_000
        a = 10.0 + rng.normal() + (8.0 if tick >= 200 else 0.0)  # a new normal from tick 200 on
        b = 20.0 + rng.normal() + (9.0 if 1300 <= tick < 1306 else 0.0)  # a later incident
        samples += [(0, 0, t, 3.0), (0, 1, t, a), (0, 2, t, b)]
    events = _run(channels, samples, config)
    assert _starts_in(events, 200, 210) == 1, events
    ends = [t for phase, t in events if phase == "end"]
    assert ends and ends[0] < T0 + 1200 * 1_000_000, events  # adopted: the first incident is over
    assert _starts_in(events, 1300, 1310) == 1, events


def test_agent_simulator_line_level_shifts_raise_one_event_each() -> None:
    """The reported case end to end: the edge agent's oven-line simulator (speed 200, about three
    units per 1 s report) with 20 injected 6 σ level shifts on power/cavity_temp_rise. The core
    raised no event at all; now an event covers every episode and none is unexplained."""
    from edge_agent.sources.simulator import AnomalySpec, EpisodeSpec, FleetSpec, LineSpec, SimulatorSource

    starts = [100.0, 200.0, *(290.0 + 13 * i for i in range(18))]
    episodes = tuple(EpisodeSpec("power", "cavity_temp_rise", "level_shift", s, 5.0, 6.0) for s in starts)
    spec = FleetSpec(tenant="acme", lines=(LineSpec("MW-20", "A"),), anomalies=AnomalySpec(episodes=episodes))
    source = SimulatorSource(spec, seed=2, speed=200, rate_hz=1.0, tick_s=1.0, auto_jobs=False, start_s=T0 / 1e6)
    core = FleetCore(max_devices=8)
    batch: list[tuple[int, int, int, float]] = []

    class Stream:
        def __init__(self, info: Any) -> None:
            self.info = info
            self.device = core.add_device(info.key, technology=info.technology, channels=info.channels)

        def add(self, channel: int, t_us: int, value: float) -> None:
            batch.append((self.device, channel, t_us, value))

        def extend(self, channels: Any, t_us: Any, values: Any) -> None:
            batch.extend(zip([self.device] * len(channels), channels, t_us, values, strict=True))

        def event(self, document: dict[str, Any]) -> None:
            pass

        def announce(self, info: Any) -> None:
            self.info = info

    class Sink:
        def stream(self, info: Any) -> Stream:
            return Stream(info)

    source.attach(Sink())
    for k in range(1, 545):
        source.step(T0 / 1e6 + k)
    core.ingest(*(np.array(column) for column in zip(*batch, strict=True)))
    power = core.device_index("acme/plant1/line1/power")
    events = core.drain_events()
    assert {e.device for e in events} == {power}
    incidents, open_at = [], 0
    for e in events:
        if e.phase == "start":
            open_at = e.t_us
            assert e.channels == ("cavity_temp_rise",)
        else:
            incidents.append((open_at, e.t_us))
    labels = [(T0 + s * 1e6, T0 + (s + 5) * 1e6) for s in starts]
    for lo, hi in labels:  # every episode is covered by an event (within 10 s of its end)
        assert any(a <= hi + 10e6 and b >= lo for a, b in incidents), (lo, incidents)
    for a, _ in incidents:  # and every event starts in an episode
        assert any(lo <= a <= hi + 10e6 for lo, hi in labels), (a, labels)
