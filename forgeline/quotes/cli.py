"""``forgeline quote``: an instant quote for an order file or an STL part.

Examples::

    forgeline quote docs/examples/quote.json --fleet docs/examples/fleet.json
    forgeline quote bracket.stl --material PA12 --quantity 20 --fleet docs/examples/fleet.json
    forgeline quote bracket.stl --quantity 20 --broker mqtt://127.0.0.1:1883   # live fleet load from the twin
    forgeline quote --serve --broker mqtt://127.0.0.1:1883                     # quotes and order tracking

The quote response (options per technology and material with price, lead time and a cost
breakdown) is printed as JSON, or one line per option with ``--summary``.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from forgeline.mqtt import MqttError, MqttSettings
from forgeline.quotes.pricing import QuoteError, quote_document
from forgeline.routing.model import Fleet, FleetError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="an order/quote JSON file ({'parts': [...]}) or an STL file")
    parser.add_argument("--material", help="STL: material (default: every material that can make it)")
    parser.add_argument("--technology", help="STL: technology (default: every technology that can make it)")
    parser.add_argument("--quantity", type=int, default=1, help="STL: number of parts")
    parser.add_argument("--unit", default="mm", choices=["mm", "cm", "inch"], help="STL: what one file unit is")
    parser.add_argument("--fleet", help="fleet JSON file; without it the fleet is read from --broker")
    parser.add_argument("--broker", help="broker URL (live capabilities and load from the twin)")
    parser.add_argument("--username", help="broker username (a platform account such as _quotes)")
    parser.add_argument("--password", help="broker password")
    parser.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained fleet messages")
    parser.add_argument("--now", type=float, help="quote time, seconds since the epoch (default: now)")
    parser.add_argument("--summary", action="store_true", help="one line per option")
    parser.add_argument("--serve", action="store_true", help="run the customer service (quotes and tracking)")
    parser.add_argument("--state", help="service: file that keeps accepted orders and their tracking across restarts")


def _settings(args: argparse.Namespace) -> MqttSettings:
    overrides: dict[str, Any] = {}
    if args.username:
        overrides = {"username": args.username, "password": args.password}
    return MqttSettings.from_url(args.broker, **overrides) if args.broker else MqttSettings.from_env(**overrides)


def _parts(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = Path(args.source)
    if not path.is_file():
        raise QuoteError(f"{path}: no such file")
    if path.suffix.lower() == ".stl":
        part: dict[str, Any] = {"part_id": path.stem or "part", "quantity": args.quantity,
                                "stl_base64": base64.b64encode(path.read_bytes()).decode(), "stl_unit": args.unit}
        if args.material:
            part["material"] = args.material
        if args.technology:
            part["technology"] = args.technology
        return [part]
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise QuoteError(f"{path}: not JSON ({exc})") from None
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if not isinstance(parts, list):
        raise QuoteError(f"{path}: expected an object with a 'parts' list")
    return parts


def run(args: argparse.Namespace) -> int:
    try:
        fleet = Fleet.load(args.fleet) if args.fleet else None
    except FleetError as exc:
        print(f"forgeline quote: {exc}", file=sys.stderr)
        return 2
    if args.serve:
        return _serve(args, fleet)
    if not args.source:
        print("forgeline quote: give an ORDER.json or a PART.stl (or --serve)", file=sys.stderr)
        return 2
    try:
        parts = _parts(args)
        if fleet is None:
            from forgeline.routing.cli import fleet_from_broker

            fleet, _ = fleet_from_broker(_settings(args), args.wait)
        document = quote_document(parts, fleet, args.now if args.now is not None else time.time())
    except (QuoteError, MqttError, ValueError) as exc:
        print(f"forgeline quote: {exc}", file=sys.stderr)
        return 2
    if args.summary:
        for part in document["parts"]:
            print(f"{part['part_id']} x{part['quantity']}: {part.get('error') or ''}")
            for option in part["options"]:
                print(f"  {option['technology']:<6} {option['material']:<16} {option['unit_price']:>10.2f} "
                      f"{document['currency']}/unit {option['total_price']:>11.2f} total  "
                      f"{option['lead_time_h']:>7.1f} h  busy {option['busy_share']:.2f}")
    else:
        print(json.dumps(document, indent=2))
    return 1 if any(part.get("error") for part in document["parts"]) else 0


def _serve(args: argparse.Namespace, fleet: Fleet | None) -> int:
    from forgeline.quotes.service import CustomerService

    service = CustomerService(_settings(args), fleet, state_path=args.state)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    try:
        service.start()
    except (MqttError, TimeoutError) as exc:
        print(f"forgeline quote: {exc}", file=sys.stderr)
        return 2
    print("customer service: quotes and order tracking on fl/v1/_customers/+/...", file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0
