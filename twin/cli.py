"""``forgeline twin``: run the twin service until interrupted (SIGINT/SIGTERM stop it cleanly)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from typing import Any

from twin.config import ConfigError, TwinConfig


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: structured logs for the log pipeline."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (YAML or JSON), see docs/twin.md")
    parser.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883 (overrides the file)")
    parser.add_argument("--worker-id", help="worker id (MQTT client id; keep it stable across restarts)")
    parser.add_argument("--share-group", help="run as one of several workers in this shared-subscription group")
    parser.add_argument("--snapshot-dir", help="directory for state snapshots (restore at start)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics and /healthz on this port")
    parser.add_argument("--publish-interval", type=float, help="seconds between twin state updates per device")
    parser.add_argument("--json-logs", action="store_true", help="structured JSON logs on stderr")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")


def load_config(args: argparse.Namespace) -> TwinConfig:
    config = TwinConfig.load(args.config) if args.config else TwinConfig()
    overrides: dict[str, Any] = {}
    if args.broker:
        overrides["broker"] = args.broker
    if args.worker_id:
        overrides["worker_id"] = args.worker_id
    if args.share_group:
        overrides["share_group"] = args.share_group
    if args.snapshot_dir:
        overrides["snapshot_dir"] = args.snapshot_dir
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.publish_interval is not None:
        overrides["publish_interval_s"] = args.publish_interval
    return config.with_overrides(**overrides) if overrides else config


def run(args: argparse.Namespace) -> int:
    if args.json_logs:
        handler = logging.StreamHandler()
        handler.setFormatter(_JsonFormatter())
        root = logging.getLogger()
        root.handlers = [handler]
        root.setLevel(logging.INFO)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"forgeline twin: {exc}")
        return 2
    if args.check:
        print(f"configuration ok: worker {config.worker_id}, broker {config.broker}")
        return 0
    from forgeline.mqtt import MqttError
    from twin.service import TwinService

    service = TwinService(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        service.start()
    except MqttError as exc:
        print(f"forgeline twin: {exc}")
        return 1
    logging.getLogger("twin").info("twin %s running (broker %s)", config.worker_id, config.broker)
    print(f"twin {config.worker_id} running", flush=True)
    try:
        while not stop.is_set():
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    service.stop()
    return 0
