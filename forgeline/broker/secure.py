"""A secure Mosquitto on one machine: the production config (TLS, client certificates, passwords,
per-tenant ACL) with a development PKI, for the demo (``forgeline demo --secure``) and the tests.

Example::

    from forgeline.broker.secure import start_secure_mosquitto
    with start_secure_mosquitto(workdir, users=["acme", "_twin"]) as secure:
        agent_settings = secure.settings("acme")     # MqttSettings: TLS + client cert + password
        twin_settings = secure.settings("_twin")

The config is ``broker/mosquitto.conf`` with only the listener, file paths and log destination
rewritten (:func:`render_secure_config`), so the tests exercise what production runs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from forgeline.broker import BrokerError, RunningBroker, free_port, start_mosquitto
from forgeline.mqtt import MqttSettings
from forgeline.security import acl, passwords, pki

# Keys of broker/mosquitto.conf whose values name files or addresses on this machine.
_PATH_KEYS = ("cafile", "certfile", "keyfile", "password_file", "acl_file", "persistence_location")


def production_config_path() -> Path:
    """``broker/mosquitto.conf`` in a checkout, or its copy in an installed wheel."""
    here = Path(__file__).resolve()
    for candidate in (
        here.parents[2] / "broker" / "mosquitto.conf",
        here.parents[1] / "_data" / "broker" / "mosquitto.conf",
    ):
        if candidate.exists():
            return candidate
    raise BrokerError("broker/mosquitto.conf not found (checkout or installed package is incomplete)")


def render_secure_config(
    template: str,
    *,
    host: str,
    port: int,
    files: Mapping[str, Path],
    log_file: Path | None = None,
    persistence: bool = False,
    extra: Iterable[str] = (),
) -> str:
    """The production config with the listener on ``host:port`` and ``files`` (keys of
    ``_PATH_KEYS``) substituted; every other line is kept as is. Missing keys are an error, so a
    template that loses its TLS or ACL lines cannot silently start an open broker."""
    seen: set[str] = set()
    out: list[str] = []
    for line in template.splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        if key == "listener":
            out.append(f"listener {port} {host}")
            seen.add(key)
        elif key in _PATH_KEYS and key in files:
            value = str(files[key]) + ("/" if key == "persistence_location" else "")
            out.append(f"{key} {value}")
            seen.add(key)
        elif key == "persistence" and not persistence:
            out.append("persistence false")
        elif key == "log_dest" and log_file is not None:
            if "log_dest" not in seen:
                out.append(f"log_dest file {log_file}")
            seen.add(key)
        else:
            out.append(line)
    required = {"listener", "cafile", "certfile", "keyfile", "password_file", "acl_file"}
    missing = required - seen
    if missing:
        raise BrokerError(f"the broker config template lacks {sorted(missing)}: refusing to start an open broker")
    for needed in ("allow_anonymous false", "require_certificate true"):
        if needed not in template.splitlines():
            raise BrokerError(f"the broker config template lacks '{needed}': refusing to start an open broker")
    if os.geteuid() == 0:
        # Mosquitto started as root drops to the 'mosquitto' user, which cannot read our 0600
        # keys in a private temporary directory; production starts it from systemd as mosquitto.
        out.append("user root")
    out += list(extra)
    return "\n".join(out) + "\n"


@dataclass
class SecureBroker:
    """A running secure Mosquitto and the credentials made for it. ``stop()`` is idempotent."""

    broker: RunningBroker
    workdir: Path
    pki: pki.DevPki
    password_file: Path
    acl_file: Path
    passwords: dict[str, str] = field(repr=False)

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def settings(self, username: str, *, client_cert: bool = True, **overrides: object) -> MqttSettings:
        """Connection settings for ``username``: TLS with the development CA, its client certificate
        and its password."""
        if username not in self.passwords:
            raise KeyError(f"no user {username!r} on this broker (have {sorted(self.passwords)})")
        pair = self.pki.client(username)
        values: dict[str, object] = {
            "host": self.host, "port": self.port, "protocol": 5, "tls": True, "ca_file": str(self.pki.ca_cert),
            "username": username, "password": self.passwords[username],
        }
        if client_cert:
            values.update(cert_file=str(pair.cert), key_file=str(pair.key))
        values.update(overrides)
        return MqttSettings(**values)  # type: ignore[arg-type]

    def ensure_user(self, username: str) -> MqttSettings:
        """Settings for ``username``, adding the user first if this broker does not know it yet
        (the demo gives every tenant's agent its own account this way)."""
        if username not in self.passwords:
            self.add_user(username)
        return self.settings(username)

    def add_user(self, username: str, password: str | None = None) -> str:
        """Add (or re-key) a user, issue its client certificate, regenerate the ACL and make the
        running broker reload both (SIGHUP). Returns the password."""
        acl.principal_for(username)  # refuse usernames that map to no role before touching files
        password = password or passwords.generate_password()
        passwords.set_password(self.password_file, username, password)
        self.passwords[username] = password
        if not self.pki.client(username).cert.exists():
            pki.issue(self.pki, username)
        self.acl_file.write_text(acl.render_acl(self.passwords))
        self.reload()
        return password

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password file and the ACL, keeping connected clients."""
        if self.broker.pid is not None:
            os.kill(self.broker.pid, signal.SIGHUP)
            time.sleep(0.2)  # the reload is asynchronous; give it a moment before the next CONNECT

    def stop(self) -> None:
        self.broker.stop()

    def __enter__(self) -> SecureBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_secure_mosquitto(
    workdir: Path,
    users: Mapping[str, str | None] | Iterable[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    server_hosts: Iterable[str] = pki.DEFAULT_HOSTS,
    persistence: bool = False,
    template: str | None = None,
    binary: str | None = None,
    timeout: float = 10.0,
) -> SecureBroker:
    """Start Mosquitto with the production config on ``host:port`` (a free port by default).

    ``workdir`` receives ``certs/`` (a development CA, reused if present, a server certificate and
    one client certificate per user), ``passwd``, ``acl`` and ``mosquitto.conf``. ``users`` maps
    usernames to passwords (None: generate one) or is a list of usernames (all generated); roles
    follow from the usernames (see :mod:`forgeline.security.acl`). Raises :class:`BrokerError` when
    there is no mosquitto binary: there is no insecure fallback.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, str | None] = dict(users) if isinstance(users, Mapping) else dict.fromkeys(users)
    for username in wanted:
        acl.principal_for(username)
    port = port or free_port(host)
    certs = pki.make_dev_pki(workdir / "certs", hosts=[host, *server_hosts], clients=wanted)
    password_file, acl_file = workdir / "passwd", workdir / "acl"
    secrets: dict[str, str] = {}
    entries = passwords.read_entries(password_file)
    for username, password in wanted.items():
        secrets[username] = password or passwords.generate_password()
        entries[passwords.check_username(username)] = passwords.hash_password(secrets[username])
    passwords.write_entries(password_file, entries)
    acl_file.write_text(acl.render_acl(entries))
    text = render_secure_config(
        template if template is not None else production_config_path().read_text(),
        host=host,
        port=port,
        files={
            "cafile": certs.ca_cert, "certfile": certs.server.cert, "keyfile": certs.server.key,
            "password_file": password_file, "acl_file": acl_file, "persistence_location": workdir,
        },
        log_file=workdir / "mosquitto.log",
        persistence=persistence,
    )
    broker = start_mosquitto(port, host, binary=binary, workdir=workdir, config_text=text, timeout=timeout)
    return SecureBroker(broker, workdir, certs, password_file, acl_file, secrets)
