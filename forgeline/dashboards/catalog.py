"""forgeline's Grafana dashboards, defined once here; ``dashboards/*.json`` is generated from them.

=================== ========================================================================================
uid                 what it answers
=================== ========================================================================================
forgeline-fleet     How is my fleet doing? Utilization/OEE, chamber fill, availability, anomalies, builds
forgeline-device    What is this machine doing? Channels with their anomaly score, events as annotations
forgeline-line      How is the microwave line doing? Pass rate, cycle time, station health, failed units
forgeline-routing   Where is the order book? Queued parts, open builds and their fill, on-time rate
forgeline-revisions Is the new revision better? Loop comparisons, pass rate, cycle time, feedback
=================== ========================================================================================

All queries are InfluxQL over the measurements of :mod:`forgeline.contract.timeseries`, filtered by the
template variables (tenant first: one InfluxDB holds many tenants).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from forgeline.contract.vocabulary import CHANNELS, DeviceState
from forgeline.dashboards.influxql import DEVICE, MODEL, REVISION, SITE, STATION, TECHNOLOGY, TENANT, where
from forgeline.dashboards.model import (
    Annotation,
    Dashboard,
    FieldStyle,
    Link,
    Override,
    Panel,
    Step,
    Target,
    ValueText,
    Variable,
    row,
)

# Catalog unit -> Grafana unit id. Every unit of the channel catalog is here (a test checks), so a
# new channel is displayed with its unit.
GRAFANA_UNITS: dict[str, str] = {
    "code": "none",
    "ratio": "percentunit",
    "count": "short",
    "degC": "celsius",
    "K": "kelvin",
    "W": "watt",
    "ppm": "ppm",
    "mm/s": "suffix: mm/s",
    "mW/cm2": "suffix: mW/cm²",
    "mA": "mamp",
    "MOhm": "Mohm",
    "s": "s",
    "bar": "pressurebar",
    "l/min": "flowlpm",
    "A": "amp",
    "V": "volt",
}

STATE_COLORS = {
    DeviceState.OFFLINE: "text",
    DeviceState.IDLE: "blue",
    DeviceState.HEATING: "orange",
    DeviceState.PRINTING: "green",
    DeviceState.PAUSED: "yellow",
    DeviceState.ERROR: "red",
    DeviceState.MAINTENANCE: "purple",
}
STATE_MAPPINGS = tuple(ValueText(int(s), s.name.lower(), STATE_COLORS[s]) for s in DeviceState)
ONLINE_MAPPINGS = (ValueText(0, "offline", "red"), ValueText(1, "online", "green"))

# Thresholds. Anomaly: the twin opens an event at 0.8 and closes it below 0.5 (docs/core.md).
ANOMALY_STEPS = (Step("green"), Step("yellow", 0.5), Step("red", 0.8))
OEE_STEPS = (Step("red"), Step("orange", 0.4), Step("green", 0.65))  # 0.85 is "world class"
UTILIZATION_STEPS = (Step("red"), Step("orange", 0.3), Step("green", 0.6))
AVAILABILITY_STEPS = (Step("red"), Step("orange", 0.7), Step("green", 0.9))
FILL_STEPS = (Step("red"), Step("orange", 0.3), Step("green", 0.6))  # powder-bed chambers pay by fill
YIELD_STEPS = (Step("red"), Step("orange", 0.9), Step("green", 0.97))
ON_TIME_STEPS = (Step("red"), Step("orange", 0.9), Step("green", 0.97))
COUNT_ALERT_STEPS = (Step("green"), Step("red", 1))

LINE_THRESHOLDS = {"thresholdsStyle": {"mode": "line+area"}, "fillOpacity": 0, "lineWidth": 1, "spanNulls": True}
LINES = {"fillOpacity": 5, "lineWidth": 1, "spanNulls": True, "showPoints": "never"}
BARS = {"drawStyle": "bars", "fillOpacity": 60, "lineWidth": 1}

STAT_OPTIONS = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background", "graphMode": "none", "textMode": "value", "justifyMode": "center"}
SPARK_OPTIONS = {**STAT_OPTIONS, "graphMode": "area", "colorMode": "value"}
GAUGE_OPTIONS = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                 "showThresholdMarkers": True, "showThresholdLabels": False}
BAR_OPTIONS = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
               "valueMode": "color", "namePlacement": "left"}
LEGEND_TABLE = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "lastNotNull"],
                           "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"}}
LEGEND_LIST = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "none"}}
TABLE_OPTIONS = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}}
TIMELINE_OPTIONS = {"showValue": "never", "mergeValues": True, "alignValue": "left", "rowHeight": 0.8,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}

DEVICE_ALIAS = "$tag_device"


def ratio_style(**style: Any) -> FieldStyle:
    """A share in [0, 1] shown as percent."""
    return FieldStyle(unit="percentunit", min=0.0, max=1.0, **style)


PHASE_START = "\"phase\" = 'start'"
PHASE_END = "\"phase\" = 'end'"
FAILED = "\"good\" = 0"


# --- template variables --------------------------------------------------------------------------------


def tenant_variable(measurement: str = "kpi") -> Variable:
    # Single value on purpose: tenants are competitors, a panel never mixes two of them.
    return Variable("tenant", "Tenant", query=f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "tenant"')


def site_variable(multi: bool = True) -> Variable:
    return Variable("site", "Site", query=f'SHOW TAG VALUES FROM "kpi" WITH KEY = "site" WHERE {TENANT}',
                    multi=multi, include_all=multi)


LINKS = (Link("forgeline", "forgeline"),)


def _last_per(measurement: str, field: str, conditions: Iterable[str], by: str = "device") -> str:
    """The latest value of ``field`` per ``by`` within the time range (a subquery for fleet-wide figures)."""
    return (f'SELECT last("{field}") AS "{field}" FROM "{measurement}" WHERE {where(*conditions)} '
            f'GROUP BY "{by}"')


def _stat(title: str, query: str, style: FieldStyle, description: str = "", width: int = 4) -> Panel:
    return Panel("stat", title, (Target(query),), style=style, description=description, width=width,
                 options=dict(STAT_OPTIONS))


# --- fleet overview --------------------------------------------------------------------------------------


def fleet_overview() -> Dashboard:
    scope = (TENANT, SITE, TECHNOLOGY)

    def latest(field: str, aggregate: str) -> str:
        return f'SELECT {aggregate}("{field}") FROM ({_last_per("kpi", field, scope)})'

    def per_device(field: str) -> str:
        return (f'SELECT mean("{field}") FROM "kpi" WHERE {where(*scope)} '
                f'GROUP BY time($__interval), "device" fill(none)')

    anomalous = (f'SELECT count("anomaly_score") FROM ({_last_per("kpi", "anomaly_score", scope)}) '
                 f'WHERE "anomaly_score" >= 0.8')
    producing = (f'SELECT count("state") FROM ({_last_per("kpi", "state", scope)}) '
                 f'WHERE "state" = {int(DeviceState.PRINTING)}')
    return Dashboard(
        uid="forgeline-fleet",
        title="forgeline / Fleet overview",
        description="Per tenant: utilization, OEE, chamber fill, availability, anomalies and builds of every device.",
        variables=(
            tenant_variable(),
            site_variable(),
            Variable("technology", "Technology", multi=True, include_all=True,
                     query=f'SHOW TAG VALUES FROM "kpi" WITH KEY = "technology" WHERE {TENANT} AND {SITE}'),
        ),
        annotations=(Annotation(
            "Anomaly events",
            f'SELECT "score", "channels", "device" FROM "anomaly" WHERE {where(*scope, PHASE_START)}',
            text_column="channels", tags_column="device"),),
        links=LINKS,
        panels=(
            row("Now"),
            _stat("Devices online", latest("online", "sum"), FieldStyle(unit="short", thresholds=(Step("blue"),)),
                  "Devices whose latest KPI point says online."),
            _stat("Producing now", producing, FieldStyle(unit="short", thresholds=(Step("blue"),), no_value="0"),
                  "Devices whose latest state is printing/producing."),
            _stat("Utilization", latest("utilization", "mean"), ratio_style(thresholds=UTILIZATION_STEPS),
                  "Mean of each device's latest utilization (share of time producing)."),
            _stat("OEE", latest("oee", "mean"), ratio_style(thresholds=OEE_STEPS),
                  "Mean of each device's latest OEE (availability × effectiveness × quality, ISO 22400-2)."),
            _stat("Chamber fill", latest("chamber_fill", "mean"), ratio_style(thresholds=FILL_STEPS),
                  "Mean planned chamber fill of the current builds."),
            _stat("Anomalous devices", anomalous, FieldStyle(unit="short", thresholds=COUNT_ALERT_STEPS, no_value="0"),
                  "Devices whose latest anomaly score is at or above the event threshold 0.8."),
            row("Trends"),
            Panel("timeseries", "Utilization by device", (Target(per_device("utilization"), alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=UTILIZATION_STEPS, custom=LINES, color_mode="palette-classic"),
                  options=LEGEND_TABLE),
            Panel("timeseries", "OEE by device", (Target(per_device("oee"), alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=OEE_STEPS, custom=LINES, color_mode="palette-classic"),
                  options=LEGEND_TABLE),
            Panel("timeseries", "Availability by device", (Target(per_device("availability"), alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=AVAILABILITY_STEPS, custom=LINES, color_mode="palette-classic"),
                  options=LEGEND_TABLE),
            Panel("bargauge", "Chamber fill (latest) by device",
                  (Target(f'SELECT last("chamber_fill") FROM "kpi" WHERE {where(*scope)} GROUP BY "device"',
                          alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=FILL_STEPS), options=BAR_OPTIONS),
            Panel("state-timeline", "Device state",
                  (Target(f'SELECT last("state") FROM "kpi" WHERE {where(*scope)} '
                          f'GROUP BY time($__interval), "device" fill(previous)', alias=DEVICE_ALIAS),),
                  FieldStyle(mappings=STATE_MAPPINGS, thresholds=(Step("text"),)), options=TIMELINE_OPTIONS),
            Panel("timeseries", "Anomaly score by device",
                  (Target(f'SELECT max("anomaly_score") FROM "kpi" WHERE {where(*scope)} '
                          f'GROUP BY time($__interval), "device" fill(none)', alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=ANOMALY_STEPS, custom={**LINES, **LINE_THRESHOLDS},
                             color_mode="palette-classic"),
                  description="Combined device score of the twin; events open at 0.8, close below 0.5.",
                  options=LEGEND_TABLE, width=24),
            row("Events"),
            Panel("table", "Anomaly events",
                  (Target(f'SELECT "device", "score", "channels", "event_id" FROM "anomaly" '
                          f'WHERE {where(*scope, PHASE_START)} ORDER BY time DESC LIMIT 200',
                          result_format="table"),),
                  FieldStyle(thresholds=ANOMALY_STEPS, overrides=(
                      Override({"unit": "percentunit", "custom.cellOptions": {"type": "color-background"}},
                               field_name="score"),)),
                  options=TABLE_OPTIONS),
            Panel("table", "Builds started",
                  (Target(f'SELECT "device", "job_id", "material", "parts", "chamber_fill", "packing_density", '
                          f'"build_height_mm" FROM "build" WHERE {where(*scope, PHASE_START)} '
                          f'ORDER BY time DESC LIMIT 200', result_format="table"),),
                  FieldStyle(thresholds=FILL_STEPS, overrides=(
                      Override({"unit": "percentunit", "custom.cellOptions": {"type": "color-background"}},
                               field_name="chamber_fill"),
                      Override({"unit": "percentunit"}, field_name="packing_density"),
                      Override({"unit": "lengthmm"}, field_name="build_height_mm"))),
                  options=TABLE_OPTIONS),
        ),
    )


# --- device detail ---------------------------------------------------------------------------------------

# Counters and the state code are shown elsewhere (KPIs, state timeline); the channel picker offers the rest.
NOT_PLOTTED = ("state", "produced_total", "good_total", "scrap_total", "layer")


def device_detail() -> Dashboard:
    scope = (TENANT, SITE, DEVICE)
    unit_overrides = tuple(Override({"unit": GRAFANA_UNITS[channel.unit]}, field_name=name)
                           for name, channel in CHANNELS.items())
    score_on_right = Override({
        "custom.axisPlacement": "right", "unit": "percentunit", "min": 0, "max": 1,
        "custom.lineStyle": {"fill": "dash", "dash": [10, 10]}, "custom.fillOpacity": 0,
        "color": {"mode": "fixed", "fixedColor": "red"}, "custom.axisLabel": "anomaly score",
    }, ref_id="B")

    def kpi_stat(title: str, field: str, style: FieldStyle) -> Panel:
        return Panel("stat", title, (Target(f'SELECT last("{field}") FROM "kpi" WHERE {where(*scope)}'),),
                     style=style, width=4, options=dict(SPARK_OPTIONS if field != "state" else STAT_OPTIONS))

    return Dashboard(
        uid="forgeline-device",
        title="forgeline / Device detail",
        description="One device: KPIs, state, every channel with its anomaly score, anomaly events and builds.",
        variables=(
            tenant_variable(),
            site_variable(multi=False),
            Variable("device", "Device",
                     query=f'SHOW TAG VALUES FROM "kpi" WITH KEY = "device" WHERE {TENANT} AND {SITE}'),
            Variable("channel", "Channels", multi=True, include_all=True,
                     query='SHOW FIELD KEYS FROM "telemetry"'),
        ),
        annotations=(
            Annotation("Anomaly started",
                       f'SELECT "score", "channels" FROM "anomaly" WHERE {where(*scope, PHASE_START)}',
                       text_column="channels", color="red"),
            Annotation("Anomaly ended",
                       f'SELECT "score", "channels" FROM "anomaly" WHERE {where(*scope, PHASE_END)}',
                       text_column="channels", color="green"),
            Annotation("Builds",
                       f'SELECT "job_id", "phase" FROM "build" WHERE {where(*scope)}',
                       text_column="job_id", tags_column="phase", color="blue"),
        ),
        links=LINKS,
        panels=(
            kpi_stat("State", "state", FieldStyle(mappings=STATE_MAPPINGS, thresholds=(Step("text"),))),
            kpi_stat("Utilization", "utilization", ratio_style(thresholds=UTILIZATION_STEPS)),
            kpi_stat("OEE", "oee", ratio_style(thresholds=OEE_STEPS)),
            kpi_stat("Availability", "availability", ratio_style(thresholds=AVAILABILITY_STEPS)),
            kpi_stat("Chamber fill", "chamber_fill", ratio_style(thresholds=FILL_STEPS)),
            kpi_stat("Anomaly score", "anomaly_score", ratio_style(thresholds=ANOMALY_STEPS)),
            Panel("state-timeline", "State",
                  (Target(f'SELECT last("state") FROM "kpi" WHERE {where(*scope)} '
                          f'GROUP BY time($__interval) fill(previous)', alias="state"),),
                  FieldStyle(mappings=STATE_MAPPINGS, thresholds=(Step("text"),)), options=TIMELINE_OPTIONS,
                  height=4),
            row("Channels"),
            Panel("timeseries", "$channel",
                  (Target(f'SELECT mean("$channel") AS "$channel" FROM "telemetry" WHERE {where(*scope)} '
                          f'GROUP BY time($__interval) fill(none)', alias="$channel"),
                   Target(f'SELECT max("$channel") AS "anomaly score" FROM "channel_score" WHERE {where(*scope)} '
                          f'GROUP BY time($__interval) fill(none)', alias="anomaly score")),
                  FieldStyle(custom=LINES, color_mode="palette-classic", overrides=(*unit_overrides, score_on_right)),
                  description="Mean of the channel per interval (left axis, catalog unit) and the twin's anomaly "
                              "score of that channel (right axis, dashed).",
                  repeat="channel", width=12, options=LEGEND_LIST),
            row("Anomalies"),
            Panel("timeseries", "Anomaly score per channel",
                  (Target(f'SELECT max(*) FROM "channel_score" WHERE {where(*scope)} '
                          f'GROUP BY time($__interval) fill(none)', alias="$col"),),
                  ratio_style(thresholds=ANOMALY_STEPS, custom={**LINES, **LINE_THRESHOLDS},
                             color_mode="palette-classic"),
                  options=LEGEND_TABLE),
            Panel("table", "Anomaly events",
                  (Target(f'SELECT "phase", "score", "channels", "event_id" FROM "anomaly" WHERE {where(*scope)} '
                          f'ORDER BY time DESC LIMIT 200', result_format="table"),),
                  FieldStyle(thresholds=ANOMALY_STEPS, overrides=(
                      Override({"unit": "percentunit", "custom.cellOptions": {"type": "color-background"}},
                               field_name="score"),)),
                  options=TABLE_OPTIONS),
            Panel("table", "Builds",
                  (Target(f'SELECT "phase", "job_id", "material", "parts", "chamber_fill", "packing_density" '
                          f'FROM "build" WHERE {where(*scope)} ORDER BY time DESC LIMIT 100',
                          result_format="table"),),
                  FieldStyle(overrides=(Override({"unit": "percentunit"}, field_name="chamber_fill"),
                                        Override({"unit": "percentunit"}, field_name="packing_density"))),
                  options=TABLE_OPTIONS, width=24),
        ),
    )


# --- microwave line --------------------------------------------------------------------------------------

# Test limits of the line (the loop's simulator fails a unit on the same limits, forgeline/loop/simulate.py).
STATION_CHANNELS: tuple[tuple[str, tuple[Step, ...], str], ...] = (
    ("magnetron_power", (Step("red"), Step("green", 750.0)), "Magnetron output; below 750 W fails the unit."),
    ("cavity_temp_rise", (Step("red"), Step("green", 10.0), Step("red", 13.0)),
     "Water-load temperature rise in the heating test; 10-13 K passes."),
    ("door_leakage", (Step("green"), Step("orange", 0.5), Step("red", 1.0)),
     "Door-seal leakage at 5 cm; above 1 mW/cm² fails (the FDA limit at manufacture, 21 CFR 1030.10)."),
    ("hipot_current", (Step("green"), Step("orange", 2.0), Step("red", 3.0)), "Hipot leakage; above 3 mA fails."),
    ("insulation_resistance", (Step("red"), Step("green", 2.0)), "Insulation resistance; below 2 MOhm fails."),
)


def microwave_line() -> Dashboard:
    units = (TENANT, SITE, MODEL, REVISION, STATION)
    stations = (TENANT, SITE, STATION)

    def unit_count(*extra: str) -> str:
        return f'SELECT count(distinct("serial")) FROM "unit" WHERE {where(*units, *extra)}'

    channel_panels = tuple(
        Panel("timeseries", f"{name.replace('_', ' ').capitalize()}",
              (Target(f'SELECT mean("{name}") FROM "telemetry" WHERE {where(*stations)} '
                      f'GROUP BY time($__interval), "device" fill(none)', alias=DEVICE_ALIAS),),
              FieldStyle(unit=GRAFANA_UNITS[CHANNELS[name].unit], thresholds=steps,
                         custom={**LINES, **LINE_THRESHOLDS}, color_mode="palette-classic"),
              description=text, width=8 if i < 3 else 12, options=LEGEND_LIST)
        for i, (name, steps, text) in enumerate(STATION_CHANNELS))
    return Dashboard(
        uid="forgeline-line",
        title="forgeline / Microwave line",
        description="Units, pass rate and cycle time per station and revision; station health and test channels.",
        variables=(
            tenant_variable("unit"),
            Variable("site", "Site", query=f'SHOW TAG VALUES FROM "unit" WITH KEY = "site" WHERE {TENANT}'),
            Variable("model", "Model", multi=True, include_all=True,
                     query=f'SHOW TAG VALUES FROM "unit" WITH KEY = "product_model" WHERE {TENANT} AND {SITE}'),
            Variable("revision", "Revision", multi=True, include_all=True,
                     query=f'SHOW TAG VALUES FROM "unit" WITH KEY = "product_revision" '
                           f'WHERE {TENANT} AND {SITE} AND {MODEL}'),
            Variable("station", "Station", multi=True, include_all=True,
                     query=f'SHOW TAG VALUES FROM "unit" WITH KEY = "device" WHERE {TENANT} AND {SITE}'),
        ),
        annotations=(Annotation(
            "Anomaly events",
            f'SELECT "score", "channels", "device" FROM "anomaly" WHERE {where(*stations, PHASE_START)}',
            text_column="channels", tags_column="device"),),
        links=LINKS,
        panels=(
            row("Output"),
            _stat("Units", unit_count(), FieldStyle(unit="short", thresholds=(Step("blue"),)),
                  "Distinct serials tested at the selected stations.", width=6),
            _stat("Failed units", unit_count(FAILED),
                  FieldStyle(unit="short", thresholds=(Step("green"), Step("orange", 1), Step("red", 10)),
                             no_value="0"),
                  "Distinct serials that failed at least one selected station.", width=6),
            _stat("Pass rate", f'SELECT mean("good") FROM "unit" WHERE {where(*units)}',
                  ratio_style(thresholds=YIELD_STEPS, decimals=1),
                  "Share of station tests passed (first pass).", width=6),
            _stat("Cycle time p95", f'SELECT percentile("cycle_time", 95) FROM "unit" WHERE {where(*units)}',
                  FieldStyle(unit="s", thresholds=(Step("blue"),), decimals=1),
                  "95th percentile of the station cycle times.", width=6),
            Panel("timeseries", "Pass rate by station",
                  (Target(f'SELECT mean("good") FROM "unit" WHERE {where(*units)} '
                          f'GROUP BY time($__interval), "device" fill(none)', alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=YIELD_STEPS, custom={**LINES, **LINE_THRESHOLDS},
                             color_mode="palette-classic"), options=LEGEND_TABLE),
            Panel("bargauge", "Pass rate by revision",
                  (Target(f'SELECT mean("good") FROM "unit" WHERE {where(*units)} '
                          f'GROUP BY "product_model", "product_revision"',
                          alias="$tag_product_model $tag_product_revision"),),
                  ratio_style(thresholds=YIELD_STEPS, decimals=1), options=BAR_OPTIONS),
            Panel("timeseries", "Cycle time by station",
                  (Target(f'SELECT mean("cycle_time") FROM "unit" WHERE {where(*units)} '
                          f'GROUP BY time($__interval), "device" fill(none)', alias=DEVICE_ALIAS),),
                  FieldStyle(unit="s", custom=LINES, color_mode="palette-classic"), options=LEGEND_TABLE),
            Panel("bargauge", "Cycle time p95 by station",
                  (Target(f'SELECT percentile("cycle_time", 95) FROM "unit" WHERE {where(*units)} GROUP BY "device"',
                          alias=DEVICE_ALIAS),),
                  FieldStyle(unit="s", thresholds=(Step("blue"),), decimals=1), options=BAR_OPTIONS),
            row("Station health"),
            Panel("state-timeline", "Station state",
                  (Target(f'SELECT last("state") FROM "kpi" WHERE {where(*stations)} '
                          f'GROUP BY time($__interval), "device" fill(previous)', alias=DEVICE_ALIAS),),
                  FieldStyle(mappings=STATE_MAPPINGS, thresholds=(Step("text"),)), options=TIMELINE_OPTIONS),
            Panel("bargauge", "Availability by station",
                  (Target(f'SELECT last("availability") FROM "kpi" WHERE {where(*stations)} GROUP BY "device"',
                          alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=AVAILABILITY_STEPS), options=BAR_OPTIONS),
            Panel("bargauge", "Anomaly score by station (max)",
                  (Target(f'SELECT max("anomaly_score") FROM "kpi" WHERE {where(*stations)} GROUP BY "device"',
                          alias=DEVICE_ALIAS),),
                  ratio_style(thresholds=ANOMALY_STEPS), options=BAR_OPTIONS),
            row("Test channels"),
            *channel_panels,
            Panel("table", "Failed units",
                  (Target(f'SELECT "serial", "device", "defect", "product_model", "product_revision", "cycle_time" '
                          f'FROM "unit" WHERE {where(*units, FAILED)} ORDER BY time DESC LIMIT 200',
                          result_format="table"),),
                  FieldStyle(overrides=(Override({"unit": "s"}, field_name="cycle_time"),)),
                  options=TABLE_OPTIONS, width=24),
        ),
    )


# --- order routing ---------------------------------------------------------------------------------------


def order_routing() -> Dashboard:
    scope = (TENANT, TECHNOLOGY)

    def total(field: str, aggregate: str = "sum") -> str:
        return f'SELECT {aggregate}("{field}") FROM ({_last_per("routing", field, scope, by="technology")})'

    def per_technology(field: str) -> str:
        return (f'SELECT last("{field}") FROM "routing" WHERE {where(*scope)} '
                f'GROUP BY time($__interval), "technology" fill(previous)')

    alias = "$tag_technology"
    return Dashboard(
        uid="forgeline-routing",
        title="forgeline / Order routing",
        description="Queue, open builds and their fill, released builds and on-time rate per technology.",
        variables=(
            tenant_variable("routing"),
            Variable("technology", "Technology", multi=True, include_all=True,
                     query=f'SHOW TAG VALUES FROM "routing" WITH KEY = "technology" WHERE {TENANT}'),
        ),
        links=LINKS,
        panels=(
            _stat("Queued parts", total("queued_parts"), FieldStyle(unit="short", thresholds=(Step("blue"),)),
                  "Parts waiting for a build, all selected technologies.", width=5),
            _stat("Open builds", total("open_builds"), FieldStyle(unit="short", thresholds=(Step("blue"),)),
                  "Builds being filled and not yet released to a printer.", width=5),
            _stat("Fill of open builds", total("open_build_fill", "mean"), ratio_style(thresholds=FILL_STEPS),
                  "Mean chamber fill of the open builds (a build is released when full or due).", width=5),
            _stat("Released builds", total("released_builds"), FieldStyle(unit="short", thresholds=(Step("blue"),)),
                  "Builds released to printers (latest count per technology).", width=4),
            _stat("On-time rate", total("on_time_rate", "mean"), ratio_style(thresholds=ON_TIME_STEPS),
                  "Share of orders finished by their due date.", width=5),
            Panel("timeseries", "Queued parts by technology", (Target(per_technology("queued_parts"), alias=alias),),
                  FieldStyle(unit="short", custom=LINES, color_mode="palette-classic"), options=LEGEND_TABLE),
            Panel("timeseries", "Open builds by technology", (Target(per_technology("open_builds"), alias=alias),),
                  FieldStyle(unit="short", custom=LINES, color_mode="palette-classic"), options=LEGEND_TABLE),
            Panel("bargauge", "Fill of open builds by technology",
                  (Target(f'SELECT last("open_build_fill") FROM "routing" WHERE {where(*scope)} '
                          f'GROUP BY "technology"', alias=alias),),
                  ratio_style(thresholds=FILL_STEPS), options=BAR_OPTIONS),
            Panel("timeseries", "On-time rate by technology", (Target(per_technology("on_time_rate"), alias=alias),),
                  ratio_style(thresholds=ON_TIME_STEPS, custom={**LINES, **LINE_THRESHOLDS},
                             color_mode="palette-classic"), options=LEGEND_TABLE),
            Panel("timeseries", "Planned chamber fill of started builds",
                  (Target(f'SELECT mean("chamber_fill") FROM "build" WHERE {where(*scope, PHASE_START)} '
                          f'GROUP BY time($__interval), "technology" fill(none)', alias=alias),),
                  ratio_style(thresholds=FILL_STEPS, custom=BARS, color_mode="palette-classic"),
                  options=LEGEND_LIST),
            Panel("timeseries", "Builds started",
                  (Target(f'SELECT count("job_id") FROM "build" WHERE {where(*scope, PHASE_START)} '
                          f'GROUP BY time($__interval), "technology" fill(none)', alias=alias),),
                  FieldStyle(unit="short", custom={**BARS, "stacking": {"mode": "normal", "group": "A"}},
                             color_mode="palette-classic"),
                  options=LEGEND_LIST),
        ),
    )


# --- revision comparison ---------------------------------------------------------------------------------


def revision_comparison() -> Dashboard:
    insights = (TENANT, MODEL, REVISION)
    by_revision = "$tag_product_revision"
    q_value_cells = Override({"custom.cellOptions": {"type": "color-background"}, "decimals": 4,
                              "thresholds": {"mode": "absolute", "steps": [
                                  {"color": "red", "value": None}, {"color": "orange", "value": 0.05},
                                  {"color": "transparent", "value": 0.2}]}}, field_name="q_value")
    flagged_cells = Override({"mappings": [{"type": "value", "options": {
        "0": {"text": "", "index": 0}, "1": {"text": "flagged", "color": "red", "index": 1}}}],
        "custom.cellOptions": {"type": "color-text"}}, field_name="flagged")
    return Dashboard(
        uid="forgeline-revisions",
        title="forgeline / Revision comparison",
        description="The iteration loop: each revision against its baseline (effect, confidence interval, "
                    "Benjamini-Hochberg q value), pass rate, cycle time and customer feedback per revision.",
        variables=(
            tenant_variable("insight"),
            Variable("model", "Model",
                     query=f'SHOW TAG VALUES FROM "insight" WITH KEY = "product_model" WHERE {TENANT}'),
            Variable("revision", "Revision", multi=True, include_all=True,
                     query=f'SHOW TAG VALUES FROM "insight" WITH KEY = "product_revision" WHERE {TENANT} AND {MODEL}'),
        ),
        links=LINKS,
        time_from="now-30d",
        refresh="5m",
        panels=(
            _stat("Flagged comparisons",
                  f'SELECT sum("flagged") FROM (SELECT last("flagged") AS "flagged" FROM "insight" '
                  f'WHERE {where(*insights)} GROUP BY "product_revision", "kpi", "channel")',
                  FieldStyle(unit="short", thresholds=COUNT_ALERT_STEPS, no_value="0"),
                  "Comparisons whose latest q value is at or below the loop's alpha.", width=6),
            _stat("Pass rate", f'SELECT mean("good") FROM "unit" WHERE {where(*insights)}',
                  ratio_style(thresholds=YIELD_STEPS, decimals=1), "Station tests passed.", width=6),
            _stat("Mean rating", f'SELECT mean("rating") FROM "feedback" WHERE {where(*insights)}',
                  FieldStyle(unit="none", min=1, max=5, decimals=2,
                             thresholds=(Step("red"), Step("orange", 3.5), Step("green", 4.2))),
                  "Customer ratings (1-5).", width=6),
            _stat("Field faults", f'SELECT sum("fault") FROM "feedback" WHERE {where(*insights)}',
                  FieldStyle(unit="short", thresholds=(Step("green"), Step("orange", 1), Step("red", 10)),
                             no_value="0"),
                  "Faults reported from the field.", width=6),
            Panel("table", "Latest comparisons",
                  (Target(f'SELECT last("value") AS "value", last("baseline") AS "baseline", '
                          f'last("effect") AS "effect", last("ci_low") AS "ci_low", last("ci_high") AS "ci_high", '
                          f'last("p_value") AS "p_value", last("q_value") AS "q_value", last("flagged") AS "flagged" '
                          f'FROM "insight" WHERE {where(*insights)} '
                          f'GROUP BY "product_revision", "baseline_revision", "kpi", "channel"',
                          result_format="table"),),
                  FieldStyle(decimals=3, overrides=(q_value_cells, flagged_cells)),
                  description="One row per comparison: value vs baseline, effect with its confidence interval "
                              "(difference, ratio or Hodges-Lehmann shift by KPI), p and q value.",
                  options={**TABLE_OPTIONS, "sortBy": [{"displayName": "q_value", "desc": False}]}, width=24,
                  height=10, transformations=({"id": "organize", "options": {"excludeByName": {"Time": True}}},)),
            Panel("bargauge", "Pass rate by revision",
                  (Target(f'SELECT mean("good") FROM "unit" WHERE {where(*insights)} GROUP BY "product_revision"',
                          alias=by_revision),),
                  ratio_style(thresholds=YIELD_STEPS, decimals=2), options=BAR_OPTIONS, width=8),
            Panel("bargauge", "Cycle time by revision and station",
                  (Target(f'SELECT mean("cycle_time") FROM "unit" WHERE {where(*insights)} '
                          f'GROUP BY "product_revision", "device"', alias="$tag_product_revision $tag_device"),),
                  FieldStyle(unit="s", thresholds=(Step("blue"),), decimals=1), options=BAR_OPTIONS, width=8),
            Panel("bargauge", "Mean rating by revision",
                  (Target(f'SELECT mean("rating") FROM "feedback" WHERE {where(*insights)} GROUP BY "product_revision"',
                          alias=by_revision),),
                  FieldStyle(unit="none", min=1, max=5, decimals=2,
                             thresholds=(Step("red"), Step("orange", 3.5), Step("green", 4.2))),
                  options=BAR_OPTIONS, width=8),
            Panel("timeseries", "q value of each comparison over evaluations",
                  (Target(f'SELECT last("q_value") FROM "insight" WHERE {where(*insights)} '
                          f'GROUP BY time($__interval), "product_revision", "kpi", "channel" fill(none)',
                          alias="$tag_product_revision $tag_kpi $tag_channel"),),
                  FieldStyle(unit="none", min=0, max=1, thresholds=(Step("red"), Step("transparent", 0.05)),
                             custom={**LINES, **LINE_THRESHOLDS, "scaleDistribution": {"type": "log", "log": 10}},
                             color_mode="palette-classic"),
                  options=LEGEND_TABLE),
            Panel("table", "Feedback by revision and category",
                  (Target(f'SELECT count("serial") AS "reports", sum("fault") AS "faults", mean("rating") AS "rating" '
                          f'FROM "feedback" WHERE {where(*insights)} GROUP BY "product_revision", "category"',
                          result_format="table"),),
                  FieldStyle(decimals=2), options=TABLE_OPTIONS,
                  transformations=({"id": "organize", "options": {"excludeByName": {"Time": True}}},)),
        ),
    )


def all_dashboards() -> list[Dashboard]:
    """Every dashboard forgeline ships, in menu order."""
    return [fleet_overview(), device_detail(), microwave_line(), order_routing(), revision_comparison()]
