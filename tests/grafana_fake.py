"""A small HTTP server speaking the part of Grafana's HTTP API that ``forgeline dashboards push`` uses.

Grafana itself cannot run on this machine (no binary, no container engine), so the push is tested
against this server. It follows Grafana's documented API (``/api/health``, ``/api/folders``,
``/api/datasources``, ``/api/dashboards``): the same paths, bodies, status codes and messages
(401 without valid credentials, 403 when the role lacks a right, 404/409/412 as documented), and
Grafana's rules that matter here: uids of at most 40 characters, a dashboard's folder must exist,
secrets are stored but never returned (only ``secureJsonFields``), a save bumps the version, and
provisioned (read-only) data sources refuse updates.

Roles: ``Viewer`` may read, ``Editor`` may also write folders and dashboards, ``Admin`` may also
write data sources (Grafana's basic roles).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROLES = {"Viewer": 0, "Editor": 1, "Admin": 2}


@dataclass
class FakeGrafana:
    tokens: dict[str, str] = field(default_factory=dict)  # service-account token -> role
    users: dict[tuple[str, str], str] = field(default_factory=dict)  # (user, password) -> role
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> with "secureJsonData"
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {"dashboard", "folderUid", ...}
    requests: list[tuple[str, str]] = field(default_factory=list)
    next_id: int = 1
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def writes(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "GET"]

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    # --- the API -------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, role: str | None, body: Any) -> tuple[int, Any]:
        if path == "/api/health" and method == "GET":
            return 200, {"commit": "fake", "database": "ok", "version": "11.3.0"}
        if role is None:
            return 401, {"message": "Unauthorized"}

        def need(minimum: str, action: str) -> tuple[int, Any] | None:
            if ROLES[role] < ROLES[minimum]:
                return 403, {"accessErrorId": "ACE0000000001", "message": "You'll need additional permissions to "
                             f"perform this action. Permissions needed: {action}", "title": "Access denied"}
            return None

        if m := re.fullmatch(r"/api/folders/([^/]+)", path):
            folder = self.folders.get(m.group(1))
            if method == "GET":
                return (200, folder) if folder else (404, {"message": "folder not found", "status": "not-found"})
            if method == "PUT":
                if denied := need("Editor", "folders:write"):
                    return denied
                if folder is None:
                    return 404, {"message": "folder not found"}
                folder["title"] = body["title"]
                folder["version"] += 1
                return 200, folder
        if path == "/api/folders" and method == "POST":
            if denied := need("Editor", "folders:create"):
                return denied
            uid = body.get("uid") or f"f{self._id()}"
            if not body.get("title"):
                return 400, {"message": "folder title cannot be empty"}
            if uid in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[uid] = {"id": self._id(), "uid": uid, "title": body["title"], "version": 1,
                                 "url": f"/dashboards/f/{uid}/"}
            return 200, self.folders[uid]

        if m := re.fullmatch(r"/api/datasources/uid/([^/]+)", path):
            stored = self.datasources.get(m.group(1))
            if method == "GET":
                if stored is None:
                    return 404, {"message": "Data source not found"}
                return 200, self._public(stored)
            if method == "PUT":
                if denied := need("Admin", "datasources:write"):
                    return denied
                if stored is None:
                    return 404, {"message": "Data source not found"}
                if stored.get("readOnly"):
                    return 403, {"message": "Cannot update read-only data source"}
                secrets = {**stored.get("secureJsonData", {}), **body.get("secureJsonData", {})}
                stored.update({k: v for k, v in body.items() if k != "secureJsonData"})
                stored["secureJsonData"] = secrets
                stored["version"] += 1
                return 200, {"datasource": self._public(stored), "id": stored["id"], "message": "Datasource updated",
                             "name": stored["name"]}
        if path == "/api/datasources" and method == "POST":
            if denied := need("Admin", "datasources:create"):
                return denied
            if not body.get("name") or not body.get("type") or not body.get("access"):
                return 400, {"message": "Validation error: name, type and access are required"}
            if any(d["name"] == body["name"] for d in self.datasources.values()):
                return 409, {"message": "data source with the same name already exists"}
            uid = body.get("uid") or f"ds{self._id()}"
            if len(uid) > 40:
                return 400, {"message": "UID is too long, max 40 characters"}
            stored = {"id": self._id(), "uid": uid, "orgId": 1, "version": 1, "readOnly": False,
                      "basicAuth": False, "user": "", "database": "", **body}
            self.datasources[uid] = stored
            return 200, {"datasource": self._public(stored), "id": stored["id"], "message": "Datasource added",
                         "name": stored["name"]}

        if m := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path):
            entry = self.dashboards.get(m.group(1))
            if method == "GET":
                if entry is None:
                    return 404, {"message": "Dashboard not found"}
                return 200, {"dashboard": entry["dashboard"], "meta": {
                    "folderUid": entry["folderUid"], "provisioned": entry.get("provisioned", False),
                    "version": entry["dashboard"]["version"], "slug": entry["slug"], "url": entry["url"]}}
        if path == "/api/dashboards/db" and method == "POST":
            if denied := need("Editor", "dashboards:write"):
                return denied
            return self._save_dashboard(body)
        return 404, {"message": "Not found"}

    def _public(self, stored: dict[str, Any]) -> dict[str, Any]:
        public = {k: v for k, v in stored.items() if k != "secureJsonData"}
        public["secureJsonFields"] = {k: True for k in stored.get("secureJsonData", {})}
        return public

    def _save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        dashboard = dict(body.get("dashboard") or {})
        if not dashboard.get("title"):
            return 400, {"message": "Dashboard title cannot be empty", "status": "empty-name"}
        uid = dashboard.get("uid") or f"d{self._id()}"
        if len(uid) > 40:
            return 400, {"message": "uid too long, max 40 characters", "status": "bad-request"}
        folder_uid = body.get("folderUid") or ""
        if folder_uid and folder_uid not in self.folders:
            return 400, {"message": "folder not found", "status": "not-found"}
        existing = self.dashboards.get(uid)
        for other_uid, other in self.dashboards.items():
            if (other_uid != uid and other["folderUid"] == folder_uid
                    and other["dashboard"]["title"] == dashboard["title"] and not body.get("overwrite")):
                return 412, {"message": "A dashboard with the same name in the folder already exists",
                             "status": "name-exists"}
        if existing and not body.get("overwrite") and dashboard.get("version") != existing["dashboard"]["version"]:
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        if existing and existing.get("provisioned"):
            return 400, {"message": "Cannot save provisioned dashboard", "status": "bad-request"}
        version = existing["dashboard"]["version"] + 1 if existing else 1
        dashboard_id = existing["dashboard"]["id"] if existing else self._id()
        slug = re.sub(r"[^a-z0-9]+", "-", dashboard["title"].lower()).strip("-")
        stored = {**dashboard, "id": dashboard_id, "uid": uid, "version": version}
        self.dashboards[uid] = {"dashboard": stored, "folderUid": folder_uid, "slug": slug, "url": f"/d/{uid}/{slug}"}
        return 200, {"id": dashboard_id, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success",
                     "version": version, "slug": slug, "folderUid": folder_uid}

    # --- HTTP plumbing -------------------------------------------------------------------------------

    def role_of(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme == "Bearer":
            return self.tokens.get(value)
        if scheme == "Basic":
            user, _, password = base64.b64decode(value).decode().partition(":")
            return self.users.get((user, password))
        return None


def _handler(grafana: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            path = self.path.split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                self._reply(400, {"message": "bad request data"})
                return
            with grafana.lock:
                grafana.requests.append((self.command, path))
                status, answer = grafana.handle(self.command, path, grafana.role_of(self.headers.get("Authorization")),
                                                body)
            self._reply(status, answer)

        def _reply(self, status: int, answer: Any) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    return Handler


@contextmanager
def serve_fake_grafana(grafana: FakeGrafana | None = None) -> Iterator[FakeGrafana]:
    """Run a :class:`FakeGrafana` on a free loopback port until the block ends."""
    grafana = grafana or FakeGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(grafana))
    grafana.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-grafana", daemon=True)
    thread.start()
    try:
        yield grafana
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
