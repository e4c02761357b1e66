"""The twin's paho client (twin/mqtt_client.py) against stock paho: the same messages from the same
bytes (however the stream is cut into socket reads), the same PUBACK bytes, and the whole twin over a
real Mosquitto with it."""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forgeline.mqtt import MqttSettings, make_client, remaining_length
from twin.mqtt_client import TwinClient, supported

pytestmark = pytest.mark.skipif(not supported(), reason="this paho lacks the internals TwinClient builds on")


def publish_packet(topic: bytes, payload: bytes, *, qos: int = 1, mid: int = 1, dup: bool = False,
                   retain: bool = False, properties: bytes | None = b"\x00") -> bytes:
    """A PUBLISH packet as a broker sends it (``properties`` None: MQTT 3.1.1, no property block)."""
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if properties is not None:
        body += properties
    body += payload
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes([header]) + remaining_length(len(body)) + body


def _props(**values: Any) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return bytes(props.pack())


def _packets(protocol: int) -> list[bytes]:
    rng = random.Random(7)
    v5 = protocol == paho.MQTTv5
    out = []
    for k in range(60):
        qos = k % 2
        payload = rng.randbytes(rng.choice([0, 1, 13, 127, 128, 5000, 14_232, 70_000]))
        props: bytes | None = b"\x00" if v5 else None
        if v5 and k % 7 == 3:
            props = _props(ContentType="application/octet-stream", UserProperty=[("a", "b")])
        if v5 and k % 11 == 5:
            props = _props(MessageExpiryInterval=60)
        out.append(publish_packet(f"forgeline/v1/acme/telemetry/s/a/d{k}".encode(), payload, qos=qos,
                                  mid=1 + k, dup=k % 5 == 0 and qos > 0, retain=k % 3 == 0, properties=props))
    return out


