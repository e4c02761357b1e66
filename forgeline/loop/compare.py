"""The revision-comparison engine: per product model, every revision against its baseline on every KPI
and channel, with Benjamini-Hochberg control over the whole family of comparisons of the model.

The result is the ``insights`` document (schema ``insights``) that the service publishes retained and
the report renders: ``insights`` lists the flagged comparisons (q <= alpha), ``comparisons`` all of them.

Example:
    >>> from forgeline.loop.simulate import RevisionProfile, simulate_line
    >>> from forgeline.loop.intake import LoopStore
    >>> store = LoopStore()
    >>> _ = store.ingest_all(m.wire() for m in simulate_line("acme", "MW-20", [
    ...     RevisionProfile("A", units=800), RevisionProfile("B", units=800, door_leakage_scale=2.0)], seed=1))
    >>> document = compare_model(store.model("acme", "MW-20"), ts=0.0)
    >>> [(i["revision"], i["kpi"], i["channel"], i["direction"]) for i in document["insights"]][:1]
    [('B', 'measurement', 'door_leakage', 'worse')]
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgeline.loop import stats
from forgeline.loop.intake import ModelData, RevisionData
from forgeline.loop.kpis import UNITS, EffectKind, Kpi, Test, direction


@dataclass(frozen=True)
class LoopConfig:
    """How revisions are compared.

    ``alpha`` is the false discovery rate over all comparisons of a model; ``baseline`` fixes the revision
    everything is compared with (default: each revision against the one produced before it).
    """

    alpha: float = 0.05
    confidence: float = 0.95
    min_units: int = 30  # a revision with fewer units is not compared on production KPIs
    min_samples: int = 20  # fewest values per group for a continuous comparison
    min_feedback: int = 20  # fewest ratings per group for a rating comparison
    baseline: str | None = None
    first_look: int = 100  # monitoring: units + feedback of the model at the first look ...
    look_growth: float = 1.5  # ... and the factor by which the evidence grows from one look to the next

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.min_units < 1 or self.min_samples < 2 or self.min_feedback < 2 or self.first_look < 1:
            raise ValueError("min_units and first_look must be >= 1, min_samples and min_feedback >= 2")
        if not self.look_growth > 1:
            raise ValueError(f"look_growth must be > 1, got {self.look_growth}")


@dataclass
class Comparison:
    """One KPI (and channel) of one revision against its baseline."""

    revision: str
    baseline: str
    kpi: Kpi
    channel: str | None
    station: str | None
    test: Test
    effect_kind: EffectKind
    effect: float
    ci: tuple[float, float]
    p_value: float
    value: float
    baseline_value: float
    evidence: dict[str, Any]
    q_value: float = math.nan
    flagged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def null_effect(self) -> float:
        return 1.0 if self.effect_kind is EffectKind.RATIO else 0.0

    @property
    def direction(self) -> str:
        return direction(self.kpi, self.channel, self.effect - self.null_effect)

    @property
    def unit(self) -> str:
        if self.kpi is Kpi.MEASUREMENT and self.channel:
            from forgeline.contract.vocabulary import CHANNELS

            known = CHANNELS.get(self.channel)
            return known.unit if known else ""
        return UNITS.get(self.kpi, "")

    def summary(self) -> str:
        what = self.kpi.value.replace("_", " ")
        if self.channel:
            what += f" of {self.channel}"
        if self.station:
            what += f" at {self.station}"
        low, high = self.ci
        if self.effect_kind is EffectKind.RATIO:
            effect = f"{_fmt(self.effect)}x the baseline (CI {_fmt(low)}-{_fmt(high)})"
        elif self.effect_kind is EffectKind.DIFFERENCE:
            effect = f"{self.effect * 100:+.2f} pp (CI {low * 100:+.2f} to {high * 100:+.2f})"
        else:
            effect = f"{self.effect:+.4g} {self.unit} (CI {low:+.4g} to {high:+.4g})".replace("  ", " ")
        posterior = self.extra.get("posterior", {}).get("prob_worse")
        belief = f", P(worse) = {posterior:.1%}" if posterior is not None else ""
        return (f"revision {self.revision} vs {self.baseline}: {what} {self.direction}, {effect}, "
                f"q = {self.q_value:.2g}{belief}")

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "revision": self.revision,
            "baseline": self.baseline,
            "kpi": self.kpi.value,
            "channel": self.channel,
            "direction": self.direction,
            "effect": _json_number(self.effect),
            "effect_kind": self.effect_kind.value,
            "unit": self.unit,
            "ci": [_json_number(self.ci[0]), _json_number(self.ci[1])],
            "p_value": self.p_value,
            "q_value": self.q_value,
            "flagged": self.flagged,
            "test": self.test.value,
            "value": _json_number(self.value),
            "baseline_value": _json_number(self.baseline_value),
            "evidence": self.evidence,
            "summary": self.summary(),
        }
        if self.station:
            document["station"] = self.station
        document.update(self.extra)
        return document


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def revision_order(model: ModelData) -> list[str]:
    """Revisions in the order they appeared (first unit or feedback), ties by natural name order."""
    return sorted(model.revisions, key=lambda r: (model.revisions[r].first_seen, _natural_key(r)))


def baseline_pairs(model: ModelData, config: LoopConfig) -> list[tuple[str, str]]:
    """``(revision, baseline)`` pairs: against the fixed baseline, or each against its predecessor."""
    order = revision_order(model)
    if config.baseline is not None:
        if config.baseline not in model.revisions:
            raise ValueError(f"baseline revision {config.baseline!r} has no data for model {model.model!r}; "
                             f"known: {', '.join(order) or 'none'}")
        return [(r, config.baseline) for r in order if r != config.baseline]
    return [(order[i], order[i - 1]) for i in range(1, len(order))]


# --- per-KPI comparisons ------------------------------------------------------------------------------


def _proportion(kpi: Kpi, channel: str | None, revision: RevisionData, baseline: RevisionData,
                successes: Callable[[RevisionData], int], trials: Callable[[RevisionData], int],
                config: LoopConfig) -> Comparison | None:
    x1, n1, x2, n2 = successes(revision), trials(revision), successes(baseline), trials(baseline)
    if n1 < config.min_units or n2 < config.min_units:
        return None
    p_value = stats.fisher_exact_p(x1, n1, x2, n2)
    low, high = stats.newcombe_difference_interval(x1, n1, x2, n2, config.confidence)
    prob_higher = stats.beta_prob_greater(x1, n1, x2, n2)
    higher_is = direction(kpi, channel, 1.0)
    prob_worse = prob_higher if higher_is == "worse" else 1 - prob_higher if higher_is == "better" else None
    return Comparison(
        revision.revision, baseline.revision, kpi, channel, None, Test.FISHER_EXACT, EffectKind.DIFFERENCE,
        x1 / n1 - x2 / n2, (low, high), p_value, x1 / n1, x2 / n2,
        {"revision": {"events": x1, "n": n1}, "baseline": {"events": x2, "n": n2}},
        extra={"posterior": {"prior": "beta(1,1)", "prob_higher": prob_higher, "prob_worse": prob_worse}},
    )


def _rate(channel: str, revision: RevisionData, baseline: RevisionData, config: LoopConfig) -> Comparison | None:
    k1, e1, k2, e2 = revision.anomalies[channel], revision.units, baseline.anomalies[channel], baseline.units
    if e1 < config.min_units or e2 < config.min_units or k1 + k2 == 0:
        return None
    result = stats.poisson_rate_test(k1, e1, k2, e2, config.confidence)
    return Comparison(
        revision.revision, baseline.revision, Kpi.ANOMALY_RATE, channel, None, Test.POISSON_EXACT,
        EffectKind.RATIO, result.ratio, (result.low, result.high), result.p_value, k1 / e1, k2 / e2,
        {"revision": {"n": e1, "events": k1, "exposure": e1}, "baseline": {"n": e2, "events": k2, "exposure": e2}},
    )


def _continuous(kpi: Kpi, channel: str | None, station: str | None, revision_name: str, baseline_name: str,
                revision_values: list[float], baseline_values: list[float], minimum: int,
                config: LoopConfig, seen: tuple[int, int] | None = None) -> Comparison | None:
    x, y = stats.finite(baseline_values), stats.finite(revision_values)
    if len(x) < minimum or len(y) < minimum:
        return None
    ranks = stats.brunner_munzel(x, y, config.confidence)
    shift = stats.hodges_lehmann(x, y, config.confidence)
    evidence: dict[str, Any] = {
        "revision": {"n": len(y), **stats.quantiles(y)},
        "baseline": {"n": len(x), **stats.quantiles(x)},
    }
    if seen is not None:
        evidence["revision"]["seen"], evidence["baseline"]["seen"] = seen
    return Comparison(
        revision_name, baseline_name, kpi, channel, station, Test.BRUNNER_MUNZEL, EffectKind.SHIFT,
        shift.shift, (shift.low, shift.high), ranks.p_value, float(np.median(y)), float(np.median(x)), evidence,
        extra={"superiority": {"estimate": ranks.superiority, "ci": [ranks.low, ranks.high]}},
    )


def _ratings(revision: RevisionData, baseline: RevisionData, config: LoopConfig) -> Comparison | None:
    """Ratings: the rank test as for any ordinal KPI, but the effect is the difference of mean stars
    (Welch interval), because the median shift of a 1-5 scale is almost always 0."""
    mine = np.repeat(np.arange(1.0, 6.0), [revision.ratings.get(k, 0) for k in range(1, 6)])
    theirs = np.repeat(np.arange(1.0, 6.0), [baseline.ratings.get(k, 0) for k in range(1, 6)])
    if len(mine) < config.min_feedback or len(theirs) < config.min_feedback:
        return None
    ranks = stats.brunner_munzel(theirs, mine, config.confidence)
    difference = float(mine.mean() - theirs.mean())
    var_mine, var_theirs = mine.var(ddof=1) / len(mine), theirs.var(ddof=1) / len(theirs)
    standard_error = math.sqrt(var_mine + var_theirs)
    if standard_error > 0:
        df = (var_mine + var_theirs) ** 2 / (var_mine**2 / (len(mine) - 1) + var_theirs**2 / (len(theirs) - 1))
        half = float(_t_quantile(config.confidence, df)) * standard_error
    else:
        half = 0.0
    return Comparison(
        revision.revision, baseline.revision, Kpi.RATING, None, None, Test.BRUNNER_MUNZEL, EffectKind.SHIFT,
        difference, (difference - half, difference + half), ranks.p_value, float(mine.mean()),
        float(theirs.mean()),
        {"revision": {"n": len(mine), **stats.quantiles(mine)},
         "baseline": {"n": len(theirs), **stats.quantiles(theirs)}},
        extra={"superiority": {"estimate": ranks.superiority, "ci": [ranks.low, ranks.high]}},
    )


def _t_quantile(confidence: float, df: float) -> float:
    from scipy import stats as sp

    return float(sp.t.ppf(0.5 + confidence / 2, df))


def compare_pair(revision: RevisionData, baseline: RevisionData, config: LoopConfig) -> list[Comparison]:
    """Every KPI of ``revision`` against ``baseline`` (p-values only; q-values need the whole family)."""
    found: list[Comparison | None] = []
    found.append(_proportion(Kpi.FIRST_PASS_YIELD, None, revision, baseline,
                             lambda r: r.good, lambda r: r.units, config))
    for defect in sorted(set(revision.defects) | set(baseline.defects)):
        found.append(_proportion(Kpi.DEFECT_RATE, defect, revision, baseline,
                                 lambda r, d=defect: r.defects[d], lambda r: r.units, config))  # type: ignore[misc]
    for channel in sorted(set(revision.anomalies) | set(baseline.anomalies)):
        found.append(_rate(channel, revision, baseline, config))
    for key in sorted(set(revision.samples) & set(baseline.samples)):
        kind, _, name = key.partition("/")
        mine, theirs = revision.samples[key], baseline.samples[key]
        if kind == "cycle_time":
            found.append(_continuous(Kpi.CYCLE_TIME, "cycle_time", name, revision.revision, baseline.revision,
                                     mine.values, theirs.values, config.min_samples, config,
                                     (mine.seen, theirs.seen)))
        elif kind == "measurement":
            found.append(_continuous(Kpi.MEASUREMENT, name, None, revision.revision, baseline.revision,
                                     mine.values, theirs.values, config.min_samples, config,
                                     (mine.seen, theirs.seen)))
    # Feedback rates need known production on both sides: the exposure is produced units, and a revision
    # known only from its feedback would compare "complaints per feedback" with "complaints per unit".
    if (revision.feedback or baseline.feedback) and min(revision.units, baseline.units) >= config.min_units:
        found.append(_proportion(Kpi.FIELD_FAULT_RATE, None, revision, baseline,
                                 lambda r: len(r.fault_serials), lambda r: r.field_exposure, config))
        found.append(_proportion(Kpi.COMPLAINT_RATE, None, revision, baseline,
                                 lambda r: len(r.complained_serials), lambda r: r.field_exposure, config))
        categories = sorted(set(revision.complaint_serials) | set(baseline.complaint_serials))
        for category in categories if len(categories) > 1 else []:
            found.append(_proportion(Kpi.COMPLAINT_RATE, category, revision, baseline,
                                     lambda r, c=category: len(r.complaint_serials.get(c, ())),  # type: ignore[misc]
                                     lambda r: r.field_exposure, config))
    found.append(_ratings(revision, baseline, config))
    return [c for c in found if c is not None]


def compare_model(model: ModelData, config: LoopConfig | None = None, ts: float | None = None, *,
                  level: float | None = None) -> dict[str, Any]:
    """The insights document of one model: all comparisons, q-values over the family, flagged insights.

    One analysis of the data as it is: comparisons are flagged at q <= ``config.alpha`` (or ``level``).
    A service that re-analyses growing data again and again uses :func:`monitor_model` instead."""
    config = config or LoopConfig()
    level = config.alpha if level is None else level
    comparisons: list[Comparison] = []
    for revision_name, baseline_name in baseline_pairs(model, config):
        comparisons += compare_pair(model.revisions[revision_name], model.revisions[baseline_name], config)
    q_values = stats.benjamini_hochberg([c.p_value for c in comparisons])
    for comparison, q in zip(comparisons, q_values, strict=True):
        comparison.q_value = float(q)
        comparison.flagged = bool(q <= level)
    flagged = sorted((c for c in comparisons if c.flagged), key=lambda c: (c.q_value, c.p_value))
    document: dict[str, Any] = {
        "model": model.model,
        "ts": time.time() if ts is None else ts,
        "alpha": config.alpha,
        "confidence": config.confidence,
        "tests": len(comparisons),
        "revisions": [_revision_summary(model.revisions[r]) for r in revision_order(model)],
        "insights": [c.to_json() for c in flagged],
        "comparisons": [c.to_json() for c in comparisons],
    }
    if config.baseline is not None:
        document["baseline_revision"] = config.baseline
    return document


# --- continuous monitoring ----------------------------------------------------------------------------
#
# Re-testing data as it grows and raising an insight whenever q <= alpha would raise false insights far
# more often than alpha (identical revisions, 20 looks: about a quarter of runs). So a monitoring service
# decides only at *looks*, each time the evidence of the model (units + feedback) grows by `look_growth`
# (1.5: at most half as much data again before a change is decided on), and spends the
# false alarm budget over the looks: look k tests at alpha * 6 / (pi^2 k^2), which sums to alpha over all
# looks (a union bound; Benjamini-Hochberg keeps each look's family-wise error at its level when no
# revision differs). Between looks the numbers stay live; the flags are those decided at the last look.


def look_index(volume: int, first_look: int, growth: float = 2.0) -> int:
    """Looks happen when the evidence reaches ``first_look``, then each time it grows by ``growth`` (0 = none yet).

    >>> [look_index(v, 100) for v in (99, 100, 199, 200, 400, 1000)]
    [0, 1, 1, 2, 3, 4]
    >>> [look_index(v, 100, 1.5) for v in (100, 149, 150, 225, 1000)]
    [1, 1, 2, 3, 6]
    """
    if volume < first_look:
        return 0
    # The small tolerance keeps a volume that is exactly first_look * growth^k on look k + 1 despite rounding.
    return math.floor(math.log(volume / first_look) / math.log(growth) + 1e-9) + 1


def look_alpha(alpha: float, look: int) -> float:
    """The share of the false alarm budget spent at look ``look`` (1, 2, ...): the shares sum to ``alpha``."""
    return alpha * 6 / (math.pi**2 * look**2)


def evidence_volume(model: ModelData) -> int:
    return sum(r.units + r.feedback for r in model.revisions.values())


def comparison_key(comparison: dict[str, Any]) -> str:
    return "|".join(str(comparison.get(k) or "") for k in ("revision", "baseline", "kpi", "channel", "station"))


def monitor_model(model: ModelData, config: LoopConfig | None = None, ts: float | None = None) -> dict[str, Any]:
    """The insights document for continuous monitoring: flags decided at looks with alpha spending.

    Updates ``model.look`` and ``model.standing`` (the flagged comparisons of the last look)."""
    config = config or LoopConfig()
    look = look_index(evidence_volume(model), config.first_look, config.look_growth)
    if look > model.look:
        document = compare_model(model, config, ts, level=look_alpha(config.alpha, look))
        model.look = look
        model.standing = sorted(comparison_key(c) for c in document["insights"])
    else:
        document = compare_model(model, config, ts, level=0.0)
        standing = set(model.standing)
        for comparison in document["comparisons"]:
            comparison["flagged"] = comparison_key(comparison) in standing
        document["insights"] = sorted((c for c in document["comparisons"] if c["flagged"]),
                                      key=lambda c: (c["q_value"], c["p_value"]))
    document["look"] = model.look
    if model.look:
        document["look_alpha"] = look_alpha(config.alpha, model.look)
    return document


def _revision_summary(revision: RevisionData) -> dict[str, Any]:
    return {
        "revision": revision.revision,
        "first_seen": revision.first_seen,
        "units": revision.units,
        "good": revision.good,
        "first_pass_yield": revision.good / revision.units if revision.units else None,
        "anomalies": sum(revision.anomalies.values()),
        "feedback": revision.feedback,
    }
