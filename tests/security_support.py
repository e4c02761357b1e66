"""Helpers for the security tests: a probe client that records SUBACK/PUBACK reason codes and
messages, and raw MQTT packets for tests that speak to the broker below paho."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from forgeline.mqtt import MqttSettings, connect, remaining_length


@dataclass
class Probe:
    """A connected paho client that keeps every message, SUBACK and PUBACK it gets."""

    client: paho.Client
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)  # topic, payload, retain
    subacks: dict[int, list[Any]] = field(default_factory=dict)
    pubacks: dict[int, Any] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def subscribe(self, *filters: str, timeout: float = 10) -> list[Any]:
        """Subscribe with QoS 1 and return the SUBACK reason codes."""
        _rc, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None, "SUBSCRIBE was not sent"
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.subacks, timeout):
                raise AssertionError(f"no SUBACK for {filters}")
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False, timeout: float = 10) -> Any:
        """Publish with QoS 1 and return the PUBACK reason code (MQTT 5)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.cond:
            if not self.cond.wait_for(lambda: info.mid in self.pubacks, timeout):
                raise AssertionError(f"no PUBACK for {topic}")
            return self.pubacks[info.mid]

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 10) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.messages), timeout):
                topics = sorted({m[0] for m in self.messages})[:20]
                raise AssertionError(f"condition not met within {timeout}s; got {len(self.messages)} on {topics}")

    def wait_topic(self, topic: str, payload: bytes | None = None, timeout: float = 10) -> None:
        self.wait_for(lambda ms: any(t == topic and (payload is None or p == payload) for t, p, _ in ms), timeout)

    def received(self, predicate: Callable[[str], bool]) -> list[tuple[str, bytes, bool]]:
        with self.cond:
            return [m for m in self.messages if predicate(m[0])]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def probe(settings: MqttSettings, **kw: Any) -> Probe:
    client = connect(settings, **kw)
    p = Probe(client)

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with p.cond:
            p.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            p.cond.notify_all()

    def on_subscribe(_c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        with p.cond:
            p.subacks[mid] = list(codes)
            p.cond.notify_all()

    def on_publish(_c: Any, _u: Any, mid: int, code: Any, _p: Any) -> None:
        with p.cond:
            p.pubacks[mid] = code
            p.cond.notify_all()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    return p


# --- raw MQTT packets ---------------------------------------------------------------------------


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, username: str | None = None, password: str | None = None,
                   keepalive: int = 30) -> bytes:
    """An MQTT 3.1.1 CONNECT packet (clean session)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _str(client_id)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return bytes([0x10]) + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet at QoS 0."""
    body = _str(topic) + payload
    return bytes([0x30]) + remaining_length(len(body)) + body


def tls_socket(host: str, port: int, ca_file: str, cert: tuple[str, str] | None, timeout: float = 5) -> ssl.SSLSocket:
    """A TLS connection to the broker (the handshake completes on our side; with TLS 1.3 the server
    may still reject the client certificate afterwards)."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert:
        context.load_cert_chain(*cert)
    raw = socket.create_connection((host, port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname=host)


def mqtt_over_tls_outcome(settings: MqttSettings, cert: tuple[str, str] | None, timeout: float = 5) -> str:
    """Try TLS + CONNECT below paho and say what happened: 'connack:<code>', 'tls-error:<reason>'
    or 'closed' (the broker dropped the connection without a CONNACK)."""
    try:
        sock = tls_socket(settings.host, settings.port, settings.ca_file or "", cert, timeout)
    except ssl.SSLError as exc:
        return f"tls-error:{exc.reason or exc}"
    except OSError as exc:
        return f"tls-error:{exc}"
    try:
        sock.sendall(connect_packet(f"probe{time.monotonic_ns()}", settings.username, settings.password))
        data = sock.recv(4)
    except ssl.SSLError as exc:
        return f"tls-error:{exc.reason or exc}"
    except OSError:
        return "closed"
    finally:
        sock.close()
    if len(data) >= 4 and data[0] == 0x20:
        return f"connack:{data[3]}"
    return "closed"
