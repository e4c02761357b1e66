"""The iteration loop's anomaly-rate KPI end to end over MQTT, with nothing in between simulated away:

edge agent (the oven-line simulator, ``edge_agent.sources.simulator``) → Mosquitto → twin service (the
numba core detects the excursions in the stations' unit measurements and publishes anomaly events
tagged with the station's product model and revision) → loop service → retained iteration insights.

Three lines run at once in one agent. Lines 1 and 3 build model MW-20; their power stations' cavity
temperature rise has level-shift episodes only while revision B is built: the loop must flag
``anomaly_rate`` of ``cavity_temp_rise`` for B and no other channel's anomaly rate. Line 2 builds MW-30,
whose two revisions have the same episodes: no anomaly-rate insight. Revisions are switched as
operators do it, with a ``set_config`` command over MQTT.

Timing (wall seconds after the agent starts; the simulator's sample timestamps are wall time, so the
twin's learning time cannot be compressed by the simulation speed): the twin learns the stations'
normal for ``WARMUP_S`` before the loop listens — as a twin that has been running would have — because
episodes in the core's first ticks are not detected (measured: none of the first ~8 s at 10 samples/s).
The core separates episodes 1.5 s apart (about 0.5 detected per second and line), so MW-20 is built on
two lines: twice the events in the same wall time, which the exact Poisson test needs at the loop's
level (one line gave 6-9 starts in 14 s of B, q 0.001-0.02 against a level of 0.03: too close).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge_agent.agent import start_simulated_fleet
from edge_agent.sources.simulator import AnomalySpec, EpisodeSpec, FleetSpec, LineSpec
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef, Kind
from forgeline.loop.compare import LoopConfig
from forgeline.loop.service import LoopService, ServiceConfig
from forgeline.mqtt import MqttSettings, connect
from twin.config import TwinConfig
from twin.service import TwinService

SPEED = 1800.0  # process seconds per wall second: about 27 ovens per second through each line
RATE_HZ = 10.0  # station samples per second (the core's ticks)
WARMUP_S = 8.0  # the twin learns the stations' normal; the loop starts listening after it
NULL_SWITCH_S = 22.0  # line 2 (identical revisions) switches from A to B
DEFECT_SWITCH_S = 24.0  # lines 1 and 3 switch to B, whose cavity temperature has episodes
END_S = 36.0
EPISODE_GAP_S, EPISODE_S, EPISODE_SIGMAS = 1.5, 0.6, 6.0
CHANNEL = "cavity_temp_rise"


def episodes(device: str, start: float, end: float) -> list[EpisodeSpec]:
    """Level shifts of the cavity temperature rise, every EPISODE_GAP_S from ``start`` + 0.5 s."""
    out, at = [], start + 0.5
    while at + EPISODE_S < end - 0.3:
        out.append(EpisodeSpec(device, CHANNEL, "level_shift", at, EPISODE_S, EPISODE_SIGMAS))
        at += EPISODE_GAP_S
    return out


def switch_revision(client: paho.Client, station: DeviceRef, revision: str) -> None:
    request = {"correlation_id": f"e2e-{uuid.uuid4().hex[:8]}", "ts": time.time(),
               "args": {"product_revision": revision}}
    client.publish(station.command_topic("set_config"), schemas.dumps(request), qos=1).wait_for_publish(5)


def anomaly_starts(messages: list[paho.MQTTMessage]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if topics.parse(message.topic).kind == Kind.ANOMALY.value:
            document = schemas.loads("anomaly_event", bytes(message.payload))
            if document["phase"] == "start":
                out.append(document)
    return out


def wait_quiet(count: Callable[[], int], quiet_s: float = 1.5, timeout_s: float = 20.0) -> None:
    """Wait until ``count()`` has not changed for ``quiet_s`` (the pipeline has drained)."""
    deadline = time.monotonic() + timeout_s
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
    raise AssertionError(f"the pipeline did not drain within {timeout_s} s")


def anomaly_rates(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["channel"]: c for c in document["comparisons"] if c["kpi"] == "anomaly_rate"}


def test_revision_with_cavity_temperature_episodes_is_flagged_end_to_end_over_mqtt(
        mosquitto: Any, mqtt_settings: MqttSettings, tenant: str, collect: Any, tmp_path: Path) -> None:
    defect_lines = [DeviceRef(tenant, "plant", area, "power") for area in ("line1", "line3")]
    null_line = DeviceRef(tenant, "plant", "line2", "power")
    fleet = FleetSpec(
        tenant=tenant, site="plant",
        lines=(LineSpec("MW-20", "A", area="line1"), LineSpec("MW-30", "A", area="line2"),
               LineSpec("MW-20", "A", area="line3")),
        anomalies=AnomalySpec(episodes=(*episodes(defect_lines[0].key, DEFECT_SWITCH_S, END_S),
                                        *episodes(defect_lines[1].key, DEFECT_SWITCH_S, END_S),
                                        *episodes(null_line.key, WARMUP_S, END_S))),
    )
    watcher = collect(topics.device_filter(Kind.ANOMALY, tenant), topics.device_filter(Kind.CMDRES, tenant))
    twin_config = TwinConfig(broker=f"mqtt://{mosquitto.host}:{mosquitto.port}", tenants=(tenant,),
                             worker_id=f"e2e-{tenant}", publish_interval_s=0.5, fleet_interval_s=1.0,
                             snapshot_dir=str(tmp_path / "snapshots"))
    # One decision when the run is over (a look at >= 200 units, the next at 20 000): the default
    # schedule (first look at 100 units, growth 1.5) would decide this 40 s run's ~800 units per model at
    # look 6, whose level (0.0014) needs more anomaly events than a minute of wall time yields.
    loop = LoopService(mqtt_settings, ServiceConfig(tenant=tenant, interval_s=3600.0, client_id=f"loop-{tenant}",
                                                    loop=LoopConfig(first_look=200, look_growth=100.0)))
    operator = connect(mqtt_settings)
    with TwinService(twin_config) as twin:
        started = time.time()
        agent = start_simulated_fleet(mqtt_settings, fleet, speed=SPEED, seed=5, rate_hz=RATE_HZ,
                                      spool_path=tmp_path / "spool.sqlite", auto_jobs=False)
        try:
            time.sleep(max(0.0, started + WARMUP_S - time.time()))
            heard_before_loop = len(watcher.messages)
            loop.start()
            try:
                for at, line in ((NULL_SWITCH_S, null_line), *((DEFECT_SWITCH_S, ref) for ref in defect_lines)):
                    time.sleep(max(0.0, started + at - time.time()))
                    switch_revision(operator, DeviceRef(tenant, "plant", line.area, "assembly"), "B")
                time.sleep(max(0.0, started + END_S - time.time()))
            finally:
                agent.stop()
            wait_quiet(lambda: loop.counters["messages"])
            assert loop.publish_due() == 2
        finally:
            loop.stop()
            operator.disconnect()
            operator.loop_stop()
        assert twin.ingestor.counters.anomaly_events > 0

    # The commands went through: every line acknowledged the switch.
    responses = [json.loads(m.payload) for m in watcher.messages if "/cmdres/" in m.topic]
    assert len(responses) == 3 and all(r["ok"] for r in responses), responses

    # The insights are retained: a client connecting now gets them.
    reader = collect(topics.insights_filter(tenant))
    retained = reader.wait_for(lambda msgs: len({m.topic for m in msgs}) == 2, timeout=10)
    documents = {topics.parse(m.topic).model: schemas.loads("insights", bytes(m.payload)) for m in retained}
    assert set(documents) == {"MW-20", "MW-30"}
    counters = loop.store.counters
    assert counters.rejected == 0 and counters.unattributed_anomalies == 0 and loop.counters["dead_letters"] == 0

    # Every anomaly event of a line station carries the station's model and revision; the defect lines'
    # cavity events name the revision being built when they started.
    starts = anomaly_starts(watcher.messages[heard_before_loop:])
    assert all(s.get("product_model") and s.get("product_revision") for s in starts), starts
    published: dict[str, Counter[str]] = {"MW-20": Counter(), "MW-30": Counter()}
    power_stations = {ref.key for ref in (*defect_lines, null_line)}
    for start in starts:
        if start["device"] in power_stations and CHANNEL in start.get("channels", ()):
            published[start["product_model"]][start["product_revision"]] += 1

    defect = documents["MW-20"]
    units = {r["revision"]: r["units"] for r in defect["revisions"]}
    assert units["A"] >= 300 and units["B"] >= 300, units
    cavity = anomaly_rates(defect)[CHANNEL]
    # What the twin published is what the loop counted, per revision.
    assert (cavity["evidence"]["revision"]["events"], cavity["evidence"]["baseline"]["events"]) == (
        published["MW-20"]["B"], published["MW-20"]["A"])
    assert published["MW-20"]["B"] >= 6, published
    flagged = {(i["revision"], i["kpi"], i["channel"], i["direction"]) for i in defect["insights"]
               if i["kpi"] == "anomaly_rate"}
    assert flagged == {("B", "anomaly_rate", CHANNEL, "worse")}, defect["insights"]
    [insight] = [i for i in defect["insights"] if i["kpi"] == "anomaly_rate"]
    assert insight["q_value"] <= defect["look_alpha"] and insight["test"] == "poisson_exact"
    assert insight["ci"][0] is not None and insight["ci"][0] > 1.0  # the rate ratio's lower bound

    same = documents["MW-30"]
    cavity = anomaly_rates(same)[CHANNEL]
    events = (cavity["evidence"]["revision"]["events"], cavity["evidence"]["baseline"]["events"])
    assert events == (published["MW-30"]["B"], published["MW-30"]["A"])
    assert min(events) >= 3, events  # the identical revisions really had anomalies to compare
    assert not [i for i in same["insights"] if i["kpi"] == "anomaly_rate"], same["insights"]
    print(f"MW-20 units {units}, cavity anomaly starts {dict(published['MW-20'])}, effect {insight['effect']}, "
          f"CI {insight['ci']}, p {insight['p_value']:.2g}, q {insight['q_value']:.2g}; MW-30 starts "
          f"{dict(published['MW-30'])}, p {cavity['p_value']:.2g}")
