"""Statistics of the revision comparison: exact tests for counts, a robust test for continuous KPIs,
effect sizes with confidence intervals, and false-discovery-rate control.

Every function takes plain numbers or arrays and returns plain numbers; nothing here knows about
MQTT, revisions or KPIs. Each has a slow, obviously-correct reference in ``tests/test_loop_stats.py``.

Choice of tests (why):

- **Proportions** (first-pass yield, defect rate of a test channel, field fault rate, complaint rate):
  Fisher's exact test, because counts per revision are often small (a handful of door-seal failures)
  where normal approximations lie; the effect is the difference of proportions with Newcombe's hybrid
  score interval, which keeps its coverage near 0 and 1 where the Wald interval does not.
- **Event rates with an exposure** (anomaly starts per produced unit on a channel): the exact
  conditional test for two Poisson rates (given the total, the revision's share of events is binomial),
  with the rate ratio and its exact (Clopper-Pearson based) interval.
- **Continuous KPIs** (cycle time, test measurements, ratings): the Brunner-Munzel test, a rank test
  that stays valid when the two revisions differ in spread (a revision with a noisier process is
  common), unlike Mann-Whitney's U; reported with the Hodges-Lehmann shift and its distribution-free
  (Moses) interval, in the KPI's own unit.
- **Many comparisons** (every KPI x channel x revision): Benjamini-Hochberg q-values.

Examples:
    >>> round(fisher_exact_p(1, 100, 10, 100), 4)
    0.0097
    >>> [round(v, 4) for v in newcombe_difference_interval(56, 70, 48, 80)]
    [0.0524, 0.3339]
    >>> [round(q, 3) for q in benjamini_hochberg([0.01, 0.04, 0.03, 0.5]).tolist()]
    [0.04, 0.053, 0.053, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special as _special
from scipy import stats as _sp

# Relative tolerance when summing "tables at most as probable as the observed one" in exact tests:
# the same convention as R and scipy, so floating-point ties count as ties.
_EXACT_RTOL = 1e-7


class StatsError(ValueError):
    """Input a test cannot be computed on (negative counts, more successes than trials, ...)."""


def _check_counts(successes: int, trials: int, what: str = "count") -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise StatsError(f"{what}: need 0 <= successes <= trials, got {successes}/{trials}")


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise StatsError(f"confidence must be in (0, 1), got {confidence}")
    return float(_sp.norm.ppf(0.5 + confidence / 2))


# --- proportions ------------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; ``(0, 1)`` when there are no trials."""
    _check_counts(successes, trials)
    if trials == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # Clamp rounding noise: the exact interval contains 0 when successes == 0 and 1 when all succeed.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def newcombe_difference_interval(
    successes_1: int, trials_1: int, successes_2: int, trials_2: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) for ``p1 - p2``."""
    if trials_1 == 0 or trials_2 == 0:
        raise StatsError("a difference of proportions needs trials in both groups")
    p1, p2 = successes_1 / trials_1, successes_2 / trials_2
    l1, u1 = wilson_interval(successes_1, trials_1, confidence)
    l2, u2 = wilson_interval(successes_2, trials_2, confidence)
    difference = p1 - p2
    low = difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def beta_prob_greater(successes_1: int, trials_1: int, successes_2: int, trials_2: int) -> float:
    """Beta-binomial posterior probability that ``p1 > p2``, each with a uniform Beta(1, 1) prior.

    With integer posterior parameters the probability has a closed form (a finite sum over the first
    posterior's alpha), summed in log space so thousands of events stay exact to rounding.
    """
    _check_counts(successes_1, trials_1, "group 1")
    _check_counts(successes_2, trials_2, "group 2")
    alpha_1, beta_1 = successes_1 + 1, trials_1 - successes_1 + 1
    alpha_2, beta_2 = successes_2 + 1, trials_2 - successes_2 + 1
    i = np.arange(alpha_1, dtype=np.float64)

    def log_beta(a: NDArray[np.float64] | float, b: NDArray[np.float64] | float) -> NDArray[np.float64]:
        return np.asarray(_special.gammaln(a) + _special.gammaln(b) - _special.gammaln(np.add(a, b)))

    # Evan Miller's closed form: P(p1 > p2) = sum over i = 0 .. alpha_1 - 1 of
    # B(alpha_2 + i, beta_1 + beta_2) / ((beta_1 + i) B(1 + i, beta_1) B(alpha_2, beta_2)).
    log_terms = (log_beta(alpha_2 + i, beta_1 + beta_2) - np.log(beta_1 + i) - log_beta(1 + i, beta_1)
                 - log_beta(alpha_2, beta_2))
    return min(1.0, max(0.0, float(np.exp(_special.logsumexp(log_terms)))))


def fisher_exact_p(successes_1: int, trials_1: int, successes_2: int, trials_2: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2x2 table of two binomial samples."""
    _check_counts(successes_1, trials_1, "group 1")
    _check_counts(successes_2, trials_2, "group 2")
    if trials_1 == 0 or trials_2 == 0:
        return 1.0
    table = [[successes_1, trials_1 - successes_1], [successes_2, trials_2 - successes_2]]
    return float(min(1.0, _sp.fisher_exact(table, alternative="two-sided").pvalue))


# --- event rates with exposure ----------------------------------------------------------------------


@dataclass(frozen=True)
class RateComparison:
    """Two Poisson rates ``events / exposure``: ratio (1 vs 2) with its interval and exact p-value."""

    ratio: float  # inf when group 2 had no events
    low: float
    high: float
    p_value: float


def poisson_rate_test(
    events_1: int, exposure_1: float, events_2: int, exposure_2: float, confidence: float = 0.95
) -> RateComparison:
    """Exact conditional test of equal rates; ``ratio = (events_1/exposure_1) / (events_2/exposure_2)``.

    Given ``k = events_1 + events_2``, ``events_1`` is Binomial(k, e1 / (e1 + e2)) when the rates are
    equal; the interval maps the Clopper-Pearson interval of that binomial proportion onto the ratio.
    """
    if events_1 < 0 or events_2 < 0:
        raise StatsError("event counts must be >= 0")
    if not (exposure_1 > 0 and exposure_2 > 0 and math.isfinite(exposure_1) and math.isfinite(exposure_2)):
        raise StatsError(f"exposures must be finite and > 0, got {exposure_1}, {exposure_2}")
    total = events_1 + events_2
    if total == 0:
        return RateComparison(math.nan, 0.0, math.inf, 1.0)
    share_if_equal = exposure_1 / (exposure_1 + exposure_2)
    result = _sp.binomtest(events_1, total, share_if_equal)
    interval = result.proportion_ci(confidence_level=confidence, method="exact")
    scale = exposure_2 / exposure_1

    def to_ratio(share: float) -> float:
        return math.inf if share >= 1 else share / (1 - share) * scale

    ratio = math.inf if events_2 == 0 else (events_1 / exposure_1) / (events_2 / exposure_2)
    return RateComparison(ratio, to_ratio(interval.low), to_ratio(interval.high), float(min(1.0, result.pvalue)))


def poisson_interval(events: int, exposure: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) interval of a Poisson rate ``events / exposure``."""
    if events < 0 or not (exposure > 0 and math.isfinite(exposure)):
        raise StatsError(f"need events >= 0 and a finite exposure > 0, got {events}, {exposure}")
    alpha = 1 - confidence
    low = 0.0 if events == 0 else float(_sp.chi2.ppf(alpha / 2, 2 * events)) / 2
    high = float(_sp.chi2.ppf(1 - alpha / 2, 2 * events + 2)) / 2
    return low / exposure, high / exposure


# --- continuous KPIs --------------------------------------------------------------------------------


def finite(values: ArrayLike) -> NDArray[np.float64]:
    """The finite values of ``values`` as float64 (NaN means "no reading" and is not a sample)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


@dataclass(frozen=True)
class RankComparison:
    """Brunner-Munzel: ``superiority = P(Y > X) + P(Y = X) / 2`` with its interval, and the p-value."""

    superiority: float
    low: float
    high: float
    statistic: float
    df: float
    p_value: float


def brunner_munzel(baseline: ArrayLike, revision: ArrayLike, confidence: float = 0.95) -> RankComparison:
    """Brunner-Munzel test of ``revision`` (Y) against ``baseline`` (X), two-sided.

    Non-finite values are dropped; each group needs at least two values. When the variance estimate
    is zero (complete separation, or every value tied) the t statistic is undefined: tied groups get
    p = 1, separated groups the Mann-Whitney normal approximation, which is valid under the null.
    """
    x, y = finite(baseline), finite(revision)
    nx, ny = len(x), len(y)
    if nx < 2 or ny < 2:
        raise StatsError(f"Brunner-Munzel needs >= 2 finite values per group, got {nx} and {ny}")
    ranks = _sp.rankdata(np.concatenate((x, y)))
    ranks_x, ranks_y = ranks[:nx], ranks[nx:]
    # Placements: how many of the other group lie below each value (ties count half), times the size.
    placement_x = ranks_x - _sp.rankdata(x)
    placement_y = ranks_y - _sp.rankdata(y)
    superiority = float(placement_y.mean() / nx)
    var_x = float(np.var(placement_x, ddof=1))
    var_y = float(np.var(placement_y, ddof=1))
    # Variance of the superiority estimate: Var(placements of X)/(ny^2 nx) + Var(placements of Y)/(nx^2 ny).
    combined = nx * var_x + ny * var_y
    if combined <= 0:
        if superiority == 0.5:
            return RankComparison(0.5, 0.5, 0.5, 0.0, math.nan, 1.0)
        p_value = float(_sp.mannwhitneyu(y, x, alternative="two-sided", method="asymptotic").pvalue)
        return RankComparison(superiority, superiority, superiority, math.copysign(math.inf, superiority - 0.5),
                              math.nan, p_value)
    standard_error = math.sqrt(combined) / (nx * ny)
    statistic = (superiority - 0.5) / standard_error
    df_denominator = (nx * var_x) ** 2 / (nx - 1) + (ny * var_y) ** 2 / (ny - 1)
    df = combined**2 / df_denominator
    p_value = float(2 * _sp.t.sf(abs(statistic), df))
    t_quantile = float(_sp.t.ppf(0.5 + confidence / 2, df))
    low = max(0.0, superiority - t_quantile * standard_error)
    high = min(1.0, superiority + t_quantile * standard_error)
    return RankComparison(superiority, low, high, float(statistic), float(df), min(1.0, p_value))


@dataclass(frozen=True)
class Shift:
    """Hodges-Lehmann shift ``revision - baseline`` with its Moses (distribution-free) interval."""

    shift: float
    low: float
    high: float
    pairs: int  # pairwise differences the estimate used


def hodges_lehmann(
    baseline: ArrayLike,
    revision: ArrayLike,
    confidence: float = 0.95,
    *,
    max_per_group: int = 500,
    seed: int = 0,
) -> Shift:
    """Median of all pairwise differences ``y_j - x_i`` and the Moses interval around it.

    The number of pairs grows as ``nx * ny``; groups larger than ``max_per_group`` are thinned by a
    seeded random subsample first (the estimate stays unbiased, the interval widens honestly because
    it is computed from the subsample sizes).
    """
    x, y = finite(baseline), finite(revision)
    if len(x) == 0 or len(y) == 0:
        raise StatsError("Hodges-Lehmann needs finite values in both groups")
    rng = np.random.default_rng(seed)
    if len(x) > max_per_group:
        x = rng.choice(x, max_per_group, replace=False)
    if len(y) > max_per_group:
        y = rng.choice(y, max_per_group, replace=False)
    nx, ny = len(x), len(y)
    differences = np.subtract.outer(y, x).ravel()
    pairs = differences.size
    # Moses: the interval runs between the k-th smallest and k-th largest difference, with k from the
    # normal approximation of the Mann-Whitney U distribution.
    z = _z(confidence)
    k = math.floor(pairs / 2 - z * math.sqrt(nx * ny * (nx + ny + 1) / 12))
    k = max(0, min(k, (pairs - 1) // 2))
    middle = [(pairs - 1) // 2, pairs // 2]
    wanted = sorted({k, pairs - 1 - k, *middle})
    partitioned = np.partition(differences, wanted)
    shift = float((partitioned[middle[0]] + partitioned[middle[1]]) / 2)
    return Shift(shift, float(partitioned[k]), float(partitioned[pairs - 1 - k]), pairs)


def quantiles(values: ArrayLike) -> dict[str, float]:
    """Five-number summary plus the mean, for reports: ``min q1 median q3 max mean``."""
    array = finite(values)
    if len(array) == 0:
        return {}
    q = np.quantile(array, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {
        "min": float(q[0]), "q1": float(q[1]), "median": float(q[2]), "q3": float(q[3]), "max": float(q[4]),
        "mean": float(array.mean()),
    }


# --- multiple comparisons ---------------------------------------------------------------------------


def benjamini_hochberg(p_values: Sequence[float] | NDArray[np.float64]) -> NDArray[np.float64]:
    """Benjamini-Hochberg q-values (step-up FDR adjustment). NaN p-values stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return q
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise StatsError("p-values must lie in [0, 1]")
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    # Step-up: q of the i-th smallest is the minimum of the scaled values from i to the end.
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q
