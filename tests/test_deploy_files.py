"""deploy/ validated as far as this machine allows (no container engine, no cluster, no Grafana):

- the compose file through ``docker-compose config`` (the Compose schema and variable interpolation,
  offline) plus structural checks; ``prepare.sh`` run for real, its configs checked by the twin's and
  the agent's own ``--check``;
- the systemd unit with ``systemd-analyze verify`` after a staged run of ``install-agent.sh``;
- the Kubernetes manifests built with ``kubectl kustomize`` and checked against the Kubernetes
  OpenAPI schemas (``kubernetes-validate``, strict);
- generated files (Grafana provisioning, EMQX ACL, copies for kustomize) equal their generators;
- every ``forgeline`` command line in deploy/ parses with the real subcommand's parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from forgeline.cli import COMMANDS
from forgeline.dashboards.provisioning import GRAFANA_DASHBOARD_PATH, export

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example-region"
BIN = Path(sys.executable).parent
ENV = {"INFLUX_ADMIN_PASSWORD": "a", "INFLUX_TOKEN": "b", "INFLUX_READ_TOKEN": "c", "GRAFANA_ADMIN_PASSWORD": "d"}
K8S_VERSION = "1.30"


def parse_forgeline(argv: list[str]) -> argparse.Namespace:
    """Parse a ``forgeline COMMAND ...`` argument list with the real subcommand parser (raises on error)."""
    command, *rest = argv
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"forgeline {command}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        return parser.parse_args(rest)
    except SystemExit as exc:
        raise AssertionError(f"forgeline {' '.join(argv)} does not parse") from exc


# --- compose ---------------------------------------------------------------------------------------------


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose; see APT_PACKAGES)")
    return path


def compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_docker_compose(), "-f", str(path), "config"], capture_output=True, text=True,
                          cwd=path.parent, env={"PATH": os.environ["PATH"], **env}, timeout=60)


def test_compose_file_is_valid_and_requires_its_secrets(tmp_path: Path) -> None:
    result = compose_config(COMPOSE, ENV)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"mosquitto", "influxdb", "grafana", "twin", "agent"}
    missing = compose_config(COMPOSE, {k: v for k, v in ENV.items() if k != "INFLUX_READ_TOKEN"})
    assert missing.returncode != 0 and "INFLUX_READ_TOKEN" in missing.stderr
    # the check can fail: a misspelt key is refused by the Compose schema
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restarts: unless-stopped", 1))
    bad = compose_config(broken, ENV)
    assert bad.returncode != 0 and "restarts" in bad.stderr


def test_compose_structure() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = doc["services"]
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and "secrets" not in source:
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "TOKEN")):
                assert str(value).startswith("${") and ":?" in str(value), f"{name}.{key} must come from .env"
    mosquitto = services["mosquitto"]
    assert "../../broker/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in mosquitto["volumes"]
    assert mosquitto["ports"] == ["8883:8883"], "TLS only"
    broker_conf = (REPO / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in broker_conf and "acl_file" in broker_conf and "listener 8883" in broker_conf
    grafana = services["grafana"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert f"../../dashboards:{GRAFANA_DASHBOARD_PATH}:ro" in grafana["volumes"]
    for name in ("twin", "agent"):
        parse_forgeline(services[name]["command"])


def test_prepare_script_makes_configs_the_twin_and_agent_accept(tmp_path: Path) -> None:
    site = tmp_path / "compose"
    shutil.copytree(DEPLOY / "compose", site)
    (site / ".env").write_text("INFLUX_TOKEN=tok-123\n")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "prepare.sh", "acme", "munich"], cwd=site, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    secrets = site / "secrets"
    assert not list((secrets / "broker").rglob("ca.key")) and not list((secrets / "twin").rglob("ca.key"))
    assert {p.name for p in (secrets / "agent").iterdir()} == {"ca.crt", "client.crt", "client.key", "agent.yaml"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in secrets.rglob("*") if p.is_file())
    assert "user _twin" in (secrets / "broker" / "acl").read_text()

    # The containers see /etc/forgeline; here that is the secrets directory of each.
    for name, command in (("twin", "twin"), ("agent", "agent")):
        config = secrets / name / f"{name}.yaml"
        config.write_text(config.read_text().replace("/etc/forgeline/", f"{secrets / name}/")
                          .replace("/var/lib/forgeline/", f"{tmp_path}/"))
        check = subprocess.run([str(BIN / "forgeline"), command, "--config", str(config), "--check"],
                               capture_output=True, text=True, timeout=120, env=env)
        assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"
    assert "tok-123" not in result.stdout + result.stderr


# --- systemd ---------------------------------------------------------------------------------------------


def test_install_script_stages_a_unit_that_systemd_accepts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert subprocess.run(["sh", "-n", str(DEPLOY / "systemd" / "install-agent.sh")]).returncode == 0
    result = subprocess.run(
        ["sh", str(DEPLOY / "systemd" / "install-agent.sh"), "--root", str(root), "--skip-pip",
         "--config", str(REPO / "edge_agent" / "examples" / "simulator.yaml")],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0, result.stderr
    unit = root / "etc/systemd/system/forgeline-agent.service"
    assert unit.read_text() == (DEPLOY / "systemd" / "forgeline-agent.service").read_text()
    assert (root / "etc/forgeline/agent.yaml").is_file() and (root / "opt/forgeline/venv/bin/python").exists()
    # --skip-pip installs nothing: stand in this checkout's forgeline for the venv's entry point.
    entry = root / "opt/forgeline/venv/bin/forgeline"
    entry.write_text(f'#!/bin/sh\nexec "{BIN / "forgeline"}" "$@"\n')
    entry.chmod(0o755)
    staged = tmp_path / "forgeline-agent.service"
    staged.write_text(unit.read_text().replace("/opt/forgeline", f"{root}/opt/forgeline"))
    assert verify_unit(staged) == ""

    # what ExecStartPre runs, on the installed config
    pre = next(line.split("=", 1)[1] for line in staged.read_text().splitlines() if line.startswith("ExecStartPre="))
    check = subprocess.run(pre.replace("/etc/forgeline", f"{root}/etc/forgeline").split(), capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    parse_forgeline(pre.split()[1:])
    start = next(line.split("=", 1)[1] for line in staged.read_text().splitlines() if line.startswith("ExecStart="))
    parse_forgeline(start.split()[1:])

    # the check can fail: an unknown key or a missing binary is reported
    broken = tmp_path / "broken.service"
    broken.write_text(staged.read_text().replace("User=forgeline", "Usr=forgeline"))
    assert "Unknown key" in verify_unit(broken)
    entry.unlink()
    assert "not executable" in verify_unit(staged)


def verify_unit(path: Path) -> str:
    """Problems ``systemd-analyze verify`` reports for a unit file (empty when it is clean)."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    result = subprocess.run([binary, "verify", str(path)], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip() if result.returncode or result.stderr.strip() else ""


