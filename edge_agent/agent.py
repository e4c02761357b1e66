"""The agent: sources in threads, the publisher, the spool and the command processor, started and stopped together.

Example (a simulated fleet in this process, as the demo runs it)::

    import threading
    from edge_agent import run_simulated_fleet, demo_fleet
    from forgeline.mqtt import MqttSettings

    stop = threading.Event()
    thread = threading.Thread(target=run_simulated_fleet,
                              args=(MqttSettings(port=1883), demo_fleet(), stop), kwargs={"speed": 600})
    thread.start(); ...; stop.set(); thread.join()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.commands import CommandProcessor
from edge_agent.config import AgentConfig, SpoolSettings
from edge_agent.publisher import BatchSettings, LinkSettings, Publisher
from edge_agent.sources.base import Source
from edge_agent.sources.simulator import FleetSpec, SimulatorSource
from edge_agent.spool import Spool
from forgeline.mqtt import MqttSettings

log = logging.getLogger(__name__)


class Agent:
    """One edge agent process worth of work. ``start()`` returns at once; ``stop()`` drains and disconnects."""

    def __init__(
        self,
        settings: MqttSettings,
        sources: Sequence[Source],
        *,
        spool: SpoolSettings | None = None,
        batch: BatchSettings | None = None,
        link: LinkSettings | None = None,
        drain_timeout_s: float = 5.0,
    ) -> None:
        spool_settings = spool or SpoolSettings()
        self.sources = list(sources)
        self.spool = Spool(
            spool_settings.path,
            max_bytes=spool_settings.max_bytes,
            overflow=spool_settings.overflow,
            synchronous=spool_settings.synchronous,
        )
        self._owner: dict[str, Source] = {}
        for source in self.sources:
            for info in source.devices():
                if info.key in self._owner:
                    raise ValueError(f"device {info.key} is served by two sources")
                self._owner[info.key] = source
        self.publisher = Publisher(settings, self.spool, batch=batch, link=link)
        self.commands = CommandProcessor(self.publisher, self._owner.get)
        self.publisher.on_command = self.commands
        self.drain_timeout_s = drain_timeout_s
        self._source_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False
        self.source_restarts = 0

    @classmethod
    def from_config(cls, config: AgentConfig) -> Agent:
        return cls(config.mqtt, config.sources, spool=config.spool, batch=config.batch, link=config.link,
                   drain_timeout_s=config.drain_timeout_s)

    def start(self) -> Agent:
        if self._started:
            return self
        self._started = True
        for source in self.sources:
            for info in source.devices():
                self.publisher.stream(info)  # links exist (and connect) before the first sample
        self.publisher.start()
        for source in self.sources:
            thread = threading.Thread(target=self._run_source, args=(source,), name=f"source-{source.kind}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run_source(self, source: Source) -> None:
        backoff = 0.5
        while not self._source_stop.is_set():
            try:
                source.run(self.publisher, self._source_stop)
                return
            except Exception:
                # A source must not take the agent down: log, wait, start it again.
                self.source_restarts += 1
                log.exception("source %s failed; restarting in %.1f s", source.kind, backoff)
                self._source_stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop sources, spool open batches, deliver what the broker takes in ``drain_timeout_s``, disconnect."""
        if self._stopped:
            return
        self._stopped = True
        self._source_stop.set()
        for thread in self._threads:
            thread.join(10.0)
        if self._started:
            self.publisher.stop(self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        self.spool.close()

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def stats(self) -> dict[str, Any]:
        stats = self.publisher.stats()
        stats["sources"] = {f"{i}:{s.kind}": s.status() for i, s in enumerate(self.sources)}
        stats["commands"] = {"handled": self.commands.handled, "errors": self.commands.errors}
        stats["source_restarts"] = self.source_restarts
        return stats

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_simulated_fleet(
    settings: MqttSettings,
    fleet: FleetSpec,
    *,
    speed: float = 60.0,
    seed: int = 0,
    rate_hz: float = 1.0,
    spool_path: str | Path = ":memory:",
    batch: BatchSettings | None = None,
    auto_jobs: bool = True,
) -> Agent:
    """Start an agent running ``fleet`` in this process (threads) and return it; call ``stop()`` when done."""
    source = SimulatorSource(fleet, seed=seed, speed=speed, rate_hz=rate_hz, auto_jobs=auto_jobs)
    agent = Agent(settings, [source], spool=SpoolSettings(path=str(spool_path)),
                  batch=batch or BatchSettings(max_samples=1000, window_s=0.5), drain_timeout_s=2.0)
    return agent.start()


def run_simulated_fleet(
    settings: MqttSettings,
    fleet: FleetSpec,
    stop_event: threading.Event,
    *,
    speed: float = 60.0,
    seed: int = 0,
    rate_hz: float = 1.0,
    spool_path: str | Path = ":memory:",
    batch: BatchSettings | None = None,
    auto_jobs: bool = True,
) -> dict[str, Any]:
    """Run ``fleet`` until ``stop_event`` is set (blocking; run it in a thread); return the agent's stats."""
    agent = start_simulated_fleet(settings, fleet, speed=speed, seed=seed, rate_hz=rate_hz, spool_path=spool_path,
                                  batch=batch, auto_jobs=auto_jobs)
    try:
        stop_event.wait()
        return agent.stats()
    finally:
        agent.stop()


def wait_connected(agent: Agent, timeout: float = 10.0) -> bool:
    """Wait until every device link is connected (for tests and the demo)."""
    deadline = time.monotonic() + timeout
    for link in list(agent.publisher.links.values()):
        if not link.connected.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True
