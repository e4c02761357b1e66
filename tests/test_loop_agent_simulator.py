"""The loop on the edge agent's own oven-line simulator (``edge_agent.sources.simulator``): revisions
are switched the way operators do it (``set_config product_revision`` on the line, which re-announces
the stations' birth messages), defects are injected where real data comes from (revision effects and
anomaly episodes in the stations' measurements), and the loop flags the right channel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef
from forgeline.loop.compare import compare_model
from forgeline.loop.intake import LoopStore

simulator = pytest.importorskip("edge_agent.sources.simulator")

START = 1_700_000_000.0
SPEED = 200.0  # process seconds per simulated wall second: about 3 ovens per wall second


@dataclass
class MessageSink:
    """Records what the agent would publish for each station, as (topic, JSON bytes) in order."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    units: dict[str, int] = field(default_factory=dict)  # revision -> units started at the first station

    def stream(self, info: Any) -> MessageSink.Stream:
        return MessageSink.Stream(info, self)

    @dataclass
    class Stream:
        _info: Any
        sink: MessageSink

        @property
        def info(self) -> Any:
            return self._info

        def add(self, channel: int, t_us: int, value: float) -> None:
            pass  # telemetry batches are the twin's input, not the loop's

        def extend(self, channels: Sequence[int], t_us: Sequence[int], values: Sequence[float]) -> None:
            pass

        def event(self, document: dict[str, Any]) -> None:
            self.sink.messages.append((self._info.ref.event_topic, schemas.dumps(document)))
            if document["type"] == "unit_produced" and self._info.ref.device == "assembly":
                revision = document["product_revision"]
                self.sink.units[revision] = self.sink.units.get(revision, 0) + 1

        def announce(self, info: Any) -> None:
            self._info = info
            self.sink.messages.append((info.ref.status_topic, schemas.dumps(info.birth(START, 0))))


def run_line(seed: int, units: int, *, effects: dict[str, Any] | None = None,
             episodes: Sequence[Any] = ()) -> list[tuple[str, bytes]]:
    """Build ``units`` ovens of revision A, switch the line to B, build ``units`` more."""
    fleet = simulator.FleetSpec(
        tenant="acme",
        lines=(simulator.LineSpec(product_model="MW-20", product_revision="A", effects=effects or {}),),
        anomalies=simulator.AnomalySpec(episodes=tuple(episodes)),
    )
    source = simulator.SimulatorSource(fleet, seed=seed, speed=SPEED, rate_hz=1.0, tick_s=1.0, auto_jobs=False,
                                       start_s=START)
    sink = MessageSink()
    source.attach(sink)
    for info in source.devices():  # the births the agent publishes when it connects
        sink.messages.append((info.ref.status_topic, schemas.dumps(info.birth(START, 0))))
    now = START
    for revision in ("A", "B"):
        if revision == "B":
            source.set_config(source.devices()[0].key, {"product_revision": "B"})
        while sink.units.get(revision, 0) < units:
            now += 1.0
            source.step(now)
    return sink.messages


def analyse(messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    store = LoopStore()
    outcome = store.ingest_all(messages)
    assert outcome["rejected"] == 0 and outcome["unit"] > 0
    [model] = store.find("MW-20", "acme")
    assert set(model.revisions) == {"A", "B"}
    return compare_model(model, ts=0.0)


def flagged(document: dict[str, Any]) -> set[tuple[str, str | None, str]]:
    assert all(i["revision"] == "B" for i in document["insights"])
    return {(i["kpi"], i["channel"], i["direction"]) for i in document["insights"]}


def test_door_seal_revision_is_flagged_on_door_leakage() -> None:
    document = analyse(run_line(1, 600, effects={"B": simulator.RevisionEffects(door_leakage_scale=1.8)}))
    found = flagged(document)
    assert ("defect_rate", "door_leakage", "worse") in found
    assert ("measurement", "door_leakage", "worse") in found
    assert found <= {("defect_rate", "door_leakage", "worse"), ("measurement", "door_leakage", "worse"),
                     ("first_pass_yield", None, "worse")}


def test_cavity_temperature_episodes_in_one_revision_flag_the_cavity_channel() -> None:
    # The line builds about 3 ovens per simulated second, so revision A spans roughly the first 170 s.
    # Level shifts of 6 sigma on the power station's cavity temperature rise: 2 during A, 12 during B.
    episode = simulator.EpisodeSpec
    episodes = [episode("power", "cavity_temp_rise", "level_shift", start, 4.0, 6.0) for start in (40, 120)]
    episodes += [episode("power", "cavity_temp_rise", "level_shift", 190 + 12 * i, 4.0, 6.0) for i in range(12)]
    document = analyse(run_line(2, 500, episodes=episodes))
    found = flagged(document)
    assert ("measurement", "cavity_temp_rise", "worse") in found or \
        ("defect_rate", "cavity_temp_rise", "worse") in found, document["insights"]
    assert {channel for _, channel, _ in found} <= {"cavity_temp_rise", None}


@pytest.mark.parametrize("seed", [3, 4])
def test_identical_revisions_on_the_agent_simulator_raise_no_insight(seed: int) -> None:
    document = analyse(run_line(seed, 400))
    assert document["tests"] >= 10  # yield, defects, cycle time per station, every measurement
    assert document["insights"] == []


def test_stations_announce_the_new_revision() -> None:
    messages = run_line(5, 30)
    births = [schemas.loads("status", payload) for topic, payload in messages if "/status/" in topic]
    assert {b["product_revision"] for b in births} == {"A", "B"}
    assert {DeviceRef.from_key(f"acme/plant1/line1/{name}").status_topic for name in ("power", "leak")} <= {
        topic for topic, _ in messages}
