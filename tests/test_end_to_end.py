"""End to end: a simulated edge agent -> real Mosquitto -> twin service -> twin-state topics, read back
by a plain MQTT subscriber and validated against the contract's schemas; and the demo command itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge_agent.agent import start_simulated_fleet
from edge_agent.sources.simulator import FleetSpec, LineSpec, PrinterSpec
from forgeline.broker import RunningBroker
from forgeline.contract import schemas, topics
from forgeline.contract.topics import Kind
from forgeline.mqtt import MqttSettings
from twin.config import TwinConfig
from twin.service import TwinService

ROOT = Path(__file__).resolve().parents[1]


def _twins(messages: list[paho.MQTTMessage]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for m in messages:
        parsed = topics.parse(m.topic)
        if parsed.kind == Kind.TWIN.value and parsed.device is not None:
            latest[parsed.device.key] = json.loads(m.payload)
    return latest


def test_agent_to_twin_state_over_a_real_broker(mosquitto: RunningBroker, mqtt_settings: MqttSettings,
                                                tenant: str, collect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    line_tenant = f"{tenant}-line"
    fleet = FleetSpec(
        tenant=tenant, site="plant", area="hall",
        printers=(PrinterSpec("sls-01", "SLS"), PrinterSpec("fdm-01", "FDM")),
        lines=(LineSpec("MW-20", "B", tenant=line_tenant, site="plant", area="line1"),),
    )
    device_keys = {f"{tenant}/plant/hall/sls-01", f"{tenant}/plant/hall/fdm-01"}
    watcher = collect(topics.device_filter(Kind.TWIN, tenant), topics.device_filter(Kind.TWIN, line_tenant),
                      topics.fleet_topic(tenant), topics.fleet_topic(line_tenant))
    config = TwinConfig(broker=f"mqtt://{mosquitto.host}:{mosquitto.port}", tenants=(tenant, line_tenant),
                        worker_id=f"e2e-{tenant}", publish_interval_s=0.2, fleet_interval_s=0.5,
                        snapshot_dir=str(tmp_path / "snapshots"))
    with TwinService(config) as twin:
        agent = start_simulated_fleet(mqtt_settings, fleet, speed=600, seed=3, rate_hz=10,
                                      spool_path=tmp_path / "spool.sqlite")
        try:
            def ready(msgs: list[paho.MQTTMessage]) -> bool:
                twins = _twins(msgs)
                printers_ok = all(twins.get(k, {}).get("samples", 0) > 20 for k in device_keys)
                line_ok = sum(1 for k, d in twins.items() if k.startswith(line_tenant) and d["samples"] > 5) >= 2
                fleets = [json.loads(m.payload) for m in msgs if m.topic == topics.fleet_topic(tenant)]
                return printers_ok and line_ok and bool(fleets) and fleets[-1]["devices"] == len(device_keys)

            messages = watcher.wait_for(ready, timeout=45)
        finally:
            agent.stop()
        assert twin.connected
    twins = _twins(messages)
    for doc in twins.values():
        schemas.validate("twin_state", doc)  # every twin state read back is valid per the contract
        assert doc["device"]["tenant"] in (tenant, line_tenant)
        assert doc["online"] is True
    for key in device_keys:
        doc = twins[key]
        assert doc["capabilities"]["technology"] in ("SLS", "FDM")
        assert doc["kpis"]["utilization"] is not None and 0.0 <= doc["kpis"]["utilization"] <= 1.0
        assert doc["duplicates"] == 0
    # Fleet summaries are valid and count this test's devices only (no other tenant leaks in).
    fleets = [json.loads(m.payload) for m in messages if m.topic == topics.fleet_topic(tenant)]
    assert fleets, "no fleet summary"
    schemas.validate("fleet_summary", fleets[-1])
    assert fleets[-1]["devices"] == len(device_keys)


def test_demo_command_runs_the_whole_stack(tmp_path: Path) -> None:
    """`forgeline demo --duration` (what `make demo` runs) brings up every part and reports real KPIs."""
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "forgeline.cli", "demo", "--duration", "30", "--no-view", "--speed", "300",
         "--revision-at", "12", "--summary-json", str(summary)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broker: mosquitto" in result.stderr
    document = json.loads(summary.read_text())
    twins = document["twins"]
    tenants = {t["device"]["tenant"] for t in twins}
    assert {"factory-a", "factory-b", "oven-plant"} <= tenants
    technologies = {t["capabilities"]["technology"] for t in twins}
    assert {"FDM", "SLA", "SLS", "MJF", "DLP", "metal", "line"} <= technologies
    for doc in twins:
        schemas.validate("twin_state", doc)
    assert all(t["samples"] > 0 for t in twins)
    assert any((t["kpis"].get("chamber_fill") or 0) > 0 for t in twins)
    assert "final twin state" in result.stdout
    # The iteration loop saw the line's units of both revisions (the switch is a set_config command).
    insight = document["insights"]["oven-plant/MW-20"]
    schemas.validate("insights", insight)
    units = {r["revision"]: r["units"] for r in insight["revisions"]}
    assert units.get("B", 0) > 0 and units.get("C", 0) > 0, units
    # Customer orders went through order routing to the partner printers.
    routing = document["routing"]
    assert routing["orders"] >= 2 and routing["assigned"] > 0, routing


def test_demo_secure_mode(tmp_path: Path) -> None:
    """`forgeline demo --secure`: production broker config (TLS, client certificates, passwords, tenant
    ACLs), one agent per tenant with its own credentials, services on their own accounts — and the
    whole flow still works, including the operator's set_config command to the line."""
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "forgeline.cli", "demo", "--secure", "--duration", "25", "--no-view",
         "--speed", "300", "--revision-at", "10", "--summary-json", str(summary), "--data-dir", str(tmp_path / "d")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "secure: TLS, client certificates" in result.stderr and "mqtts://127.0.0.1:" in result.stderr
    document = json.loads(summary.read_text())
    assert {t["device"]["tenant"] for t in document["twins"]} == {"factory-a", "factory-b", "oven-plant"}
    assert all(t["samples"] > 0 for t in document["twins"])
    units = {r["revision"]: r["units"] for r in document["insights"]["oven-plant/MW-20"]["revisions"]}
    assert units.get("B", 0) > 0 and units.get("C", 0) > 0, units
    assert document["routing"]["assigned"] > 0, document["routing"]  # routing dispatches through the ACLs
    conf = (tmp_path / "d" / "secure-broker").rglob("*.conf")
    text = "\n".join(p.read_text() for p in conf)
    assert "allow_anonymous false" in text and "require_certificate true" in text
