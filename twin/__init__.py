"""Twin service: MQTT ingest, the numba analytics core, twin state topics and time series."""
