"""The twin service's configuration: typed, with named defaults, validated with specific messages.

A YAML (or JSON) file, every key optional::

    broker: mqtt://127.0.0.1:1883        # or mqtts://user:password@host:8883
    mqtt: {username: twin, password: ..., ca_file: ca.pem, client_id: twin-1}
    worker_id: twin-1                    # default: host name and process id
    share_group: twin                    # MQTT 5 shared subscription group; omit for a single worker
    affinity: handoff                    # scale-out: handoff (any broker) or broker (EMQX hash_topic)
    tenants: [acme, globex]              # tenants this twin serves; omit for all
    publish_interval_s: 1.0              # at most one retained twin state per device and interval
    fleet_interval_s: 5.0
    max_clock_skew_s: 300                # batches further in the future are dead-lettered
    unknown_device_hold_s: 10            # telemetry before the birth message waits this long
    max_queue: 2000                      # QoS 1 messages in flight to the twin before it acknowledges
    cycle_max_messages: 5000             # messages per ingest cycle (one core call)
    cycle_interval_s: 0.005              # at most one cycle per interval unless the queue is full
    cycle_thread: auto                   # where cycles run: auto, network (paho's thread) or ingest
    core: {max_devices: 1024, channels_per_device: 32}
    snapshot: {dir: /var/lib/forgeline/twin, interval_s: 30}
    influx: {url: http://127.0.0.1:8086, token: "", org: forgeline, bucket: forgeline,
             batch_size: 5000, flush_interval_s: 1.0, interval_s: 10, spill_dir: /var/lib/forgeline/spill}
    metrics: {host: 127.0.0.1, port: 9108}

Examples:
    >>> TwinConfig.from_dict({"publish_interval_s": 0.5}).publish_interval_s
    0.5
    >>> TwinConfig.from_dict({"publish_interval_s": -1})
    Traceback (most recent call last):
    ...
    twin.config.ConfigError: publish_interval_s must be >= 0, got -1
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from forgeline.contract.topics import TopicError, check_ident, check_tenant
from forgeline.mqtt import MqttSettings


class ConfigError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range; the message says which."""


def _default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class InfluxConfig:
    url: str = "http://127.0.0.1:8086"
    token: str = field(default="", repr=False)  # a secret: never in logs
    org: str = "forgeline"
    bucket: str = "forgeline"
    batch_size: int = 5000
    flush_interval_s: float = 1.0
    interval_s: float = 10.0  # downsampling interval of the telemetry / kpi / fleet points
    max_retries: int = 5
    retry_interval_s: float = 0.5
    max_retry_delay_s: float = 30.0
    spill_dir: str | None = None
    max_spill_bytes: int = 1 << 30
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"influx.url must start with http:// or https://, got {self.url!r}")
        for name in ("batch_size", "max_retries", "max_spill_bytes"):
            _positive(f"influx.{name}", getattr(self, name), allow_zero=name == "max_retries")
        for name in ("flush_interval_s", "interval_s", "retry_interval_s", "max_retry_delay_s", "timeout_s"):
            _positive(f"influx.{name}", getattr(self, name))


