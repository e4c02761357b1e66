"""Commands to the agent: request on ``.../cmd/{site}/{area}/{device}/{command}``, response on ``.../cmdres/...``.

Every request carries a ``correlation_id`` which the response repeats. Supported commands:

``ping``
    ``{}`` → agent version, stream epoch, uptime, this device's counters and the spool's.
``set_config``
    ``{"rate_hz": 2, "channels": ["state", "nozzle_temp"], "batch_max_samples": 500, "batch_window_s": 0.5}``
    and source-specific keys (the line simulator and OPC UA / Modbus line stations take
    ``product_model``/``product_revision``).
    Everything is checked before anything changes; a new birth message announces the result and a
    ``config_applied`` event records it. Batch settings apply to the whole agent.
``dispatch_job``
    A job from order routing: ``{"job_id", "parts": [{part_id, bbox_mm, volume_cm3, mass_g?}],
    "material", "material_density_g_cm3"?, "build_height_mm"?}``; answered with the queue position.
    Idempotent per ``job_id``, across agent restarts: a repeated request is answered with the first
    result and ``"duplicate": true``, and starts nothing.

A malformed request (not JSON, no correlation id, wrong types) or an unknown command gets an error
response (``ok: false`` and the reason), never a crash. A response that cannot be sent because the
link just dropped is not queued: requesters retry on timeout.

Example request and response::

    fl/v1/factory-a/cmd/plant-a/hall1/fdm-01/ping      {"correlation_id": "c1", "ts": 1700000000}
    fl/v1/factory-a/cmdres/plant-a/hall1/fdm-01/ping   {"correlation_id": "c1", "ok": true, "ts": ..., "result": {...}}
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edge_agent.device import AGENT_VERSION
from edge_agent.sources.base import CommandError
from forgeline.contract import topics
from forgeline.contract.schemas import MAX_JSON_PAYLOAD
from forgeline.contract.topics import Kind, TopicError

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from edge_agent.publisher import DeviceLink, Publisher
    from edge_agent.sources.base import Source

log = logging.getLogger(__name__)

SUPPORTED = ("ping", "set_config", "dispatch_job")
AGENT_KEYS = ("channels", "batch_max_samples", "batch_window_s")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is not a finite number")
    return value


class CommandProcessor:
    """Answers the commands of the devices of one agent."""

    def __init__(self, publisher: Publisher, source_of: Callable[[str], Source | None]) -> None:
        self.publisher = publisher
        self.source_of = source_of
        self.started = time.time()
        self.handled = 0
        self.errors = 0

    def __call__(self, link: DeviceLink, message: paho.MQTTMessage) -> None:
        self.handle(link, message.topic, bytes(message.payload))

    def handle(self, link: DeviceLink, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Answer one request; return the response document (None for a message that is not ours)."""
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return None
        if parsed.kind != Kind.CMD.value or parsed.device != link.ref or parsed.command is None:
            return None
        command = parsed.command
        response_topic = link.ref.command_response_topic(command)
        correlation_id = ""
        try:
            request = self._parse(payload)
            correlation_id = request["correlation_id"]
            response_topic = self._reply_topic(link, request.get("reply_to"), response_topic)
            result = self._run(link, command, request.get("args") or {})
            response: dict[str, Any] = {"correlation_id": correlation_id, "ok": True, "ts": time.time(),
                                        "result": result}
        except CommandError as exc:
            self.errors += 1
            correlation_id = getattr(exc, "correlation_id", correlation_id)
            response = {"correlation_id": correlation_id, "ok": False, "ts": time.time(), "error": str(exc)}
        except Exception as exc:  # a bug in a source: answer, log, keep running
            self.errors += 1
            log.exception("%s: command %s failed", link.key, command)
            response = {"correlation_id": correlation_id, "ok": False, "ts": time.time(),
                        "error": f"internal error: {type(exc).__name__}: {exc}"}
        self.handled += 1
        if not link.respond(response_topic, response):
            log.info("%s: response to %s not sent (link down)", link.key, command)
        return response

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_JSON_PAYLOAD:
            raise CommandError(f"request of {len(payload)} bytes exceeds {MAX_JSON_PAYLOAD}")
        try:
            request = json.loads(payload, parse_constant=_no_constants, parse_float=_finite)
        except (ValueError, RecursionError) as exc:
            raise CommandError(f"request is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise CommandError("request must be a JSON object")
        correlation_id = request.get("correlation_id")
        if not isinstance(correlation_id, str) or not 1 <= len(correlation_id) <= 128:
            raise CommandError("correlation_id: required, a string of 1-128 characters")
        ts = request.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise _WithId(correlation_id, "ts: required, seconds since the Unix epoch")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise _WithId(correlation_id, "args: must be an object")
        unknown = set(request) - {"correlation_id", "ts", "args", "reply_to"}
        if unknown:
            raise _WithId(correlation_id, f"unknown request field {sorted(unknown)[0]!r}")
        return request

    @staticmethod
    def _reply_topic(link: DeviceLink, reply_to: Any, default: str) -> str:
        if reply_to is None:
            return default
        try:
            parsed = topics.parse(reply_to) if isinstance(reply_to, str) else None
        except TopicError:
            parsed = None
        # Answers stay in the device's own tenant: a request cannot make the agent publish elsewhere.
        if parsed is None or parsed.kind != Kind.CMDRES.value or parsed.tenant != link.ref.tenant:
            raise CommandError("reply_to must be a cmdres topic of this device's tenant")
        return str(reply_to)

    def _run(self, link: DeviceLink, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command == "ping":
            return self._ping(link)
        if command == "set_config":
            return self._set_config(link, args)
        if command == "dispatch_job":
            return self._dispatch_job(link, args)
        raise CommandError(f"unknown command {command!r}: supported are {', '.join(SUPPORTED)}")

    def _dispatch_job(self, link: DeviceLink, args: dict[str, Any]) -> dict[str, Any]:
        """Dispatch once per ``job_id``: a repeated request (a requester's retry after a timeout, or a
        QoS 1 redelivery after the agent restarted) gets the first answer with ``duplicate: true``
        and starts nothing, so a part is never printed twice. The record lives in the spool."""
        source = self._source(link)
        job_id = args.get("job_id")
        if not isinstance(job_id, str) or not job_id:  # the source names what is missing
            return source.dispatch_job(link.key, args)
        spool = self.publisher.spool
        earlier = spool.dispatched(link.key, job_id)
        if earlier is not None:
            log.info("%s: job %s was dispatched already; not starting it again", link.key, job_id)
            return {**earlier, "duplicate": True}
        result = source.dispatch_job(link.key, args)
        spool.record_dispatch(link.key, job_id, result)
        return result

    def _source(self, link: DeviceLink) -> Source:
        source = self.source_of(link.key)
        if source is None:
            raise CommandError(f"no source serves {link.key}")
        return source

    def _ping(self, link: DeviceLink) -> dict[str, Any]:
        stats = self.publisher.stats()
        source = self.source_of(link.key)
        return {
            "pong": True,
            "agent_version": AGENT_VERSION,
            "epoch": self.publisher.spool.epoch,
            "uptime_s": round(time.time() - self.started, 3),
            "device": stats["devices"].get(link.key, {}),
            "spool": stats["spool"],
            "source": source.status() if source is not None else {},
        }

    def _set_config(self, link: DeviceLink, args: Mapping[str, Any]) -> dict[str, Any]:
        if not args:
            raise CommandError("set_config needs at least one setting in args")
        stream = link.stream
        info = stream.info
        enabled: list[bool] | None = None
        if "channels" in args:
            names = args["channels"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise CommandError("channels must be a non-empty list of channel names")
            unknown = [n for n in names if n not in info.channels]
            if unknown:
                raise CommandError(f"unknown channel {unknown[0]!r}: this device has {', '.join(info.channels)}")
            enabled = [name in names for name in info.channels]
        batch = self.publisher.batch
        max_samples = args.get("batch_max_samples", batch.max_samples)
        window_s = args.get("batch_window_s", batch.window_s)
        from edge_agent.publisher import BatchSettings

        try:
            if isinstance(max_samples, bool) or not isinstance(max_samples, int):
                raise ValueError(f"batch_max_samples must be an integer, not {max_samples!r}")
            if isinstance(window_s, bool) or not isinstance(window_s, int | float):
                raise ValueError(f"batch_window_s must be a number, not {window_s!r}")
            new_batch = BatchSettings(max_samples, float(window_s))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        source_settings = {k: v for k, v in args.items() if k not in AGENT_KEYS}
        applied: dict[str, Any] = {}
        if source_settings:
            applied.update(self._source(link).set_config(link.key, source_settings))
        if "rate_hz" in applied:
            stream.rate_hz = float(applied["rate_hz"])
        if enabled is not None:
            stream.enabled = enabled
            applied["channels"] = [n for n, on in zip(info.channels, enabled, strict=True) if on]
        if "batch_max_samples" in args or "batch_window_s" in args:
            self.publisher.batch = new_batch
            applied["batch_max_samples"] = new_batch.max_samples
            applied["batch_window_s"] = new_batch.window_s
        link.request_birth()
        stream.event({"type": "config_applied", "ts": time.time(), "settings": applied})
        return {"applied": applied}


class _WithId(CommandError):
    """An error in a request whose correlation id is known (so the error response carries it)."""

    def __init__(self, correlation_id: str, message: str) -> None:
        super().__init__(message)
        self.correlation_id = correlation_id
