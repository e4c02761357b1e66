"""``forgeline demo``: the whole stack on one machine.

Starts a broker (Mosquitto when installed, else embedded amqtt), the twin service, the iteration loop,
and an edge agent
running a simulated fleet — 3D printers of every technology across two partner factories
(``factory-a``, ``factory-b``) and a microwave-oven line (``oven-plant``) — then shows a live view of
what the twin computes, read back from the retained twin topics like any platform service would.

    forgeline demo                       # until Ctrl-C
    forgeline demo --duration 60         # a bounded run, then a summary
    forgeline demo --speed 600           # builds finish in seconds
    forgeline demo --secure              # TLS, client certificates, passwords and tenant ACLs
    forgeline demo --influx-url http://127.0.0.1:8086 --influx-token T   # also write time series
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from forgeline.broker import RunningBroker, start_broker
from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, connect
from forgeline.view import LiveView

log = logging.getLogger(__name__)

ORDER_CLIENT = "demo-orders"
# What the simulated printers have loaded, per technology (see edge_agent.sources.simulator.demo_fleet).
DEMO_MATERIALS = {"FDM": "PLA", "SLA": "standard-resin", "DLP": "rigid-resin", "SLS": "PA12", "MJF": "PA12",
                  "metal": "316L"}


class DemoFeedback:
    """The oven line's customers: feedback on shipped ovens (good units leaving the last station), as
    customer service sends it on ``fl/v1/{tenant}/feedback/{model}/{revision}``.

    Months of field feedback compressed into the demo's minutes, so the rates per shipped oven are high:
    a rating from 35 % of the users, complaints at 1 % per category, and a door complaint rate that
    grows with the square of the revision's door leakage (3 % at nominal; revision C's weaker seal,
    leakage ×1.8, about 10 %, half of them service calls). Seeded per serial: the same run gives the
    same feedback."""

    REVIEW_RATE = 0.35
    COMPLAINT_RATE = 0.01
    DOOR_COMPLAINT_RATE = 0.03
    RATING_WEIGHTS = (0.03, 0.05, 0.12, 0.4, 0.4)

    def __init__(self, settings: MqttSettings, last_station: DeviceRef, door_leakage: dict[str, float],
                 seed: int) -> None:
        self.settings = settings
        self.last_station = last_station
        self.door_leakage = door_leakage  # revision -> door leakage scale (1.0 when not listed)
        self.seed = seed
        self.sent = 0
        self._client: Any = None

    def start(self) -> None:
        from forgeline.mqtt import subscribe_all

        client = connect(self.settings, client_id=f"demo-feedback-{uuid.uuid4().hex[:6]}")
        client.on_message = lambda _c, _u, message: self._on_event(bytes(message.payload))
        subscribe_all(client, [self.last_station.event_topic], what="demo feedback")
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def feedback_for(self, serial: str, revision: str, ts: float) -> list[dict[str, Any]]:
        from forgeline.loop.simulate import COMPLAINT_CATEGORIES

        rng = random.Random(f"{self.seed}/{serial}")
        out: list[dict[str, Any]] = []
        door_rate = min(0.9, self.DOOR_COMPLAINT_RATE * self.door_leakage.get(revision, 1.0) ** 2)
        for category in COMPLAINT_CATEGORIES:
            if rng.random() < (door_rate if category == "door" else self.COMPLAINT_RATE):
                fault = category == "door" and rng.random() < 0.5
                out.append({"ts": ts, "serial": serial, "source": "service" if fault else "customer",
                            "category": category, "rating": rng.choice((1, 2)), "fault": fault,
                            "text": f"complaint about {category}"})
        if rng.random() < self.REVIEW_RATE:
            rating = rng.choices((1, 2, 3, 4, 5), weights=self.RATING_WEIGHTS)[0]
            out.append({"ts": ts, "serial": serial, "source": "user", "rating": rating, "category": "none"})
        return out

    def _on_event(self, payload: bytes) -> None:
        try:
            event = schemas.loads("event", payload)
        except schemas.PayloadError:
            return
        if event.get("type") != "unit_produced" or not event.get("good") or not event.get("serial"):
            return
        model, revision = event.get("product_model"), event.get("product_revision")
        if not model or not revision:
            return
        topic = topics.feedback_topic(self.last_station.tenant, model, revision)
        for document in self.feedback_for(event["serial"], revision, round(time.time(), 3)):
            self._client.publish(topic, schemas.dumps(document), qos=1)
            self.sent += 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--speed", type=float, default=120.0,
                        help="simulated process time per wall-clock second (default 120: a 2 h build in 1 min)")
    parser.add_argument("--rate", type=float, default=5.0, help="samples per second per channel (default 5)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the simulation and its injected anomalies")
    parser.add_argument("--broker", default=None,
                        help="use a running broker (mqtt://host:port) instead of starting one")
    parser.add_argument("--broker-kind", choices=["auto", "mosquitto", "amqtt"], default="auto",
                        help="which broker to start (default: mosquitto if installed, else amqtt)")
    parser.add_argument("--secure", action="store_true",
                        help="run Mosquitto with the production config: TLS with a development CA, client "
                             "certificates, a password per account, per-tenant ACLs (one agent per tenant)")
    parser.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws (default 1)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the agent spool, twin snapshots and anomaly labels go (default: a temp dir)")
    parser.add_argument("--influx-url", default=None, help="also write time series to this InfluxDB v2 API URL")
    parser.add_argument("--influx-token", default="", help="InfluxDB token (user:password for 1.x)")
    parser.add_argument("--influx-org", default="forgeline")
    parser.add_argument("--influx-bucket", default="forgeline", help="bucket (database/retention for 1.x)")
    parser.add_argument("--influx-interval", type=float, default=2.0,
                        help="seconds between downsampled points (default 2)")
    parser.add_argument("--revision-at", type=float, default=30.0,
                        help="seconds after start when the oven line switches from revision B to C, whose door "
                             "seal leaks more, so the iteration loop has two revisions to compare (0: never)")
    parser.add_argument("--incident-at", type=float, default=90.0,
                        help="seconds after start when the oven line's cavity temperature rise shifts for 10 s, "
                             "followed by fdm-01's nozzle temperature for 15 s (labelled incidents the twin flags "
                             "once the devices are warm, besides the random ones; default 90; 0: none)")
    parser.add_argument("--order-every", type=float, default=6.0,
                        help="seconds between customer orders sent to order routing (0: no orders)")
    parser.add_argument("--no-view", action="store_true", help="no live view; print a summary at the end")
    parser.add_argument("--summary-json", type=Path, default=None,
                        help="write the final twin state of every device and the insights to this JSON file")


class Demo:
    """The demo's parts, started in order and stopped in reverse (also usable from tests)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.broker: RunningBroker | None = None
        self.settings: MqttSettings | None = None
        self.twin: Any = None
        self.loop: Any = None
        self.agents: list[Any] = []
        self.routing: Any = None
        self.feedback: DemoFeedback | None = None
        self._orders_client: Any = None
        self.secure: Any = None
        self.view: LiveView | None = None
        self.line_station: DeviceRef | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        from edge_agent.agent import start_simulated_fleet
        from edge_agent.sources.simulator import EpisodeSpec, RevisionEffects, demo_fleet
        from twin.config import InfluxConfig, TwinConfig
        from twin.service import TwinService

        args = self.args
        if args.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="forgeline-demo-")
            data_dir = Path(self._tmp.name)
        else:
            data_dir = args.data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
        if args.secure:
            if args.broker:
                raise SystemExit("forgeline demo: --secure starts its own broker; leave out --broker")
            self._start_secure(data_dir)
        elif args.broker:
            self.settings = MqttSettings.from_url(args.broker)
        else:
            self.broker = start_broker(prefer=args.broker_kind)
            print(f"broker: {self.broker.kind} on {self.broker.host}:{self.broker.port}"
                  + ("" if self.broker.kind == "mosquitto" else " (embedded fallback: no mosquitto binary found)"),
                  file=sys.stderr)
            self.settings = MqttSettings(self.broker.host, self.broker.port, protocol=5 if self.broker.mqtt5 else 4)
        assert self.settings is not None
        twin_settings = self._account("_twin")
        url = f"{'mqtts' if twin_settings.tls else 'mqtt'}://{twin_settings.host}:{twin_settings.port}"
        influx = None
        if args.influx_url:
            influx = InfluxConfig(url=args.influx_url, token=args.influx_token, org=args.influx_org,
                                  bucket=args.influx_bucket, interval_s=args.influx_interval,
                                  flush_interval_s=min(1.0, args.influx_interval),
                                  spill_dir=str(data_dir / "influx-spill"))
        mqtt_options: dict[str, Any] = {
            name: getattr(twin_settings, name)
            for name in ("protocol", "username", "password", "ca_file", "cert_file", "key_file", "tls_insecure")
        }
        config = TwinConfig(broker=url, mqtt=mqtt_options, worker_id="demo-twin", publish_interval_s=1.0,
                            fleet_interval_s=2.0, snapshot_dir=str(data_dir / "snapshots"), influx=influx)
        self.twin = TwinService(config).start()
        from forgeline.loop.service import LoopService, ServiceConfig
        from forgeline.timeseries import InfluxSettings

        # The loop and routing write through the same writer as the twin, spilling next to its files.
        service_influx = (InfluxSettings(url=args.influx_url, api="v2", bucket=args.influx_bucket,
                                         org=args.influx_org, token=args.influx_token or None,
                                         flush_interval_s=min(1.0, args.influx_interval),
                                         spill_dir=str(data_dir / "influx-spill")) if args.influx_url else None)
        self.loop = LoopService(self._account("_loop"), ServiceConfig(interval_s=5.0, client_id="demo-loop",
                                                                      state_file=data_dir / "loop-state.json",
                                                                      influx=service_influx))
        self.loop.start()
        from forgeline.routing.service import RoutingService

        self.routing = RoutingService(self._account("_routing"), client_id="demo-routing", influx=service_influx,
                                      influx_interval_s=args.influx_interval)
        self.routing.start()
        fleet = demo_fleet(labels_file=str(data_dir / "anomaly-labels.jsonl"))
        # Revision C of the oven has a weaker door seal: the change engineering should hear about.
        line = dataclasses.replace(fleet.lines[0], effects={"C": RevisionEffects(door_leakage_scale=1.8)})
        fleet = dataclasses.replace(fleet, lines=(line, *fleet.lines[1:]))
        if args.incident_at > 0:  # incidents at a known time, so a short run shows anomaly events too
            # The oven line's cavity heats 8 sigma more for 10 s, then fdm-01's nozzle runs 40 sigma hot for 15 s.
            incidents = [EpisodeSpec("fdm-01", "nozzle_temp", "level_shift", start_s=args.incident_at + 10.0,
                                     duration_s=15.0, magnitude=40.0)]
            if "power" in line.stations:
                incidents.append(EpisodeSpec("power", "cavity_temp_rise", "level_shift", start_s=args.incident_at,
                                             duration_s=10.0, magnitude=8.0))
            fleet = dataclasses.replace(fleet, anomalies=dataclasses.replace(fleet.anomalies,
                                                                             episodes=tuple(incidents)))
        self.line_station = DeviceRef(line.tenant or fleet.tenant, line.site or fleet.site, line.area, line.stations[0])
        self.feedback = DemoFeedback(self._account("_routing"), dataclasses.replace(
            self.line_station, device=line.stations[-1]), {r: e.door_leakage_scale for r, e in line.effects.items()},
            args.seed)
        self.feedback.start()
        if self.secure is None:
            self.agents = [start_simulated_fleet(self.settings, fleet, speed=args.speed, seed=args.seed,
                                                 rate_hz=args.rate, spool_path=data_dir / "spool.sqlite")]
        else:
            # Each factory's gateway has its own credentials, so each tenant gets an agent of its own.
            self.agents = []
            for tenant in sorted({p.tenant or fleet.tenant for p in fleet.printers}
                                 | {ln.tenant or fleet.tenant for ln in fleet.lines}):
                printers = tuple(p for p in fleet.printers if (p.tenant or fleet.tenant) == tenant)
                lines = tuple(ln for ln in fleet.lines if (ln.tenant or fleet.tenant) == tenant)
                names = {p.device for p in printers} | {station for ln in lines for station in ln.stations}
                own = dataclasses.replace(
                    fleet, printers=printers, lines=lines,
                    anomalies=dataclasses.replace(fleet.anomalies, episodes=tuple(
                        e for e in fleet.anomalies.episodes if e.device in names)),
                )
                self.agents.append(start_simulated_fleet(
                    self.secure.ensure_user(tenant), own, speed=args.speed, seed=args.seed, rate_hz=args.rate,
                    spool_path=data_dir / f"spool-{tenant}.sqlite"))
        # The view reads the retained twin topics like any platform service; it also feeds the summary.
        self.view = LiveView(self._account("_ops"), refresh_s=args.refresh, status_line=self.status_line,
                             routing_client=ORDER_CLIENT,
                             draw_enabled=not args.no_view)
        self.view.start()
        self._orders_client = connect(self._account("_routing"), client_id="demo-orders")

    def _start_secure(self, data_dir: Path) -> None:
        from forgeline.broker.secure import start_secure_mosquitto

        self.secure = start_secure_mosquitto(data_dir / "secure-broker", ["_twin", "_loop", "_routing", "_ops"])
        self.settings = self.secure.settings("_ops")
        print(f"broker: mosquitto (secure: TLS, client certificates, passwords, tenant ACLs) on {self.secure.url}; "
              f"certificates in {data_dir / 'secure-broker'}", file=sys.stderr)

    def _account(self, username: str) -> MqttSettings:
        """Settings for a service account: its own credentials in secure mode, else the plain settings."""
        if self.secure is not None:
            return self.secure.settings(username)
        assert self.settings is not None
        return self.settings

    def send_order(self, number: int) -> None:
        """A customer order, as the platform's order intake sends it to routing (a routing request)."""
        from forgeline.routing.instances import generate_order, order_document

        rng = random.Random(self.args.seed * 100_003 + number)
        order = generate_order(rng.randint(4, 30), seed=rng.randrange(2**31), now=time.time(),
                               order_id=f"demo-order-{number:04d}", customer=f"customer-{rng.randint(1, 5)}",
                               due_days=(0.5, 3.0))
        document = order_document(order)
        for part in document["parts"]:
            part["material"] = DEMO_MATERIALS.get(part["technology"], part["material"])
        request = {"correlation_id": f"{document['order_id']}-{uuid.uuid4().hex[:6]}", "client_id": ORDER_CLIENT,
                   "order": document}
        assert self._orders_client is not None
        self._orders_client.publish(topics.routing_request_topic(), schemas.dumps(request), qos=1)

    def final_routing(self) -> dict[str, int]:
        """Routing responses seen by the view: orders answered, units routed, units rejected."""
        if self.view is None:
            return {}
        with self.view.view.lock:
            return dict(self.view.view.routing)

    def final_insights(self) -> dict[str, Any]:
        """The latest iteration insights per tenant/model, as received on the insights topics."""
        if self.view is None:
            return {}
        with self.view.view.lock:
            return dict(self.view.view.insights)

    def switch_revision(self, revision: str) -> None:
        """Tell the line to build ``revision`` from now on, as an operator does: a set_config command."""
        assert self.settings is not None and self.line_station is not None
        client = connect(self._account("_ops"))
        try:
            request = {"correlation_id": f"demo-{uuid.uuid4().hex[:8]}", "ts": time.time(),
                       "args": {"product_revision": revision}}
            client.publish(self.line_station.command_topic("set_config"), schemas.dumps(request),
                           qos=1).wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()

    def status_line(self) -> str:
        try:
            all_stats = [agent.stats() for agent in self.agents]
        except Exception:  # the view must never die on a stats read
            return ""
        published = sum(int(d.get("published_samples", 0)) for st in all_stats for d in st.get("devices", {}).values())
        spooled = sum(int(st.get("spool", {}).get("queued_rows", 0) or 0) for st in all_stats)
        return f"speed ×{self.args.speed:g}, {published:,} samples published, {spooled} batches spooled"

    def stop(self) -> None:
        # Reverse order: the view, then the agent (drains its batches), the twin, the broker.
        if self._orders_client is not None:
            self._orders_client.disconnect()
            self._orders_client.loop_stop()
        parts = ((self.view, "view"), (self.feedback, "feedback"), *((agent, "agent") for agent in self.agents),
                 (self.routing, "routing"),
                 (self.loop, "loop"),
                 (self.twin, "twin"), (self.broker, "broker"), (self.secure, "broker"))
        for part, name in parts:
            if part is None:
                continue
            try:
                part.stop()
            except Exception:
                log.exception("stopping the %s failed", name)
        if self._tmp is not None:
            self._tmp.cleanup()

    def final_twins(self) -> list[dict[str, Any]]:
        """The latest twin-state document of every device, as received on the twin topics."""
        if self.view is None:
            return []
        with self.view.view.lock:
            return [doc for _key, doc in sorted(self.view.view.twins.items())]


