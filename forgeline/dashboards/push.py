"""Create or update the data source, the folder and the dashboards in a running Grafana (HTTP API).

Idempotent: each object is read first and written only when it differs, so a second push reports
everything ``unchanged`` and bumps no dashboard version. Errors say what failed and what to do:
Grafana unreachable, credentials rejected (401), or the token lacking a right (403, with the role
the step needs).

Grafana API used (documented at grafana.com/docs/grafana/latest/developers/http_api/):
``GET /api/health``, ``GET|POST /api/folders[/:uid]``, ``GET /api/datasources/uid/:uid``,
``POST /api/datasources``, ``PUT /api/datasources/uid/:uid``, ``GET /api/dashboards/uid/:uid``,
``POST /api/dashboards/db``.

Example:
    >>> target = GrafanaTarget.from_url("http://admin:secret@grafana.example:3000")
    >>> (target.url, target.user, "secret" in repr(target))
    ('http://grafana.example:3000', 'admin', False)
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from grafana_client import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)

from forgeline.dashboards.provisioning import FOLDER_TITLE, FOLDER_UID, DatasourceSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

# What each step needs, for the 403 message (Grafana's basic roles; fine-grained actions in brackets).
RIGHTS = {
    "folder": "the Editor role (folders:create)",
    "datasource": "the Admin role (datasources:create, datasources:write)",
    "dashboard": "the Editor role on the folder (dashboards:create, dashboards:write)",
}


class PushError(RuntimeError):
    """Pushing to Grafana failed; the message says why and what to do."""


@dataclass(frozen=True)
class GrafanaTarget:
    """Where and as whom to push: a service-account token, or a user and password (basic auth)."""

    url: str
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"the Grafana URL must look like http://host:3000, not {_safe_url(self.url)!r}")
        if parsed.username or parsed.password:
            raise ValueError("put Grafana credentials in GRAFANA_TOKEN or GRAFANA_USER/GRAFANA_PASSWORD, "
                             "or use GrafanaTarget.from_url")
        if self.token and self.user:
            raise ValueError("give Grafana either a token or a user and password, not both")

    @classmethod
    def from_url(cls, url: str, token: str | None = None, user: str | None = None, password: str | None = None,
                 timeout_s: float = 10.0) -> GrafanaTarget:
        """Credentials may come inside the URL (``http://user:password@host:3000``); they are moved out of it."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.username and not (token or user):
            user = urllib.parse.unquote(parsed.username)
            password = urllib.parse.unquote(parsed.password or "")
        return cls(_safe_url(url), token=token, user=user, password=password, timeout_s=timeout_s)

    def api(self) -> GrafanaApi:
        parsed = urllib.parse.urlsplit(self.url)
        credential: str | tuple[str, str] | None = (
            self.token if self.token else (self.user, self.password or "") if self.user else None)
        return GrafanaApi(credential, host=parsed.hostname, port=parsed.port, protocol=parsed.scheme,
                          url_path_prefix=parsed.path.strip("/") + "/" if parsed.path.strip("/") else "",
                          timeout=self.timeout_s)


def _safe_url(url: str) -> str:
    """``url`` without user and password, for messages."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path.rstrip("/"), "", ""))


@dataclass
class PushReport:
    """What the push did with each object: ``created``, ``updated`` or ``unchanged``."""

    folder: str = ""
    datasource: str = "skipped"
    dashboards: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"folder: {self.folder}", f"datasource: {self.datasource}",
                *(f"dashboard {uid}: {outcome}" for uid, outcome in self.dashboards.items())]


def _call(target: GrafanaTarget, what: str, right: str | None, call: Callable[[], T]) -> T:
    """Run one API call and turn the client's exceptions into one clear :class:`PushError`."""
    try:
        return call()
    except (GrafanaException, OSError) as exc:
        raise _translate(target, what, right, exc) from None


def _missing(target: GrafanaTarget, what: str, call: Callable[[], T]) -> T | None:
    """The object, or None when Grafana answers 404."""
    try:
        return call()
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return None
        raise _translate(target, what, None, exc) from None
    except (GrafanaException, OSError) as exc:
        raise _translate(target, what, None, exc) from None


def _translate(target: GrafanaTarget, what: str, right: str | None, exc: Exception) -> PushError:
    if isinstance(exc, GrafanaUnauthorizedError):
        return PushError(f"Grafana at {target.url} rejected the credentials (401) when trying to {what}: check "
                         "GRAFANA_TOKEN (a service-account token) or GRAFANA_USER/GRAFANA_PASSWORD")
    if isinstance(exc, GrafanaTimeoutError):
        return PushError(f"Grafana at {target.url} did not answer within {target.timeout_s:g}s "
                         f"when trying to {what}")
    if isinstance(exc, GrafanaClientError):
        if exc.status_code == 403:
            need = f"; it needs {right}" if right else ""
            return PushError(f"the Grafana credentials lack the rights to {what} (403 {_message(exc)}){need}")
        return PushError(f"Grafana refused to {what}: {exc.status_code} {_message(exc)}")
    if isinstance(exc, GrafanaServerError):
        return PushError(f"Grafana failed to {what}: {exc.status_code} {_message(exc)}")
    # GrafanaException with status 0, or OSError: connection refused, DNS failure, TLS errors
    # (niquests' exceptions derive from OSError).
    reason = exc.message if isinstance(exc, GrafanaException) else f"{type(exc).__name__}: {exc}"
    return PushError(f"Grafana at {target.url} is unreachable ({reason}); is it running and is the URL right?")


def _message(exc: GrafanaException) -> str:
    response = exc.response
    if isinstance(response, dict) and "message" in response:
        return str(response["message"])
    return str(exc.message)


def _same_datasource(existing: dict[str, Any], spec: DatasourceSpec, update_secrets: bool) -> bool:
    wanted = spec.settings()
    for key, value in wanted.items():
        if key == "jsonData":
            stored = existing.get("jsonData") or {}
            if any(stored.get(k) != v for k, v in value.items()):
                return False
        elif existing.get(key) != value:
            return False
    secrets_set = existing.get("secureJsonFields") or {}
    missing_secret = any(not secrets_set.get(name) for name in spec.secrets())
    return not (missing_secret or (update_secrets and spec.secrets()))


def _comparable(dashboard: dict[str, Any]) -> dict[str, Any]:
    """A dashboard without what Grafana assigns on save (id, version)."""
    return {k: v for k, v in dashboard.items() if k not in ("id", "version")}


def push(target: GrafanaTarget, dashboards: Sequence[dict[str, Any]], datasource: DatasourceSpec | None = None, *,
         folder_uid: str = FOLDER_UID, folder_title: str = FOLDER_TITLE, update_secrets: bool = False) -> PushReport:
    """Make Grafana hold ``datasource`` (unless None), the folder and ``dashboards``; report what changed.

    Secrets are written when a data source is created, when Grafana has none stored for a secret
    field, or with ``update_secrets`` (Grafana never returns them, so they cannot be compared).
    """
    api = target.api()
    report = PushReport()
    # /api/health answers without credentials: a failure here means Grafana is not reachable at all.
    health = _call(target, "check its health", None, lambda: api.client.GET("/health"))
    log.info("Grafana %s at %s", health.get("version", "?") if isinstance(health, dict) else "?", target.url)

    folder = _missing(target, f"read folder {folder_uid!r}", lambda: api.folder.get_folder(folder_uid))
    if folder is None:
        _call(target, f"create folder {folder_title!r}", RIGHTS["folder"],
              lambda: api.folder.create_folder(folder_title, uid=folder_uid))
        report.folder = "created"
    elif folder.get("title") != folder_title:
        _call(target, f"rename folder {folder_uid!r}", RIGHTS["folder"],
              lambda: api.folder.update_folder(folder_uid, title=folder_title, overwrite=True))
        report.folder = "updated"
    else:
        report.folder = "unchanged"

    if datasource is not None:
        existing = _missing(target, f"read data source {datasource.uid!r}",
                            lambda: api.datasource.get_datasource_by_uid(datasource.uid))
        if existing is None:
            _call(target, f"create data source {datasource.name!r}", RIGHTS["datasource"],
                  lambda: api.datasource.create_datasource(datasource.api_body()))
            report.datasource = "created"
        elif _same_datasource(existing, datasource, update_secrets):
            report.datasource = "unchanged"
        elif existing.get("readOnly"):
            raise PushError(f"data source {datasource.uid!r} is provisioned from a file (read-only) and differs; "
                            "change the provisioning file, or push with --no-datasource")
        else:
            _call(target, f"update data source {datasource.name!r}", RIGHTS["datasource"],
                  lambda: api.datasource.update_datasource_by_uid(datasource.uid, datasource.api_body()))
            report.datasource = "updated"

    for dashboard in dashboards:
        uid = dashboard["uid"]
        stored = _missing(target, f"read dashboard {uid!r}", partial(api.dashboard.get_dashboard, uid))
        if stored is not None:
            meta = stored.get("meta", {})
            if (_comparable(stored.get("dashboard", {})) == _comparable(dashboard)
                    and meta.get("folderUid") == folder_uid):
                report.dashboards[uid] = "unchanged"
                continue
            if meta.get("provisioned"):
                raise PushError(f"dashboard {uid!r} is provisioned from files in this Grafana and cannot be "
                                "overwritten through the API; update the files (forgeline dashboards export) instead")
        body = {"dashboard": {**dashboard, "id": None}, "folderUid": folder_uid, "overwrite": True,
                "message": "forgeline dashboards push"}
        _call(target, f"save dashboard {uid!r}", RIGHTS["dashboard"],
              partial(api.dashboard.update_dashboard, body))
        report.dashboards[uid] = "created" if stored is None else "updated"
    return report
