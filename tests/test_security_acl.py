"""The ACL generated from the contract: no drift from topics.TOPICS or from broker/acl, no channel
without a writer and a reader, no way for one tenant's grants to reach another tenant's topics, and
usernames that cannot be abused. Plus the ``forgeline broker certs|users|acl`` commands."""

from __future__ import annotations

import io
import re
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeline.broker.secure import production_config_path
from forgeline.cli import main
from forgeline.contract import topics
from forgeline.contract.topics import DeviceRef, Kind
from forgeline.security import acl, passwords, pki
from forgeline.security.acl import AclError, Role, principal_for, render_acl

REPO = Path(__file__).resolve().parents[1]
tenant_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,15}", fullmatch=True)


def test_checked_in_acl_matches_the_contract() -> None:
    assert (REPO / "broker" / "acl").read_text() == render_acl(acl.STANDARD_ACCOUNTS), (
        "broker/acl drifted from the contract: run 'forgeline broker acl --out broker/acl'"
    )


def test_module_examples_run() -> None:
    import doctest

    for module in (acl, passwords, pki):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_every_channel_has_a_writer_and_a_reader() -> None:
    assert acl.uncovered_channels() == []


def test_production_config_is_shipped_and_closed() -> None:
    conf = production_config_path().read_text().splitlines()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    assert not [line for line in conf if line.startswith("listener") and line.split()[1] in ("1883",)]


# A model of Mosquitto's acl_file check (deny by default; %u substitution; topic filter matching),
# to check properties over many tenant names that the broker tests check on a few.
def _allowed(acl_text: str, username: str, topic: str, access: str) -> bool:
    current: str | None = None
    for raw in acl_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            current = rest
            continue
        if word not in ("topic", "pattern"):
            continue
        mode, _, flt = rest.partition(" ")
        if word == "topic" and current != username:
            continue
        if word == "pattern":
            flt = flt.replace("%u", username)
        if mode in (access, "readwrite") and topics.matches(flt, topic):
            return True
    return False


def _device_topics(tenant: str) -> list[str]:
    ref = DeviceRef(tenant, "s", "a", "d")
    return [
        *(ref.topic(k, "c" if k.value in topics.COMMAND_KINDS else None) for k in Kind),
        topics.fleet_topic(tenant), topics.api_request_topic(tenant, "m"), topics.api_response_topic(tenant, "c"),
        topics.feedback_topic(tenant, "m", "r"), topics.insights_topic(tenant, "m"), topics.deadletter_topic(tenant),
    ]


@settings(max_examples=100, deadline=None)
@given(tenant_names, tenant_names, st.sampled_from(["", "@gw2"]))
def test_no_grant_crosses_tenants(own: str, other: str, gateway: str) -> None:
    if own == other:
        return
    username = own + gateway
    text = render_acl([username, other])
    for topic in _device_topics(other):
        for access in ("read", "write"):
            assert not _allowed(text, username, topic, access), (username, access, topic)
    # and the platform topics are out of reach too
    for topic in (topics.routing_request_topic(), topics.routing_response_topic("c"), "fl/v1/_customers/x/y"):
        assert not _allowed(text, username, topic, "write") and not _allowed(text, username, topic, "read")
    # while its own telemetry is writable and its commands readable
    ref = DeviceRef(own, "s", "a", "d")
    assert _allowed(text, username, ref.telemetry_topic, "write")
    assert _allowed(text, username, ref.command_topic("c"), "read")


def test_service_accounts_get_nothing_from_the_tenant_patterns() -> None:
    """%u for a service account or a customer expands to a level no tenant can have."""
    for username in ("_twin", "_routing", "_customer@bigco", "acme@gw2", "_ops"):
        text = render_acl([username])
        patterns = [line.split()[2].replace("%u", username) for line in text.splitlines()
                    if line.startswith("pattern ")]
        for flt in patterns:
            level = flt.split("/")[2] if flt.split("/")[2] != "_sys" else flt.split("/")[-1]
            with pytest.raises(topics.TopicError):
                topics.check_tenant(level)


@pytest.mark.parametrize(
    ("username", "role", "scope"),
    [
        ("acme", Role.FACTORY, "acme"),
        ("acme@gw2", Role.FACTORY, "acme"),
        ("_twin", Role.TWIN, None),
        ("_twin@i2", Role.TWIN, None),
        ("_routing", Role.PLATFORM, None),
        ("_loop", Role.LOOP, None),
        ("_quotes", Role.PLATFORM, None),
        ("_customer@bigco", Role.CUSTOMER, "bigco"),
        ("_ops", Role.OPERATOR, None),
    ],
)
def test_principal_for(username: str, role: Role, scope: str | None) -> None:
    assert principal_for(username) == acl.Principal(username, role, scope)


@pytest.mark.parametrize(
    "username",
    ["", "_", "_platform_admin", "_customer", "_customer@", "_customer@_x", "acme@", "a/b", "a+b", "a#b",
     "%u", "acme@gw/1", "_sys", "x" * 65, "acme@" + "g" * 65],
)
def test_usernames_without_a_role_are_refused(username: str) -> None:
    with pytest.raises(AclError):
        principal_for(username)


@pytest.mark.parametrize("username", ["a:b", "a\nb", "a b", "a/b", "a+b", "a#b", "$SYS", ""])
def test_password_file_refuses_usernames_that_corrupt_it(username: str) -> None:
    with pytest.raises(passwords.PasswordError):
        passwords.check_username(username)


def test_password_hash_round_trip_and_errors() -> None:
    entry = passwords.hash_password("pw", iterations=5)
    assert passwords.verify_password("pw", entry) and not passwords.verify_password("pW", entry)
    assert not passwords.verify_password("pw", "$7$x$y$z") and not passwords.verify_password("pw", "garbage")
    with pytest.raises(passwords.PasswordError):
        passwords.hash_password("")


# --- the CLI ----------------------------------------------------------------------------------------


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
    import os
    import signal
    import subprocess
    import time

    from forgeline.broker import find_mosquitto, free_port
    from forgeline.mqtt import MqttSettings, connect

    if find_mosquitto() is None:
        pytest.skip("needs the mosquitto binary")
    assert main(["broker", "--secure", str(tmp_path), "--kind", "amqtt"]) == 2  # no insecure fallback
    assert main(["broker", "--secure", str(tmp_path)]) == 2  # no password file yet
    assert main(["broker", "certs", str(tmp_path / "certs"), "--client", "acme"]) == 0
    pwfile = tmp_path / "passwd"
    passwords.set_password(pwfile, "acme", "cli-secret")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgeline.cli", "broker", "--secure", str(tmp_path), "--port", str(port)],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        certs = pki.DevPki(tmp_path / "certs")
        settings = MqttSettings(port=port, tls=True, ca_file=str(certs.ca_cert), username="acme",
                                password="cli-secret", cert_file=str(certs.client("acme").cert),
                                key_file=str(certs.client("acme").key))
        deadline = time.monotonic() + 15
        while True:
            try:
                client = connect(settings, timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        info = client.publish("fl/v1/acme/telemetry/s/a/d", b"x", qos=1)
        info.wait_for_publish(5)
        client.disconnect()
        client.loop_stop()
        assert "user acme" not in (tmp_path / "acl").read_text()  # a plain tenant: covered by patterns
        assert "user _twin" in (tmp_path / "acl").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"mqtts://127.0.0.1:{port}" in err and "cli-secret" not in err
