"""Config validation: every example config loads; bad configs fail naming the bad key; the CLI says so."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import edge_agent.anomalies
import edge_agent.config
import edge_agent.device
import edge_agent.sources._units
import edge_agent.sources.modbus
import edge_agent.sources.simulator
import edge_agent.spool
from edge_agent.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "edge_agent" / "examples").glob("*.yaml"))


def base(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "sources": [{"type": "simulator", "printers": [{"device": "p1", "technology": "FDM"}]}],
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.sources and all(source.devices() for source in config.sources)


def test_examples_cover_every_source_type() -> None:
    from edge_agent.sources import SOURCE_TYPES

    kinds = {source["type"] for path in EXAMPLES for source in yaml.safe_load(path.read_text())["sources"]}
    assert kinds == set(SOURCE_TYPES)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (base(batch={"max_sampels": 10}), "batch.max_sampels: unknown key (did you mean 'max_samples'?)"),
        (base(batch={"max_samples": 0}), "batch.max_samples: must be at least 1"),
        (base(batch={"window_s": "fast"}), "batch.window_s: must be a number"),
        (base(spool={"overflow": "drop_all"}), "spool.overflow: must be one of drop_oldest, drop_newest"),
        (base(spool={"max_bytes": 10}), "spool.max_bytes: must be at least"),
        (base(mqtt={"url": "http://x"}), "mqtt.url: broker URL must look like"),
        (base(mqtt={"protocol": 3}), "mqtt.protocol: must be 5 or 3.1.1"),
        (base(mqtt={"password": "x"}), "mqtt.password: requires username"),
        (base(mqtt={"tls": {"ca_file": "nope.pem"}}), "mqtt.tls.ca_file: no such file"),
        (base(mqtt={"tls": {"cert_file": "/etc/hostname"}}), "mqtt.tls.key_file: cert_file and key_file go together"),
        (base(link={"inflight": 5000}), "link.inflight: must be at most 1000"),
        (base(sources=[]), "sources: needs at least one source"),
        (base(sources=[{"type": "telepathy"}]), "sources[0].type: must be one of simulator, octoprint"),
        (base(sources=[{"type": "simulator", "rate_hx": 1, "printers": [{"device": "a", "technology": "FDM"}]}]),
         "sources[0].rate_hx: unknown key (did you mean 'rate_hz'?)"),
        (base(sources=[{"type": "simulator", "printers": [{"device": "a", "technology": "laser"}]}]),
         "sources[0].printers[0].technology: must be one of"),
        (base(sources=[{"type": "simulator", "printers": [{"device": "a b", "technology": "FDM"}]}]),
         "invalid device 'a b'"),
        (base(sources=[{"type": "simulator", "printers": [{"device": "a", "technology": "SLA",
                                                          "materials": ["PLA"]}]}]),
         "sources[0].printers[0].materials: 'PLA' is not a SLA material"),
        (base(sources=[{"type": "simulator", "printers": [{"device": "a", "technology": "FDM"}],
                        "anomalies": {"episodes": [{"device": "a", "channel": "nozzle_temp", "kind": "wobble",
                                                    "start_s": 1, "duration_s": 1}]}}]),
         "sources[0].anomalies.episodes[0].kind: must be one of drift, spike"),
        (base(sources=[{"type": "simulator", "printers": [{"device": "a", "technology": "FDM"}]},
                       {"type": "simulator", "printers": [{"device": "a", "technology": "SLA"}]}]),
         "sources: device factory-a/plant1/hall1/a is defined twice"),
        (base(sources=[{"type": "simulator", "lines": [{"product_model": "MW", "product_revision": "A",
                                                        "stations": ["paint"]}]}]),
         "sources[0].lines[0].stations[0]: must be one of assembly"),
        (base(extra=1), "extra: unknown key"),
    ],
)
def test_bad_configs_name_the_bad_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config, REPO)
    assert message in str(info.value)


def test_credentials_come_from_a_file_and_never_show(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    config = parse_config(base(mqtt={"url": "mqtts://gw.example:8883", "username": "acme",
                                     "password_file": "secret", "protocol": "3.1.1"}), tmp_path)
    assert config.mqtt.password == "s3cret" and config.mqtt.tls and config.mqtt.protocol == 4
    assert "s3cret" not in repr(config.mqtt)


def test_cli_check_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(base()))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base(batch={"window_s": -1})))
    run = [sys.executable, "-m", "forgeline.cli", "agent", "--check", "--config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "1 devices" in ok.stdout
    failed = subprocess.run([*run, str(bad)], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2 and "batch.window_s: must be positive" in failed.stderr
    missing = subprocess.run([*run, str(tmp_path / "nope.yaml")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


@pytest.mark.parametrize("module", [edge_agent.anomalies, edge_agent.config, edge_agent.device,
                                    edge_agent.spool, edge_agent.sources.simulator, edge_agent.sources.modbus,
                                    edge_agent.sources._units])
def test_module_examples_run(module: Any) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0
