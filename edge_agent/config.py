"""The agent's config file (YAML or JSON), validated at start with messages that name the bad key.

Layout (see ``edge_agent/examples/`` and docs/agent.md for every key)::

    mqtt:    {url, protocol, username, password | password_file, tls: {ca_file, cert_file, key_file, insecure},
              keepalive}
    batch:   {max_samples, window_s}
    spool:   {path, max_bytes, overflow: drop_oldest | drop_newest, synchronous: normal | full}
    link:    {inflight, reconnect_min_s, reconnect_max_s, client_id_prefix}
    drain_timeout_s: 5
    sources: [{type: simulator | octoprint | moonraker | opcua | modbus, ...}]

Every source section is read by its own module's ``from_config(section)``. Unknown keys are errors
(with a "did you mean" hint), so a misspelt ``rate_hz`` never silently falls back to a default.

Example:
    >>> load_config_text("mqtt: {url: 'mqtt://127.0.0.1:1883'}\\nsources: []\\nbatch: {max_sampels: 10}")
    Traceback (most recent call last):
    ...
    edge_agent.config.ConfigError: batch.max_sampels: unknown key (did you mean 'max_samples'?)
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.publisher import BatchSettings, LinkSettings
from edge_agent.spool import OVERFLOW_POLICIES, SYNCHRONOUS_MODES
from forgeline.contract.topics import DeviceRef, TopicError
from forgeline.mqtt import MqttSettings

if TYPE_CHECKING:
    from edge_agent.sources.base import Source


class ConfigError(ValueError):
    """A config problem; the message starts with the path of the bad key (``sources[1].url``)."""


_MISSING: Any = object()
_SECRET_KEY = re.compile(r"pass(word|wd)|secret|token|key", re.IGNORECASE)


class Section:
    """A validating view of one mapping of the config; records which keys were read."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or '(top level)'}: must be a mapping, not {type(data).__name__}")
        self.data = data
        self.path = path
        self._read: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                typo = difflib.get_close_matches(key, [str(k) for k in self.data if k not in self._read], n=1)
                raise self.error(key, f"required (is {typo[0]!r} a typo?)" if typo else "required")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = _MISSING, *, choices: Sequence[str] | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            # A password written as a number or a list must not end up in a log line.
            shown = type(value).__name__ if _SECRET_KEY.search(key) else repr(value)
            raise self.error(key, f"must be a non-empty string, not {shown}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
        integer: bool = False,
    ) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            raise self.error(key, f"must be {kind}, not {value!r}")
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, not {value!r}")
        if positive and value <= 0:
            raise self.error(key, f"must be positive, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, not {value!r}")
        return int(value) if integer else float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def items(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {type(value).__name__}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self.items(key, default)
        if value is default and default is not _MISSING:
            return value
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(f"{key}[{i}]", f"must be a non-empty string, not {item!r}")
        return tuple(value)

    def vec3(self, key: str, default: Any = _MISSING) -> Any:
        value = self.items(key, default)
        if value is default and default is not _MISSING:
            return value
        if len(value) != 3 or any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in value):
            raise self.error(key, f"must be three positive numbers (x, y, z in mm), not {value!r}")
        return (float(value[0]), float(value[1]), float(value[2]))

    def section(self, key: str, *, required: bool = False) -> Section:
        value = self.raw(key, _MISSING if required else {})
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, not {type(value).__name__}")
        return Section(value, self.where(key))

    def sections(self, key: str, default: Any = _MISSING) -> list[Section]:
        items = self.items(key, default)
        return [Section(item, f"{self.where(key)}[{i}]") for i, item in enumerate(items)]

    def mapping_of_str(self, key: str) -> dict[str, str]:
        value = self.raw(key, {})
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(key, "must be a mapping of strings to strings")
        return dict(value)

    def device_ref(self, defaults: Mapping[str, str] | None = None) -> DeviceRef:
        """``tenant``, ``site``, ``area``, ``device`` keys (falling back to ``defaults``) as a DeviceRef."""
        parts: dict[str, str] = {}
        for key in ("tenant", "site", "area", "device"):
            fallback = (defaults or {}).get(key, _MISSING)
            parts[key] = self.text(key, fallback)
        try:
            return DeviceRef(parts["tenant"], parts["site"], parts["area"], parts["device"])
        except TopicError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None

    def done(self) -> None:
        """Raise for the first key nobody read (a typo or an option of another source type)."""
        for key in self.data:
            if key not in self._read:
                hint = difflib.get_close_matches(str(key), sorted(self._read), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.error(str(key), f"unknown key{suffix}")


# --- the agent's own sections --------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolSettings:
    path: str = "forgeline-agent-spool.db"
    max_bytes: int = 256 * 1024 * 1024
    overflow: str = "drop_oldest"
    synchronous: str = "normal"


@dataclass(frozen=True)
class AgentConfig:
    mqtt: MqttSettings
    batch: BatchSettings = field(default_factory=BatchSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    link: LinkSettings = field(default_factory=LinkSettings)
    drain_timeout_s: float = 5.0
    sources: tuple[Source, ...] = ()
    base_dir: Path = field(default_factory=Path.cwd)


def _mqtt(section: Section, base_dir: Path) -> MqttSettings:
    url = section.text("url", "mqtt://127.0.0.1:1883")
    protocol_text = section.raw("protocol", 5)
    protocols = {5: 5, "5": 5, "5.0": 5, 4: 4, "4": 4, "3.1.1": 4, 3.1: 4, "v5": 5, "v311": 4}
    if not isinstance(protocol_text, int | float | str) or protocol_text not in protocols:  # a list is unhashable
        raise section.error("protocol", f"must be 5 or 3.1.1, not {protocol_text!r}")
    username = section.text("username", None)
    password = section.text("password", None)
    password_file = section.text("password_file", None)
    if password is not None and password_file is not None:
        raise section.error("password_file", "give password or password_file, not both")
    if password_file is not None:
        path = base_dir / password_file
        try:
            password = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise section.error("password_file", f"cannot read {path}: {exc.strerror}") from None
    if password is not None and username is None:
        raise section.error("password", "requires username")
    tls = section.section("tls")
    files: dict[str, str | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        name = tls.text(key, None)
        if name is not None:
            path = base_dir / name
            if not path.is_file():
                raise tls.error(key, f"no such file: {path}")
            name = str(path)
        files[key] = name
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise tls.error("key_file" if files["cert_file"] else "cert_file", "cert_file and key_file go together")
    insecure = tls.flag("insecure", False)
    tls_on = tls.flag("enabled", bool(tls.data)) if tls.data else False
    tls.done()
    keepalive = section.number("keepalive", 30, minimum=5, maximum=3600, integer=True)
    section.done()
    try:
        settings = MqttSettings.from_url(url, protocol=protocols[protocol_text], keepalive=keepalive)
    except ValueError as exc:
        raise ConfigError(f"{section.where('url')}: {exc}") from None
    return MqttSettings(
        host=settings.host,
        port=settings.port,
        protocol=settings.protocol,
        username=username if username is not None else settings.username,
        password=password if password is not None else settings.password,
        tls=settings.tls or tls_on,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        tls_insecure=insecure,
        keepalive=keepalive,
    )


def parse_config(data: Any, base_dir: Path | None = None) -> AgentConfig:
    """Validate a parsed config document; raise :class:`ConfigError` naming the first bad key."""
    base = base_dir or Path.cwd()
    top = Section(data if data is not None else {}, "")
    mqtt = _mqtt(top.section("mqtt"), base)
    batch_section = top.section("batch")
    batch = BatchSettings(
        max_samples=batch_section.number("max_samples", 1000, minimum=1, maximum=1_000_000, integer=True),
        window_s=batch_section.number("window_s", 1.0, positive=True, maximum=3600),
    )
    batch_section.done()
    spool_section = top.section("spool")
    spool_path = spool_section.text("path", "forgeline-agent-spool.db")
    spool = SpoolSettings(
        path=spool_path if spool_path == ":memory:" else str(base / spool_path),
        max_bytes=spool_section.number("max_bytes", 256 * 1024 * 1024, minimum=64 * 1024, integer=True),
        overflow=spool_section.text("overflow", "drop_oldest", choices=OVERFLOW_POLICIES),
        synchronous=spool_section.text("synchronous", "normal", choices=SYNCHRONOUS_MODES),
    )
    spool_section.done()
    link_section = top.section("link")
    reconnect_min = link_section.number("reconnect_min_s", 0.2, positive=True, maximum=60)
    reconnect_max = link_section.number("reconnect_max_s", 5.0, positive=True, maximum=3600)
    if reconnect_max < reconnect_min:
        raise link_section.error("reconnect_max_s", "must be at least reconnect_min_s")
    prefix = link_section.text("client_id_prefix", "fl-agent")
    link = LinkSettings(
        inflight=link_section.number("inflight", 100, minimum=1, maximum=1000, integer=True),
        reconnect_min_s=reconnect_min,
        reconnect_max_s=reconnect_max,
        client_id_prefix=prefix,
    )
    link_section.done()
    drain = top.number("drain_timeout_s", 5.0, minimum=0, maximum=600)
    from edge_agent.sources import build_source

    sections = top.sections("sources")
    if not sections:
        raise top.error("sources", "needs at least one source")
    sources = tuple(build_source(section, base) for section in sections)
    keys = [info.key for source in sources for info in source.devices()]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise top.error("sources", f"device {duplicates[0]} is defined twice")
    top.done()
    return AgentConfig(mqtt, batch, spool, link, drain, sources, base)


def load_config_text(text: str, base_dir: Path | None = None, *, suffix: str = ".yaml") -> AgentConfig:
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"(file): not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError("(file): nested too deeply") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"(file): not valid YAML: {exc}") from None
        except RecursionError:
            raise ConfigError("(file): nested too deeply") from None
    return parse_config(data, base_dir)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a config file; relative paths in it are relative to the file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    try:
        return load_config_text(text, file.resolve().parent, suffix=file.suffix.lower())
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
