"""Batch, number, spool and send: the path from a source's samples to the broker.

Per device:

1. :class:`DeviceStreamImpl` collects samples in three columns. A batch is closed when it holds
   ``max_samples`` samples or its oldest sample waited ``window_s`` seconds, encoded with
   :func:`forgeline.contract.telemetry.encode` and appended to the :class:`~edge_agent.spool.Spool`,
   which gives it the device's next sequence number in the same transaction.
2. :class:`DeviceLink` owns the device's MQTT connection: a retained birth on the status topic at
   every connect, a retained ``offline`` last will, the device's command subscription, and a sender
   that publishes spooled rows in order with QoS 1 and deletes each only after its PUBACK. Rows that
   were already spooled when a connection came up are sent with the historical flag.

One connection per device is deliberate: MQTT has one last will per connection, and the contract
has one status topic per device, so only this way does a dead gateway mark each of its devices
offline. On a lost connection the link drops the client (and paho's own queue with it) and
connects a fresh one; the spool is the only queue.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from edge_agent.device import DeviceInfo, offline_document
from edge_agent.spool import RowKind, Spool
from forgeline.contract import telemetry
from forgeline.contract.schemas import dumps
from forgeline.mqtt import MqttError, MqttSettings, connect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """When a batch is closed: at ``max_samples`` samples or when its oldest sample is ``window_s`` old."""

    max_samples: int = 1000
    window_s: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_samples <= telemetry.MAX_SAMPLES:
            raise ValueError(f"batch max_samples must be in 1..{telemetry.MAX_SAMPLES}, not {self.max_samples}")
        if not 0 < self.window_s <= 3600:
            raise ValueError(f"batch window_s must be in (0, 3600], not {self.window_s}")


@dataclass(frozen=True)
class LinkSettings:
    """How a device link talks to the broker."""

    inflight: int = 100  # spooled rows published and not yet acknowledged, per device
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    client_id_prefix: str = "fl-agent"

    def __post_init__(self) -> None:
        if not 1 <= self.inflight <= 1000:
            raise ValueError(f"inflight must be in 1..1000, not {self.inflight}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("reconnect_min_s must be positive and at most reconnect_max_s")


CommandCallback = Callable[["DeviceLink", paho.MQTTMessage], None]


class DeviceStreamImpl:
    """The batching buffer of one device (the :class:`~edge_agent.sources.base.DeviceStream` of the agent)."""

    def __init__(self, publisher: Publisher, info: DeviceInfo) -> None:
        self._publisher = publisher
        self._info = info
        self._lock = threading.Lock()
        self._t = array("q")
        self._c = array("H")
        self._v = array("d")
        self._t_min = 0
        self._t_max = 0
        self._opened = 0.0  # monotonic time the open batch got its first sample
        self.enabled: list[bool] = [True] * len(info.channels)
        self.rate_hz: float | None = None
        self.samples_in = 0
        self.samples_filtered = 0

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def enabled_channels(self) -> tuple[str, ...]:
        return tuple(name for name, on in zip(self._info.channels, self.enabled, strict=True) if on)

    def add(self, channel: int, t_us: int, value: float) -> None:
        full = False
        with self._lock:
            if not self.enabled[channel]:
                self.samples_filtered += 1
                return
            if self._t:
                if t_us < self._t_min or t_us > self._t_max:
                    if max(t_us, self._t_max) - min(t_us, self._t_min) > telemetry.MAX_SPAN_US:
                        self._flush_locked()
                        self._t_min = self._t_max = t_us
                    elif t_us < self._t_min:
                        self._t_min = t_us
                    else:
                        self._t_max = t_us
            else:
                self._t_min = self._t_max = t_us
                self._opened = time.monotonic()
            self._t.append(t_us)
            self._c.append(channel)
            self._v.append(value)
            self.samples_in += 1
            full = len(self._v) >= self._publisher.batch.max_samples
            if full:
                self._flush_locked()

    def extend(self, channels: Sequence[int], t_us: Sequence[int], values: Sequence[float]) -> None:
        n = len(values)
        if not (len(channels) == len(t_us) == n):
            raise ValueError(f"column lengths differ: channel={len(channels)} t={len(t_us)} value={n}")
        if n == 0:
            return
        if not all(self.enabled):
            keep = [i for i in range(n) if self.enabled[channels[i]]]
            with self._lock:
                self.samples_filtered += n - len(keep)
            channels = [channels[i] for i in keep]
            t_us = [t_us[i] for i in keep]
            values = [values[i] for i in keep]
            n = len(values)
        limit = self._publisher.batch.max_samples
        start = 0
        with self._lock:
            lo, hi = min(t_us), max(t_us)
            if hi - lo > telemetry.MAX_SPAN_US:
                # Rare (a source delivering an old backlog): fall back to one sample at a time.
                pass
            else:
                while start < n:
                    if self._t and max(hi, self._t_max) - min(lo, self._t_min) > telemetry.MAX_SPAN_US:
                        self._flush_locked()
                    if not self._t:
                        self._opened = time.monotonic()
                        self._t_min, self._t_max = lo, hi
                    else:
                        self._t_min, self._t_max = min(lo, self._t_min), max(hi, self._t_max)
                    take = min(n - start, limit - len(self._v))
                    self._t.extend(t_us[start : start + take])
                    self._c.extend(channels[start : start + take])
                    self._v.extend(values[start : start + take])
                    self.samples_in += take
                    start += take
                    if len(self._v) >= limit:
                        self._flush_locked()
                return
        for i in range(n):
            self.add(channels[i], t_us[i], values[i])

    def event(self, document: dict[str, Any]) -> None:
        # Samples taken before the event are spooled before it, so the twin sees them in order.
        self.flush()
        self._publisher.spool_event(self._info, document)

    def announce(self, info: DeviceInfo) -> None:
        if info.ref != self._info.ref or info.channels != self._info.channels:
            raise ValueError(f"announce() may not change the identity or channels of {self._info.key}")
        self._info = info
        self._publisher.announce(info.key)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def flush_if_due(self, now: float) -> None:
        if self._v and now - self._opened >= self._publisher.batch.window_s:
            with self._lock:
                if self._v and now - self._opened >= self._publisher.batch.window_s:
                    self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._v:
            return
        t, c, v = self._t, self._c, self._v
        self._t, self._c, self._v = array("q"), array("H"), array("d")
        self._publisher.spool_batch(self._info, t, c, v)


class DeviceLink:
    """The MQTT connection of one device: birth, last will, commands, and the ordered sender."""

    def __init__(self, publisher: Publisher, stream: DeviceStreamImpl) -> None:
        self.publisher = publisher
        self.stream = stream
        self.ref = stream.info.ref
        self.key = stream.info.key
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        self.client_id = f"{publisher.link.client_id_prefix}-{self.ref.device[:20]}-{digest}"
        self.wake = threading.Event()
        self.connected = threading.Event()
        self._client: paho.Client | None = None
        self._client_lock = threading.Lock()
        self._acks: deque[tuple[int, bool]] = deque()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"link-{self.ref.device}", daemon=True)
        self._birth_due = threading.Event()
        self.counters = {
            "connects": 0,
            "connect_failures": 0,
            "disconnects": 0,
            "published_batches": 0,
            "published_samples": 0,
            "historical_batches": 0,
            "acked_rows": 0,
            "broker_rejected": 0,
            "commands": 0,
        }

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self.publisher.link.reconnect_min_s
        stop = self.publisher.stop_event
        while not stop.is_set():
            will = (self.ref.status_topic, dumps(offline_document(time.time(), "connection lost")), 1, True)
            try:
                client = connect(
                    self.publisher.settings,
                    self.client_id,
                    will=will,
                    timeout=self.publisher.link.connect_timeout_s,
                )
            except MqttError as exc:
                self.counters["connect_failures"] += 1
                if self.counters["connect_failures"] in (1, 10) or self.counters["connect_failures"] % 100 == 0:
                    log.warning("%s: %s (retrying)", self.key, exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.publisher.link.reconnect_max_s)
                continue
            except Exception:  # a bug or an unexpected library error: log it and keep the agent running
                log.exception("%s: unexpected error while connecting", self.key)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.publisher.link.reconnect_max_s)
                continue
            backoff = self.publisher.link.reconnect_min_s
            self.counters["connects"] += 1
            try:
                self._session(client)
            except Exception:
                log.exception("%s: error in the MQTT session; reconnecting", self.key)
            finally:
                self._drop_client(client)
        self.connected.clear()

    def _drop_client(self, client: paho.Client) -> None:
        with self._client_lock:
            self._client = None
        self.connected.clear()
        if client.is_connected() and self.publisher.closing.is_set():
            try:
                info = client.publish(
                    self.ref.status_topic, dumps(offline_document(time.time(), "agent stopped")), qos=1, retain=True
                )
                info.wait_for_publish(timeout=2.0)
                client.disconnect()
            except (RuntimeError, ValueError, OSError):
                pass
        else:
            try:
                client.disconnect()
            except (RuntimeError, ValueError, OSError):
                pass
        client.loop_stop()

    # --- one connection ------------------------------------------------------------------------------

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        self._acks.append((mid, bool(getattr(reason_code, "is_failure", False))))
        self.wake.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._lost.set()
        self.wake.set()

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        self.counters["commands"] += 1
        self.publisher.submit_command(self, message)

    def _session(self, client: paho.Client) -> None:
        spool = self.publisher.spool
        self._lost.clear()
        self._acks.clear()
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if not client.is_connected():
            return
        with self._client_lock:
            self._client = client
        self.connected.set()
        self._publish_birth(client)
        client.subscribe(self.ref.command_filter, qos=1)
        boundary = spool.last_id(self.key)  # everything spooled before this connection is historical
        cursor = 0
        inflight: dict[int, tuple[int, int, RowKind]] = {}  # mid -> (row id, samples, kind)
        early: dict[int, bool] = {}  # acks that arrived before publish() returned the mid
        window = self.publisher.link.inflight
        stop = self.publisher.stop_event
        while not stop.is_set():
            self.wake.wait(0.25)
            self.wake.clear()
            if self._birth_due.is_set():
                self._birth_due.clear()
                self._publish_birth(client)
            done: list[int] = []
            while self._acks:
                mid, failed = self._acks.popleft()
                if mid in inflight:
                    done.append(self._settle(inflight.pop(mid), failed))
                else:
                    early[mid] = failed
            if done:
                self.counters["acked_rows"] += spool.ack(done)
            if self._lost.is_set() or not client.is_connected():
                self.counters["disconnects"] += 1
                log.info("%s: connection lost; %d rows in flight will be sent again", self.key, len(inflight))
                return
            want = window - len(inflight)
            if want > 0:
                rows = spool.pending(self.key, cursor, want)
                for row in rows:
                    cursor = row.id
                    if row.kind is RowKind.TELEMETRY:
                        historical = row.id <= boundary
                        payload = telemetry.mark_historical(row.payload) if historical else row.payload
                        info = client.publish(self.ref.telemetry_topic, payload, qos=1)
                        self.counters["published_batches"] += 1
                        self.counters["published_samples"] += row.samples
                        self.counters["historical_batches"] += historical
                    else:
                        info = client.publish(self.ref.event_topic, row.payload, qos=1)
                    if info.rc != paho.MQTT_ERR_SUCCESS:
                        # Not on the wire: the row stays spooled and goes out on the next connection.
                        self._lost.set()
                        self.wake.set()
                        break
                    inflight[info.mid] = (row.id, row.samples, row.kind)
                    if info.mid in early:
                        done_id = self._settle(inflight.pop(info.mid), early.pop(info.mid))
                        self.counters["acked_rows"] += spool.ack([done_id])
                if rows and len(rows) == want and len(inflight) < window:
                    self.wake.set()  # more may be waiting

    def _settle(self, entry: tuple[int, int, RowKind], failed: bool) -> int:
        row_id, samples, kind = entry
        if failed:
            # An MQTT 5 PUBACK with a failure reason (not authorised, quota): resending cannot help.
            self.counters["broker_rejected"] += 1
            log.warning("%s: broker refused a %s row of %d samples", self.key, kind.name.lower(), samples)
        return row_id

    def _publish_birth(self, client: paho.Client) -> None:
        info = self.stream.info
        birth = info.birth(time.time(), self.publisher.spool.epoch, rate_hz=self.stream.rate_hz)
        enabled = set(self.stream.enabled_channels())
        birth["channels"] = [c for c in birth["channels"] if c["name"] in enabled]
        client.publish(self.ref.status_topic, dumps(birth), qos=1, retain=True)

    def request_birth(self) -> None:
        self._birth_due.set()
        self.wake.set()

    def respond(self, topic: str, document: dict[str, Any]) -> bool:
        """Publish a command response (QoS 1, not spooled: a requester that misses it asks again)."""
        with self._client_lock:
            client = self._client
        if client is None:
            return False
        info = client.publish(topic, dumps(document), qos=1)
        return info.rc == paho.MQTT_ERR_SUCCESS


class Publisher:
    """All device streams and links of one agent, the spool, the batch timer and the command worker."""

    def __init__(
        self,
        settings: MqttSettings,
        spool: Spool,
        *,
        batch: BatchSettings | None = None,
        link: LinkSettings | None = None,
        on_command: CommandCallback | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.batch = batch or BatchSettings()
        self.link = link or LinkSettings()
        self.on_command = on_command
        self.stop_event = threading.Event()
        self.closing = threading.Event()
        self.streams: dict[str, DeviceStreamImpl] = {}
        self.links: dict[str, DeviceLink] = {}
        self._lock = threading.Lock()
        self._commands: queue.Queue[tuple[DeviceLink, paho.MQTTMessage] | None] = queue.Queue(maxsize=1000)
        self._timer = threading.Thread(target=self._timer_loop, name="batch-timer", daemon=True)
        self._worker = threading.Thread(target=self._command_loop, name="commands", daemon=True)
        self._started = False
        self.commands_dropped = 0
        self.encode_errors = 0

    # --- the Sink interface --------------------------------------------------------------------------

    def stream(self, info: DeviceInfo) -> DeviceStreamImpl:
        with self._lock:
            existing = self.streams.get(info.key)
            if existing is not None:
                return existing
            stream = DeviceStreamImpl(self, info)
            self.streams[info.key] = stream
            link = DeviceLink(self, stream)
            self.links[info.key] = link
            if self._started:
                link.start()
            return stream

    # --- called by streams -----------------------------------------------------------------------------

    def spool_batch(self, info: DeviceInfo, t: array[int], c: array[int], v: array[float]) -> None:
        epoch = self.spool.epoch

        def build(seq: int) -> bytes:
            return telemetry.encode(info.channels, t, c, v, seq=seq, epoch=epoch)

        try:
            self.spool.append_batch(info.key, build, len(v))
        except telemetry.TelemetryError as exc:
            # Only a source bug gets here (the stream keeps batches within the encoding's limits).
            self.encode_errors += 1
            log.error("%s: batch of %d samples not encodable: %s", info.key, len(v), exc)
            return
        link = self.links.get(info.key)
        if link is not None:
            link.wake.set()

    def spool_event(self, info: DeviceInfo, document: dict[str, Any]) -> None:
        self.spool.append_event(info.key, dumps(document))
        link = self.links.get(info.key)
        if link is not None:
            link.wake.set()

    def announce(self, device_key: str) -> None:
        link = self.links.get(device_key)
        if link is not None:
            link.request_birth()

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._started = True
            links = list(self.links.values())
        for link in links:
            link.start()
        self._timer.start()
        self._worker.start()

    def flush(self) -> None:
        """Close every open batch now (spooled, sent when the link is up)."""
        for stream in list(self.streams.values()):
            stream.flush()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every spooled row of every device has been acknowledged (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        for link in list(self.links.values()):
            link.wake.set()
            while self.spool.last_id(link.key) != 0:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
        return True

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Flush, try to deliver the backlog for ``drain_timeout`` s, publish ``offline``, disconnect."""
        self.flush()
        if drain_timeout > 0 and any(link.connected.is_set() for link in self.links.values()):
            self.wait_idle(drain_timeout)
        self.closing.set()
        self.stop_event.set()
        for link in list(self.links.values()):
            link.wake.set()
        for link in list(self.links.values()):
            link.join(10.0)
        self._commands.put(None)
        self._worker.join(5.0)
        self._timer.join(5.0)

    def _timer_loop(self) -> None:
        period = min(0.05, self.batch.window_s / 4)
        last_drop_check = 0.0
        while not self.stop_event.wait(period):
            now = time.monotonic()
            for stream in list(self.streams.values()):
                try:
                    stream.flush_if_due(now)
                except Exception:
                    log.exception("%s: flushing a batch failed", stream.info.key)
            if now - last_drop_check >= 1.0:
                last_drop_check = now
                self._report_drops()

    def _report_drops(self) -> None:
        for drops in self.spool.take_unreported_drops():
            stream = self.streams.get(drops.device)
            if stream is None:
                continue
            totals = self.spool.stats()
            message = (
                f"spool overflow ({self.spool.overflow}): dropped {drops.batches} batches ({drops.samples} samples) "
                f"and {drops.events} events of this device; agent totals {totals['dropped_batches']} batches, "
                f"{totals['dropped_samples']} samples, {totals['dropped_events']} events"
            )
            log.warning("%s: %s", drops.device, message)
            alarm = {
                "type": "alarm", "ts": time.time(), "severity": "warning", "message": message,
                "spool_dropped_batches": drops.batches, "spool_dropped_samples": drops.samples,
                "spool_dropped_events": drops.events,
            }
            try:
                self.spool_event(stream.info, alarm)
            except Exception:
                log.exception("could not spool the overflow alarm")

    # --- commands -----------------------------------------------------------------------------------

    def submit_command(self, link: DeviceLink, message: paho.MQTTMessage) -> None:
        try:
            self._commands.put_nowait((link, message))
        except queue.Full:
            self.commands_dropped += 1
            log.warning("%s: command queue full, dropped a command on %s", link.key, message.topic)

    def _command_loop(self) -> None:
        while True:
            item = self._commands.get()
            if item is None:
                return
            link, message = item
            if self.on_command is None:
                continue
            try:
                self.on_command(link, message)
            except Exception:
                log.exception("%s: command handler failed on %s", link.key, message.topic)

    # --- reporting -----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        devices: dict[str, Any] = {}
        for key, link in list(self.links.items()):
            stream = self.streams[key]
            devices[key] = {
                "connected": link.connected.is_set(),
                "next_seq": self.spool.next_seq(key),
                "samples_in": stream.samples_in,
                "samples_filtered": stream.samples_filtered,
                **link.counters,
            }
        return {
            "spool": self.spool.stats(),
            "devices": devices,
            "commands_dropped": self.commands_dropped,
            "encode_errors": self.encode_errors,
        }

