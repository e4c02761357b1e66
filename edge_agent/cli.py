"""``forgeline agent --config FILE``: run an edge agent until SIGINT/SIGTERM.

``--check`` validates the config and exits (0 if valid, 2 with the message naming the bad key).
``--stats-interval`` logs the agent's counters (spool depth, drops, reconnects) periodically.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("edge_agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="agent config file (YAML or JSON)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--stats-interval", type=float, default=60.0, metavar="S",
                        help="log counters every S seconds (0: never)")
    parser.add_argument("--stats-file", help="write the counters as JSON to this file at every interval and at exit")


def run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent
    from edge_agent.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"forgeline agent: invalid config: {exc}", file=sys.stderr)
        return 2
    devices = [info.key for source in config.sources for info in source.devices()]
    if args.check:
        print(f"config OK: {len(config.sources)} sources, {len(devices)} devices")
        return 0
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent = Agent.from_config(config)
    except (ValueError, OSError) as exc:
        print(f"forgeline agent: cannot start: {exc}", file=sys.stderr)
        return 2
    agent.start()
    log.warning("agent started: %d devices, broker %s:%d, spool %s", len(devices), config.mqtt.host,
                config.mqtt.port, config.spool.path)
    interval = args.stats_interval if args.stats_interval > 0 else None
    try:
        while not stop.wait(interval):
            _report(agent.stats(), args.stats_file)
    finally:
        agent.stop()
        _report(agent.publisher.stats(), args.stats_file, final=True)
    return 0


def _report(stats: dict[str, Any], path: str | None, final: bool = False) -> None:
    spool = stats["spool"]
    log.info("spool: %d rows (%d samples, %d bytes); dropped %d batches, %d samples, %d events%s",
             spool["queued_rows"], spool["queued_samples"], spool["queued_bytes"], spool["dropped_batches"],
             spool["dropped_samples"], spool["dropped_events"], " (final)" if final else "")
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(stats, file, indent=1, default=str)