@dataclass(frozen=True)
class TwinConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    mqtt: dict[str, Any] = field(default_factory=dict)
    worker_id: str = field(default_factory=_default_worker_id)
    share_group: str | None = None
    affinity: str = "handoff"  # scale-out: "handoff" (any broker) or "broker" (EMQX hash_topic), see twin.cluster
    tenants: tuple[str, ...] | None = None
    publish_interval_s: float = 1.0
    fleet_interval_s: float = 5.0
    max_clock_skew_s: float = 300.0
    max_message_bytes: int = 16 * 1024 * 1024  # larger telemetry messages are dead-lettered unread
    dead_letter_rate_per_s: float = 100.0  # per tenant; beyond it dead letters are counted, not published
    unknown_device_hold_s: float = 10.0
    unknown_device_max_messages: int = 1000
    max_queue: int = 2000  # MQTT 5 Receive Maximum: unacknowledged QoS 1 messages (back-pressure), <= 65535
    cycle_max_messages: int = 5000
    cycle_interval_s: float = 0.005  # minimum spacing of ingest cycles: bounds the per-cycle overhead
    # auto: in the ingest thread while messages are large (the nogil kernels overlap paho's reads),
    # in paho's network thread while they are small (Python work only: two threads fight for the GIL)
    cycle_thread: str = "auto"
    max_devices: int = 1024
    channels_per_device: int = 32
    snapshot_dir: str | None = None
    snapshot_interval_s: float = 30.0
    influx: InfluxConfig | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    heartbeat_s: float = 2.0  # worker membership heartbeat (scale-out)
    session_expiry_s: int = 24 * 3600  # the broker keeps our subscriptions and queued messages this long

    def __post_init__(self) -> None:
        try:
            MqttSettings.from_url(self.broker, **self.mqtt)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"broker/mqtt: {exc}") from None
        try:
            check_ident(self.worker_id, "worker_id")
            if self.share_group is not None:
                check_ident(self.share_group, "share_group")
            for tenant in self.tenants or ():
                check_tenant(tenant)
        except TopicError as exc:
            raise ConfigError(str(exc)) from None
        if self.cycle_thread not in ("auto", "network", "ingest"):
            raise ConfigError(f"cycle_thread must be 'auto', 'network' or 'ingest', got {self.cycle_thread!r}")
        if self.affinity not in ("handoff", "broker"):
            raise ConfigError(f"affinity must be 'handoff' or 'broker', got {self.affinity!r}")
        for name in ("publish_interval_s", "snapshot_interval_s", "cycle_interval_s"):
            _positive(name, getattr(self, name), allow_zero=name != "snapshot_interval_s")
        for name in ("fleet_interval_s", "max_clock_skew_s", "unknown_device_hold_s", "heartbeat_s",
                     "dead_letter_rate_per_s"):
            _positive(name, getattr(self, name))
        for name in ("unknown_device_max_messages", "max_queue", "session_expiry_s", "max_message_bytes",
                     "cycle_max_messages", "max_devices", "channels_per_device"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_queue, int) and self.max_queue > 65535:
            raise ConfigError(f"max_queue is the MQTT receive maximum, at most 65535, got {self.max_queue}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:  # 0: any free port
            raise ConfigError(f"metrics.port out of range: {self.metrics_port}")

    def __repr__(self) -> str:  # never print secrets: mqtt.password, credentials in the broker URL
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mqtt":
                value = {k: ("***" if k == "password" and v else v) for k, v in value.items()}
            elif f.name == "broker" and isinstance(value, str) and "@" in value:
                value = f"{value.partition('://')[0]}://***@{value.rpartition('@')[2]}"
            shown.append(f"{f.name}={value!r}")
        return f"TwinConfig({', '.join(shown)})"

    @property
    def mqtt_settings(self) -> MqttSettings:
        return MqttSettings.from_url(self.broker, **{"client_id": self.worker_id, **self.mqtt})

    def with_overrides(self, **changes: Any) -> TwinConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TwinConfig:
        if not isinstance(doc, dict):
            raise ConfigError(f"the configuration must be a mapping, got {type(doc).__name__}")
        doc = dict(doc)
        known = {f.name for f in fields(cls)} | {"core", "snapshot", "metrics"}
        unknown = sorted(repr(k) if not isinstance(k, str) else k for k in set(doc) - known)  # YAML keys may be null
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        core = _section(doc.pop("core", {}), "core", {"max_devices", "channels_per_device"})
        snapshot = _section(doc.pop("snapshot", {}), "snapshot", {"dir", "interval_s"})
        metrics = _section(doc.pop("metrics", {}), "metrics", {"host", "port"})
        doc.update(core)
        if "dir" in snapshot:
            doc["snapshot_dir"] = str(snapshot["dir"])
        if "interval_s" in snapshot:
            doc["snapshot_interval_s"] = snapshot["interval_s"]
        if "host" in metrics:
            doc["metrics_host"] = metrics["host"]
        if "port" in metrics:
            doc["metrics_port"] = metrics["port"]
        if "tenants" in doc and doc["tenants"] is not None:
            if not isinstance(doc["tenants"], list):
                raise ConfigError("tenants must be a list of tenant names")
            doc["tenants"] = tuple(doc["tenants"])
        if doc.get("influx") is not None:
            influx = doc["influx"]
            names = {f.name for f in fields(InfluxConfig)}
            influx = _section(influx, "influx", names)
            try:
                doc["influx"] = InfluxConfig(**influx)
            except TypeError as exc:
                raise ConfigError(f"influx: {exc}") from None
        if "mqtt" in doc and not isinstance(doc["mqtt"], dict):
            raise ConfigError("mqtt must be a mapping of connection settings")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> TwinConfig:
        """Read a YAML or JSON file; raise :class:`ConfigError` naming the file and the problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            if path.suffix == ".json":
                doc = json.loads(text)
            else:
                import yaml

                doc = yaml.safe_load(text) or {}
        except ValueError as exc:  # yaml.YAMLError is a ValueError subclass? not always: catch both below
            raise ConfigError(f"{path}: not valid: {exc}") from None
        except Exception as exc:  # yaml.YAMLError
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        try:
            return cls.from_dict(doc)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _section(value: Any, name: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}")
    unknown = sorted(repr(k) if not isinstance(k, str) else k for k in set(value) - allowed)
    if unknown:
        raise ConfigError(f"unknown {name} keys: {', '.join(unknown)}")
    return dict(value)
