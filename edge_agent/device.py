"""What the agent knows about one device it publishes for: identity, channels, capabilities.

A source describes each of its devices with a :class:`DeviceInfo`; the publisher turns it into the
retained birth message (schema ``status``) and uses its channel list as the telemetry channel table.

Example:
    >>> from forgeline.contract.topics import DeviceRef
    >>> info = DeviceInfo(DeviceRef("acme", "plant1", "hall1", "fdm-01"), "FDM",
    ...                   channels=("state", "nozzle_temp"), materials=("PLA",), build_volume_mm=(250, 210, 220))
    >>> birth = info.birth(ts=1.0, epoch=7)
    >>> birth["channels"][1]
    {'name': 'nozzle_temp', 'unit': 'degC', 'rate_hz': 1.0}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forgeline.contract.topics import DeviceRef
from forgeline.contract.vocabulary import CHANNELS, Technology, check_channel_unit

AGENT_VERSION = "0.1.0"


def unit_of(channel: str, custom_units: Mapping[str, str] | None = None) -> str:
    """The catalog unit of ``channel``; custom ``x_`` channels take theirs from ``custom_units`` (or '')."""
    entry = CHANNELS.get(channel)
    if entry is not None:
        return entry.unit
    if not channel.startswith("x_"):
        raise ValueError(f"unknown channel {channel!r}: not in the catalog, and custom channels start with 'x_'")
    return (custom_units or {}).get(channel, "")


@dataclass(frozen=True)
class DeviceInfo:
    """Identity and capabilities of one device, as announced in its birth message."""

    ref: DeviceRef
    technology: str
    channels: tuple[str, ...]
    vendor: str | None = None
    model: str | None = None
    product_model: str | None = None
    product_revision: str | None = None
    materials: tuple[str, ...] = ()
    build_volume_mm: tuple[float, float, float] | None = None
    part_spacing_mm: float | None = None
    cost_per_hour: float | None = None
    planned_cycle_time_s: float | None = None
    rate_hz: float = 1.0
    custom_units: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Technology(self.technology)  # raises ValueError naming the bad value
        if not self.channels:
            raise ValueError(f"device {self.ref.key} has no channels")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"device {self.ref.key} lists a channel twice: {list(self.channels)}")
        for name in self.channels:
            check_channel_unit(name, unit_of(name, self.custom_units))
        if self.build_volume_mm is not None and (
            len(self.build_volume_mm) != 3 or min(self.build_volume_mm) <= 0
        ):
            raise ValueError(f"device {self.ref.key}: build_volume_mm needs three positive numbers")

    @property
    def key(self) -> str:
        return self.ref.key

    def channel_index(self, name: str) -> int:
        return self.channels.index(name)

    def birth(self, ts: float, epoch: int, rate_hz: float | None = None) -> dict[str, Any]:
        """The retained ``online`` status document (schema ``status``)."""
        rate = rate_hz if rate_hz is not None else self.rate_hz
        doc: dict[str, Any] = {
            "status": "online",
            "ts": round(ts, 6),
            "epoch": epoch,
            "technology": str(Technology(self.technology).value),
            "channels": [
                {"name": name, "unit": unit_of(name, self.custom_units), "rate_hz": rate} for name in self.channels
            ],
            "agent_version": AGENT_VERSION,
        }
        optional: dict[str, Any] = {
            "vendor": self.vendor,
            "model": self.model,
            "product_model": self.product_model,
            "product_revision": self.product_revision,
            "part_spacing_mm": self.part_spacing_mm,
            "cost_per_hour": self.cost_per_hour,
            "planned_cycle_time_s": self.planned_cycle_time_s,
        }
        doc.update({k: v for k, v in optional.items() if v is not None})
        if self.materials:
            doc["materials"] = list(self.materials)
        if self.build_volume_mm is not None:
            doc["build_volume_mm"] = [float(v) for v in self.build_volume_mm]
        if self.labels:
            doc["labels"] = dict(self.labels)
        return doc


def offline_document(ts: float, reason: str) -> dict[str, Any]:
    """The ``offline`` status document (last will, and the clean-shutdown message)."""
    return {"status": "offline", "ts": round(ts, 6), "reason": reason}
