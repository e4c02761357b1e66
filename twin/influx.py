"""The twin's time series: point builders for the measurements of ``forgeline.contract.timeseries``
(telemetry interval means, KPIs, channel scores, anomaly events, builds, units, the fleet summary and
the twin's own counters) on top of the shared writer :class:`forgeline.timeseries.TimeSeriesWriter`
(batches through influxdb-client's v2 write API, retry with backoff, disk spill replayed in order when
the database is back; see that module).

The ingest thread renders points to line protocol and queues them (cheap, never blocks); the writer's
own thread sends them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from forgeline.contract.topics import DeviceRef
from forgeline.timeseries import (
    InfluxSettings,
    TimeSeriesWriter,
    WriteRejected,
    WriterStats,
    escape_tag,
    field_string,
    line,
)
from forgeline.timeseries import finite as _float
from twin.config import InfluxConfig

if TYPE_CHECKING:
    from twin.ingest import Ingestor
    from twin.registry import Device
    from twin.service import TwinService

__all__ = ["KPI_FIELDS", "InfluxWriter", "WriteRejected", "WriterStats", "device_tags", "escape_tag", "field_string",
           "line", "settings_of"]


def device_tags(device: Device) -> dict[str, Any]:
    ref = device.ref
    return {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device,
            "technology": device.capabilities.get("technology")}


KPI_FIELDS = ("utilization", "availability", "effectiveness", "quality", "oee", "chamber_fill", "fill_realised",
              "anomaly_score")


def settings_of(config: InfluxConfig) -> InfluxSettings:
    """The shared writer's settings for the twin's ``influx`` config section (the v2 write API)."""
    return InfluxSettings(url=config.url, api="v2", bucket=config.bucket, org=config.org, token=config.token or None,
                          timeout_s=config.timeout_s, batch_size=config.batch_size,
                          flush_interval_s=config.flush_interval_s, max_retries=config.max_retries,
                          retry_interval_s=config.retry_interval_s, max_retry_delay_s=config.max_retry_delay_s,
                          spill_dir=config.spill_dir, max_spill_bytes=config.max_spill_bytes)


class InfluxWriter(TimeSeriesWriter):
    """The shared writer plus the twin's point builders; ``config`` keeps the twin's section (interval_s)."""

    def __init__(self, config: InfluxConfig, worker: str = "twin") -> None:
        super().__init__(settings_of(config), name="twin")
        self.config = config
        self.worker = worker

    # ---- point builders (ingest thread) ---------------------------------------------------------------

    def anomaly(self, ref: DeviceRef, device: Device, document: dict[str, Any]) -> None:
        tags = {**device_tags(device), "phase": document["phase"]}
        fields = {"score": float(document["score"]), "channels": ",".join(document.get("channels", [])),
                  "event_id": document.get("event_id", "")}
        self.add([line("anomaly", tags, fields, int(document["ts"] * 1e9))])

    def device_event(self, device: Device, document: dict[str, Any], ingestor: Ingestor) -> None:
        kind = document["type"]
        t_ns = int(document["ts"] * 1e9)
        if kind == "unit_produced":
            ref = device.ref
            tags = {"tenant": ref.tenant, "site": ref.site, "area": ref.area, "device": ref.device,
                    "product_model": document.get("product_model") or device.capabilities.get("product_model"),
                    "product_revision": document.get("product_revision")
                    or device.capabilities.get("product_revision")}
            fields = {"good": int(bool(document.get("good", True))), "cycle_time": _float(document.get("cycle_time")),
                      "serial": document.get("serial"), "defect": document.get("defect")}
            self.add([line("unit", tags, fields, t_ns)])
        elif kind in ("job_started", "job_finished", "job_aborted"):
            kpis = ingestor.core.kpis(device.index)
            parts = document.get("parts") or []
            tags = {**device_tags(device), "material": document.get("material"),
                    "phase": "start" if kind == "job_started" else "finish"}
            fields = {"job_id": document.get("job_id"), "chamber_fill": _float(kpis.get("chamber_fill")),
                      "packing_density": _float(kpis.get("packing_density")),
                      "build_height_mm": _float(document.get("build_height_mm")),
                      "parts": sum(int(p.get("quantity", 1)) for p in parts) if parts else None}
            self.add([line("build", tags, fields, t_ns)])

    def fleet(self, summary: dict[str, Any]) -> None:
        kpis = summary["kpis"]
        fields = {"devices": int(summary["devices"]), "online": int(summary["online"]),
                  "utilization": _float(kpis.get("utilization")), "oee": _float(kpis.get("oee")),
                  "chamber_fill": _float(kpis.get("chamber_fill")), "anomalous": len(summary["anomalous"])}
        self.add([line("fleet", {"tenant": summary["tenant"]}, fields, int(summary["ts"] * 1e9))])

    def interval(self, service: TwinService, now: float) -> None:
        """Per device: channel means since the last interval, KPIs, channel scores; the twin's own counters."""
        ingestor = service.ingestor
        means, counts = ingestor.take_interval_means()
        now_ns = int(now * 1e9)
        lines: list[str | None] = []
        owned = service.cluster.owned_indices() if service.cluster is not None else None
        indices = [d.index for d in ingestor.registry.devices.values() if owned is None or d.index in owned]
        rows = service.state.kpi_rows(indices) if indices else {}
        for index in indices:
            device = ingestor.registry.by_index[index]
            tags = device_tags(device)
            names = ingestor.core.channels(index)
            if counts.shape[0] > index and counts[index, : len(names)].any():
                newest = int(ingestor.last_t[index, : len(names)].max())
                channel_fields = {name: float(means[index, slot]) for slot, name in enumerate(names)
                                  if counts[index, slot] > 0}
                telemetry_tags = {**tags, "product_model": device.capabilities.get("product_model"),
                                  "product_revision": device.capabilities.get("product_revision")}
                lines.append(line("telemetry", telemetry_tags, channel_fields, newest * 1000))
            kpis = rows[index]
            state = kpis.get("state")
            fields: dict[str, Any] = {key: _float(kpis.get(key)) for key in KPI_FIELDS}
            fields["state"] = int(state) if state is not None and math.isfinite(state) else None
            fields["online"] = int(device.online)
            lines.append(line("kpi", tags, fields, now_ns))
            scores = ingestor.core.channel_scores(index)
            if scores:
                lines.append(line("channel_score", tags, {k: float(v) for k, v in scores.items()}, now_ns))
        counters = ingestor.counters
        lines.append(line("twin_ops", {"worker": self.worker}, {
            "samples": counters.samples_accepted, "messages": counters.messages,
            "dead_letters": sum(counters.dead_letters.values()), "lag_s": float(service.lag_s)}, now_ns))
        self.add(lines)

    def historical(self, ingestor: Ingestor, means: list[tuple[int, int, int, float]]) -> None:
        """Telemetry points of replayed data, one per device and past interval."""
        by_point: dict[tuple[int, int], dict[str, float]] = {}
        for index, slot, t_us, mean in means:
            names = ingestor.core.channels(index)
            if slot < len(names):
                by_point.setdefault((index, t_us), {})[names[slot]] = mean
        lines: list[str | None] = []
        for (index, t_us), fields in by_point.items():
            device = ingestor.registry.by_index[index]
            tags = {**device_tags(device), "product_model": device.capabilities.get("product_model"),
                    "product_revision": device.capabilities.get("product_revision")}
            lines.append(line("telemetry", tags, fields, t_us * 1000))
        self.add(lines)
