"""The ``cio-worker`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from worker import __version__
from worker.errors import ConfigError, WorkerError
from worker.logs import configure_logging
from worker.settings import Settings, load_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

log = structlog.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="cio-worker",
        description="Deliver person and event records from Kafka to Customer.io.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML settings file (default: config/worker.toml if present)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="consume the person and event topics and deliver them",
        description=(
            "Consume the person and event topics as a consumer group and deliver "
            "them to the Track API. Exit codes: 0 stopped cleanly or caught up, "
            "1 failed, 2 bad configuration."
        ),
    )
    run.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once every partition reaches the end offsets seen at start",
    )

    config = commands.add_parser("config", help="inspect the settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser(
        "show", help="print the effective settings, secrets masked"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cio-worker``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"cio-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log.level, settings.log.format)

    if args.command == "config":
        print(json.dumps(settings.redacted(), indent=2))
        return EXIT_OK
    return _run(settings, until_caught_up=args.until_caught_up)


def _run(settings: Settings, *, until_caught_up: bool) -> int:
    from worker.loop import Worker  # imported late: keeps `config show` light

    try:
        worker = Worker(settings, until_caught_up=until_caught_up)
        worker.install_signal_handlers()
        counters = worker.run()
    except ConfigError as exc:
        log.error("configuration_error", error=str(exc))
        print(f"cio-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WorkerError as exc:
        log.error("worker_failed", error=str(exc), exc_info=True)
        return EXIT_FAILED
    print(json.dumps(counters.as_dict()), flush=True)
    return EXIT_OK
