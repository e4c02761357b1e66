"""A small typed builder for Grafana dashboard JSON (schema version 39, Grafana 10.x/11.x).

Frozen dataclasses describe what a dashboard shows; :meth:`Dashboard.to_json` turns them into the
JSON that Grafana's HTTP API and file provisioning accept. Panel ids and grid positions are assigned
by :class:`Dashboard` (row by row, 24 columns wide) so a dashboard definition only says what to show.

Only the part of Grafana's model that forgeline uses is covered; everything emitted is plain Grafana
JSON, so a dashboard edited in Grafana and exported can be diffed against the generated one.

Example:
    >>> from forgeline.dashboards.model import Dashboard, Panel, Target, FieldStyle
    >>> board = Dashboard(uid="example", title="Example", panels=(
    ...     Panel("stat", "Devices", (Target('SELECT last("devices") FROM "fleet" WHERE $timeFilter'),),
    ...           style=FieldStyle(unit="none")),))
    >>> board.to_json()["panels"][0]["gridPos"]
    {'h': 4, 'w': 6, 'x': 0, 'y': 0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 39
DATASOURCE_TYPE = "influxdb"
DATASOURCE_VARIABLE = "datasource"
DATASOURCE_REF: dict[str, str] = {"type": DATASOURCE_TYPE, "uid": "${" + DATASOURCE_VARIABLE + "}"}
GRID_WIDTH = 24
# The data source that `forgeline dashboards push` and deploy/grafana provision; the dashboards' data
# source variable selects it by default (and any other InfluxDB data source can be picked instead).
DEFAULT_DATASOURCE_UID = "forgeline-influxdb"
DEFAULT_DATASOURCE_NAME = "forgeline InfluxDB"

PanelType = Literal["stat", "gauge", "bargauge", "timeseries", "table", "state-timeline", "row"]
ResultFormat = Literal["time_series", "table"]

# Default sizes (width, height) per panel type, in grid units.
DEFAULT_SIZE: dict[str, tuple[int, int]] = {
    "stat": (6, 4),
    "gauge": (6, 6),
    "bargauge": (12, 8),
    "timeseries": (12, 8),
    "table": (12, 8),
    "state-timeline": (24, 7),
    "row": (24, 1),
}


@dataclass(frozen=True)
class Target:
    """One raw InfluxQL query of a panel. ``alias`` may use ``$tag_<name>`` and ``$col``."""

    query: str
    result_format: ResultFormat = "time_series"
    alias: str = ""

    def to_json(self, ref_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "refId": ref_id,
            "datasource": dict(DATASOURCE_REF),
            "rawQuery": True,
            "query": self.query,
            "resultFormat": self.result_format,
        }
        if self.alias:
            out["alias"] = self.alias
        return out


@dataclass(frozen=True)
class Step:
    """A threshold step: from ``value`` upwards the colour is ``color`` (``None`` = the base step)."""

    color: str
    value: float | None = None


@dataclass(frozen=True)
class ValueText:
    """A value mapping: a number shown as ``text`` in ``color`` (state codes, on/off)."""

    value: int
    text: str
    color: str


@dataclass(frozen=True)
class Override:
    """Field properties for the fields of one query (``ref_id``) or one field name."""

    properties: dict[str, Any]
    ref_id: str | None = None
    field_name: str | None = None

    def __post_init__(self) -> None:
        if (self.ref_id is None) == (self.field_name is None):
            raise ValueError("an override matches either a query (ref_id) or a field (field_name)")

    def to_json(self) -> dict[str, Any]:
        matcher = ({"id": "byFrameRefID", "options": self.ref_id} if self.ref_id is not None
                   else {"id": "byName", "options": self.field_name})
        return {"matcher": matcher, "properties": [{"id": k, "value": v} for k, v in self.properties.items()]}


@dataclass(frozen=True)
class FieldStyle:
    """Unit, range, thresholds and value mappings of a panel's fields."""

    unit: str = "none"
    min: float | None = None
    max: float | None = None
    decimals: int | None = None
    thresholds: tuple[Step, ...] = (Step("green"),)
    mappings: tuple[ValueText, ...] = ()
    custom: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    color_mode: str = "thresholds"  # "thresholds" colours by value; "palette-classic" one colour per series
    no_value: str | None = None  # shown instead of "No data" (a count with no matching rows is 0)

    def __post_init__(self) -> None:
        if not self.thresholds or self.thresholds[0].value is not None:
            raise ValueError("thresholds start with a base step (value None)")
        values = [s.value for s in self.thresholds[1:]]
        if any(v is None for v in values) or values != sorted(values):  # type: ignore[type-var]
            raise ValueError(f"threshold steps must ascend: {values}")

    def to_json(self) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "unit": self.unit,
            "color": {"mode": self.color_mode},
            "thresholds": {"mode": "absolute",
                           "steps": [{"color": s.color, "value": s.value} for s in self.thresholds]},
            "mappings": [],
        }
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.mappings:
            defaults["mappings"] = [{
                "type": "value",
                "options": {str(m.value): {"text": m.text, "color": m.color, "index": i}
                            for i, m in enumerate(self.mappings)},
            }]
        if self.custom:
            defaults["custom"] = dict(self.custom)
        if self.no_value is not None:
            defaults["noValue"] = self.no_value
        return {"defaults": defaults, "overrides": [o.to_json() for o in self.overrides]}


