"""Checks of generated dashboard JSON, and the variable substitution Grafana applies before a query runs.

:func:`problems` checks the structure Grafana relies on (unique panel ids, a grid that fits, a query in
every panel, unique refIds, template variables defined before use and every referenced variable
defined) and every query against the time-series contract. :func:`interpolate` turns a panel query
into what Grafana's InfluxDB data source sends, so tests can run every query against a real InfluxDB.

Example:
    >>> interpolate('SELECT mean("x") FROM "kpi" WHERE "site" =~ /^$site$/ AND $timeFilter '
    ...             'GROUP BY time($__interval)', {"site": ["a.b", "c"]}, (0.0, 60.0), "10s")
    'SELECT mean("x") FROM "kpi" WHERE "site" =~ /^(a\\\\.b|c)$/ AND time >= 0ms and time <= 60000ms GROUP BY time(10s)'
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from forgeline.dashboards.influxql import referenced_variables, schema_problems
from forgeline.dashboards.model import DATASOURCE_REF, DATASOURCE_VARIABLE, GRID_WIDTH

ALL = "$__all"  # the value Grafana uses for an "All" selection

_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|[\]{}/]")
_VARIABLE_USE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def regex_escape(value: str) -> str:
    """Grafana's ``kbn.regexEscape``: how a multi-value selection is made safe inside ``/.../``."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def format_value(value: str | Sequence[str], all_value: str = ".*") -> str:
    """A variable's value as Grafana's InfluxDB data source substitutes it into a query.

    A single value is inserted as is; several values become ``(a|b)`` with regex escaping; the
    "All" selection becomes the variable's ``allValue`` (``.*`` here).
    """
    if isinstance(value, str):
        return all_value if value == ALL else value
    if len(value) == 1 and value[0] != ALL:
        return value[0]
    if ALL in value:
        return all_value
    return "(" + "|".join(regex_escape(v) for v in value) + ")"


def interpolate(query: str, values: Mapping[str, str | Sequence[str]], time_range: tuple[float, float],
                interval: str) -> str:
    """``query`` with ``$timeFilter``, ``$__interval``/``$interval`` and template variables replaced.

    ``time_range`` is (from, to) in seconds since the epoch; Grafana sends absolute times in ms.
    """
    start_ms, end_ms = round(time_range[0] * 1000), round(time_range[1] * 1000)
    text = query.replace("$timeFilter", f"time >= {start_ms}ms and time <= {end_ms}ms")
    text = text.replace("$__interval", interval).replace("$interval", interval)

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in values:
            return format_value(values[name])
        return match.group(0)  # $tag_x, $col and other non-variables stay

    return _VARIABLE_USE.sub(substitute, text)


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, query) for every InfluxQL query: panel targets, annotations and variable queries."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}", target.get("query", "")
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "query" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["query"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            yield f"variable {variable['name']!r}", variable["query"]


def _grid_problems(all_panels: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    occupied: dict[tuple[int, int], int] = {}
    for panel in all_panels:
        grid = panel.get("gridPos", {})
        x, y, w, h = (grid.get(k) for k in ("x", "y", "w", "h"))
        if not all(isinstance(v, int) for v in (x, y, w, h)):
            out.append(f"panel {panel.get('id')}: gridPos needs integer x, y, w, h")
            continue
        assert isinstance(x, int) and isinstance(y, int) and isinstance(w, int) and isinstance(h, int)
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > GRID_WIDTH:
            out.append(f"panel {panel.get('id')}: gridPos {grid} does not fit a {GRID_WIDTH}-column grid")
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            if cell in occupied:
                out.append(f"panel {panel.get('id')} overlaps panel {occupied[cell]}")
                break
            occupied[cell] = panel["id"]
    return out


def problems(dashboard: Mapping[str, Any]) -> list[str]:
    """Everything wrong with a dashboard's JSON (empty when it is fine)."""
    out: list[str] = []
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in dashboard:
            out.append(f"missing {key!r}")
    all_panels = list(panels(dashboard))
    ids = [p.get("id") for p in all_panels]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if duplicates:
        out.append(f"duplicate panel ids {duplicates}")
    out += _grid_problems([p for p in all_panels if "gridPos" in p])

    variables = [v.get("name", "") for v in dashboard.get("templating", {}).get("list", [])]
    if len(set(variables)) != len(variables):
        out.append(f"duplicate template variables {variables}")
    if DATASOURCE_VARIABLE not in variables:
        out.append(f"no {DATASOURCE_VARIABLE!r} variable for the panels' data source")
    # A variable's query may only use variables defined before it (Grafana resolves them in order).
    for index, variable in enumerate(dashboard.get("templating", {}).get("list", [])):
        later = referenced_variables(variable.get("query", "")) - set(variables[:index])
        if later:
            out.append(f"variable {variable.get('name')!r} uses {sorted(later)} defined after it or not at all")

    for panel in all_panels:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            out.append(f"{where} has no query")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            out.append(f"{where} repeats refIds {ref_ids}")
        if panel.get("datasource") != DATASOURCE_REF:
            out.append(f"{where} does not use the ${DATASOURCE_VARIABLE} data source")
        for target in targets:
            if not target.get("rawQuery") or not str(target.get("query", "")).strip():
                out.append(f"{where} {target.get('refId')}: empty or non-raw query")
        used = referenced_variables(" ".join([panel.get("title", ""), *(t.get("query", "") for t in targets),
                                              *(t.get("alias", "") for t in targets)]))
        if panel.get("repeat"):
            used.add(panel["repeat"])
        missing = used - set(variables)
        if missing:
            out.append(f"{where} uses undefined variables {sorted(missing)}")

    for where, query in queries(dashboard):
        out += [f"{where}: {p}" for p in schema_problems(query)]
        missing = referenced_variables(query) - set(variables)
        if missing and not where.startswith("panel"):
            out.append(f"{where} uses undefined variables {sorted(missing)}")
    return out