# --- Kubernetes ------------------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the base manifests are still validated one by one")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate_k8s(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_base_manifests_validate_one_by_one() -> None:
    base = DEPLOY / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    documents = [d for name in kustomization["resources"] for d in yaml.safe_load_all((base / name).read_text()) if d]
    assert {d["kind"] for d in documents} >= {"StatefulSet", "Deployment", "Service", "Job"}
    for document in documents:
        validate_k8s(document)
    for generator in kustomization["configMapGenerator"]:
        assert all((base / f).is_file() for f in generator["files"]), generator


def test_region_overlay_builds_and_validates() -> None:
    documents = kustomize(OVERLAY)
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    for document in documents:
        validate_k8s(document)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "forgeline-eu"
    emqx = by_name[("StatefulSet", "emqx")]
    assert emqx["spec"]["replicas"] == 3
    env = {e["name"]: e for e in emqx["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"]["value"] == "dns"
    twin = by_name[("StatefulSet", "twin")]
    assert twin["spec"]["replicas"] == 4
    [container] = twin["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/forgeline:0.1.0"
    args = parse_forgeline(container["args"])
    assert args.share_group == "twin" and args.worker_id == "$(POD_NAME)"
    [job] = by_name[("Job", "grafana-provision")]["spec"]["template"]["spec"]["containers"]
    assert parse_forgeline(job["args"]).no_datasource
    for document in documents:
        for pod in [document["spec"]["template"]["spec"]] if "template" in document.get("spec", {}) else []:
            for c in pod["containers"]:
                assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]
                assert c["resources"]["limits"]["memory"], c["name"]
    # secrets the manifests need are named in the docs
    docs = (REPO / "docs" / "deploy.md").read_text()
    secrets = {ref["secretKeyRef"]["name"] for d in documents for ref in _walk(d, "secretKeyRef")}
    secrets |= {v["secret"]["secretName"] for d in documents for v in _walk_volumes(d)}
    assert secrets == {"emqx-cookie", "emqx-tls", "twin-config", "influxdb-auth", "grafana-auth"}
    assert all(name in docs for name in secrets)


def _walk(node: Any, key: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if key in node:
            found.append(node)
        for value in node.values():
            found += _walk(value, key)
    elif isinstance(node, list):
        for value in node:
            found += _walk(value, key)
    return found


def _walk_volumes(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in _walk(document, "secret") if isinstance(v.get("secret"), dict)]


def test_the_schema_check_can_fail() -> None:
    base = DEPLOY / "k8s" / "base"
    twin = next(d for d in yaml.safe_load_all((base / "twin.yaml").read_text()) if d["kind"] == "StatefulSet")
    twin["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(twin)


# --- generated files -------------------------------------------------------------------------------------


def test_generated_deploy_files_equal_their_generators(tmp_path: Path) -> None:
    export(tmp_path)
    for relative in ("datasources/forgeline.yaml", "dashboards/forgeline.yaml"):
        assert (DEPLOY / "grafana/provisioning" / relative).read_text() == (
            tmp_path / "provisioning" / relative).read_text(), f"run forgeline dashboards export ({relative})"
    assert (DEPLOY / "k8s/base/grafana/forgeline.yaml").read_text() == (
        DEPLOY / "grafana/provisioning/datasources/forgeline.yaml").read_text()
    assert (DEPLOY / "k8s/base/influxdb/dbrp.sh").read_text() == (DEPLOY / "compose/influxdb/dbrp.sh").read_text()
    sys.path.insert(0, str(DEPLOY / "tools"))
    try:
        import emqx_acl
    finally:
        sys.path.remove(str(DEPLOY / "tools"))
    text = emqx_acl.render()
    assert (DEPLOY / "k8s/base/emqx/acl.conf").read_text() == text, "run python deploy/tools/emqx_acl.py"
    assert 'fl/v1/${username}/telemetry/#' in text and text.rstrip().endswith("{deny, all}.")
    assert all(line.endswith(".") for line in text.splitlines() if line.startswith("{"))
