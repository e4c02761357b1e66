"""Detection quality of the twin core on the agent's simulated fleet, against its ground-truth labels.

The demo fleet of the edge agent's simulator (``edge_agent.sources.simulator.demo_fleet``: seven
printers of every technology and the four stations of an oven line) runs with random anomaly
episodes (drift, spike, stuck, level_shift, noise; 4–8 σ, 20–120 s) that the simulator writes to a
labels file. Its telemetry goes through ``twin.core.FleetCore`` with the twin's default settings (or
another ``--detector``) in one-minute batches (as the twin ingests), and the anomaly events are
scored against the labels:

* **recall**: share of episodes that an event covers — an event of the episode's device open at
  some time in ``[start, end + grace]`` (the EWMA chart lags a little, and an event already open
  for an earlier incident counts: one incident = one event also when incidents follow each other);
* **false events**: event starts that no episode of the device explains (``[start − 5 s, end +
  grace]``), also per device-hour;
* **event starts per detected episode**: events that start in a detected episode's window (1.0 =
  one event per incident; below 1 when an earlier incident's event still covers the next one,
  above 1 when an incident is split into several events).

Episodes that start in the warm-up (``--warmup-s``, default 15 min: the detectors' baselines need
60 samples per channel and state group first) are not scored, nor events that start in it. Stuck
episodes (the sensor repeats one value) are reported, but the detectors score distances from a
baseline, not repeats, so they are found only when the stuck value is far from it.

Run: ``python bench/sim_detect.py [--seeds 0 1] [--hours 1.5] [--rate 4] [--detector NAME]`` (default:
the twin's default detector). Progress goes to stderr;
the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.device import DeviceInfo  # noqa: E402
from edge_agent.sources.simulator import SimulatorSource, demo_fleet  # noqa: E402
from twin.core import CoreConfig, FleetCore  # noqa: E402
from twin.core.config import DETECTORS  # noqa: E402

START_S = 1_700_000_000.0
GRACE_S = 30.0
LEAD_S = 5.0


@dataclass
class _Stream:
    """Collects one device's samples as the twin would receive them (core slots, µs, values)."""

    device: int
    slots: list[int]
    out: dict[str, list[Any]]
    _info: DeviceInfo

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def add(self, channel: int, t_us: int, value: float) -> None:
        self.extend([channel], [t_us], [value])

    def extend(self, channels: Any, t_us: Any, values: Any) -> None:
        self.out["device"] += [self.device] * len(channels)
        self.out["slot"] += [self.slots[c] for c in channels]
        self.out["t"] += list(t_us)
        self.out["value"] += list(values)

    def event(self, document: dict[str, Any]) -> None:
        pass  # unit and job events are not what the detectors score

    def announce(self, info: DeviceInfo) -> None:
        self._info = info


@dataclass
class _Sink:
    core: FleetCore
    out: dict[str, list[Any]] = field(default_factory=lambda: {"device": [], "slot": [], "t": [], "value": []})

    def stream(self, info: DeviceInfo) -> _Stream:
        d = self.core.add_device(info.key, technology=info.technology, channels=info.channels)
        slots = [self.core.channel_index(d, name) for name in info.channels]
        return _Stream(d, slots, self.out, info)

    def flush(self) -> int:
        out = self.out
        n = len(out["t"])
        if n:
            self.core.ingest(
                np.array(out["device"], np.int32),
                np.array(out["slot"], np.int32),
                np.array(out["t"], np.int64),
                np.array(out["value"], np.float64),
            )
            for column in out.values():
                column.clear()
        return n


