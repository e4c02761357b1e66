"""The twin service: MQTT in, core, twin topics and time series out.

Threads:

* paho's network thread receives messages and queues them (``_on_message``); with manual
  acknowledgement, a message is acknowledged after it has been processed, so the broker's
  in-flight window (MQTT 5 Receive Maximum) is the back-pressure and a crash loses nothing that
  was not yet processed (it is redelivered to the persistent session).
* a cycle takes what has arrived, :meth:`Ingestor.process`, acknowledges, publishes dead letters /
  anomaly events / twin state (at most one per device and ``publish_interval_s``), hands points to
  the InfluxDB writer. Where cycles run is ``cycle_thread``: in the network thread itself
  (``network``: no second busy Python thread competing for the GIL, best for small messages), in
  the ingest thread (``ingest``: the numba kernels release the GIL, so they run while paho reads
  the next messages; best for large batches), or ``auto`` (default), chosen from the samples per
  message of the recent cycles. The ingest thread also does the periodic work (fleet summaries,
  snapshots, expiry) and whatever is left when messages stop.
* the InfluxDB writer (:mod:`twin.influx`) and the metrics HTTP server have their own threads.

``TwinService(config).start()`` / ``.stop()`` work in-process (the demo, tests);
``forgeline twin --config FILE`` runs it as a process (:mod:`twin.cli`).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from forgeline.contract import schemas, topics
from forgeline.contract.topics import Kind, TopicError
from forgeline.mqtt import MqttError, make_client
from twin.config import TwinConfig
from twin.ingest import CycleResult, DeadLetter, Ingestor
from twin.mqtt_client import TwinClient, supported
from twin.state import TwinState

if TYPE_CHECKING:
    from twin.cluster import Membership
    from twin.snapshot import Snapshotter

log = logging.getLogger(__name__)

# paho with buffered reads and one write per cycle's acknowledgements (twin/mqtt_client.py), when
# this paho has the internals it builds on; False: stock paho (bench A/B)
USE_TWIN_CLIENT = supported()

# cycle_thread auto: cycles run in the ingest thread while messages carry this many samples on average
OFFLOAD_ABOVE_SAMPLES = 200


@contextmanager
def _one_wake(client: paho.Client | None) -> Iterator[None]:
    """Queue many packets (acknowledgements, twin states) with one wake-up of paho's network thread.

    paho wakes its network thread with a byte on a socket pair for every queued packet. From the
    ingest thread each of those sends waits for the GIL the network thread holds: measured at
    ~60 µs per packet, more than the rest of the per-message work. Waking it once per cycle keeps
    the order and the content of what is sent; only the number of wake-ups changes.
    """
    wake = getattr(client, "_sockpairW", None)
    if client is None or wake is None:
        yield
        return
    client._sockpairW = None
    try:
        yield
    finally:
        if client._sockpairW is None:  # a reconnect may have made a new pair meanwhile
            client._sockpairW = wake
        # In the network thread itself no wake-up is needed: its next select() sees what is queued.
        if threading.current_thread() is not getattr(client, "_thread", None):
            try:
                wake.send(b"0")
            except (BlockingIOError, OSError):
                pass


class TwinService:
    """One twin worker. Thread-safe ``start()``, ``stop()``, ``snapshot_view()``."""

    def __init__(self, config: TwinConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.ingestor = Ingestor(config)
        self.state = TwinState(self.ingestor, self.worker_id)
        self._inbox: deque[paho.MQTTMessage] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._last_published: dict[int, float] = {}
        self._dirty: set[int] = set()
        self._last_fleet = 0.0
        self._next_twin_round = 0.0
        self._restored = False
        self._last_cycle_start = 0.0
        self._stop_deadline = 0.0
        self._dead_letter_tokens: dict[str | None, tuple[float, float]] = {}
        self.dead_letters_suppressed = 0  # counted, not published (over dead_letter_rate_per_s)
        self._started_at = 0.0
        self.last_cycle_at = 0.0
        self.publish_failures = 0
        self.twin_states_published = 0
        self.cycles = 0  # cycles that processed messages, and their time (for /metrics)
        self.cycle_seconds = 0.0
        self.lag_s = 0.0  # receive -> processed, of the last cycle's oldest message
        self.snapshots: Snapshotter | None = None
        self.writer: Any = None  # twin.influx.InfluxWriter when configured
        self.metrics: Any = None
        self.cluster: Membership | None = None
        if config.share_group:
            from twin.cluster import Membership

            self.cluster = Membership(self)
        self._last_influx = 0.0
        self._ingest_lock = threading.Lock()
        # Where cycles run while messages stream in (config.cycle_thread): paho's network thread, or
        # this service's ingest thread when the cycles' work is mostly in the nogil kernels.
        self._offload = config.cycle_thread == "ingest"
        self._samples_per_message = 0.0  # moving average over cycles (cycle_thread auto)

    # ---- life cycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> TwinService:
        """Restore the latest snapshot, connect, subscribe and start the ingest thread."""
        if self.config.snapshot_dir:
            from twin.snapshot import Snapshotter

            self.snapshots = Snapshotter(self.config.snapshot_dir, self.config.snapshot_interval_s)
            restored = self._restored = self.snapshots.restore(self)
            if restored:
                log.info("restored snapshot of %d devices", len(self.ingestor.registry))
                # republish every twin from the restored state so the retained topics match it
                self._dirty |= set(self.ingestor.registry.by_index)
        if self.config.influx is not None:
            from twin.influx import InfluxWriter

            self.writer = InfluxWriter(self.config.influx, worker=self.worker_id)
            self.writer.start()
            self.ingestor.historical_interval_us = int(self.config.influx.interval_s * 1e6)
        if self.config.metrics_port is not None:
            from twin.metrics import MetricsServer

            self.metrics = MetricsServer(self, self.config.metrics_host, self.config.metrics_port)
            self.metrics.start()
        self.ingestor.warm_up()
        # numba's compiler leaves millions of long-lived objects behind; moving them out of the
        # collector's reach keeps full collections (and the latency spikes they cause) short.
        gc.collect()
        gc.freeze()
        self._started_at = time.time()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"twin-ingest-{self.worker_id}", daemon=True)
        self._thread.start()
        try:
            self._connect(timeout)
        except MqttError:
            self.stop(snapshot=False)  # leave no thread, writer or HTTP server behind
            raise
        return self

    def _connect(self, timeout: float) -> None:
        settings = self.config.mqtt_settings
        # One worker: a persistent session, so the broker keeps what arrives while the twin restarts.
        # Several workers: a session that ends with the connection, because Mosquitto keeps handing a
        # dead member's share of a shared subscription to its persistent session.
        persistent = self.cluster is None
        client = make_client(settings, self.worker_id, clean=not persistent,
                             client_class=TwinClient if USE_TWIN_CLIENT else paho.Client)
        client.manual_ack_set(True)
        # paho walks every in-flight message on each PUBACK it receives: with its window of 1000 a burst
        # of retained twin states costs O(n²). A short window keeps that walk short; the broker is local
        # or close, so 64 in flight do not limit the rate.
        client.max_inflight_messages_set(64)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        if self.cluster is not None:
            self.cluster.configure_client(client)
        props = None
        if settings.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s if persistent else 0
            props.ReceiveMaximum = self.config.max_queue
        client.reconnect_delay_set(1, 10)
        try:
            if settings.protocol == 5:
                client.connect(settings.host, settings.port, settings.keepalive, clean_start=not persistent,
                               properties=props)
            else:
                client.connect(settings.host, settings.port, settings.keepalive)
        except OSError as exc:
            raise MqttError(f"cannot connect to {settings.host}:{settings.port}: {exc}") from None
        self._client = client
        client.loop_start()
        if not self._connected.wait(timeout):
            raise MqttError(f"twin {self.worker_id}: no CONNACK from {settings.host}:{settings.port}")

    def subscriptions(self) -> list[tuple[str, int]]:
        tenants = self.config.tenants or ("+",)
        subs: list[tuple[str, int]] = []
        for tenant in tenants:
            telemetry_filter = topics.device_filter(Kind.TELEMETRY, tenant)
            event_filter = topics.device_filter(Kind.EVENT, tenant)
            api_filter = f"{topics.PREFIX}/{tenant}/api/request/+"
            if self.config.share_group:
                telemetry_filter = topics.shared(self.config.share_group, telemetry_filter)
                event_filter = topics.shared(self.config.share_group, event_filter)
                api_filter = topics.shared(self.config.share_group, api_filter)
            # every worker sees every birth (small, retained) so it can take over any device
            subs += [(topics.device_filter(Kind.STATUS, tenant), 1), (telemetry_filter, 1), (event_filter, 1),
                     (api_filter, 1)]
            if self.cluster is not None:
                subs.append((topics.device_filter(Kind.TWIN, tenant), 1))
        if self.cluster is not None:
            subs += self.cluster.subscriptions()
        return subs

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("twin %s: broker refused the connection: %s", self.worker_id, reason_code)
            return
        if self.config.mqtt_settings.protocol == 5:
            # With a restored registry and a surviving session, the retained births would only repeat
            # what the twin knows (births that came meanwhile are queued in the session): skip them.
            retain = (SubscribeOptions.RETAIN_SEND_IF_NEW_SUB if self._restored
                      else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
            client.subscribe([(topic, SubscribeOptions(qos=qos, retainHandling=retain))
                              for topic, qos in self.subscriptions()])
        else:
            client.subscribe(self.subscriptions())
        if self.cluster is not None:
            self.cluster.on_connect(client)
        self._connected.set()
        log.info("twin %s connected and subscribed", self.worker_id)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("twin %s disconnected (%s); paho reconnects", self.worker_id, reason_code)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        message.timestamp = time.monotonic()  # paho leaves it 0 for incoming messages: the lag metric
        inbox = self._inbox
        inbox.append(message)
        if self._offload:
            # the ingest thread sleeps until the next cycle is due; wake it only when it may be waiting
            # for the first message or the queue is full (an Event per message would cost the GIL twice)
            if len(inbox) == 1 or len(inbox) >= self.config.cycle_max_messages:
                self._wake.set()
            return
        # Run the cycle right here in the network thread when it is due and nothing else holds the
        # state: two busy Python threads would hand the GIL back and forth on every socket read
        # (measured: the subscriber then receives at less than half its rate). The ingest thread
        # picks up what is left and does the periodic work.
        if (time.monotonic() - self._last_cycle_start >= self.config.cycle_interval_s
                or len(self._inbox) >= self.config.cycle_max_messages) \
                and not self._stopping.is_set() and self._ingest_lock.acquire(blocking=False):
            try:
                self._last_cycle_start = time.monotonic()
                self._cycle()
            except Exception:  # never into paho: it would stop the network loop
                log.exception("twin %s: ingest cycle failed", self.worker_id)
            finally:
                self._ingest_lock.release()
        if len(self._inbox) == 1 and not self._wake.is_set():
            self._wake.set()  # the first message waiting: the ingest thread takes it if no other follows

    def stop(self, *, snapshot: bool = True) -> None:
        """Process what has arrived, take a final snapshot, disconnect (idempotent)."""
        self._stop_deadline = time.monotonic() + 5.0
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if snapshot and self.snapshots is not None:
            with self._ingest_lock:
                self.snapshots.save(self)
        if self._client is not None and self.connected:
            self._round_trip(self._client)
        if self.cluster is not None and self._client is not None:
            self.cluster.leave(self._client)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self.writer is not None:
            self.writer.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def _round_trip(self, client: paho.Client, timeout: float = 2.0) -> None:
        """Wait until the broker has read everything sent so far (one UNSUBACK for a filter we never held).

        Acknowledgements queued just before ``disconnect()`` were lost at times and the broker sent
        those messages again at the next start (measured: up to a few hundred of a stream's last
        moments when cycles run in the ingest thread; paho closes its socket as soon as it has
        written DISCONNECT). The broker answers packets in order, so the UNSUBACK proves it has
        processed every PUBACK queued before.
        """
        answered = threading.Event()
        client.on_unsubscribe = lambda *_args: answered.set()
        result, _mid = client.unsubscribe(f"{topics.PREFIX}/_sys/twin/flush/{self.worker_id}")
        if result == paho.MQTT_ERR_SUCCESS and not answered.wait(timeout):
            log.warning("twin %s: no UNSUBACK within %.0f s before disconnecting", self.worker_id, timeout)

    def __enter__(self) -> TwinService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the ingest thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        spacing = self.config.cycle_interval_s
        while True:
            # Offloaded, this thread runs a cycle every interval while messages keep coming. Otherwise
            # the network thread runs them itself, and this thread steps in only for what is left when
            # messages stop (two intervals after the last cycle). Both: the periodic work.
            due_after = spacing if self._offload else 2 * spacing
            timeout = max(0.0, self._last_cycle_start + due_after - time.monotonic()) if self._inbox else 0.05
            self._wake.wait(timeout)
            self._wake.clear()
            try:
                with self._ingest_lock:
                    due_after = spacing if self._offload else 2 * spacing
                    if self._inbox and (time.monotonic() - self._last_cycle_start >= due_after
                                        or self._stopping.is_set()
                                        or len(self._inbox) >= self.config.cycle_max_messages):
                        self._last_cycle_start = time.monotonic()
                        self._cycle()
                    self._periodic()
            except Exception:  # keep ingesting: a bug in one cycle must not stall the twin for months
                log.exception("twin %s: ingest cycle failed", self.worker_id)
            if self._stopping.is_set() and (not self._inbox or time.monotonic() > self._stop_deadline):
                # What still arrives is not acknowledged: the broker redelivers it after a restart.
                return

    def _take(self) -> list[paho.MQTTMessage]:
        inbox = self._inbox
        count = min(len(inbox), self.config.cycle_max_messages)
        return [inbox.popleft() for _ in range(count)]

    def _cycle(self) -> bool:
        messages = self._take()
        now = time.time()
        self.last_cycle_at = now
        if not messages:
            return False
        started = time.perf_counter()
        try:
            self._process(messages, now)
        finally:
            self.cycles += 1
            self.cycle_seconds += time.perf_counter() - started
        return True

    def _process(self, messages: list[paho.MQTTMessage], now: float) -> None:
        client = self._client
        api: list[paho.MQTTMessage] = []
        work: list[tuple[str, bytes]] = []
        cluster = self.cluster
        for message in messages:
            topic = message.topic
            if "/api/request/" in topic:
                api.append(message)
            elif cluster is not None:
                # membership, hand-off and other workers' twin state are handled by the cluster
                item = cluster.accept(message)
                if item is not None:
                    work.append(item)
            else:
                work.append((topic, bytes(message.payload)))
        result = self.ingestor.process(work, now) if work else CycleResult()
        if self.config.cycle_thread == "auto" and work:
            self._choose_thread(result.samples / len(work), len(work))
        with self._sending(client):
            # Acknowledge only now: a crash before this point leaves the messages with the broker.
            if isinstance(client, TwinClient):
                try:
                    client.ack_many(messages)  # one outgoing buffer for the cycle's PUBACKs
                except Exception:  # a disconnect in between: the broker redelivers, dedup drops it
                    pass
            elif client is not None:
                for message in messages:
                    if message.qos > 0:
                        try:
                            client.ack(message.mid, message.qos)
                        except Exception:  # a disconnect in between: the broker redelivers, dedup drops it
                            pass
            self.lag_s = time.monotonic() - messages[0].timestamp if messages[0].timestamp else 0.0
            self._publish_result(result, now)
            for message in api:
                self._answer(message)

    @staticmethod
    def _sending(client: paho.Client | None) -> AbstractContextManager[None]:
        """Where a cycle's packets go out: on the twin's client as one buffer (``TwinClient.batch``),
        on stock paho packet by packet with one wake-up of its network thread."""
        return client.batch() if isinstance(client, TwinClient) else _one_wake(client)

    def _choose_thread(self, samples_per_message: float, messages: int) -> None:
        # Measured on this project's 2-core machine (docs/twin.md "Figures"): with 1000-sample messages
        # the ingest thread doubles the twin's rate (its kernels run while paho reads), with
        # single-sample messages it halves it (the cycle is Python, and every socket read of paho's
        # then waits for the GIL). A moving average over the recent messages (each weighs 5 %, so a
        # cycle of hundreds decides at once, one of a few moves it a little) and a hysteresis band keep
        # a mixed stream from flipping at every cycle.
        weight = 1.0 - 0.95 ** messages
        average = self._samples_per_message = (1.0 - weight) * self._samples_per_message + weight * samples_per_message
        if average >= OFFLOAD_ABOVE_SAMPLES:
            if not self._offload:
                self._offload = True
                self._wake.set()  # the ingest thread may be in its idle wait: it runs the cycles now
        elif average < OFFLOAD_ABOVE_SAMPLES / 2:
            self._offload = False

    def _publish(self, topic: str, document: Any, *, retain: bool = False, qos: int = 1) -> None:
        client = self._client
        if client is None:
            return
        info = client.publish(topic, schemas.dumps(document), qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.publish_failures += 1

    def _publish_dead_letter(self, letter: DeadLetter) -> None:
        # A flood of bad input must not become a flood of dead letters: per tenant at most
        # dead_letter_rate_per_s are published (a token bucket); every one is counted either way.
        now = time.monotonic()
        rate = self.config.dead_letter_rate_per_s
        tokens, last = self._dead_letter_tokens.get(letter.tenant, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._dead_letter_tokens[letter.tenant] = (tokens, now)
            self.dead_letters_suppressed += 1
            return
        self._dead_letter_tokens[letter.tenant] = (tokens - 1.0, now)
        log.info("dead letter %s: %s", letter.topic, letter.reason)
        self._publish(topics.deadletter_topic(letter.tenant), letter.document())

    def _publish_result(self, result: CycleResult, now: float) -> None:
        for letter in result.dead_letters:
            self._publish_dead_letter(letter)
        for event in result.anomaly_events:
            ref, document = self.state.anomaly_document(event)
            self._publish(ref.anomaly_topic, document)
            if self.writer is not None:
                self.writer.anomaly(ref, self.ingestor.registry.devices[ref.key], document)
        if self.writer is not None:
            if result.historical_means:
                self.writer.historical(self.ingestor, result.historical_means)
            for device, event_doc in result.device_events:
                self.writer.device_event(device, event_doc, self.ingestor)
        self._dirty |= result.touched
        self._publish_twins(now)

    def _publish_twins(self, now: float, *, force: bool = False) -> None:
        if not self._dirty:
            return
        interval = self.config.publish_interval_s
        # Publish in rounds (a quarter of the interval apart) so KPIs are computed for many devices
        # at once, vectorised, rather than device by device in every cycle.
        if not force and now < self._next_twin_round:
            return
        self._next_twin_round = now + min(interval / 4, 0.25)
        due = [d for d in self._dirty if force or now - self._last_published.get(d, 0.0) >= interval]
        if not due:
            return
        if self.cluster is not None:
            by_index = self.ingestor.registry.by_index
            foreign = [d for d in due if not self.cluster.owns(by_index[d].key)]
            self._dirty.difference_update(foreign)
            due = [d for d in due if d not in set(foreign)]
            if not due:
                return
        by_index = self.ingestor.registry.by_index
        for index, document in zip(due, self.state.twin_documents(due, now), strict=True):
            self._publish(by_index[index].ref.twin_topic, document, retain=True)
            self.twin_states_published += 1
            self._last_published[index] = now
            self._dirty.discard(index)

    def _periodic(self) -> None:
        now = time.time()
        with self._sending(self._client):
            for letter in self.ingestor.expire_unknown(now):
                self._publish_dead_letter(letter)
            self._publish_twins(now)
        if self.cluster is not None:
            self.cluster.tick(now)
        if now - self._last_fleet >= self.config.fleet_interval_s:
            self._last_fleet = now
            for tenant in self.state.tenants():
                if self.cluster is not None and not self.cluster.owns(f"fleet:{tenant}"):
                    continue
                summary = self.state.fleet_summary(tenant, now)
                self._publish(topics.fleet_topic(tenant), summary, retain=True)
                if self.writer is not None:
                    self.writer.fleet(summary)
        if self.writer is not None and now - self._last_influx >= self.writer.config.interval_s:
            self._last_influx = now
            self.writer.interval(self, now)
        if self.snapshots is not None and self.snapshots.due(now):
            self.snapshots.save(self)

    def _answer(self, message: paho.MQTTMessage) -> None:
        try:
            parsed = topics.parse(message.topic)
            if parsed.kind != "api_request" or parsed.tenant is None or parsed.method is None:
                raise TopicError(f"not an API request topic: {message.topic}")
            if self.config.tenants and parsed.tenant not in self.config.tenants:
                raise TopicError(f"wrong tenant: {parsed.tenant!r} is not served by this twin")
            response_topic, document = self.state.answer(parsed.tenant, parsed.method, bytes(message.payload))
        except (TopicError, schemas.PayloadError) as exc:
            tenant = message.topic.split("/")[2] if message.topic.count("/") >= 2 else None
            letter = DeadLetter(message.topic, f"{type(exc).__name__}: {exc}", bytes(message.payload[:4096]),
                                tenant, time.time())
            counters = self.ingestor.counters.dead_letters
            counters["api"] = counters.get("api", 0) + 1
            self._publish_dead_letter(letter)
            return
        if response_topic is not None:
            self._publish(response_topic, document)

    # ---- read side for the demo and tests -----------------------------------------------------------

    def snapshot_view(self) -> list[dict[str, Any]]:
        """Per device: state, utilization, OEE, chamber fill, anomaly score (latest published twin state)."""
        return self.state.view()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every received message has been processed (tests, the demo's shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._inbox and not self._ingest_lock.locked():
                return True
            time.sleep(0.01)
        return False

    def flush_twins(self) -> None:
        """Publish the twin state of every device with news now, ignoring the rate limit."""
        with self._ingest_lock:
            self._publish_twins(time.time(), force=True)

    @property
    def offloaded(self) -> bool:
        """Whether cycles run in the ingest thread now (``cycle_thread`` ingest, or auto with large messages)."""
        return self._offload

    @property
    def outgoing_packets(self) -> int:
        """Packets queued for the broker and not yet written (paho's outgoing queue)."""
        client = self._client
        return len(getattr(client, "_out_packet", ())) if client is not None else 0

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()
