"""A live terminal view of the twin, built the way a platform service would build it: by subscribing
to the retained twin-state and fleet-summary topics. Used by ``forgeline demo``.

It redraws in place with ANSI escapes when standard output is a terminal, and prints a compact
table every refresh otherwise (logs, CI).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import paho.mqtt.client as paho

from forgeline.contract import topics
from forgeline.contract.topics import Kind
from forgeline.mqtt import MqttSettings, connect

_STATE_STYLE = {
    "printing": "\033[32m",
    "producing": "\033[32m",
    "heating": "\033[33m",
    "idle": "\033[37m",
    "paused": "\033[36m",
    "error": "\033[31m",
    "maintenance": "\033[35m",
    "offline": "\033[90m",
}
_RESET = "\033[0m"
_BOLD = "\033[1m"


def _pct(value: Any) -> str:
    return "   -  " if value is None else f"{100 * float(value):5.1f}%"


def _bar(value: Any, width: int = 10) -> str:
    if value is None:
        return " " * width
    filled = max(0, min(width, round(float(value) * width)))
    return "█" * filled + "·" * (width - filled)


@dataclass
class TwinView:
    """Holds the latest twin state per device and fleet summary per tenant, fed from MQTT."""

    twins: dict[str, dict[str, Any]] = field(default_factory=dict)
    fleets: dict[str, dict[str, Any]] = field(default_factory=dict)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    insights: dict[str, dict[str, Any]] = field(default_factory=dict)
    routing: dict[str, int] = field(default_factory=lambda: {"orders": 0, "assigned": 0, "rejected": 0})
    routing_last: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: int = 0

    def on_message(self, topic: str, payload: bytes | bytearray) -> None:
        try:
            parsed = topics.parse(topic)
            document = json.loads(payload)
        except (topics.TopicError, ValueError):
            return
        with self.lock:
            self.messages += 1
            if parsed.kind == Kind.TWIN.value and parsed.device is not None:
                self.twins[parsed.device.key] = document
            elif parsed.kind == "fleet" and parsed.tenant:
                self.fleets[parsed.tenant] = document
            elif parsed.kind == "insights" and parsed.model:
                self.insights[f"{parsed.tenant}/{parsed.model}"] = document
            elif parsed.kind == "routing_response" and isinstance(document, dict):
                assigned, rejected = document.get("assignments", []), document.get("rejected", [])
                self.routing["orders"] += 1
                self.routing["assigned"] += len(assigned)
                self.routing["rejected"] += len(rejected)
                printers = sorted({str(a.get("printer", "?")).split("/")[-1] for a in assigned})
                reasons = sorted({str(r.get("reason", ""))[:60] for r in rejected})
                self.routing_last.append(
                    f"{document.get('order_id', document.get('correlation_id', '?'))}: {len(assigned)} units -> "
                    f"{', '.join(printers) or '-'}" + (f"; rejected {len(rejected)}: {'; '.join(reasons)}" if rejected
                                                       else ""))
                del self.routing_last[:-3]
            elif parsed.kind == Kind.ANOMALY.value:
                self.anomalies.append(document)
                del self.anomalies[:-6]

    def render(self, *, color: bool = True, width: int = 120, title: str = "") -> str:
        def c(style: str, text: str) -> str:
            return f"{style}{text}{_RESET}" if color else text

        with self.lock:
            twins = dict(self.twins)
            fleets = dict(self.fleets)
            anomalies = list(self.anomalies)
            insights = dict(self.insights)
        lines = [c(_BOLD, title or "forgeline twin — live"), ""]
        header = (f"{'tenant':<12} {'device':<26} {'tech':<6} {'state':<11} {'util':>6} {'OEE':>6} "
                  f"{'fill':>6} {'':10} {'anomaly':>7} {'':10}")
        lines.append(c(_BOLD, header[:width]))
        by_tenant: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key, twin in sorted(twins.items()):
            by_tenant.setdefault(key.split("/", 1)[0], []).append((key, twin))
        for tenant, rows in by_tenant.items():
            for key, twin in rows:
                kpis = twin.get("kpis", {})
                state = twin.get("state", "?") if twin.get("online", True) else "offline"
                tech = str(twin.get("capabilities", {}).get("technology", ""))[:6]
                if tech == "line" and state == "printing":
                    state = "producing"  # the same state code; a line station produces units
                score = kpis.get("anomaly_score")
                score_text = f"{score:7.2f}" if score is not None else "    -  "
                if score is not None and score >= 0.8:
                    score_text = c("\033[31;1m", score_text)
                device = key.split("/", 1)[1]
                row = (f"{tenant:<12.12} {device:<26.26} {tech:<6} "
                       f"{c(_STATE_STYLE.get(state, ''), f'{state:<11}')} "
                       f"{_pct(kpis.get('utilization'))} {_pct(kpis.get('oee'))} "
                       f"{_pct(kpis.get('chamber_fill'))} {_bar(kpis.get('chamber_fill'))} "
                       f"{score_text} {_bar(score)}")
                lines.append(row)
            fleet = fleets.get(tenant)
            if fleet:
                k = fleet.get("kpis", {})
                summary = (f"{'':12} {tenant} fleet: {fleet.get('online', 0)}/{fleet.get('devices', 0)} online, "
                           f"utilization {_pct(k.get('utilization')).strip()}, OEE {_pct(k.get('oee')).strip()}, "
                           f"fill {_pct(k.get('chamber_fill')).strip()}")
                lines.append(c("\033[90m", summary))
            lines.append("")
        if not twins:
            lines.append("waiting for twin state ...")
        for key, doc in sorted(insights.items()):
            revisions = ", ".join(f"{r.get('revision')}: {r.get('units', 0)} units"
                                  + (f" FPY {100 * r['first_pass_yield']:.1f}%" if r.get("first_pass_yield") is not None
                                     else "")
                                  for r in doc.get("revisions", []))
            flagged = doc.get("insights", [])
            lines.append(c(_BOLD, f"iteration loop {key}") + f"  {revisions}; {doc.get('tests', 0)} comparisons, "
                         f"{len(flagged)} flagged")
            for item in flagged[:3]:
                lines.append(f"  ! {json.dumps({k: item.get(k) for k in ('kpi', 'channel', 'revision', 'effect')})}")
            lines.append("")
        with self.lock:
            routing, routing_last = dict(self.routing), list(self.routing_last)
        if routing["orders"]:
            lines.append(c(_BOLD, "order routing") + f"  {routing['orders']} orders, {routing['assigned']} units "
                         f"routed, {routing['rejected']} rejected")
            lines += [f"  {text}" for text in routing_last]
            lines.append("")
        if anomalies:
            lines.append(c(_BOLD, "recent anomaly events"))
            for event in anomalies[-6:]:
                when = time.strftime("%H:%M:%S", time.localtime(float(event.get("ts", 0))))
                chans = ",".join(event.get("channels", []))
                lines.append(f"  {when} {event.get('phase', ''):<5} {event.get('device', '')} "
                             f"score {float(event.get('score', 0)):.2f} {chans}")
        return "\n".join(line[: width + 40] for line in lines)


class LiveView:
    """Subscribes to twin topics and redraws a :class:`TwinView` every ``refresh_s`` seconds."""

    def __init__(self, settings: MqttSettings, out: TextIO = sys.stdout, refresh_s: float = 1.0,
                 status_line: Callable[[], str] | None = None, draw_enabled: bool = True,
                 routing_client: str | None = None) -> None:
        self.settings, self.out, self.refresh_s = settings, out, refresh_s
        self.view = TwinView()
        self.status_line = status_line
        self.tty = out.isatty() and draw_enabled
        self._client: paho.Client | None = None
        self.routing_client = routing_client

    def start(self) -> None:
        client = connect(self.settings, client_id=None)
        client.on_message = lambda _c, _u, m: self.view.on_message(m.topic, m.payload)
        client.subscribe([
            (topics.device_filter(Kind.TWIN), 1),
            (f"{topics.PREFIX}/+/fleet", 1),
            (topics.device_filter(Kind.ANOMALY), 1),
            (topics.insights_filter(), 1),
            *([(topics.routing_response_topic(self.routing_client), 1)] if self.routing_client else []),
        ])
        self._client = client
        if self.tty:
            self.out.write("\033[?25l\033[2J")  # hide cursor, clear screen

    def draw(self, started: float) -> None:
        width = shutil.get_terminal_size((120, 40)).columns
        title = f"forgeline demo — {time.time() - started:5.0f} s"
        if self.status_line:
            title += "   " + self.status_line()
        text = self.view.render(color=self.tty, width=width, title=title)
        if self.tty:
            self.out.write("\033[H" + text.replace("\n", "\033[K\n") + "\033[J")
        else:
            self.out.write(text + "\n\n")
        self.out.flush()

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self.tty:
            self.out.write("\033[?25h")
            self.out.flush()