def run_seed(
    seed: int, hours: float, rate_per_hour: float, speed: float, detector: str = CoreConfig().detector
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Simulate; return the labelled episodes (from the labels file) and the core's events."""
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = Path(tmp) / "labels.jsonl"
        source = SimulatorSource(
            demo_fleet(str(labels_path), anomaly_rate_per_hour=rate_per_hour),
            seed=seed, speed=speed, rate_hz=1.0, tick_s=1.0, start_s=START_S,
        )  # fmt: skip
        core = FleetCore(max_devices=16, config=CoreConfig(detector=detector))
        sink = _Sink(core)
        source.attach(sink)
        events = []
        steps = int(hours * 3600)
        for k in range(1, steps + 1):
            source.step(START_S + k)
            if k % 60 == 0 or k == steps:  # the twin ingests in cycles; one minute here
                sink.flush()
                events += core.drain_events()
        if source.injector is not None:
            source.injector.close()
        labels = [json.loads(line) for line in labels_path.read_text().splitlines() if line.strip()]
    end_s = START_S + steps
    named = [{"device": core.devices[e.device], "phase": e.phase, "t": e.t_us / 1e6, "channels": e.channels}
             for e in events]  # fmt: skip
    return [lab for lab in labels if lab["start_ts"] < end_s], _intervals(named, end_s)


def _intervals(events: list[dict[str, Any]], end_s: float) -> list[dict[str, Any]]:
    """Pair start and end events per device into incidents [start, end] (open ones end at the run's end)."""
    open_: dict[str, dict[str, Any]] = {}
    out = []
    for e in events:
        if e["phase"] == "start":
            open_[e["device"]] = {"device": e["device"], "start": e["t"], "end": end_s, "channels": e["channels"]}
            out.append(open_[e["device"]])
        elif e["device"] in open_:
            open_.pop(e["device"])["end"] = e["t"]
    return out


def score(labels: list[dict[str, Any]], incidents: list[dict[str, Any]], warmup_end: float) -> dict[str, Any]:
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for inc in incidents:
        by_device[inc["device"]].append(inc)
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    fragments: list[int] = []
    channel_hits = 0
    for lab in labels:
        if lab["start_ts"] < warmup_end:
            continue
        lo, hi = lab["start_ts"], lab["end_ts"] + GRACE_S
        covering = [i for i in by_device[lab["device"]] if i["start"] <= hi and i["end"] >= lo]
        group = "line" if "/line1/" in lab["device"] else "printers"
        per_kind[f"{group}/{lab['kind']}"]["episodes"] += 1
        if covering:
            per_kind[f"{group}/{lab['kind']}"]["detected"] += 1
            fragments.append(sum(1 for i in covering if i["start"] >= lo - LEAD_S))
            channel_hits += any(lab["channel"] in i["channels"] for i in covering)
    false: Counter[str] = Counter()
    for inc in incidents:
        if inc["start"] < warmup_end:
            continue
        explained = any(
            lab["device"] == inc["device"] and lab["start_ts"] - LEAD_S <= inc["start"] <= lab["end_ts"] + GRACE_S
            for lab in labels
        )
        if not explained:
            false["line" if "/line1/" in inc["device"] else "printers"] += 1
    return {"per_kind": per_kind, "false": false, "fragments": fragments, "channel_hits": channel_hits}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--hours", type=float, default=1.5, help="simulated wall-clock hours per seed")
    parser.add_argument("--rate", type=float, default=4.0, help="random episodes per device and hour")
    parser.add_argument("--speed", type=float, default=60.0, help="process time / sample time")
    parser.add_argument("--warmup-s", type=float, default=900.0)
    parser.add_argument("--detector", choices=DETECTORS, default=CoreConfig().detector)
    args = parser.parse_args()
    began = time.time()
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    false: Counter[str] = Counter()
    fragments: list[int] = []
    channel_hits = 0
    incidents_total = 0
    for seed in args.seeds:
        labels, incidents = run_seed(seed, args.hours, args.rate, args.speed, args.detector)
        result = score(labels, incidents, START_S + args.warmup_s)
        for kind, counts in result["per_kind"].items():
            kinds[kind].update(counts)
        false.update(result["false"])
        fragments += result["fragments"]
        channel_hits += result["channel_hits"]
        incidents_total += sum(1 for i in incidents if i["start"] >= START_S + args.warmup_s)
        print(f"seed {seed}: {len(labels)} episodes, {len(incidents)} events, false {dict(result['false'])} "
              f"({time.time() - began:.0f} s)", file=sys.stderr)  # fmt: skip
    scored_hours = len(args.seeds) * (args.hours - args.warmup_s / 3600.0)
    devices = {"printers": 7, "line": 4}

    def recall(prefix: str) -> dict[str, Any]:
        rows = {k.split("/", 1)[1]: v for k, v in sorted(kinds.items()) if k.startswith(prefix + "/")}
        episodes = sum(v["episodes"] for v in rows.values())
        detected = sum(v["detected"] for v in rows.values())
        return {
            "episodes": episodes,
            "detected": detected,
            "recall": round(detected / episodes, 3) if episodes else None,
            "recall_by_kind": {k: round(v["detected"] / v["episodes"], 3) for k, v in rows.items() if v["episodes"]},
            "false_events": false[prefix],
            "false_events_per_device_hour": round(false[prefix] / (devices[prefix] * scored_hours), 3),
        }

    detected = len(fragments)
    figures = {
        "benchmark": "sim_detect",
        "detector": args.detector,
        "seeds": args.seeds,
        "hours_per_seed": args.hours,
        "warmup_s": args.warmup_s,
        "episodes_per_device_hour": args.rate,
        "speed": args.speed,
        "printers": recall("printers"),
        "line": recall("line"),
        "events": incidents_total,
        "precision": round(1 - sum(false.values()) / incidents_total, 3) if incidents_total else None,
        "event_starts_per_detected_episode": round(float(np.mean(fragments)), 3) if fragments else None,
        "channel_named_share": round(channel_hits / detected, 3) if detected else None,
        "seconds": round(time.time() - began, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