def _summary(twins: list[dict[str, Any]]) -> str:
    lines = [f"{'device':<40} {'state':<11} {'util':>6} {'OEE':>6} {'fill':>6} {'anomaly':>7}"]

    def pct(value: Any) -> str:
        return "     -" if value is None else f"{100 * value:5.1f}%"

    for twin in twins:
        kpis = twin.get("kpis", {})
        score = kpis.get("anomaly_score")
        device = "/".join(str(twin.get("device", {}).get(k, "?")) for k in ("tenant", "site", "area", "device"))
        lines.append(f"{device:<40.40} {twin.get('state', '?')!s:<11} {pct(kpis.get('utilization'))} "
                     f"{pct(kpis.get('oee'))} {pct(kpis.get('chamber_fill'))} "
                     f"{'      -' if score is None else f'{score:7.2f}'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    demo = Demo(args)
    try:
        demo.start()
        # The schedule counts from the running stack, as the agents' incidents do: a slow start (a
        # loaded machine, a cold numba cache) must not eat into revision B's time or the run's.
        started = time.time()
        deadline = started + args.duration if args.duration > 0 else None
        switch_at = started + args.revision_at if args.revision_at > 0 else None
        next_order, orders = (started + 3.0 if args.order_every > 0 else None), 0
        while not stop.is_set():
            if switch_at is not None and time.time() >= switch_at:
                demo.switch_revision("C")
                switch_at = None
            if next_order is not None and time.time() >= next_order:
                orders += 1
                demo.send_order(orders)
                next_order += args.order_every
            if deadline is not None and time.time() >= deadline:
                break
            if demo.view is not None and not args.no_view:
                demo.view.draw(started)
            stop.wait(args.refresh if deadline is None else max(0.0, min(args.refresh, deadline - time.time())))
        twins = demo.final_twins()
        insights = demo.final_insights()
        routing = demo.final_routing()
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)
        demo.stop()
    print(f"\nforgeline demo ran {time.time() - started:.0f} s; final twin state:\n{_summary(twins)}")
    if args.summary_json:
        summary = {"twins": twins, "insights": insights, "routing": routing}
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
    return 0
