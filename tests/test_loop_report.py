"""The HTML report is one self-contained file (no scripts, no external references), its SVG plots are
well-formed and inside their canvas, and it shows every comparison; ``forgeline loop report --input``
and ``forgeline loop simulate`` work from the command line with clear errors for bad input."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from forgeline.cli import main
from forgeline.contract import schemas
from forgeline.loop.cli import parse_injection
from forgeline.loop.compare import compare_model
from forgeline.loop.intake import LoopStore
from forgeline.loop.report import render_report
from forgeline.loop.simulate import RevisionProfile, read_jsonl, simulate_line, write_jsonl


class Inventory(HTMLParser):
    """Every tag and attribute of a page, to check what it would load from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str]] = []
        self.rows: dict[str, int] = {}
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            self.attributes.append((tag, name, value or ""))
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
        if tag == "tr" and self._table is not None:
            self.rows[self._table] = self.rows.get(self._table, 0) + 1


def make_document(seed: int = 4) -> dict[str, Any]:
    store = LoopStore()
    store.ingest_all(m.wire() for m in simulate_line("acme", "MW-20", [
        RevisionProfile("A", units=500),
        RevisionProfile("B", units=500, door_leakage_scale=1.8, anomaly_rate_scale={"cavity_temp_rise": 4.0}),
        RevisionProfile("C", units=500)], seed=seed))
    return compare_model(store.model("acme", "MW-20"), ts=1_700_000_000.0)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return make_document()


def test_report_is_self_contained(document: dict[str, Any]) -> None:
    page = render_report(document, tenant="acme")
    inventory = Inventory()
    inventory.feed(page)
    assert "script" not in inventory.tags and "link" not in inventory.tags and "iframe" not in inventory.tags
    assert "img" not in inventory.tags  # plots are inline SVG, not images fetched from anywhere
    loading = [(t, a, v) for t, a, v in inventory.attributes if a in ("src", "href", "xlink:href", "srcset")]
    assert loading == []
    # The only URL is the SVG namespace identifier, which is never fetched.
    assert set(re.findall(r"https?://[^\s\"')]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "@import" not in page and "url(" not in page


def test_report_plots_are_well_formed_and_inside_their_canvas(document: dict[str, Any]) -> None:
    page = render_report(document)
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) >= 3 + 10  # three forest plots and per-revision charts
    for svg in svgs:
        root = ElementTree.fromstring(svg)
        width, height = float(root.get("width", 0)), float(root.get("height", 0))
        for element in root.iter():
            for name in ("x", "x1", "x2", "cx"):
                if element.get(name) is not None:
                    assert -1 <= float(element.get(name, 0)) <= width + 1, (name, element.attrib)
            for name in ("y", "y1", "y2", "cy"):
                if element.get(name) is not None:
                    assert -1 <= float(element.get(name, 0)) <= height + 1, (name, element.attrib)


def test_report_shows_every_comparison_and_the_insights(document: dict[str, Any]) -> None:
    page = render_report(document, tenant="acme")
    inventory = Inventory()
    inventory.feed(page)
    assert inventory.rows["comparisons"] == len(document["comparisons"]) + 1  # plus the header row
    assert inventory.rows["insights"] == len(document["insights"]) + 1
    assert inventory.rows["revisions"] == 3 + 1
    assert document["insights"], "the injected defects must produce insights to show"
    for insight in document["insights"]:
        assert insight["summary"].replace("'", "&#x27;") in page
    assert "door_leakage" in page and "cavity_temp_rise" in page
    # One forest-plot row per comparison (each row is a <g> with its own title).
    assert page.count("<g><title>") == len(document["comparisons"])


def test_report_escapes_what_it_shows() -> None:
    document = make_document(seed=6)
    document["model"] = "<script>alert(1)</script>"
    page = render_report(document, tenant="a&b")
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&amp;b" in page


def test_report_without_insights_says_so() -> None:
    store = LoopStore()
    store.ingest_all(m.wire() for m in simulate_line("acme", "MW-20", [RevisionProfile("A", units=200),
                                                                        RevisionProfile("B", units=200)], seed=1))
    document = compare_model(store.model("acme", "MW-20"), ts=0.0)
    assert document["insights"] == [] and document["tests"] > 0
    page = render_report(document)
    assert "No revision differs" in page and 'id="insights"' not in page


def test_cli_simulate_then_report_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorded = tmp_path / "messages.jsonl"
    assert main(["loop", "simulate", "-o", str(recorded), "--units", "500", "--seed", "2", "--tenant", "acme",
                 "--inject", "B:door_leakage_scale=1.9", "--inject", "B:anomaly_rate_scale.cavity_temp_rise=4"]) == 0
    assert sum(1 for _ in read_jsonl(recorded)) > 4000
    output, as_json = tmp_path / "report.html", tmp_path / "insights.json"
    assert main(["loop", "report", "--model", "MW-20", "--input", str(recorded), "-o", str(output),
                 "--json", str(as_json)]) == 0
    assert "insight" in capsys.readouterr().out
    written = json.loads(as_json.read_text())
    schemas.validate("insights", written)
    channels = {(i["kpi"], i["channel"]) for i in written["insights"]}
    assert ("defect_rate", "door_leakage") in channels and ("anomaly_rate", "cavity_temp_rise") in channels
    assert output.read_text().startswith("<!DOCTYPE html>")
    # A fixed baseline and a stricter FDR are passed through.
    assert main(["loop", "report", "--model", "MW-20", "--input", str(recorded), "-o", str(output), "--json",
                 str(as_json), "--baseline", "A", "--alpha", "0.01"]) == 0
    strict = json.loads(as_json.read_text())
    assert strict["baseline_revision"] == "A" and strict["alpha"] == 0.01


def test_cli_report_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorded = tmp_path / "m.jsonl"
    write_jsonl(simulate_line("acme", "MW-20", [RevisionProfile("A", units=5)], seed=1), recorded)
    assert main(["loop", "report", "--model", "OTHER", "--input", str(recorded), "-o", str(tmp_path / "r")]) == 2
    assert "no data for model 'OTHER'" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"topic": "x"}\n')
    assert main(["loop", "report", "--model", "MW-20", "--input", str(broken), "-o", str(tmp_path / "r")]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err
    assert main(["loop", "report", "--model", "MW-20", "--broker", "mqtt://127.0.0.1:1", "-o", "x"]) == 2
    assert "--tenant" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [("B:door_leakage_scale=1.8", ("B", "door_leakage_scale", None, 1.8)),
     ("C:anomaly_rate_scale.cavity_temp_rise=3", ("C", "anomaly_rate_scale", "cavity_temp_rise", 3.0))],
)
def test_injection_syntax(text: str, expected: tuple[str, str, str | None, float]) -> None:
    assert parse_injection(text) == expected


@pytest.mark.parametrize("bad", ["door_leakage_scale=1.8", "B:nope=1", "B:anomaly_rate_scale=2",
                                 "B:door_leakage_scale.x=1", "B:door_leakage_scale=big", "B:units=5"])
def test_bad_injections_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="--inject"):
        parse_injection(bad)
