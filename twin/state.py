"""Twin state documents, per-tenant fleet summaries, anomaly events and the query API.

Everything here builds JSON documents (schemas ``twin_state``, ``fleet_summary``,
``anomaly_event``, ``api_response``) from the ingest's registry and the core; the service
publishes them. The query API answers from the latest twin state of every device (this worker's
own and, with several workers, the retained state the others publish), and only ever within the
tenant of the topic the request came in on: a request can name a device only as
``site/area/device`` inside that tenant, so no answer crosses tenants.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np

from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.contract.vocabulary import DeviceState
from twin.core import AnomalyEvent, FleetCore
from twin.ingest import Ingestor

KPI_KEYS = ("utilization", "availability", "effectiveness", "quality", "oee", "chamber_fill", "packing_density",
            "fill_realised", "anomaly_score")
ANOMALOUS_SCORE = 0.8
_KPI_COLUMNS = [FleetCore.KPI_COLUMNS.index(key) for key in KPI_KEYS]  # of the core's KPI table
_EFFECTIVENESS = KPI_KEYS.index("effectiveness")
_STATE = FleetCore.KPI_COLUMNS.index("state")
_NO_SAMPLE = int(np.iinfo(np.int64).min)  # ingest's last_t before a device's first sample


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ratio(value: Any) -> float | None:
    value = _finite(value)
    return None if value is None else min(max(value, 0.0), 1.0)


def state_name(code: float | None, online: bool) -> str:
    if not online:
        return "offline"
    if code is None or not math.isfinite(code):
        return "idle"  # no state sample yet: the machine reports nothing it is doing
    try:
        return DeviceState(int(code)).name.lower()
    except ValueError:
        return "idle"


class TwinState:
    """Builds the documents; keeps the latest twin state per device for the query API."""

    def __init__(self, ingestor: Ingestor, worker_id: str) -> None:
        self.ingestor = ingestor
        self.worker_id = worker_id
        self.latest: dict[str, dict[str, Any]] = {}  # device key -> twin state document
        self.lock = threading.Lock()
        self.active_anomalies: dict[str, str] = {}  # device key -> event id of the open event
        self._refs: dict[int, dict[str, str]] = {}  # device index -> its "device" part (never changes)

    # ---- twin state -----------------------------------------------------------------------------------

    def kpi_rows(self, indices: list[int]) -> dict[int, dict[str, float | None]]:
        """KPIs of the given devices, from one compiled pass (None where not defined)."""
        if not indices:
            return {}
        names = self.ingestor.core.KPI_COLUMNS
        rows = self.ingestor.core.kpi_table(indices).tolist()
        return {index: {name: _finite(value) for name, value in zip(names, values, strict=True)}
                for index, values in zip(indices, rows, strict=True)}

    def twin_documents(self, indices: list[int], now: float) -> list[dict[str, Any]]:
        """The twin state documents of the given devices, built together: one compiled pass over the
        core's KPIs and one copy of the latest values for all of them (at 3,000 twin states a second
        the documents cost more than ingesting the telemetry they describe when built one by one)."""
        if not indices:
            return []
        ingestor = self.ingestor
        core = ingestor.core
        rows = np.asarray(indices, dtype=np.int64)
        table = core.kpi_table(rows)
        kpi = table[:, _KPI_COLUMNS]
        kpi[~np.isfinite(kpi)] = np.nan
        effectiveness = np.maximum(kpi[:, _EFFECTIVENESS], 0.0)  # the only KPI that may exceed 1
        np.clip(kpi, 0.0, 1.0, out=kpi)
        kpi[:, _EFFECTIVENESS] = effectiveness
        states = table[:, _STATE].tolist()
        kpi_rows = kpi.tolist()
        newest = ingestor.last_t[rows].max(axis=1).tolist() if ingestor.last_t.shape[1] else [_NO_SAMPLE] * len(rows)
        latest = ingestor.last_value[rows].tolist()
        window_s = float(core.config.kpi_window_s)
        ts = round(now, 6)
        by_index = ingestor.registry.by_index
        refs = self._refs
        documents: list[dict[str, Any]] = []
        keys: list[str] = []
        for k, (index, values) in enumerate(zip(indices, kpi_rows, strict=True)):
            device = by_index[index]
            ref = refs.get(index)
            if ref is None:
                r = device.ref
                ref = refs[index] = {"tenant": r.tenant, "site": r.site, "area": r.area, "device": r.device}
            runtime = ingestor.runtime_of(device)
            sequences = runtime.sequences
            kpis: dict[str, float | None] = {key: (None if v != v else v)
                                             for key, v in zip(KPI_KEYS, values, strict=True)}
            kpis["window_s"] = window_s
            newest_t = newest[k]
            keys.append(device.key)
            online = device.online
            documents.append({
                "device": ref,
                "ts": ts,
                "online": online,
                "state": state_name(states[k], online),
                "capabilities": device.capabilities,
                # the row has a value per slot of the core's width, the device names its first few
                "reported": {name: (v if v - v == 0.0 else None)
                             for name, v in zip(core.channels(index), latest[k], strict=False)},
                "kpis": kpis,
                "job": runtime.job,
                "last_seq": sequences.last_seq,
                "epoch": sequences.current_epoch,
                "samples": runtime.samples,
                "gaps": sequences.gaps,
                "missing": sequences.missing,
                "duplicates": sequences.duplicates,
                "last_sample_ts": newest_t / 1e6 if newest_t > _NO_SAMPLE else None,
                "worker": self.worker_id,
            })
        with self.lock:
            self.latest.update(zip(keys, documents, strict=True))
        return documents

    def remember(self, key: str, document: dict[str, Any] | None) -> None:
        """Record a twin state another worker published (or its removal)."""
        with self.lock:
            if document is None:
                self.latest.pop(key, None)
            else:
                self.latest[key] = document

    # ---- fleet summary --------------------------------------------------------------------------------

    def fleet_summary(self, tenant: str, now: float) -> dict[str, Any]:
        with self.lock:
            docs = [d for k, d in self.latest.items() if k.split("/", 1)[0] == tenant]
        by_state: dict[str, int] = {}
        sums: dict[str, list[float]] = {k: [] for k in ("utilization", "availability", "oee", "chamber_fill",
                                                        "anomaly_score")}
        anomalous: list[str] = []
        for doc in docs:
            by_state[doc["state"]] = by_state.get(doc["state"], 0) + 1
            for key, values in sums.items():
                value = doc["kpis"].get(key)
                if value is not None:
                    values.append(float(value))
            score = doc["kpis"].get("anomaly_score")
            ref = doc["device"]
            if score is not None and score >= ANOMALOUS_SCORE:
                anomalous.append(f"{ref['site']}/{ref['area']}/{ref['device']}")
        kpis: dict[str, float | None] = {k: (sum(v) / len(v) if v else None) for k, v in sums.items()}
        kpis["anomaly_score"] = max(sums["anomaly_score"]) if sums["anomaly_score"] else None
        return {
            "tenant": tenant,
            "ts": round(now, 6),
            "devices": len(docs),
            "online": sum(1 for d in docs if d["online"]),
            "by_state": by_state,
            "kpis": kpis,
            "anomalous": sorted(anomalous),
        }

    def tenants(self) -> list[str]:
        with self.lock:
            return sorted({k.split("/", 1)[0] for k in self.latest})

    # ---- anomaly events -------------------------------------------------------------------------------

    def anomaly_document(self, event: AnomalyEvent) -> tuple[DeviceRef, dict[str, Any]]:
        device = self.ingestor.registry.by_index[event.device]
        if event.phase == "start":
            event_id = uuid.uuid4().hex[:16]
            self.active_anomalies[device.key] = event_id
        else:
            event_id = self.active_anomalies.pop(device.key, uuid.uuid4().hex[:16])
        document: dict[str, Any] = {
            "device": device.key,
            "ts": event.t_us / 1e6,
            "phase": event.phase,
            "score": _ratio(event.score) or 0.0,
            "channels": list(event.channels),
            "detector": self.ingestor.core.config.detector,
            "event_id": event_id,
        }
        for key in ("product_model", "product_revision"):
            value = device.capabilities.get(key)
            if topics.is_ident(value):
                document[key] = value
        return device.ref, document

    # ---- query API ------------------------------------------------------------------------------------

    def answer(self, tenant: str, method: str, payload: bytes) -> tuple[str | None, dict[str, Any]]:
        """Answer a request; returns ``(response topic, response document)``.

        The topic is None when the request is too broken to know where to answer (it is dead-lettered).
        """
        request = schemas.loads("api_request", payload)
        response_topic = topics.api_response_topic(tenant, request["client_id"])
        correlation_id = request["correlation_id"]
        if method == "get_twin":
            path = request.get("device")
            if not path:
                return response_topic, {"correlation_id": correlation_id, "ok": False,
                                        "error": "get_twin needs 'device': site/area/device"}
            try:
                key = DeviceRef(tenant, *path.split("/")).key if path.count("/") == 2 else None
            except (topics.TopicError, TypeError):
                key = None
            if key is None:
                return response_topic, {"correlation_id": correlation_id, "ok": False,
                                        "error": f"bad device {path!r}: expected site/area/device"}
            with self.lock:
                document = self.latest.get(key)
            if document is None:
                return response_topic, {"correlation_id": correlation_id, "ok": False,
                                        "error": f"unknown device {path!r} in tenant {tenant!r}"}
            return response_topic, {"correlation_id": correlation_id, "ok": True, "result": document}
        if method == "list_devices":
            with self.lock:
                docs = [d for k, d in sorted(self.latest.items()) if k.split("/", 1)[0] == tenant]
            result = [
                {
                    "device": f"{d['device']['site']}/{d['device']['area']}/{d['device']['device']}",
                    "online": d["online"],
                    "state": d["state"],
                    "technology": d.get("capabilities", {}).get("technology"),
                    "utilization": d["kpis"].get("utilization"),
                    "chamber_fill": d["kpis"].get("chamber_fill"),
                    "anomaly_score": d["kpis"].get("anomaly_score"),
                }
                for d in docs
            ]
            return response_topic, {"correlation_id": correlation_id, "ok": True, "result": result}
        return response_topic, {"correlation_id": correlation_id, "ok": False,
                                "error": f"unknown method {method!r}: use get_twin or list_devices"}

    def view(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows for a terminal view: device, state, utilization, chamber fill, anomaly score."""
        with self.lock:
            items = sorted(self.latest.items()) if keys is None else [(k, self.latest[k]) for k in keys
                                                                        if k in self.latest]
        return [
            {
                "device": key,
                "online": doc["online"],
                "state": doc["state"],
                "technology": doc.get("capabilities", {}).get("technology"),
                "utilization": doc["kpis"].get("utilization"),
                "oee": doc["kpis"].get("oee"),
                "chamber_fill": doc["kpis"].get("chamber_fill"),
                "anomaly_score": doc["kpis"].get("anomaly_score"),
                "samples": doc.get("samples", 0),
            }
            for key, doc in items
        ]
