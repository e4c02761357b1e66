"""``forgeline broker``: run a broker on this machine, make development certificates, users and the ACL.

::

    forgeline broker                         # Mosquitto if installed, else embedded amqtt (says which)
    forgeline broker --secure DIR            # the production config (TLS, passwords, ACL) from DIR
    forgeline broker certs DIR --client acme # development CA + server cert + client certs
    forgeline broker users FILE --add acme   # add a user (password generated and printed once)
    forgeline broker acl --users FILE        # the ACL file generated from the topic contract
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from forgeline.security import acl, passwords

if TYPE_CHECKING:
    from forgeline.broker import RunningBroker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 1883, or 8883 with --secure)")
    parser.add_argument("--kind", choices=("auto", "mosquitto", "amqtt"), default="auto",
                        help="which broker to run (default: mosquitto if installed, else embedded amqtt)")
    parser.add_argument("--secure", type=Path, metavar="DIR",
                        help="run Mosquitto with broker/mosquitto.conf (TLS, client certificates, passwords, "
                             "ACL) using DIR/certs, DIR/passwd and DIR/acl; creates a development CA and "
                             "server certificate in DIR/certs if absent")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    certs = sub.add_parser("certs", help="make a development CA, a server certificate and client certificates")
    certs.add_argument("directory", type=Path, help="where to write ca.crt, server.crt, NAME.crt and keys")
    certs.add_argument("--server-host", action="append", default=None, metavar="HOST",
                       help="a name or IP address the server certificate is valid for (repeatable; "
                            "default localhost, 127.0.0.1, ::1)")
    certs.add_argument("--client", action="append", default=[], metavar="NAME",
                       help="issue a client certificate NAME.crt (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--new-ca", action="store_true", help="replace an existing CA in DIRECTORY")

    users = sub.add_parser("users", help="add, delete or list users of a Mosquitto password file")
    users.add_argument("file", type=Path, help="the password file (created with mode 0600 if absent)")
    group = users.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="NAME", help="add NAME or change its password")
    group.add_argument("--delete", metavar="NAME", help="remove NAME")
    group.add_argument("--list", action="store_true", help="list usernames and their roles")
    users.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin (default: generate one and print it)")
    users.add_argument("--prompt", action="store_true", help="ask for the password on the terminal")
    users.add_argument("--iterations", type=int, default=passwords.DEFAULT_ITERATIONS,
                       help=f"PBKDF2 iterations (default {passwords.DEFAULT_ITERATIONS})")
    users.add_argument("--acl", type=Path, metavar="ACLFILE", help="also regenerate this ACL file for the users")

    acl_cmd = sub.add_parser("acl", help="print or write the ACL file generated from the topic contract")
    acl_cmd.add_argument("--users", type=Path, metavar="FILE", help="password file: add user blocks for its "
                         "gateway and customer accounts (the standard service accounts are always included)")
    acl_cmd.add_argument("--out", type=Path, help="write here instead of stdout")
    acl_cmd.add_argument("--check", type=Path, metavar="ACLFILE",
                         help="exit 1 if ACLFILE differs from what would be generated")


def run(args: argparse.Namespace) -> int:
    if args.action == "certs":
        return _certs(args)
    if args.action == "users":
        return _users(args)
    if args.action == "acl":
        return _acl(args)
    return _serve(args)


def _err(message: str) -> int:
    print(f"forgeline broker: {message}", file=sys.stderr)
    return 2


def _certs(args: argparse.Namespace) -> int:
    from forgeline.security import pki

    try:
        made = pki.make_dev_pki(
            args.directory,
            hosts=args.server_host or pki.DEFAULT_HOSTS,
            clients=args.client,
            days=args.days,
            keep_ca=not args.new_ca,
        )
    except pki.PkiError as exc:
        return _err(str(exc))
    print(f"CA:     {made.ca_cert}  (key {made.ca_key}: keep it off the broker in production)")
    print(f"server: {made.server.cert}")
    for name in args.client:
        print(f"client: {made.client(name).cert}")
    return 0


def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """The password to set and whether it was generated (then it is printed once, to stdout)."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    if args.prompt:
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise passwords.PasswordError("the passwords differ")
        return first, False
    return passwords.generate_password(), True


