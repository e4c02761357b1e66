"""The ``forgeline broker`` command: run (plain, embedded fallback, --secure), certs, users, acl."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from forgeline.broker import find_mosquitto, free_port
from forgeline.cli import main
from forgeline.mqtt import MqttSettings, connect
from forgeline.security import passwords, pki


def _serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "forgeline.cli", "broker", *args], stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})


def _stop(proc: subprocess.Popen[str]) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return err


def _connect_eventually(settings: MqttSettings, proc: subprocess.Popen[str]) -> paho.Client:
    deadline = time.monotonic() + 15
    while True:
        try:
            return connect(settings, timeout=2)
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)


def test_cli_runs_the_embedded_broker_when_mosquitto_is_missing_and_says_so() -> None:
    port = free_port()
    proc = _serve(["--port", str(port)], env={"FORGELINE_MOSQUITTO": "/nonexistent/mosquitto"})
    try:
        client = _connect_eventually(MqttSettings(port=port, protocol=4), proc)
        client.disconnect()
        client.loop_stop()
    finally:
        err = _stop(proc)
    assert "embedded amqtt" in err and "no mosquitto binary" in err


def test_cli_certs_users_acl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs"
    assert main(["broker", "certs", str(certs), "--client", "acme", "--client", "_twin"]) == 0
    made = pki.DevPki(certs)
    for path in (made.ca_cert, made.server.cert, made.client("acme").cert, made.client("_twin").key):
        assert path.exists()
    ca_before = made.ca_cert.read_bytes()
    assert main(["broker", "certs", str(certs)]) == 0  # keeps the CA unless --new-ca
    assert made.ca_cert.read_bytes() == ca_before

    pwfile, aclfile = tmp_path / "passwd", tmp_path / "acl"
    capsys.readouterr()
    assert main(["broker", "users", str(pwfile), "--add", "acme"]) == 0
    out, err = capsys.readouterr()
    generated = out.strip()
    assert len(generated) >= 24 and generated not in err
    assert passwords.verify_password(generated, passwords.read_entries(pwfile)["acme"])
    assert stat.S_IMODE(pwfile.stat().st_mode) == 0o600

    monkeypatch.setattr(sys, "stdin", io.StringIO("typed secret\n"))
    assert main(["broker", "users", str(pwfile), "--add", "_customer@bigco", "--password-stdin",
                 "--acl", str(aclfile)]) == 0
    out, err = capsys.readouterr()
    assert "typed secret" not in out + err
    assert passwords.verify_password("typed secret", passwords.read_entries(pwfile)["_customer@bigco"])
    assert "user _customer@bigco" in aclfile.read_text()

    assert main(["broker", "users", str(pwfile), "--list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"acme\tfactory \(acme\)", listing) and "customer (bigco)" in listing
    assert "$7$" not in listing

    assert main(["broker", "users", str(pwfile), "--add", "_nobody"]) == 2
    assert "unknown service account" in capsys.readouterr().err

    assert main(["broker", "acl", "--users", str(pwfile), "--check", str(aclfile)]) == 0
    assert main(["broker", "users", str(pwfile), "--delete", "_customer@bigco"]) == 0
    assert main(["broker", "acl", "--users", str(pwfile), "--check", str(aclfile)]) == 1
    assert main(["broker", "users", str(pwfile), "--delete", "_customer@bigco"]) == 2


def test_cli_secure_broker_end_to_end(tmp_path: Path) -> None:
    """`forgeline broker --secure DIR` runs the production config: a user made with the CLI connects
    over TLS with its client certificate; the embedded broker is refused for secure mode."""
    if find_mosquitto() is None:
        pytest.skip("needs the mosquitto binary")
    assert main(["broker", "--secure", str(tmp_path), "--kind", "amqtt"]) == 2  # no insecure fallback
    assert main(["broker", "--secure", str(tmp_path)]) == 2  # no password file yet
    assert main(["broker", "certs", str(tmp_path / "certs"), "--client", "acme"]) == 0
    pwfile = tmp_path / "passwd"
    passwords.set_password(pwfile, "acme", "cli-secret")
    port = free_port()
    proc = _serve(["--secure", str(tmp_path), "--port", str(port)])
    try:
        certs = pki.DevPki(tmp_path / "certs")
        settings = MqttSettings(port=port, tls=True, ca_file=str(certs.ca_cert), username="acme",
                                password="cli-secret", cert_file=str(certs.client("acme").cert),
                                key_file=str(certs.client("acme").key))
        client = _connect_eventually(settings, proc)
        info = client.publish("fl/v1/acme/telemetry/s/a/d", b"x", qos=1)
        info.wait_for_publish(5)
        client.disconnect()
        client.loop_stop()
        assert "user acme" not in (tmp_path / "acl").read_text()  # a plain tenant: covered by patterns
        assert "user _twin" in (tmp_path / "acl").read_text()
    finally:
        err = _stop(proc)
    assert f"mqtts://127.0.0.1:{port}" in err and "cli-secret" not in err
