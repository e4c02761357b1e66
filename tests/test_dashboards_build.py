"""The dashboard builder and the validation: every dashboard validates, and the checks catch what they
claim to catch (duplicate ids, missing queries, undefined variables, overlapping panels, fields or
measurements the time-series contract does not have)."""

from __future__ import annotations

import copy
import doctest
import json
from typing import Any

import pytest

from forgeline.contract.timeseries import MEASUREMENTS
from forgeline.contract.vocabulary import CHANNELS
from forgeline.dashboards import catalog, influxql, model, push, validate
from forgeline.dashboards.catalog import GRAFANA_UNITS, all_dashboards
from forgeline.dashboards.influxql import schema_problems
from forgeline.dashboards.model import Dashboard, FieldStyle, Override, Panel, Step, Target
from forgeline.dashboards.validate import ALL, format_value, interpolate, panels, problems, queries


def boards() -> list[dict[str, Any]]:
    return [d.to_json() for d in all_dashboards()]


@pytest.mark.parametrize("board", boards(), ids=lambda b: b["uid"])
def test_every_dashboard_validates(board: dict[str, Any]) -> None:
    assert problems(board) == []
    assert json.loads(json.dumps(board)) == board  # plain JSON


def test_the_five_dashboards_of_the_issue_exist_with_their_variables() -> None:
    by_uid = {b["uid"]: b for b in boards()}
    assert set(by_uid) == {"forgeline-fleet", "forgeline-device", "forgeline-line", "forgeline-routing",
                           "forgeline-revisions"}
    variables = {uid: [v["name"] for v in b["templating"]["list"]] for uid, b in by_uid.items()}
    assert variables["forgeline-fleet"][:3] == ["datasource", "tenant", "site"]
    assert variables["forgeline-device"][:4] == ["datasource", "tenant", "site", "device"]
    assert by_uid["forgeline-device"]["annotations"]["list"][1]["name"] == "Anomaly started"
    uids = [b["uid"] for b in boards()]
    assert len(set(uids)) == len(uids)


def test_every_query_is_scoped_to_the_tenant() -> None:
    """One InfluxDB holds competitors: every panel and annotation query filters by the tenant variable."""
    for board in boards():
        for where, query in queries(board):
            if where.startswith("variable") and ("WITH KEY = \"tenant\"" in query or "SHOW FIELD KEYS" in query):
                continue  # the tenant list itself; field names carry no tenant data
            assert influxql.TENANT in query, f"{board['uid']} {where}: {query}"
        tenant = next(v for v in board["templating"]["list"] if v["name"] == "tenant")
        assert not tenant["multi"] and not tenant["includeAll"], "a panel never mixes tenants"


def test_every_panel_has_a_unit_and_thresholds() -> None:
    for board in boards():
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            defaults = panel["fieldConfig"]["defaults"]
            assert defaults["unit"], panel["title"]
            steps = defaults["thresholds"]["steps"]
            assert steps[0]["value"] is None, panel["title"]


def test_every_catalog_unit_has_a_grafana_unit() -> None:
    assert {c.unit for c in CHANNELS.values()} <= set(GRAFANA_UNITS)


def test_schema_check_catches_typos_and_wrong_measurements() -> None:
    assert schema_problems('SELECT mean("utilization") FROM "kpi" WHERE "tenant" = \'a\'') == []
    assert schema_problems('SELECT mean("nozzle_temp") FROM "telemetry"') == []  # channel fields
    assert schema_problems('SELECT mean("utilisation") FROM "kpi"') == [
        '"utilisation" is neither a tag nor a field of kpi']
    assert "not in forgeline/contract" in schema_problems('SELECT "x" FROM "kpis"')[0]
    assert schema_problems('SELECT "good" FROM "kpi"')  # a field of another measurement
    assert schema_problems('SELECT mean("x") AS "x" FROM "kpi"') == ['"x" is neither a tag nor a field of kpi']
    assert schema_problems("SELECT 1") == ['the query reads no measurement (FROM "name")']
    # every measurement the contract has is shown somewhere (twin_ops is the twin's own, not a dashboard's)
    shown = {m for b in boards() for _, q in queries(b) for m in influxql.measurements_read(q)}
    assert set(MEASUREMENTS) - shown == {"fleet", "twin_ops"}


