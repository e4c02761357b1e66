"""Every query of every dashboard runs against a real InfluxDB 1.x (``influxd``) and returns data.

The data are written the way the real system writes them (see ``tests/dashboard_data.py``): line
protocol through influxd's v1 ``/write``, insight and feedback points by the loop's own writer. Each
query is interpolated as Grafana would: template variables resolved in order by running their own
queries against the same server (so only values that really exist are used), ``$timeFilter`` and
``$__interval`` from the dashboard's default time range.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeline.broker import free_port
from forgeline.contract.timeseries import MEASUREMENTS
from forgeline.dashboards.influxql import measurements_read
from forgeline.dashboards.provisioning import dashboard_files
from forgeline.dashboards.validate import ALL, interpolate, panels
from tests.dashboard_data import Dataset, make_dataset
from tests.servers import InfluxError, RunningInfluxd, start_influxd

pytestmark = pytest.mark.influx

# Which tenant each dashboard is looked at for: printers for fleet/device/routing, the appliance maker's line.
TENANT_OF = {"forgeline-fleet": "acme", "forgeline-device": "acme", "forgeline-routing": "acme",
             "forgeline-line": "kitchenworks", "forgeline-revisions": "kitchenworks"}
MAX_ASSIGNMENTS = 40


@pytest.fixture(scope="module")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningInfluxd, Dataset]]:
    data = make_dataset(end=float(int(time.time())))
    with start_influxd(tmp_path_factory.mktemp("influxd")) as server:
        assert server.write(data.lines) == len(data.lines)
        yield server, data


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(text) for text in dashboard_files().values()]


def _grafana_interval(span_s: float, max_data_points: int = 1000) -> str:
    """Grafana's auto interval: range / max data points, rounded up to a round value."""
    for seconds in (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 21600, 43200, 86400):
        if span_s / max_data_points <= seconds:
            return f"{seconds}s"
    return "86400s"


def time_range(dashboard: dict[str, Any], end: float) -> tuple[tuple[float, float], str]:
    match = re.fullmatch(r"now-(\d+)([hd])", dashboard["time"]["from"])
    assert match, dashboard["time"]
    span = int(match.group(1)) * (3600 if match.group(2) == "h" else 86400)
    return (end - span, end), _grafana_interval(span)


def variable_values(server: RunningInfluxd, query: str) -> list[str]:
    rows = server.query(query)
    return [str(row.get("value", row.get("fieldKey"))) for row in rows]


