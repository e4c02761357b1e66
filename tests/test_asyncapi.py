"""docs/asyncapi.yaml and docs/topics.md are exactly what the contract generates, the AsyncAPI
document is valid AsyncAPI 3.0, and every topic builder in the code appears in it."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from forgeline.contract import docs, schemas, topics
from forgeline.contract.topics import TOPICS, DeviceRef, Kind

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / ".venv/npm/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"


def test_checked_in_documents_are_generated() -> None:
    assert (ROOT / "docs/asyncapi.yaml").read_text() == docs.asyncapi_yaml(), (
        "docs/asyncapi.yaml is stale: run `forgeline contract write`"
    )
    assert (ROOT / "docs/topics.md").read_text() == docs.topics_markdown(), (
        "docs/topics.md is stale: run `forgeline contract write`"
    )


def _spec_validator():  # type: ignore[no-untyped-def]
    import jsonschema

    if not SPEC.exists():
        if shutil.which("npm") is None:
            pytest.skip("no npm here to install @asyncapi/specs (make specs)")
        pytest.fail(f"{SPEC} missing: run `make specs`")
    return jsonschema.Draft7Validator(json.loads(SPEC.read_text()))


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    validator = _spec_validator()
    document = yaml.safe_load((ROOT / "docs/asyncapi.yaml").read_text())
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(document)]
    assert errors == []
    # The validator does catch mistakes (an AsyncAPI 2-style action is not valid in 3.0).
    broken = copy.deepcopy(document)
    broken["operations"]["publishStatus"]["action"] = "publish"
    assert list(validator.iter_errors(broken))


def test_every_reference_resolves() -> None:
    document = docs.asyncapi_document()
    text = json.dumps(document)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node = document
        for part in ref.split("/"):
            assert part in node, f"dangling $ref #/{ref}"
            node = node[part]


def test_every_schema_has_a_channel_and_every_channel_a_schema() -> None:
    used = {spec.message for spec in TOPICS}
    assert used == set(schemas.SCHEMAS)


def _fill(address: str) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: f"x-{m.group(1)}".replace("_", "-"), address)


@pytest.mark.parametrize("spec", TOPICS, ids=lambda s: s.name)
def test_catalog_addresses_parse_to_their_kind(spec: topics.TopicSpec) -> None:
    parsed = topics.parse(_fill(spec.address))
    expected = {"command": "cmd", "command_response": "cmdres", "twin": "twin"}.get(spec.name, spec.name)
    assert parsed.kind == expected


def test_code_builders_produce_catalog_addresses() -> None:
    """Every ``*_topic`` builder in topics.py (found by introspection, so new ones are covered too)
    builds an address of the catalog, and every catalog address is built by some builder."""
    import inspect

    ref = DeviceRef("x-tenant", "x-site", "x-area", "x-device")
    built = {ref.status_topic, ref.telemetry_topic, ref.event_topic, ref.twin_topic, ref.anomaly_topic,
             ref.command_topic("x-command"), ref.command_response_topic("x-command")}
    for name, func in inspect.getmembers(topics, inspect.isfunction):
        if name.endswith("_topic") and func.__module__ == topics.__name__:
            args = [f"x-{p}".replace("_", "-") for p in inspect.signature(func).parameters]
            built.add(func(*args))
    catalog = {_fill(spec.address) for spec in TOPICS}
    assert built == catalog, {"not in the catalog": built - catalog, "never built": catalog - built}
    assert {k.value for k in Kind} <= {topics.parse(t).kind for t in catalog}
