"""Grafana dashboards as code, their provisioning, and pushing them to a Grafana.

- :mod:`forgeline.dashboards.model`: a small typed builder of Grafana dashboard JSON.
- :mod:`forgeline.dashboards.catalog`: the dashboards (fleet, device, microwave line, routing, revisions).
- :mod:`forgeline.dashboards.influxql`: tag filters and the check of queries against the time-series contract.
- :mod:`forgeline.dashboards.validate`: structural checks and Grafana's variable substitution.
- :mod:`forgeline.dashboards.provisioning`: the JSON files and Grafana's file-provisioning YAML.
- :mod:`forgeline.dashboards.push`: create or update data source, folder and dashboards over the HTTP API.

``forgeline dashboards build|export|push`` (:mod:`forgeline.dashboards.cli`) runs them.
"""
