"""A development PKI: one CA, a server certificate for the broker, client certificates for devices.

For development, the demo and tests. Production certificates come from the operator's own CA; the
file layout is the same, so ``broker/mosquitto.conf`` works with either.

Keys are ECDSA P-256 (fast to make, supported by Mosquitto/OpenSSL and Python's ``ssl``). Private
keys are written with mode 0600.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> pki = make_dev_pki(d, clients=["acme"])
    >>> sorted(p.name for p in d.iterdir())
    ['acme.crt', 'acme.key', 'ca.crt', 'ca.key', 'server.crt', 'server.key']
    >>> pki.client("acme").cert.name
    'acme.crt'
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DAYS = 365
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.@\-]{1,64}$")


class PkiError(ValueError):
    """A certificate request that cannot be fulfilled (bad name, missing CA); the message says why."""


@dataclass(frozen=True)
class KeyPair:
    """Paths of one certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """The files of a development PKI in one directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server(self) -> KeyPair:
        return KeyPair(self.directory / "server.crt", self.directory / "server.key")

    def client(self, name: str) -> KeyPair:
        return KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Create with 0600 from the start so the key is never world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forgeline development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Iterable[str]) -> Any:
    from cryptography import x509

    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_ca(directory: Path, *, common_name: str = "forgeline development CA", days: int = DEFAULT_DAYS) -> DevPki:
    """Write ``ca.crt`` and ``ca.key`` (a self-signed CA) into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    now = _now()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pki = DevPki(directory)
    _write_key(pki.ca_key, key)
    _write_cert(pki.ca_cert, cert)
    return pki


def issue(
    pki: DevPki,
    name: str,
    *,
    server: bool = False,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> KeyPair:
    """Issue ``{name}.crt``/``{name}.key`` signed by the CA in ``pki``.

    A server certificate carries ``hosts`` as subject alternative names; a client certificate has
    ``name`` as its common name. ``not_before``/``not_after`` override the validity window (tests
    make expired certificates with them).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not _FILE_NAME.match(name) or name in ("ca",):
        raise PkiError(f"invalid certificate name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . @ -")
    if not pki.ca_cert.exists() or not pki.ca_key.exists():
        raise PkiError(f"no CA in {pki.directory}: make one first (forgeline broker certs DIR)")
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    key = _new_key()
    now = _now()
    start = not_before or now - dt.timedelta(minutes=5)
    end = not_after or now + dt.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)  # type: ignore[arg-type]
    )
    if server:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    pair = KeyPair(pki.directory / f"{name}.crt", pki.directory / f"{name}.key")
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


def make_dev_pki(
    directory: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    keep_ca: bool = True,
) -> DevPki:
    """A CA (kept if one exists and ``keep_ca``), a ``server`` certificate for ``hosts`` and one
    certificate per client name, all in ``directory``."""
    pki = DevPki(directory)
    if not (keep_ca and pki.ca_cert.exists() and pki.ca_key.exists()):
        pki = make_ca(directory, days=days)
    issue(pki, "server", server=True, hosts=hosts, days=days)
    for client in clients:
        issue(pki, client, days=days)
    return pki
