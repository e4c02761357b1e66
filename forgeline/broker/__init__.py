"""Start an MQTT broker: a real Mosquitto process when the binary exists, else embedded amqtt.

Used by ``forgeline broker``, the demo and the test fixtures. Production brokers are configured
from ``broker/`` (Mosquitto) and ``deploy/`` (EMQX cluster); this module is for one machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerError(RuntimeError):
    """A broker that could not be started; the message says why and what to do."""


def find_mosquitto() -> str | None:
    """The path of a mosquitto binary, or None. ``FORGELINE_MOSQUITTO`` overrides the search."""
    override = os.environ.get("FORGELINE_MOSQUITTO")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in MOSQUITTO_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.02)
    raise BrokerError(f"broker did not accept connections on {host}:{port} within {timeout:.0f}s ({last})")


@dataclass
class RunningBroker:
    """A broker this process started. ``stop()`` is idempotent."""

    host: str
    port: int
    kind: str  # "mosquitto" or "amqtt"
    mqtt5: bool
    workdir: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _embedded: _EmbeddedAmqtt | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def alive(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._embedded is not None and self._embedded.thread.is_alive()

    def log_text(self) -> str:
        """The broker's log so far (Mosquitto only), for error messages in tests."""
        if self.workdir and (self.workdir / "mosquitto.log").exists():
            return (self.workdir / "mosquitto.log").read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def kill(self) -> None:
        """SIGKILL the broker (Mosquitto only): for outage tests."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mosquitto_config(
    port: int,
    host: str = "127.0.0.1",
    *,
    workdir: Path,
    persistence: bool = False,
    extra: Iterable[str] = (),
) -> str:
    """A Mosquitto 2 config for one loopback listener, suitable for tests and the demo.

    Limits follow what the twin accepts (16 MiB messages) and let a replaying agent keep many
    QoS 1 messages in flight.
    """
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "max_packet_size 16777216",
        "max_inflight_messages 1000",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "set_tcp_nodelay true",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Started as root, mosquitto drops to the 'mosquitto' user, which cannot write our temp dir.
        lines.append("user root")
    if persistence:
        lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 1"]
    lines += list(extra)
    return "\n".join(lines) + "\n"


def start_mosquitto(
    port: int | None = None,
    host: str = "127.0.0.1",
    *,
    binary: str | None = None,
    workdir: Path | None = None,
    config_text: str | None = None,
    persistence: bool = False,
    extra: Iterable[str] = (),
    timeout: float = 10.0,
) -> RunningBroker:
    """Start a Mosquitto process on ``host:port`` with a temporary config (or ``config_text``)."""
    binary = binary or find_mosquitto()
    if binary is None:
        raise BrokerError("no mosquitto binary found (apt-get install mosquitto, or set FORGELINE_MOSQUITTO)")
    port = port or free_port(host)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="forgeline-mosquitto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        config_text
        if config_text is not None
        else mosquitto_config(port, host, workdir=workdir, persistence=persistence, extra=extra)
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "stderr.log", "ab"),  # noqa: SIM115 - the child owns it
        start_new_session=True,
    )
    broker = RunningBroker(host, port, "mosquitto", True, workdir, _process=proc)
    try:
        wait_for_port(host, port, timeout)
    except BrokerError:
        broker.stop()
        err = (workdir / "stderr.log").read_text(errors="replace") + broker.log_text()
        raise BrokerError(f"mosquitto failed to start on {host}:{port}: {err.strip()[-2000:]}") from None
    if proc.poll() is not None:
        raise BrokerError(f"mosquitto exited at once: {(workdir / 'stderr.log').read_text()[-2000:]}")
    log.info("mosquitto %s listening on %s:%d (pid %d)", binary, host, port, proc.pid)
    return broker


class _EmbeddedAmqtt:
    """amqtt's broker running on its own event loop in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.broker: Any = None
        self.thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            from amqtt.broker import Broker

            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                },
            }
            self.broker = Broker(config, loop=self.loop)
            self.loop.run_until_complete(self.broker.start())
        except BaseException as exc:  # reported to the starting thread
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    def start(self, timeout: float) -> None:
        self.thread.start()
        if not self.ready.wait(timeout):
            raise BrokerError("embedded amqtt broker did not start in time")
        if self.error is not None:
            raise BrokerError(f"embedded amqtt broker failed: {self.error!r}")

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def _shutdown() -> None:
            try:
                await self.broker.shutdown()
            finally:
                self.loop.stop()

        asyncio.run_coroutine_threadsafe(_shutdown(), self.loop)
        self.thread.join(5)


def start_embedded(port: int | None = None, host: str = "127.0.0.1", timeout: float = 10.0) -> RunningBroker:
    """Start the pure-Python amqtt broker in this process (MQTT 3.1.1 only, slower than Mosquitto)."""
    try:
        import amqtt  # noqa: F401
    except ModuleNotFoundError:
        raise BrokerError(
            "no mosquitto binary and no amqtt package: apt-get install mosquitto, or pip install 'forgeline[broker]'"
        ) from None
    port = port or free_port(host)
    embedded = _EmbeddedAmqtt(host, port)
    embedded.start(timeout)
    wait_for_port(host, port, timeout)
    log.info("embedded amqtt broker listening on %s:%d", host, port)
    return RunningBroker(host, port, "amqtt", False, None, _embedded=embedded)


def start_broker(port: int | None = None, host: str = "127.0.0.1", prefer: str = "auto") -> RunningBroker:
    """Start Mosquitto if its binary exists (or ``prefer='mosquitto'``), else embedded amqtt.

    ``prefer`` is ``auto``, ``mosquitto`` or ``amqtt``.
    """
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise BrokerError(f"unknown broker kind {prefer!r}: choose auto, mosquitto or amqtt")
    if prefer == "amqtt" or (prefer == "auto" and find_mosquitto() is None):
        if prefer == "auto":
            log.warning("no mosquitto binary found: falling back to the embedded amqtt broker (MQTT 3.1.1)")
        return start_embedded(port, host)
    return start_mosquitto(port, host)


def __getattr__(name: str) -> Any:
    # forgeline.broker.start_secure_mosquitto / SecureBroker (forgeline.broker.secure) without importing
    # the PKI code and its cryptography dependency whenever the plain launcher is used.
    if name in ("start_secure_mosquitto", "SecureBroker"):
        from forgeline.broker import secure

        return getattr(secure, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
