"""The demo: the main job end to end on this machine.

Starts the local Kafka broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` names one) and
the Track API simulator, writes a sample of person and event records (a few of
them ones Customer.io refuses) to fresh topics, runs ``cio-worker run
--until-caught-up`` against them, and prints as its last line one JSON object:
what the worker consumed, delivered and rejected, what the sample was built to
have rejected, what the simulator now holds, and how long delivery took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.sandbox.broker import LocalBroker, default_home
from worker.sandbox.sample import build_sample, create_topics, produce
from worker.sandbox.simulator import TrackSimulator

DEMO_SITE_ID = "demo-site"
# A throwaway key for the local simulator only; it opens nothing real.
DEMO_API_KEY = "demo-track-api-key"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 when every record was delivered or rejected."""
    parser = argparse.ArgumentParser(prog="python -m worker.sandbox.demo")
    parser.add_argument("--people", type=int, default=3000)
    parser.add_argument("--events", type=int, default=7000)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args(argv)

    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if external else LocalBroker(default_home())
    if broker is not None:
        print("starting the local Kafka broker", file=sys.stderr)
        broker.start()
    bootstrap = external or (broker.bootstrap_servers if broker else "")
    try:
        with TrackSimulator(DEMO_SITE_ID, DEMO_API_KEY) as simulator:
            summary = _run_demo(bootstrap, simulator, args)
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(summary), flush=True)
    handled = summary["delivered"] + summary["rejected"] + summary["skipped"]
    balanced = handled == summary["consumed"]
    expected = summary["rejected"] == summary["expected_rejected"]
    return 0 if balanced and expected and summary["exit_code"] == 0 else 1


def _run_demo(
    bootstrap: str, simulator: TrackSimulator, args: argparse.Namespace
) -> dict[str, Any]:
    run_id = str(int(time.time() * 1000))
    topics = {
        "person": f"demo-{run_id}.persons",
        "event": f"demo-{run_id}.person-events",
        "dead_letter": f"demo-{run_id}.dead-letters",
    }
    create_topics(
        bootstrap,
        {
            topics["person"]: args.partitions,
            topics["event"]: args.partitions,
            topics["dead_letter"]: 1,
        },
    )
    sample = build_sample(args.people, args.events, Path("schemas"))
    print(
        f"wrote {len(sample.records)} records ({sample.expected_rejects} built to be "
        "refused); delivering",
        file=sys.stderr,
    )
    produce(bootstrap, sample, topics["person"], topics["event"])

    env = dict(
        os.environ,
        CIO_SITE_ID=DEMO_SITE_ID,
        CIO_API_KEY=DEMO_API_KEY,
        CIO_TRACK__BASE_URL=simulator.url,
        CIO_KAFKA__BOOTSTRAP_SERVERS=bootstrap,
        CIO_KAFKA__GROUP_ID=f"demo-{run_id}",
        CIO_KAFKA__PERSON_TOPIC=topics["person"],
        CIO_KAFKA__EVENT_TOPIC=topics["event"],
        CIO_KAFKA__DEAD_LETTER_TOPIC=topics["dead_letter"],
        CIO_LOG__FORMAT="json",
        CIO_METRICS__HOST="127.0.0.1",
        CIO_METRICS__PORT="0",
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--until-caught-up"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    counters = _last_json_line(result.stdout)
    stats = simulator.snapshot()["stats"]
    return {
        "consumed": counters.get("consumed", 0),
        "delivered": counters.get("delivered", 0),
        "rejected": counters.get("rejected", 0),
        "skipped": counters.get("skipped", 0),
        "expected_rejected": sample.expected_rejects,
        "produced": len(sample.records),
        "rejected_by_reason": counters.get("rejected_by_reason", {}),
        "requests": counters.get("requests", 0),
        "simulator_people": len(simulator.people()),
        "simulator_events": len(simulator.events()),
        "simulator_entries_accepted": stats.get("entries_accepted", 0),
        "exit_code": result.returncode,
        "seconds": round(seconds, 2),
    }


def _last_json_line(output: str) -> dict[str, Any]:
    for line in reversed(output.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


if __name__ == "__main__":
    sys.exit(main())
