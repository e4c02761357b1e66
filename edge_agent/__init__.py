"""Edge agent for factory gateways: read printers and line sensors, publish batched telemetry over MQTT,
spool to disk when the link or broker is down.

Light by design: it imports the contract (``forgeline.contract``), ``forgeline.mqtt`` and paho-mqtt,
never numpy or the twin. Adapters with heavier libraries (asyncua, pymodbus) are imported only when
a config uses them.

Public API::

    Agent(settings, sources, spool=..., batch=..., link=...)   start() / stop() / stats()
    run_simulated_fleet(settings, fleet, stop_event, speed=...) blocking, for a thread
    start_simulated_fleet(settings, fleet, speed=...)           returns a started Agent
    demo_fleet()                                                printers of every technology in two
                                                                tenants and an oven line
"""

from edge_agent.agent import Agent, run_simulated_fleet, start_simulated_fleet, wait_connected
from edge_agent.config import AgentConfig, ConfigError, load_config
from edge_agent.publisher import BatchSettings, LinkSettings
from edge_agent.sources.simulator import FleetSpec, LineSpec, PrinterSpec, SimulatorSource, demo_fleet

__all__ = [
    "Agent",
    "AgentConfig",
    "BatchSettings",
    "ConfigError",
    "FleetSpec",
    "LineSpec",
    "LinkSettings",
    "PrinterSpec",
    "SimulatorSource",
    "demo_fleet",
    "load_config",
    "run_simulated_fleet",
    "start_simulated_fleet",
    "wait_connected",
]
