"""A seeded generator of microwave-oven line data per product revision, with injectable defects.

It writes exactly the messages the real system carries (birth messages and ``unit_produced`` events
of each station, the twin's anomaly events, customers' feedback), so the loop's tests and demos
exercise the same intake path as production. Stations of the line and what they measure:

========== ================================================ ============================================
station    channels                                         fails a unit when
========== ================================================ ============================================
assembly   cycle_time                                       (assembly scrap, rare: defect ``assembly``)
power      magnetron_power (W), cavity_temp_rise (K)        power < 750 W, temperature rise out of 10-13 K
leak       door_leakage (mW/cm2, lognormal)                 leakage > 1.0 mW/cm2
safety     hipot_current (mA), insulation_resistance (MOhm) current > 3 mA, resistance < 2 MOhm
========== ================================================ ============================================

Anomaly events (as the twin publishes them) start on a station's channel at a per-unit rate; they
carry no product revision, so the loop attributes them through the station's production timeline.

Example:
    >>> messages = simulate_line("acme", "MW-20", [RevisionProfile("A", units=3)], seed=7)
    >>> sorted({m.payload.get("type", "status") for m in messages})
    ['status', 'unit_produced']
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef

STATIONS: dict[str, tuple[str, ...]] = {
    "assembly": (),
    "power": ("magnetron_power", "cavity_temp_rise"),
    "leak": ("door_leakage",),
    "safety": ("hipot_current", "insulation_resistance"),
}
NOMINAL_CYCLE_TIME_S = {"assembly": 42.0, "power": 65.0, "leak": 18.0, "safety": 24.0}
NOMINAL_ANOMALY_RATE = {  # anomaly starts per unit, per channel
    "magnetron_power": 0.01, "cavity_temp_rise": 0.015, "door_leakage": 0.01, "hipot_current": 0.005,
    "insulation_resistance": 0.005, "cycle_time": 0.01,
}
EXCURSION_UNITS = 6  # units an excursion lasts
EXCURSION_SHIFT = {  # added to a measured channel during an excursion (about 6 standard deviations)
    "magnetron_power": -90.0, "cavity_temp_rise": 2.5, "door_leakage": 0.6, "hipot_current": 1.8,
    "insulation_resistance": -400.0,
}
COMPLAINT_CATEGORIES = ("heating", "door", "noise", "electrical", "display", "cosmetic")


@dataclass(frozen=True)
class RevisionProfile:
    """One revision's production run and how it differs from nominal (1.0 / 0.0 / {} = nominal)."""

    revision: str
    units: int = 1000
    door_leakage_scale: float = 1.0  # multiplies the median door leakage (door-seal defects)
    magnetron_power_shift_w: float = 0.0
    cavity_temp_rise_shift_k: float = 0.0
    cycle_time_shift_s: dict[str, float] = field(default_factory=dict)  # station -> added seconds
    anomaly_rate_scale: dict[str, float] = field(default_factory=dict)  # channel -> multiplier
    assembly_scrap_rate: float = 0.003
    field_fault_rate: float = 0.01  # per unit shipped
    complaint_rate: dict[str, float] = field(default_factory=dict)  # category -> per unit shipped
    review_rate: float = 0.08  # share of shipped units whose user leaves a rating
    rating_weights: tuple[float, float, float, float, float] = (0.03, 0.05, 0.15, 0.37, 0.40)
    # Process excursions in the measured values themselves (what the twin's detectors see in telemetry):
    # channel -> probability per unit that an excursion of EXCURSION_UNITS units starts. 0 = none.
    excursion_rate: dict[str, float] = field(default_factory=dict)

    def anomaly_rate(self, channel: str) -> float:
        return NOMINAL_ANOMALY_RATE.get(channel, 0.0) * self.anomaly_rate_scale.get(channel, 1.0)


@dataclass(frozen=True)
class Message:
    """One MQTT message: topic and JSON document (``wire()`` gives the bytes, validated by schema)."""

    topic: str
    payload: dict[str, Any]
    schema: str

    def wire(self) -> tuple[str, bytes]:
        schemas.validate(self.schema, self.payload)
        return self.topic, schemas.dumps(self.payload)

    def to_json(self) -> str:
        return json.dumps({"topic": self.topic, "payload": self.payload}, separators=(",", ":"))


