"""Scale-out: several twin workers share the input through an MQTT shared subscription, and every
device's stream is processed by exactly one of them.

Why not the shared subscription alone: Mosquitto hands the messages of ``$share/group/...`` to the
group's members round-robin, message by message, so one device's batches would be spread over all
workers and no worker could keep its windows, baselines and sequence numbers. Two ways to keep a
device on one worker, chosen with ``affinity`` in the configuration:

``handoff`` (default; works on any MQTT 5 broker, Mosquitto included)
    Every worker knows the live members of its group from retained membership messages
    (``fl/v1/_sys/twin/worker/{id}``, cleared by each worker's last will when it dies). The owner
    of a device is chosen by rendezvous hashing of the device key over the live members, so every
    worker computes the same owner without talking to the others, and when a member joins or dies
    only the devices it gains or loses move. A worker that receives a message for a device it
    does not own publishes it unchanged to the owner's hand-off topic
    (``fl/v1/_sys/twin/handoff/{owner}``, the original topic in the MQTT 5 user property
    ``fl-topic``). Cost: with N workers, (N-1)/N of the input crosses the broker twice.

``broker`` (an MQTT cluster that keeps a topic on one member: EMQX with
``shared_subscription_strategy = hash_topic``)
    The broker already delivers each device topic to one worker (the hash of the topic picks the
    member), so a worker processes whatever it receives and owns the devices it has received.
    When a member leaves, EMQX re-hashes over the remaining ones and the devices move with no
    hand-off traffic.

Hand-over: when a worker becomes the owner of a device another worker processed before, it
continues the device's sequence numbers and counters from the previous owner's retained twin
state (``epoch``, ``last_seq``, ``samples``), so replayed or duplicate batches are still dropped
and nothing is counted twice. The KPI windows and anomaly baselines of that device start over on
the new owner (a documented bound; the previous owner's snapshot is per worker).

Every worker registers every device from the (retained, small) birth messages, so it can take
over any device at once; twin state, fleet summaries (owner of ``fleet:{tenant}``) and time series
are published only by the owner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forgeline.contract import schemas, topics
from forgeline.contract.topics import TopicError
from twin.sequence import DeviceSequences

if TYPE_CHECKING:
    from twin.service import TwinService

log = logging.getLogger(__name__)

TOPIC_PROPERTY = "fl-topic"


def rendezvous_owner(key: str, members: list[str]) -> str:
    """The member with the highest hash of (member, key): the same answer on every worker.

    >>> rendezvous_owner("acme/s/a/p1", ["w1", "w2"]) in ("w1", "w2")
    True
    >>> rendezvous_owner("acme/s/a/p1", ["w1"])
    'w1'
    """
    best, best_score = members[0], b""
    for member in members:
        score = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
        if score > best_score:
            best, best_score = member, score
    return best


class Membership:
    """Live members, device ownership, hand-off; plugged into :class:`TwinService` as ``service.cluster``."""

    def __init__(self, service: TwinService, affinity: str | None = None) -> None:
        self.service = service
        self.me = service.worker_id
        self.group = service.config.share_group or "twin"
        self.affinity = affinity or service.config.affinity
        self.members: set[str] = {self.me}
        self._sorted = [self.me]
        self._owner_cache: dict[str, str] = {}
        self.owned: set[str] = set()  # device keys this worker has processed as owner
        self.handed_off = 0
        self.received_handoffs = 0
        self.takeovers = 0
        self._last_heartbeat = 0.0
        self._client: paho.Client | None = None

    # ---- MQTT plumbing ----------------------------------------------------------------------------

    def _membership_payload(self) -> bytes:
        return schemas.dumps({"worker": self.me, "ts": round(time.time(), 3), "group": self.group,
                              "affinity": self.affinity})

    def configure_client(self, client: paho.Client) -> None:
        # If this worker dies, the broker clears its membership (empty retained message).
        client.will_set(topics.twin_worker_topic(self.me), b"", qos=1, retain=True)

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(topics.twin_workers_filter(), 1), (topics.twin_handoff_topic(self.me), 1)]

    def on_connect(self, client: paho.Client) -> None:
        self._client = client
        client.publish(topics.twin_worker_topic(self.me), self._membership_payload(), qos=1, retain=True)

    def leave(self, client: paho.Client) -> None:
        info = client.publish(topics.twin_worker_topic(self.me), b"", qos=1, retain=True)
        try:
            info.wait_for_publish(5)
        except (RuntimeError, ValueError):
            pass

    def tick(self, now: float) -> None:
        # Refresh the retained membership now and then: survives a broker restart without persistence.
        if self._client is not None and now - self._last_heartbeat >= self.service.config.heartbeat_s * 30:
            self._last_heartbeat = now
            self._client.publish(topics.twin_worker_topic(self.me), self._membership_payload(), qos=1, retain=True)

    # ---- ownership ------------------------------------------------------------------------------------

    def _set_members(self, members: set[str]) -> None:
        members = members | {self.me}
        if members != self.members:
            log.info("twin %s: members %s -> %s", self.me, sorted(self.members), sorted(members))
            self.members = members
            self._sorted = sorted(members)
            self._owner_cache.clear()
            # Devices whose owner changed: the new owners continue them from the retained state.
            self.owned = {key for key in self.owned if self.owns(key)}
            if self.affinity == "broker":
                return
            for index, device in self.service.ingestor.registry.by_index.items():
                if self.owns(device.key):
                    # continue from the previous owner's retained state before publishing any of ours
                    self._take_over(device.key)
                    self.service._dirty.add(index)

    def owns(self, key: str) -> bool:
        if self.affinity == "broker":
            return key in self.owned or (key.startswith("fleet:") and self._sorted[0] == self.me)
        owner = self._owner_cache.get(key)
        if owner is None:
            owner = rendezvous_owner(key, self._sorted)
            if len(self._owner_cache) > 500_000:
                self._owner_cache.clear()
            self._owner_cache[key] = owner
        return owner == self.me

    def owned_indices(self) -> set[int]:
        registry = self.service.ingestor.registry
        return {registry.devices[key].index for key in self.owned if key in registry.devices}

    # ---- message routing (ingest thread) -------------------------------------------------------------

    def accept(self, message: paho.MQTTMessage) -> tuple[str, bytes] | None:
        """What to ingest of ``message`` (its topic and payload), or None when handled here."""
        topic = message.topic
        try:
            parsed = self.service.ingestor._parse(topic)
        except TopicError:
            return topic, bytes(message.payload)  # the ingest dead-letters it with the reason
        kind = parsed[0]
        if kind == "twin_worker":
            self._member_message(topic, bytes(message.payload))
            return None
        if kind == "twin_handoff":
            original = _user_property(message, TOPIC_PROPERTY)
            if original is None:
                return topic, bytes(message.payload)  # dead-lettered as an unexpected topic
            self.received_handoffs += 1
            try:
                ref = self.service.ingestor._parse(original)[1]
            except TopicError:
                ref = None
            if ref is not None:
                self._take_over(ref.key)
            return original, bytes(message.payload)
        if kind == "twin":
            self._twin_message(parsed[1], bytes(message.payload))
            return None
        if kind in ("telemetry", "event") and parsed[1] is not None:
            key = parsed[1].key
            if self.affinity == "broker" or self.owns(key):
                self._take_over(key)
                return topic, bytes(message.payload)
            self._hand_off(rendezvous_owner(key, self._sorted), topic, message)
            return None
        return topic, bytes(message.payload)

    def _member_message(self, topic: str, payload: bytes) -> None:
        worker = topic.rsplit("/", 1)[1]
        members = set(self.members)
        if payload:
            try:
                document = schemas.loads("twin_worker", payload)
            except schemas.PayloadError:
                return
            if document.get("group", self.group) != self.group:
                return
            members.add(worker)
        else:
            members.discard(worker)
        self._set_members(members)

    def _twin_message(self, ref: Any, payload: bytes) -> None:
        if ref is None:
            return
        if not payload:
            self.service.state.remember(ref.key, None)
            return
        try:
            document = json.loads(payload)
        except ValueError:
            return
        if document.get("worker") != self.me:
            self.service.state.remember(ref.key, document)
            if self.affinity == "broker" and ref.key in self.owned:
                # another worker publishes this device now: the broker moved it away from us
                self.owned.discard(ref.key)

    def _hand_off(self, owner: str, topic: str, message: paho.MQTTMessage) -> None:
        client = self._client
        if client is None:
            return
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [(TOPIC_PROPERTY, topic)]
        client.publish(topics.twin_handoff_topic(owner), message.payload, qos=1, properties=properties)
        self.handed_off += 1

    def _take_over(self, key: str) -> None:
        if key in self.owned:
            return
        self.owned.add(key)
        ingestor = self.service.ingestor
        device = ingestor.registry.devices.get(key)
        with self.service.state.lock:
            previous = self.service.state.latest.get(key)
        if device is None or previous is None or previous.get("worker") in (None, self.me):
            return
        epoch, last_seq = previous.get("epoch"), previous.get("last_seq")
        runtime = ingestor.runtime_of(device)
        mine = runtime.sequences
        if epoch is None or last_seq is None:
            return
        if mine.current_epoch is not None and (mine.current_epoch, mine.last_seq or -1) >= (epoch, last_seq):
            return
        runtime.sequences = DeviceSequences.resume(int(epoch), int(last_seq))
        runtime.sequences.duplicates = int(previous.get("duplicates", 0))
        runtime.sequences.gaps = int(previous.get("gaps", 0))
        runtime.samples = int(previous.get("samples", 0))
        self.takeovers += 1
        log.info("twin %s took over %s from %s at (%s, %s)", self.me, key, previous.get("worker"), epoch, last_seq)


def _user_property(message: paho.MQTTMessage, name: str) -> str | None:
    properties = getattr(message, "properties", None)
    for key, value in getattr(properties, "UserProperty", None) or []:
        if key == name:
            return str(value)
    return None
