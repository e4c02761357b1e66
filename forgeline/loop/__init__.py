"""The iteration loop: line, field and user data per product model and revision, compared with sound
statistics and turned into retained "iteration insights" for engineering.

Layers (each importable on its own; only ``service`` knows MQTT):

- ``stats``: exact and robust tests, effect sizes with intervals, Benjamini-Hochberg.
- ``intake``: validated unit, anomaly and feedback records, linked to model/revision, in a store.
- ``compare``: per model, every revision against its baseline on every KPI and channel.
- ``simulate``: a seeded generator of revisions with injected defects (tests, demos).
- ``report``: a self-contained HTML report with inline SVG plots.
- ``service``: the MQTT service (``forgeline loop serve``); ``cli``: ``forgeline loop``.
"""
