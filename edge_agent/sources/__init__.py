"""Sources: one module per kind of device the agent reads, behind one interface (:mod:`.base`).

Modules are imported only when a config names them, so a gateway that reads Modbus never imports
asyncua and the other way round.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.config import Section
    from edge_agent.sources.base import Source

SOURCE_TYPES: dict[str, str] = {
    "simulator": "edge_agent.sources.simulator",
    "octoprint": "edge_agent.sources.octoprint",
    "moonraker": "edge_agent.sources.moonraker",
    "opcua": "edge_agent.sources.opcua",
    "modbus": "edge_agent.sources.modbus",
}


def build_source(section: Section, base_dir: Path) -> Source:
    """Build (not start) the source a config section describes; ConfigError names a bad key."""
    kind = section.text("type", choices=tuple(SOURCE_TYPES))
    module = importlib.import_module(SOURCE_TYPES[kind])
    source: Source = module.from_config(section, base_dir)
    section.done()
    return source
