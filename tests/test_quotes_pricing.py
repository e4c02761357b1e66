"""Quotes: options per technology and material, prices rising with a busy capable fleet, STL parts,
per-part errors, the breakdown adding up, over MQTT and on the command line."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from quotes_support import Subscriber

from forgeline.cli import main
from forgeline.contract import schemas, topics
from forgeline.mqtt import MqttSettings
from forgeline.quotes.pricing import PricingConfig, QuoteError, quote_document
from forgeline.quotes.service import CustomerService
from forgeline.quotes.stl import cube_triangles, write_stl
from forgeline.routing.instances import generate_fleet
from forgeline.routing.model import Fleet

NOW = 1_767_225_600.0
EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
BRACKET = {"part_id": "bracket", "bbox_mm": [60, 40, 20], "volume_cm3": 12.0, "material": "PA12", "quantity": 20}


def idle_fleet() -> Fleet:
    return generate_fleet(30, seed=5, live=False, now=NOW)


def busy(fleet: Fleet) -> Fleet:
    out = Fleet()
    for p in fleet:
        out.add(replace(p, state="printing", utilization=0.95, busy_until_ts=NOW + 40 * 3600))
    return out


def options(doc: dict[str, object], part: int = 0) -> dict[tuple[str, str], dict[str, object]]:
    return {(o["technology"], o["material"]): o for o in doc["parts"][part]["options"]}  # type: ignore[index]


def test_quotes_rise_when_the_capable_fleet_is_busy() -> None:
    fleet = idle_fleet()
    calm = options(quote_document([BRACKET], fleet, NOW))
    rush = options(quote_document([BRACKET], busy(fleet), NOW))
    assert calm.keys() == rush.keys() and calm
    for key in calm:
        assert rush[key]["unit_price"] > calm[key]["unit_price"]  # type: ignore[operator]
        assert rush[key]["lead_time_h"] > calm[key]["lead_time_h"] + 39  # type: ignore[operator]
        assert rush[key]["busy_share"] == pytest.approx(0.95) and calm[key]["busy_share"] == 0


def test_only_the_capable_fleet_counts() -> None:
    fleet = idle_fleet()
    others_busy = Fleet()
    for p in fleet:  # every printer that cannot run PA12 is overloaded: PA12 prices do not move
        others_busy.add(p if "PA12" in p.materials else replace(p, utilization=1.0, busy_until_ts=NOW + 1e6))
    assert options(quote_document([BRACKET], fleet, NOW)) == options(quote_document([BRACKET], others_busy, NOW))


def test_open_choices_are_proposed_and_given_ones_respected() -> None:
    fleet = idle_fleet()
    proposed = options(quote_document([{**BRACKET, "material": None}], fleet, NOW))
    assert {t for t, _ in proposed} >= {"MJF", "SLS", "SLA", "FDM"}
    assert all(m in {mm for p in fleet if p.technology == t for mm in p.materials} for t, m in proposed)
    assert set(options(quote_document([BRACKET], fleet, NOW))) == {("MJF", "PA12"), ("SLS", "PA12")}
    only_sls = options(quote_document([{**BRACKET, "technology": "SLS"}], fleet, NOW))
    assert set(only_sls) == {("SLS", "PA12")}


def test_breakdown_adds_up_and_quantity_scales() -> None:
    pricing = PricingConfig(margin=0.25, surge=0.5)
    one = quote_document([{**BRACKET, "quantity": 1}], idle_fleet(), NOW, pricing=pricing)
    many = quote_document([{**BRACKET, "quantity": 500}], idle_fleet(), NOW, pricing=pricing)
    for doc, quantity in ((one, 1), (many, 500)):
        schemas.validate("quote_response", doc)
        for option in doc["parts"][0]["options"]:
            b = option["breakdown"]
            cost = b["machine"] + b["setup"] + b["material"] + b["post_processing"]
            assert option["unit_price"] == pytest.approx(cost * 1.25 * b["surge"], abs=0.01)
            assert option["total_price"] == pytest.approx(option["unit_price"] * quantity, abs=0.01 * quantity)
    mjf_one, mjf_many = options(one)[("MJF", "PA12")], options(many)[("MJF", "PA12")]
    assert float(mjf_many["lead_time_h"]) >= float(mjf_one["lead_time_h"])  # type: ignore[arg-type]


def test_per_part_errors_do_not_sink_the_quote() -> None:
    doc = quote_document([
        BRACKET,
        {"part_id": "neg", "bbox_mm": [10, -1, 10], "volume_cm3": 1, "material": "PA12"},
        {"part_id": "cheese", "bbox_mm": [10, 10, 10], "volume_cm3": 1, "material": "Cheese"},
        {"part_id": "huge", "bbox_mm": [900, 900, 900], "volume_cm3": 1000, "material": "PA12"},
        {"part_id": "open", "stl_base64": base64.b64encode(b"solid x\nendsolid x\n").decode()},
        {"part_id": "junk", "stl_base64": "***"},
    ], idle_fleet(), NOW)
    schemas.validate("quote_response", doc)
    errors = {p["part_id"]: p.get("error", "") for p in doc["parts"]}
    assert errors["bracket"] == "" and doc["parts"][0]["options"]
    assert "positive" in errors["neg"] and "unknown material" in errors["cheese"]
    assert "no printer can make it" in errors["huge"]
    assert "open" in errors["open"] and "base64" in errors["junk"]
    with pytest.raises(QuoteError):
        quote_document([], idle_fleet(), NOW)


def test_stl_parts_are_measured_from_the_mesh(tmp_path: Path) -> None:
    path = tmp_path / "cube.stl"
    write_stl(cube_triangles(30.0), path)
    doc = quote_document([{"part_id": "cube", "stl_base64": base64.b64encode(path.read_bytes()).decode(),
                           "material": "PA12", "quantity": 3}], idle_fleet(), NOW)
    part = doc["parts"][0]
    assert part["geometry"] == "stl" and part["volume_cm3"] == pytest.approx(27.0, rel=1e-3)
    assert part["bbox_mm"] == pytest.approx([30, 30, 30])
    assert options(doc)[("MJF", "PA12")]["mass_g"] == pytest.approx(27.0 * 1.01, rel=1e-3)


def test_quote_over_mqtt(mqtt_settings: MqttSettings) -> None:
    customer = f"c{uuid.uuid4().hex[:8]}"
    client = Subscriber(mqtt_settings, topics.customer_filter(customer))
    service = CustomerService(mqtt_settings, fleet=idle_fleet())
    service.start()
    try:
        request = {"correlation_id": "q1", "client_id": "web", "parts": [BRACKET]}
        client.publish(topics.quote_request_topic(customer), json.dumps(request).encode())
        answer = client.wait_doc(topics.quote_response_topic(customer, "web"), lambda d: d["correlation_id"] == "q1")
        schemas.validate("quote_response", answer)
        assert answer["ok"] and answer["parts"][0]["options"]
        client.publish(topics.quote_request_topic(customer), b'{"correlation_id": "q2", "client_id": "web"}')
        bad = client.wait_doc(topics.quote_response_topic(customer, "web"), lambda d: d["correlation_id"] == "q2")
        assert bad["ok"] is False and "parts" in bad["error"]
    finally:
        service.stop()
        client.close()


def test_cli_stl_and_order_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cube.stl"
    write_stl(cube_triangles(20.0), path, ascii=True)
    assert main(["quote", str(path), "--material", "PA12", "--quantity", "20", "--fleet",
                 str(EXAMPLES / "fleet.json"), "--now", str(NOW)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parts"][0]["volume_cm3"] == pytest.approx(8.0, rel=1e-3)
    assert {o["material"] for o in doc["parts"][0]["options"]} == {"PA12"}
    assert main(["quote", str(EXAMPLES / "quote.json"), "--fleet", str(EXAMPLES / "fleet.json"), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "bracket-a x24" in out and "SLA" in out
    broken = tmp_path / "broken.stl"
    write_stl(cube_triangles(20.0)[:-2], broken)
    assert main(["quote", str(broken), "--fleet", str(EXAMPLES / "fleet.json")]) == 1
    assert "not closed" in capsys.readouterr().out
