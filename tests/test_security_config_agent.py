"""Property-based fuzzing of the edge agent's config loader: whatever the file holds, loading returns
a config or raises ConfigError with a reason, never anything else, in bounded time; and a password
in the file never appears in an error message or a repr."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import ConfigError as AgentConfigError
from edge_agent.config import load_config_text, parse_config
from tests.config_fuzz import BAD_PASSWORDS, BOMB, DEEP, FUZZ, SECRET, documents, mutate

AGENT_EXAMPLE: dict[str, Any] = yaml.safe_load("""
mqtt: {url: "mqtts://127.0.0.1:8883", protocol: 5, username: acme, password: pw, keepalive: 30}
batch: {max_samples: 1000, window_s: 1.0}
spool: {path: ":memory:", max_bytes: 268435456, overflow: drop_oldest}
link: {inflight: 100, reconnect_min_s: 0.2, reconnect_max_s: 5}
sources:
  - type: simulator
    seed: 42
    speed: 600
    rate_hz: 1
    printers:
      - {device: fdm-01, technology: FDM, tenant: acme, site: plant-a, area: hall1}
      - {device: sls-01, technology: SLS, tenant: acme, site: plant-a, area: hall2}
    lines:
      - {tenant: acme, site: plant1, area: line1, product_model: MW-20, product_revision: B}
""")

# Keys the loaders know, so generated documents get past the first "unknown key" check.
AGENT_KEYS = ["mqtt", "batch", "spool", "link", "drain_timeout_s", "sources", "url", "protocol", "username",
              "password", "password_file", "tls", "ca_file", "insecure", "enabled", "keepalive", "max_samples",
              "window_s", "path", "max_bytes", "overflow", "inflight", "reconnect_min_s", "reconnect_max_s",
              "type", "tenant", "site", "area", "device", "printers", "lines", "seed", "rate_hz", "speed"]


def _agent(doc: Any, base: Path) -> Any:
    try:
        return parse_config(doc, base)
    except AgentConfigError as exc:
        assert str(exc)
        return exc


# --- the agent ------------------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=300), st.sampled_from([".yaml", ".json"]))
def test_agent_config_text(text: str, suffix: str) -> None:
    try:
        load_config_text(text, Path("/nonexistent-base"), suffix=suffix)
    except AgentConfigError as exc:
        assert str(exc)


@FUZZ
@given(documents(AGENT_KEYS))
def test_agent_config_documents(doc: Any) -> None:
    _agent(doc, Path("/nonexistent-base"))


@FUZZ
@given(st.data())
def test_agent_config_mutated_example(data: st.DataObject) -> None:
    _agent(mutate(AGENT_EXAMPLE, data, AGENT_KEYS), Path("/nonexistent-base"))


def test_agent_example_is_valid() -> None:
    """The control for the mutations above."""
    assert parse_config(AGENT_EXAMPLE, Path("/nonexistent-base")).sources


# --- hostile files: deep nesting, alias bombs ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEEP))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_agent_config_deep_nesting_is_a_config_error(name: str, suffix: str) -> None:
    start = time.perf_counter()
    with pytest.raises(AgentConfigError):
        load_config_text(DEEP[name], suffix=suffix)
    assert time.perf_counter() - start < 10


def test_yaml_alias_bomb_is_bounded() -> None:
    """9^9 references: the loader must not expand them (time and memory stay small)."""
    start = time.perf_counter()
    with pytest.raises(AgentConfigError):
        load_config_text(BOMB)
    assert time.perf_counter() - start < 10


# --- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("password", BAD_PASSWORDS, ids=lambda p: type(p).__name__)
def test_agent_config_errors_never_echo_a_password(password: Any) -> None:
    doc = {"mqtt": {"url": "mqtt://127.0.0.1:1883", "username": "acme", "password": password}, "sources": []}
    with pytest.raises(AgentConfigError) as err:
        parse_config(doc)
    assert SECRET not in str(err.value) and str(password) not in str(err.value), err.value


def test_agent_config_with_credentials_in_the_url_never_echoes_them() -> None:
    doc = {"mqtt": {"url": f"mqtt://acme:{SECRET}@127.0.0.1:notaport"}, "sources": []}
    with pytest.raises(AgentConfigError) as err:
        parse_config(doc)
    assert SECRET not in str(err.value)


def test_agent_config_repr_hides_the_password() -> None:
    doc = copy.deepcopy(AGENT_EXAMPLE)
    doc["mqtt"].update(username="acme", password=SECRET)
    config = parse_config(doc, Path("/nonexistent-base"))
    assert config.mqtt.password == SECRET
    assert SECRET not in repr(config)
