"""The twin's time series: the v2 write path against a real VictoriaMetrics (including an outage with
disk spill and catch-up), and the measurement schema with InfluxQL against a real influxd 1.x."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forgeline.broker import free_port
from forgeline.contract import telemetry
from forgeline.contract.timeseries import DEVICE_TAGS, MEASUREMENTS
from forgeline.contract.topics import DeviceRef
from forgeline.mqtt import MqttSettings
from tests.conftest import Collector
from tests.servers import RunningVictoriaMetrics, start_influxd, start_victoria_metrics
from tests.twin_support import T0_US, Publisher, batch, birth, latest_json, twin_config
from twin.config import InfluxConfig
from twin.influx import InfluxWriter, line
from twin.service import TwinService

pytestmark = pytest.mark.influx


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[RunningVictoriaMetrics]:
    with start_victoria_metrics(tmp_path / "vm") as server:
        yield server


@pytest.fixture
def publisher(mqtt_settings: MqttSettings) -> Iterator[Publisher]:
    pub = Publisher(mqtt_settings)
    yield pub
    pub.close()


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _feed(publisher: Publisher, collect: Callable[..., Collector], ref: DeviceRef, seqs: range) -> None:
    watch = collect(ref.twin_topic)
    publisher.birth(ref, birth("FDM", build_volume_mm=[200, 200, 200], product_model="mk4", product_revision="B"))
    for seq in seqs:
        publisher.publish(ref.telemetry_topic, batch(seq, temp=200.0 + seq))
    watch.wait_for(lambda m: (latest_json(m, ref.twin_topic) or {}).get("last_seq") == seqs[-1])


def test_service_writes_kpis_and_telemetry_through_the_v2_api(
    vm: RunningVictoriaMetrics, mqtt_settings: MqttSettings, publisher: Publisher,
    collect: Callable[..., Collector], tenant: str, tmp_path: Path,
) -> None:
    influx = InfluxConfig(url=vm.url, token="not-checked", bucket="twin", interval_s=0.2, flush_interval_s=0.1,
                          spill_dir=str(tmp_path / "spill"))
    service = TwinService(twin_config(mqtt_settings, tenant, influx=influx)).start()
    try:
        ref = DeviceRef(tenant, "b", "h1", "p1")
        _feed(publisher, collect, ref, range(3))
        time.sleep(0.5)  # at least one interval after the last batch
        assert service.writer is not None
        assert service.writer.flush()
        selector = f'{{tenant="{tenant}",device="p1"}}'
        _wait(lambda: bool(vm.export(f'{{__name__="kpi_utilization",tenant="{tenant}"}}')))
        kpi = vm.export(f'{{__name__="kpi_utilization",tenant="{tenant}"}}')
        assert kpi[0]["metric"]["site"] == "b" and kpi[0]["metric"]["technology"] == "FDM"
        assert kpi[-1]["values"][-1] == pytest.approx(1.0)
        temps = vm.export(selector.replace("{", '{__name__="telemetry_nozzle_temp",'))
        assert temps and temps[0]["metric"]["product_revision"] == "B"
        # the interval means of the three batches (200, 201, 202) are all there, none twice
        values = sorted(v for series in temps for v in series["values"])
        assert values[0] >= 200.0 and values[-1] <= 202.0 and len(values) >= 1
        ops = vm.export(f'{{__name__="twin_ops_samples",worker="{service.worker_id}"}}')
        assert ops and ops[0]["values"][-1] == 90
    finally:
        service.stop()


def test_outage_spills_to_disk_and_catches_up_losing_nothing(vm: RunningVictoriaMetrics, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    config = InfluxConfig(url=vm.url, bucket="twin", batch_size=100, flush_interval_s=0.05, max_retries=1,
                          retry_interval_s=0.05, max_retry_delay_s=0.2, spill_dir=str(spill))
    writer = InfluxWriter(config)
    writer.start()

    def points(start: int, count: int) -> list[str | None]:
        return [line("kpi", {"tenant": "outage", "device": "d"}, {"utilization": i / 1000.0},
                     T0_US * 1000 + i * 1_000_000_000) for i in range(start, start + count)]

    writer.add(points(0, 250))
    assert writer.flush()
    vm.stop()  # the database goes away
    writer.add(points(250, 500))
    _wait(lambda: writer.stats.spilled_batches >= 5 and not writer._queue)
    assert list(spill.glob("*.lp")) and writer.down_since is not None
    writer.add(points(750, 100))  # while down: straight to the spill, in order
    _wait(lambda: not writer._queue)
    writer.stop()  # and the writer restarts too: the spill on disk is the only copy
    vm.start()
    writer = InfluxWriter(config)
    assert writer.backlog_points == 600
    writer.start()
    writer.add(points(850, 150))
    assert writer.flush(20)
    writer.stop()
    assert not list(spill.glob("*.lp"))
    series = vm.export('{__name__="kpi_utilization",tenant="outage"}')
    timestamps = [t for s in series for t in s["timestamps"]]
    assert len(timestamps) == 1000 and len(set(timestamps)) == 1000
    assert writer.stats.replayed_batches >= 6 and writer.stats.dropped_points == 0


def test_schema_answers_the_dashboards_influxql(
    mqtt_settings: MqttSettings, publisher: Publisher, collect: Callable[..., Collector], tenant: str,
    tmp_path: Path,
) -> None:
    """The exact lines the twin writes (spilled, as the database is unreachable) loaded into influxd 1.x
    and queried with the InfluxQL of docs/twin.md."""
    spill = tmp_path / "spill"
    influx = InfluxConfig(url=f"http://127.0.0.1:{free_port()}", bucket="twin", interval_s=0.2,
                          flush_interval_s=0.1, max_retries=0, retry_interval_s=0.05, spill_dir=str(spill))
    service = TwinService(twin_config(mqtt_settings, tenant, influx=influx)).start()
    ref = DeviceRef(tenant, "b", "h1", "sls-1")
    try:
        watch = collect(ref.twin_topic)
        publisher.birth(ref, birth("SLS", channels=("state", "laser_power", "chamber_temp"),
                                   build_volume_mm=[300, 300, 300]))
        publisher.publish(ref.event_topic, {"type": "job_started", "ts": T0_US / 1e6, "job_id": "J1",
                                            "parts": [{"part_id": "a", "volume_cm3": 2700.0, "quantity": 2}],
                                            "material": "PA12"})
        for seq in range(4):
            publisher.publish(ref.telemetry_topic, batch(seq, channels=("state", "laser_power", "chamber_temp"),
                                                         temp=30.0))
        # a replayed hour-old batch: its means land in their own past interval
        old = telemetry.encode(["state", "laser_power", "chamber_temp"], [T0_US - 3_600_000_000] * 3, [0, 1, 2],
                               [3.0, 99.0, 170.0], seq=100, epoch=0, historical=True)
        publisher.publish(ref.telemetry_topic, old)
        watch.wait_for(lambda m: (latest_json(m, ref.twin_topic) or {}).get("samples") == 4 * 30 + 3)
        time.sleep(0.5)
    finally:
        service.stop()
    lines = [text for path in sorted(spill.glob("*.lp")) for text in path.read_text().splitlines()]
    assert lines
    with start_influxd(tmp_path / "influxd") as influxd:
        influxd.write(lines)
        where = f"\"tenant\" = '{tenant}'"
        [kpi] = influxd.query(f'SELECT last("utilization") AS u, last("chamber_fill") AS fill, last("state") AS state '
                              f'FROM "kpi" WHERE {where} GROUP BY "device"')
        assert kpi["tags"]["device"] == "sls-1" and kpi["u"] == pytest.approx(1.0)
        assert kpi["fill"] == pytest.approx(2 * 2700.0 / 27000.0) and kpi["state"] == 3
        rows = influxd.query(f'SELECT mean("laser_power") FROM "telemetry" WHERE {where} '
                             f'AND time >= {T0_US - 3_700_000_000}u GROUP BY time(1h), "device" fill(none)')
        assert any(r["mean"] == pytest.approx(99.0) for r in rows)  # the replayed hour
        assert any(r["mean"] == pytest.approx(30.0) for r in rows)  # the live data
        [build] = influxd.query(f'SELECT "job_id", "chamber_fill", "parts" FROM "build" WHERE {where}')
        assert build["job_id"] == "J1" and build["parts"] == 2 and build["chamber_fill"] == pytest.approx(0.2)
        fleet = influxd.query(f'SELECT last("devices") FROM "fleet" WHERE {where}')
        assert fleet and fleet[0]["last"] == 1
        # tags and field types as the contract says
        for name in ("kpi", "telemetry", "build", "fleet"):
            tag_rows = influxd.query_raw(f'SHOW TAG KEYS FROM "{name}"')["series"][0]["values"]
            tags = {row[0] for row in tag_rows}
            assert tags <= set(MEASUREMENTS[name].tags), (name, tags)
            assert "tenant" in tags
        assert set(DEVICE_TAGS) - {"technology"} <= {r[0] for r in influxd.query_raw(
            'SHOW TAG KEYS FROM "kpi"')["series"][0]["values"]}
        field_types = {r[0]: r[1] for r in influxd.query_raw('SHOW FIELD KEYS FROM "kpi"')["series"][0]["values"]}
        influx_type = {"float": "float", "int": "integer", "string": "string"}
        for field_name, kind in MEASUREMENTS["kpi"].fields.items():
            if field_name in field_types:
                assert field_types[field_name] == influx_type[kind], field_name
        # tenant isolation in the data: another tenant's filter sees nothing of this one
        assert influxd.query("SELECT count(\"utilization\") FROM \"kpi\" WHERE \"tenant\" = 'someone-else'") == []
