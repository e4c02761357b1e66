"""Devices known to the twin, from their birth messages: capabilities, channels with checked units.

A birth message (schema ``status``, ``online``) registers a device in the core. Every announced
channel is checked against the catalog with :func:`check_channel_unit`; a channel announced in the
wrong unit is quarantined (its samples are rejected and counted) and the birth is reported as a
dead letter naming the channel, while the rest of the device works. Channels a batch carries that
the birth did not announce are accepted when the catalog knows them (their unit is the catalog's
by definition) or they are custom ``x_`` channels; any other name is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgeline.contract.topics import DeviceRef
from forgeline.contract.vocabulary import CHANNELS, UnitError, check_channel_unit
from twin.core import CoreError, FleetCore

# Birth keys copied into the twin's capabilities.
CAPABILITY_KEYS = (
    "technology", "vendor", "model", "product_model", "product_revision", "materials", "build_volume_mm",
    "part_spacing_mm", "cost_per_hour", "planned_cycle_time_s", "agent_version", "labels",
)


@dataclass
class Device:
    ref: DeviceRef
    index: int  # the core's device index
    capabilities: dict[str, Any]
    epoch: int | None
    online: bool = True
    quarantined: dict[str, str] = field(default_factory=dict)  # channel -> reason
    # channel table (as the raw bytes of a batch) -> core slots, -1 = rejected
    slot_cache: dict[bytes, np.ndarray] = field(default_factory=dict)
    rejected_channels: dict[str, str] = field(default_factory=dict)
    birth_digest: str = ""  # of the last birth payload registered: a repeated birth is skipped unread

    @property
    def key(self) -> str:
        return self.ref.key


class Registry:
    """Devices by key; registers them in the core as their births arrive."""

    def __init__(self, core: FleetCore) -> None:
        self.core = core
        self.devices: dict[str, Device] = {}
        self.by_index: dict[int, Device] = {}

    def __len__(self) -> int:
        return len(self.devices)

    def get(self, key: str) -> Device | None:
        return self.devices.get(key)

    def register(self, ref: DeviceRef, birth: dict[str, Any]) -> tuple[Device, list[str]]:
        """Register or update a device from a validated birth; returns it and the problems found.

        Raises :class:`CoreError` when the core refuses the device (for example a technology change).
        """
        problems: list[str] = []
        good: list[str] = []
        quarantined: dict[str, str] = {}
        for spec in birth.get("channels", []):
            name, unit = spec["name"], spec["unit"]
            try:
                check_channel_unit(name, unit)
            except UnitError as exc:
                quarantined[name] = str(exc)
                problems.append(str(exc))
                continue
            good.append(name)
        # Reserve room: a device with more channels than the core holds is refused whole, clearly.
        index = self.core.add_device(
            ref.key,
            technology=birth["technology"],
            channels=good[: self.core.channels_per_device],
            planned_cycle_time_s=birth.get("planned_cycle_time_s"),
        )
        if len(good) > self.core.channels_per_device:
            extra = good[self.core.channels_per_device :]
            problems.append(f"more channels than the twin holds per device ({self.core.channels_per_device}): "
                            f"{', '.join(extra[:5])} rejected")
            for name in extra:
                quarantined[name] = "over the channel limit"
        capabilities = {k: birth[k] for k in CAPABILITY_KEYS if k in birth}
        capabilities["channels"] = {spec["name"]: spec["unit"] for spec in birth.get("channels", [])}
        device = self.devices.get(ref.key)
        if device is None:
            device = Device(ref, index, capabilities, birth.get("epoch"), quarantined=quarantined)
            self.devices[ref.key] = device
            self.by_index[index] = device
        else:
            device.capabilities = capabilities
            device.epoch = birth.get("epoch", device.epoch)
            device.quarantined = quarantined
            device.slot_cache.clear()
        device.online = True
        return device, problems

    def slots_for(self, device: Device, table_key: bytes, channels: tuple[str, ...]) -> np.ndarray:
        """The core slots of a batch's channel table (cached per distinct table)."""
        slots = device.slot_cache.get(table_key)
        if slots is not None:
            return slots
        out = np.full(len(channels), -1, dtype=np.int32)
        for i, name in enumerate(channels):
            reason = device.quarantined.get(name)
            if reason is None:
                if name not in CHANNELS and not name.startswith("x_"):
                    reason = f"unknown channel {name!r}: not in the catalog, and custom channels start with 'x_'"
                else:
                    try:
                        out[i] = self.core.channel_index(device.index, name)
                        continue
                    except CoreError as exc:
                        reason = str(exc)
            device.rejected_channels[name] = reason
        if len(device.slot_cache) > 64:  # a misbehaving agent inventing tables: keep memory bounded
            device.slot_cache.clear()
        device.slot_cache[table_key] = out
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"key": d.key, "index": d.index, "capabilities": d.capabilities, "epoch": d.epoch, "online": d.online,
             "quarantined": d.quarantined, "birth_digest": d.birth_digest}
            for d in self.devices.values()
        ]

    def load_json(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            ref = DeviceRef.from_key(doc["key"])
            device = Device(ref, int(doc["index"]), doc["capabilities"], doc["epoch"], doc["online"],
                            quarantined=dict(doc.get("quarantined", {})), birth_digest=doc.get("birth_digest", ""))
            self.devices[ref.key] = device
            self.by_index[device.index] = device
