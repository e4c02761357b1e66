"""Slow, obviously-correct twins of the kernels, in plain Python (dicts, lists, one sample at a time).

Used only by the tests (and the benchmark's baseline). Where the kernel keeps rings and reorder
buffers, the reference keeps the whole history and integrates it directly, so a mistake in the
kernel's bookkeeping (buckets, ring eviction, out-of-order insertion) shows up as a difference.
The detector maths is the same formula written the plain way, one channel object at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from twin.core.config import CoreConfig
from twin.core.layout import (
    COUNTER_ROLES,
    DET_CUSUM,
    DET_EWMA,
    DET_ZSCORE,
    DETECTOR_CODES,
    DETECTOR_ROLES,
    N_REGIMES,
    NULL_MEAN_Q,
    PLANNED_BUSY,
    PRODUCING_STATE,
    Q_CAP,
    REGIME_OF_STATE,
    REGIME_PRODUCING,
    ROLE_LAYER_PROGRESS,
    ROLE_STATE,
    ROLE_UNIT,
    role_of_channel,
)

LEARN_CLIP = 3.0


def ew_step(mean: float, var: float, n: float, x: float, alpha: float, factor: float) -> tuple[float, float]:
    weight = (alpha if (n + 1.0) * alpha >= 1.0 else 1.0 / (n + 1.0)) * factor  # = max(alpha, 1/(n+1))
    delta = x - mean
    return mean + weight * delta, (1.0 - weight) * (var + weight * delta * delta)


@dataclass
class RefChannel:
    """One detector channel: a baseline per regime and a two-sided CUSUM."""

    mean: list[float] = field(default_factory=lambda: [0.0] * N_REGIMES)
    var: list[float] = field(default_factory=lambda: [0.0] * N_REGIMES)
    n: list[float] = field(default_factory=lambda: [0.0] * N_REGIMES)
    pos: float = 0.0
    neg: float = 0.0
    cusum_regime: int = -1
    fast: float = 0.0
    q: float = 0.0
    score: float = 0.0
    last_t: float = -math.inf
    last_x: float = math.nan

    def step(self, regime: int, x: float, cfg: CoreConfig, gate: bool = True) -> float:
        """Score then learn (slowly over the learning gate unless the incident was adopted); return the
        change of q."""
        detector = DETECTOR_CODES[cfg.detector]
        z_scale2 = cfg.z_scale**2
        lam = cfg.ewma_lambda
        mean, var, n = self.mean[regime], self.var[regime], self.n[regime]
        if self.cusum_regime != regime:
            self.pos = self.neg = 0.0
            self.cusum_regime = regime
            self.fast = mean if n > 0 else x
        q = 0.0
        warm = n >= cfg.warmup_samples
        if warm:
            floor = cfg.relative_noise_floor * mean
            var_eff = var + floor * floor + 1e-12
            deviation = x - mean
            candidates = []
            inv_var = 1.0 / var_eff
            if detector & DET_ZSCORE:
                candidates.append(deviation * deviation * inv_var)
            if detector & DET_CUSUM:
                z = deviation / math.sqrt(var_eff)
                cap = cfg.cusum_scale * 5.0
                self.pos = min(max(0.0, self.pos + z - cfg.cusum_drift), cap)
                self.neg = min(max(0.0, self.neg - z - cfg.cusum_drift), cap)
                candidates.append(max(self.pos, self.neg) / cfg.cusum_scale * z_scale2)
            if detector & DET_EWMA:
                self.fast = self.fast + lam * (x - self.fast)
                shift = self.fast - mean
                candidates.append(shift * shift * inv_var * ((2.0 - lam) / lam))
            q = min(max(candidates), Q_CAP)
        else:
            self.fast = self.fast + max(lam, 1.0 / (n + 1.0)) * (x - self.fast)
        score = q / (q + z_scale2)
        factor = cfg.gated_learn_factor if gate and warm and score > cfg.learn_gate else 1.0
        learn_x = x
        if warm and (x - mean) ** 2 > LEARN_CLIP * LEARN_CLIP * var:
            reach = LEARN_CLIP * math.sqrt(var)
            learn_x = min(max(x, mean - reach), mean + reach)
        self.mean[regime], self.var[regime] = ew_step(mean, var, n, learn_x, cfg.alpha, factor)
        self.n[regime] = n + 1.0
        self.score = score
        change = q - self.q
        self.q = q
        return change


def chi2_quantile(dof: float, z: float) -> float:
    """Wilson–Hilferty approximation of the χ² quantile."""
    return dof * (1.0 - 2.0 / (9.0 * dof) + z * math.sqrt(2.0 / (9.0 * dof))) ** 3


@dataclass
class RefPCA:
    """The multivariate detector the plain way: keep every warm-up row, fit a PCA on them once,
    then score T² and Q against the fitted axes (the kernel keeps running co-moments instead)."""

    slots: int
    rows: list[list[float]] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    axes: list[list[float]] = field(default_factory=list)  # axes[j] = j-th principal axis
    eig: list[float] = field(default_factory=list)
    k: int = 0
    ucl_t2: float = 0.0
    ucl_q: float = 0.0
    smooth: float = 0.0
    n: int = 0

    def _fit(self, cfg: CoreConfig, active: list[int]) -> None:
        n = len(self.rows)
        p = self.slots
        self.mean = [sum(r[i] for r in self.rows) / n if i in active else 0.0 for i in range(p)]
        self.scale = [0.0] * p
        for i in active:
            var = sum((r[i] - self.mean[i]) ** 2 for r in self.rows) / (n - 1)
            self.scale[i] = math.sqrt(var) if var > 1e-300 and var * 1e24 > self.mean[i] ** 2 else 0.0
        corr = np.zeros((p, p))
        for i in range(p):
            for j in range(p):
                if self.scale[i] > 0 and self.scale[j] > 0:
                    cov = sum((r[i] - self.mean[i]) * (r[j] - self.mean[j]) for r in self.rows) / (n - 1)
                    corr[i, j] = 1.0 if i == j else cov / (self.scale[i] * self.scale[j])
        values, vectors = np.linalg.eigh(corr)
        order = list(range(p - 1, -1, -1))
        self.eig = [max(float(values[o]), 0.0) for o in order]
        self.axes = [[float(vectors[i, o]) for i in range(p)] for o in order]
        total = sum(self.eig)
        active_count = sum(1 for s in self.scale if s > 0)
        k, kept = 0, 0.0
        while k < active_count and (k == 0 or kept < cfg.mv_explained_variance * total) and self.eig[k] > 1e-12:
            kept += self.eig[k]
            k += 1
        self.k = k
        z = NormalDist().inv_cdf(cfg.mv_p_value)
        self.ucl_t2 = (n - 1) * (n + 1) / (n * (n - k)) * chi2_quantile(k, z) if k else 0.0
        theta = [sum(e**i for e in self.eig[k:]) for i in (1, 2, 3)]
        self.ucl_q = 0.0
        if theta[0] > 1e-9:
            h0 = 1 - 2 * theta[0] * theta[2] / (3 * theta[1] ** 2)
            if h0 > 1e-6:
                inner = 1 + z * h0 * math.sqrt(2 * theta[1]) / theta[0] + theta[1] * h0 * (h0 - 1) / theta[0] ** 2
                self.ucl_q = theta[0] * inner ** (1 / h0)
            else:
                self.ucl_q = theta[1] / theta[0] * chi2_quantile(theta[0] ** 2 / theta[1], z)

    def tick(self, row: list[float], active: list[int], cfg: CoreConfig) -> float:
        """Score of one complete row (``row[i]`` for every slot; only ``active`` slots are channels)."""
        if any(math.isnan(row[i]) for i in active):
            return 0.0
        if self.n < cfg.mv_warmup_samples:
            self.rows.append(list(row))
            self.n += 1
            if self.n == cfg.mv_warmup_samples:
                self._fit(cfg, active)
            return 0.0
        self.n += 1
        z = [(row[i] - self.mean[i]) / self.scale[i] if self.scale[i] > 0 else 0.0 for i in range(self.slots)]
        projections = [sum(a[i] * z[i] for i in range(self.slots)) for a in self.axes[: self.k]]
        t2 = sum(pr * pr / e for pr, e in zip(projections, self.eig, strict=False))
        q = max(sum(v * v for v in z) - sum(pr * pr for pr in projections), 0.0)
        ratio = t2 / self.ucl_t2 if self.ucl_t2 > 0 else 0.0
        if self.ucl_q > 0:
            ratio = max(ratio, q / self.ucl_q)
        ratio = min(ratio, Q_CAP)
        self.smooth += cfg.mv_smoothing * (ratio - self.smooth)
        if self.smooth < cfg.mv_learn_gate:
            for i in range(self.slots):
                if self.scale[i] > 0:
                    self.mean[i] += cfg.mv_alpha * (row[i] - self.mean[i])
        base = 1.0 - cfg.event_on
        if base <= 0:
            return 1.0 if self.smooth > 0 else 0.0
        return 1.0 - base**self.smooth


@dataclass
class RefMEWMA:
    """The ``mewma`` detector the plain way: keep every warm-up row; at its end compute the means,
    each channel's AR(1) coefficient by least squares, the residuals e_t = x̃_t − φ∘x̃_{t−1} of the
    warm-up and their second moments directly; then run the MEWMA chart of the residuals (the
    kernel keeps running sums of shifted rows and lag products instead)."""

    slots: int
    rows: list[list[float]] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    phi: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    axes: list[list[float]] = field(default_factory=list)
    eig: list[float] = field(default_factory=list)
    limit: float = 0.0
    ewma: list[float] = field(default_factory=list)
    prev: list[float] = field(default_factory=list)
    n: int = 0
    # re-baselining after an episode: the local level, the chart around it, ticks it has been in
    # control, the episode's (fading) peak stable distance, its length (0 = none), settling left
    level: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    quiet: int = 0
    distance: float = 0.0
    peak: float = 0.0
    episode: int = 0
    settle: int = 0

    def _t2(self, vector: list[float]) -> float:
        """T² / limit of a residual-scale vector in the chart's metric (capped)."""
        if self.limit <= 0:
            return 0.0
        t2 = 0.0
        for axis, e in zip(self.axes, self.eig, strict=True):
            projection = sum(axis[i] * vector[i] / self.scale[i] for i in range(self.slots) if self.scale[i] > 0)
            t2 += projection * projection / e
        return min(t2 / self.limit, Q_CAP)

    def _fit(self, cfg: CoreConfig, active: list[int]) -> None:
        n = len(self.rows)
        p = self.slots
        self.mean = [sum(r[i] for r in self.rows) / n if i in active else 0.0 for i in range(p)]
        centred = [[r[i] - self.mean[i] for i in range(p)] for r in self.rows]
        self.phi = [0.0] * p
        varies = [False] * p
        for i in active:
            var = sum(c[i] ** 2 for c in centred) / (n - 1)
            if not (var > 1e-300 and var * 1e24 > self.mean[i] ** 2):
                continue
            varies[i] = True
            before = sum(centred[t - 1][i] ** 2 for t in range(1, n))
            phi = sum(centred[t][i] * centred[t - 1][i] for t in range(1, n)) / before if before > 0 else 0.0
            phi = min(max(phi, 0.0), 1.0)
            self.phi[i] = 1.0 if phi * phi >= cfg.mewma_integrated_r2 else phi
        residuals = [[centred[t][i] - self.phi[i] * centred[t - 1][i] for i in range(p)] for t in range(1, n)]
        sigma = [[sum(e[i] * e[j] for e in residuals) / (n - 1) for j in range(p)] for i in range(p)]
        self.scale = [0.0] * p
        for i in active:
            var = sum(c[i] ** 2 for c in centred) / (n - 1)
            if varies[i] and sigma[i][i] > 1e-12 * var:
                self.scale[i] = math.sqrt(sigma[i][i])
        corr = np.zeros((p, p))
        for i in range(p):
            for j in range(p):
                if self.scale[i] > 0 and self.scale[j] > 0:
                    corr[i, j] = 1.0 if i == j else sigma[i][j] / (self.scale[i] * self.scale[j])
        values, vectors = np.linalg.eigh(corr)
        order = list(range(p - 1, -1, -1))
        eig = [max(float(values[o]), 0.0) for o in order]
        k = sum(1 for e in eig if e > 1e-6 * eig[0])
        self.eig = eig[:k]
        self.axes = [[float(vectors[i, o]) for i in range(p)] for o in order[:k]]
        z = NormalDist().inv_cdf(cfg.mv_p_value)
        lam = cfg.mewma_lambda
        self.limit = chi2_quantile(k, z) * lam / (2 - lam) if k else 0.0
        self.ewma = [0.0] * p
        self.local = [0.0] * p
        self.level = list(self.rows[-1])  # the local level starts at the last warm-up row

    def tick(self, row: list[float], active: list[int], cfg: CoreConfig) -> float:
        """Score of one complete row (``row[i]`` for every slot; only ``active`` slots are channels)."""
        if any(math.isnan(row[i]) for i in active):
            return 0.0
        if self.n < cfg.mv_warmup_samples:
            self.rows.append(list(row))
            self.n += 1
            self.prev = list(row)
            if self.n == cfg.mv_warmup_samples:
                self._fit(cfg, active)
            return 0.0
        self.n += 1
        lam = cfg.mewma_lambda
        live = [i for i in range(self.slots) if self.scale[i] > 0]
        for i in live:
            residual = (row[i] - self.mean[i]) - self.phi[i] * (self.prev[i] - self.mean[i])
            self.ewma[i] = lam * residual + (1 - lam) * self.ewma[i]
            local = (row[i] - self.level[i]) - self.phi[i] * (self.prev[i] - self.level[i])
            self.local[i] = lam * local + (1 - lam) * self.local[i]
            self.level[i] += lam * (row[i] - self.level[i])
        self.prev = list(row)
        ratio = self._t2(self.ewma)
        local_ratio = self._t2(self.local)
        self.quiet = self.quiet + 1 if local_ratio < 1.0 else 0
        stable = self.quiet >= cfg.mewma_stable_ticks
        if self.settle > 0:  # settling after an adoption: the baseline is the local level
            self.settle -= 1
            for i in live:
                self.mean[i] = self.level[i]
                self.ewma[i] = 0.0
            ratio = local_ratio
        else:
            offset = [(1.0 - self.phi[i]) * (self.level[i] - self.mean[i]) for i in range(self.slots)]
            self.distance += 0.25 * lam * (self._t2(offset) - self.distance)
            distance = self.distance
            self.peak *= 1.0 - cfg.mv_alpha
            if ratio >= 1.0 or self.episode > 0:
                self.episode += 1
                if stable:
                    self.peak = max(self.peak, distance)
                receded = distance < cfg.mewma_recede * self.peak
                long_enough = cfg.mewma_adopt_ticks > 0 and self.episode >= cfg.mewma_adopt_ticks
                if stable and (receded or long_enough):  # adopt the stable level
                    for i in live:
                        self.mean[i] = self.level[i]
                        self.ewma[i] = 0.0
                    ratio = 0.0
                    self.episode = 0
                    self.settle = cfg.mewma_stable_ticks
                elif stable and ratio < 1.0:
                    self.episode = 0
                elif not stable and receded:
                    ratio = local_ratio
        if ratio < cfg.mv_learn_gate:
            for i in live:
                self.mean[i] += cfg.mv_alpha * (row[i] - self.mean[i])
        base = 1.0 - cfg.event_on
        if base <= 0:
            return 1.0 if ratio > 0 else 0.0
        return 1.0 - base**ratio


