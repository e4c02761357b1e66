"""Benchmark of the edge agent against a real Mosquitto: publish rate with batching on one core, CPU seconds
per million samples, resident memory, and the replay of a 1-million-sample backlog after an outage.

What is measured (the agent process is pinned to one CPU; Mosquitto and the counting subscriber run in
other processes, on the other CPU when there is one):

- ``samples_per_s``: a synthetic source pushes samples (16 channels, 100 samples per call, as a PLC or
  printer poll delivers them) through the whole agent path: batching, FLT1 encoding, the SQLite spool
  (WAL), QoS 1 publishing and deletion after PUBACK. Timed from the first sample to the last PUBACK; a
  separate subscriber process confirms every sample arrived.
- ``cpu_s_per_million_samples``: process CPU time (all threads) over the same run.
- ``rss_mb``: peak resident set size of the agent process.
- ``replay_1m_s``: 1 M samples spooled while the broker is down (an agent on a dead port, stopped without
  draining); a new agent on the same spool connects to the broker and replays; timed from its start to
  the last PUBACK, with the subscriber confirming all samples arrived.

Baselines, in the same run, on the same core and broker:

- ``baseline_per_sample_json``: one JSON message per sample with QoS 1 (what a naive agent does);
- ``baseline_raw_batches``: the same FLT1 batches published by a bare paho loop with no spool, no
  batching buffers, no agent: the floor the agent's machinery adds to.

Targets (issue 3): at least 200k samples/s from one agent process; a 1 M backlog replayed in under 15 s.

    python bench/agent_bench.py [--quick] [--samples N] [--backlog N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent import Agent, BatchSettings, LinkSettings
from edge_agent.config import SpoolSettings
from edge_agent.device import DeviceInfo
from edge_agent.sources.base import Sink, Source
from forgeline.broker import free_port, start_mosquitto
from forgeline.contract import telemetry
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, connect

CHANNELS = ("state", "nozzle_temp", "bed_temp", "chamber_temp", "vibration", "layer_progress", "layer",
            "produced_total", "good_total", "scrap_total", "laser_power", "lamp_power", "powder_level",
            "resin_level", "oxygen", "current")
CHUNK = 100

SUBSCRIBER = r"""
import sys, time, threading
sys.path.insert(0, sys.argv[4])
from forgeline.contract import telemetry
from forgeline.mqtt import MqttSettings, connect
host, port, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = {}
done = threading.Event()
def on_message(_c, _u, m):
    h = telemetry.read_header(m.payload)
    seen[(m.topic, h.epoch, h.seq)] = h.n_samples
    if sum(seen.values()) >= target:
        done.set()
