"""Edge agent for factory gateways: read printers and line sensors, publish batched telemetry over MQTT,
spool to disk when the link or broker is down."""