def assignments(server: RunningInfluxd, dashboard: dict[str, Any], tenant: str, window: tuple[float, float],
                interval: str) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Every combination of single-valued variables (multi-valued ones = All), resolved in order like
    Grafana does, and the values each variable offered."""
    offered: dict[str, list[str]] = {}
    partial: list[dict[str, Any]] = [{}]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        name = variable["name"]
        extended = []
        for values in partial:
            options = variable_values(server, interpolate(variable["query"], values, window, interval))
            assert options, f"{dashboard['uid']}: variable {name!r} offers nothing for {values}"
            offered.setdefault(name, [])
            offered[name] += [o for o in options if o not in offered[name]]
            if name == "tenant":
                assert tenant in options, f"{dashboard['uid']}: tenant {tenant!r} not offered ({options})"
                extended.append({**values, name: tenant})
            elif variable["multi"] or variable["includeAll"]:
                extended.append({**values, name: ALL})
            else:
                extended += [{**values, name: option} for option in options]
        partial = extended[:MAX_ASSIGNMENTS]
    return partial, offered


def run(server: RunningInfluxd, query: str) -> list[dict[str, Any]]:
    try:
        return server.query(query)
    except InfluxError as exc:
        raise AssertionError(f"influxd refused the query: {exc}") from None


@pytest.mark.parametrize("uid", list(TENANT_OF))
def test_every_panel_query_returns_data(influx: tuple[RunningInfluxd, Dataset], uid: str) -> None:
    server, data = influx
    [dashboard] = [d for d in dashboards() if d["uid"] == uid]
    window, interval = time_range(dashboard, data.end)
    combos, offered = assignments(server, dashboard, TENANT_OF[uid], window, interval)
    failures: list[str] = []
    checked = 0
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        repeat = panel.get("repeat")
        for target in panel["targets"]:
            tried: list[str] = []
            found = False
            for values in combos:
                repeated = [{**values, repeat: v} for v in offered[repeat]] if repeat else [values]
                for concrete in repeated:
                    query = interpolate(target["query"], concrete, window, interval)
                    assert not re.search(r"\$\{|\$(?!tag_)\w", query), f"uninterpolated variable in {query}"
                    tried.append(query)
                    if run(server, query):
                        found = True
                        break
                if found:
                    break
            checked += 1
            if not found:
                failures.append(f"{panel['title']!r} {target['refId']}: no data for any of {len(tried)} "
                                f"variable combinations, e.g. {tried[0]}")
    failures += annotation_failures(server, dashboard, combos, window, interval)
    assert failures == [], "\n".join(failures)
    assert checked >= 10


def annotation_failures(server: RunningInfluxd, dashboard: dict[str, Any], combos: list[dict[str, Any]],
                        window: tuple[float, float], interval: str) -> list[str]:
    """The dashboard's annotation queries that find no event for any of ``combos``, or whose rows lack
    the text column Grafana shows."""
    failures = []
    for annotation in dashboard["annotations"]["list"]:
        if "query" not in annotation:
            continue
        rows = [r for values in combos for r in run(server, interpolate(annotation["query"], values, window, interval))]
        if not rows:
            failures.append(f"annotation {annotation['name']!r} finds no events")
        elif not any(annotation["textColumn"] in row for row in rows):
            failures.append(f"annotation {annotation['name']!r}: text column {annotation['textColumn']!r} missing")
    return failures


def test_the_repeated_channel_panel_shows_every_channel_of_a_device_with_its_score(
        influx: tuple[RunningInfluxd, Dataset]) -> None:
    server, data = influx
    [dashboard] = [d for d in dashboards() if d["uid"] == "forgeline-device"]
    window, interval = time_range(dashboard, data.end)
    [panel] = [p for p in panels(dashboard) if p.get("repeat") == "channel"]
    for device in ("fdm-01", "metal-01"):
        site = next(s for s, d, _ in data.devices["acme"] if d == device)
        for channel in sorted(data.channels_of[device] - {"state", "layer"}):
            values = {"tenant": "acme", "site": site, "device": device, "channel": channel}
            value_rows = run(server, interpolate(panel["targets"][0]["query"], values, window, interval))
            score_rows = run(server, interpolate(panel["targets"][1]["query"], values, window, interval))
            assert value_rows and channel in value_rows[0], (device, channel)
            assert score_rows and all(0 <= r["anomaly score"] <= 1 for r in score_rows), (device, channel)


def _stat(dashboard_uid: str, title: str, values: dict[str, Any], server: RunningInfluxd,
          data: Dataset) -> float:
    [dashboard] = [d for d in dashboards() if d["uid"] == dashboard_uid]
    window, interval = time_range(dashboard, data.end)
    [panel] = [p for p in panels(dashboard) if p["title"] == title and p["type"] == "stat"]
    rows = run(server, interpolate(panel["targets"][0]["query"], values, window, interval))
    assert len(rows) == 1, rows
    value = next(v for k, v in rows[0].items() if k not in ("time", "tags"))
    return float(value)


def test_fleet_figures_count_what_the_twin_wrote(influx: tuple[RunningInfluxd, Dataset]) -> None:
    server, data = influx
    everything = {"tenant": "acme", "site": ALL, "technology": ALL}
    assert _stat("forgeline-fleet", "Devices online", everything, server, data) == data.online_at_end["acme"] == 4
    assert _stat("forgeline-fleet", "Anomalous devices", everything, server, data) == len(
        data.anomalous_at_end["acme"]) == 1
    assert _stat("forgeline-fleet", "Devices online", {**everything, "site": ["leipzig"]}, server, data) == 2
    utilization = _stat("forgeline-fleet", "Utilization", everything, server, data)
    assert 0.5 < utilization < 0.9


def test_line_figures_count_units_and_failures(influx: tuple[RunningInfluxd, Dataset]) -> None:
    server, data = influx
    everything = {"tenant": "kitchenworks", "site": "plant1", "model": ALL, "revision": ALL, "station": ALL}
    assert _stat("forgeline-line", "Units", everything, server, data) == len(data.serials) == 80
    assert _stat("forgeline-line", "Failed units", everything, server, data) == len(data.failed_serials) > 0
    only_b = _stat("forgeline-line", "Units", {**everything, "revision": ["B"]}, server, data)
    assert only_b == 40


def _rival_strings(rows: list[dict[str, Any]]) -> list[str]:
    return [str(v) for row in rows for v in (*row.get("tags", {}).values(), *row.values()) if "rival" in str(v)]


@pytest.mark.parametrize("uid", list(TENANT_OF))
def test_no_query_returns_another_tenants_data(influx: tuple[RunningInfluxd, Dataset], uid: str) -> None:
    """With every other variable at All, a query for one tenant never returns the competitor's devices."""
    server, data = influx
    [dashboard] = [d for d in dashboards() if d["uid"] == uid]
    window, interval = time_range(dashboard, data.end)
    everything: dict[str, Any] = {v["name"]: ALL for v in dashboard["templating"]["list"]}
    everything["tenant"] = TENANT_OF[uid]
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            query = interpolate(target["query"], everything, window, interval)
            assert _rival_strings(run(server, query)) == [], f"{panel['title']}: {query}"
    # ...and the check can fail: without the tenant filter the rival shows up.
    leaky = 'SELECT last("online") FROM "kpi" WHERE $timeFilter GROUP BY "device"'
    assert _rival_strings(run(server, interpolate(leaky, everything, window, interval)))