@dataclass(frozen=True)
class Panel:
    """A panel. ``width``/``height`` default by type; ``repeat`` repeats it per value of a variable."""

    type: PanelType
    title: str
    targets: tuple[Target, ...] = ()
    style: FieldStyle = field(default_factory=FieldStyle)
    description: str = ""
    width: int | None = None
    height: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    repeat: str | None = None
    transformations: tuple[dict[str, Any], ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        default_width, default_height = DEFAULT_SIZE[self.type]
        return (self.width or default_width, self.height or default_height)

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        width, height = self.size
        out: dict[str, Any] = {
            "id": panel_id,
            "type": self.type,
            "title": self.title,
            "gridPos": {"h": height, "w": width, "x": x, "y": y},
        }
        if self.type == "row":
            out |= {"collapsed": False, "panels": []}
            return out
        if self.description:
            out["description"] = self.description
        out["datasource"] = dict(DATASOURCE_REF)
        out["targets"] = [t.to_json(chr(ord("A") + i)) for i, t in enumerate(self.targets)]
        out["fieldConfig"] = self.style.to_json()
        out["options"] = dict(self.options)
        if self.transformations:
            out["transformations"] = [dict(t) for t in self.transformations]
        if self.repeat:
            out |= {"repeat": self.repeat, "repeatDirection": "h", "maxPerRow": 4}
        return out


def row(title: str) -> Panel:
    """A row header; the panels after it belong to it until the next row."""
    return Panel("row", title)


@dataclass(frozen=True)
class Variable:
    """A template variable.

    ``kind`` is ``query`` (values from an InfluxQL ``SHOW TAG VALUES``/``SHOW FIELD KEYS``),
    ``datasource`` (pick an InfluxDB data source) or ``custom`` (fixed comma-separated values).
    """

    name: str
    label: str
    kind: Literal["query", "datasource", "custom"] = "query"
    query: str = ""
    multi: bool = False
    include_all: bool = False
    default: str | None = None
    hidden: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "label": self.label, "type": self.kind,
                               "hide": 2 if self.hidden else 0, "skipUrlSync": False}
        if self.kind == "datasource":
            out |= {"query": DATASOURCE_TYPE, "refresh": 1, "regex": "", "multi": False, "includeAll": False}
            out["current"] = {"selected": True, "text": DEFAULT_DATASOURCE_NAME, "value": DEFAULT_DATASOURCE_UID}
            return out
        out |= {"query": self.query, "multi": self.multi, "includeAll": self.include_all}
        if self.include_all:
            out["allValue"] = ".*"  # InfluxQL regex: every value (Grafana's default list is slow)
        if self.kind == "query":
            out |= {"datasource": dict(DATASOURCE_REF), "definition": self.query, "refresh": 2,
                    "regex": "", "sort": 1}
        else:
            out["options"] = [{"selected": i == 0, "text": v, "value": v}
                              for i, v in enumerate(self.query.split(","))]
        if self.default is not None:
            out["current"] = {"selected": True, "text": self.default, "value": self.default}
        return out


@dataclass(frozen=True)
class Annotation:
    """Events from an InfluxQL query drawn on every time-series panel (one column is the text)."""

    name: str
    query: str
    text_column: str
    tags_column: str = ""
    color: str = "red"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datasource": dict(DATASOURCE_REF),
            "enable": True,
            "hide": False,
            "iconColor": self.color,
            "query": self.query,
            "textColumn": self.text_column,
            "tagsColumn": self.tags_column,
        }


# Grafana's own "Annotations & Alerts" entry, kept so the dashboard behaves like a hand-made one.
BUILT_IN_ANNOTATION: dict[str, Any] = {
    "builtIn": 1,
    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
    "enable": True,
    "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)",
    "name": "Annotations & Alerts",
    "type": "dashboard",
}


@dataclass(frozen=True)
class Link:
    """A link to other dashboards by tag (kept in the time range and variables)."""

    title: str
    tag: str

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "type": "dashboards", "tags": [self.tag], "asDropdown": True,
                "includeVars": True, "keepTime": True, "targetBlank": False, "icon": "external link"}


@dataclass(frozen=True)
class Dashboard:
    """A dashboard; panels are laid out left to right, top to bottom, in the given order."""

    uid: str
    title: str
    panels: tuple[Panel, ...]
    description: str = ""
    variables: tuple[Variable, ...] = ()
    annotations: tuple[Annotation, ...] = ()
    tags: tuple[str, ...] = ("forgeline",)
    links: tuple[Link, ...] = ()
    time_from: str = "now-6h"
    refresh: str = "30s"

    def __post_init__(self) -> None:
        # Grafana refuses uids longer than 40 characters and characters outside [A-Za-z0-9_-].
        if not 0 < len(self.uid) <= 40 or not all(c.isalnum() or c in "-_" for c in self.uid):
            raise ValueError(f"dashboard uid {self.uid!r} must be 1-40 characters of letters, digits, - and _")

    def layout(self) -> list[tuple[Panel, int, int]]:
        """(panel, x, y) for every panel: fill a line of 24 columns, start a new line when full or at a row."""
        placed: list[tuple[Panel, int, int]] = []
        x = y = line_height = 0
        for panel in self.panels:
            width, height = panel.size
            if panel.type == "row" or x + width > GRID_WIDTH:
                y, x, line_height = y + line_height, 0, 0
            placed.append((panel, x, y))
            x += width
            line_height = max(line_height, height)
        return placed

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "editable": True,
            "graphTooltip": 1,  # shared crosshair: the anomaly overlay lines up with the values
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "timezone": "browser",
            "time": {"from": self.time_from, "to": "now"},
            "refresh": self.refresh,
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "links": [link.to_json() for link in self.links],
            "annotations": {"list": [BUILT_IN_ANNOTATION, *(a.to_json() for a in self.annotations)]},
            "templating": {"list": [
                Variable(DATASOURCE_VARIABLE, "InfluxDB", kind="datasource").to_json(),
                *(v.to_json() for v in self.variables),
            ]},
            "panels": [panel.to_json(i + 1, x, y) for i, (panel, x, y) in enumerate(self.layout())],
        }
