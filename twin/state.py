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
from twin.core import AnomalyEvent
from twin.ingest import Ingestor

KPI_KEYS = ("utilization", "availability", "effectiveness", "quality", "oee", "chamber_fill", "packing_density",
            "fill_realised", "anomaly_score")
ANOMALOUS_SCORE = 0.8
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

    # ---- twin state -----------------------------------------------------------------------------------

    def kpi_rows(self, indices: list[int]) -> dict[int, dict[str, float | None]]:
        """KPIs of the given devices (vectorised over the fleet when many are asked for)."""
        core = self.ingestor.core
        rows: dict[int, dict[str, float | None]] = {}
        if len(indices) > 32:
            # plain lists: indexing a numpy array element by element costs more than the KPIs
            table = {k: v.tolist() for k, v in core.kpis_all().items()}
            for index in indices:
                rows[index] = {k: _finite(v[index]) for k, v in table.items()}
        else:
            for index in indices:
                rows[index] = core.kpis(index)
        return rows

    def twin_document(self, index: int, kpis: dict[str, float | None], now: float) -> dict[str, Any]:
        device = self.ingestor.registry.by_index[index]
        runtime = self.ingestor.runtime_of(device)
        sequences = runtime.sequences
        last_t = self.ingestor.last_t[index]
        newest = int(last_t.max()) if last_t.shape[0] else _NO_SAMPLE
        document: dict[str, Any] = {
            "device": {"tenant": device.ref.tenant, "site": device.ref.site, "area": device.ref.area,
                       "device": device.ref.device},
            "ts": round(now, 6),
            "online": device.online,
            "state": state_name(kpis.get("state"), device.online),
            "capabilities": device.capabilities,
            "reported": self.ingestor.reported(index),
            "kpis": {
                **{k: (_finite(kpis.get(k)) if k == "effectiveness" else _ratio(kpis.get(k))) for k in KPI_KEYS},
                "window_s": float(self.ingestor.core.config.kpi_window_s),
            },
            "job": runtime.job,
            "last_seq": sequences.last_seq,
            "epoch": sequences.current_epoch,
            "samples": runtime.samples,
            "gaps": sequences.gaps,
            "missing": sequences.missing,
            "duplicates": sequences.duplicates,
            "last_sample_ts": newest / 1e6 if newest > _NO_SAMPLE else None,
            "worker": self.worker_id,
        }
        if document["kpis"]["oee"] is not None:
            document["kpis"]["oee"] = max(document["kpis"]["oee"], 0.0)
        if document["kpis"]["effectiveness"] is not None:
            document["kpis"]["effectiveness"] = max(document["kpis"]["effectiveness"], 0.0)
        with self.lock:
            self.latest[device.key] = document
        return document

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
