"""Mosquitto 2 password entries, written in Python (no ``mosquitto_passwd`` needed on the host).

Mosquitto 2 stores ``username:$7$ITERATIONS$SALT$HASH`` where HASH is PBKDF2-HMAC-SHA512 of the
password with a 12-byte random SALT, both base64 encoded. The broker reads the iteration count from
the entry; ``mosquitto_passwd`` 2.0 writes 101, we write :data:`DEFAULT_ITERATIONS`. Mosquitto
hashes on its single event-loop thread at every CONNECT, so iterations are paid by every client
during a reconnect storm: 10 000 added 3-12 ms per CONNECT over 101 in our runs
(``bench/security_overhead.py``), 1 000 under 1 ms. Generated passwords carry 192 random bits,
for which the iteration count adds nothing; it only slows guessing of human-chosen passwords from
a stolen file.

Example::

    >>> entry = hash_password("s3cret", salt=bytes(12), iterations=101)
    >>> entry.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    True
    >>> verify_password("s3cret", entry), verify_password("guess", entry)
    (True, False)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

DEFAULT_ITERATIONS = 1_000
SALT_BYTES = 12
MAX_PASSWORD_BYTES = 65535  # MQTT's limit on the CONNECT password field


class PasswordError(ValueError):
    """A password entry or file that cannot be read or written; the message says why."""


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    """The ``$7$`` hash Mosquitto 2 expects for ``password`` (without the ``username:`` prefix)."""
    raw = password.encode("utf-8")
    if not raw:
        raise PasswordError("an empty password is not allowed")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    if not 1 <= iterations <= 10_000_000:
        raise PasswordError(f"iterations out of range: {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", raw, salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, entry: str) -> bool:
    """True if ``password`` matches a ``$7$`` (PBKDF2-SHA512) or ``$6$`` (SHA512) Mosquitto hash."""
    parts = entry.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt, want = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
            got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
            got = hashlib.sha512(password.encode("utf-8") + salt).digest()
            return hmac.compare_digest(got, want)
    except (ValueError, binascii.Error):
        return False
    return False


def check_username(username: str) -> str:
    """Mosquitto password files are ``name:hash`` lines; names with ``:``, newlines or MQTT wildcards
    would corrupt the file or the ACL patterns (``%u``)."""
    if not username or len(username) > 128:
        raise PasswordError(f"username must be 1-128 characters: {username!r}")
    bad = set(username) & set(":\n\r\0/+#$ \t")
    if bad:
        raise PasswordError(f"username {username!r} contains forbidden characters {sorted(bad)}")
    return username


def generate_password(nbytes: int = 24) -> str:
    """A random URL-safe password (192 bits by default)."""
    return secrets.token_urlsafe(nbytes)


def read_entries(path: Path) -> dict[str, str]:
    """The ``{username: hash}`` entries of a password file (empty if the file does not exist)."""
    if not path.exists():
        return {}
    entries: dict[str, str] = {}
    for lineno, line in _lines(path):
        name, sep, entry = line.partition(":")
        if not sep or not name or not entry:
            raise PasswordError(f"{path}:{lineno}: not a 'username:hash' line")
        entries[name] = entry
    return entries


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def write_entries(path: Path, entries: dict[str, str]) -> None:
    """Write a password file atomically with mode 0600 (the hashes are secrets too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for name in sorted(entries):
            f.write(f"{name}:{entries[name]}\n")
    os.replace(tmp, path)


def set_password(path: Path, username: str, password: str, *, iterations: int = DEFAULT_ITERATIONS) -> None:
    """Add ``username`` to the password file at ``path``, or replace its password."""
    entries = read_entries(path)
    entries[check_username(username)] = hash_password(password, iterations=iterations)
    write_entries(path, entries)


def delete_user(path: Path, username: str) -> bool:
    """Remove ``username``; return whether it was there."""
    entries = read_entries(path)
    if username not in entries:
        return False
    del entries[username]
    write_entries(path, entries)
    return True