def _received(client_class: type[paho.Client], protocol: int, stream: bytes, cuts: list[int],
              manual_ack: bool = True) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Feed ``stream`` through a socket pair in pieces (split at ``cuts``), run the client's loop_read
    as its network loop would, and return what its on_message saw and what it queued to send."""
    client = client_class(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol)
    client.manual_ack_set(manual_ack)
    seen: list[dict[str, Any]] = []

    def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        seen.append({"topic": message.topic, "payload": bytes(message.payload), "qos": message.qos,
                     "mid": message.mid, "dup": message.dup, "retain": message.retain,
                     "properties": None if message.properties is None else str(message.properties),
                     "type": isinstance(message, paho.MQTTMessage)})

    client.on_message = on_message
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    client._sock = ours

    def pump() -> None:
        # what paho's network loop does: loop_read while select() says the socket is readable
        while select.select([ours], [], [], 0)[0]:
            assert client.loop_read() == paho.MQTT_ERR_SUCCESS
            if isinstance(client, TwinClient):
                assert client.buffered == 0  # nothing left where select() cannot see it

    try:
        start = 0
        for end in [*cuts, len(stream)]:
            piece = stream[start:end]
            start = end
            while piece:
                try:
                    piece = piece[theirs.send(piece):]
                except BlockingIOError:
                    pump()
            pump()
        # without a network thread paho writes queued packets at once: what reached the other end, then
        # anything still queued
        written = b""
        while select.select([theirs], [], [], 0)[0]:
            written += theirs.recv(1 << 16)
        queued = [written, *(bytes(p["packet"]) for p in client._out_packet)]
    finally:
        client._sock = None
        ours.close()
        theirs.close()
    return seen, queued


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
@pytest.mark.parametrize("pieces", ["whole", "bytes", "random"])
def test_same_messages_as_stock_paho_however_the_stream_is_cut(protocol: int, pieces: str) -> None:
    stream = b"".join(_packets(protocol))
    if pieces == "whole":
        cuts: list[int] = []
    elif pieces == "bytes":  # the worst case: one byte per socket read near packet boundaries
        cuts = sorted({min(len(stream) - 1, i + d) for i in range(0, len(stream), 9000) for d in range(6)})
    else:
        rng = random.Random(3)
        cuts = sorted(rng.sample(range(1, len(stream)), 40))
    ours, _ = _received(TwinClient, protocol, stream, cuts)
    stock, _ = _received(paho.Client, protocol, stream, cuts)
    assert len(ours) == len(stock) == 60
    assert ours == stock


def test_automatic_acknowledgement_queues_the_same_pubacks() -> None:
    stream = b"".join(_packets(paho.MQTTv5))
    ours, ours_out = _received(TwinClient, paho.MQTTv5, stream, [], manual_ack=False)
    stock, stock_out = _received(paho.Client, paho.MQTTv5, stream, [], manual_ack=False)
    assert ours == stock
    assert ours_out == stock_out and len(b"".join(stock_out)) == 30 * 4  # 30 QoS 1 messages


def test_ack_many_writes_the_bytes_of_ack_one_by_one() -> None:
    messages = []
    for k, qos in enumerate([1, 0, 1, 1, 0, 1]):
        message = paho.MQTTMessage(mid=100 + k, topic=b"x")
        message.qos = qos
        messages.append(message)
    stock = paho.Client(CallbackAPIVersion.VERSION2, client_id="s", protocol=paho.MQTTv5)
    stock.manual_ack_set(True)
    for message in messages:
        if message.qos:
            stock.ack(message.mid, message.qos)
    ours = TwinClient(CallbackAPIVersion.VERSION2, client_id="o", protocol=paho.MQTTv5)
    ours.manual_ack_set(True)
    ours.ack_many(messages)
    assert len(ours._out_packet) == 1  # one write
    assert bytes(ours._out_packet[0]["packet"]) == b"".join(bytes(p["packet"]) for p in stock._out_packet)
    assert bytes(ours._out_packet[0]["packet"]) == b"".join(struct.pack("!BBH", 0x40, 2, 100 + k) for k in (0, 2, 3, 5))


def test_lazy_properties_and_info_of_a_fast_decoded_message() -> None:
    seen, _ = _received(TwinClient, paho.MQTTv5, publish_packet(b"a/b", b"xyz", mid=9), [])
    assert seen[0]["properties"] == str(Properties(PacketTypes.PUBLISH))
    client = TwinClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv5)
    got: list[paho.MQTTMessage] = []
    client.on_message = lambda _c, _u, m: got.append(m)
    client._in_packet["command"] = 0x32
    client._in_packet["packet"] = bytearray(publish_packet(b"a/b", b"xyz", mid=9)[2:])
    client._handle_publish()
    message = got[0]
    assert type(message) is not paho.MQTTMessage  # the fast decoding, not paho's
    assert message.info.mid == 9 and message.info is message.info
    message.properties = None
    assert message.properties is None


def _offline(cls: type[paho.Client]) -> paho.Client:
    """A client whose queued packets stay in ``_out_packet`` (a socket to make paho queue, and a network
    thread it believes runs, so nothing is written)."""
    client = cls(CallbackAPIVersion.VERSION2, client_id="c", protocol=paho.MQTTv5)
    client.manual_ack_set(True)
    client._sock = socket.socket()
    client._thread = threading.Thread(target=lambda: None)
    return client


def _traffic(client: paho.Client) -> None:
    client.ack(7, 1)
    for k in range(5):
        client.publish(f"t/{k}", f"state {k}".encode(), qos=1, retain=True)
    client.publish("t/q0", b"at most once", qos=0)  # paho reports it once written: queued on its own
    client.ack(8, 1)
    client.publish("t/last", b"x" * 300, qos=1)


def test_batch_queues_the_same_bytes_as_one_write() -> None:
    stock, ours = _offline(paho.Client), _offline(TwinClient)
    try:
        _traffic(stock)
        with ours.batch():
            with ours.batch():  # nested: the outer block writes
                _traffic(ours)
            assert not ours._out_packet or len(ours._out_packet) == 2  # only what the QoS 0 publish flushed
        stock_bytes = [bytes(p["packet"]) for p in stock._out_packet]
        ours_bytes = [bytes(p["packet"]) for p in ours._out_packet]
        assert len(stock_bytes) == 9 and len(ours_bytes) == 3  # before, the QoS 0 publish, after
        assert b"".join(ours_bytes) == b"".join(stock_bytes)
        assert ours_bytes[1] == stock_bytes[6] and ours._out_packet[1]["qos"] == 0
        # paho still tracks every QoS 1 message (PUBACK, a resend after a reconnect)
        assert sorted(ours._out_messages) == sorted(stock._out_messages) and len(ours._out_messages) == 6
    finally:
        stock._sock.close()
        ours._sock.close()


def test_batch_leaves_other_threads_packets_alone() -> None:
    client = _offline(TwinClient)
    try:
        with client.batch():
            client.publish("mine/1", b"a", qos=1)
            other = threading.Thread(target=lambda: client.publish("theirs", b"b", qos=1))
            other.start()
            other.join()
            assert [bytes(p["packet"])[-1:] for p in client._out_packet] == [b"b"]  # queued at once
            client.publish("mine/2", b"c", qos=1)
        assert len(client._out_packet) == 2
        mine = bytes(client._out_packet[1]["packet"])
        assert b"theirs" not in mine and mine.index(b"mine/1") < mine.index(b"mine/2")
    finally:
        client._sock.close()


def test_batched_publishes_beyond_the_in_flight_window_all_arrive_in_order(
    mqtt_settings: MqttSettings, collect: Callable[..., Any], tenant: str
) -> None:
    """Over a real Mosquitto: 300 QoS 1 publishes in one batch with an in-flight window of 8. The
    first 8 go out in the batch's write; the rest wait in paho's queue and are released by PUBACKs,
    which the network thread handles in its own batches. Every one is acknowledged and arrives, in
    order."""
    watch = collect(f"{tenant}/#")
    client = make_client(mqtt_settings, client_class=TwinClient)
    client.max_inflight_messages_set(8)  # before connecting: paho refuses it later
    client.connect(mqtt_settings.host, mqtt_settings.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        acked: list[int] = []
        client.on_publish = lambda _c, _u, mid, _rc, _p: acked.append(mid)
        with client.batch():
            infos = [client.publish(f"{tenant}/s", str(k).encode(), qos=1) for k in range(300)]
        got = watch.wait_for(lambda m: len(m) >= 300)
        assert [int(m.payload) for m in got] == list(range(300))
        deadline = time.monotonic() + 10
        while len(acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(acked) == sorted(info.mid for info in infos)
        assert not client._out_messages  # nothing left in flight or queued
    finally:
        client.disconnect()
        client.loop_stop()
