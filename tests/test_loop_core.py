"""The loop on anomalies the real twin core detects: station telemetry of simulated revisions (one with
more cavity-temperature excursions) goes through ``twin.core.FleetCore``; its anomaly events, as the
twin publishes them (schema ``anomaly_event``), feed the loop, which flags the right channel."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef
from forgeline.loop.compare import compare_model
from forgeline.loop.intake import LoopStore
from forgeline.loop.simulate import RevisionProfile, simulate_line, unit_telemetry

core = pytest.importorskip("twin.core")


def feed(fleet: Any, samples: dict[str, list[tuple[int, str, float]]]) -> None:
    device, channel, t_us, values = [], [], [], []
    for key, rows in samples.items():
        index = fleet.add_device(key, technology="line")
        for t, name, value in rows:
            device.append(index)
            channel.append(fleet.channel_index(index, name))
            t_us.append(t)
            values.append(value)
    stats = fleet.ingest(np.array(device), np.array(channel), np.array(t_us), np.array(values))
    assert stats.accepted == len(values)


def detected_anomalies(samples: dict[str, list[tuple[int, str, float]]]) -> list[tuple[str, dict[str, Any]]]:
    """Run the twin core over every station's telemetry; return anomaly events as (topic, payload).

    The core first learns the stations' normal behaviour from a day of clean production before the
    compared period, as a twin that has been running would have (its baselines start empty)."""
    fleet = core.FleetCore(max_devices=8)
    first = min(rows[0][0] for rows in samples.values())
    normal = simulate_line("acme", "MW-20", [RevisionProfile("pilot", units=1200)], seed=999, twin_anomalies=False,
                           feedback=False, start_ts=first / 1e6 - 1200 * 80)
    feed(fleet, unit_telemetry(normal))
    fleet.drain_events()
    feed(fleet, samples)
    out = []
    for event in fleet.drain_events():
        key = fleet.devices[event.device]
        payload = {"device": key, "ts": event.t_us / 1e6, "phase": event.phase,
                   "score": min(1.0, max(0.0, event.score)), "channels": list(event.channels),
                   "detector": "ensemble", "event_id": f"{key}@{event.t_us}"}
        schemas.validate("anomaly_event", payload)
        out.append((DeviceRef.from_key(key).anomaly_topic, payload))
    return out


def loop_with_core(profiles: list[RevisionProfile], seed: int) -> dict[str, Any]:
    messages = simulate_line("acme", "MW-20", profiles, seed=seed, twin_anomalies=False, feedback=False)
    store = LoopStore()
    for message in messages:
        store.ingest_document(message.topic, message.payload)
    anomalies = detected_anomalies(unit_telemetry(messages))
    assert anomalies, "the core detected nothing at all"
    for topic, payload in anomalies:
        assert store.ingest_document(topic, payload) in {"anomaly", "ignored"}
    return compare_model(store.model("acme", "MW-20"), ts=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_core_detected_cavity_excursions_flag_the_cavity_channel(seed: int) -> None:
    nominal = {"cavity_temp_rise": 0.002, "magnetron_power": 0.002, "door_leakage": 0.002}
    document = loop_with_core([
        RevisionProfile("A", units=1500, excursion_rate=nominal),
        RevisionProfile("B", units=1500, excursion_rate={**nominal, "cavity_temp_rise": 0.04}),
    ], seed=seed)
    rates = {(i["revision"], i["channel"], i["direction"]) for i in document["insights"] if i["kpi"] == "anomaly_rate"}
    assert rates == {("B", "cavity_temp_rise", "worse")}, document["insights"]


def test_core_detected_anomalies_of_identical_revisions_raise_no_rate_insight() -> None:
    nominal = {"cavity_temp_rise": 0.004, "magnetron_power": 0.004, "door_leakage": 0.004}
    for seed in range(3):
        document = loop_with_core([RevisionProfile("A", units=800, excursion_rate=nominal),
                                   RevisionProfile("B", units=800, excursion_rate=nominal)], seed=seed)
        assert not [i for i in document["insights"] if i["kpi"] == "anomaly_rate"], document["insights"]