c = connect(MqttSettings(host=host, port=port))
c.on_message = on_message
ok = threading.Event()
c.on_subscribe = lambda *a: ok.set()
c.subscribe("fl/v1/bench/telemetry/#", 1)
ok.wait(10)
print("ready", flush=True)
done.wait(float(sys.argv[5]))
print(sum(seen.values()), flush=True)
"""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class SyntheticSource(Source):
    """Pushes ``total`` samples of one device as fast as the agent takes them."""

    kind = "synthetic"

    def __init__(self, ref: DeviceRef, total: int) -> None:
        super().__init__()
        self.info = DeviceInfo(ref, "FDM", CHANNELS)
        self.total = total
        self.done = threading.Event()
        self.started = 0.0

    def devices(self) -> list[DeviceInfo]:
        return [self.info]

    def run(self, sink: Sink, stop: threading.Event) -> None:
        stream = sink.stream(self.info)
        channels = [i % len(CHANNELS) for i in range(CHUNK)]
        values = [20.0 + (i % 7) * 0.5 for i in range(CHUNK)]
        offsets = range(CHUNK)
        self.started = time.perf_counter()
        sent = 0
        t_us = int(time.time() * 1e6)
        while sent < self.total and not stop.is_set():
            stream.extend(channels, [t_us + i for i in offsets], values)
            sent += CHUNK
            t_us += CHUNK
        self.done.set()
        stop.wait()


def start_subscriber(host: str, port: int, target: int, timeout: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, host, str(port), str(target), str(Path(__file__).resolve().parents[1]),
         str(timeout)],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the counting subscriber did not start")
    return process


def subscriber_count(process: subprocess.Popen[str]) -> int:
    out, _ = process.communicate(timeout=120)
    return int(out.strip().splitlines()[-1])


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_throughput(settings: MqttSettings, workdir: Path, total: int, batch: int) -> dict[str, Any]:
    ref = DeviceRef("bench", "site", "area", "throughput")
    subscriber = start_subscriber(settings.host, settings.port, total, 120)
    source = SyntheticSource(ref, total)
    agent = Agent(settings, [source], spool=SpoolSettings(str(workdir / "throughput.db")),
                  batch=BatchSettings(max_samples=batch, window_s=1.0), link=LinkSettings(inflight=100))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    agent.start()
    source.done.wait(600)
    agent.publisher.flush()
    agent.publisher.wait_idle(600)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    agent.stop(drain_timeout_s=0)
    arrived = subscriber_count(subscriber)
    return {"samples": total, "wall_s": round(wall, 3), "samples_per_s": round(total / wall),
            "cpu_s_per_million_samples": round(cpu / total * 1e6, 3), "arrived": arrived}


def run_replay(workdir: Path, total: int, batch: int) -> dict[str, Any]:
    port = free_port()
    dead = MqttSettings(host="127.0.0.1", port=port)
    ref = DeviceRef("bench", "site", "area", "replay")
    spool_path = str(workdir / "replay.db")
    source = SyntheticSource(ref, total)
    offline = Agent(dead, [source], spool=SpoolSettings(spool_path, max_bytes=1 << 30),
                    batch=BatchSettings(max_samples=batch, window_s=1.0),
                    link=LinkSettings(reconnect_min_s=1.0, reconnect_max_s=1.0))
    began = time.perf_counter()
    offline.start()
    source.done.wait(600)
    offline.publisher.flush()
    spool_s = time.perf_counter() - began
    queued = offline.spool.stats()["queued_samples"]
    offline.stop(drain_timeout_s=0)
    progress(f"  spooled {queued} samples offline in {spool_s:.2f} s; starting the broker")
    broker = start_mosquitto(port, workdir=workdir / "replay-broker")
    try:
        subscriber = start_subscriber(broker.host, broker.port, total, 120)
        online = Agent(dead, [SyntheticSource(ref, 0)], spool=SpoolSettings(spool_path, max_bytes=1 << 30),
                       batch=BatchSettings(max_samples=batch, window_s=1.0), link=LinkSettings(inflight=100))
        began = time.perf_counter()
        cpu0 = time.process_time()
        online.start()
        online.publisher.wait_idle(600)
        replay_s = time.perf_counter() - began
        cpu = time.process_time() - cpu0
        online.stop(drain_timeout_s=0)
        arrived = subscriber_count(subscriber)
    finally:
        broker.stop()
    return {"backlog_samples": queued, "offline_spool_samples_per_s": round(queued / spool_s),
            "replay_s": round(replay_s, 3), "replay_samples_per_s": round(queued / replay_s),
            "replay_cpu_s": round(cpu, 3), "arrived": arrived}


def baseline_per_sample_json(settings: MqttSettings, total: int) -> dict[str, Any]:
    client = connect(settings)
    topic = "fl/v1/bench/baseline/json"
    began = time.perf_counter()
    infos = []
    t_us = int(time.time() * 1e6)
    for i in range(total):
        payload = json.dumps({"device": "bench/site/area/json", "channel": CHANNELS[i % 16], "t_us": t_us + i,
                              "value": 20.0 + (i % 7) * 0.5, "seq": i})
        infos.append(client.publish(topic, payload, qos=1))
        if len(infos) >= 1000:
            infos[0].wait_for_publish(30)
            infos = [info for info in infos if not info.is_published()]
    for info in infos:
        info.wait_for_publish(30)
    wall = time.perf_counter() - began
    client.disconnect()
    client.loop_stop()
    return {"samples": total, "samples_per_s": round(total / wall)}


def baseline_raw_batches(settings: MqttSettings, total: int, batch: int) -> dict[str, Any]:
    client = connect(settings)
    topic = "fl/v1/bench/baseline/raw"
    channels = [i % len(CHANNELS) for i in range(batch)]
    values = [20.0 + (i % 7) * 0.5 for i in range(batch)]
    began = time.perf_counter()
    cpu0 = time.process_time()
    infos = []
    t_us = int(time.time() * 1e6)
    for seq in range(total // batch):
        times = [t_us + i for i in range(batch)]
        payload = telemetry.encode(CHANNELS, times, channels, values, seq=seq)
        infos.append(client.publish(topic, payload, qos=1))
        if len(infos) >= 100:
            infos[0].wait_for_publish(30)
            infos = [info for info in infos if not info.is_published()]
        t_us += batch
    for info in infos:
        info.wait_for_publish(30)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    client.disconnect()
    client.loop_stop()
    return {"samples": total, "samples_per_s": round(total / wall),
            "cpu_s_per_million_samples": round(cpu / total * 1e6, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=2_000_000, help="samples in the throughput run")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="samples in the replay backlog")
    parser.add_argument("--batch", type=int, default=1000, help="batch max_samples")
    parser.add_argument("--quick", action="store_true", help="small runs (a smoke test, not the figures)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.backlog = 200_000, 100_000
    cpus = sorted(os.sched_getaffinity(0))
    agent_cpu = cpus[-1]
    os.sched_setaffinity(0, {agent_cpu})  # the agent (all its threads) on one core
    others = [c for c in cpus if c != agent_cpu] or cpus
    workdir = Path(tempfile.mkdtemp(prefix="forgeline-agent-bench-"))
    broker = start_mosquitto(workdir=workdir / "broker")
    try:
        os.sched_setaffinity(broker.pid or 0, set(others))
    except OSError:
        pass
    settings = MqttSettings(host=broker.host, port=broker.port)
    try:
        progress(f"baseline: one JSON message per sample (QoS 1), {args.samples // 50} samples")
        per_sample = baseline_per_sample_json(settings, args.samples // 50)
        progress(f"  {per_sample}")
        progress(f"baseline: bare paho loop publishing {args.batch}-sample FLT1 batches, {args.samples} samples")
        raw = baseline_raw_batches(settings, args.samples, args.batch)
        progress(f"  {raw}")
        progress(f"agent: {args.samples} samples through batching, spool and QoS 1 publishing")
        throughput = run_throughput(settings, workdir, args.samples, args.batch)
        progress(f"  {throughput}")
    finally:
        broker.stop()
    progress(f"replay: {args.backlog} samples spooled during an outage, then replayed")
    replay = run_replay(workdir, args.backlog, args.batch)
    progress(f"  {replay}")
    result = {
        "bench": "agent",
        "one_core": True,
        "batch_max_samples": args.batch,
        "samples_per_s": throughput["samples_per_s"],
        "cpu_s_per_million_samples": throughput["cpu_s_per_million_samples"],
        "rss_mb": rss_mb(),
        "throughput_samples": throughput["samples"],
        "throughput_arrived": throughput["arrived"],
        "replay_backlog_samples": replay["backlog_samples"],
        "replay_s": replay["replay_s"],
        "replay_samples_per_s": replay["replay_samples_per_s"],
        "replay_arrived": replay["arrived"],
        "offline_spool_samples_per_s": replay["offline_spool_samples_per_s"],
        "baseline_per_sample_json_samples_per_s": per_sample["samples_per_s"],
        "baseline_raw_batches_samples_per_s": raw["samples_per_s"],
        "baseline_raw_batches_cpu_s_per_million": raw["cpu_s_per_million_samples"],
        "speedup_vs_per_sample_json": round(throughput["samples_per_s"] / per_sample["samples_per_s"], 1),
        "agent_share_of_raw_batch_rate": round(throughput["samples_per_s"] / raw["samples_per_s"], 2),
        "target_200k_samples_per_s": throughput["samples_per_s"] >= 200_000,
        "target_replay_1m_under_15s": replay["backlog_samples"] >= 1_000_000 and replay["replay_s"] < 15,
        "quick": args.quick,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