def simulate_line(
    tenant: str,
    model: str,
    revisions: Sequence[RevisionProfile],
    *,
    seed: int,
    site: str = "plant1",
    area: str = "line1",
    start_ts: float = 1_700_000_000.0,
    takt_s: float = 70.0,
    feedback: bool = True,
    twin_anomalies: bool = True,
) -> list[Message]:
    """Messages of producing ``revisions`` one after the other on one line, sorted by time.

    ``twin_anomalies=False`` leaves out the simulated anomaly events, for runs where the real twin core
    detects anomalies in :func:`unit_telemetry` instead."""
    rng = random.Random(seed)
    devices = {name: DeviceRef(tenant, site, area, name) for name in STATIONS}
    event_topics = {name: device.event_topic for name, device in devices.items()}
    messages: list[Message] = []
    ts = start_ts
    serial_number = 0
    excursions: dict[str, int] = {}  # channel -> units the running excursion still lasts
    for profile in revisions:
        for name, device in devices.items():
            # The stations announce the revision they are set up for when production of it starts.
            channels = [{"name": c, "unit": _unit(c)} for c in (*STATIONS[name], "cycle_time")]
            messages.append(Message(device.status_topic, {
                "status": "online", "ts": ts, "technology": "line", "channels": channels,
                "product_model": model, "product_revision": profile.revision,
            }, "status"))
        for _ in range(profile.units):
            serial_number += 1
            serial = f"{model}-{seed}-{serial_number:07d}"
            ts += takt_s * rng.uniform(0.9, 1.1)
            good = True
            station_ts = ts
            for name, device in devices.items():
                station_ts += 1.0
                report = _station_report(rng, profile, name)
                if profile.excursion_rate:
                    _apply_excursions(rng, profile, report, excursions)
                event: dict[str, Any] = {
                    "type": "unit_produced", "ts": round(station_ts, 3), "serial": serial,
                    "product_model": model, "product_revision": profile.revision, "good": report.good,
                    "cycle_time": round(report.cycle_time, 3),
                }
                if report.measurements:
                    event["measurements"] = report.measurements
                if report.defect:
                    event["defect"] = report.defect
                messages.append(Message(event_topics[name], event, "event"))
                for channel in (*STATIONS[name], "cycle_time") if twin_anomalies else ():
                    if rng.random() < profile.anomaly_rate(channel):
                        messages += _anomaly(device, channel, station_ts + rng.uniform(0.1, 0.9), rng)
                if not report.good:
                    good = False
                    break  # a failed unit leaves the line for rework
            if good and feedback:
                messages += _feedback(rng, tenant, model, profile, serial, ts)
    messages.sort(key=lambda m: m.payload["ts"])
    return messages


@dataclass
class _Report:
    good: bool
    cycle_time: float
    measurements: dict[str, float]
    defect: str | None


def _station_report(rng: random.Random, profile: RevisionProfile, station: str) -> _Report:
    cycle_time = NOMINAL_CYCLE_TIME_S[station] * rng.lognormvariate(0, 0.05) + profile.cycle_time_shift_s.get(
        station, 0.0)
    measurements: dict[str, float] = {}
    defect: str | None = None
    if station == "assembly" and rng.random() < profile.assembly_scrap_rate:
        defect = "assembly"
    elif station == "power":
        power = rng.gauss(800 + profile.magnetron_power_shift_w, 15)
        # 1 kg water load heated for 60 s: rise = P t / (c m), with a little loss and measurement noise.
        rise = power * 60 / 4186 * 0.985 * rng.gauss(1, 0.025) + profile.cavity_temp_rise_shift_k
        measurements = {"magnetron_power": round(power, 2), "cavity_temp_rise": round(rise, 3)}
        if power < 750:
            defect = "magnetron_power"
        elif not 10 <= rise <= 13:
            defect = "cavity_temp_rise"
    elif station == "leak":
        leakage = 0.2 * profile.door_leakage_scale * rng.lognormvariate(0, 0.6)
        measurements = {"door_leakage": round(leakage, 4)}
        if leakage > 1.0:
            defect = "door_leakage"
    elif station == "safety":
        current = max(0.0, rng.gauss(1.2, 0.3))
        resistance = 500 * rng.lognormvariate(0, 0.4)
        measurements = {"hipot_current": round(current, 3), "insulation_resistance": round(resistance, 1)}
        if current > 3:
            defect = "hipot_current"
        elif resistance < 2:
            defect = "insulation_resistance"
    return _Report(defect is None, cycle_time, measurements, defect)


