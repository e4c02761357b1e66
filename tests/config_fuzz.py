"""Shared strategies for fuzzing config loaders (tests/test_security_config_{agent,twin}.py): random
documents over a loader's known keys, one-node mutations of a valid example, hostile files (deep
nesting, a YAML alias bomb) and passwords of the wrong type."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = "s3cr3t-Marker-7f1c"
BAD_PASSWORDS = [12345678901234567, [SECRET], {"value": SECRET}, 1.5, True]

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=16)
           | st.sampled_from(["mqtt://127.0.0.1:1883", "simulator", "FDM", "acme", "5", "3.1.1", ":memory:"]))

DEEP = {"yaml-flow": "[" * 2000 + "]" * 2000, "json": "[" * 20_000 + "]" * 20_000,
        "yaml-block": "".join("  " * i + "- \n" for i in range(2000))}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
) + "sources: *i\nmqtt: *i\n"


def documents(keys: list[str]) -> st.SearchStrategy[Any]:
    """Nested documents whose keys are mostly ones the loader knows, so they get past the first
    "unknown key" check."""
    key = st.sampled_from(keys) | st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=6),
                        max_leaves=25)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def mutate(doc: Any, data: st.DataObject, keys: list[str]) -> Any:
    """Replace, delete or add one node of a valid document."""
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(_paths(doc)))
    if not path:
        return data.draw(documents(keys))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    how = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if how == "replace":
        parent[path[-1]] = data.draw(documents(keys))
    elif how == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(scalars)
    else:
        parent.append(data.draw(documents(keys)))
    return doc