def _users(args: argparse.Namespace) -> int:
    try:
        if args.list:
            for name in passwords.read_entries(args.file):
                try:
                    principal = acl.principal_for(name)
                    role = principal.role.value + (f" ({principal.scope})" if principal.scope else "")
                except acl.AclError as exc:
                    role = f"NO ROLE: {exc}"
                print(f"{name}\t{role}")
            return 0
        if args.add:
            acl.principal_for(args.add)  # a username that maps to no role would be useless
            password, generated = _read_password(args)
            passwords.set_password(args.file, args.add, password, iterations=args.iterations)
            if generated:
                # stdout only, once: the caller stores it; it is never logged.
                print(password)
            print(f"user {args.add} set in {args.file}", file=sys.stderr)
        else:
            if not passwords.delete_user(args.file, args.delete):
                return _err(f"no user {args.delete!r} in {args.file}")
            print(f"user {args.delete} removed from {args.file}", file=sys.stderr)
        if args.acl:
            args.acl.write_text(acl.render_acl([*acl.STANDARD_ACCOUNTS, *passwords.read_entries(args.file)]))
            print(f"ACL written to {args.acl}; reload the broker with SIGHUP", file=sys.stderr)
    except (passwords.PasswordError, acl.AclError) as exc:
        return _err(str(exc))
    return 0


def _acl(args: argparse.Namespace) -> int:
    try:
        usernames = passwords.read_entries(args.users) if args.users else {}
        text = acl.render_acl([*acl.STANDARD_ACCOUNTS, *usernames])
    except (passwords.PasswordError, acl.AclError) as exc:
        return _err(str(exc))
    if args.check:
        if not args.check.exists() or args.check.read_text() != text:
            _err(f"{args.check} differs from the ACL generated from the contract; regenerate it with "
                 f"'forgeline broker acl --out {args.check}'")
            return 1
        return 0
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from forgeline.broker import BrokerError, start_broker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        broker = _serve_secure(args) if args.secure else start_broker(args.port or 1883, args.host, prefer=args.kind)
    except BrokerError as exc:
        return _err(str(exc))
    if broker.kind == "amqtt":
        print(f"embedded amqtt broker (MQTT 3.1.1 only; no mosquitto binary found) on {broker.url}", file=sys.stderr)
    else:
        url = f"mqtts://{broker.host}:{broker.port}" if args.secure else broker.url
        print(f"mosquitto (pid {broker.pid}) on {url}"
              + (" with TLS, client certificates, passwords and the ACL" if args.secure else ""), file=sys.stderr)
    try:
        while not stop.wait(0.5):
            if not broker.alive():
                print(f"the broker exited: {broker.log_text()[-2000:]}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def _serve_secure(args: argparse.Namespace) -> RunningBroker:
    from forgeline.broker import BrokerError, start_mosquitto
    from forgeline.broker.secure import production_config_path, render_secure_config
    from forgeline.security import pki

    if args.kind == "amqtt":
        raise BrokerError("--secure needs Mosquitto: the embedded broker has no TLS client certificates or ACL")
    directory: Path = args.secure
    password_file, acl_file = directory / "passwd", directory / "acl"
    if not password_file.exists():
        raise BrokerError(f"no {password_file}: add users first (forgeline broker users {password_file} --add NAME)")
    certs = pki.DevPki(directory / "certs")
    if not certs.ca_cert.exists():
        certs = pki.make_dev_pki(directory / "certs", hosts=[args.host, *pki.DEFAULT_HOSTS])
    elif not certs.server.cert.exists():
        pki.issue(certs, "server", server=True, hosts=[args.host, *pki.DEFAULT_HOSTS])
    acl_file.write_text(acl.render_acl([*acl.STANDARD_ACCOUNTS, *passwords.read_entries(password_file)]))
    port = args.port or 8883
    text = render_secure_config(
        production_config_path().read_text(),
        host=args.host,
        port=port,
        files={
            "cafile": certs.ca_cert, "certfile": certs.server.cert, "keyfile": certs.server.key,
            "password_file": password_file, "acl_file": acl_file, "persistence_location": directory,
        },
        log_file=directory / "mosquitto.log",
        persistence=True,
    )
    return start_mosquitto(port, args.host, workdir=directory, config_text=text)
