"""Connection settings and a paho-mqtt 2.x client factory shared by the agent, the twin and tools.

Keeps paho's API behind one small, typed surface: ``MqttSettings`` (validated) and
``connect(settings, ...)`` which returns a connected client with its network loop running.
"""

from __future__ import annotations

import os
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class MqttError(RuntimeError):
    """A connection or protocol problem with the broker; the message says which broker and why."""


class SubscribeTimeout(MqttError, TimeoutError):
    """No SUBACK from the broker in time."""


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: int = 5  # 5 or 4 (= MQTT 3.1.1)
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip hostname check (development CA on an IP address)
    keepalive: int = 30
    client_id: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in (4, 5):
            raise ValueError(f"mqtt protocol must be 5 or 4 (3.1.1), not {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"mqtt port out of range: {self.port}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt cert_file and key_file go together")
        if self.password is not None and self.username is None:
            raise ValueError("mqtt password requires username")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttSettings:
        """``mqtt://host:port`` or ``mqtts://host:port`` (TLS); ``mqtts://user:password@host:port`` also
        sets the credentials (percent-decoded; the password appears in no error message or repr)."""
        if not isinstance(url, str):
            raise ValueError(f"broker URL must be a string like mqtt://host:1883, not {type(url).__name__}")
        # Credentials are cut off before anything can echo the URL back.
        userinfo, at, address = url.rpartition("@")
        shown = f"<credentials>@{address}" if at else url
        scheme, _, rest = (userinfo if at else url).partition("://")
        if at:
            user, has_password, password = rest.partition(":")
            overrides.setdefault("username", unquote(user))
            if has_password:
                overrides.setdefault("password", unquote(password))
            rest = address
        if scheme not in ("mqtt", "mqtts") or not rest:
            raise ValueError(f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, not {shown!r}")
        host, _, port = rest.rstrip("/").rpartition(":")
        if not host:
            host, port = port, ("8883" if scheme == "mqtts" else "1883")
        return cls(host=host, port=int(port), tls=scheme == "mqtts", **overrides)

    @classmethod
    def from_env(cls, **overrides: Any) -> MqttSettings:
        """From ``FORGELINE_MQTT_URL`` (default mqtt://127.0.0.1:1883)."""
        return cls.from_url(os.environ.get("FORGELINE_MQTT_URL", "mqtt://127.0.0.1:1883"), **overrides)

    def __repr__(self) -> str:  # never print the password
        pw = "***" if self.password else None
        return (
            f"MqttSettings(host={self.host!r}, port={self.port}, protocol={self.protocol}, "
            f"username={self.username!r}, password={pw}, tls={self.tls})"
        )


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (a fixed header's remaining length), for tools that write raw
    packets: the latency bench's load generator and the tests' hand-made packets."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def make_client(settings: MqttSettings, client_id: str | None = None, *, clean: bool = True,
                client_class: type[paho.Client] = paho.Client) -> paho.Client:
    """A configured, not yet connected paho client (``client_class``: paho's or a subclass)."""
    cid = client_id or settings.client_id or f"fl-{uuid.uuid4().hex[:12]}"
    if settings.protocol == 5:
        client = client_class(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
    else:
        client = client_class(
            CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv311, clean_session=clean
        )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        if settings.tls_insecure:
            context.check_hostname = False
        client.tls_set_context(context)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    return client


def connect(
    settings: MqttSettings,
    client_id: str | None = None,
    *,
    clean: bool = True,
    session_expiry: int | None = None,
    timeout: float = 10.0,
    loop: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
    client_class: type[paho.Client] = paho.Client,
) -> paho.Client:
    """Connect and wait for CONNACK; raise :class:`MqttError` with the broker's reason on failure.

    ``will`` is ``(topic, payload, qos, retain)``. With ``loop`` the network loop runs in paho's thread.
    """
    client = make_client(settings, client_id, clean=clean, client_class=client_class)
    if will is not None:
        client.will_set(will[0], will[1], qos=will[2], retain=will[3])
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: paho.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        result["rc"] = reason_code
        done.set()

    client.on_connect = on_connect
    props = None
    if settings.protocol == 5:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry is not None:
            props.SessionExpiryInterval = session_expiry
    try:
        if settings.protocol == 5:
            client.connect(settings.host, settings.port, settings.keepalive, clean_start=clean, properties=props)
        else:
            client.connect(settings.host, settings.port, settings.keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise MqttError(f"cannot connect to {settings.host}:{settings.port}: {exc}") from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise MqttError(f"no CONNACK from {settings.host}:{settings.port} within {timeout:.0f}s")
    rc = result["rc"]
    if getattr(rc, "is_failure", False):
        client.loop_stop()
        raise MqttError(f"broker {settings.host}:{settings.port} refused the connection: {rc}")
    client.on_connect = None
    if not loop:
        client.loop_stop()
    return client


def subscribe_all(client: paho.Client, filters: list[str], *, what: str, qos: int = 1, timeout: float = 10.0) -> None:
    """Subscribe ``client`` to ``filters`` and wait for the SUBACK.

    Without one in ``timeout`` seconds the client is disconnected and :class:`SubscribeTimeout` says which
    service (``what``) and which broker.
    """
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.subscribe([(f, qos) for f in filters])
    if not subscribed.wait(timeout):
        host, port = client.host, client.port
        client.disconnect()
        client.loop_stop()
        raise SubscribeTimeout(f"{what}: no SUBACK from {host}:{port} within {timeout:.0f}s")