def combined(total: float, mean: float, var: float, n: float, cfg: CoreConfig) -> float:
    """Brown's method + Wilson–Hilferty, as in :func:`twin.core.kernels.combined_score`."""
    if n < cfg.warmup_samples:
        return 0.0
    floor = 0.01 * mean
    var_eff = var + floor * floor + 1e-12
    if mean <= 1e-12:
        return 0.0 if total <= 1e-9 else 1.0 - 1e-9
    dof = 2.0 * mean * mean / var_eff
    spread = 2.0 / (9.0 * dof)
    z = (math.cbrt(total / mean) - (1.0 - spread)) / math.sqrt(spread)
    return 0.0 if z <= 0.0 else z * z / (z * z + cfg.z_scale**2)


@dataclass
class RefDevice:
    channels: dict[int, RefChannel] = field(default_factory=dict)
    total: float = 0.0
    mean: float = 0.0
    var: float = 0.0
    n: float = 0.0
    base_n: float = 0.0  # ticks the device baseline learned from
    score: float = 0.0
    active: bool = False
    run: int = 0
    pending_t: int = 0
    hot: int = 0  # channels over the learning gate
    hot_since: int = 0
    event_peak: float = 0.0
    # utilization: every accepted state point (t_ms -> code) and counter increments
    states: dict[int, int] = field(default_factory=dict)
    counters: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    increments: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    last_seen_ms: int = 0
    pca: RefPCA | RefMEWMA | None = None
    last: dict[int, float] = field(default_factory=dict)  # held value of each detector channel (pca)