def _apply_excursions(rng: random.Random, profile: RevisionProfile, report: _Report,
                      excursions: dict[str, int]) -> None:
    for channel in list(report.measurements):
        if excursions.get(channel, 0) == 0 and rng.random() < profile.excursion_rate.get(channel, 0.0):
            excursions[channel] = EXCURSION_UNITS
        if excursions.get(channel, 0) > 0:
            excursions[channel] -= 1
            report.measurements[channel] = round(report.measurements[channel] + EXCURSION_SHIFT[channel], 4)


def unit_telemetry(messages: Iterable[Message]) -> dict[str, list[tuple[int, str, float]]]:
    """The telemetry a station's agent would send for the units it reports: per device key, samples
    ``(t_us, channel, value)`` of every measurement and the cycle time, with the machine state
    ``producing`` (for the twin core and its detectors)."""
    from forgeline.contract.vocabulary import DeviceState

    samples: dict[str, list[tuple[int, str, float]]] = {}
    for message in messages:
        if message.payload.get("type") != "unit_produced":
            continue
        parsed = topics.parse(message.topic)
        assert parsed.device is not None
        t_us = round(message.payload["ts"] * 1e6)
        rows = samples.setdefault(parsed.device.key, [])
        rows.append((t_us, "state", float(DeviceState.PRINTING)))
        rows.append((t_us, "cycle_time", float(message.payload["cycle_time"])))
        rows += [(t_us, channel, float(value)) for channel, value in message.payload.get("measurements", {}).items()]
    return samples


def _anomaly(device: DeviceRef, channel: str, ts: float, rng: random.Random) -> list[Message]:
    event_id = f"{device.device}-{channel}-{ts:.3f}"
    score = round(rng.uniform(0.7, 1.0), 3)
    start = {"device": device.key, "ts": round(ts, 3), "phase": "start", "score": score, "channels": [channel],
             "detector": "simulated", "event_id": event_id}
    end = {**start, "ts": round(ts + 30, 3), "phase": "end", "score": 0.1}
    return [Message(device.anomaly_topic, start, "anomaly_event"), Message(device.anomaly_topic, end, "anomaly_event")]


def _feedback(rng: random.Random, tenant: str, model: str, profile: RevisionProfile, serial: str,
              shipped_ts: float) -> list[Message]:
    topic = topics.feedback_topic(tenant, model, profile.revision)
    out: list[Message] = []

    def later() -> float:
        return round(shipped_ts + rng.uniform(7, 200) * 86400, 3)

    if rng.random() < profile.field_fault_rate:
        out.append(Message(topic, {"ts": later(), "serial": serial, "fault": True, "source": "service",
                                   "category": rng.choice(("heating", "electrical", "door")),
                                   "text": "service call"}, "feedback"))
    for category in COMPLAINT_CATEGORIES:
        if rng.random() < profile.complaint_rate.get(category, 0.004):
            out.append(Message(topic, {"ts": later(), "serial": serial, "source": "customer", "category": category,
                                       "rating": rng.choice((1, 2)), "text": f"complaint about {category}"},
                               "feedback"))
    if rng.random() < profile.review_rate:
        rating = rng.choices((1, 2, 3, 4, 5), weights=profile.rating_weights)[0]
        out.append(Message(topic, {"ts": later(), "serial": serial, "source": "user", "rating": rating,
                                   "category": "none"}, "feedback"))
    return out


def _unit(channel: str) -> str:
    from forgeline.contract.vocabulary import CHANNELS

    return CHANNELS[channel].unit


# --- recorded message files (JSON lines: {"topic": ..., "payload": {...}}) ------------------------------


def write_jsonl(messages: Iterable[Message], path: Path) -> int:
    count = 0
    with path.open("w") as out:
        for message in messages:
            out.write(message.to_json() + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[tuple[str, bytes]]:
    """Recorded messages as ``(topic, payload bytes)``; a line that is not such a record raises ValueError."""
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                topic, payload = record["topic"], record["payload"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not a {{'topic': ..., 'payload': ...}} record") from None
            if not isinstance(topic, str):
                raise ValueError(f"{path}:{number}: topic must be a string")
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload, allow_nan=False).encode()
            yield topic, data
