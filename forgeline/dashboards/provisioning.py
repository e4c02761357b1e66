"""Dashboard JSON files and Grafana's file-provisioning YAML.

``dashboards/*.json`` in the repository and ``deploy/grafana/provisioning/`` are written by these
functions (``forgeline dashboards build`` and ``forgeline dashboards export``); tests check that the
checked-in files equal what they produce.

Grafana expands ``$VAR``/``${VAR}`` in provisioning files from its environment, so the YAML carries
``${INFLUX_URL}`` and ``${INFLUX_TOKEN}`` instead of secrets (see ``deploy/compose/compose.yaml``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forgeline.dashboards.catalog import all_dashboards
from forgeline.dashboards.model import DATASOURCE_TYPE, DEFAULT_DATASOURCE_NAME, DEFAULT_DATASOURCE_UID, Dashboard

FOLDER_UID = "forgeline"
FOLDER_TITLE = "forgeline"
# Where the compose file and the Kubernetes manifests mount the dashboard JSON inside Grafana.
GRAFANA_DASHBOARD_PATH = "/var/lib/grafana/dashboards/forgeline"


def dashboard_text(dashboard: Dashboard) -> str:
    """The JSON file of a dashboard, byte for byte as checked in (stable key order, trailing newline)."""
    return json.dumps(dashboard.to_json(), indent=2, ensure_ascii=False) + "\n"


def dashboard_files(dashboards: list[Dashboard] | None = None) -> dict[str, str]:
    """file name -> content for every dashboard (``forgeline-fleet.json`` ...)."""
    return {f"{d.uid}.json": dashboard_text(d) for d in (dashboards or all_dashboards())}


def write_dashboards(directory: Path) -> list[Path]:
    """Write the dashboard JSON files into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in dashboard_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_files(directory: Path) -> list[str]:
    """Names of dashboard files in ``directory`` that differ from the generated ones or are missing."""
    stale = []
    for name, text in dashboard_files().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


@dataclass(frozen=True)
class DatasourceSpec:
    """The InfluxDB data source the dashboards query with InfluxQL.

    InfluxDB 2.x/3.x: ``token`` (sent as ``Authorization: Token ...``; the bucket needs a DBRP mapping to
    ``database``). InfluxDB 1.x: ``user``/``password`` or nothing.
    """

    url: str
    database: str = "forgeline"
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    name: str = DEFAULT_DATASOURCE_NAME
    uid: str = DEFAULT_DATASOURCE_UID

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://", "$")):
            raise ValueError(f"the InfluxDB url must start with http:// or https://, not {self.url!r}")
        if self.token and (self.user or self.password):
            raise ValueError("give the InfluxDB either a token (2.x) or a user and password (1.x), not both")

    def settings(self) -> dict[str, Any]:
        """Everything but the secrets, as Grafana's API returns a data source."""
        json_data: dict[str, Any] = {"version": "InfluxQL", "dbName": self.database, "httpMode": "POST"}
        if self.token:
            json_data["httpHeaderName1"] = "Authorization"
        out: dict[str, Any] = {"name": self.name, "uid": self.uid, "type": DATASOURCE_TYPE, "access": "proxy",
                               "url": self.url, "isDefault": True, "jsonData": json_data}
        if self.user:
            out["user"] = self.user
        return out

    def secrets(self) -> dict[str, str]:
        """``secureJsonData``: Grafana stores these encrypted and never returns them."""
        if self.token:
            return {"httpHeaderValue1": f"Token {self.token}"}
        if self.password:
            return {"password": self.password}
        return {}

    def api_body(self) -> dict[str, Any]:
        body = self.settings()
        if self.secrets():
            body["secureJsonData"] = self.secrets()
        return body


# What deploy/grafana provisions: values from Grafana's environment.
PROVISIONED_DATASOURCE = DatasourceSpec(url="${INFLUX_URL}", database="${INFLUX_DATABASE}", token="${INFLUX_TOKEN}")


def datasource_yaml(spec: DatasourceSpec = PROVISIONED_DATASOURCE) -> str:
    body = {"apiVersion": 1, "datasources": [{**spec.api_body(), "orgId": 1, "editable": False}]}
    return _HEADER + yaml.safe_dump(body, sort_keys=False)


def dashboards_provider_yaml(path: str = GRAFANA_DASHBOARD_PATH) -> str:
    body = {"apiVersion": 1, "providers": [{
        "name": "forgeline", "orgId": 1, "folder": FOLDER_TITLE, "folderUid": FOLDER_UID, "type": "file",
        "disableDeletion": False, "allowUiUpdates": False, "updateIntervalSeconds": 60,
        "options": {"path": path, "foldersFromFilesStructure": False},
    }]}
    return _HEADER + yaml.safe_dump(body, sort_keys=False)


_HEADER = "# GENERATED by `forgeline dashboards export`; do not edit by hand.\n"


def export(directory: Path, spec: DatasourceSpec = PROVISIONED_DATASOURCE,
           dashboard_path: str = GRAFANA_DASHBOARD_PATH) -> list[Path]:
    """Write a Grafana provisioning tree into ``directory``.

    ``provisioning/datasources/forgeline.yaml``, ``provisioning/dashboards/forgeline.yaml`` and
    ``dashboards/*.json``: mount ``provisioning`` at ``/etc/grafana/provisioning`` and ``dashboards`` at
    ``dashboard_path``.
    """
    files = {
        directory / "provisioning" / "datasources" / "forgeline.yaml": datasource_yaml(spec),
        directory / "provisioning" / "dashboards" / "forgeline.yaml": dashboards_provider_yaml(dashboard_path),
    }
    files |= {directory / "dashboards" / name: text for name, text in dashboard_files().items()}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(files)
