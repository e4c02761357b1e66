"""The time-series schema: InfluxDB measurements, tags and fields the twin and services write.

Dashboards query these with InfluxQL (works on InfluxDB 1.x, 2.x through a DBRP mapping, and 3.x).
Tags are what panels group and filter by (template variables ``tenant``, ``site``, ``device``);
fields are the numbers. Every measurement carries ``tenant`` as a tag so one database can hold
many tenants and every dashboard query filters by it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    name: str
    tags: tuple[str, ...]
    fields: dict[str, str]  # field -> type ("float", "int", "string", "bool") and meaning in docs
    description: str


DEVICE_TAGS = ("tenant", "site", "area", "device", "technology")

MEASUREMENTS: dict[str, Measurement] = {
    m.name: m
    for m in [
        Measurement(
            "telemetry",
            (*DEVICE_TAGS, "product_model", "product_revision"),
            {"<channel>": "float"},
            "Channel values downsampled by the twin to one point per device and interval (mean of the "
            "interval; field name = channel name, for example nozzle_temp).",
        ),
        Measurement(
            "channel_score",
            DEVICE_TAGS,
            {"<channel>": "float"},
            "Per-channel anomaly score in [0, 1] (max over the interval), field name = channel name.",
        ),
        Measurement(
            "kpi",
            DEVICE_TAGS,
            {
                "utilization": "float",
                "availability": "float",
                "effectiveness": "float",
                "quality": "float",
                "oee": "float",
                "chamber_fill": "float",
                "fill_realised": "float",
                "anomaly_score": "float",
                "state": "int",
                "online": "int",
            },
            "Latest KPIs per device, one point per publish interval.",
        ),
        Measurement(
            "anomaly",
            (*DEVICE_TAGS, "phase"),
            {"score": "float", "channels": "string", "event_id": "string"},
            "Anomaly events (phase start/end), for Grafana annotations.",
        ),
        Measurement(
            "build",
            (*DEVICE_TAGS, "material", "phase"),
            {
                "job_id": "string",
                "chamber_fill": "float",
                "packing_density": "float",
                "build_height_mm": "float",
                "parts": "int",
            },
            "Builds started/finished (phase start/finish) with their planned fill.",
        ),
        Measurement(
            "unit",
            ("tenant", "site", "area", "device", "product_model", "product_revision"),
            {"good": "int", "cycle_time": "float", "serial": "string", "defect": "string"},
            "Units produced on a line, one point per unit.",
        ),
        Measurement(
            "fleet",
            ("tenant",),
            {
                "devices": "int",
                "online": "int",
                "utilization": "float",
                "oee": "float",
                "chamber_fill": "float",
                "anomalous": "int",
            },
            "Per-tenant fleet summary, one point per publish interval.",
        ),
        Measurement(
            "routing",
            ("tenant", "technology"),
            {
                "queued_parts": "int",
                "open_builds": "int",
                "open_build_fill": "float",
                "released_builds": "int",
                "on_time_rate": "float",
            },
            "Order routing state per tenant (partner factory) and technology.",
        ),
        Measurement(
            "feedback",
            ("tenant", "product_model", "product_revision", "category", "source"),
            {"rating": "int", "fault": "int", "serial": "string"},
            "User and customer feedback events.",
        ),
        Measurement(
            "insight",
            ("tenant", "product_model", "product_revision", "kpi", "channel", "baseline_revision"),
            {
                "effect": "float",
                "p_value": "float",
                "q_value": "float",
                "ci_low": "float",
                "ci_high": "float",
                "baseline": "float",
                "value": "float",
                "flagged": "int",
            },
            "Revision comparison results of the iteration loop, one point per comparison and evaluation: "
            "effect (difference, ratio or shift) with its confidence interval, p and Benjamini-Hochberg q "
            "value; channel is the channel, defect, complaint category or station compared.",
        ),
        Measurement(
            "twin_ops",
            ("worker",),
            {"samples": "int", "messages": "int", "dead_letters": "int", "lag_s": "float"},
            "The twin service's own counters.",
        ),
    ]
}
