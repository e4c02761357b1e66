"""Router: decomposition and per-part reasons, availability rules, objective weights, open builds and
release rules, re-routing, explanations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.contract import schemas
from forgeline.contract.topics import DeviceRef
from forgeline.routing.instances import generate_fleet, generate_order, order_document
from forgeline.routing.model import Fleet, Order, Part, Printer, Rotation, parse_order
from forgeline.routing.packing import check_build
from forgeline.routing.router import ConfigError, ObjectiveWeights, ReleaseRule, Router, RoutingConfig

NOW = 1_767_225_600.0
DAY = 86400.0


def mjf(name: str, tenant: str = "acme", **kw: object) -> Printer:
    base = Printer(DeviceRef(tenant, "s1", "h1", name), "MJF", ("PA12",), (380, 284, 380), 3.0, 35.0,
                   utilization=0.5, anomaly_score=0.05)
    return replace(base, **kw)  # type: ignore[arg-type]


def fleet_of(*printers: Printer) -> Fleet:
    fleet = Fleet()
    for p in printers:
        fleet.add(p)
    return fleet


def order(*parts: Part, order_id: str = "o1", due: float | None = NOW + 5 * DAY) -> Order:
    return Order(order_id, "bigco", parts, due_ts=due)


def bracket(part_id: str = "bracket", quantity: int = 10, **kw: object) -> Part:
    base = Part(part_id, (60, 40, 20), 12.0, "MJF", "PA12", None, quantity)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_every_unit_is_assigned_and_packed_validly() -> None:
    fleet = generate_fleet(40, seed=3, now=NOW)
    the_order = generate_order(300, seed=4, now=NOW)
    router = Router(fleet)
    result = router.route(the_order, NOW)
    units = {(u.order_id, u.unit_id) for u in the_order.units()}
    assigned = {(a.order_id, a.unit_id) for a in result.assignments}
    rejected_parts = {p.part_id for p in result.rejected}
    assert assigned | {(the_order.order_id, u.unit_id) for u in the_order.units() if u.part.part_id in rejected_parts} \
        == units
    for planned in result.touched.values():
        assert check_build(planned.build) == []
        printer = fleet.get(planned.printer_key)
        assert printer is not None and printer.unavailable_reason() is None
        assert all(u.part.material in printer.materials and u.part.technology == printer.technology
                   for u in planned.units.values())
    document = {"correlation_id": "c", "ok": True, **result.document(router.config)}
    schemas.validate("routing_response", document)
    assert all(a["explanation"] and a["printer"] in a["explanation"] for a in document["assignments"])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_never_routes_to_an_offline_failed_or_anomalous_printer(fleet_seed: int, order_seed: int) -> None:
    fleet = generate_fleet(25, seed=fleet_seed, now=NOW)
    # make a third of the printers unusable in the three ways
    for i, printer in enumerate(list(fleet)):
        if i % 9 == 0:
            fleet.update(printer.key, online=False, state="offline")
        elif i % 9 == 3:
            fleet.update(printer.key, state="error")
        elif i % 9 == 6:
            fleet.update(printer.key, anomaly_score=0.95, anomaly_threshold=0.8)
    result = Router(fleet).route(generate_order(60, seed=order_seed, now=NOW), NOW)
    for a in result.assignments:
        chosen = fleet.get(a.printer)
        assert chosen is not None and chosen.unavailable_reason() is None


def test_per_part_reasons() -> None:
    fleet = fleet_of(mjf("m1"), replace(mjf("m2"), state="error"),
                     Printer(DeviceRef("beta", "s1", "h1", "sls1"), "SLS", ("TPU",), (340, 340, 600), online=False,
                             state="offline"))
    doc = {"order_id": "o1", "customer": "bigco", "parts": [
        {"part_id": "ok", "technology": "MJF", "material": "PA12", "bbox_mm": [10, 10, 10], "volume_cm3": 0.5},
        {"part_id": "neg", "technology": "MJF", "material": "PA12", "bbox_mm": [10, -1, 10], "volume_cm3": 0.5},
        {"part_id": "huge", "technology": "MJF", "material": "PA12", "bbox_mm": [500, 400, 400], "volume_cm3": 9},
        {"part_id": "what", "technology": "MJF", "material": "Cheese", "bbox_mm": [10, 10, 10], "volume_cm3": 0.5},
        {"part_id": "nocap", "technology": "SLA", "material": "PA12", "bbox_mm": [10, 10, 10], "volume_cm3": 0.5},
        {"part_id": "down", "technology": "SLS", "material": "TPU", "bbox_mm": [10, 10, 10], "volume_cm3": 0.5},
        {"part_id": "units", "technology": "MJF", "material": "PA12", "bbox_mm": [1, 1, 1], "volume_cm3": 5},
    ]}
    result = Router(fleet).route(parse_order(doc), NOW)
    codes = {p.part_id: p.code for p in result.rejected}
    assert codes == {"neg": "invalid", "huge": "too_large", "what": "unknown_material", "nocap": "no_capable_printer",
                     "down": "no_printer_available", "units": "invalid"}
    reasons = {p.part_id: p.reason for p in result.rejected}
    assert "offline" in reasons["down"] and "larger than every chamber" in reasons["huge"]
    assert "wrong units" in reasons["units"]
    assert [a.part_id for a in result.assignments] == ["ok"]


def test_weights_in_config_decide() -> None:
    cheap = mjf("cheap", cost_per_hour=10.0, utilization=0.9)
    idle = mjf("idle", cost_per_hour=60.0, utilization=0.1)
    the_order = order(bracket(quantity=5))
    by_cost = RoutingConfig(weights=ObjectiveWeights(fill=0, utilization=0, due=0, cost=1, anomaly=0))
    by_utilization = RoutingConfig(weights=ObjectiveWeights(fill=0, utilization=1, due=0, cost=0, anomaly=0))
    assert Router(fleet_of(cheap, idle), by_cost).route(the_order, NOW).assignments[0].printer == cheap.key
    result = Router(fleet_of(cheap, idle), by_utilization).route(the_order, NOW)
    assert result.assignments[0].printer == idle.key
    assert result.assignments[0].runner_up is not None and result.assignments[0].runner_up["printer"] == cheap.key
    assert "largest difference is utilization" in result.assignments[0].explanation


def test_due_dates_steer_away_from_busy_printers() -> None:
    busy = mjf("busy", utilization=0.1, busy_until_ts=NOW + 3 * DAY)
    free = mjf("free", utilization=0.9)
    result = Router(fleet_of(busy, free)).route(order(bracket(), due=NOW + 1 * DAY), NOW)
    assert {a.printer for a in result.assignments} == {free.key}
    assert all(a["on_time"] is True for a in result.document()["assignments"])


def test_open_builds_collect_later_orders_until_the_fill_target() -> None:
    router = Router(fleet_of(mjf("m1"), mjf("m2", utilization=0.55)),
                    RoutingConfig(release=ReleaseRule(fill=0.3)))
    first = router.route(order(bracket("a", 20), order_id="o1"), NOW)
    build_id = first.assignments[0].build_id
    assert first.released == [] and router.builds[build_id].status == "open"
    second = router.route(order(bracket("b", 20), order_id="o2"), NOW + 600)
    assert {a.build_id for a in second.assignments} == {build_id}  # joined the open build
    assert "joins open build" in second.assignments[0].explanation
    # big parts push the fill over the target: the build is released and the rest opens a new one
    third = router.route(order(bracket("c", 60, bbox_mm=(150, 120, 80), volume_cm3=200.0), order_id="o3"), NOW + 1200)
    released = router.builds[build_id]
    assert released.status == "released" and released.release_reason is not None
    assert released in third.released
    assert released.build.fill >= 0.3 or released.release_reason.startswith("full")


def test_due_date_pressure_and_holding_time_release() -> None:
    router = Router(fleet_of(mjf("m1")), RoutingConfig(release=ReleaseRule(fill=0.9, due_margin_h=2, max_hold_h=96)))
    result = router.route(order(bracket(quantity=2), due=NOW + 3 * DAY), NOW)
    planned = router.builds[result.assignments[0].build_id]
    assert router.tick(NOW + 2 * DAY) == []
    # far from full, but it needs about 9 h (build, cool-down, post-processing) plus the 2 h margin
    released = router.tick(NOW + 3 * DAY - 10 * 3600)
    assert released == [planned] and "due-date pressure" in (planned.release_reason or "")
    router.route(order(bracket(quantity=2), order_id="o2", due=None), NOW)
    assert router.tick(NOW + 95 * 3600) == []
    held = router.tick(NOW + 97 * 3600)
    assert len(held) == 1 and "held open" in (held[0].release_reason or "")


def test_failed_printer_queue_is_rerouted() -> None:
    fleet = fleet_of(mjf("m1", utilization=0.1), mjf("m2", utilization=0.6), mjf("m3", utilization=0.7))
    router = Router(fleet)
    router.route(order(bracket("a", 30), order_id="o1"), NOW)
    router.release_all(NOW)
    router.route(order(bracket("b", 10), order_id="o2"), NOW)
    on_m1 = [b for b in router.builds.values() if b.printer_key == mjf("m1").key]
    assert on_m1
    fleet.update(mjf("m1").key, state="error")
    result = router.fail_printer(mjf("m1").key, NOW + 60, "state error")
    assert all(b.status == "failed" for b in on_m1)
    moved = {(a.order_id, a.unit_id) for a in result.assignments}
    assert moved == {(u.order_id, u.unit_id) for b in on_m1 for u in b.units.values()}
    assert all(a.printer != mjf("m1").key and "re-routed from" in a.explanation for a in result.assignments)
    for a in result.assignments:
        assert router.build_of(a.order_id, a.unit_id).printer_key == a.printer  # type: ignore[union-attr]


def test_dry_run_changes_nothing() -> None:
    router = Router(fleet_of(mjf("m1")))
    dry = router.route(order(bracket()), NOW, dry_run=True)
    assert dry.assignments and not router.builds and not router.open
    real = router.route(order(bracket()), NOW)
    assert [a.build_id for a in real.assignments] == [a.build_id for a in dry.assignments]


def test_no_keep_open_releases_at_once() -> None:
    router = Router(fleet_of(mjf("m1")), RoutingConfig(keep_open=False))
    result = router.route(order(bracket()), NOW)
    assert result.released and all(b.status == "released" for b in result.released)
    assert "consolidation off" in (result.released[0].release_reason or "")


def test_rotation_rules_are_honoured() -> None:
    tall = Part("rod", (20, 20, 370), 50.0, "MJF", "PA12", rotation=Rotation.NONE, quantity=2)
    result = Router(fleet_of(mjf("m1"))).route(order(tall), NOW)
    assert all(a.size_mm == (20, 20, 370) for a in result.assignments)


def test_config_file_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text("weights: {cost: 2.0}\nrelease: {fill: 0.4}\nmaterials:\n"
                    "  PEEK: {density_g_cm3: 1.3, technologies: [FDM], price_per_kg: 500}\n")
    config = RoutingConfig.load(path)
    assert config.weights.cost == 2.0 and config.release.fill == 0.4 and "PEEK" in config.materials
    with pytest.raises(ConfigError, match=r"weights\.fill"):
        RoutingConfig(weights=ObjectiveWeights(fill=-1))
    with pytest.raises(ConfigError, match="unknown routing config key"):
        RoutingConfig.from_document({"wieghts": {}})
    with pytest.raises(ConfigError):
        RoutingConfig.from_document({"weights": {"speed": 1}})


def test_order_document_round_trip() -> None:
    the_order = generate_order(40, seed=9, now=NOW)
    again = parse_order(order_document(the_order))
    assert again.parts == the_order.parts and not again.problems


def test_tight_due_dates_keep_powder_builds_short() -> None:
    # 600 brackets fill tall builds; with one day to go they are spread into builds short enough to make it.
    fleet = fleet_of(*[mjf(f"m{i}") for i in range(6)])
    tight = Router(fleet).route(order(bracket(quantity=600), due=NOW + 1 * DAY), NOW)
    relaxed = Router(fleet).route(order(bracket(quantity=600), due=NOW + 30 * DAY), NOW)
    tight_builds = [b for b in tight.touched.values()]
    assert max(b.build.height_mm for b in tight_builds) < max(b.build.height_mm for b in relaxed.touched.values())
    assert all(a["on_time"] for a in tight.document()["assignments"])


def test_impossible_due_dates_still_route_as_early_as_possible() -> None:
    fleet = fleet_of(mjf("m1"), mjf("m2", busy_until_ts=NOW + 5 * DAY))
    result = Router(fleet).route(order(bracket(quantity=5), due=NOW + 3600), NOW)
    assert not result.rejected and {a.printer for a in result.assignments} == {mjf("m1").key}
    assert all(a["on_time"] is False for a in result.document()["assignments"])
    assert "late for its due date" in result.assignments[0].explanation


def test_snapshot_and_restore_keep_every_accepted_part() -> None:
    import json

    from forgeline.routing.router import restore, snapshot

    fleet = generate_fleet(30, seed=11, now=NOW)
    router = Router(fleet)
    router.route(generate_order(200, seed=12, now=NOW), NOW)
    router.tick(NOW + 3600)
    router.suspend(next(iter(fleet)).key, NOW + 900, "refused")
    saved = json.loads(json.dumps(snapshot(router)))
    again = Router(fleet)
    restore(again, saved)
    live = {b.build_id: b for b in router.builds.values() if b.status not in ("done", "failed")}
    assert live.keys() == again.builds.keys() and again.open.keys() == router.open.keys()
    for build_id, planned in live.items():
        copy = again.builds[build_id]
        assert copy.build.placements == planned.build.placements and copy.units.keys() == planned.units.keys()
        assert copy.status == planned.status and check_build(copy.build) == []
        assert copy.build.fill == pytest.approx(planned.build.fill)
    assert again.unit_build == router.unit_build and again.suspended == router.suspended
    for key, queue in router.queues.items():
        assert [b.build_id for b in again.queues.get(key, [])] == [b.build_id for b in queue]
    # both go on identically
    later = generate_order(50, seed=13, now=NOW)
    a, b = router.route(later, NOW + 7200), again.route(later, NOW + 7200)
    assert [(x.unit_id, x.build_id, x.position_mm) for x in a.assignments] == \
        [(x.unit_id, x.build_id, x.position_mm) for x in b.assignments]


def test_a_repeated_request_routes_nothing_twice() -> None:
    router = Router(fleet_of(mjf("m1"), mjf("m2")))
    first = router.route(order(bracket(quantity=8)), NOW)
    again = router.route(order(bracket(quantity=8)), NOW + 60)
    assert [(a.unit_id, a.build_id, a.position_mm) for a in again.assignments] == \
        [(a.unit_id, a.build_id, a.position_mm) for a in first.assignments]
    assert sum(len(b.units) for b in router.builds.values()) == 8
    assert all("already routed" in a.explanation for a in again.assignments)
