"""``forgeline route``: route an order against a fleet file or the live twin, or run the routing service.

Examples::

    forgeline route docs/examples/order.json --fleet docs/examples/fleet.json
    forgeline route order.json --broker mqtt://127.0.0.1:1883          # fleet from retained twin/status
    forgeline route order.json --broker mqtt://127.0.0.1:1883 --twin-api acme,beta   # the twin query API
    forgeline route --serve --broker mqtt://127.0.0.1:1883              # the MQTT routing service

The routing response (assignments with explanations, rejected parts with reasons, builds) is
printed as JSON; ``--summary`` prints one line per build and per rejected part instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from forgeline.contract import schemas, topics
from forgeline.contract.topics import Kind
from forgeline.mqtt import MqttError, MqttSettings, connect, subscribe_all
from forgeline.routing.model import Fleet, FleetBuilder, FleetError, OrderError, load_order
from forgeline.routing.router import ConfigError, Router, RoutingConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("order", nargs="?", help="order JSON file (see docs/routing.md)")
    parser.add_argument("--fleet", help="fleet JSON file; without it the fleet is read from --broker")
    parser.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883 (live twin and status topics)")
    parser.add_argument("--username", help="broker username (a platform account such as _routing)")
    parser.add_argument("--password", help="broker password")
    parser.add_argument("--wait", type=float, default=2.0,
                        help="seconds to collect retained fleet messages (or to wait for each twin API answer)")
    parser.add_argument("--twin-api", metavar="TENANTS",
                        help="with --broker: ask the twin query API of these tenants (comma-separated) for the "
                             "fleet instead of reading retained topics")
    parser.add_argument("--config", help="routing config (YAML/JSON): weights, release rules, materials")
    parser.add_argument("--now", type=float, help="routing time, seconds since the epoch (default: now)")
    parser.add_argument("--no-keep-open", action="store_true", help="release every build at once")
    parser.add_argument("--release-all", action="store_true", help="release the builds that stay open too")
    parser.add_argument("--summary", action="store_true", help="one line per build and rejected part")
    parser.add_argument("--serve", action="store_true", help="run the MQTT routing service")
    parser.add_argument("--share-group", help="MQTT 5 shared-subscription group for several instances")
    parser.add_argument("--no-dispatch", action="store_true", help="service: do not send jobs to agents")
    parser.add_argument("--state", help="service: file that keeps open and queued builds across restarts")
    parser.add_argument("--influx-url", help="service: write the routing measurement to this InfluxDB URL")
    parser.add_argument("--influx-api", choices=["v1", "v2"], default="v2", help="write API (default v2)")
    parser.add_argument("--influx-bucket", default="forgeline", help="v2 bucket")
    parser.add_argument("--influx-org", default="forgeline", help="v2 org")
    parser.add_argument("--influx-database", default="forgeline", help="v1 database")
    parser.add_argument("--influx-token-env", default="INFLUX_TOKEN",
                        help="environment variable holding the v2 token (default INFLUX_TOKEN)")
    parser.add_argument("--influx-spill-dir", help="where points wait while the database is unreachable")
    parser.add_argument("--influx-interval", type=float, default=10.0,
                        help="seconds between routing points (default 10)")


def fleet_from_broker(settings: MqttSettings, wait_s: float) -> tuple[Fleet, dict[str, str]]:
    """Collect the retained status and twin messages of every tenant for ``wait_s`` seconds."""
    builder = FleetBuilder()
    lock = threading.Lock()
    client = connect(settings)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        kind = "status" if "/status/" in msg.topic else "twin_state"
        if not msg.payload:
            return
        try:
            document = schemas.loads(kind, bytes(msg.payload))
        except schemas.PayloadError as exc:
            with lock:
                builder.problems[msg.topic] = str(exc)
            return
        with lock:
            builder.apply(msg.topic, document)

    client.on_message = on_message
    client.subscribe([(topics.device_filter(Kind.STATUS), 1), (topics.device_filter(Kind.TWIN), 1)])
    time.sleep(wait_s)
    client.disconnect()
    client.loop_stop()
    with lock:
        return builder.fleet(), dict(builder.problems)


class TwinApiError(RuntimeError):
    """The twin query API did not answer, or answered with an error."""


def fleet_from_twin_api(settings: MqttSettings, tenants: list[str], timeout_s: float = 5.0) -> Fleet:
    """Ask the twin's query API of each tenant (``list_devices``, then ``get_twin`` per printer) for the
    fleet: the twin's own view, capabilities included, rather than whatever is retained on the broker."""
    import uuid

    client_id = f"route-{uuid.uuid4().hex[:8]}"
    answers: dict[str, dict[str, Any]] = {}
    cond = threading.Condition()
    client = connect(settings)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            document = schemas.loads("api_response", bytes(msg.payload))
        except schemas.PayloadError:
            return
        with cond:
            answers[document["correlation_id"]] = document
            cond.notify_all()

    def ask(tenant: str, method: str, **fields: Any) -> Any:
        correlation_id = uuid.uuid4().hex
        request = {"correlation_id": correlation_id, "client_id": client_id, **fields}
        client.publish(topics.api_request_topic(tenant, method), schemas.dumps(request), qos=1)
        with cond:
            if not cond.wait_for(lambda: correlation_id in answers, timeout_s):
                raise TwinApiError(f"the twin did not answer {method} for tenant {tenant!r} within {timeout_s:g} s")
            answer = answers.pop(correlation_id)
        if not answer["ok"]:
            raise TwinApiError(f"twin {method} for tenant {tenant!r}: {answer.get('error')}")
        return answer.get("result")

    client.on_message = on_message
    try:
        subscribe_all(client, [topics.api_response_topic(t, client_id) for t in tenants],
                      what="routing's twin API responses")
        builder = FleetBuilder()
        for tenant in tenants:
            for row in ask(tenant, "list_devices") or []:
                if row.get("technology") in (None, "line"):
                    continue
                twin = ask(tenant, "get_twin", device=row["device"])
                ref = topics.DeviceRef(tenant, *str(row["device"]).split("/"))
                builder.apply(ref.twin_topic, twin)
        return builder.fleet()
    finally:
        client.disconnect()
        client.loop_stop()


