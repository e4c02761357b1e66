"""The loop's ``feedback`` and ``insight`` measurements: exact line protocol, and real writes through the
shared time-series writer read back from a real InfluxDB 1.x (``/write``, InfluxQL) and a real
VictoriaMetrics (``/api/v2/write``), also through the service fed over a real Mosquitto, and an outage
(the database missing) that spills to disk and catches up losing nothing."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeline.contract import topics
from forgeline.loop.compare import compare_model
from forgeline.loop.intake import LoopStore
from forgeline.loop.service import LoopService, ServiceConfig
from forgeline.loop.simulate import RevisionProfile, simulate_line
from forgeline.loop.timeseries_out import feedback_line, insight_lines, line
from forgeline.mqtt import MqttSettings, connect
from forgeline.timeseries import InfluxSettings, TimeSeriesWriter
from tests.conftest import Collector
from tests.servers import start_influxd, start_victoria_metrics


def test_line_protocol_escapes_and_drops_what_influx_cannot_hold() -> None:
    point = line("insight", {"tenant": "a b", "product_model": "M,1", "product_revision": "r=2", "kpi": "k",
                             "channel": None}, {"effect": float("nan"), "p_value": 0.5, "flagged": 1}, 2.0)
    assert point == r"insight,tenant=a\ b,product_model=M\,1,product_revision=r\=2,kpi=k p_value=0.5,flagged=1i " \
                    "2000000000"
    text = feedback_line("t", "M", "A", {"ts": 1, "serial": 'S"1\\', "text": "ignored", "fault": True})
    assert r'serial="S\"1\\"' in text and "fault=1i" in text and "rating" not in text
    assert line("insight", {"tenant": "t"}, {"effect": float("inf")}, 1.0) is None
    with pytest.raises(ValueError, match="not in the contract"):
        line("insight", {"nope": "x"}, {"effect": 1.0}, 1.0)
    with pytest.raises(ValueError, match="not in the contract"):
        line("feedback", {}, {"effect": 1.0}, 1.0)


def document_with_insights(tenant: str = "acme") -> dict[str, Any]:
    store = LoopStore()
    store.ingest_all(m.wire() for m in simulate_line(tenant, "MW-20", [
        RevisionProfile("A", units=600), RevisionProfile("B", units=600, anomaly_rate_scale={"cavity_temp_rise": 6})],
        seed=2))
    document = compare_model(store.model(tenant, "MW-20"), ts=1_700_000_000.0)
    assert document["insights"][0]["channel"] == "cavity_temp_rise"  # what the databases must show
    return document


# --- real servers ---------------------------------------------------------------------------------------


def _http(url: str, data: bytes | None = None, method: str = "GET") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as response:
        body: bytes = response.read()
        return body


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[str]:
    with start_influxd(tmp_path / "influxd") as server:
        yield server.url


def influxql(url: str, query: str) -> list[dict[str, Any]]:
    answer = json.loads(_http(f"{url}/query?" + urllib.parse.urlencode({"db": "forgeline", "q": query})))
    series: list[dict[str, Any]] = answer["results"][0].get("series", [])
    return [{"tags": s.get("tags", {}), **dict(zip(s["columns"], row, strict=True))}
            for s in series for row in s["values"]]


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.influx
def test_insights_and_feedback_land_in_influxdb_1x(influxd: str, tmp_path: Path) -> None:
    document = document_with_insights()
    writer = TimeSeriesWriter(InfluxSettings(influxd, api="v1"), name="loop").start()
    assert writer.add(insight_lines("acme", document)) == len(document["comparisons"])
    writer.add([feedback_line("acme", "MW-20", "B", {"ts": 1_700_000_100.0, "serial": "S1", "rating": 2,
                                                     "category": "door", "source": "customer"})])
    assert writer.flush()
    writer.stop()
    assert writer.stats.points_written == len(document["comparisons"]) + 1 and writer.stats.write_errors == 0
    rows = influxql(influxd, "SELECT effect, q_value, ci_low, ci_high, flagged, channel, kpi, product_revision, "
                             "baseline_revision FROM insight WHERE tenant = 'acme' AND flagged = 1")
    flagged = {(r["kpi"], r["channel"], r["product_revision"], r["baseline_revision"]) for r in rows}
    assert ("anomaly_rate", "cavity_temp_rise", "B", "A") in flagged
    assert len(rows) == len(document["insights"])
    [count] = influxql(influxd, "SELECT count(p_value) FROM insight WHERE product_model = 'MW-20'")
    assert count["count"] == len(document["comparisons"])
    [feedback] = influxql(influxd, "SELECT rating, fault, serial, category FROM feedback")
    assert (feedback["rating"], feedback["fault"], feedback["serial"], feedback["category"]) == (2, 0, "S1", "door")
    # A refused write says why, and the points are kept (spilled), not lost: a missing database is a
    # configuration problem an operator fixes.
    spill = tmp_path / "spill"
    settings = InfluxSettings(influxd, api="v1", database="nope", max_retries=0, retry_interval_s=0.05,
                              max_retry_delay_s=0.1, spill_dir=str(spill))
    missing = TimeSeriesWriter(settings, name="loop")
    missing.add(insight_lines("acme", document)[:3])
    missing.stop()
    assert missing.stats.points_written == 0 and missing.stats.write_errors >= 1
    assert missing.last_error is not None and "HTTP 404" in missing.last_error
    assert missing.backlog_points == 3 and len(list(spill.glob("loop-*.lp"))) == 1
    _http(f"{influxd}/query?" + urllib.parse.urlencode({"q": 'CREATE DATABASE "nope"'}), data=b"", method="POST")
    again = TimeSeriesWriter(settings, name="loop").start()  # a restart finds its spill and replays it
    assert again.backlog_points == 3 and again.flush()
    again.stop()
    answer = json.loads(_http(f"{influxd}/query?" + urllib.parse.urlencode(
        {"db": "nope", "q": "SELECT count(p_value) FROM insight"})))
    assert answer["results"][0]["series"][0]["values"][0][1] == 3
    assert not list(spill.glob("loop-*.lp")) and again.stats.replayed_batches == 1


@pytest.mark.influx
def test_service_writes_both_measurements_while_serving(
    influxd: str, mqtt_settings: MqttSettings, tenant: str, collect: Callable[..., Collector]
) -> None:
    messages = simulate_line(tenant, "MW-20", [RevisionProfile("A", units=150), RevisionProfile("B", units=150)],
                             seed=4)
    feedback = sum(1 for m in messages if "/feedback/" in m.topic)
    watcher = collect(topics.insights_topic(tenant, "MW-20"))
    config = ServiceConfig(tenant=tenant, interval_s=0.2,
                           influx=InfluxSettings(influxd, api="v1", flush_interval_s=0.1))
    with LoopService(mqtt_settings, config) as service:
        client = connect(mqtt_settings)
        infos = [client.publish(*m.wire(), qos=1) for m in messages]
        infos[-1].wait_for_publish(30)
        client.disconnect()
        client.loop_stop()
        watcher.wait_for(lambda ms: any(sum(r["feedback"] for r in json.loads(m.payload)["revisions"]) == feedback
                                        for m in ms), timeout=60)
    assert service.influx is not None and service.influx.stats.write_errors == 0
    assert service.influx.backlog_points == 0 and service.influx.stats.points_written >= feedback + 10
    [count] = influxql(influxd, f"SELECT count(fault) FROM feedback WHERE tenant = '{tenant}'")
    assert count["count"] == feedback
    tested = influxql(influxd, f"SELECT count(p_value) FROM insight WHERE tenant = '{tenant}'")
    assert tested and tested[0]["count"] >= 10


@pytest.mark.influx
def test_points_wait_while_the_database_is_unreachable(influxd: str, mqtt_settings: MqttSettings,
                                                        tenant: str, tmp_path: Path) -> None:
    """The database the service writes to does not exist yet: every point is spilled to disk, none is
    written; once it exists the spill is replayed and every feedback point is there exactly once."""
    spill = tmp_path / "spill"
    influx = InfluxSettings(influxd, api="v1", database="late", max_retries=0, flush_interval_s=0.05,
                            retry_interval_s=0.1, max_retry_delay_s=0.2, spill_dir=str(spill))
    service = LoopService(mqtt_settings, ServiceConfig(tenant=tenant, interval_s=3600, influx=influx))
    assert service.influx is not None
    messages = simulate_line(tenant, "MW-20", [RevisionProfile("A", units=60)], seed=1)
    feedback = sum(1 for m in messages if "/feedback/" in m.topic)
    service.start()
    try:
        for message in messages:
            service.handle(*message.wire())
        assert service.publish_due() == 1
        insights = len(service.last_documents[(tenant, "MW-20")]["comparisons"])
        _wait(lambda: service.influx is not None and service.influx.stats.spilled_points == feedback + insights)
        assert service.influx.stats.points_written == 0 and service.influx.down_since is not None
        assert "HTTP 404" in (service.influx.last_error or "") and list(spill.glob("loop-*.lp"))
        _http(f"{influxd}/query?" + urllib.parse.urlencode({"q": 'CREATE DATABASE "late"'}), data=b"",
              method="POST")  # the database is back
        assert service.influx.flush(20)
    finally:
        service.stop()
    answer = json.loads(_http(f"{influxd}/query?" + urllib.parse.urlencode(
        {"db": "late", "q": f"SELECT count(fault) FROM feedback WHERE tenant = '{tenant}'"})))
    assert answer["results"][0]["series"][0]["values"][0][1] == feedback
    assert service.influx.stats.dropped_points == 0 and service.influx.stats.rejected_points == 0
    assert not list(spill.glob("loop-*.lp"))


@pytest.fixture
def victoria_metrics(tmp_path: Path) -> Iterator[str]:
    with start_victoria_metrics(tmp_path / "vm") as server:
        yield server.url


@pytest.mark.influx
def test_insights_land_in_victoria_metrics_through_the_v2_write_api(victoria_metrics: str) -> None:
    document = document_with_insights()
    writer = TimeSeriesWriter(InfluxSettings(victoria_metrics, api="v2", bucket="loop", token="not-checked"),
                              name="loop").start()
    writer.add(insight_lines("acme", document))
    assert writer.flush()
    writer.stop()
    _http(f"{victoria_metrics}/internal/force_flush")
    exported = _http(f"{victoria_metrics}/api/v1/export?" + urllib.parse.urlencode(
        {"match[]": '{__name__="insight_flagged",kpi="anomaly_rate",channel="cavity_temp_rise"}'}))
    series = [json.loads(line) for line in exported.decode().splitlines() if line.strip()]
    assert len(series) == 1
    assert series[0]["metric"]["product_revision"] == "B" and series[0]["values"] == [1]
    assert series[0]["timestamps"] == [1_700_000_000_000]
