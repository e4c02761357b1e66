"""A self-contained HTML report of one model's revision comparisons, with inline SVG plots.

One file, no scripts, no fonts or styles from elsewhere: it opens offline, attaches to a ticket and
prints. It renders an ``insights`` document (what the service publishes, or what
:func:`forgeline.loop.compare.compare_model` returns), so the report and the dashboards show the same
numbers. Plots:

- a forest plot of every proportion difference (percentage points) and of every rate ratio (log
  scale), one row per comparison with its confidence interval; flagged rows in colour;
- a forest plot of every rank comparison on the common "probability of superiority" scale (0.5 = no
  difference), so cycle times, measurements and ratings of any unit sit on one axis;
- per KPI and channel, each revision's rate with its Wilson interval (counts) or its box plot
  (continuous KPIs).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgeline.loop.stats import poisson_interval, wilson_interval

WORSE, BETTER, NEUTRAL, MUTED = "#c0392b", "#1e8449", "#2c3e50", "#9aa3ab"
PALETTE = ("#2c7fb8", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b", "#8c6d31", "#3182bd")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if math.isfinite(value) else "0"


@dataclass
class Svg:
    """A tiny SVG builder: elements are escaped strings, coordinates in pixels."""

    width: int
    height: int
    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, tag: str, text: str | None = None, **attrs: Any) -> None:
        rendered = " ".join(f'{k.rstrip("_").replace("_", "-")}="{_e(_num(v) if isinstance(v, float) else v)}"'
                            for k, v in attrs.items())
        self.parts.append(f"<{tag} {rendered}>{_e(text)}</{tag}>" if text is not None else f"<{tag} {rendered}/>")

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = NEUTRAL, width: float = 1.0,
             dash: str | None = None) -> None:
        attrs: dict[str, Any] = {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "stroke": color, "stroke_width": width}
        if dash:
            attrs["stroke_dasharray"] = dash
        self.add("line", **attrs)

    def text(self, x: float, y: float, text: str, anchor: str = "start", size: int = 11, color: str = NEUTRAL,
             weight: str = "normal") -> None:
        self.add("text", text, x=x, y=y, text_anchor=anchor, font_size=size, fill=color, font_weight=weight)

    def render(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{_e(self.title)}">'
                f"<title>{_e(self.title)}</title>{''.join(self.parts)}</svg>")


def _color(comparison: dict[str, Any]) -> str:
    if not comparison["flagged"]:
        return MUTED
    return {"worse": WORSE, "better": BETTER}.get(comparison["direction"], NEUTRAL)


def _label(comparison: dict[str, Any]) -> str:
    what = comparison["kpi"].replace("_", " ")
    detail = comparison.get("station") or comparison.get("channel")
    if detail:
        what += f" · {detail}"
    return f"{comparison['revision']} vs {comparison['baseline']}: {what}"


def forest_plot(comparisons: Sequence[dict[str, Any]], *, title: str, null: float, log_scale: bool = False,
                scale: float = 1.0, unit: str = "", get: Any = None) -> str:
    """One row per comparison: point estimate and interval on a shared axis, the null as a dashed line.

    ``get(comparison)`` returns ``(estimate, low, high)``; ``None`` ends of an interval are drawn to the
    edge with an arrow (an infinite rate ratio).
    """
    get = get or (lambda c: (c["effect"], c["ci"][0], c["ci"][1]))
    rows = [(c, *get(c)) for c in comparisons]
    label_width, plot_width, row_height, top = 330, 420, 20, 34
    svg = Svg(label_width + plot_width + 30, top + row_height * max(1, len(rows)) + 34, title)
    svg.text(8, 18, title, size=13, weight="bold")

    def transform(v: float) -> float:
        return math.log10(v) if log_scale else v * scale

    finite = [transform(v) for _, est, lo, hi in rows for v in (est, lo, hi)
              if v is not None and math.isfinite(v) and (v > 0 or not log_scale)]
    finite.append(transform(null))
    low_edge, high_edge = min(finite), max(finite)
    pad = (high_edge - low_edge) * 0.08 or 0.5
    low_edge, high_edge = low_edge - pad, high_edge + pad

    def x(v: float | None, default: float) -> float:
        if v is None or not math.isfinite(v) or (log_scale and v <= 0):
            return default
        return label_width + (transform(v) - low_edge) / (high_edge - low_edge) * plot_width

    left, right = label_width, label_width + plot_width
    bottom = top + row_height * max(1, len(rows))
    svg.line(left, bottom, right, bottom, MUTED)
    svg.line(x(null, left), top - 6, x(null, left), bottom, NEUTRAL, 1, "4 3")
    for tick in _ticks(low_edge, high_edge):
        tx = label_width + (tick - low_edge) / (high_edge - low_edge) * plot_width
        shown = 10**tick if log_scale else tick
        svg.line(tx, bottom, tx, bottom + 4, MUTED)
        svg.text(tx, bottom + 16, f"{shown:.3g}{unit}", anchor="middle", size=10, color=MUTED)
    for index, (comparison, estimate, low, high) in enumerate(rows):
        y = top + row_height * index + row_height / 2
        color = _color(comparison)
        svg.parts.append(f"<g><title>{_e(_label(comparison))}: q = {comparison['q_value']:.3g}</title>")
        svg.text(label_width - 8, y + 4, _label(comparison), anchor="end", size=11,
                 color=NEUTRAL if comparison["flagged"] else MUTED,
                 weight="bold" if comparison["flagged"] else "normal")
        x_low, x_high = x(low, left), x(high, right)
        svg.line(x_low, y, x_high, y, color, 2)
        if high is None or not math.isfinite(high):
            svg.add("path", d=f"M{_num(right)},{_num(y)} l-6,-4 l0,8 z", fill=color)
        x_est = x(estimate, right)
        svg.add("circle", cx=x_est, cy=y, r=4.0, fill=color)
        svg.parts.append("</g>")
    return svg.render()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def rate_chart(title: str, per_revision: Sequence[tuple[str, int, int]], *, percent: bool = True) -> str:
    """Bars of ``events / n`` per revision with Wilson 95 % intervals (or events per unit for rates)."""
    width, height, left, top, bottom_pad = 360, 200, 56, 30, 30
    svg = Svg(width, height, title)
    svg.text(8, 18, title, size=12, weight="bold")
    # Shares of units get Wilson intervals; event rates (possibly more than one per unit) exact Poisson ones.
    interval = wilson_interval if percent else poisson_interval
    intervals = [(name, events, n, events / n if n else 0.0, *(interval(events, n) if n else (0.0, 0.0)))
                 for name, events, n in per_revision]
    ceiling = max([hi for *_, hi in intervals] + [1e-9]) * 1.15
    plot_height = height - top - bottom_pad
    bar_width = (width - left - 20) / max(1, len(intervals))
    svg.line(left, top + plot_height, width - 10, top + plot_height, MUTED)
    for tick in _ticks(0, ceiling, 4):
        ty = top + plot_height - tick / ceiling * plot_height
        svg.line(left - 4, ty, left, ty, MUTED)
        svg.text(left - 6, ty + 4, f"{tick * 100:.3g}%" if percent else f"{tick:.3g}", anchor="end", size=10,
                 color=MUTED)
    for index, (name, events, n, value, low, high) in enumerate(intervals):
        x0 = left + index * bar_width + bar_width * 0.2
        bar = value / ceiling * plot_height
        svg.add("rect", x=x0, y=top + plot_height - bar, width=bar_width * 0.6, height=bar,
                fill=PALETTE[index % len(PALETTE)], opacity="0.8")
        centre = x0 + bar_width * 0.3
        svg.line(centre, top + plot_height - high / ceiling * plot_height, centre,
                 top + plot_height - low / ceiling * plot_height, NEUTRAL, 1.5)
        svg.text(centre, height - 10, f"{name} ({events}/{n})", anchor="middle", size=10)
    return svg.render()


def box_chart(title: str, per_revision: Sequence[tuple[str, dict[str, float]]], unit: str) -> str:
    """Box plots (min, quartiles, median, max) per revision, from the evidence summaries."""
    width, height, left, top, bottom_pad = 360, 200, 64, 30, 30
    svg = Svg(width, height, title)
    svg.text(8, 18, title, size=12, weight="bold")
    values = [q[k] for _, q in per_revision for k in ("min", "max")]
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or 1.0
    low, high = low - pad, high + pad
    plot_height = height - top - bottom_pad

    def y(v: float) -> float:
        return top + plot_height - (v - low) / (high - low) * plot_height

    for tick in _ticks(low, high, 4):
        svg.line(left - 4, y(tick), left, y(tick), MUTED)
        svg.text(left - 6, y(tick) + 4, f"{tick:.4g}", anchor="end", size=10, color=MUTED)
    svg.text(width - 10, 18, unit, anchor="end", size=10, color=MUTED)
    step = (width - left - 20) / max(1, len(per_revision))
    for index, (name, q) in enumerate(per_revision):
        centre = left + step * (index + 0.5)
        half = step * 0.25
        color = PALETTE[index % len(PALETTE)]
        svg.line(centre, y(q["min"]), centre, y(q["max"]), color, 1.2)
        svg.add("rect", x=centre - half, y=y(q["q3"]), width=2 * half, height=max(1.0, y(q["q1"]) - y(q["q3"])),
                fill=color, opacity="0.35", stroke=color)
        svg.line(centre - half, y(q["median"]), centre + half, y(q["median"]), color, 2.5)
        svg.text(centre, height - 10, f"{name} (n={int(q.get('n', 0))})", anchor="middle", size=10)
    return svg.render()


# --- the page ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#2c3e50;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{padding:4px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} th{background:#f6f7f8} .worse{color:#c0392b;font-weight:600}
.better{color:#1e8449;font-weight:600} .muted{color:#7f8c8d} .charts{display:flex;flex-wrap:wrap;gap:12px}
.num{text-align:right;font-variant-numeric:tabular-nums} svg{background:#fff}
"""


