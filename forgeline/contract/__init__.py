"""The one contract: topic names, payload schemas and the batched telemetry encoding.

Imported by the agent, the twin, the tests and the docs generator. Needs only the standard
library (``jsonschema`` is imported lazily by :func:`forgeline.contract.schemas.validate`).
"""

from forgeline.contract.topics import DeviceRef, Kind, TopicError, parse

__all__ = ["DeviceRef", "Kind", "TopicError", "parse"]
