"""forgeline: edge/IoT manufacturing monitoring and digital twin.

Packages: ``forgeline.contract`` (topics, payloads, telemetry encoding; shared by everything),
``edge_agent`` (gateway side), ``twin`` (twin service and numeric core), and the platform services
in ``forgeline`` (routing, quotes, iteration loop, dashboards, broker tooling, demo).
"""

__version__ = "0.1.0"
