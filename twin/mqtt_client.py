"""The twin's paho client: buffered socket reads and a cycle's acknowledgements in one write.

A bare paho subscriber spends ~57 µs of CPU per 14 kB telemetry batch (``bench/twin_bench.py``),
all of it holding the GIL the twin's ingest cycle needs. More than half of that is paho decoding the
PUBLISH packet (``_packet.decode_publish``: ~34 µs, measured; an MQTT 5 ``Properties`` object is built
and cleared by walking its 27 property names with ``hasattr`` and ``str.replace``, and the payload is
copied three times), the rest a ``select()`` and three or four ``recv()`` calls per packet (one byte of
packet type, one per byte of remaining length, then the rest), the message object with its
``threading.Condition``, and one ``send()`` per PUBACK.

:class:`TwinClient` changes four things and nothing on the wire:

* PUBLISH packets without properties (what forgeline's agents send; QoS 0 and 1) are decoded with
  a few slices (~2 µs): topic, packet id, payload copied once; the message's ``properties`` (an empty
  ``Properties``) and ``info`` are made only if something reads them. Anything else (properties,
  QoS 2, an empty topic, a malformed packet, paho logging switched on) goes through paho's decoder;

* reads: a ``recv()`` asks the socket for up to 256 kB and later reads are served from that buffer;
  :meth:`TwinClient.loop_read` handles every complete packet in the buffer before returning to
  ``select()`` (which only sees the socket), so nothing waits in the buffer while the loop sleeps;
* acknowledgements: :meth:`TwinClient.ack_many` queues the PUBACKs of a cycle's QoS 1 messages as one
  outgoing buffer, written with one ``send()``, the same bytes in the same order as ``ack()`` one by
  one, and still only after the cycle has processed them (at least once is kept);
* writes: inside :meth:`TwinClient.batch` the packets a thread queues (a cycle's acknowledgements and
  twin states; in the network thread, the queued QoS 1 publishes that the PUBACKs of one read release)
  go out as one buffer with one ``send()``. paho sends each packet on its own, and every ``send()``
  hands the GIL to the other busy thread: measured, a cycle's 100-200 twin states then reached the
  broker up to ~100 ms after the cycle had built them. paho's bookkeeping of QoS 1 messages (in
  flight, acknowledged, sent again after a reconnect) is unchanged: only the queueing of the bytes is.

They rely on paho internals (``_sock_recv``, ``_packet_read``, ``_packet_queue``, ``_sock_close``) of
paho-mqtt 2.x; :func:`supported` checks they exist, and the twin uses the stock client otherwise.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_READ_SIZE = 256 * 1024
_PUBACK = struct.Struct("!BBH")
_PUBACK_COMMAND = 0x40
_PUBLISH_COMMAND = 0x30
_DISCONNECT_COMMAND = 0xE0


def supported() -> bool:
    """Whether this paho has the internals :class:`TwinClient` builds on."""
    slots = getattr(paho.MQTTMessage, "__slots__", ())
    return all(hasattr(paho.Client, name) for name in (
        "_sock_recv", "_packet_read", "_packet_queue", "_sock_close", "_loop_rc_handle", "_handle_publish",
        "_handle_on_message")) and all(name in slots for name in ("properties", "info", "_topic", "state"))


_PROPERTIES_SLOT = paho.MQTTMessage.__dict__.get("properties")
_INFO_SLOT = paho.MQTTMessage.__dict__.get("info")


class _Message(paho.MQTTMessage):
    """A received message whose ``properties`` and ``info`` are made when first read (a ``Properties``
    object costs ~10 µs, an ``MQTTMessageInfo`` a ``threading.Condition``)."""

    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, qos: int, dup: bool, retain: bool, payload: bytes) -> None:
        # not MQTTMessage.__init__: it makes the MQTTMessageInfo
        self.timestamp = 0.0
        self.state = paho.mqtt_ms_invalid
        self.dup = dup
        self.mid = mid
        self._topic = topic
        self.qos = qos
        self.retain = retain
        self.payload = payload

    @property
    def properties(self) -> Properties:
        try:
            return _PROPERTIES_SLOT.__get__(self)  # type: ignore[union-attr]
        except AttributeError:
            value = Properties(PacketTypes.PUBLISH)
            _PROPERTIES_SLOT.__set__(self, value)  # type: ignore[union-attr]
            return value

    @properties.setter
    def properties(self, value: Properties | None) -> None:
        _PROPERTIES_SLOT.__set__(self, value)  # type: ignore[union-attr]

    @property
    def info(self) -> paho.MQTTMessageInfo:
        try:
            return _INFO_SLOT.__get__(self)  # type: ignore[union-attr]
        except AttributeError:
            value = paho.MQTTMessageInfo(self.mid)
            _INFO_SLOT.__set__(self, value)  # type: ignore[union-attr]
            return value

    @info.setter
    def info(self, value: paho.MQTTMessageInfo) -> None:
        _INFO_SLOT.__set__(self, value)  # type: ignore[union-attr]


class TwinClient(paho.Client):
    """paho's client with buffered reads and batched acknowledgements (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = b""
        self._read_pos = 0
        # per thread inside batch(): the command of the first packet queued, and the packets
        self._batches: dict[int, tuple[int, list[bytes | bytearray]]] = {}

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Queue what this thread sends inside the block as one outgoing buffer (see the module
        docstring): the same bytes in the same order, one ``send()`` and one wake-up of the network
        thread. Other threads' packets are queued as usual (paho never ordered packets across
        threads). Nested blocks write at the outermost end."""
        me = threading.get_ident()
        if me in self._batches:
            yield
            return
        self._batches[me] = (0, [])
        try:
            yield
        finally:
            self._flush_batch(me, self._batches.pop(me))

    def _flush_batch(self, thread: int, batch: tuple[int, list[bytes | bytearray]]) -> None:
        command, packets = batch
        if not packets:
            return
        if thread in self._batches:
            self._batches[thread] = (0, [])
        packet = packets[0] if len(packets) == 1 else b"".join(packets)
        # a joined buffer is neither a QoS 0 PUBLISH nor a DISCONNECT, the only packets paho acts on
        # once written; QoS 1 messages are tracked in _out_messages, not by their queued bytes
        super()._packet_queue(command, packet, 0, 1)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> paho.MQTTErrorCode:
        if self._batches:
            me = threading.get_ident()
            batch = self._batches.get(me)
            if batch is not None:
                kind = command & 0xF0
                if not ((kind == _PUBLISH_COMMAND and qos == 0) or kind == _DISCONNECT_COMMAND):
                    if not batch[1]:
                        batch = self._batches[me] = (command, batch[1])
                    batch[1].append(packet)
                    return paho.MQTT_ERR_SUCCESS
                self._flush_batch(me, batch)  # paho reports these once written: on their own, in order
        return super()._packet_queue(command, packet, mid, qos, info)

    def _sock_recv(self, bufsize: int) -> bytes:
        buffer = self._read_buffer
        pos = self._read_pos
        available = len(buffer) - pos
        if available <= 0:
            data = super()._sock_recv(max(bufsize, _READ_SIZE))  # raises BlockingIOError when empty
            if len(data) <= bufsize:
                return data
            self._read_buffer, self._read_pos = data, bufsize
            return data[:bufsize]
        if bufsize >= available:  # like recv(): what there is, possibly less than asked for
            self._read_buffer, self._read_pos = b"", 0
            return buffer[pos:] if pos else buffer
        self._read_pos = pos + bufsize
        return buffer[pos:pos + bufsize]

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed to paho's packet parser."""
        return len(self._read_buffer) - self._read_pos

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        # the PUBACKs of one read release queued QoS 1 publishes (paho's in-flight window): one write
        with self.batch():
            return self._loop_read(max_packets)

    def _loop_read(self, max_packets: int) -> paho.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # Every complete packet already read goes through now: select() cannot see this buffer. A
        # packet cut at the buffer's end makes _packet_read recv() the rest (or return AGAIN with the
        # buffer empty and the partial packet kept in paho's own state, as without buffering).
        while rc == paho.MQTT_ERR_SUCCESS and self._read_pos < len(self._read_buffer) and self._sock is not None:
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == paho.MQTT_ERR_AGAIN:
                return paho.MQTT_ERR_SUCCESS
        return rc

    def _handle_publish(self) -> paho.MQTTErrorCode:
        packet = self._in_packet["packet"]
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        size = len(packet)
        if qos == 2 or size < 3 or self.on_log is not None or self._logger is not None:
            return super()._handle_publish()
        topic_end = 2 + ((packet[0] << 8) | packet[1])
        pos = topic_end
        mid = 0
        if qos:
            mid = (packet[pos] << 8) | packet[pos + 1] if pos + 2 <= size else 0
            pos += 2
        v5 = self._protocol == paho.MQTTv5
        if v5:
            if pos >= size or packet[pos] != 0:
                return super()._handle_publish()  # properties (or a malformed packet): paho's decoder
            pos += 1
        if topic_end == 2 or pos > size or (mid == 0 and qos):
            return super()._handle_publish()  # an empty topic, a short packet, packet id 0: let paho judge
        message = _Message(mid, bytes(packet[2:topic_end]), qos, bool(header & 0x08), bool(header & 0x01),
                           bytes(packet[pos:]))
        if not v5:
            message.properties = None  # as paho: MQTT 3.1.1 has none
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return paho.MQTT_ERR_SUCCESS

    def _sock_close(self) -> None:
        # a new connection must not start with bytes of the old one
        self._read_buffer, self._read_pos = b"", 0
        super()._sock_close()

    def ack_many(self, messages: Iterable[paho.MQTTMessage]) -> None:
        """Acknowledge the QoS 1 messages with one outgoing buffer (QoS 2 one by one, as ``ack``)."""
        if not self._manual_ack:
            return
        pack = _PUBACK.pack
        pubacks: list[bytes] = []
        for message in messages:
            qos = message.qos
            if qos == 1:
                pubacks.append(pack(_PUBACK_COMMAND, 2, message.mid))
            elif qos == 2:
                self.ack(message.mid, qos)
        if pubacks:
            self._packet_queue(_PUBACK_COMMAND, b"".join(pubacks), 0, 1)