class ReferenceFleet:
    """Processes samples one by one the plain way; same observable results as FleetCore."""

    def __init__(self, channel_names: list[list[str]], config: CoreConfig | None = None):
        self.cfg = config or CoreConfig()
        self.names = channel_names
        self.devices = [RefDevice() for _ in channel_names]
        self.width = max((len(n) for n in channel_names), default=0)
        self.events: list[tuple[int, str, int, float]] = []
        self.stats = {"accepted": 0, "rejected_nonfinite": 0, "rejected_index": 0, "late": 0, "rejected_value": 0}

    # ---- ingest -----------------------------------------------------------------------------------

    def ingest(self, samples: list[tuple[int, int, int, float]], historical: bool = False) -> None:
        """``samples``: (device, slot, t_us, value) in processing order (sorted as FleetCore sorts)."""
        tick: tuple[int, int] | None = None
        tick_warm = False
        group: tuple[int, int] | None = None  # the learning gate is decided once per device and time
        gate = True
        for d, c, t, x in samples:
            if tick is not None and (d, t) != tick:
                if tick_warm:
                    self._tick(tick[0], tick[1], historical)
                tick, tick_warm = None, False
            if not (0 <= d < len(self.devices)) or not (0 <= c < len(self.names[d])):
                self.stats["rejected_index"] += 1
                continue
            if not math.isfinite(x):
                self.stats["rejected_nonfinite"] += 1
                continue
            dev = self.devices[d]
            name = self.names[d][c]
            role = role_of_channel(name)
            self._seen(dev, t)
            if group != (d, t):
                group, gate = (d, t), self._gate(dev, t)
            if role in DETECTOR_ROLES:
                channel = dev.channels.setdefault(c, RefChannel())
                if t < channel.last_t:
                    self.stats["late"] += 1
                    continue
                self.stats["accepted"] += 1
                if t == channel.last_t and x == channel.last_x:
                    continue  # a replayed duplicate; another value at the same time is a new one
                channel.last_t = t
                # a unit's measurement polled again is the same unit; it has one baseline
                held = role == ROLE_UNIT and x == channel.last_x
                channel.last_x = x
                regime = REGIME_PRODUCING if role == ROLE_UNIT else self._regime(dev)
                warm = channel.n[regime] >= self.cfg.warmup_samples
                if not held:
                    dev.total += channel.step(regime, x, self.cfg, gate)
                    hot = sum(1 for ch in dev.channels.values() if ch.score > self.cfg.learn_gate)
                    if hot and not dev.hot:
                        dev.hot_since = t  # an incident begins
                    dev.hot = hot
                if self.cfg.multivariate:
                    dev.last[c] = x
                    warm = True
                tick = (d, t)
                tick_warm = tick_warm or warm
            elif role == ROLE_STATE:
                if not 0 <= x < len(PLANNED_BUSY) or x != int(x):
                    self.stats["rejected_value"] += 1
                    continue
                self._state(dev, t // 1000, int(x))
            elif name in COUNTER_ROLES:
                self._counter(dev, name, t // 1000, x)
            elif role == ROLE_LAYER_PROGRESS and not 0.0 <= x <= 1.0:
                self.stats["rejected_value"] += 1
            else:
                self.stats["accepted"] += 1
        if tick is not None and tick_warm:
            self._tick(tick[0], tick[1], historical)

    def _gate(self, dev: RefDevice, t_us: int) -> bool:
        """The learning gate holds unless a channel has been over it for incident_adopt_s (adopted)."""
        return not (dev.hot > 0 and t_us - dev.hot_since >= self.cfg.incident_adopt_s * 1e6)

    @staticmethod
    def _seen(dev: RefDevice, t_us: int) -> None:
        dev.last_seen_ms = max(dev.last_seen_ms, t_us // 1000)

    @staticmethod
    def _regime(dev: RefDevice) -> int:
        if not dev.states:
            return 0
        return REGIME_OF_STATE[dev.states[max(dev.states)]]

    def _state(self, dev: RefDevice, t_ms: int, code: int) -> None:
        newest = sorted(dev.states, reverse=True)[: self.cfg.reorder_depth]
        if len(newest) == self.cfg.reorder_depth and t_ms < newest[-1]:
            self.stats["late"] += 1
            return
        dev.states[t_ms] = code
        self.stats["accepted"] += 1

    def _counter(self, dev: RefDevice, name: str, t_ms: int, value: float) -> None:
        if value < 0:
            self.stats["rejected_value"] += 1
            return
        history = dev.counters.setdefault(name, [])
        if not history or t_ms > history[-1][0]:
            if history:
                previous = history[-1][1]
                increment = value - previous if value >= previous else value
                dev.increments.setdefault(name, []).append((t_ms, math.floor(increment + 0.5)))
            history.append((t_ms, value))
            self.stats["accepted"] += 1
        elif t_ms == history[-1][0] and value == history[-1][1]:
            self.stats["accepted"] += 1
        else:
            self.stats["late"] += 1

    def _tick(self, d: int, t: int, historical: bool) -> None:
        dev = self.devices[d]
        cfg = self.cfg
        if cfg.multivariate:
            # the kernel's vector has one slot per configured channel slot (width), non-detector
            # slots inactive
            active = [c for c, name in enumerate(self.names[d]) if role_of_channel(name) in DETECTOR_ROLES]
            if dev.pca is None:
                dev.pca = RefMEWMA(self.width) if cfg.detector == "mewma" else RefPCA(self.width)
            row = [dev.last.get(c, math.nan) if c in active else 0.0 for c in range(self.width)]
            score = dev.pca.tick(row, active, cfg)
        else:
            total = max(dev.total, 0.0)
            score = combined(total, dev.mean, dev.var, dev.base_n, cfg)
            # any detector channel over the learning gate right now (its latest statistic)?
            hot = any(ch.score > cfg.learn_gate for ch in dev.channels.values())
            if dev.base_n < cfg.warmup_samples:
                if not hot or dev.n >= 2 * cfg.warmup_samples:  # quiet ticks, unless hot is chronic
                    dev.mean, dev.var = ew_step(dev.mean, dev.var, dev.base_n, total, cfg.alpha, 1.0)
                    dev.base_n += 1
            else:
                gated = self._gate(dev, t) and (hot or score > cfg.learn_gate)
                factor = cfg.gated_learn_factor if gated else 1.0
                learn_total = min(total, dev.mean + LEARN_CLIP * math.sqrt(dev.var))
                dev.mean, dev.var = ew_step(dev.mean, dev.var, dev.base_n, learn_total, cfg.alpha, factor)
                dev.base_n += 1
            if hot and dev.base_n >= cfg.warmup_samples:
                # the strongest channel as one of m tests (Bonferroni: q - 2 ln m), its statistic
                # scaled down when the device's channels run hotter than calibrated ones
                # (per-unit channels only: their statistics are calibrated)
                roles = [role_of_channel(name) for name in self.names[d]]
                m = sum(1 for r in roles if r == ROLE_UNIT)
                m_all = sum(1 for r in roles if r in DETECTOR_ROLES)
                tolerated = 3.0 * m_all * NULL_MEAN_Q[cfg.detector]  # kernels.CALIBRATION_SLACK
                kappa = min(1.0, tolerated / dev.mean) ** 2 if dev.mean > 0 else 1.0
                units = [ch.q for c, ch in dev.channels.items() if roles[c] == ROLE_UNIT]
                q = kappa * max(units, default=0.0) - 2.0 * math.log(m) if m else 0.0
                if q > 0:
                    score = max(score, q / (q + cfg.z_scale**2))
            if dev.n < cfg.warmup_samples:
                score = 0.0
        dev.n += 1.0
        dev.score = score
        if historical:
            return
        crossing = score >= cfg.event_on if not dev.active else score < cfg.event_off
        if dev.active:
            dev.event_peak = max(dev.event_peak, score)
        if not crossing:
            dev.run = 0
            return
        if dev.run == 0:
            dev.pending_t = t
        dev.run += 1
        if dev.run >= cfg.event_min_samples:
            dev.run = 0
            if dev.active:
                self.events.append((d, "end", dev.pending_t, dev.event_peak))
            else:
                dev.event_peak = score
                self.events.append((d, "start", dev.pending_t, score))
            dev.active = not dev.active

    # ---- queries ---------------------------------------------------------------------------------

    def window_totals(self, d: int, length_s: int | None, now_us: int, shift: bool = False) -> dict[str, float]:
        """Integrate the whole state history over the window, the long way."""
        cfg = self.cfg
        dev = self.devices[d]
        if shift:
            size, count, origin = cfg.shift_length_s * 1000, 3, cfg.shift_origin_s * 1000
        else:
            spec = next(w for w in cfg.windows if w.length_s == length_s)
            size, count, origin = spec.bucket_s * 1000, spec.n_buckets, 0
        now_ms = now_us // 1000
        current = (now_ms - origin) // size
        start = origin + (current - count + 1) * size
        end = origin + (current + 1) * size
        out = {"producing": 0.0, "busy": 0.0, "known": 0.0, "produced": 0.0, "good": 0.0, "scrap": 0.0}
        points = sorted(dev.states.items())
        hold = cfg.state_hold_s * 1000
        for i, (t, code) in enumerate(points):
            if i + 1 < len(points):
                stop = min(points[i + 1][0], t + hold)
                lo, hi = max(t, start), min(stop, end)
            else:
                stop = min(now_ms, t + hold, max(dev.last_seen_ms, t) + cfg.silence_s * 1000)
                lo, hi = max(t, start), stop
            if hi <= lo:
                continue
            out["known"] += hi - lo
            if PLANNED_BUSY[code]:
                out["busy"] += hi - lo
            if code == PRODUCING_STATE:
                out["producing"] += hi - lo
        for name, key in (("produced_total", "produced"), ("good_total", "good"), ("scrap_total", "scrap")):
            out[key] = float(sum(a for t, a in dev.increments.get(name, []) if start <= t < end))
        out["calendar"] = float(max(now_ms - max(start, min(dev.states)), 0)) if dev.states else 0.0
        return out

    def device_score(self, d: int) -> float:
        return self.devices[d].score

    def channel_score(self, d: int, c: int) -> float:
        channel = self.devices[d].channels.get(c)
        return 0.0 if channel is None else channel.score


def reference_scores(rows: list[list[float]], config: CoreConfig | None = None) -> list[float]:
    """Device score per row of a table (the offline scorer's contract), the slow way."""
    width = len(rows[0]) if rows else 0
    fleet = ReferenceFleet([[f"x_{i}" for i in range(width)]], config)
    scores: list[float] = []
    last = 0.0
    for r, row in enumerate(rows):
        before = fleet.devices[0].n
        fleet.ingest([(0, c, (r + 1) * 1_000_000, v) for c, v in enumerate(row)])
        if fleet.devices[0].n != before:
            last = fleet.devices[0].score
        scores.append(last)
    return scores
