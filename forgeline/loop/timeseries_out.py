"""The loop's time-series output: the ``feedback`` and ``insight`` measurements of
:mod:`forgeline.contract.timeseries`, as InfluxDB line protocol, and a small HTTP writer.

The writer speaks both write APIs: InfluxDB 2.x/3.x (``/api/v2/write``, bucket/org/token, also served
by InfluxDB 1.8+ and VictoriaMetrics) and InfluxDB 1.x (``/write?db=``). It uses only the standard
library, so the loop needs no client package. Points the database refuses are counted, never hidden.

Example:
    >>> point = feedback_line("acme", "MW-20", "B", {"ts": 1.5, "serial": "S1", "rating": 2, "category": "door"})
    >>> point.split(" ")
    ['feedback,tenant=acme,product_model=MW-20,product_revision=B,category=door,source=unknown', \
'rating=2i,fault=0i,serial="S1"', '1500000000']
"""

from __future__ import annotations

import logging
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from forgeline.contract.timeseries import MEASUREMENTS

log = logging.getLogger(__name__)


class WriteError(RuntimeError):
    """The database refused a write or could not be reached; the message says which and why."""


def _escape_key(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _escape_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(measurement: str, tags: Mapping[str, str | None], fields: Mapping[str, Any], ts: float) -> str | None:
    """One line-protocol point (nanosecond time). Tags in the contract's order; empty tags and
    non-finite fields are left out (InfluxDB has no NaN); a point with no field left is ``None``."""
    spec = MEASUREMENTS[measurement]
    unknown_tags = set(tags) - set(spec.tags)
    unknown_fields = set(fields) - set(spec.fields)
    if unknown_tags or unknown_fields:
        raise ValueError(f"{measurement}: not in the contract: tags {sorted(unknown_tags)} fields "
                         f"{sorted(unknown_fields)}")
    tag_text = "".join(f",{_escape_key(k)}={_escape_key(str(tags[k]))}" for k in spec.tags if tags.get(k))
    parts = []
    for name, value in fields.items():
        kind = spec.fields[name]
        if value is None:
            continue
        if kind == "int":
            parts.append(f"{_escape_key(name)}={int(value)}i")
        elif kind == "float":
            if not math.isfinite(float(value)):
                continue
            parts.append(f"{_escape_key(name)}={float(value)!r}")
        elif kind == "bool":
            parts.append(f"{_escape_key(name)}={'true' if value else 'false'}")
        else:
            parts.append(f"{_escape_key(name)}={_escape_string(str(value))}")
    if not parts:
        return None
    return f"{_escape_key(measurement)}{tag_text} {','.join(parts)} {round(ts * 1e9)}"


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


@dataclass(frozen=True)
class InfluxSettings:
    """Where to write: ``api`` is ``v2`` (bucket, org, token) or ``v1`` (database, optional user/password)."""

    url: str
    api: str = "v2"
    bucket: str = "forgeline"
    org: str = "forgeline"
    token: str | None = None
    database: str = "forgeline"
    username: str | None = None
    password: str | None = None
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.api not in ("v1", "v2"):
            raise ValueError(f"influx api must be v1 or v2, not {self.api!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"influx url must start with http:// or https://, not {self.url!r}")

    def __repr__(self) -> str:  # never print secrets
        return f"InfluxSettings(url={self.url!r}, api={self.api!r}, bucket={self.bucket!r}, database={self.database!r})"


class InfluxWriter:
    """Writes line-protocol points over HTTP; counts points written and points lost."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        self.written = 0
        self.failed = 0

    def _request(self, body: bytes) -> urllib.request.Request:
        s = self.settings
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if s.api == "v2":
            query = urllib.parse.urlencode({"bucket": s.bucket, "org": s.org, "precision": "ns"})
            url = f"{s.url.rstrip('/')}/api/v2/write?{query}"
            if s.token:
                headers["Authorization"] = f"Token {s.token}"
        else:
            params = {"db": s.database, "precision": "ns"}
            if s.username:
                params |= {"u": s.username, "p": s.password or ""}
            url = f"{s.url.rstrip('/')}/write?{urllib.parse.urlencode(params)}"
        return urllib.request.Request(url, data=body, headers=headers, method="POST")

    def write(self, lines: Iterable[str]) -> int:
        """Write the points; returns how many. Raises :class:`WriteError` (and counts them failed)."""
        batch = [p for p in lines if p]
        if not batch:
            return 0
        body = ("\n".join(batch) + "\n").encode()
        try:
            with urllib.request.urlopen(self._request(body), timeout=self.settings.timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            self.failed += len(batch)
            detail = exc.read()[:300].decode(errors="replace")
            raise WriteError(f"{self.settings.url} refused {len(batch)} points: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            self.failed += len(batch)
            raise WriteError(f"cannot write to {self.settings.url}: {exc}") from None
        if status >= 300:
            self.failed += len(batch)
            raise WriteError(f"{self.settings.url} answered HTTP {status} to a write")
        self.written += len(batch)
        return len(batch)