@pytest.mark.parametrize("uid", list(TENANT_OF))
def test_multi_value_selections_are_valid_influxql(influx: tuple[RunningInfluxd, Dataset], uid: str) -> None:
    """Two values of each multi-value variable, as Grafana sends them ((a|b), regex-escaped), still parse
    and return data where All does."""
    server, data = influx
    [dashboard] = [d for d in dashboards() if d["uid"] == uid]
    window, interval = time_range(dashboard, data.end)
    combos, offered = assignments(server, dashboard, TENANT_OF[uid], window, interval)
    multi = [v["name"] for v in dashboard["templating"]["list"] if v.get("multi") and v["name"] in offered]
    values = {**combos[0], **{name: offered[name][:2] for name in multi}}
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if panel.get("repeat"):
                continue
            run(server, interpolate(target["query"], values, window, interval))  # raises on a syntax error


def test_dashboard_files_are_the_generated_ones_checked_in() -> None:
    """dashboards/*.json in the repository equal what the builder generates (run `forgeline dashboards build`)."""
    directory = Path(__file__).resolve().parents[1] / "dashboards"
    for name, text in dashboard_files().items():
        path = directory / name
        assert path.is_file(), f"{path} missing: run `forgeline dashboards build`"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `forgeline dashboards build`"
    generated = set(dashboard_files())
    assert {p.name for p in directory.glob("*.json")} == generated


def test_interval_helper() -> None:
    assert _grafana_interval(6 * 3600) == "30s"
    assert _grafana_interval(30 * 86400) == "3600s"


# --- data written by a real demo run ---------------------------------------------------------------------


# Everything the stack writes; a demo run writes all of it.
DEMO_MEASUREMENTS = set(MEASUREMENTS)
# The demo's arguments: at speed 300 the oven line ships about 3 ovens a second once its four stations
# are filled, so both revisions (B until 14 s: about 40 units, C after: about 75) pass the loop's
# 30-unit minimum and it compares them, with feedback on both; orders every 3 s fill the routing queue;
# at 20 samples a second the twin is warm before the incidents: the oven line's from 12 s to 22 s (an
# anomaly event starts and ends), fdm-01's from 22 s on (still anomalous when the run ends).
DEMO_ARGS = ["--duration", "34", "--speed", "300", "--rate", "20", "--revision-at", "14", "--order-every", "3",
             "--incident-at", "12", "--influx-interval", "1"]


