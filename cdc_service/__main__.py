"""Command line: ``cdc-service [run]`` (or ``python -m cdc_service``) runs the service; ``config`` prints settings;
``dlq list``, ``show``, ``replay`` and ``purge`` inspect, re-publish and remove dead letters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cdc_service import __version__, dlq
from cdc_service.config import FILES_VARIABLE, ConfigError, Loaded, load

_DESCRIPTION = f"""\
Relay Sequin CDC events from NATS JetStream to enriched per-agent subjects, exactly once.

commands:
  run      consume, enrich, deduplicate and publish until SIGTERM/SIGINT (the default)
  config   print the effective settings as JSON, secrets masked, and exit
  dlq      dead letters: `dlq list` shows them (reason, subject, age, detail, body preview), `dlq show SEQ` one in
           full, `dlq replay` re-publishes them to their source subject and removes each once the source stream
           accepted it, `dlq purge` removes them (see `dlq -h`)

Settings, later winning key by key: built-in defaults; settings.toml and .secrets.toml in the working
directory; the files named by {FILES_VARIABLE} (comma-separated), then each --config FILE; CDC_* environment
variables (CDC_NATS__URL, CDC_REDIS__URL, CDC_HTTP__PORT, CDC_WORKERS__POOL_SIZE, ...; '__' nests). A bad
setting exits with status 2 and one line naming it.
"""


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "cdc-service" if name.startswith("cdc-service") else "python -m cdc_service"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(), description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cdc_service {__version__}")
    config_help = f"a settings file layered over settings.toml, .secrets.toml and {FILES_VARIABLE} (repeatable)"

    def config_option(into: argparse.ArgumentParser, dest: str) -> None:
        into.add_argument("--config", action="append", dest=dest, default=[], metavar="FILE", help=config_help)

    # The option also works after a command (`cdc-service config --config FILE`, `cdc-service dlq list --config
    # FILE`). A subcommand copies its whole namespace, defaults included, over its parent's: each level has its own
    # dest so that an empty list there never replaces the files named before it.
    config_option(parser, "config")
    commands = parser.add_subparsers(dest="command", metavar="{run,config,dlq}", help="what to do (default: run)")
    config_option(commands.add_parser("run", help="run the service (the default)"), "command_config")
    config_option(commands.add_parser("config", help="print the effective settings, secrets masked"), "command_config")
    dlq.add_parser(commands)
    dlq_parser = commands.choices["dlq"]
    config_option(dlq_parser, "command_config")
    dlq_actions = next(a for a in dlq_parser._actions if isinstance(a, argparse._SubParsersAction))
    for action_parser in dlq_actions.choices.values():
        config_option(action_parser, "action_config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        loaded = load([*args.config, *getattr(args, "command_config", []), *getattr(args, "action_config", [])])
    except ConfigError as exc:
        print(f"cdc_service: invalid setting {exc}", file=sys.stderr)
        return 2
    settings = loaded.settings
    if args.command in ("config", "dlq"):
        for line in _notices(loaded):
            print(f"cdc_service: {line}", file=sys.stderr)
    if args.command == "config":
        print(json.dumps(settings.masked(), indent=2))
        return 0
    if args.command == "dlq":
        return dlq.main(args, settings)

    from cdc_service import logs
    from cdc_service.service import Service

    logs.configure(settings.log.level, fmt=settings.log.format)
    log = logging.getLogger("cdc_service")
    for line in _notices(loaded):
        log.warning(line)
    log.info("settings loaded", extra={"version": __version__, "files": list(loaded.files)})
    return Service(settings).run()


def _notices(loaded: Loaded) -> list[str]:
    notice = loaded.no_file_notice(os.getcwd())
    return [*loaded.warnings, *([notice] if notice else [])]


if __name__ == "__main__":
    sys.exit(main())
