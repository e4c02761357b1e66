"""Shared vocabulary: technologies, device states, and the channel catalog with canonical units.

Every channel a source reports is named here with its unit, so "wrong units" is a checkable error:
a birth message announcing ``nozzle_temp`` in ``degF`` is rejected by the twin with a clear reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Technology(StrEnum):
    FDM = "FDM"
    SLA = "SLA"
    DLP = "DLP"
    SLS = "SLS"
    MJF = "MJF"
    METAL = "metal"  # laser powder-bed fusion
    LINE = "line"  # a station of a production line (the microwave-oven line)


POWDER_BED = frozenset({Technology.SLS, Technology.MJF, Technology.METAL})


class DeviceState(IntEnum):
    """Machine state, reported as the numeric telemetry channel ``state`` (value = the code)."""

    OFFLINE = 0
    IDLE = 1
    HEATING = 2
    PRINTING = 3  # "producing" for a line station
    PAUSED = 4
    ERROR = 5
    MAINTENANCE = 6

    @property
    def producing(self) -> bool:
        return self is DeviceState.PRINTING

    @property
    def planned_busy(self) -> bool:
        """Part of the planned busy time of ISO 22400 (everything but planned downtime and offline)."""
        return self not in (DeviceState.MAINTENANCE, DeviceState.OFFLINE)


@dataclass(frozen=True)
class Channel:
    name: str
    unit: str
    description: str
    low: float = float("-inf")  # physically plausible range; outside it a sample is rejected
    high: float = float("inf")


# The catalog. Counters are cumulative (monotone within an agent epoch).
CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in [
        Channel("state", "code", "machine state, a DeviceState code", 0, 6),
        Channel("layer_progress", "ratio", "share of the current build's layers done", 0, 1),
        Channel("layer", "count", "current layer number", 0, 1e6),
        Channel("nozzle_temp", "degC", "FDM nozzle temperature", -40, 600),
        Channel("bed_temp", "degC", "build plate temperature", -40, 300),
        Channel("chamber_temp", "degC", "build chamber temperature", -40, 1000),
        Channel("laser_power", "W", "laser power (SLS, metal)", 0, 5000),
        Channel("lamp_power", "W", "UV lamp or projector power (SLA, DLP) / fusing lamp (MJF)", 0, 5000),
        Channel("powder_level", "ratio", "powder hopper level", 0, 1),
        Channel("resin_level", "ratio", "resin tank level", 0, 1),
        Channel("oxygen", "ppm", "oxygen in the build chamber (metal, SLS)", 0, 1e6),
        Channel("vibration", "mm/s", "vibration velocity RMS", 0, 1000),
        # microwave-oven line stations
        Channel("magnetron_power", "W", "measured magnetron output power", 0, 5000),
        Channel("cavity_temp_rise", "K", "cavity water-load temperature rise in the heating test", -10, 200),
        Channel("door_leakage", "mW/cm2", "door-seal microwave leakage at 5 cm", 0, 100),
        Channel("hipot_current", "mA", "hipot (dielectric withstand) leakage current", 0, 100),
        Channel("insulation_resistance", "MOhm", "insulation resistance", 0, 1e6),
        Channel("cycle_time", "s", "station cycle time of the last unit", 0, 3600),
        Channel("produced_total", "count", "cumulative units (or parts) produced", 0, 1e12),
        Channel("good_total", "count", "cumulative good units", 0, 1e12),
        Channel("scrap_total", "count", "cumulative scrapped units", 0, 1e12),
        # generic process channels (pumps, SKAB-like rigs, custom sensors)
        Channel("pressure", "bar", "process pressure", -1, 1000),
        Channel("flow_rate", "l/min", "flow rate", 0, 1e5),
        Channel("current", "A", "motor current", 0, 1e4),
        Channel("voltage", "V", "supply voltage", 0, 1e5),
        Channel("temperature", "degC", "generic temperature", -273.15, 2000),
    ]
}

# Unit aliases that agents may send and that mean exactly the canonical unit.
UNIT_ALIASES: dict[str, str] = {"°C": "degC", "C": "degC", "celsius": "degC", "%": "percent"}


class UnitError(ValueError):
    """A channel announced with a unit other than the catalog's."""


def check_channel_unit(name: str, unit: str) -> Channel | None:
    """Return the catalog entry for ``name`` (None for a custom channel); raise on a wrong unit.

    Custom channels (not in the catalog) must be prefixed ``x_`` and may carry any unit.
    """
    entry = CHANNELS.get(name)
    if entry is None:
        if name.startswith("x_"):
            return None
        raise UnitError(f"unknown channel {name!r}: not in the catalog, and custom channels start with 'x_'")
    canonical = UNIT_ALIASES.get(unit, unit)
    if canonical != entry.unit:
        raise UnitError(f"channel {name!r} is measured in {entry.unit!r}, not {unit!r}")
    return entry
