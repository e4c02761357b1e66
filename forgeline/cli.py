"""The ``forgeline`` command.

Each subcommand lives in its own module, imported only when it runs, so ``forgeline agent`` on a
gateway never imports numba. A subcommand module provides ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("forgeline.demo", "run the whole stack on this machine with a simulated fleet and a live view"),
    "agent": ("edge_agent.cli", "run an edge agent (sources -> batched MQTT telemetry, spool, commands)"),
    "twin": ("twin.cli", "run the twin service (ingest -> core -> twin topics, InfluxDB)"),
    "broker": ("forgeline.broker.cli", "run a broker (Mosquitto, or embedded amqtt), make certs and users"),
    "score": ("twin.score_cli", "score a CSV file offline with the twin's anomaly detectors"),
    "route": ("forgeline.routing.cli", "route an order to partner printers"),
    "quote": ("forgeline.quotes.cli", "instant quote for an order or an STL part"),
    "loop": ("forgeline.loop.cli", "iteration loop: revision comparison reports"),
    "dashboards": ("forgeline.dashboards.cli", "build, export and push the Grafana dashboards"),
    "contract": ("forgeline.contract.cli", "print or regenerate the AsyncAPI document and topic docs"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="forgeline",
        description="forgeline: edge/IoT manufacturing monitoring and digital twin.",
        epilog=f"commands:\n{lines}\n\nRun 'forgeline COMMAND --help' for a command's options.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split global options from the subcommand and its own arguments.
    idx = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    ns = top.parse_args(argv[: idx + 1])
    if ns.version:
        from forgeline import __version__

        print(f"forgeline {__version__}")
        return 0
    if ns.command is None:
        top.print_help()
        return 2
    if ns.command not in COMMANDS:
        top.error(f"unknown command {ns.command!r}; choose from {', '.join(COMMANDS)}")
    module_name, text = COMMANDS[ns.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"forgeline {ns.command}: not part of this installation ({module_name} is missing)", file=sys.stderr)
            return 2
        print(
            f"forgeline {ns.command}: cannot import {exc.name!r}. Install the extra it needs, for example "
            f"pip install 'forgeline[all]'",
            file=sys.stderr,
        )
        return 2
    sub = argparse.ArgumentParser(prog=f"forgeline {ns.command}", description=text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[idx + 1 :])
    setup_logging(ns.verbose)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