def _fmt_effect(comparison: dict[str, Any]) -> str:
    effect, (low, high) = comparison["effect"], comparison["ci"]

    def show(v: float | None) -> str:
        if v is None:
            return "∞"
        if comparison["effect_kind"] == "difference":
            return f"{v * 100:+.2f} pp"
        if comparison["effect_kind"] == "ratio":
            return f"{v:.3g}×"
        return f"{v:+.4g} {comparison.get('unit', '')}".strip()

    return f"{show(effect)} [{show(low)}, {show(high)}]"


def _evidence(comparison: dict[str, Any]) -> str:
    mine, theirs = comparison["evidence"]["revision"], comparison["evidence"]["baseline"]
    if "events" in mine:
        return f"{mine['events']}/{_num(mine['n'])} vs {theirs['events']}/{_num(theirs['n'])}"
    return f"median {mine.get('median', 0):.4g} (n={mine['n']}) vs {theirs.get('median', 0):.4g} (n={theirs['n']})"


def _prob_worse(comparison: dict[str, Any]) -> str:
    value = (comparison.get("posterior") or {}).get("prob_worse")
    return "" if value is None else f"{value:.1%}"


def _table(comparisons: Iterable[dict[str, Any]], css_id: str) -> str:
    rows = []
    for c in comparisons:
        direction_class = c["direction"] if c["flagged"] else "muted"
        rows.append(
            "<tr>" + "".join([
                f"<td>{_e(c['revision'])} vs {_e(c['baseline'])}</td>",
                f"<td>{_e(c['kpi'])}</td>",
                f"<td>{_e(c.get('station') or c.get('channel') or '')}</td>",
                f'<td class="{_e(direction_class)}">{_e(c["direction"])}</td>',
                f'<td class="num">{_e(_fmt_effect(c))}</td>',
                f'<td class="num">{c["p_value"]:.3g}</td>',
                f'<td class="num">{c["q_value"]:.3g}</td>',
                f"<td>{_e(_evidence(c))}</td>",
                f'<td class="num">{_e(_prob_worse(c))}</td>',
                f"<td>{_e(c['test'])}</td>",
            ]) + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("revisions", "KPI", "channel / station", "direction",
                                              "effect [95 % CI]", "p", "q (BH)", "evidence", "P(worse)",
                                              "test"))
    return f'<table id="{css_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _per_revision(comparisons: Sequence[dict[str, Any]]) -> dict[tuple[str, str | None], dict[str, dict[str, Any]]]:
    """(kpi, channel/station) -> revision -> its evidence, collected from both sides of every comparison."""
    grouped: dict[tuple[str, str | None], dict[str, dict[str, Any]]] = {}
    for c in comparisons:
        key = (c["kpi"], c.get("station") or c.get("channel"))
        group = grouped.setdefault(key, {})
        group.setdefault(c["baseline"], c["evidence"]["baseline"])
        group.setdefault(c["revision"], c["evidence"]["revision"])
    return grouped


