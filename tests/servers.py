"""Real servers for tests: an InfluxDB 1.x ``influxd`` on free loopback ports with a temporary config.

Use it as a context manager or through a fixture::

    with start_influxd(tmp_path) as influx:
        influx.write(["kpi,tenant=acme utilization=0.5 1700000000000000000"])
        influx.query('SELECT * FROM "kpi"')

Everything lives under the given directory (meta, data, WAL, log); the HTTP and RPC listeners bind to
127.0.0.1 on free ports; the process is terminated (and killed if it hangs) on exit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.broker import free_port

INFLUXD_CANDIDATES = ("influxd", "/usr/bin/influxd")


class InfluxError(RuntimeError):
    """influxd refused a write or a query, or did not start."""


@dataclass
class RunningInfluxd:
    url: str
    database: str
    workdir: Path
    _process: subprocess.Popen[bytes] = field(repr=False)

    def _request(self, path: str, params: dict[str, str], body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}?{urllib.parse.urlencode(params)}", data=body,
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            raise InfluxError(f"influxd answered {exc.code} to {path}: {exc.read()[:500].decode()}") from None

    def write(self, lines: Iterable[str], database: str | None = None) -> int:
        """Write line-protocol points (ns precision) through the v1 ``/write`` endpoint."""
        batch = [line for line in lines if line]
        for start in range(0, len(batch), 5000):
            body = "\n".join(batch[start:start + 5000]).encode()
            self._request("/write", {"db": database or self.database, "precision": "ns"}, body)
        return len(batch)

    def query_raw(self, query: str, database: str | None = None) -> dict[str, Any]:
        """The JSON answer of ``/query`` for one statement; raises on an error in the statement."""
        answer: dict[str, Any] = json.loads(self._request("/query", {"db": database or self.database, "q": query}))
        result = answer["results"][0]
        if "error" in result:
            raise InfluxError(f"{result['error']} in {query}")
        return result

    def query(self, query: str, database: str | None = None) -> list[dict[str, Any]]:
        """Rows of every series as dicts (tags under ``"tags"``)."""
        series = self.query_raw(query, database).get("series", [])
        return [{"tags": s.get("tags", {}), **dict(zip(s["columns"], row, strict=True))}
                for s in series for row in s["values"]]

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)


def find_influxd() -> str | None:
    for candidate in INFLUXD_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def influxd_config(workdir: Path, http_port: int, rpc_port: int) -> str:
    return f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{workdir}/meta"
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
"""


@contextmanager
def start_influxd(workdir: Path, database: str = "forgeline", timeout: float = 30.0) -> Iterator[RunningInfluxd]:
    """A fresh influxd with ``database`` created; stopped when the block ends."""
    binary = find_influxd()
    if binary is None:
        raise InfluxError("influxd is not installed (apt-get install influxdb)")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, rpc_port = free_port(), free_port()
    config = workdir / "influxdb.conf"
    config.write_text(influxd_config(workdir, http_port, rpc_port))
    with (workdir / "influxd.log").open("wb") as log:
        process = subprocess.Popen([binary, "-config", str(config)], stdout=log, stderr=log, start_new_session=True)
        server = RunningInfluxd(f"http://127.0.0.1:{http_port}", database, workdir, process)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise InfluxError(f"influxd exited with {process.returncode}; see {workdir / 'influxd.log'}")
                try:
                    server._request("/ping", {})
                    break
                except (OSError, InfluxError):
                    if time.monotonic() > deadline:
                        raise InfluxError(f"influxd did not answer within {timeout}s") from None
                    time.sleep(0.1)
            server._request("/query", {"q": f'CREATE DATABASE "{database}"'}, b"")
            yield server
        finally:
            server.stop()


# --- VictoriaMetrics: a server that speaks the InfluxDB v2 write API (/api/v2/write) -----------------


def find_victoria_metrics() -> str | None:
    for candidate in ("victoria-metrics", "victoria-metrics-prod", "/usr/bin/victoria-metrics"):
        path = shutil.which(candidate)
        if path:
            return path
    return None


@dataclass
class RunningVictoriaMetrics:
    """A victoria-metrics process on a fixed loopback port; ``stop()`` and ``start()`` simulate an outage
    (the storage directory survives, the port stays the same)."""

    url: str
    port: int
    workdir: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 30.0) -> None:
        binary = find_victoria_metrics()
        if binary is None:
            raise InfluxError("victoria-metrics is not installed (apt-get install victoria-metrics)")
        with (self.workdir / "vm.log").open("ab") as log:
            self._process = subprocess.Popen(
                [binary, f"-storageDataPath={self.workdir}/data", f"-httpListenAddr=127.0.0.1:{self.port}",
                 "-retentionPeriod=100y", "-search.disableCache", "-loggerLevel=WARN"],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise InfluxError(f"victoria-metrics exited with {self._process.returncode}; see {self.workdir}/vm.log")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise InfluxError(f"victoria-metrics did not answer within {timeout}s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every series matching the selector (``{__name__="kpi_oee",tenant="acme"}``), after a flush."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30):
            pass
        query = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=30) as response:
            text = response.read().decode()
        return [json.loads(row) for row in text.splitlines() if row.strip()]


@contextmanager
def start_victoria_metrics(workdir: Path, timeout: float = 30.0) -> Iterator[RunningVictoriaMetrics]:
    """A fresh victoria-metrics on a free loopback port with its storage in ``workdir``; stopped on exit.

    Points written as InfluxDB line protocol become series named ``<measurement>_<field>``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RunningVictoriaMetrics(f"http://127.0.0.1:{port}", port, workdir)
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()
