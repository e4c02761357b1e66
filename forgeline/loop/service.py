"""The loop service: MQTT in (unit reports, anomaly events, birth messages, feedback), retained
insights out, dead letters for what cannot be used, optional InfluxDB output.

Threads: paho's network thread decodes, validates and files each message into the
:class:`~forgeline.loop.intake.LoopStore` (cheap); a publisher thread recomputes the comparison of every
model that changed since its last publication, every ``interval_s`` seconds, and publishes it retained
(QoS 1) on ``fl/v1/{tenant}/insights/{model}``. Statistics never run on the network thread, so a slow
comparison cannot stall intake.

Example (against a running broker)::

    service = LoopService(MqttSettings.from_url("mqtt://127.0.0.1:1883"), ServiceConfig(tenant="oven-maker"))
    service.start()
    ...
    service.stop()
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as paho

from forgeline.contract import schemas, topics
from forgeline.contract.topics import Kind
from forgeline.loop.compare import LoopConfig, monitor_model
from forgeline.loop.intake import IntakeError, LoopStore, ModelData, RevisionData
from forgeline.loop.timeseries_out import feedback_line, insight_lines
from forgeline.mqtt import MqttSettings, connect, subscribe_all
from forgeline.timeseries import InfluxSettings, TimeSeriesWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """``tenant`` is one tenant or ``+`` for all; ``state_file`` keeps what was accepted across restarts;
    ``influx`` (optional) writes feedback and insight points through the shared time-series writer, which
    retries and spills to ``influx.spill_dir`` while the database is unreachable."""

    tenant: str = "+"
    interval_s: float = 10.0
    loop: LoopConfig = field(default_factory=LoopConfig)
    state_file: Path | None = None
    influx: InfluxSettings | None = None
    client_id: str | None = None
    publish_timeout_s: float = 10.0
    state_interval_s: float = 60.0  # the state file grows with the units seen: written at most this often

    def __post_init__(self) -> None:
        if self.tenant != "+":
            topics.check_tenant(self.tenant)
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")


def fit_document(document: dict[str, Any], limit: int = schemas.MAX_JSON_PAYLOAD) -> dict[str, Any]:
    """Drop the least interesting unflagged comparisons (largest q first) until the JSON fits ``limit``.

    Flagged insights are never dropped; ``tests`` still counts every comparison made.
    """
    if len(schemas.dumps(document)) <= limit:
        return document
    kept = sorted(document["comparisons"], key=lambda c: (not c["flagged"], c["q_value"]))
    trimmed = dict(document)
    low, high = 0, len(kept)
    while low < high:  # the largest prefix that fits
        middle = (low + high + 1) // 2
        trimmed["comparisons"] = kept[:middle]
        if len(schemas.dumps(trimmed)) <= limit:
            low = middle
        else:
            high = middle - 1
    trimmed["comparisons"] = kept[:low]
    return trimmed


# Outcomes of LoopStore.ingest that change the store (and so go to the journal).
_STATE_CHANGING = frozenset({"unit", "feedback", "anomaly", "status"})


class LoopService:
    def __init__(self, settings: MqttSettings, config: ServiceConfig | None = None,
                 store: LoopStore | None = None) -> None:
        self.settings = settings
        self.config = config or ServiceConfig()
        self.store = store or self._load_state()
        self.influx = TimeSeriesWriter(self.config.influx, name="loop") if self.config.influx else None
        self.lock = threading.Lock()
        self.published_versions: dict[tuple[str, str], int] = {}
        self.counters = {"messages": 0, "dead_letters": 0, "published": 0, "publish_errors": 0}
        self.last_documents: dict[tuple[str, str], dict[str, Any]] = {}
        self._client: paho.Client | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_saved = time.monotonic()
        self._journal: TextIO | None = None

    # --- lifecycle ---

    @property
    def filters(self) -> list[str]:
        tenant = self.config.tenant
        return [topics.device_filter(Kind.EVENT, tenant), topics.device_filter(Kind.ANOMALY, tenant),
                topics.device_filter(Kind.STATUS, tenant), topics.feedback_filter(tenant)]

    def start(self) -> None:
        client = connect(self.settings, self.config.client_id)
        client.on_message = self._on_message
        subscribe_all(client, self.filters, what="loop service")
        self._client = client
        if self.influx is not None:
            self.influx.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loop-publisher", daemon=True)
        self._thread.start()
        log.info("loop service subscribed to %s", ", ".join(self.filters))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.publish_due()  # what arrived since the last round is not left unpublished
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self.influx is not None:
            self.influx.stop()  # writes what is queued, or spills it
        self.save_state()

    def __enter__(self) -> LoopService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.publish_due()
            except Exception:  # keep serving; the next round retries
                log.exception("loop publish round failed")

    # --- intake ---

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        self.handle(message.topic, bytes(message.payload))

    def handle(self, topic: str, payload: bytes) -> str:
        """File one message; unusable input becomes a dead letter with the reason."""
        with self.lock:
            self.counters["messages"] += 1
            try:
                document = self.store.decode(topic, payload)
                outcome = self.store.ingest_document(topic, document) if document is not None else "ignored"
            except IntakeError as exc:
                self._dead_letter(topic, payload, str(exc))
                return "rejected"
            if outcome in _STATE_CHANGING:
                self._journal_append(topic, payload)
            if outcome == "feedback" and self.influx is not None and document is not None:
                parsed = topics.parse(topic)
                assert parsed.tenant and parsed.model and parsed.revision
                self.influx.add([feedback_line(parsed.tenant, parsed.model, parsed.revision, document)])
            return outcome

    def _dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        self.counters["dead_letters"] += 1
        parts = topic.split("/")
        tenant = parts[2] if len(parts) > 2 else None
        letter = {"ts": time.time(), "topic": topic[:1024], "reason": reason[:2000], "size": len(payload),
                  "payload_head": base64.b64encode(payload[:256]).decode()}
        log.warning("dead letter from %s: %s", topic[:200], reason[:300])
        if self._client is not None:
            self._client.publish(topics.deadletter_topic(tenant), schemas.dumps(letter), qos=1)

    # --- output ---

    def publish_due(self) -> int:
        """Recompute and publish every model that changed since its last publication; returns how many."""
        with self.lock:
            due = [m for key, m in self.store.models.items() if self.published_versions.get(key) != m.version]
            work = [(m.tenant, m.model, m.version, _frozen(m)) for m in due]
        published = 0
        for tenant, model_name, version, model in work:
            document = fit_document(monitor_model(model, self.config.loop))
            with self.lock:
                # The decision of a look stands whether or not this publication gets through.
                live = self.store.models[(tenant, model_name)]
                live.look, live.standing = model.look, model.standing
            schemas.validate("insights", document)
            if self._publish(topics.insights_topic(tenant, model_name), schemas.dumps(document)):
                published += 1
                with self.lock:
                    self.published_versions[(tenant, model_name)] = version
                    self.last_documents[(tenant, model_name)] = document
                if self.influx is not None:
                    self.influx.add(insight_lines(tenant, document))
        if published and time.monotonic() - self._state_saved >= self.config.state_interval_s:
            self.save_state()
        return published

    def _publish(self, topic: str, payload: bytes) -> bool:
        if self._client is None:
            return False
        info = self._client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(self.config.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            log.warning("publishing %s failed: %s", topic, exc)
        if not info.is_published():
            self.counters["publish_errors"] += 1
            return False
        self.counters["published"] += 1
        return True

    # --- state ---

    # The state file is a snapshot written now and then; every message accepted since is appended to a
    # journal next to it (flushed per message), so a killed process loses nothing it acknowledged. Replaying
    # the journal is idempotent (units, feedback and anomalies are de-duplicated), which makes a crash
    # between writing the snapshot and emptying the journal harmless.

    @property
    def journal_file(self) -> Path | None:
        path = self.config.state_file
        return None if path is None else journal_path(path)

    def _journal_append(self, topic: str, payload: bytes) -> None:
        if self.journal_file is None:
            return
        if self._journal is None:
            self._journal = self.journal_file.open("a", encoding="utf-8")
        self._journal.write(json.dumps({"topic": topic, "payload": payload.decode("utf-8")}) + "\n")
        self._journal.flush()

    def _load_state(self) -> LoopStore:
        return load_state(self.config.state_file) if self.config.state_file is not None else LoopStore()

    def save_state(self) -> None:
        path = self.config.state_file
        if path is None:
            return
        with self.lock:
            text = json.dumps(self.store.snapshot(), separators=(",", ":"))
            temporary = path.with_suffix(path.suffix + ".tmp")
            temporary.write_text(text)
            os.replace(temporary, path)  # atomic: a crash leaves the old state or the new, never half
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            if self.journal_file is not None:
                self.journal_file.write_text("")  # everything in it is in the snapshot now
            self._state_saved = time.monotonic()


def journal_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".journal")


def load_state(state_file: Path) -> LoopStore:
    """The store a service with this state file had: the snapshot (if any) plus its journal replayed."""
    store = LoopStore.restore(json.loads(state_file.read_text())) if state_file.exists() else LoopStore()
    journal = journal_path(state_file)
    if journal.exists():
        replayed = 0
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                store.ingest(record["topic"], record["payload"].encode("utf-8"))
                replayed += 1
            except (ValueError, KeyError, TypeError, AttributeError, IntakeError):
                continue  # a line torn by a crash mid-write, or input the store refuses again
        log.info("replayed %d journaled messages from %s", replayed, journal)
    return store


def _frozen(model: ModelData) -> ModelData:
    """A copy of what the comparison reads (the revisions), so intake goes on while the publisher works."""
    copy = ModelData(model.tenant, model.model, version=model.version, look=model.look,
                     standing=list(model.standing))
    copy.revisions = {name: RevisionData.from_json(r.to_json()) for name, r in model.revisions.items()}
    return copy
