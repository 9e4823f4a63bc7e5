"""Throughput of 1, 2 and 3 workers in one group, with and without a rate limit.

Writes N records to 6-partition topics on a broker of its own, then for each
worker count starts that many ``cio-worker run`` processes in one group against
a simulator in its own process (optionally enforcing a requests-per-second
limit), waits until every record is accepted, and prints one JSON line per run:
workers, records, seconds, records per second, requests per second seen by the
simulator and 429s answered. Rates are given over the whole run (from the
workers' start, joining the group included) and over the delivery (from the
first record accepted), with the most requests the simulator saw in any one
second. With the limit on, the group must stay under it; ``--max-entries``
makes requests small enough for a low limit to bind::

    .venv/bin/python -m bench.scale --records 200000
    .venv/bin/python -m bench.scale --records 60000 --rate-limit-rps 20 \
        --max-entries 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from worker.sandbox.broker import LocalBroker, default_home
from worker.sandbox.sample import build_sample, create_topics, produce

ROOT = Path(__file__).resolve().parents[1]
PORT = 19592
SIM_PORT = 18593


def _simulator(rate_limit: float | None, port: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "worker.sandbox.simulator", "--port", str(port)]
    if rate_limit:
        args += ["--rate-limit-rps", str(rate_limit)]
    env = {**os.environ, "CIO_SITE_ID": "bench", "CIO_API_KEY": "bench-key"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()  # {"simulator": url}: it is listening
    return process


def _stats(port: int) -> dict[str, Any]:
    """The simulator's counters (not its people and events: copying those
    under load would slow the simulator down)."""
    url = f"http://127.0.0.1:{port}/__sim/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def _run(
    bootstrap: str, workers: int, records: int, rate: float | None, sim_port: int
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    topics = {"p": f"s-{run_id}.persons", "e": f"s-{run_id}.events"}
    create_topics(bootstrap, {topics["p"]: 6, topics["e"]: 6, f"s-{run_id}.dlq": 1})
    sample = build_sample(
        int(records * 0.3), int(records * 0.7), ROOT / "schemas", bad=False
    )
    produce(bootstrap, sample, topics["p"], topics["e"])
    simulator = _simulator(rate, sim_port)
    env = {
        **os.environ,
        "CIO_SITE_ID": "bench",
        "CIO_API_KEY": "bench-key",
        "CIO_TRACK__BASE_URL": f"http://127.0.0.1:{sim_port}",
        "CIO_TRACK__RATE_LIMIT_RPS": str(rate or 100_000),
        "CIO_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "CIO_KAFKA__GROUP_ID": f"s-{run_id}",
        "CIO_KAFKA__PERSON_TOPIC": topics["p"],
        "CIO_KAFKA__EVENT_TOPIC": topics["e"],
        "CIO_KAFKA__DEAD_LETTER_TOPIC": f"s-{run_id}.dlq",
        "CIO_METRICS__HOST": "127.0.0.1",
        "CIO_METRICS__PORT": "0",
        "CIO_LOG__LEVEL": "WARNING",
    }
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env={**env, "CIO_KAFKA__GROUP_INSTANCE_ID": f"w{i}"},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(workers)
    ]
    deadline = started + 600
    stats = _stats(sim_port)
    first_accepted: float | None = None
    per_second: dict[int, int] = {}  # requests the simulator saw, per second
    seen = stats["requests"]
    while stats["entries_accepted"] < len(sample.records):
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
        stats = _stats(sim_port)
        now = time.monotonic()
        if first_accepted is None and stats["entries_accepted"]:
            first_accepted = now
        second, requests = int(now - started), stats["requests"]
        per_second[second] = per_second.get(second, 0) + requests - seen
        seen = requests
    ended = time.monotonic()
    seconds, delivering = ended - started, ended - (first_accepted or started)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)
    simulator.send_signal(signal.SIGTERM)
    simulator.wait(timeout=30)
    return {
        "workers": workers,
        "rate_limit_rps": rate,
        "records": len(sample.records),
        "accepted": stats["entries_accepted"],
        "seconds": round(seconds, 1),
        "records_per_s": round(stats["entries_accepted"] / seconds),
        "delivering_s": round(delivering, 1),
        "records_per_s_delivering": round(stats["entries_accepted"] / delivering),
        "requests": stats["requests"],
        "requests_per_s": round(stats["requests"] / seconds, 1),
        "requests_per_s_delivering": round(stats["requests"] / delivering, 1),
        "most_requests_in_one_second": max(per_second.values(), default=0),
        "answered_429": stats["responses"].get("429", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rate-limit-rps", type=float, default=0.0)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--max-entries", type=int, default=0)
    parser.add_argument("--broker-port", type=int, default=PORT)
    parser.add_argument("--simulator-port", type=int, default=SIM_PORT)
    args = parser.parse_args()
    if args.max_entries:
        os.environ["CIO_BATCH__MAX_ENTRIES"] = str(args.max_entries)
    broker = LocalBroker(default_home(), args.broker_port)
    broker.start()
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            result = _run(
                broker.bootstrap_servers,
                workers,
                args.records,
                args.rate_limit_rps or None,
                args.simulator_port,
            )
            print(json.dumps(result), flush=True)
    finally:
        broker.stop()
        broker.wipe()


if __name__ == "__main__":
    main()
