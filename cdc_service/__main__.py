"""Command line: ``python -m cdc_service [run]`` runs the service; ``config`` prints settings; ``dlq list`` and
``dlq replay`` inspect and re-publish dead letters."""

from __future__ import annotations

import argparse
import json
import sys

from cdc_service import dlq
from cdc_service.config import ConfigError, load_settings

_DESCRIPTION = """\
Relay Sequin CDC events from NATS JetStream to enriched per-agent subjects, exactly once.

commands:
  run      consume, enrich, deduplicate and publish until SIGTERM/SIGINT (the default)
  config   print the effective settings as JSON, secrets masked, and exit
  dlq      dead letters: `dlq list` shows them (reason, subject, age, body preview), `dlq replay` re-publishes
           them to their source subject and removes each once the source stream accepted it (see `dlq replay -h`)

Settings come from settings.toml, .secrets.toml and CDC_* environment variables (CDC_NATS__URL,
CDC_REDIS__URL, CDC_HTTP__PORT, CDC_WORKERS__POOL_SIZE, ...; '__' nests). A bad setting exits with
status 2 and one line naming it.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cdc_service", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,config,dlq}", help="what to do (default: run)")
    commands.add_parser("run", help="run the service (the default)")
    commands.add_parser("config", help="print the effective settings, secrets masked")
    dlq.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"cdc_service: invalid setting {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(json.dumps(settings.masked(), indent=2))
        return 0
    if args.command == "dlq":
        return dlq.main(args, settings)

    from cdc_service import logs
    from cdc_service.service import Service

    logs.configure(settings.log.level)
    try:
        service = Service(settings)
    except OSError as exc:  # e.g. the HTTP port is taken
        print(f"cdc_service: cannot start: {exc}", file=sys.stderr)
        return 1
    return service.run()


if __name__ == "__main__":
    sys.exit(main())
