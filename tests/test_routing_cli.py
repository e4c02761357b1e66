"""``forgeline route``: a fleet file, the live twin over a real Mosquitto, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from forgeline.broker import RunningBroker
from forgeline.cli import main
from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings, connect

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
NOW = "1767225600"


def test_route_example_order_against_the_example_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["route", str(EXAMPLES / "order.json"), "--fleet", str(EXAMPLES / "fleet.json"), "--now", NOW])
    document = json.loads(capsys.readouterr().out)
    schemas.validate("routing_response", {"correlation_id": "cli", "ok": True, **document})
    assert code == 1  # some parts are rejected, on purpose
    assert {r["part_id"]: r["code"] for r in document["rejected"]} == {
        "too-big": "too_large", "mystery": "unknown_material", "negative": "invalid"}
    assert sum(1 for a in document["assignments"] if a["part_id"] == "bracket-a") == 24
    assert all(a["explanation"] for a in document["assignments"])
    assert document["objective"]["weights"]["fill"] > 0


def test_summary_and_release_all(capsys: pytest.CaptureFixture[str]) -> None:
    main(["route", str(EXAMPLES / "order.json"), "--fleet", str(EXAMPLES / "fleet.json"), "--now", NOW,
          "--release-all", "--summary"])
    out = capsys.readouterr().out
    assert "released on request" in out and "REJECTED too-big" in out


def test_bad_files_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "order.json"
    bad.write_text('{"order_id": "o 1", "parts": []}')
    assert main(["route", str(bad), "--fleet", str(EXAMPLES / "fleet.json")]) == 2
    assert "order_id" in capsys.readouterr().err
    fleet = tmp_path / "fleet.json"
    fleet.write_text('{"printers": [{"device": "acme/s/a/p1", "technology": "MJF", "build_volume_mm": [1, -1, 1]}]}')
    assert main(["route", str(EXAMPLES / "order.json"), "--fleet", str(fleet)]) == 2
    assert "build_volume_mm" in capsys.readouterr().err


def test_route_against_the_live_twin(fresh_mosquitto: RunningBroker, capsys: pytest.CaptureFixture[str]) -> None:
    settings = MqttSettings(host=fresh_mosquitto.host, port=fresh_mosquitto.port,
                            protocol=5 if fresh_mosquitto.mqtt5 else 4)
    client = connect(settings)
    good, broken = DeviceRef("acme", "s1", "h1", "mjf-1"), DeviceRef("acme", "s1", "h1", "mjf-2")
    for ref, state in ((good, "idle"), (broken, "error")):
        birth = {"status": "online", "ts": 1.0, "technology": "MJF", "channels": [], "materials": ["PA12"],
                 "build_volume_mm": [380, 284, 380], "part_spacing_mm": 3, "cost_per_hour": 30}
        twin = {"device": {"tenant": "acme", "site": "s1", "area": "h1", "device": ref.device}, "ts": 1.0,
                "online": True, "state": state, "kpis": {"utilization": 0.4, "anomaly_score": 0.1}}
        client.publish(ref.status_topic, schemas.dumps(birth), qos=1, retain=True).wait_for_publish(5)
        client.publish(ref.twin_topic, schemas.dumps(twin), qos=1, retain=True).wait_for_publish(5)
    client.publish("fl/v1/acme/twin/s1/h1/junk", b"{not json", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    url = f"mqtt://{fresh_mosquitto.host}:{fresh_mosquitto.port}"
    code = main(["route", str(EXAMPLES / "order.json"), "--broker", url, "--wait", "1", "--now", NOW])
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert {a["printer"] for a in document["assignments"]} == {good.key}
    assert code == 1 and "ignoring fl/v1/acme/twin/s1/h1/junk" in captured.err
    reasons = {r["part_id"]: r["reason"] for r in document["rejected"]}
    assert "no printer runs Standard-Resin" in reasons["lens-holder"]


def test_route_with_the_real_twin_query_api(mqtt_settings: MqttSettings, tenant: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The fleet comes from the twin service's list_devices / get_twin answers for the tenant."""
    from twin_support import Publisher, batch, birth, twin_config

    from twin.service import TwinService

    service = TwinService(twin_config(mqtt_settings, tenant)).start()
    publisher = Publisher(mqtt_settings)
    try:
        printer, station = DeviceRef(tenant, "s1", "h1", "mjf-1"), DeviceRef(tenant, "s1", "line", "st-1")
        publisher.birth(printer, birth("MJF", channels=("state",), materials=["PA12"], build_volume_mm=[380, 284, 380],
                                       part_spacing_mm=3, cost_per_hour=30))
        publisher.birth(station, birth("line", channels=("state",)))
        for ref in (printer, station):
            publisher.publish(ref.telemetry_topic, batch(0, channels=("state",), state=1))
        order = tmp_path / "order.json"
        order.write_text(json.dumps({"order_id": "o1", "parts": [
            {"part_id": "bracket", "technology": "MJF", "material": "PA12", "bbox_mm": [60, 40, 20],
             "volume_cm3": 12, "quantity": 3}]}))
        url = f"mqtt://{mqtt_settings.host}:{mqtt_settings.port}"
        deadline = time.monotonic() + 15
        while True:  # the twin answers once it has registered the devices
            code = main(["route", str(order), "--broker", url, "--twin-api", tenant, "--now", NOW])
            out = capsys.readouterr().out
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        document = json.loads(out)
        assert code == 0 and {a["printer"] for a in document["assignments"]} == {printer.key}
        assert main(["route", str(order), "--broker", url, "--twin-api", "nosuchtenant", "--wait", "0.5",
                     "--now", NOW]) == 2
        assert "did not answer" in capsys.readouterr().err
    finally:
        publisher.close()
        service.stop()
