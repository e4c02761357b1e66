"""``forgeline loop``: revision-comparison reports, the loop service, and simulated revision data.

    forgeline loop report --model MW-20 --input messages.jsonl -o report.html
    forgeline loop report --model MW-20 --tenant oven-maker --broker mqtt://127.0.0.1:1883 -o report.html
    forgeline loop report --model MW-20 --state loop-state.json -o report.html
    forgeline loop serve --broker mqtt://127.0.0.1:1883 --tenant oven-maker --state loop-state.json
    forgeline loop simulate -o messages.jsonl --inject B:door_leakage_scale=1.8

``--input`` is a file of recorded messages, one JSON object per line: ``{"topic": ..., "payload": {...}}``
(what ``simulate`` writes); the report computes the comparison itself. ``--broker`` reads the retained
insights document the running service publishes, so the report shows exactly what the dashboards see.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from forgeline.contract import schemas, topics

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{report,serve,simulate}")

    report = sub.add_parser("report", help="write a self-contained HTML report of one model's revisions")
    report.add_argument("--model", required=True, help="product model")
    report.add_argument("--tenant", default=None, help="tenant (required with --broker; optional filter with --input)")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="recorded messages, JSON lines of {topic, payload}")
    source.add_argument("--broker", help="read the service's retained insights, e.g. mqtt://127.0.0.1:1883")
    source.add_argument("--state", type=Path, help="the --state file of `forgeline loop serve` (and its journal)")
    report.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    report.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the retained insights")
    report.add_argument("--json", type=Path, help="also write the insights document as JSON")
    _add_loop_options(report)
    _add_mqtt_options(report)

    serve = sub.add_parser("serve", help="run the loop service: MQTT in, retained insights out")
    serve.add_argument("--broker", default=os.environ.get("FORGELINE_MQTT_URL", "mqtt://127.0.0.1:1883"),
                       help="broker URL (default: $FORGELINE_MQTT_URL or mqtt://127.0.0.1:1883)")
    serve.add_argument("--tenant", default="+", help="one tenant, or + for every tenant (default)")
    serve.add_argument("--interval", type=float, default=10.0, help="seconds between comparison rounds")
    serve.add_argument("--state", type=Path, help="JSON file keeping accepted data across restarts")
    serve.add_argument("--state-interval", type=float, default=60.0,
                       help="write the state file at most this often, in seconds (and always at stop)")
    serve.add_argument("--influx-url", help="InfluxDB URL for the feedback and insight measurements")
    serve.add_argument("--influx-api", choices=["v1", "v2"], default="v2", help="write API (default v2)")
    serve.add_argument("--influx-bucket", default="forgeline")
    serve.add_argument("--influx-org", default="forgeline")
    serve.add_argument("--influx-database", default="forgeline", help="v1 database")
    serve.add_argument("--influx-spill-dir", default=None,
                       help="where points wait while the database is unreachable (default: in memory)")
    serve.add_argument("--influx-token-env", default="INFLUX_TOKEN",
                       help="environment variable holding the v2 token (default INFLUX_TOKEN)")
    serve.add_argument("--first-look", type=int, default=100,
                       help="units + feedback of a model at the first decision (default 100)")
    serve.add_argument("--look-growth", type=float, default=1.5,
                       help="growth of the evidence from one decision to the next (default 1.5)")
    serve.add_argument("--duration", type=float, default=None, help="stop after this many seconds (tests)")
    _add_loop_options(serve)
    _add_mqtt_options(serve)

    simulate = sub.add_parser("simulate", help="write simulated line and field messages of several revisions")
    simulate.add_argument("-o", "--output", type=Path, required=True, help="JSON lines file to write")
    simulate.add_argument("--tenant", default="oven-maker")
    simulate.add_argument("--model", default="MW-20")
    simulate.add_argument("--revisions", default="A,B", help="comma-separated revisions, in production order")
    simulate.add_argument("--units", type=int, default=1000, help="units per revision")
    simulate.add_argument("--seed", type=int, default=1)
    simulate.add_argument("--inject", action="append", default=[], metavar="REV:FIELD[.KEY]=VALUE",
                          help="a defect, e.g. B:door_leakage_scale=1.8 or B:anomaly_rate_scale.cavity_temp_rise=3")


def _add_loop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", help="compare every revision with this one (default: each with its predecessor)")
    parser.add_argument("--alpha", type=float, default=0.05, help="false discovery rate (default 0.05)")
    parser.add_argument("--min-units", type=int, default=30, help="fewest units per revision to compare")


def _add_mqtt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mqtt-protocol", type=int, choices=[4, 5], default=5, help="5, or 4 for MQTT 3.1.1")
    parser.add_argument("--username", default=os.environ.get("FORGELINE_MQTT_USERNAME"))
    parser.add_argument("--password-env", default="FORGELINE_MQTT_PASSWORD",
                        help="environment variable holding the MQTT password")
    parser.add_argument("--ca-file")
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "report":
            return _report(args)
        if args.action == "serve":
            return _serve(args)
        return _simulate(args)
    except (ValueError, OSError) as exc:
        print(f"forgeline loop {args.action}: {exc}", file=sys.stderr)
        return 2


def _loop_config(args: argparse.Namespace) -> Any:
    from forgeline.loop.compare import LoopConfig

    looks = {"first_look": args.first_look, "look_growth": args.look_growth} if hasattr(args, "first_look") else {}
    return LoopConfig(alpha=args.alpha, baseline=args.baseline, min_units=args.min_units, **looks)


def _mqtt_settings(args: argparse.Namespace, url: str) -> Any:
    from forgeline.mqtt import MqttSettings

    return MqttSettings.from_url(
        url, protocol=args.mqtt_protocol, username=args.username,
        password=os.environ.get(args.password_env) if args.username else None,
        ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
    )


# --- report ---


def _report(args: argparse.Namespace) -> int:
    from forgeline.loop.report import render_report

    topics.check_ident(args.model, "model")
    if args.input is not None or args.state is not None:
        tenant, document = _document_from_file(args)
    else:
        if not args.tenant:
            raise ValueError("--broker needs --tenant: insights are published per tenant")
        tenant, document = args.tenant, _document_from_broker(args)
    args.output.write_text(render_report(document, tenant=tenant))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1))
    flagged = len(document["insights"])
    print(f"wrote {args.output}: {document.get('tests', 0)} comparisons, {flagged} insight{'s' * (flagged != 1)}")
    return 0


def _document_from_file(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from forgeline.loop.compare import compare_model
    from forgeline.loop.intake import LoopStore
    from forgeline.loop.simulate import read_jsonl

    if args.state is not None:
        from forgeline.loop.service import load_state

        if not args.state.exists():
            raise ValueError(f"no state file {args.state}")
        store = load_state(args.state)
    else:
        store = LoopStore()
        outcome = store.ingest_all(read_jsonl(args.input))
        if outcome["rejected"]:
            print(f"note: {outcome['rejected']} unusable messages skipped", file=sys.stderr)
    found = store.find(args.model, args.tenant)
    if not found:
        raise ValueError(f"no data for model {args.model!r} in {args.input or args.state}")
    if len(found) > 1:
        raise ValueError(f"model {args.model!r} appears for tenants {', '.join(m.tenant for m in found)}: "
                         "choose one with --tenant")
    return found[0].tenant, compare_model(found[0], _loop_config(args))


def _document_from_broker(args: argparse.Namespace) -> dict[str, Any]:
    from forgeline.mqtt import connect

    topic = topics.insights_topic(args.tenant, args.model)
    received: dict[str, bytes] = {}
    done = threading.Event()
    client = connect(_mqtt_settings(args, args.broker))

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.topic == topic and message.payload:
            received["payload"] = bytes(message.payload)
            done.set()

    client.on_message = on_message
    client.subscribe(topic, qos=1)
    try:
        if not done.wait(args.timeout):
            raise ValueError(f"no retained insights on {topic} within {args.timeout:g}s: is `forgeline loop "
                             "serve` running for this tenant?")
    finally:
        client.disconnect()
        client.loop_stop()
    document: dict[str, Any] = schemas.loads("insights", received["payload"])
    return document


# --- serve ---


def _serve(args: argparse.Namespace) -> int:
    from forgeline.loop.service import LoopService, ServiceConfig
    from forgeline.timeseries import InfluxSettings

    influx = None
    if args.influx_url:
        influx = InfluxSettings(args.influx_url, api=args.influx_api, bucket=args.influx_bucket, org=args.influx_org,
                                token=os.environ.get(args.influx_token_env), database=args.influx_database,
                                spill_dir=args.influx_spill_dir)
    config = ServiceConfig(tenant=args.tenant, interval_s=args.interval, loop=_loop_config(args),
                           state_file=args.state, state_interval_s=args.state_interval, influx=influx)
    service = LoopService(_mqtt_settings(args, args.broker), config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    print(f"loop service on {args.broker}, tenant {args.tenant}, every {args.interval:g}s", file=sys.stderr,
          flush=True)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    while not stop.wait(0.2):
        if deadline is not None and time.monotonic() >= deadline:
            break
    service.stop()
    influx_stats = service.influx.stats.as_dict() if service.influx is not None else None
    print(json.dumps({"counters": service.counters, "intake": service.store.counters.as_dict(),
                      "influx": influx_stats}), flush=True)
    return 0


# --- simulate ---


_NOT_INJECTABLE = ("revision", "units", "rating_weights")


def parse_injection(text: str) -> tuple[str, str, str | None, float]:
    """``B:door_leakage_scale=1.8`` -> ``("B", "door_leakage_scale", None, 1.8)``;
    ``B:anomaly_rate_scale.cavity_temp_rise=3`` -> ``("B", "anomaly_rate_scale", "cavity_temp_rise", 3.0)``."""
    from forgeline.loop.simulate import RevisionProfile

    revision, _, assignment = text.partition(":")
    name, _, value = assignment.partition("=")
    field_name, _, key = name.partition(".")
    fields = {f.name: f for f in dataclasses.fields(RevisionProfile)}
    if not revision or not value or field_name not in fields or field_name in _NOT_INJECTABLE:
        choices = ", ".join(f for f in fields if f not in _NOT_INJECTABLE)
        raise ValueError(f"--inject {text!r}: expected REV:FIELD[.KEY]=VALUE with FIELD one of {choices}")
    is_mapping = "dict" in str(fields[field_name].type)
    if is_mapping != bool(key):
        raise ValueError(f"--inject {text!r}: {field_name} {'needs' if is_mapping else 'takes no'} a .KEY")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--inject {text!r}: {value!r} is not a number") from None
    return revision, field_name, key or None, number


def _simulate(args: argparse.Namespace) -> int:
    from forgeline.loop.simulate import RevisionProfile, simulate_line, write_jsonl

    revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
    for revision in revisions:
        topics.check_ident(revision, "revision")
    overrides: dict[str, dict[str, Any]] = {r: {} for r in revisions}
    for text in args.inject:
        revision, field_name, key, number = parse_injection(text)
        if revision not in overrides:
            raise ValueError(f"--inject {text!r}: revision {revision!r} is not in --revisions {args.revisions}")
        if key is None:
            overrides[revision][field_name] = number
        else:
            overrides[revision].setdefault(field_name, {})[key] = number
    profiles = [RevisionProfile(r, units=args.units, **overrides[r]) for r in revisions]
    messages = simulate_line(args.tenant, args.model, profiles, seed=args.seed)
    count = write_jsonl(messages, args.output)
    print(f"wrote {count} messages to {args.output}")
    return 0