@pytest.fixture(scope="module")
def demo_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningInfluxd, set[str]]]:
    """``forgeline demo`` (agents, broker, twin, loop, routing, customer feedback) run with an InfluxDB URL
    nobody listens on: the twin, the loop and routing spill the exact line protocol they would have
    written into one directory, which is then loaded into influxd."""
    workdir = tmp_path_factory.mktemp("demo")
    nobody = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "forgeline.cli", "demo", *DEMO_ARGS, "--no-view",
                             "--influx-url", nobody, "--data-dir", str(workdir / "data")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    spill = workdir / "data" / "influx-spill"
    writers = {path.name.rsplit("-", 1)[0] for path in spill.glob("*.lp")}
    assert writers == {"twin", "loop", "routing"}, writers
    assert not list((spill / "rejected").iterdir()), "the database would have rejected points"
    lines = [line for path in sorted(spill.glob("*.lp")) for line in path.read_text().splitlines() if line]
    with start_influxd(workdir / "influxd") as server:
        assert server.write(lines) == len(lines)
        measurements = {row["name"] for row in server.query("SHOW MEASUREMENTS")}
        yield server, measurements


def test_a_demo_run_writes_every_measurement(demo_influx: tuple[RunningInfluxd, set[str]]) -> None:
    server, measurements = demo_influx
    assert measurements == DEMO_MEASUREMENTS
    # the leaky door seal of revision C shows in the customers' door complaints
    rows = server.query('SELECT count("serial") AS reports FROM "feedback" WHERE "category" = \'door\' '
                        'GROUP BY "product_revision"')
    door = {row["tags"]["product_revision"]: row["reports"] for row in rows}
    units = {row["tags"]["product_revision"]: row["units"] for row in server.query(
        'SELECT count("good") AS units FROM "unit" WHERE "device" = \'safety\' GROUP BY "product_revision"')}
    assert set(units) == {"B", "C"} and door.get("C", 0) >= 1, (door, units)
    compared = server.query('SELECT count("q_value") FROM "insight" WHERE "product_revision" = \'C\' '
                            'AND "baseline_revision" = \'B\'')
    assert compared and compared[0]["count"] > 0
    [queued] = server.query('SELECT max("queued_parts") FROM "routing"')
    assert queued["max"] > 0


@pytest.mark.parametrize("uid", list(TENANT_OF))
def test_panels_return_data_written_by_a_demo_run(demo_influx: tuple[RunningInfluxd, set[str]], uid: str) -> None:
    """Every query of every panel, and every annotation query, returns data written by the demo run, for
    some tenant and variable values."""
    server, measurements = demo_influx
    [dashboard] = [d for d in dashboards() if d["uid"] == uid]
    end = time.time() + 60
    window, interval = time_range(dashboard, end)
    tenants = variable_values(server, next(v["query"] for v in dashboard["templating"]["list"]
                                           if v["name"] == "tenant"))
    combos = [c for tenant in tenants for c in _try_assignments(server, dashboard, tenant, window, interval)]
    assert combos, f"{uid}: no tenant offers values for every variable ({tenants})"
    checked, failures = 0, []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            read = set(measurements_read(target["query"]))
            assert read <= measurements, f"{panel['title']!r}: the demo wrote no {sorted(read - measurements)}"
            repeat = panel.get("repeat")
            candidates = [{**c, repeat: v} for c in combos for v in _field_keys(server)] if repeat else combos
            checked += 1
            if not any(run(server, interpolate(target["query"], c, window, interval)) for c in candidates):
                failures.append(f"{panel['title']!r} {target['refId']}")
    failures += annotation_failures(server, dashboard, combos, window, interval)
    assert failures == [], f"no data from the demo run for {failures}"
    assert checked == sum(len(p.get("targets", [])) for p in panels(dashboard)) >= 5


def _field_keys(server: RunningInfluxd) -> list[str]:
    return variable_values(server, 'SHOW FIELD KEYS FROM "telemetry"')


def _try_assignments(server: RunningInfluxd, dashboard: dict[str, Any], tenant: str, window: tuple[float, float],
                     interval: str) -> list[dict[str, Any]]:
    try:
        return assignments(server, dashboard, tenant, window, interval)[0]
    except AssertionError:  # a tenant without this dashboard's data (a printer factory has no line)
        return []