def _settings(args: argparse.Namespace) -> MqttSettings:
    overrides: dict[str, Any] = {}
    if args.username:
        overrides["username"] = args.username
        overrides["password"] = args.password
    return MqttSettings.from_url(args.broker, **overrides) if args.broker else MqttSettings.from_env(**overrides)


def run(args: argparse.Namespace) -> int:
    try:
        config = RoutingConfig.load(args.config) if args.config else RoutingConfig()
        if args.no_keep_open:
            config = RoutingConfig(config.weights, config.release, config.horizon_h, config.materials, False)
        fleet = Fleet.load(args.fleet) if args.fleet else None
    except (ConfigError, FleetError) as exc:
        print(f"forgeline route: {exc}", file=sys.stderr)
        return 2
    if args.serve:
        return _serve(args, config, fleet)
    if not args.order:
        print("forgeline route: give an ORDER.json (or --serve)", file=sys.stderr)
        return 2
    try:
        order = load_order(args.order)
    except OrderError as exc:
        print(f"forgeline route: {exc}", file=sys.stderr)
        return 2
    if fleet is None and args.twin_api:
        try:
            fleet = fleet_from_twin_api(_settings(args), [t for t in args.twin_api.split(",") if t], args.wait)
        except (MqttError, ValueError, TwinApiError) as exc:
            print(f"forgeline route: {exc}", file=sys.stderr)
            return 2
    if fleet is None:
        try:
            fleet, problems = fleet_from_broker(_settings(args), args.wait)
        except (MqttError, ValueError) as exc:
            print(f"forgeline route: {exc}", file=sys.stderr)
            return 2
        for key, problem in problems.items():
            print(f"forgeline route: ignoring {key}: {problem}", file=sys.stderr)
        if not len(fleet):
            print("forgeline route: no printers found on the broker (no retained status/twin topics)",
                  file=sys.stderr)
    router = Router(fleet, config)
    now = args.now if args.now is not None else time.time()
    result = router.route(order, now)
    if args.release_all:
        for planned in router.release_all(now):
            result.released.append(planned)
            result.touched[planned.build_id] = planned
    document = result.document(config)
    if args.summary:
        for build in document["builds"]:
            print(f"{build['build_id']:<28} {build['printer']:<44} {build['status']:<9} parts {build['parts']:>4} "
                  f"fill {build['fill']:.2f} height {build['height_mm']:.0f} mm  {build['release_reason'] or ''}")
        for problem in document["rejected"]:
            print(f"REJECTED {problem['part_id']}: {problem['reason']}")
    else:
        print(json.dumps(document, indent=2))
    return 1 if document["rejected"] else 0


def _serve(args: argparse.Namespace, config: RoutingConfig, fleet: Fleet | None) -> int:
    from forgeline.routing.service import RoutingService
    from forgeline.timeseries import InfluxSettings

    influx = None
    if args.influx_url:
        influx = InfluxSettings(args.influx_url, api=args.influx_api, bucket=args.influx_bucket, org=args.influx_org,
                                token=os.environ.get(args.influx_token_env), database=args.influx_database,
                                spill_dir=args.influx_spill_dir)
    service = RoutingService(_settings(args), config, fleet, share_group=args.share_group,
                             dispatch=not args.no_dispatch, state_path=args.state, influx=influx,
                             influx_interval_s=args.influx_interval)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    try:
        service.start()
    except (MqttError, TimeoutError) as exc:
        print(f"forgeline route: {exc}", file=sys.stderr)
        return 2
    print(f"routing service listening on {topics.routing_request_topic()}", file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0