def render_report(document: dict[str, Any], *, tenant: str | None = None, generated: float | None = None) -> str:
    """The whole HTML page for one insights document."""
    comparisons: list[dict[str, Any]] = document.get("comparisons") or document["insights"]
    insights = document["insights"]
    revisions = document.get("revisions", [])
    order = {r["revision"]: i for i, r in enumerate(revisions)}
    title = f"Revision comparison: {document['model']}" + (f" ({tenant})" if tenant else "")
    generated_text = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(generated or time.time()))
    data_text = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(document["ts"]))

    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f'<p class="muted">Comparisons computed {_e(data_text)}; report generated {_e(generated_text)}. '
             f"{document.get('tests', len(comparisons))} comparisons, false discovery rate "
             f"{document.get('alpha', 0.05):g} (Benjamini-Hochberg), {document.get('confidence', 0.95):.0%} "
             "confidence intervals.</p>"]

    parts.append("<h2>Revisions</h2><table id=\"revisions\"><thead><tr><th>revision</th><th>units</th>"
                 "<th>first-pass yield</th><th>anomaly starts</th><th>feedback</th></tr></thead><tbody>")
    for r in revisions:
        fpy = r.get("first_pass_yield")
        parts.append(f"<tr><td>{_e(r['revision'])}</td><td class=\"num\">{r['units']}</td>"
                     f"<td class=\"num\">{'-' if fpy is None else f'{fpy:.2%}'}</td>"
                     f"<td class=\"num\">{r.get('anomalies', 0)}</td>"
                     f"<td class=\"num\">{r.get('feedback', 0)}</td></tr>")
    parts.append("</tbody></table>")

    parts.append(f"<h2>Insights ({len(insights)})</h2>")
    if insights:
        parts.append("<ul>" + "".join(f'<li class="{_e(i["direction"])}">{_e(i.get("summary", _label(i)))}</li>'
                                      for i in insights) + "</ul>")
        parts.append(_table(insights, "insights"))
    else:
        parts.append("<p>No revision differs from its baseline at the chosen false discovery rate.</p>")

    parts.append("<h2>Effects</h2><div class=\"charts\">")
    differences = [c for c in comparisons if c["effect_kind"] == "difference"]
    ratios = [c for c in comparisons if c["effect_kind"] == "ratio"]
    ranked = [c for c in comparisons if "superiority" in c]
    if differences:
        parts.append(forest_plot(differences, title="Proportions: revision − baseline (percentage points)",
                                 null=0.0, scale=100.0, unit=" pp"))
    if ratios:
        parts.append(forest_plot(ratios, title="Anomaly rates: revision ÷ baseline (log scale)", null=1.0,
                                 log_scale=True, unit="×"))
    if ranked:
        parts.append(forest_plot(
            ranked, title="Continuous KPIs: P(revision > baseline), 0.5 = no difference", null=0.5,
            get=lambda c: (c["superiority"]["estimate"], *c["superiority"]["ci"])))
    parts.append("</div>")

    parts.append("<h2>Per revision</h2><div class=\"charts\">")
    for (kpi, channel), per_revision in sorted(_per_revision(comparisons).items(), key=lambda kv: str(kv[0])):
        names = sorted(per_revision, key=lambda r: order.get(r, len(order)))
        label = kpi.replace("_", " ") + (f" · {channel}" if channel else "")
        first = per_revision[names[0]]
        if "events" in first:
            rows = [(name, int(per_revision[name]["events"]), int(per_revision[name]["n"])) for name in names]
            if kpi == "anomaly_rate":
                parts.append(rate_chart(f"{label} (starts per unit)", rows, percent=False))
            else:
                parts.append(rate_chart(label, rows))
        elif "median" in first:
            unit = next((c.get("unit", "") for c in comparisons if (c["kpi"], c.get("station") or c.get("channel"))
                         == (kpi, channel)), "")
            parts.append(box_chart(label, [(name, per_revision[name]) for name in names], unit))
    parts.append("</div>")

    parts.append(f"<h2>All comparisons ({len(comparisons)})</h2>")
    parts.append(_table(sorted(comparisons, key=lambda c: c["q_value"]), "comparisons"))
    parts.append('<p class="muted">Tests: Fisher\'s exact test (proportions, Newcombe interval of the '
                 "difference), exact conditional Poisson test (anomaly starts per unit, exact interval of the "
                 "ratio), Brunner-Munzel (continuous KPIs; Hodges-Lehmann shift with Moses interval; ratings: "
                 "difference of means with Welch interval). Generated by forgeline loop.</p></body></html>")
    return "".join(parts)
