"""The KPIs the loop compares between revisions, and which direction of change is a regression.

A comparison's ``direction`` is ``worse`` or ``better`` where the KPI has an obvious good side
(yield up, leakage down) and ``changed`` where it has none (a measurement without a known side).
"""

from __future__ import annotations

from enum import StrEnum


class Kpi(StrEnum):
    FIRST_PASS_YIELD = "first_pass_yield"  # share of units that passed every station the first time
    DEFECT_RATE = "defect_rate"  # share of units failing one test (channel = the defect / test channel)
    ANOMALY_RATE = "anomaly_rate"  # anomaly starts per produced unit on a channel
    CYCLE_TIME = "cycle_time"  # seconds per unit at a station
    MEASUREMENT = "measurement"  # a test measurement of each unit (channel = the measured channel)
    FIELD_FAULT_RATE = "field_fault_rate"  # share of units with a field fault (service call)
    COMPLAINT_RATE = "complaint_rate"  # share of units with a complaint (channel = category, or all)
    RATING = "rating"  # user ratings 1..5


class Test(StrEnum):
    FISHER_EXACT = "fisher_exact"
    POISSON_EXACT = "poisson_exact"
    BRUNNER_MUNZEL = "brunner_munzel"


class EffectKind(StrEnum):
    DIFFERENCE = "difference"  # revision minus baseline, of a proportion
    RATIO = "ratio"  # revision over baseline, of a rate
    SHIFT = "shift"  # Hodges-Lehmann shift revision minus baseline, in the KPI's unit


# Proportion KPIs where more is better; every other proportion and rate is better when lower.
HIGHER_IS_BETTER_PROPORTIONS = frozenset({Kpi.FIRST_PASS_YIELD})

# Measured channels with a good side. Heating tests: less power or less heating is the failure mode.
HIGHER_IS_BETTER_CHANNELS = frozenset({"magnetron_power", "insulation_resistance", "cavity_temp_rise", "rating"})
LOWER_IS_BETTER_CHANNELS = frozenset({"door_leakage", "hipot_current", "cycle_time", "vibration"})

# Complaints: categories a unit can be complained about (schemas.FEEDBACK 'category' minus 'none').
NO_COMPLAINT = "none"


def direction(kpi: Kpi, channel: str | None, effect_sign: float) -> str:
    """``worse``, ``better`` or ``changed`` for an effect of the given sign (0 means no change)."""
    if effect_sign == 0:
        return "changed"
    up = effect_sign > 0
    if kpi in (Kpi.DEFECT_RATE, Kpi.ANOMALY_RATE, Kpi.FIELD_FAULT_RATE, Kpi.COMPLAINT_RATE, Kpi.CYCLE_TIME):
        return "worse" if up else "better"
    if kpi in HIGHER_IS_BETTER_PROPORTIONS or kpi is Kpi.RATING:
        return "better" if up else "worse"
    if channel in HIGHER_IS_BETTER_CHANNELS:
        return "better" if up else "worse"
    if channel in LOWER_IS_BETTER_CHANNELS:
        return "worse" if up else "better"
    return "changed"


UNITS: dict[Kpi, str] = {
    Kpi.FIRST_PASS_YIELD: "ratio",
    Kpi.DEFECT_RATE: "ratio",
    Kpi.ANOMALY_RATE: "1/unit",
    Kpi.CYCLE_TIME: "s",
    Kpi.FIELD_FAULT_RATE: "ratio",
    Kpi.COMPLAINT_RATE: "ratio",
    Kpi.RATING: "stars",
}
