"""InfluxQL for the dashboards: tag filters on the template variables, and a check of every query
against the time-series contract (:mod:`forgeline.contract.timeseries`).

Queries quote every identifier (``"kpi"``, ``"utilization"``) so the check can find them: an
identifier must be a measurement of the contract, a tag or field of a measurement the query reads,
an output name (``AS "x"``, not checked), or a template variable (``"$channel"``). A typo in a field
name therefore fails at build time, not as an empty panel in production.

Example:
    >>> schema_problems('SELECT mean("utilisation") FROM "kpi" WHERE $timeFilter')
    ['"utilisation" is neither a tag nor a field of kpi']
    >>> schema_problems('SELECT mean("utilization") FROM "kpi" WHERE ' + where(TENANT))
    []
"""

from __future__ import annotations

import re

from forgeline.contract.timeseries import MEASUREMENTS
from forgeline.contract.vocabulary import CHANNELS

# Tag filters on template variables. Regex matches so that multi-value and "All" selections work:
# Grafana substitutes a multi-value selection as (a|b) and "All" as the variable's allValue (.*).
TENANT = '"tenant" =~ /^$tenant$/'
SITE = '"site" =~ /^$site$/'
DEVICE = '"device" =~ /^$device$/'
TECHNOLOGY = '"technology" =~ /^$technology$/'
MODEL = '"product_model" =~ /^$model$/'
REVISION = '"product_revision" =~ /^$revision$/'
STATION = '"device" =~ /^$station$/'

CHANNEL_FIELD = "<channel>"  # the contract's placeholder: field name = a channel of the catalog

_IDENTIFIER = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FROM = re.compile(r'\bFROM\s+"([^"]+)"', re.IGNORECASE)
_ALIAS = re.compile(r'\bAS\s+"([^"]+)"', re.IGNORECASE)
_VARIABLE = re.compile(r"\$\{?(\w+)")


def where(*conditions: str) -> str:
    """``cond AND cond AND $timeFilter``: every panel query is bounded by the dashboard's time range."""
    return " AND ".join((*conditions, "$timeFilter"))


def measurements_read(query: str) -> list[str]:
    return _FROM.findall(query)


def referenced_variables(text: str) -> set[str]:
    """Template variables a query or title uses (``$name`` and ``${name}``), without Grafana's built-ins."""
    return {name for name in _VARIABLE.findall(text)
            if not name.startswith(("__", "tag_")) and name not in _BUILT_INS}


# Grafana's global variables and the InfluxDB alias patterns ($tag_x, $col) are not template variables.
_BUILT_INS = frozenset({"timeFilter", "interval", "col", "m", "measurement"})


def _allowed_names(measurement: str) -> set[str]:
    spec = MEASUREMENTS[measurement]
    names = set(spec.tags) | set(spec.fields)
    if CHANNEL_FIELD in spec.fields:
        names |= set(CHANNELS)
    return names


def schema_problems(query: str) -> list[str]:
    """What in ``query`` does not exist in the time-series contract (empty when all is well)."""
    problems: list[str] = []
    read = measurements_read(query)
    for name in read:
        if name not in MEASUREMENTS:
            problems.append(f"measurement {name!r} is not in forgeline/contract/timeseries.py")
    known = [m for m in read if m in MEASUREMENTS]
    if not read:
        problems.append("the query reads no measurement (FROM \"name\")")
    allowed = set(MEASUREMENTS)
    for name in known:
        allowed |= _allowed_names(name)
    # Output names (AS "x") may be anything; everything else must exist, including names an outer query
    # reads from a subquery (they are the inner query's fields, kept under their own name).
    for identifier in _IDENTIFIER.findall(_ALIAS.sub("", query)):
        if identifier in allowed or identifier.startswith("$"):
            continue
        problems.append(f'"{identifier}" is neither a tag nor a field of {", ".join(known) or "any measurement"}')
    return problems
