"""``forgeline dashboards push`` through grafana-client against a server speaking Grafana's HTTP API
(``tests/grafana_fake.py``; Grafana itself cannot run here), and ``build``/``export``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from forgeline.broker import free_port
from forgeline.cli import main
from forgeline.dashboards.provisioning import DatasourceSpec, dashboard_files
from forgeline.dashboards.push import GrafanaTarget, PushError, push
from tests.grafana_fake import FakeGrafana, serve_fake_grafana

ADMIN, EDITOR, VIEWER = (f"glsa_{role}_{uuid.uuid4().hex}" for role in ("admin", "editor", "viewer"))
INFLUX_TOKEN = f"influx-{uuid.uuid4().hex}"


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    fake = FakeGrafana(tokens={ADMIN: "Admin", EDITOR: "Editor", VIEWER: "Viewer"},
                       users={("admin", "s3cret:/@"): "Admin"})
    with serve_fake_grafana(fake) as running:
        yield running


def generated() -> list[dict[str, object]]:
    return [json.loads(text) for text in dashboard_files().values()]


def spec() -> DatasourceSpec:
    return DatasourceSpec(url="http://influxdb:8086", token=INFLUX_TOKEN)


def test_first_push_creates_everything_and_the_second_changes_nothing(grafana: FakeGrafana) -> None:
    target = GrafanaTarget(grafana.url, token=ADMIN)
    report = push(target, generated(), spec())
    assert report.folder == "created" and report.datasource == "created"
    assert set(report.dashboards.values()) == {"created"} and len(report.dashboards) == 5
    stored_source = grafana.datasources["forgeline-influxdb"]
    assert stored_source["jsonData"] == {"version": "InfluxQL", "dbName": "forgeline", "httpMode": "POST",
                                         "httpHeaderName1": "Authorization"}
    assert stored_source["secureJsonData"] == {"httpHeaderValue1": f"Token {INFLUX_TOKEN}"}
    for dashboard in generated():
        entry = grafana.dashboards[str(dashboard["uid"])]
        assert entry["folderUid"] == "forgeline"
        assert {k: v for k, v in entry["dashboard"].items() if k not in ("id", "version")} == {
            k: v for k, v in dashboard.items() if k != "version"}

    writes_before = len(grafana.writes())
    again = push(target, generated(), spec())
    assert again.folder == again.datasource == "unchanged"
    assert set(again.dashboards.values()) == {"unchanged"}
    assert len(grafana.writes()) == writes_before, "an idempotent push writes nothing"
    assert all(e["dashboard"]["version"] == 1 for e in grafana.dashboards.values())


def test_a_dashboard_edited_in_grafana_is_restored_and_only_it(grafana: FakeGrafana) -> None:
    target = GrafanaTarget(grafana.url, token=ADMIN)
    push(target, generated(), spec())
    grafana.dashboards["forgeline-line"]["dashboard"]["title"] = "edited in the UI"
    grafana.dashboards["forgeline-fleet"]["folderUid"] = ""  # moved to General
    report = push(target, generated(), spec())
    assert report.dashboards == {"forgeline-fleet": "updated", "forgeline-device": "unchanged",
                                 "forgeline-line": "updated", "forgeline-routing": "unchanged",
                                 "forgeline-revisions": "unchanged"}
    assert grafana.dashboards["forgeline-line"]["dashboard"]["title"] == "forgeline / Microwave line"
    assert grafana.dashboards["forgeline-line"]["dashboard"]["version"] == 2
    assert grafana.dashboards["forgeline-fleet"]["folderUid"] == "forgeline"


def test_datasource_is_updated_when_it_differs_and_secrets_only_on_request(grafana: FakeGrafana) -> None:
    target = GrafanaTarget(grafana.url, token=ADMIN)
    push(target, generated(), spec())
    moved = DatasourceSpec(url="http://influx-2:8086", token=INFLUX_TOKEN)
    assert push(target, [], moved).datasource == "updated"
    assert grafana.datasources["forgeline-influxdb"]["url"] == "http://influx-2:8086"
    rotated = DatasourceSpec(url="http://influx-2:8086", token="new-token")
    assert push(target, [], rotated).datasource == "unchanged"  # a secret is stored: not compared, not rewritten
    assert push(target, [], rotated, update_secrets=True).datasource == "updated"
    assert grafana.datasources["forgeline-influxdb"]["secureJsonData"]["httpHeaderValue1"] == "Token new-token"


def test_a_provisioned_datasource_that_differs_is_a_clear_error(grafana: FakeGrafana) -> None:
    target = GrafanaTarget(grafana.url, token=ADMIN)
    push(target, [], spec())
    grafana.datasources["forgeline-influxdb"]["readOnly"] = True
    assert push(target, [], spec()).datasource == "unchanged"
    with pytest.raises(PushError, match="provisioned from a file"):
        push(target, [], DatasourceSpec(url="http://elsewhere:8086", token=INFLUX_TOKEN))


def test_rights_missing_are_named(grafana: FakeGrafana) -> None:
    with pytest.raises(PushError) as viewer:
        push(GrafanaTarget(grafana.url, token=VIEWER), generated(), spec())
    assert "lack the rights to create folder" in str(viewer.value) and "Editor" in str(viewer.value)
    assert "folders:create" in str(viewer.value)

    with pytest.raises(PushError) as editor:
        push(GrafanaTarget(grafana.url, token=EDITOR), generated(), spec())
    assert "lack the rights to create data source" in str(editor.value) and "Admin" in str(editor.value)
    # an Editor can still push the dashboards when the data source is left alone
    report = push(GrafanaTarget(grafana.url, token=EDITOR), generated(), None)
    assert report.datasource == "skipped" and len(report.dashboards) == 5


def test_rejected_credentials_and_unreachable_grafana(grafana: FakeGrafana) -> None:
    with pytest.raises(PushError, match=r"rejected the credentials \(401\)") as wrong:
        push(GrafanaTarget(grafana.url, token="glsa_wrong"), generated(), spec())
    assert "glsa_wrong" not in str(wrong.value)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PushError, match="is unreachable") as unreachable:
        push(GrafanaTarget(nobody, token=ADMIN, timeout_s=2), generated(), spec())
    assert nobody in str(unreachable.value) and ADMIN not in str(unreachable.value)
    assert grafana.dashboards == {}


def test_basic_auth_from_the_url_never_echoes_the_password(grafana: FakeGrafana) -> None:
    url = grafana.url.replace("http://", "http://admin:s3cret%3A%2F%40@")
    target = GrafanaTarget.from_url(url)
    assert target.url == grafana.url and "s3cret" not in repr(target)
    assert push(target, generated()[:1], None).dashboards == {"forgeline-fleet": "created"}
    with pytest.raises(ValueError, match="GRAFANA_TOKEN") as err:
        GrafanaTarget(url)
    assert "s3cret" not in str(err.value)


def test_cli_push(grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                  tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", ADMIN)
    monkeypatch.setenv("INFLUX_TOKEN", INFLUX_TOKEN)
    args = ["dashboards", "push", "--grafana-url", grafana.url, "--influx-url", "http://influxdb:8086"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "datasource: created" in out and "dashboard forgeline-device: created" in out
    assert main(args) == 0
    assert "created" not in capsys.readouterr().out

    monkeypatch.setenv("GRAFANA_TOKEN", VIEWER)
    assert main(args) == 0, "nothing to change: a Viewer may verify"
    capsys.readouterr()
    del grafana.dashboards["forgeline-device"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "lack the rights" in captured.err and VIEWER not in captured.err + captured.out
    assert INFLUX_TOKEN not in captured.err + captured.out

    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    monkeypatch.delenv("GRAFANA_TOKEN")
    assert main([*args, "--grafana-token-file", str(token_file)]) == 0

    assert main(["dashboards", "push", "--grafana-url", grafana.url]) == 2  # no InfluxDB URL for the data source
    assert "--influx-url" in capsys.readouterr().err
    monkeypatch.setenv("GRAFANA_TOKEN", ADMIN)
    assert main(["dashboards", "push", "--grafana-url", f"http://127.0.0.1:{free_port()}", "--no-datasource",
                 "--timeout", "2"]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_cli_build_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "boards"
    assert main(["dashboards", "build", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(dashboard_files())
    assert main(["dashboards", "build", "--out", str(out), "--check"]) == 0
    (out / "forgeline-line.json").write_text("{}")
    (out / "hand-made.json").write_text("{}")
    assert main(["dashboards", "build", "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "forgeline-line.json: differs" in err and "hand-made.json: not a generated dashboard" in err
    repository = Path(__file__).resolve().parents[1] / "dashboards"
    assert main(["dashboards", "build", "--out", str(repository), "--check"]) == 0


def test_cli_export_writes_a_provisioning_tree(tmp_path: Path) -> None:
    assert main(["dashboards", "export", str(tmp_path), "--influx-url", "http://influx.local:8086",
                 "--dashboard-path", "/srv/boards"]) == 0
    source = yaml.safe_load((tmp_path / "provisioning/datasources/forgeline.yaml").read_text())
    [entry] = source["datasources"]
    assert entry["url"] == "http://influx.local:8086" and entry["jsonData"]["version"] == "InfluxQL"
    assert entry["secureJsonData"] == {"httpHeaderValue1": "Token ${INFLUX_TOKEN}"}  # never a real secret
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards/forgeline.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/srv/boards"
    assert sorted(p.name for p in (tmp_path / "dashboards").iterdir()) == sorted(dashboard_files())
    assert main(["dashboards", "export", str(tmp_path), "--influx-url", "influx:8086"]) == 2
