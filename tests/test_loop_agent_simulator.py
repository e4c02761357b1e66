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


def test_every_line_event_names_the_model_and_revision_being_built() -> None:
    messages = run_line(6, 300)
    events = [schemas.loads("event", payload) for topic, payload in messages if "/event/" in topic]
    stops = [e for e in events if e["type"] != "unit_produced"]
    assert stops, "no station stop in the run: nothing to check"  # alarms and state changes of stations
    assert {(e["product_model"], e["product_revision"]) for e in events} == {("MW-20", "A"), ("MW-20", "B")}


def test_print_jobs_carry_material_and_process_profile_version_into_the_loop() -> None:
    """Print jobs are units of their process profile (product model, named by the material) and profile
    version (product revision): a new version set on the printer is compared with the previous one."""
    fleet = simulator.FleetSpec(tenant="acme", printers=(
        simulator.PrinterSpec("fdm-01", "FDM", materials=("PLA",)),
        simulator.PrinterSpec("sls-01", "SLS", materials=("PA12",), profile_revision="7"),
    ))
    source = simulator.SimulatorSource(fleet, seed=3, speed=3000, rate_hz=0.01, tick_s=1.0, start_s=START)
    sink = MessageSink()
    source.attach(sink)
    now = START

    def ended(revision: str) -> int:
        return sum(1 for topic, payload in sink.messages if topic.endswith("/fdm-01") and b'"job_' in payload
                   and schemas.loads("event", payload)["type"] in ("job_finished", "job_aborted")
                   and schemas.loads("event", payload)["product_revision"] == revision)

    for revision in ("1", "2"):
        if revision == "2":
            assert source.set_config("acme/plant1/hall1/fdm-01", {"product_revision": "2"}) == {"product_revision": "2"}
        while ended(revision) < 4:
            now += 1.0
            source.step(now)
    jobs = [schemas.loads("event", payload) for _, payload in sink.messages]
    jobs = [e for e in jobs if e["type"].startswith("job_")]
    assert {(e["material"], e["product_model"], e["product_revision"]) for e in jobs} == {
        ("PLA", "PLA-standard", "1"), ("PLA", "PLA-standard", "2"), ("PA12", "PA12-standard", "7")}
    finished = [e for e in jobs if e["type"] == "job_finished"]
    assert all(e["good"] == (e["parts_scrap"] == 0) for e in finished)
    store = LoopStore()
    assert store.ingest_all(sink.messages)["rejected"] == 0
    [profile] = store.find("PLA-standard", "acme")
    units = {name: data.units for name, data in profile.revisions.items()}
    assert units["1"] >= 4 and units["2"] >= 4, units
    assert set(store.find("PA12-standard", "acme")[0].revisions) == {"7"}
