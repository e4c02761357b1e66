"""``forgeline dashboards build|export|push``: generate, export for file provisioning, push to Grafana.

Credentials never go on the command line (where ``ps`` shows them): Grafana's come from
``GRAFANA_TOKEN`` (a service-account token) or ``GRAFANA_USER``/``GRAFANA_PASSWORD`` (or
``user:password@`` in the URL, or ``--grafana-token-file``); InfluxDB's from ``INFLUX_TOKEN`` (2.x) or
``INFLUX_USER``/``INFLUX_PASSWORD`` (1.x).

Examples::

    forgeline dashboards build                      # regenerate dashboards/*.json
    forgeline dashboards build --check              # exit 1 if the checked-in files are stale (CI)
    forgeline dashboards export /etc/grafana-forgeline
    GRAFANA_TOKEN=glsa_... INFLUX_TOKEN=... forgeline dashboards push \\
        --grafana-url http://grafana:3000 --influx-url http://influxdb:8086
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from forgeline.dashboards.provisioning import (
    FOLDER_TITLE,
    FOLDER_UID,
    GRAFANA_DASHBOARD_PATH,
    PROVISIONED_DATASOURCE,
    DatasourceSpec,
    dashboard_files,
    export,
    stale_files,
    write_dashboards,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="write the dashboard JSON files (default ./dashboards)")
    build.add_argument("--out", type=Path, default=Path("dashboards"), help="directory (default: %(default)s)")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")

    exporter = actions.add_parser("export", help="write a Grafana file-provisioning tree into DIR")
    exporter.add_argument("directory", type=Path)
    exporter.add_argument("--influx-url", default=PROVISIONED_DATASOURCE.url,
                          help="InfluxDB URL as Grafana reaches it (default: %(default)s, from Grafana's environment)")
    exporter.add_argument("--influx-database", default=PROVISIONED_DATASOURCE.database,
                          help="database (2.x: the bucket's DBRP mapping) (default: %(default)s)")
    exporter.add_argument("--dashboard-path", default=GRAFANA_DASHBOARD_PATH,
                          help="where DIR/dashboards is mounted in Grafana (default: %(default)s)")

    pusher = actions.add_parser("push", help="create or update data source, folder and dashboards in Grafana")
    pusher.add_argument("--grafana-url", default=os.environ.get("GRAFANA_URL", "http://localhost:3000"),
                        help="Grafana base URL (default: $GRAFANA_URL or %(default)s)")
    pusher.add_argument("--grafana-token-file", type=Path, help="read the service-account token from this file")
    pusher.add_argument("--influx-url", default=os.environ.get("INFLUX_URL"),
                        help="InfluxDB URL as Grafana reaches it (default: $INFLUX_URL); needed for the data source")
    pusher.add_argument("--influx-database", default=os.environ.get("INFLUX_DATABASE", "forgeline"))
    pusher.add_argument("--no-datasource", action="store_true", help="leave the data source alone")
    pusher.add_argument("--update-secrets", action="store_true",
                        help="rewrite the data source's stored token/password even if one is set")
    pusher.add_argument("--folder-uid", default=FOLDER_UID)
    pusher.add_argument("--folder-title", default=FOLDER_TITLE)
    pusher.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")


def _build(args: argparse.Namespace) -> int:
    if args.check:
        stale = stale_files(args.out)
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in dashboard_files())
        for name in stale:
            print(f"{args.out / name}: differs from the generated dashboard", file=sys.stderr)
        for name in extra:
            print(f"{args.out / name}: not a generated dashboard", file=sys.stderr)
        if stale or extra:
            print("run `forgeline dashboards build` and commit the result", file=sys.stderr)
            return 1
        print(f"{len(dashboard_files())} dashboards in {args.out} are up to date")
        return 0
    for path in write_dashboards(args.out):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        spec = DatasourceSpec(url=args.influx_url, database=args.influx_database, token=PROVISIONED_DATASOURCE.token)
    except ValueError as exc:
        print(f"forgeline dashboards export: {exc}", file=sys.stderr)
        return 2
    for path in export(args.directory, spec, args.dashboard_path):
        print(path)
    return 0


def _push(args: argparse.Namespace) -> int:
    from forgeline.dashboards.push import GrafanaTarget, PushError, push  # grafana-client only when pushing

    env = os.environ
    try:
        grafana_token = (args.grafana_token_file.read_text().strip() if args.grafana_token_file
                         else env.get("GRAFANA_TOKEN") or None)
        target = GrafanaTarget.from_url(args.grafana_url, token=grafana_token, user=env.get("GRAFANA_USER"),
                                        password=env.get("GRAFANA_PASSWORD"), timeout_s=args.timeout)
        datasource = None
        if not args.no_datasource:
            if not args.influx_url:
                print("forgeline dashboards push: give --influx-url (or INFLUX_URL), or --no-datasource",
                      file=sys.stderr)
                return 2
            datasource = DatasourceSpec(url=args.influx_url, database=args.influx_database,
                                        token=env.get("INFLUX_TOKEN") or None, user=env.get("INFLUX_USER") or None,
                                        password=env.get("INFLUX_PASSWORD") or None)
    except (ValueError, OSError) as exc:
        print(f"forgeline dashboards push: {exc}", file=sys.stderr)
        return 2
    dashboards = [json.loads(text) for text in dashboard_files().values()]
    try:
        report = push(target, dashboards, datasource, folder_uid=args.folder_uid, folder_title=args.folder_title,
                      update_secrets=args.update_secrets)
    except PushError as exc:
        print(f"forgeline dashboards push: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        return _build(args)
    if args.action == "export":
        return _export(args)
    return _push(args)
