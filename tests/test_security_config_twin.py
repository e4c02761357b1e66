"""Property-based fuzzing of the twin's config loader: whatever the file holds, loading returns a
config or raises ConfigError with a reason, never anything else, in bounded time; and a password in
the file never appears in an error message or a repr."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.config_fuzz import BAD_PASSWORDS, BOMB, DEEP, FUZZ, SECRET, documents, mutate
from twin.config import ConfigError as TwinConfigError
from twin.config import TwinConfig

TWIN_EXAMPLE: dict[str, Any] = {
    "broker": "mqtts://127.0.0.1:8883", "mqtt": {"username": "_twin", "password": "pw"}, "share_group": "twin",
    "tenants": ["factory-a"], "publish_interval_s": 1.0, "core": {"max_devices": 64},
    "snapshot": {"interval_s": 30}, "metrics": {"host": "127.0.0.1", "port": 9100},
}

# Keys the loader knows, so generated documents get past the first "unknown key" check.
TWIN_KEYS = ["broker", "mqtt", "worker_id", "share_group", "tenants", "publish_interval_s", "fleet_interval_s",
             "max_clock_skew_s", "max_queue", "core", "snapshot", "metrics", "influx", "max_devices", "dir",
             "interval_s", "host", "port", "username", "password", "url", "token", "bucket", "org"]


def _twin(doc: Any) -> Any:
    try:
        return TwinConfig.from_dict(doc)
    except TwinConfigError as exc:
        assert str(exc)
        return exc


# --- the twin -------------------------------------------------------------------------------------


@FUZZ
@given(documents(TWIN_KEYS))
def test_twin_config_documents(doc: Any) -> None:
    _twin(doc)


@FUZZ
@given(st.data())
def test_twin_config_mutated_example(data: st.DataObject) -> None:
    _twin(mutate(TWIN_EXAMPLE, data, TWIN_KEYS))


def test_twin_example_is_valid() -> None:
    assert isinstance(TwinConfig.from_dict(TWIN_EXAMPLE), TwinConfig)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".yaml", ".json"]))
def test_twin_config_file_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("twin-config") / f"twin{suffix}"
    path.write_bytes(raw)
    try:
        TwinConfig.load(path)
    except TwinConfigError as exc:
        assert str(exc)


# --- hostile files: deep nesting, alias bombs ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEEP))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_twin_config_deep_nesting_is_a_config_error(tmp_path: Path, name: str, suffix: str) -> None:
    path = tmp_path / f"twin{suffix}"
    path.write_text(DEEP[name])
    start = time.perf_counter()
    with pytest.raises(TwinConfigError):
        TwinConfig.load(path)
    assert time.perf_counter() - start < 10


def test_yaml_alias_bomb_is_bounded(tmp_path: Path) -> None:
    """9^9 references: the loaders must not expand them (time and memory stay small)."""
    start = time.perf_counter()
    path = tmp_path / "twin.yaml"
    path.write_text(BOMB.replace("sources: *i\nmqtt: *i\n", "tenants: *i\n"))
    with pytest.raises(TwinConfigError):
        TwinConfig.load(path)
    assert time.perf_counter() - start < 10


# --- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("password", BAD_PASSWORDS, ids=lambda p: type(p).__name__)
def test_twin_config_errors_never_echo_a_password(password: Any) -> None:
    doc = {**TWIN_EXAMPLE, "mqtt": {"username": "_twin", "password": password}, "max_queue": -1}
    try:
        TwinConfig.from_dict(doc)
    except TwinConfigError as exc:
        assert SECRET not in str(exc) and str(password) not in str(exc), exc


def test_twin_config_repr_hides_secrets() -> None:
    doc = {**TWIN_EXAMPLE, "mqtt": {"username": "_twin", "password": SECRET},
           "influx": {"url": "http://127.0.0.1:8086", "token": SECRET + "tok"}}
    config = TwinConfig.from_dict(doc)
    assert config.mqtt_settings.password == SECRET and config.influx is not None
    assert config.influx.token == SECRET + "tok"
    assert SECRET not in repr(config) and SECRET not in str(config)
    in_url = TwinConfig.from_dict({"broker": f"mqtts://_twin:{SECRET}@127.0.0.1:8883"})
    assert in_url.mqtt_settings.password == SECRET and SECRET not in repr(in_url)
    assert SECRET not in json.dumps(repr(config.mqtt_settings))
