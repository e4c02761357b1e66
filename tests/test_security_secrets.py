"""Secrets never reach logs: not through reprs, error messages, paho's or Mosquitto's logs, nor
through any logging or print call in the code base (checked statically, so new code is covered)."""

from __future__ import annotations

import ast
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.mqtt import MqttError, MqttSettings, connect, make_client

REPO = Path(__file__).resolve().parents[1]
PASSWORD = f"pw-{uuid.uuid4().hex}"
TENANT = f"sec{uuid.uuid4().hex[:6]}"


def test_settings_repr_hides_the_password() -> None:
    settings = MqttSettings(username="acme", password=PASSWORD, tls=True)
    # how logging formats it: "%s" / "%r" with the settings as an argument
    logged = [logging.LogRecord("t", logging.INFO, __file__, 1, fmt, (settings,), None).getMessage()
              for fmt in ("%s", "%r")]
    for text in (repr(settings), str(settings), f"{settings}", *logged):
        assert PASSWORD not in text and "***" in text
    assert "password=None" in repr(MqttSettings(username="acme"))


def test_credentials_in_a_broker_url_never_echo() -> None:
    settings = MqttSettings.from_url(f"mqtts://acme%40gw2:{PASSWORD}%3A@broker.example:8883")
    assert (settings.username, settings.password, settings.host, settings.port, settings.tls) == (
        "acme@gw2", PASSWORD + ":", "broker.example", 8883, True)
    assert PASSWORD not in repr(settings)
    for bad in (f"http://acme:{PASSWORD}@h:1", f"acme:{PASSWORD}@h:1", f"mqtt://acme:{PASSWORD}@"):
        with pytest.raises(ValueError) as err:
            MqttSettings.from_url(bad)
        assert PASSWORD not in str(err.value)
    assert MqttSettings.from_url("mqtt://h:1884").username is None


@pytest.mark.parametrize("url", [None, 1883, b"mqtt://h:1", ["mqtt://h:1"]])
def test_a_broker_url_that_is_not_text_is_a_clear_value_error(url: object) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        MqttSettings.from_url(url)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if find_mosquitto() is None:
        pytest.skip("needs the mosquitto binary")
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("secrets-broker"), {TENANT: PASSWORD})
    yield broker
    broker.stop()


def test_no_password_in_logs_errors_or_broker_log(secure: SecureBroker, caplog: pytest.LogCaptureFixture) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    paho_logger = logging.getLogger("paho.test")
    good = make_client(secure.settings(TENANT))
    good.enable_logger(paho_logger)  # paho's packet-level debug log
    good.connect(secure.host, secure.port)
    good.loop_start()
    try:
        with pytest.raises(MqttError) as refused:
            connect(secure.settings(TENANT, password=wrong), timeout=5)
        assert wrong not in str(refused.value) and "Not authorized" in str(refused.value)
        connect(secure.settings(TENANT)).disconnect()
    finally:
        good.disconnect()
        good.loop_stop()
    assert any("CONNECT" in r.getMessage() for r in caplog.records), "paho's debug log was not captured"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in logged and wrong not in logged
    broker_log = secure.broker.log_text()
    assert TENANT in broker_log, "the broker logs connections (with usernames)"
    assert PASSWORD not in broker_log and wrong not in broker_log
    assert PASSWORD not in repr(secure)


# --- static check over the code base --------------------------------------------------------------

SECRET_NAME = re.compile(r"(pass(word|wd)?|secret|token|api_?key|private_?key|credential)s?$", re.I)
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
# Deliberate outputs of a secret, reviewed: `forgeline broker users --add` prints the password it
# generated once, to stdout, for the operator to store.
ALLOWED = {("forgeline/broker/cli.py", "_users")}


def _secret_references(node: ast.AST) -> list[str]:
    found = []
    for sub in ast.walk(node):
        name = sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else None
        if name and SECRET_NAME.search(name) and not (isinstance(sub, ast.Attribute) and sub.attr.isupper()):
            found.append(name)
    return found


def _is_output_call(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id == "print"
    if isinstance(func, ast.Attribute):
        return func.attr in LOG_METHODS
    return False


def _sources() -> list[Path]:
    return [p for package in ("forgeline", "edge_agent", "twin") for p in sorted((REPO / package).rglob("*.py"))]


def test_no_logging_or_print_call_formats_a_secret() -> None:
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        rel = str(path.relative_to(REPO))
        # the innermost function of every output call (ast.walk visits outer functions first)
        owner: dict[ast.Call, str] = {}
        for func in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and _is_output_call(node):
                    owner[node] = getattr(func, "name", "")
        for call, func_name in owner.items():
            names = [n for arg in [*call.args, *(k.value for k in call.keywords)] for n in _secret_references(arg)]
            if names and (rel, func_name) not in ALLOWED:
                offenders.append(f"{rel}:{call.lineno} logs {sorted(set(names))}")
    assert offenders == [], "\n".join(sorted(offenders))


def test_the_static_check_catches_a_leak() -> None:
    """The check above can fail: it flags these snippets."""
    for snippet in ('log.info("connecting with %s", settings.password)', 'print(f"token={token}")',
                    'logger.debug("cfg %s", cfg.mqtt_password)'):
        call = ast.parse(snippet).body[0].value  # type: ignore[attr-defined]
        assert _is_output_call(call) and _secret_references(call)


def test_config_reprs_hide_passwords() -> None:
    """Every dataclass in the code base with a password-like field keeps its value out of its repr:
    an instance is made with a marker in those fields (defaults elsewhere, validation bypassed) and
    its repr must not show the marker."""
    import dataclasses
    import importlib

    marker = f"MARK{uuid.uuid4().hex}"
    leaks: list[str] = []
    examined: list[str] = []
    for path in _sources():
        module_name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module_name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception:  # optional dependencies of other areas; their own tests import them
            continue
        for obj in vars(module).values():
            if not (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module_name):
                continue
            secret_fields = [f.name for f in dataclasses.fields(obj) if SECRET_NAME.search(f.name)]
            if not secret_fields:
                continue
            examined.append(obj.__name__)
            instance = object.__new__(obj)
            for f in dataclasses.fields(obj):
                if f.name in secret_fields:
                    value: object = marker
                elif f.default is not dataclasses.MISSING:
                    value = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    value = f.default_factory()
                else:
                    value = "x"
                object.__setattr__(instance, f.name, value)
            if marker in repr(instance):
                leaks.append(f"{module_name}.{obj.__name__}")
    assert {"MqttSettings", "InfluxSettings"} <= set(examined), f"the scan missed the settings classes: {examined}"
    assert leaks == [], f"dataclasses that show a secret in their repr: {leaks}"
