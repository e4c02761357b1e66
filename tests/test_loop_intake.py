"""Intake: unit reports, anomaly events and feedback are validated, linked to model and revision,
de-duplicated, and survive a snapshot exactly; unusable input raises IntakeError with the reason."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.contract import schemas, topics
from forgeline.contract.topics import DeviceRef
from forgeline.loop.compare import compare_model
from forgeline.loop.intake import IntakeError, LoopStore, Sample, _priority
from forgeline.loop.simulate import RevisionProfile, simulate_line

LEAK = DeviceRef("acme", "plant1", "line1", "leak")
POWER = DeviceRef("acme", "plant1", "line1", "power")


def unit(serial: str, revision: str = "A", *, ts: float = 100.0, good: bool = True, **extra: object) -> bytes:
    event = {"type": "unit_produced", "ts": ts, "serial": serial, "product_model": "MW-20",
             "product_revision": revision, "good": good, **extra}
    return json.dumps(event).encode()


def feedback(serial: str, **extra: object) -> bytes:
    return json.dumps({"ts": 200.0, "serial": serial, **extra}).encode()


def test_reports_of_one_unit_from_several_stations_merge_into_one_unit() -> None:
    store = LoopStore()
    store.ingest(POWER.event_topic, unit("S1", measurements={"magnetron_power": 801.5}, cycle_time=65.0))
    store.ingest(LEAK.event_topic, unit("S1", good=False, defect="door_leakage", measurements={"door_leakage": 1.4}))
    store.ingest(POWER.event_topic, unit("S2"))
    # QoS 1 re-delivery of the same report is counted once.
    assert store.ingest(LEAK.event_topic, unit("S1", good=False, defect="door_leakage")) == "duplicate"
    revision = store.model("acme", "MW-20").revisions["A"]
    assert (revision.units, revision.good, dict(revision.defects)) == (2, 1, {"door_leakage": 1})
    assert revision.samples["measurement/door_leakage"].values == [1.4]
    assert revision.samples["cycle_time/power"].values == [65.0]
    assert store.counters.duplicates == 1 and store.counters.units == 3


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (LEAK.event_topic, b"{not json", "not valid JSON"),
        (LEAK.event_topic, b'{"type": "unit_produced"}', "'ts' is a required property"),
        (LEAK.event_topic, json.dumps({"type": "unit_produced", "ts": 1}).encode(), "without a serial"),
        (LEAK.event_topic, json.dumps({"type": "unit_produced", "ts": 1, "serial": "X"}).encode(),
         "no product_model"),
        (LEAK.event_topic, unit("S9", measurements={"door_leakage": "high"}), "measurements/door_leakage"),
        (LEAK.event_topic, b"x" * (schemas.MAX_JSON_PAYLOAD + 1), "exceeds"),
        ("fl/v1/acme/nosuch/a/b/c", b"{}", "topic"),
        (topics.feedback_topic("acme", "MW-20", "A"), feedback("S1", rating=9), "rating"),
        (topics.feedback_topic("acme", "MW-20", "A"), b'{"ts": NaN, "serial": "S1"}', "NaN is not a JSON value"),
        (LEAK.anomaly_topic, json.dumps({"device": POWER.key, "ts": 1, "phase": "start", "score": 1}).encode(),
         "came on"),
    ],
)
def test_unusable_input_is_rejected_with_the_reason(topic: str, payload: bytes, reason: str) -> None:
    store = LoopStore()
    with pytest.raises(IntakeError, match=reason):
        store.ingest(topic, payload)
    assert store.counters.rejected == 1


def test_events_of_other_types_and_cleared_status_are_ignored_not_rejected() -> None:
    store = LoopStore()
    assert store.ingest(LEAK.event_topic, b'{"type": "alarm", "ts": 1, "message": "door open"}') == "ignored"
    assert store.ingest(LEAK.status_topic, b"") == "ignored"
    assert store.ingest(topics.fleet_topic("acme"), b"{}") == "ignored"
    assert store.counters.rejected == 0


def test_unit_without_revision_takes_the_one_the_station_announced() -> None:
    store = LoopStore()
    birth = {"status": "online", "ts": 10, "technology": "line", "channels": [], "product_model": "MW-20",
             "product_revision": "C"}
    assert store.ingest(LEAK.status_topic, json.dumps(birth).encode()) == "status"
    bare_unit = b'{"type": "unit_produced", "ts": 20, "serial": "S7", "good": true}'
    assert store.ingest(LEAK.event_topic, bare_unit) == "unit"
    assert store.model("acme", "MW-20").revisions["C"].units == 1


def test_print_jobs_tagged_with_a_process_profile_version_count_as_units_of_it() -> None:
    printer = DeviceRef("factory1", "site", "cell", "sls-3")

    def job(kind: str, job_id: str, **extra: object) -> bytes:
        return json.dumps({"type": kind, "ts": 50.0, "job_id": job_id, "material": "PA12",
                           "product_model": "PA12-standard", "product_revision": "v7", **extra}).encode()

    store = LoopStore()
    outcomes = [store.ingest(printer.event_topic, payload) for payload in [
        job("job_finished", "J1"), job("job_aborted", "J2"), job("job_finished", "J3", good=False, defect="warp"),
        job("job_started", "J4")]]
    assert outcomes == ["unit", "unit", "unit", "status"]  # a job start is a change point of the timeline
    revision = store.model("factory1", "PA12-standard").revisions["v7"]
    assert (revision.units, revision.good, dict(revision.defects)) == (3, 1, {"aborted": 1, "warp": 1})


def test_printer_anomalies_during_a_job_count_for_its_profile_version() -> None:
    printer = DeviceRef("factory1", "site", "cell", "fdm-2")
    store = LoopStore()

    def started(ts: float, revision: str) -> bytes:
        return json.dumps({"type": "job_started", "ts": ts, "job_id": f"J{ts:g}", "material": "PLA",
                           "product_model": "PLA-standard", "product_revision": revision}).encode()

    def anomaly(ts: float) -> bytes:
        return json.dumps({"device": printer.key, "ts": ts, "phase": "start", "score": 0.9,
                           "channels": ["nozzle_temp"], "event_id": f"e{ts:g}"}).encode()

    assert store.ingest(printer.event_topic, started(100.0, "1")) == "status"
    assert store.ingest(printer.event_topic, started(500.0, "2")) == "status"
    assert store.ingest(printer.anomaly_topic, anomaly(300.0)) == "anomaly"
    assert store.ingest(printer.anomaly_topic, anomaly(600.0)) == "anomaly"
    assert store.ingest(printer.event_topic, b'{"type": "job_started", "ts": 700, "job_id": "J9"}') == "ignored"
    revisions = store.model("factory1", "PLA-standard").revisions
    assert {name: dict(data.anomalies) for name, data in revisions.items()} == {
        "1": {"nozzle_temp": 1}, "2": {"nozzle_temp": 1}}


def test_feedback_is_linked_to_the_serial_production_record() -> None:
    store = LoopStore()
    store.ingest(LEAK.event_topic, unit("S1", "A"))
    store.ingest(LEAK.event_topic, unit("S2", "B"))
    assert store.ingest(topics.feedback_topic("acme", "MW-20", "A"), feedback("S1", rating=2)) == "feedback"
    with pytest.raises(IntakeError, match="built as revision 'B'"):
        store.ingest(topics.feedback_topic("acme", "MW-20", "A"), feedback("S2", rating=5))
    with pytest.raises(IntakeError, match="built as model 'MW-20'"):
        store.ingest(topics.feedback_topic("acme", "MW-30", "A"), feedback("S1", rating=5))
    # The same message twice (re-delivery) counts once; a unit never seen in production is still accepted.
    assert store.ingest(topics.feedback_topic("acme", "MW-20", "A"), feedback("S1", rating=2)) == "duplicate"
    assert store.ingest(topics.feedback_topic("acme", "MW-20", "A"),
                        feedback("OLD-1", fault=True, category="heating")) == "feedback"
    revision = store.model("acme", "MW-20").revisions["A"]
    assert revision.feedback == 2 and dict(revision.ratings) == {2: 1}
    assert revision.complaint_serials == {"other": {"S1"}, "heating": {"OLD-1"}}  # rating 2 is a complaint
    assert revision.fault_serials == {"OLD-1"}
    assert revision.field_exposure == 2  # one produced unit, two serials heard of
    # Tenants are separate: the same serial in another tenant is another unit.
    other = topics.feedback_topic("other", "MW-30", "A")
    assert store.ingest(other, feedback("S1", rating=4)) == "feedback"


def test_anomalies_are_attributed_through_the_station_timeline_across_a_changeover() -> None:
    store = LoopStore()
    store.ingest(POWER.event_topic, unit("S1", "A", ts=100.0))
    store.ingest(POWER.event_topic, unit("S2", "B", ts=200.0))

    def anomaly(ts: float, phase: str = "start", **extra: object) -> bytes:
        return json.dumps({"device": POWER.key, "ts": ts, "phase": phase, "score": 0.9,
                           "channels": ["cavity_temp_rise"], **extra}).encode()

    assert store.ingest(POWER.anomaly_topic, anomaly(150.0, event_id="e1")) == "anomaly"
    assert store.ingest(POWER.anomaly_topic, anomaly(250.0, event_id="e2")) == "anomaly"
    assert store.ingest(POWER.anomaly_topic, anomaly(250.0, event_id="e2")) == "duplicate"
    assert store.ingest(POWER.anomaly_topic, anomaly(260.0, phase="end", event_id="e2")) == "ignored"
    # The twin may name the revision itself; that wins over the timeline.
    assert store.ingest(POWER.anomaly_topic, anomaly(260.0, product_model="MW-20", product_revision="A")) == "anomaly"
    # Long before any known production on that station: counted as unattributed, not guessed.
    assert store.ingest(POWER.anomaly_topic, anomaly(-1e6)) == "unattributed"
    model = store.model("acme", "MW-20")
    assert model.revisions["A"].anomalies["cavity_temp_rise"] == 2
    assert model.revisions["B"].anomalies["cavity_temp_rise"] == 1
    assert store.counters.unattributed_anomalies == 1


def test_snapshot_restore_is_exact_and_json_safe() -> None:
    store = LoopStore(sample_size=200)
    messages = simulate_line("acme", "MW-20", [RevisionProfile("A", units=150), RevisionProfile("B", units=150)],
                             seed=5)
    store.ingest_all(m.wire() for m in messages[: len(messages) // 2])
    restored = LoopStore.restore(json.loads(json.dumps(store.snapshot())))
    for target in (store, restored):
        target.ingest_all(m.wire() for m in messages[len(messages) // 2 :])
    assert compare_model(restored.model("acme", "MW-20"), ts=0) == compare_model(store.model("acme", "MW-20"), ts=0)
    assert restored.snapshot() == store.snapshot()
    with pytest.raises(ValueError, match="version"):
        LoopStore.restore({"version": 99})


@given(st.lists(st.tuples(st.text(min_size=1, max_size=6), st.floats(-1e6, 1e6)), max_size=60,
                unique_by=lambda t: t[0]), st.integers(1, 20), st.randoms(use_true_random=False))
@settings(max_examples=100, deadline=None)
def test_sample_keeps_the_k_smallest_priorities_whatever_the_order(
    items: list[tuple[str, float]], capacity: int, rnd: random.Random
) -> None:
    reference = sorted(items, key=lambda item: _priority(item[0], "k"))[:capacity]
    shuffled = list(items)
    rnd.shuffle(shuffled)
    sample = Sample("k", capacity)
    for serial, value in shuffled:
        sample.add(serial, value)
    assert sorted(sample.values) == sorted(v for _, v in reference)
    assert sample.seen == len(items)


def test_sample_ignores_nan_and_inf() -> None:
    sample = Sample("k", 10)
    for serial, value in [("a", float("nan")), ("b", float("inf")), ("c", 1.0)]:
        sample.add(serial, value)
    assert sample.values == [1.0] and sample.seen == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
VALID = {
    LEAK.event_topic: {"type": "unit_produced", "ts": 10.0, "serial": "S1", "product_model": "MW-20",
                       "product_revision": "A", "good": False, "defect": "door_leakage", "cycle_time": 18.0,
                       "measurements": {"door_leakage": 1.2}},
    POWER.anomaly_topic: {"device": POWER.key, "ts": 11.0, "phase": "start", "score": 0.9,
                          "channels": ["cavity_temp_rise"], "event_id": "e1"},
    POWER.status_topic: {"status": "online", "ts": 1.0, "technology": "line", "channels": [],
                         "product_model": "MW-20", "product_revision": "A"},
    topics.feedback_topic("acme", "MW-20", "A"): {"ts": 20.0, "serial": "S1", "rating": 3, "category": "door",
                                                  "fault": True, "source": "service"},
}


@given(st.sampled_from(sorted(VALID)), st.data())
@settings(max_examples=300, deadline=None)
def test_near_valid_input_is_accepted_or_rejected_never_crashes(topic: str, data: st.DataObject) -> None:
    """Mutate one field of a valid message (or drop it): the store either files it or raises IntakeError,
    and what it accepted before stays."""
    store = LoopStore()
    store.ingest(LEAK.event_topic, json.dumps(VALID[LEAK.event_topic]).encode())
    before = store.model("acme", "MW-20").revisions["A"].units
    document = dict(VALID[topic])
    key = data.draw(st.sampled_from(sorted(document)))
    if data.draw(st.booleans()):
        del document[key]
    else:
        document[key] = data.draw(json_values)
    try:
        outcome = store.ingest(topic, json.dumps(document).encode())
    except IntakeError as exc:
        assert str(exc)
        outcome = "rejected"
    assert outcome in {"unit", "feedback", "anomaly", "status", "ignored", "duplicate", "unattributed",
                       "rejected"}
    assert store.model("acme", "MW-20").revisions["A"].units >= before
    json.dumps(store.snapshot(), allow_nan=False)  # nothing non-finite got into the state
    for model in store:
        compare_model(model, ts=0.0)  # and the comparison still runs on it
