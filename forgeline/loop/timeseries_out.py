"""The loop's time-series output: the ``feedback`` and ``insight`` measurements of
:mod:`forgeline.contract.timeseries`, as InfluxDB line protocol checked against the contract.

They are written by the shared writer :class:`forgeline.timeseries.TimeSeriesWriter` (batches, retry with
backoff, disk spill replayed when the database is back; both write APIs, v2 and 1.x ``/write``), like the
twin's and routing's points.

Example:
    >>> point = feedback_line("acme", "MW-20", "B", {"ts": 1.5, "serial": "S1", "rating": 2, "category": "door"})
    >>> point.split(" ")
    ['feedback,tenant=acme,product_model=MW-20,product_revision=B,category=door,source=unknown', \
'rating=2i,fault=0i,serial="S1"', '1500000000']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forgeline.timeseries import InfluxSettings, TimeSeriesWriter
from forgeline.timeseries import contract_line as line

__all__ = ["InfluxSettings", "TimeSeriesWriter", "feedback_line", "insight_lines", "line"]


def feedback_line(tenant: str, model: str, revision: str, feedback: Mapping[str, Any]) -> str:
    point = line(
        "feedback",
        {"tenant": tenant, "product_model": model, "product_revision": revision,
         "category": feedback.get("category") or "none", "source": feedback.get("source") or "unknown"},
        {"rating": feedback.get("rating"), "fault": int(bool(feedback.get("fault"))), "serial": feedback["serial"]},
        float(feedback["ts"]),
    )
    assert point is not None  # fault and serial are always there
    return point


def insight_lines(tenant: str, document: Mapping[str, Any]) -> list[str]:
    """One point per comparison of an insights document (flagged or not), at the document's time."""
    out = []
    for comparison in document.get("comparisons", document.get("insights", [])):
        low, high = comparison["ci"]
        point = line(
            "insight",
            {"tenant": tenant, "product_model": document["model"], "product_revision": comparison["revision"],
             "kpi": comparison["kpi"], "channel": comparison.get("station") or comparison.get("channel"),
             "baseline_revision": comparison["baseline"]},
            {"effect": comparison["effect"], "p_value": comparison["p_value"], "q_value": comparison["q_value"],
             "ci_low": low, "ci_high": high, "baseline": comparison["baseline_value"], "value": comparison["value"],
             "flagged": int(comparison["flagged"])},
            float(document["ts"]),
        )
        if point is not None:
            out.append(point)
    return out
