"""``forgeline contract``: print or regenerate the AsyncAPI document and the topic docs."""

from __future__ import annotations

import argparse
from pathlib import Path

from forgeline.contract import docs

DEFAULT_DIR = Path("docs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["asyncapi", "docs", "write"],
                        help="asyncapi: print docs/asyncapi.yaml; docs: print docs/topics.md; "
                             "write: regenerate both files in --dir")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="docs folder (default: docs)")


def run(args: argparse.Namespace) -> int:
    if args.what == "asyncapi":
        print(docs.asyncapi_yaml(), end="")
    elif args.what == "docs":
        print(docs.topics_markdown(), end="")
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        (args.dir / "asyncapi.yaml").write_text(docs.asyncapi_yaml())
        (args.dir / "topics.md").write_text(docs.topics_markdown())
        print(f"wrote {args.dir / 'asyncapi.yaml'} and {args.dir / 'topics.md'}")
    return 0
