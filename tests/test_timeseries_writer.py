"""The shared time-series writer (``forgeline/timeseries.py``) against real servers: writers sharing one
spill directory each replay only their own backlog, a malformed batch is set aside without blocking the
rest, the in-memory backlog is bounded and counts what it drops, and both send paths of the v2 API
(influxdb-client and the standard library) write the same points."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forgeline.broker import free_port
from forgeline.timeseries import InfluxSettings, TimeSeriesWriter, _ClientSender, _HttpSender, contract_line, line
from tests.servers import RunningInfluxd, RunningVictoriaMetrics, start_influxd, start_victoria_metrics

pytestmark = pytest.mark.influx

T0_NS = 1_700_000_000 * 10**9


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def points(writer: str, count: int) -> list[str | None]:
    return [line("fleet", {"tenant": writer}, {"devices": i}, T0_NS + i * 10**9) for i in range(count)]


def fast(url: str, spill: Path | None, **changes: object) -> InfluxSettings:
    options: dict[str, object] = {"api": "v1", "max_retries": 0, "batch_size": 50, "flush_interval_s": 0.05,
                                  "retry_interval_s": 0.05, "max_retry_delay_s": 0.2, "timeout_s": 2.0,
                                  "spill_dir": str(spill) if spill else None, **changes}
    return InfluxSettings(url, **options)  # type: ignore[arg-type]


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[RunningInfluxd]:
    with start_influxd(tmp_path / "influxd") as server:
        yield server


def count(server: RunningInfluxd, tenant: str) -> int:
    rows = server.query(f"SELECT count(\"devices\") FROM \"fleet\" WHERE \"tenant\" = '{tenant}'")
    return int(rows[0]["count"]) if rows else 0


def test_writers_sharing_a_spill_directory_replay_only_their_own(influxd: RunningInfluxd, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    nobody = f"http://127.0.0.1:{free_port()}"
    first, second = (TimeSeriesWriter(fast(nobody, spill), name=n).start() for n in ("twin", "twin-2"))
    first.add(points("one", 120))
    second.add(points("two", 70))
    _wait(lambda: first.stats.spilled_points == 120 and second.stats.spilled_points == 70)
    first.stop()
    second.stop()
    names = sorted(p.name for p in spill.glob("*.lp"))
    assert sum(n.startswith("twin-0") for n in names) == 3 and sum(n.startswith("twin-2-") for n in names) == 2
    # the database is there now: a restarted "twin" replays its three files and leaves "twin-2"'s alone
    again = TimeSeriesWriter(fast(influxd.url, spill), name="twin")
    assert again.backlog_points == 120
    again.start()
    assert again.flush()
    again.stop()
    assert (count(influxd, "one"), count(influxd, "two")) == (120, 0)
    assert sorted(p.name for p in spill.glob("*.lp")) == [n for n in names if n.startswith("twin-2-")]
    other = TimeSeriesWriter(fast(influxd.url, spill), name="twin-2").start()
    assert other.backlog_points == 70 and other.flush()
    other.stop()
    assert (count(influxd, "one"), count(influxd, "two")) == (120, 70)
    assert not list(spill.glob("*.lp"))


def test_a_malformed_batch_is_set_aside_and_counted_the_rest_written(influxd: RunningInfluxd,
                                                                     tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    writer = TimeSeriesWriter(fast(influxd.url, spill, batch_size=10), name="loop").start()
    writer.add(points("good", 10))
    assert writer.flush()
    writer.add(["fleet,tenant=bad devices=1i,devices=oops 1"] * 10)  # a field with two types: HTTP 400
    writer.add(points("after", 10))
    assert writer.flush()
    writer.stop()
    assert writer.stats.rejected_points == 10 and writer.stats.points_written == 20
    assert writer.last_error is not None and "400" in writer.last_error
    [kept] = list((spill / "rejected").glob("loop-*.lp"))
    assert kept.read_text().count("\n") == 9
    assert (count(influxd, "good"), count(influxd, "after")) == (10, 10)


def test_memory_backlog_is_bounded_and_drops_are_counted() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    lines = points("mem", 200)
    batch_bytes = len("\n".join(str(p) for p in lines[:50]).encode())
    writer = TimeSeriesWriter(fast(nobody, None, max_spill_bytes=int(batch_bytes * 2.5)), name="mem").start()
    writer.add(lines)
    _wait(lambda: writer.stats.spilled_points + writer.stats.dropped_points == 200)
    writer.stop()
    assert writer.stats.spilled_points == 100 and writer.stats.dropped_points == 100  # two batches fit
    assert writer.backlog_points == 100


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[RunningVictoriaMetrics]:
    with start_victoria_metrics(tmp_path / "vm") as server:
        yield server


def test_both_v2_send_paths_write_the_same_points(vm: RunningVictoriaMetrics) -> None:
    """influxdb-client (the twin extra) and the standard-library fallback send the same v2 write."""
    for tenant, sender in (("client", _ClientSender), ("stdlib", _HttpSender)):
        settings = InfluxSettings(vm.url, api="v2", bucket="b", token="not-checked", flush_interval_s=0.05)
        writer = TimeSeriesWriter(settings, name=tenant)
        assert isinstance(writer._sender, _ClientSender)  # the default when influxdb-client is installed
        writer._sender = sender(settings)
        writer.start()
        writer.add([contract_line("routing", {"tenant": tenant, "technology": "MJF"},
                                  {"queued_parts": 3, "open_build_fill": 0.25}, 1_700_000_000.0)])
        assert writer.flush()
        writer.stop()
        selector = f'{{__name__="routing_queued_parts",tenant="{tenant}"}}'
        _wait(lambda: bool(vm.export(selector)))  # noqa: B023 (waited for here, in this iteration)
        [series] = vm.export(f'{{__name__="routing_open_build_fill",tenant="{tenant}"}}')
        assert series["values"] == [0.25] and series["timestamps"] == [1_700_000_000_000]
        assert series["metric"]["technology"] == "MJF"


def test_settings_are_checked_and_names_are_safe() -> None:
    with pytest.raises(ValueError, match="api must be v1 or v2"):
        InfluxSettings("http://x", api="v3")
    with pytest.raises(ValueError, match="http"):
        InfluxSettings("ftp://x")
    with pytest.raises(ValueError, match="batch_size"):
        InfluxSettings("http://x", batch_size=0)
    with pytest.raises(ValueError, match="writer name"):
        TimeSeriesWriter(InfluxSettings("http://x"), name="../escape")
    assert "secret" not in repr(InfluxSettings("http://x", token="secret", password="secret"))
    with pytest.raises(ValueError, match="not in the contract"):
        contract_line("routing", {"tenant": "t"}, {"queue": 1}, 1.0)
