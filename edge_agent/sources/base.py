"""The one small interface every source implements, and what a source writes into.

A source reads one or more devices (a simulator, a printer's REST API, a PLC over OPC UA or
Modbus) and writes samples and events into a :class:`DeviceStream` per device, which the
publisher batches, numbers, spools and sends. A source runs in a thread of its own
(:meth:`Source.run` returns soon after ``stop`` is set) and never raises for a device that is
unreachable: it reports the ``state`` channel as ``OFFLINE`` and keeps trying.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from edge_agent.device import DeviceInfo


class CommandError(ValueError):
    """A command a source cannot carry out; the message goes back in the error response."""


class SourceError(RuntimeError):
    """A source that cannot be set up (bad address, missing library); the message says what to fix."""


class DeviceStream(Protocol):
    """Where a source writes one device's data. Thread-safe."""

    @property
    def info(self) -> DeviceInfo: ...

    def add(self, channel: int, t_us: int, value: float) -> None:
        """One sample of channel number ``channel`` (index into ``info.channels``) at ``t_us`` µs."""

    def extend(self, channels: Sequence[int], t_us: Sequence[int], values: Sequence[float]) -> None:
        """Many samples at once (columns of equal length)."""

    def event(self, document: dict[str, Any]) -> None:
        """A device event (schema ``event``); samples added before it are published before it."""

    def announce(self, info: DeviceInfo) -> None:
        """New device metadata (product revision, materials): publishes a new birth message.

        The channel list must stay the same (it is the telemetry channel table)."""


class Sink(Protocol):
    def stream(self, info: DeviceInfo) -> DeviceStream: ...


class Source(ABC):
    """A source of telemetry for one or more devices."""

    #: the ``type`` of this source in the config file
    kind: str = "source"

    def __init__(self) -> None:
        self._rates: dict[str, float] = {}

    @abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """The devices this source publishes for (known before :meth:`run`)."""

    @abstractmethod
    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Read devices and write into ``sink.stream(info)`` until ``stop`` is set."""

    def rate_hz(self, device_key: str) -> float:
        """The sampling (or polling) rate of a device, changed by ``set_config``."""
        if device_key in self._rates:
            return self._rates[device_key]
        for info in self.devices():
            if info.key == device_key:
                return info.rate_hz
        raise KeyError(device_key)

    def set_config(self, device_key: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Apply ``set_config`` settings this source understands; return what was applied.

        The base class knows ``rate_hz``; sources extend this (the line simulator takes a new
        ``product_revision``). Unknown keys raise :class:`CommandError`.
        """
        for key, value in settings.items():  # check everything before changing anything
            if key != "rate_hz":
                raise CommandError(f"{self.kind} source does not support setting {key!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1000:
                raise CommandError(f"rate_hz must be a number in (0, 1000], not {value!r}")
        applied: dict[str, Any] = {}
        if "rate_hz" in settings:
            self._rates[device_key] = float(settings["rate_hz"])
            applied["rate_hz"] = float(settings["rate_hz"])
        return applied

    def dispatch_job(self, device_key: str, job: Mapping[str, Any]) -> dict[str, Any]:
        """Queue a build job on a device; sources that cannot start jobs refuse."""
        raise CommandError(f"{self.kind} source cannot start jobs")

    def status(self) -> dict[str, Any]:
        """Counters for the agent's stats (reads, errors, reconnects)."""
        return {}


class DeviceAdapter(Source):
    """A source that reads one real device (OctoPrint, Moonraker, OPC UA, Modbus).

    Counts errors and logs each distinct one once, so a device that stays unreachable for hours does
    not flood the log; ``last_error`` goes into the source's status.
    """

    def __init__(self, info: DeviceInfo) -> None:
        super().__init__()
        self.info = info
        self.errors = 0
        self.last_error: str | None = None

    def devices(self) -> list[DeviceInfo]:
        return [self.info]

    def _error(self, message: str) -> None:
        self.errors += 1
        if message != self.last_error:
            logging.getLogger(type(self).__module__).warning("%s: %s", self.info.key, message)
        self.last_error = message
