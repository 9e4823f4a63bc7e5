"""The ``cio-worker`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from worker import __version__, commands
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
    _add_replay(commands)
    _add_offsets(commands)
    _add_dlq(commands)
    _add_archive_and_check(commands)
    return parser


def _add_archive_and_check(commands: Any) -> None:
    archive = commands.add_parser(
        "archive",
        help="copy the dead-letter topic to S3 as gzip JSON Lines",
        description=(
            "Consume the dead-letter topic in the archiver's own group and store it "
            "in the [archive] bucket (see docs/rejects.md). Exit codes: 0 stopped "
            "cleanly or caught up, 1 failed, 2 bad configuration."
        ),
    )
    archive.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once everything up to the end offsets seen at start is stored",
    )
    commands.add_parser(
        "check",
        help="check the broker, the Track API credentials, the schemas and S3",
        description=(
            "One line per check; every failure says what to fix. Exit codes: 0 all "
            "passed, 1 a check failed, 2 bad configuration."
        ),
    )


def _add_position_options(parser: argparse.ArgumentParser, verb: str) -> None:
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--from-beginning", action="store_true", help=f"{verb} from the log start"
    )
    start.add_argument(
        "--from-offset", type=int, metavar="N", help=f"{verb} from offset N"
    )
    start.add_argument(
        "--from-time",
        metavar="TIME",
        help=f"{verb} from the first record at or after TIME",
    )
    end = parser.add_mutually_exclusive_group()
    end.add_argument(
        "--to-offset",
        type=int,
        metavar="N",
        help="stop before offset N (default: the end now)",
    )
    end.add_argument(
        "--to-time", metavar="TIME", help="stop before the first record at TIME"
    )


def _add_replay(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="deliver a range of a topic again, beside the live group",
        description=(
            "Deliver a range of the person or event topic again. Runs beside the live "
            "group without moving its offsets; records already delivered are skipped "
            "by the state unless --ignore-state. TIME is ISO-8601 (UTC if no zone) or "
            "Unix seconds or milliseconds. Exit codes: 0 done, 1 failed, 2 bad "
            "arguments."
        ),
    )
    replay.add_argument("--topic", required=True, help="the person or event topic")
    replay.add_argument(
        "--partitions", help="comma-separated partition numbers (default: all)"
    )
    _add_position_options(replay, "replay")
    replay.add_argument(
        "--ignore-state",
        action="store_true",
        help="send even what was already delivered",
    )


def _add_offsets(commands: Any) -> None:
    offsets = commands.add_parser("offsets", help="move the live group's offsets")
    offsets_commands = offsets.add_subparsers(dest="offsets_command", required=True)
    reset = offsets_commands.add_parser(
        "reset",
        help="set the group's committed offsets to an offset or a time",
        description=(
            "Set the consumer group's committed offsets. The group must have no "
            "running members. --dry-run prints the plan and changes nothing."
        ),
    )
    reset.add_argument("--topic", help="one input topic (default: both)")
    reset.add_argument("--partitions", help="comma-separated partition numbers")
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-beginning", action="store_true")
    target.add_argument("--to-end", action="store_true")
    target.add_argument("--to-offset", type=int, metavar="N")
    target.add_argument("--to-time", metavar="TIME")
    reset.add_argument("--dry-run", action="store_true", help="print the plan only")


def _add_dlq(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="work with the dead-letter topic")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    redrive = dlq_commands.add_parser(
        "redrive",
        help="process dead-lettered records again with today's schemas and settings",
        description=(
            "Read the dead-letter topic and process the matching records again as "
            "the records they were. Records that fail again return to the dead-letter "
            "topic with their attempt count raised. Exit codes: 0 done, 1 failed, "
            "2 bad arguments."
        ),
    )
    redrive.add_argument(
        "--reason", action="append", default=[], help="only this reason (repeatable)"
    )
    redrive.add_argument(
        "--stage", action="append", default=[], choices=["decode", "validate", "api"]
    )
    redrive.add_argument(
        "--source-topic",
        action="append",
        default=[],
        help="only records from this topic",
    )
    redrive.add_argument(
        "--since", metavar="TIME", help="dead-lettered at or after TIME"
    )
    redrive.add_argument(
        "--until", metavar="TIME", help="dead-lettered at or before TIME"
    )


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
    try:
        if args.command == "replay":
            return commands.replay(settings, args)
        if args.command == "offsets":
            return commands.reset_offsets(settings, args)
        if args.command == "dlq":
            return commands.redrive(settings, args)
    except ConfigError as exc:
        print(f"cio-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "archive":
        return _archive(settings, until_caught_up=args.until_caught_up)
    if args.command == "check":
        return _check(settings)
    return _run(settings, until_caught_up=args.until_caught_up)


def _run(settings: Settings, *, until_caught_up: bool) -> int:
    from worker.archive import background_archiver
    from worker.health import serving
    from worker.loop import Worker  # imported late: keeps `config show` light
    from worker.metrics import Metrics

    def run() -> Any:
        metrics = Metrics()
        with serving(settings.metrics, metrics):
            worker = Worker(settings, until_caught_up=until_caught_up, metrics=metrics)
            worker.install_signal_handlers()
            with background_archiver(settings):  # a no-op unless [archive] enabled
                return worker.run()

    return _report(run, "worker_failed")


def _archive(settings: Settings, *, until_caught_up: bool) -> int:
    from worker.archive import Archiver  # imported late: boto3 loads slowly

    def run() -> Any:
        archiver = Archiver(settings, until_caught_up=until_caught_up)
        archiver.install_signal_handlers()
        return archiver.run()

    return _report(run, "archiver_failed")


def _report(run: Callable[[], Any], failure_event: str) -> int:
    """Run a long-running command; print its counters, or say why it stopped."""
    try:
        counters = run()
    except ConfigError as exc:
        log.error("configuration_error", error=str(exc))
        print(f"cio-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WorkerError as exc:
        log.error(failure_event, error=str(exc), exc_info=True)
        return EXIT_FAILED
    print(json.dumps(counters.as_dict()), flush=True)
    return EXIT_OK


def _check(settings: Settings) -> int:
    from worker.check import format_results, run_checks

    results = run_checks(settings)
    print(format_results(results), flush=True)
    return EXIT_OK if all(result.passed for result in results) else EXIT_FAILED
