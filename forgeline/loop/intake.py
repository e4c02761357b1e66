"""Intake: validated unit, anomaly, status and feedback messages, linked to product model and revision.

:class:`LoopStore` takes raw MQTT messages (topic and payload bytes) or decoded documents and keeps,
per tenant and product model, what the revision comparison needs:

- **units** (``unit_produced`` events on device event topics): one record per serial. Every station
  that handles a unit may report it; the unit passed first time only if every report was ``good``.
  Re-delivered reports (QoS 1) are recognised by (serial, device) and counted once.
- **measurements and cycle times** carried by unit reports (``measurements: {channel: value}`` and
  ``cycle_time`` in seconds), kept in bounded, order-independent samples (see :class:`Sample`).
- **anomaly starts** (anomaly events of the twin), attributed to the revision the device was producing
  at the event's time (the event's own ``product_model``/``product_revision`` when present, else the
  device's production timeline learnt from unit reports, birth messages and tagged job starts).
- **feedback** on ``feedback/{model}/{revision}`` topics, checked against the serial's production record:
  feedback naming another model or revision than the one the serial was built as is rejected.

Anything that cannot be used raises :class:`IntakeError` with the reason; the service turns that into a
dead letter. Valid messages the loop has no use for (other event types) are accepted and ignored.

Example:
    >>> store = LoopStore()
    >>> store.ingest("fl/v1/acme/event/plant/line1/leak", b'{"type": "unit_produced", "ts": 1, "serial": "S1",'
    ...              b' "product_model": "MW-20", "product_revision": "A", "good": false, "defect": "door_leakage"}')
    'unit'
    >>> store.model("acme", "MW-20").revisions["A"].units, store.model("acme", "MW-20").revisions["A"].good
    (1, 0)
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from forgeline.contract import schemas, topics
from forgeline.contract.schemas import PayloadError
from forgeline.contract.topics import DeviceRef, Kind, TopicError
from forgeline.loop.kpis import NO_COMPLAINT

DEFAULT_SAMPLE_SIZE = 5000
_PARSE_CACHE = 65536
COMPLAINT_RATING = 2  # a rating at or below this is a complaint even without a category


# The topics the loop reads, and the schema of each (other topics are accepted and ignored).
_SCHEMA_OF_KIND = {
    Kind.EVENT.value: "event",
    Kind.ANOMALY.value: "anomaly_event",
    Kind.STATUS.value: "status",
    "feedback": "feedback",
}


_JOB_END = frozenset({"job_finished", "job_aborted"})


class IntakeError(ValueError):
    """A message the loop cannot use; the text says why (and becomes the dead letter's reason)."""


def _priority(serial: str, key: str) -> int:
    digest = hashlib.blake2b(f"{serial}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass
class Sample:
    """A bounded sample of one KPI's values: the ``capacity`` values with the smallest hash of their
    unit's serial (bottom-k sampling).

    Why this and not a reservoir: the kept set depends only on which units were seen, not on arrival
    order, so a re-delivered or replayed message never changes it, and a restored snapshot continues
    exactly. Below ``capacity`` it holds every value.
    """

    key: str
    capacity: int = DEFAULT_SAMPLE_SIZE
    seen: int = 0
    _heap: list[tuple[int, float]] = field(default_factory=list)  # (-priority, value), a max-heap

    def add(self, serial: str, value: float) -> None:
        if not math.isfinite(value):
            return
        self.seen += 1
        item = (-_priority(serial, self.key), value)
        if len(self._heap) < self.capacity:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:  # smaller priority than the largest kept
            heapq.heapreplace(self._heap, item)

    @property
    def values(self) -> list[float]:
        return [value for _, value in self._heap]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "capacity": self.capacity, "seen": self.seen, "heap": self._heap}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        sample = cls(data["key"], data["capacity"], data["seen"])
        sample._heap = [(int(p), float(v)) for p, v in data["heap"]]
        heapq.heapify(sample._heap)
        return sample


@dataclass
class RevisionData:
    """Everything the comparison needs about one revision of one model."""

    revision: str
    first_seen: float
    units: int = 0
    good: int = 0
    defects: Counter[str] = field(default_factory=Counter)  # defect -> units with that defect
    anomalies: Counter[str] = field(default_factory=Counter)  # channel -> anomaly starts
    samples: dict[str, Sample] = field(default_factory=dict)  # "cycle_time/<station>", "measurement/<ch>"
    feedback: int = 0
    ratings: Counter[int] = field(default_factory=Counter)
    fault_serials: set[str] = field(default_factory=set)
    complaint_serials: dict[str, set[str]] = field(default_factory=dict)  # category -> serials
    feedback_serials: set[str] = field(default_factory=set)

    def sample(self, key: str, capacity: int) -> Sample:
        if key not in self.samples:
            self.samples[key] = Sample(key, capacity)
        return self.samples[key]

    @property
    def complained_serials(self) -> set[str]:
        return set().union(*self.complaint_serials.values()) if self.complaint_serials else set()

    @property
    def field_exposure(self) -> int:
        """Units in the field for feedback rates: produced units, or the serials heard of if more (feedback
        may name units built before the loop started listening)."""
        return max(self.units, len(self.feedback_serials))

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision, "first_seen": self.first_seen, "units": self.units, "good": self.good,
            "defects": dict(self.defects), "anomalies": dict(self.anomalies),
            "samples": [s.to_json() for s in self.samples.values()], "feedback": self.feedback,
            "ratings": {str(k): v for k, v in self.ratings.items()}, "fault_serials": sorted(self.fault_serials),
            "complaint_serials": {k: sorted(v) for k, v in self.complaint_serials.items()},
            "feedback_serials": sorted(self.feedback_serials),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RevisionData:
        return cls(
            data["revision"], data["first_seen"], data["units"], data["good"], Counter(data["defects"]),
            Counter(data["anomalies"]), {s["key"]: Sample.from_json(s) for s in data["samples"]}, data["feedback"],
            Counter({int(k): v for k, v in data["ratings"].items()}), set(data["fault_serials"]),
            {k: set(v) for k, v in data["complaint_serials"].items()}, set(data["feedback_serials"]),
        )


@dataclass
class UnitRecord:
    revision: str
    good: bool
    defects: set[str]
    reporters: set[str]  # devices that reported this unit (re-deliveries are recognised by these)


@dataclass
class ModelData:
    """One product model of one tenant."""

    tenant: str
    model: str
    revisions: dict[str, RevisionData] = field(default_factory=dict)
    units: dict[str, UnitRecord] = field(default_factory=dict)  # serial -> production record
    seen_feedback: set[str] = field(default_factory=set)
    seen_anomalies: set[str] = field(default_factory=set)
    version: int = 0  # bumped on every change, so a service recomputes only models that changed
    look: int = 0  # monitoring: the last look at which flags were decided (see compare.monitor_model)
    standing: list[str] = field(default_factory=list)  # comparisons flagged at that look

    def revision(self, name: str, ts: float) -> RevisionData:
        data = self.revisions.get(name)
        if data is None:
            data = self.revisions[name] = RevisionData(name, ts)
        elif ts < data.first_seen:
            data.first_seen = ts
        return data

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "model": self.model, "version": self.version,
            "revisions": [r.to_json() for r in self.revisions.values()],
            "units": {s: [u.revision, u.good, sorted(u.defects), sorted(u.reporters)] for s, u in self.units.items()},
            "seen_feedback": sorted(self.seen_feedback), "seen_anomalies": sorted(self.seen_anomalies),
            "look": self.look, "standing": self.standing,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelData:
        model = cls(data["tenant"], data["model"], version=data["version"])
        model.revisions = {r["revision"]: RevisionData.from_json(r) for r in data["revisions"]}
        model.units = {s: UnitRecord(u[0], u[1], set(u[2]), set(u[3])) for s, u in data["units"].items()}
        model.seen_feedback = set(data["seen_feedback"])
        model.seen_anomalies = set(data["seen_anomalies"])
        model.look, model.standing = data.get("look", 0), list(data.get("standing", []))
        return model


@dataclass
class Timeline:
    """What one device produced when: sorted change points ``(ts, model, revision)``."""

    points: list[tuple[float, str, str]] = field(default_factory=list)

    def record(self, ts: float, model: str, revision: str) -> None:
        index = bisect.bisect_right(self.points, (ts, "\uffff", "\uffff"))
        if index and self.points[index - 1][1:] == (model, revision):
            return  # no change at this time
        self.points.insert(index, (ts, model, revision))
        # A later change point that repeats what is now in effect before it is redundant.
        if index + 1 < len(self.points) and self.points[index + 1][1:] == (model, revision):
            del self.points[index + 1]

    def at(self, ts: float) -> tuple[str, str] | None:
        index = bisect.bisect_right(self.points, (ts, "\uffff", "\uffff"))
        if index == 0:
            # Before the first known production: the first revision is the best guess only if the gap is
            # short; an anomaly long before any production is left unattributed.
            if self.points and self.points[0][0] - ts <= 3600:
                return self.points[0][1], self.points[0][2]
            return None
        return self.points[index - 1][1], self.points[index - 1][2]


@dataclass
class IntakeCounters:
    units: int = 0
    duplicates: int = 0
    anomalies: int = 0
    unattributed_anomalies: int = 0
    feedback: int = 0
    ignored: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class LoopStore:
    """In-memory store of everything the loop has accepted, per (tenant, model); snapshot/restore exact."""

    def __init__(self, sample_size: int = DEFAULT_SAMPLE_SIZE) -> None:
        self.sample_size = sample_size
        self.models: dict[tuple[str, str], ModelData] = {}
        self.timelines: dict[str, Timeline] = {}  # device key -> production timeline
        self.counters = IntakeCounters()
        self._parsed: dict[str, topics.ParsedTopic] = {}

    # --- access ---

    def model(self, tenant: str, model: str) -> ModelData:
        key = (tenant, model)
        if key not in self.models:
            self.models[key] = ModelData(tenant, model)
        return self.models[key]

    def find(self, model: str, tenant: str | None = None) -> list[ModelData]:
        return [m for (t, name), m in sorted(self.models.items()) if name == model and tenant in (None, t)]

    # --- raw messages ---

    def ingest(self, topic: str, payload: bytes | str) -> str:
        """Route one MQTT message by its topic; returns what it was (``unit``, ``feedback``, ``anomaly``,
        ``status``, ``ignored``, ``duplicate``, ``unattributed``). Raises :class:`IntakeError` for unusable
        input (the payload is parsed with size limits and validated against its schema first)."""
        document = self.decode(topic, payload)
        if document is None:
            return self._ignored()
        return self.ingest_document(topic, document)

    def decode(self, topic: str, payload: bytes | str) -> dict[str, Any] | None:
        """The validated document of a message the loop reads; ``None`` for topics it does not read and for
        cleared retained messages. Raises :class:`IntakeError` for a bad topic or payload."""
        schema = self._schema_of(topic)
        if schema is None or (schema == "status" and not payload):
            return None
        try:
            document = schemas.loads(schema, payload)
        except PayloadError as exc:
            raise self._reject(str(exc)) from None
        if not isinstance(document, dict):
            raise self._reject(f"{schema}: not a JSON object")
        return document

    def ingest_document(self, topic: str, document: dict[str, Any]) -> str:
        """Like :meth:`ingest` for a document that is already decoded AND validated against its schema."""
        parsed = self._parse(topic)
        if parsed.kind == Kind.EVENT.value and parsed.device is not None:
            return self.ingest_event(parsed.device, document)
        if parsed.kind == Kind.ANOMALY.value and parsed.device is not None:
            return self.ingest_anomaly(parsed.device, document)
        if parsed.kind == Kind.STATUS.value and parsed.device is not None:
            return self.ingest_status(parsed.device, document)
        if parsed.kind == "feedback" and parsed.tenant and parsed.model and parsed.revision:
            return self.ingest_feedback(parsed.tenant, parsed.model, parsed.revision, document)
        return self._ignored()

    def _parse(self, topic: str) -> topics.ParsedTopic:
        parsed = self._parsed.get(topic)
        if parsed is None:
            try:
                parsed = topics.parse(topic)
            except TopicError as exc:
                raise self._reject(f"topic: {exc}") from None
            if len(self._parsed) >= _PARSE_CACHE:
                self._parsed.clear()  # devices come and go; a full cache is rebuilt, not grown
            self._parsed[topic] = parsed
        return parsed

    def _schema_of(self, topic: str) -> str | None:
        return _SCHEMA_OF_KIND.get(self._parse(topic).kind)

    def ingest_all(self, messages: Iterable[tuple[str, bytes | str]]) -> Counter[str]:
        """Ingest many messages; returns how many of each outcome (``rejected`` for IntakeErrors)."""
        outcome: Counter[str] = Counter()
        for topic, payload in messages:
            try:
                outcome[self.ingest(topic, payload)] += 1
            except IntakeError:
                outcome["rejected"] += 1
        return outcome

    # --- decoded documents ---

    def ingest_event(self, device: DeviceRef, event: dict[str, Any]) -> str:
        if event["type"] == "job_started":
            return self._job_started(device, event)
        if event["type"] in _JOB_END and event.get("product_model") and event.get("product_revision"):
            # A print job tagged with its process profile (model) and profile version (revision) is a
            # "unit" of that profile: a finished job is good unless it says otherwise, an aborted one failed.
            aborted = event["type"] == "job_aborted"
            event = {**event, "serial": event.get("serial") or event.get("job_id"),
                     "good": bool(event.get("good", True)) and not aborted,
                     "defect": event.get("defect") or ("aborted" if aborted else None)}
        elif event["type"] != "unit_produced":
            return self._ignored()
        ts = float(event["ts"])
        serial = event.get("serial")
        if not serial:
            raise self._reject("unit_produced without a serial cannot be linked to feedback")
        model_name = event.get("product_model")
        revision_name = event.get("product_revision")
        if not model_name or not revision_name:
            known = self._timeline(device).at(ts)
            if known is None:
                raise self._reject(f"unit {serial}: no product_model/product_revision and none known for "
                                   f"{device.key}")
            model_name, revision_name = model_name or known[0], revision_name or known[1]
        self._check_name(model_name, "product_model")
        self._check_name(revision_name, "product_revision")
        model = self.model(device.tenant, model_name)
        self._check_serial_model(device.tenant, model_name, serial)
        self._timeline(device).record(ts, model_name, revision_name)
        unit = model.units.get(serial)
        if unit is not None and unit.revision != revision_name:
            raise self._reject(f"unit {serial} was reported as revision {unit.revision!r} before, now "
                               f"{revision_name!r}")
        if unit is not None and device.key in unit.reporters:
            self.counters.duplicates += 1
            return "duplicate"
        revision = model.revision(revision_name, ts)
        good = bool(event.get("good", True))
        defect = event.get("defect") or None
        if not good and defect is None:
            defect = "unspecified"
        if unit is None:
            unit = model.units[serial] = UnitRecord(revision_name, True, set(), set())
            revision.units += 1
            revision.good += 1
        unit.reporters.add(device.key)
        if not good and unit.good:
            unit.good = False
            revision.good -= 1
        if defect and defect not in unit.defects:
            unit.defects.add(defect)
            revision.defects[defect] += 1
        cycle_time = event.get("cycle_time")
        if isinstance(cycle_time, int | float) and not isinstance(cycle_time, bool):
            revision.sample(f"cycle_time/{device.device}", self.sample_size).add(serial, float(cycle_time))
        measurements = event.get("measurements")
        if isinstance(measurements, dict):
            for channel, value in measurements.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    revision.sample(f"measurement/{channel}", self.sample_size).add(serial, float(value))
        model.version += 1
        self.counters.units += 1
        return "unit"

    def _job_started(self, device: DeviceRef, event: dict[str, Any]) -> str:
        """A job tagged with its process profile version says what the printer produces from now on, as a
        line station's birth does: anomalies during the job are attributed to that version."""
        model_name, revision_name = event.get("product_model"), event.get("product_revision")
        if not model_name or not revision_name:
            return self._ignored()
        self._check_name(model_name, "product_model")
        self._check_name(revision_name, "product_revision")
        self._timeline(device).record(float(event["ts"]), model_name, revision_name)
        return "status"

    def ingest_status(self, device: DeviceRef, status: dict[str, Any]) -> str:
        model_name, revision_name = status.get("product_model"), status.get("product_revision")
        if status.get("status") != "online" or not model_name or not revision_name:
            return self._ignored()
        self._check_name(model_name, "product_model")
        self._check_name(revision_name, "product_revision")
        self._timeline(device).record(float(status["ts"]), model_name, revision_name)
        return "status"

    def ingest_anomaly(self, device: DeviceRef, event: dict[str, Any]) -> str:
        if event["device"] != device.key:
            raise self._reject(f"anomaly event names device {event['device']!r} but came on {device.key}'s topic")
        if event["phase"] != "start":
            return self._ignored()  # rates count starts; an end closes what was counted
        ts = float(event["ts"])
        model_name, revision_name = event.get("product_model"), event.get("product_revision")
        if not model_name or not revision_name:
            known = self._timeline(device).at(ts)
            if known is None:
                # Valid, but not attributable to a revision: counted, so the loss is visible.
                self.counters.unattributed_anomalies += 1
                return "unattributed"
            model_name, revision_name = known
        model = self.model(device.tenant, model_name)
        identity = event.get("event_id") or f"{device.key}@{ts!r}"
        if identity in model.seen_anomalies:
            self.counters.duplicates += 1
            return "duplicate"
        model.seen_anomalies.add(identity)
        revision = model.revision(revision_name, ts)
        for channel in set(event.get("channels") or ["unknown"]):
            revision.anomalies[channel] += 1
        model.version += 1
        self.counters.anomalies += 1
        return "anomaly"

    def ingest_feedback(self, tenant: str, model_name: str, revision_name: str, feedback: dict[str, Any]) -> str:
        serial = feedback["serial"]
        self._check_serial_model(tenant, model_name, serial)
        model = self.model(tenant, model_name)
        unit = model.units.get(serial)
        if unit is not None and unit.revision != revision_name:
            raise self._reject(f"feedback for serial {serial} names revision {revision_name!r}, but the unit was "
                               f"built as revision {unit.revision!r}")
        identity = hashlib.blake2b(schemas.dumps(feedback), digest_size=12).hexdigest()
        if identity in model.seen_feedback:
            self.counters.duplicates += 1
            return "duplicate"
        model.seen_feedback.add(identity)
        revision = model.revision(revision_name, float(feedback["ts"]))
        revision.feedback += 1
        revision.feedback_serials.add(serial)
        rating = feedback.get("rating")
        if rating is not None:
            revision.ratings[int(rating)] += 1
        if feedback.get("fault"):
            revision.fault_serials.add(serial)
        category = feedback.get("category")
        if category == NO_COMPLAINT:
            category = None
        if category is None and rating is not None and rating <= COMPLAINT_RATING:
            category = "other"
        if category is not None:
            revision.complaint_serials.setdefault(category, set()).add(serial)
        model.version += 1
        self.counters.feedback += 1
        return "feedback"

    # --- helpers ---

    def _timeline(self, device: DeviceRef) -> Timeline:
        if device.key not in self.timelines:
            self.timelines[device.key] = Timeline()
        return self.timelines[device.key]

    def _check_serial_model(self, tenant: str, model_name: str, serial: str) -> None:
        for (other_tenant, other_model), data in self.models.items():
            if other_tenant == tenant and other_model != model_name and serial in data.units:
                raise self._reject(f"serial {serial} was built as model {other_model!r}, not {model_name!r}")

    def _check_name(self, value: Any, what: str) -> None:
        try:
            topics.check_ident(value, what)
        except TopicError as exc:
            raise self._reject(str(exc)) from None

    def _reject(self, reason: str) -> IntakeError:
        self.counters.rejected += 1
        return IntakeError(reason)

    def _ignored(self) -> str:
        self.counters.ignored += 1
        return "ignored"

    def __iter__(self) -> Iterator[ModelData]:
        return iter(self.models.values())

    # --- state ---

    def snapshot(self) -> dict[str, Any]:
        """Everything accepted, as JSON-ready data; ``restore(snapshot())`` changes no comparison."""
        return {
            "version": 1, "sample_size": self.sample_size,
            "models": [m.to_json() for m in self.models.values()],
            "timelines": {k: t.points for k, t in self.timelines.items()},
            "counters": self.counters.as_dict(),
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> LoopStore:
        if data.get("version") != 1:
            raise ValueError(f"unknown loop snapshot version {data.get('version')!r}")
        store = cls(data["sample_size"])
        for raw in data["models"]:
            model = ModelData.from_json(raw)
            store.models[(model.tenant, model.model)] = model
        store.timelines = {k: Timeline([(float(t), m, r) for t, m, r in v]) for k, v in data["timelines"].items()}
        store.counters = IntakeCounters(**data["counters"])
        return store
