"""Realistic points for every measurement of ``forgeline/contract/timeseries.py``, for the dashboard tests.

Two factories and a competitor, over the last two hours at 30 s resolution, shaped like the twin
writes them: channel means and per-channel anomaly scores per device and interval, KPIs, anomaly
events (start/end), builds (start/finish), the fleet summary, routing state. The microwave line comes
from the loop's own simulator (``forgeline.loop.simulate``) and the loop's own InfluxDB writer makes
the ``insight`` and ``feedback`` points, so those are exactly what production writes.

Points are encoded by influxdb-client's ``Point`` (line protocol) and checked against the contract
before they are returned: a tag or field the contract does not name raises.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from influxdb_client import Point, WritePrecision

from forgeline.contract import topics
from forgeline.contract.timeseries import MEASUREMENTS
from forgeline.contract.vocabulary import CHANNELS, DeviceState
from forgeline.loop.compare import compare_model
from forgeline.loop.intake import LoopStore
from forgeline.loop.simulate import RevisionProfile, simulate_line
from forgeline.loop.timeseries_out import feedback_line, insight_lines

STEP_S = 30.0
SPAN_S = 2 * 3600.0

# channel -> (typical value, noise) of each technology; the line stations' channels come from the loop.
PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "FDM": {"nozzle_temp": (215.0, 1.5), "bed_temp": (60.0, 0.5), "vibration": (2.5, 0.4), "current": (1.8, 0.2),
            "voltage": (24.0, 0.1), "layer_progress": (0.0, 0.0), "layer": (0.0, 0.0)},
    "SLA": {"lamp_power": (45.0, 0.5), "resin_level": (0.7, 0.002), "chamber_temp": (31.0, 0.3),
            "layer_progress": (0.0, 0.0), "layer": (0.0, 0.0)},
    "SLS": {"laser_power": (30.0, 0.6), "chamber_temp": (172.0, 0.8), "powder_level": (0.6, 0.002),
            "oxygen": (800.0, 40.0), "layer_progress": (0.0, 0.0), "layer": (0.0, 0.0)},
    "MJF": {"lamp_power": (1500.0, 20.0), "chamber_temp": (165.0, 0.7), "powder_level": (0.8, 0.002),
            "layer_progress": (0.0, 0.0), "layer": (0.0, 0.0)},
    "metal": {"laser_power": (370.0, 8.0), "chamber_temp": (80.0, 0.5), "oxygen": (300.0, 30.0),
              "pressure": (1.05, 0.005), "flow_rate": (55.0, 1.5), "layer_progress": (0.0, 0.0),
              "layer": (0.0, 0.0)},
}
STATION_EXTRA: dict[str, dict[str, tuple[float, float]]] = {
    "assembly": {"current": (3.0, 0.3), "voltage": (400.0, 2.0)},
    "power": {"magnetron_power": (800.0, 15.0), "cavity_temp_rise": (11.3, 0.3), "temperature": (20.0, 0.2),
              "flow_rate": (2.0, 0.05)},
    "leak": {"door_leakage": (0.2, 0.08)},
    "safety": {"hipot_current": (1.2, 0.3), "insulation_resistance": (500.0, 80.0)},
}


@dataclass
class Dataset:
    """The points, and the facts tests check the dashboards against."""

    start: float
    end: float
    lines: list[str] = field(default_factory=list)
    devices: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # tenant -> (site, device, tech)
    online_at_end: dict[str, int] = field(default_factory=dict)  # tenant -> devices online at the end
    anomalous_at_end: dict[str, set[str]] = field(default_factory=dict)  # tenant -> devices with score >= 0.8
    serials: set[str] = field(default_factory=set)
    failed_serials: set[str] = field(default_factory=set)
    channels_of: dict[str, set[str]] = field(default_factory=dict)  # device -> channels written

    def add(self, point: Point) -> None:
        self.lines.append(_checked(point))


def _checked(point: Point) -> str:
    """The line protocol of ``point`` after checking it against the contract."""
    spec = MEASUREMENTS[point._name]
    unknown_tags = set(point._tags) - set(spec.tags)
    allowed_fields = set(spec.fields) | (set(CHANNELS) if "<channel>" in spec.fields else set())
    unknown_fields = set(point._fields) - allowed_fields
    if unknown_tags or unknown_fields:
        raise ValueError(f"{point._name}: not in the contract: tags {unknown_tags}, fields {unknown_fields}")
    for name, value in point._fields.items():
        kind = spec.fields.get(name, "float")
        if kind == "int" and not isinstance(value, int):
            raise ValueError(f"{point._name}.{name} is an int field, got {value!r}")
        if kind == "float" and not isinstance(value, float):
            raise ValueError(f"{point._name}.{name} is a float field, got {value!r}")
    text: str = point.to_line_protocol()
    return text


def _point(measurement: str, tags: dict[str, str], fields: dict[str, Any], ts: float) -> Point:
    point = Point(measurement)
    for key, value in tags.items():
        point.tag(key, value)
    for key, value in fields.items():
        point.field(key, value)
    return point.time(round(ts * 1e9), WritePrecision.NS)


def _device_series(data: Dataset, rng: random.Random, tenant: str, site: str, area: str, device: str,
                   technology: str, channels: dict[str, tuple[float, float]], *, anomaly_channel: str | None = None,
                   offline_after: float | None = None, job_minutes: float = 40.0) -> None:
    """Telemetry, channel scores, KPIs, builds and anomaly events of one device."""
    tags = {"tenant": tenant, "site": site, "area": area, "device": device, "technology": technology}
    data.devices.setdefault(tenant, []).append((site, device, technology))
    data.channels_of[device] = {*channels, "state"}
    steps = int(SPAN_S / STEP_S)
    anomaly_from = data.end - 15 * 60  # the anomaly runs until the end: the device is anomalous "now"
    event_open = False
    produced = good = 0
    job = 0
    phase_minutes = rng.uniform(0, job_minutes)  # devices of a fleet do not start builds in lockstep
    for i in range(steps + 1):
        ts = data.start + i * STEP_S
        online = offline_after is None or ts < offline_after
        minute = (ts - data.start) / 60.0 + phase_minutes
        cycle = (minute % job_minutes) / job_minutes
        state = DeviceState.OFFLINE if not online else DeviceState.HEATING if cycle < 0.08 else (
            DeviceState.PRINTING if cycle < 0.9 else DeviceState.IDLE)
        if online and cycle < STEP_S / 60.0 / job_minutes:  # a build starts
            job += 1
            fill = rng.uniform(0.35, 0.8) if technology in ("SLS", "MJF", "metal") else rng.uniform(0.2, 0.6)
            data.add(_point("build", {**tags, "material": "PA12" if technology != "FDM" else "PLA", "phase": "start"},
                            {"job_id": f"{device}-job{job}", "chamber_fill": fill, "packing_density": fill * 0.9,
                             "build_height_mm": rng.uniform(80, 300), "parts": rng.randint(4, 120)}, ts))
        if online and job and 0.9 <= cycle < 0.9 + STEP_S / 60.0 / job_minutes:
            data.add(_point("build", {**tags, "material": "PA12" if technology != "FDM" else "PLA",
                                      "phase": "finish"},
                            {"job_id": f"{device}-job{job}", "chamber_fill": 0.5, "packing_density": 0.45,
                             "build_height_mm": 120.0, "parts": 10}, ts))
        if not online:
            data.add(_point("kpi", tags, {"state": int(state), "online": 0, "utilization": 0.0,
                                          "availability": 0.0, "anomaly_score": 0.0}, ts))
            continue
        values: dict[str, Any] = {}
        scores: dict[str, Any] = {}
        for channel, (typical, noise) in channels.items():
            value = typical + rng.gauss(0, noise)
            if channel == "layer_progress":
                value = min(1.0, max(0.0, (cycle - 0.08) / 0.82))
            elif channel == "layer":
                value = float(int(max(0.0, (cycle - 0.08) / 0.82) * 1200))
            score = min(1.0, abs(rng.gauss(0, 0.08)))
            if channel == anomaly_channel and ts >= anomaly_from:
                value += 12 * noise + 4.0 * (ts - anomaly_from) / 900 * noise
                score = 0.9 + 0.09 * rng.random()
            values[channel] = float(value)
            scores[channel] = float(score)
        values["state"] = float(int(state))
        produced += 1 if state == DeviceState.PRINTING else 0
        good += 1 if state == DeviceState.PRINTING and rng.random() > 0.02 else 0
        data.add(_point("telemetry", tags, values, ts))
        data.add(_point("channel_score", tags, scores, ts))
        device_score = max(scores.values()) if scores else 0.0
        availability = 0.93 + 0.05 * math.sin(i / 30)
        effectiveness = 0.85 + rng.uniform(-0.03, 0.03)
        quality = good / produced if produced else 1.0
        utilization = 0.55 + 0.3 * math.sin(i / 50) ** 2
        data.add(_point("kpi", tags, {
            "utilization": utilization, "availability": availability, "effectiveness": effectiveness,
            "quality": quality, "oee": availability * effectiveness * quality,
            "chamber_fill": 0.4 + 0.2 * math.cos(job), "fill_realised": 0.35 + 0.2 * math.cos(job),
            "anomaly_score": device_score, "state": int(state), "online": 1}, ts))
        if anomaly_channel and ts >= anomaly_from and not event_open:
            event_open = True
            data.add(_point("anomaly", {**tags, "phase": "start"}, {
                "score": device_score, "channels": anomaly_channel, "event_id": f"{device}-ev1"}, ts))
        # an earlier, closed event: start and end
        if i == steps // 3:
            data.add(_point("anomaly", {**tags, "phase": "start"},
                            {"score": 0.83, "channels": next(iter(channels)), "event_id": f"{device}-ev0"}, ts))
        if i == steps // 3 + 6:
            data.add(_point("anomaly", {**tags, "phase": "end"},
                            {"score": 0.41, "channels": next(iter(channels)), "event_id": f"{device}-ev0"}, ts))
    if offline_after is None or offline_after > data.end:
        data.online_at_end[tenant] = data.online_at_end.get(tenant, 0) + 1
    else:
        data.online_at_end.setdefault(tenant, 0)
    if anomaly_channel:
        data.anomalous_at_end.setdefault(tenant, set()).add(device)
    else:
        data.anomalous_at_end.setdefault(tenant, set())


def _fleet_and_routing(data: Dataset, rng: random.Random, tenant: str, technologies: list[str]) -> None:
    count = len(data.devices[tenant])
    for i in range(int(SPAN_S / STEP_S) + 1):
        ts = data.start + i * STEP_S
        data.add(_point("fleet", {"tenant": tenant}, {
            "devices": count, "online": count, "utilization": 0.6 + rng.uniform(-0.05, 0.05),
            "oee": 0.55 + rng.uniform(-0.05, 0.05), "chamber_fill": 0.5 + rng.uniform(-0.05, 0.05),
            "anomalous": 1 if ts > data.end - 900 else 0}, ts))
        for technology in technologies:
            data.add(_point("routing", {"tenant": tenant, "technology": technology}, {
                "queued_parts": rng.randint(10, 400), "open_builds": rng.randint(1, 6),
                "open_build_fill": rng.uniform(0.2, 0.75), "released_builds": i // 20,
                "on_time_rate": min(1.0, 0.93 + rng.uniform(-0.04, 0.06))}, ts))
    data.add(_point("twin_ops", {"worker": "twin-0"}, {"samples": 1000, "messages": 50, "dead_letters": 0,
                                                       "lag_s": 0.2}, data.end))


def _microwave_line(data: Dataset, rng: random.Random, tenant: str, site: str, area: str) -> None:
    """Units from the loop's line simulator, station telemetry/KPIs, and the loop's insight/feedback points."""
    profiles = [RevisionProfile("A", units=40), RevisionProfile("B", units=40, door_leakage_scale=2.5)]
    messages = simulate_line(tenant, "MW-20", profiles, seed=11, site=site, area=area,
                             start_ts=data.start + 60, takt_s=(SPAN_S - 600) / 80)
    store = LoopStore()
    for message in messages:
        store.ingest_all([message.wire()])
        payload = message.payload
        if message.schema == "event" and payload.get("type") == "unit_produced":
            device = topics.parse(message.topic).device
            assert device is not None
            data.serials.add(payload["serial"])
            if not payload["good"]:
                data.failed_serials.add(payload["serial"])
            fields: dict[str, Any] = {"good": int(payload["good"]), "cycle_time": float(payload["cycle_time"]),
                                      "serial": payload["serial"]}
            if payload.get("defect"):
                fields["defect"] = payload["defect"]
            data.add(_point("unit", {"tenant": tenant, "site": site, "area": area, "device": device.device,
                                     "product_model": payload["product_model"],
                                     "product_revision": payload["product_revision"]}, fields, payload["ts"]))
        elif message.schema == "feedback":
            parsed = topics.parse(message.topic)
            # The simulator dates feedback weeks after shipping; fold it into the window the dashboards show.
            arrived = {**payload, "ts": data.start + (payload["ts"] - data.start) % SPAN_S}
            data.lines.append(feedback_line(tenant, parsed.model or "", parsed.revision or "", arrived))
    # Two evaluations of the loop, an hour apart, as the loop service writes them.
    for ts in (data.end - 3600, data.end - 60):
        document = compare_model(store.model(tenant, "MW-20"), ts=ts)
        data.lines += insight_lines(tenant, document)
    for station, channels in STATION_EXTRA.items():
        _device_series(data, rng, tenant, site, area, station, "line", {**channels, "cycle_time": (40.0, 2.0),
                       "produced_total": (0.0, 0.0)}, anomaly_channel="door_leakage" if station == "leak" else None,
                       job_minutes=25.0)


def make_dataset(end: float) -> Dataset:
    """Points of the two hours before ``end`` (seconds since the epoch)."""
    rng = random.Random(2024)
    data = Dataset(start=end - SPAN_S, end=end)
    acme = [("munich", "fdm-01", "FDM"), ("munich", "sla-01", "SLA"), ("munich", "sls-01", "SLS"),
            ("leipzig", "mjf-01", "MJF"), ("leipzig", "metal-01", "metal")]
    for site, device, technology in acme:
        _device_series(data, rng, "acme", site, "hall1", device, technology, PROFILES[technology],
                       anomaly_channel="chamber_temp" if device == "sls-01" else None,
                       offline_after=data.end - 1800 if device == "sla-01" else None)
    _fleet_and_routing(data, rng, "acme", ["FDM", "SLA", "SLS", "MJF", "metal"])
    # A competitor with look-alike names: no acme query may return any of it.
    _device_series(data, rng, "rival", "munich", "hall1", "rival-fdm", "FDM", PROFILES["FDM"],
                   anomaly_channel="nozzle_temp")
    _fleet_and_routing(data, rng, "rival", ["FDM"])
    _microwave_line(data, rng, "kitchenworks", "plant1", "line1")
    _fleet_and_routing(data, rng, "kitchenworks", ["line"])
    return data