def _broken(mutate: Any) -> list[str]:
    board = copy.deepcopy(boards()[0])
    mutate(board)
    return problems(board)


def test_validation_catches_structural_mistakes() -> None:
    def duplicate_id(b: dict[str, Any]) -> None:
        b["panels"][2]["id"] = b["panels"][1]["id"]

    def no_query(b: dict[str, Any]) -> None:
        b["panels"][1]["targets"] = []

    def undefined_variable(b: dict[str, Any]) -> None:
        b["panels"][1]["targets"][0]["query"] += ' AND "device" =~ /^$machine$/'

    def overlap(b: dict[str, Any]) -> None:
        b["panels"][2]["gridPos"] = dict(b["panels"][1]["gridPos"])

    def too_wide(b: dict[str, Any]) -> None:
        b["panels"][1]["gridPos"]["x"] = 22

    def typo(b: dict[str, Any]) -> None:
        b["panels"][1]["targets"][0]["query"] = b["panels"][1]["targets"][0]["query"].replace("online", "onlin")

    def variable_order(b: dict[str, Any]) -> None:
        b["templating"]["list"].reverse()

    def other_datasource(b: dict[str, Any]) -> None:
        b["panels"][1]["datasource"] = {"type": "influxdb", "uid": "prod"}

    def duplicate_ref(b: dict[str, Any]) -> None:
        b["panels"][1]["targets"].append(dict(b["panels"][1]["targets"][0]))

    expected = {duplicate_id: "duplicate panel ids", no_query: "has no query", undefined_variable: "['machine']",
                overlap: "overlaps", too_wide: "does not fit", typo: '"onlin" is neither',
                variable_order: "defined after it", other_datasource: "does not use the $datasource",
                duplicate_ref: "repeats refIds"}
    for mutate, text in expected.items():
        found = _broken(mutate)
        assert any(text in p for p in found), (mutate.__name__, found)


def test_builder_rejects_bad_definitions() -> None:
    with pytest.raises(ValueError, match="1-40 characters"):
        Dashboard(uid="x" * 41, title="t", panels=())
    with pytest.raises(ValueError, match="base step"):
        FieldStyle(thresholds=(Step("red", 1.0),))
    with pytest.raises(ValueError, match="ascend"):
        FieldStyle(thresholds=(Step("red"), Step("green", 2.0), Step("blue", 1.0)))
    with pytest.raises(ValueError, match="either a query"):
        Override({"unit": "s"})


def test_layout_fills_lines_of_24_and_starts_rows_on_a_new_line() -> None:
    stat = Panel("stat", "s", (Target('SELECT last("online") FROM "kpi"'),))
    board = Dashboard("layout", "Layout", (stat, stat, stat, stat, stat, model.row("R"), stat)).to_json()
    positions = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in board["panels"]]
    assert positions == [(0, 0), (6, 0), (12, 0), (18, 0), (0, 4), (0, 8), (0, 9)]
    assert [p["id"] for p in board["panels"]] == list(range(1, 8))


def test_interpolation_follows_grafana_influxdb_rules() -> None:
    assert format_value("acme") == "acme"
    assert format_value(["a.b", "c/d"]) == r"(a\.b|c\/d)"
    assert format_value(ALL) == ".*" and format_value([ALL, "x"]) == ".*"
    assert format_value(["only"]) == "only"
    query = interpolate('SELECT mean("$channel") AS "$channel" FROM "telemetry" WHERE "tenant" =~ /^$tenant$/ '
                        'AND ${device} AND $timeFilter GROUP BY time($__interval), "device"',
                        {"channel": "nozzle_temp", "tenant": "acme", "device": "d1"}, (1.5, 61.0), "1m")
    assert query == ('SELECT mean("nozzle_temp") AS "nozzle_temp" FROM "telemetry" WHERE "tenant" =~ /^acme$/ '
                     'AND d1 AND time >= 1500ms and time <= 61000ms GROUP BY time(1m), "device"')
    assert interpolate("alias $tag_device $col", {"device": "x"}, (0, 1), "1s") == "alias $tag_device $col"


def test_module_examples_run() -> None:
    for module in (model, influxql, validate, push, catalog):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
