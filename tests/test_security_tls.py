"""Who may connect to the production-config Mosquitto: TLS with a client certificate from our CA,
valid now, and a username/password. Everything else gets no CONNACK 0.

Connections are made below paho (TLS socket + raw CONNECT) so the test sees exactly what the broker
answers: a TLS alert, a closed connection, or a CONNACK reason code.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_support import connect_packet, mqtt_over_tls_outcome

from forgeline.broker import find_mosquitto
from forgeline.broker.secure import SecureBroker, start_secure_mosquitto
from forgeline.mqtt import MqttError, connect
from forgeline.security import passwords, pki

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")

TENANT = f"tls{uuid.uuid4().hex[:6]}"
ACCEPTED = "connack:0"
NOT_AUTHORIZED = "connack:5"  # MQTT 3.1.1 CONNACK return code 5


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("tls-broker"), [TENANT, "_twin"])
    yield broker
    broker.stop()


def _pair(pair: pki.KeyPair) -> tuple[str, str]:
    return str(pair.cert), str(pair.key)


def test_valid_certificate_and_password_are_accepted(secure: SecureBroker) -> None:
    settings = secure.settings(TENANT)
    assert mqtt_over_tls_outcome(settings, _pair(secure.pki.client(TENANT))) == ACCEPTED
    connect(settings).disconnect()  # and through the project's own client factory


def test_missing_client_certificate_is_refused(secure: SecureBroker) -> None:
    outcome = mqtt_over_tls_outcome(secure.settings(TENANT), None)
    # the TLS alert (CERTIFICATE_REQUIRED) or, depending on timing, the close that follows it
    assert outcome.startswith("tls-error:"), outcome
    with pytest.raises(MqttError):
        connect(secure.settings(TENANT, client_cert=False), timeout=3)


def test_certificate_from_another_ca_is_refused(secure: SecureBroker, tmp_path: Path) -> None:
    rogue = pki.make_dev_pki(tmp_path / "rogue", clients=[TENANT])
    outcome = mqtt_over_tls_outcome(secure.settings(TENANT), _pair(rogue.client(TENANT)))
    assert outcome.startswith("tls-error:"), outcome  # UNKNOWN_CA alert, or the close after it


def test_expired_certificate_is_refused(secure: SecureBroker) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue(secure.pki, f"expired-{TENANT}", not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))
    outcome = mqtt_over_tls_outcome(secure.settings(TENANT), _pair(expired))
    assert outcome.startswith("tls-error:"), outcome
    # control: the same name, the same CA, valid now, is accepted; only the validity window differs
    valid = pki.issue(secure.pki, f"expired-{TENANT}")
    assert mqtt_over_tls_outcome(secure.settings(TENANT), _pair(valid)) == ACCEPTED


def test_not_yet_valid_certificate_is_refused(secure: SecureBroker) -> None:
    now = dt.datetime.now(dt.UTC)
    future = pki.issue(secure.pki, f"future-{TENANT}", not_before=now + dt.timedelta(days=1),
                       not_after=now + dt.timedelta(days=30))
    outcome = mqtt_over_tls_outcome(secure.settings(TENANT), _pair(future))
    assert outcome.startswith("tls-error:"), outcome


def test_server_certificate_from_another_ca_is_refused_by_the_client(secure: SecureBroker, tmp_path: Path) -> None:
    rogue = pki.make_ca(tmp_path / "rogue")
    with pytest.raises(MqttError, match="certificate verify failed"):
        connect(secure.settings(TENANT, ca_file=str(rogue.ca_cert)), timeout=3)


@pytest.mark.parametrize(
    ("username", "password", "why"),
    [
        (TENANT, "wrong-password", "wrong password"),
        ("nobody", "whatever", "unknown user"),
        (TENANT, None, "username without password"),
        (None, None, "anonymous"),
    ],
)
def test_bad_credentials_with_a_valid_certificate_are_refused(
    secure: SecureBroker, username: str | None, password: str | None, why: str
) -> None:
    settings = secure.settings(TENANT)
    object.__setattr__(settings, "username", username)  # bypass MqttSettings' own checks on purpose
    object.__setattr__(settings, "password", password)
    assert mqtt_over_tls_outcome(settings, _pair(secure.pki.client(TENANT))) == NOT_AUTHORIZED, why


def test_plain_mqtt_on_the_tls_port_gets_no_connack(secure: SecureBroker) -> None:
    with socket.create_connection((secure.host, secure.port), timeout=5) as sock:
        sock.sendall(connect_packet("plain", TENANT, secure.passwords[TENANT]))
        try:
            data = sock.recv(4)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert not data.startswith(b"\x20"), data


def test_password_file_and_keys_are_private(secure: SecureBroker) -> None:
    for path in (secure.password_file, secure.pki.ca_key, secure.pki.server.key, secure.pki.client(TENANT).key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert secure.passwords[TENANT] not in secure.password_file.read_text()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_password_entries_match_mosquitto_passwd(tmp_path: Path) -> None:
    """Entries written by mosquitto_passwd verify with our code, and ours use the same format."""
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "alice", "s3cret pass"], check=True)
    theirs = passwords.read_entries(pwfile)["alice"]
    assert theirs.startswith("$7$")
    assert passwords.verify_password("s3cret pass", theirs)
    assert not passwords.verify_password("s3cret pas", theirs)
    ours = passwords.hash_password("s3cret pass")
    assert ours.split("$")[1] == "7" and len(ours.split("$")) == len(theirs.split("$"))


def test_broker_accepts_entries_at_mosquitto_passwd_default_iterations(secure: SecureBroker) -> None:
    """Both 101 iterations (mosquitto_passwd 2.0's default) and ours are accepted by the broker."""
    user = f"it{uuid.uuid4().hex[:6]}"
    entries = passwords.read_entries(secure.password_file)
    entries[user] = passwords.hash_password("pw-101", iterations=101)
    passwords.write_entries(secure.password_file, entries)
    issued = pki.issue(secure.pki, user)
    secure.passwords[user] = "pw-101"
    secure.reload()
    settings = secure.settings(user)
    assert mqtt_over_tls_outcome(settings, _pair(issued)) == ACCEPTED
    object.__setattr__(settings, "password", "pw-102")
    assert mqtt_over_tls_outcome(settings, _pair(issued)) == NOT_AUTHORIZED
