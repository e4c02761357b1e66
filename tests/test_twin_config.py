"""Twin configuration: defaults, file loading, and errors that name the bad key; ``forgeline twin``'s
--check and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from twin.config import ConfigError, InfluxConfig, TwinConfig

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_file_with_sections(tmp_path: Path) -> None:
    path = tmp_path / "twin.yaml"
    path.write_text(
        "broker: mqtts://user:secret@broker.example:8883\n"
        "worker_id: twin-1\n"
        "tenants: [acme, globex]\n"
        "share_group: twin\n"
        "core: {max_devices: 10, channels_per_device: 8}\n"
        "snapshot: {dir: /tmp/x, interval_s: 5}\n"
        "metrics: {host: 0.0.0.0, port: 9108}\n"
        "influx: {url: 'http://db:8086', bucket: b, spill_dir: /tmp/spill}\n"
    )
    config = TwinConfig.load(path)
    assert config.tenants == ("acme", "globex") and config.max_devices == 10 and config.channels_per_device == 8
    assert config.snapshot_dir == "/tmp/x" and config.snapshot_interval_s == 5
    assert config.metrics_port == 9108 and config.influx == InfluxConfig(url="http://db:8086", bucket="b",
                                                                         spill_dir="/tmp/spill")
    settings = config.mqtt_settings
    assert settings.tls and settings.username == "user" and settings.client_id == "twin-1"
    assert "secret" not in repr(settings)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"publish_interval": 1}, "unknown configuration keys: publish_interval"),
        ({"publish_interval_s": -1}, "publish_interval_s must be >= 0"),
        ({"fleet_interval_s": "5"}, "fleet_interval_s must be a number"),
        ({"tenants": ["_sys"]}, "reserved"),
        ({"tenants": "acme"}, "tenants must be a list"),
        ({"worker_id": "a b"}, "invalid worker_id"),
        ({"broker": "http://x"}, "broker URL must look like"),
        ({"core": {"max_device": 3}}, "unknown core keys: max_device"),
        ({"core": {"max_devices": 0}}, "max_devices must be a positive integer"),
        ({"influx": {"url": "db:8086"}}, "influx.url must start with http"),
        ({"influx": {"batch_size": 0}}, "influx.batch_size must be > 0"),
        ({"influx": {"bukket": "x"}}, "unknown influx keys: bukket"),
        ({"affinity": "random"}, "affinity must be 'handoff' or 'broker'"),
        ({"metrics": {"port": 70000}}, "metrics.port out of range"),
        ({"mqtt": {"password": "x"}}, "password requires username"),
    ],
)
def test_errors_name_the_problem(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TwinConfig.from_dict(document)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        TwinConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("broker: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        TwinConfig.load(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a mapping"):
        TwinConfig.load(listed)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forgeline.cli", "twin", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_check_and_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "twin.json"
    good.write_text(json.dumps({"worker_id": "w1", "tenants": ["acme"]}))
    result = _cli("--config", str(good), "--broker", "mqtt://127.0.0.1:1999", "--check")
    assert result.returncode == 0 and "worker w1, broker mqtt://127.0.0.1:1999" in result.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cycle_max_messages": 0}))
    result = _cli("--config", str(bad), "--check")
    assert result.returncode == 2 and "cycle_max_messages must be a positive integer" in result.stdout
    # no broker there: a clear error and exit code 1, not a traceback
    result = _cli("--broker", "mqtt://127.0.0.1:1", "--worker-id", "w2")
    assert result.returncode == 1 and "cannot connect to 127.0.0.1:1" in result.stdout
