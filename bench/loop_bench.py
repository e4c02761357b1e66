"""Benchmark of the iteration loop: intake rate, comparison time, throughput through a real Mosquitto,
and the statistical figures (false alarm rate of identical revisions, detection rate of injected defects).

Baselines are measured in the same run so the ratios hold when absolute times drift:
- intake: ``json.loads`` alone over the same payloads (what any consumer pays);
- service: a plain paho subscriber receiving the same messages from the same broker.

Progress goes to stderr; the last line of stdout is one JSON object.

    python bench/loop_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forgeline.broker import start_broker
from forgeline.contract import topics
from forgeline.loop.compare import compare_model, monitor_model
from forgeline.loop.intake import LoopStore
from forgeline.loop.service import LoopService, ServiceConfig
from forgeline.loop.simulate import RevisionProfile, simulate_line
from forgeline.mqtt import MqttSettings, connect


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_intake(units: int) -> dict[str, Any]:
    messages = [m.wire() for m in simulate_line("acme", "MW-20", [RevisionProfile("A", units=units),
                                                                   RevisionProfile("B", units=units)], seed=1)]
    start = time.perf_counter()
    for _, payload in messages:
        json.loads(payload)
    json_s = time.perf_counter() - start
    store = LoopStore()
    start = time.perf_counter()
    for topic, payload in messages:
        store.ingest(topic, payload)
    intake_s = time.perf_counter() - start
    model = store.model("acme", "MW-20")
    start = time.perf_counter()
    document = compare_model(model)
    compare_s = time.perf_counter() - start
    snapshot_bytes = len(json.dumps(store.snapshot()))
    return {
        "intake_messages": len(messages),
        "intake_msgs_per_s": round(len(messages) / intake_s),
        "json_loads_msgs_per_s": round(len(messages) / json_s),
        "intake_cost_vs_json_loads": round(intake_s / json_s, 1),
        "compare_units_per_revision": units,
        "compare_comparisons": document["tests"],
        "compare_s": round(compare_s, 3),
        "state_bytes_per_unit": round(snapshot_bytes / (2 * units), 1),
    }


def bench_service(units: int) -> dict[str, Any]:
    broker = start_broker()
    try:
        settings = MqttSettings(host=broker.host, port=broker.port, protocol=5 if broker.mqtt5 else 4)
        messages = [m.wire() for m in simulate_line("bench", "MW-20", [RevisionProfile("A", units=units),
                                                                        RevisionProfile("B", units=units)], seed=2)]

        def send() -> None:
            client = connect(settings)
            infos = [client.publish(t, p, qos=1) for t, p in messages]
            infos[-1].wait_for_publish(60)
            client.disconnect()
            client.loop_stop()

        # Baseline: a plain subscriber that only counts.
        received = 0
        done = threading.Event()
        plain = connect(settings)

        def count(*_: Any) -> None:
            nonlocal received
            received += 1
            if received == len(messages):
                done.set()

        plain.on_message = count
        subscribed = threading.Event()
        plain.on_subscribe = lambda *_: subscribed.set()
        plain.subscribe([("fl/v1/bench/#", 1)])
        subscribed.wait(10)
        start = time.perf_counter()
        send()
        done.wait(120)
        plain_s = time.perf_counter() - start
        plain.disconnect()
        plain.loop_stop()

        service = LoopService(settings, ServiceConfig(tenant="bench", interval_s=1.0))
        service.start()
        start = time.perf_counter()
        send()
        deadline = time.monotonic() + 120
        while service.counters["messages"] < len(messages) and time.monotonic() < deadline:
            time.sleep(0.01)
        service_s = time.perf_counter() - start
        start = time.perf_counter()
        service.publish_due()
        publish_s = time.perf_counter() - start
        service.stop()
        assert service.counters["dead_letters"] == 0
        return {
            "service_messages": len(messages),
            "service_msgs_per_s": round(len(messages) / service_s),
            "plain_subscriber_msgs_per_s": round(len(messages) / plain_s),
            "service_time_vs_plain_subscriber": round(service_s / plain_s, 2),
            "publish_round_s": round(publish_s, 3),
            "insights_topic": topics.insights_topic("bench", "MW-20"),
        }
    finally:
        broker.stop()


def run_case(profiles: list[RevisionProfile], seed: int) -> dict[str, Any]:
    store = LoopStore()
    for message in simulate_line("acme", "MW-20", profiles, seed=seed):
        store.ingest_document(message.topic, message.payload)
    return compare_model(store.model("acme", "MW-20"), ts=0.0)


def bench_statistics(null_seeds: int, power_seeds: int) -> dict[str, Any]:
    noisy = 0
    for seed in range(null_seeds):
        noisy += bool(run_case([RevisionProfile("A", units=500), RevisionProfile("B", units=500)],
                               seed=20_000 + seed)["insights"])
    progress(f"null: {noisy}/{null_seeds} seeds raised an insight")
    injections: dict[str, tuple[dict[str, Any], str, str]] = {
        "cavity_anomaly_rate_x3": ({"anomaly_rate_scale": {"cavity_temp_rise": 3.0}}, "anomaly_rate",
                                   "cavity_temp_rise"),
        "door_leakage_x1.5": ({"door_leakage_scale": 1.5}, "defect_rate", "door_leakage"),
        "door_complaints_0.02": ({"complaint_rate": {"door": 0.02}}, "complaint_rate", "door"),
    }
    detection = {}
    for name, (injection, kpi, channel) in injections.items():
        hits = sum(
            any(i["kpi"] == kpi and i["channel"] == channel for i in run_case(
                [RevisionProfile("A", units=1000), RevisionProfile("B", units=1000, **injection)],
                seed=30_000 + seed)["insights"])
            for seed in range(power_seeds)
        )
        detection[name] = round(hits / power_seeds, 3)
        progress(f"power {name}: {hits}/{power_seeds}")
    return {"null_seeds": null_seeds, "null_false_alarm_rate": round(noisy / null_seeds, 4),
            "power_seeds": power_seeds, "detection_rate_at_1000_units": detection}


def bench_monitoring(seeds: int, evaluations: int = 15) -> dict[str, Any]:
    """Identical revisions streamed and re-analysed ``evaluations`` times: how many runs raise an insight at
    some point with flags decided at looks (the service) versus re-testing at alpha every time."""
    monitored = naive = 0
    for seed in range(seeds):
        messages = simulate_line("acme", "MW-20", [RevisionProfile("A", units=600), RevisionProfile("B", units=600)],
                                 seed=40_000 + seed)
        store = LoopStore()
        step = len(messages) // evaluations
        hit_monitored = hit_naive = False
        for index, message in enumerate(messages, 1):
            store.ingest_document(message.topic, message.payload)
            if index % step == 0:
                model = store.model("acme", "MW-20")
                hit_monitored |= bool(monitor_model(model, ts=0.0)["insights"])
                hit_naive |= bool(compare_model(model, ts=0.0)["insights"])
        monitored += hit_monitored
        naive += hit_naive
    progress(f"monitoring: {monitored}/{seeds} runs raised an insight with looks, {naive}/{seeds} re-testing")
    return {"monitoring_seeds": seeds, "monitoring_evaluations": evaluations,
            "monitoring_false_alarm_rate_with_looks": round(monitored / seeds, 4),
            "monitoring_false_alarm_rate_retesting": round(naive / seeds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args()
    units = 1000 if args.quick else 5000
    results: dict[str, Any] = {"bench": "loop"}
    progress(f"intake and comparison, 2 x {units} units")
    results |= bench_intake(units)
    progress("service through mosquitto")
    results |= bench_service(300 if args.quick else 1500)
    progress("statistics")
    results |= bench_statistics(40 if args.quick else 300, 5 if args.quick else 20)
    progress("monitoring")
    results |= bench_monitoring(10 if args.quick else 60)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
