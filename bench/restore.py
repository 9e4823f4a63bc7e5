"""How long restoring the dedupe state takes: N keys on one state partition.

Writes N person keys (8-byte digests, as the worker writes them) to a fresh
compacted state topic on the local broker, then restores it with the worker's
own ``statestore.restore`` and prints one JSON line: keys, seconds, keys per
second and the resident memory the restored state added.

    .venv/bin/python bench/restore.py --keys 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from worker.sandbox.broker import LocalBroker, default_home
from worker.state import WHOLE_DIGEST_TAG, PartitionState, digest, person_key
from worker.statestore import ensure_state_topic, restore


def _state_megabytes(state: PartitionState) -> float:
    """Memory held by the restored people: the dict and its int keys and values."""
    total = sys.getsizeof(state.people)
    for slot, value in state.people.items():
        total += sys.getsizeof(slot) + sys.getsizeof(value)
    return total / 1_048_576


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--bootstrap", default="")
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = LocalBroker(default_home())
        broker.start()
        bootstrap = broker.bootstrap_servers
    topic = f"bench-restore-{uuid.uuid4().hex[:8]}.state"
    ensure_state_topic(AdminClient({"bootstrap.servers": bootstrap}), topic, 1)

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 50, "compression.type": "zstd"}
    )
    started = time.monotonic()
    for i in range(args.keys):
        key = person_key({"email": f"user{i:08d}@example.com"})
        value = WHOLE_DIGEST_TAG + digest({"i": i})
        while True:
            try:
                producer.produce(topic, key=key, value=value, partition=0)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    written_s = time.monotonic() - started

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    states = restore({"bootstrap.servers": bootstrap}, topic, [0])
    seconds = time.monotonic() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state_mb = _state_megabytes(states[0])
    print(
        json.dumps(
            {
                "keys": len(states[0]),
                "restore_seconds": round(seconds, 2),
                "keys_per_s": round(len(states[0]) / seconds),
                "peak_rss_added_mb": round((rss_after - rss_before) / 1024, 1),
                "state_mb": round(state_mb, 1),
                "write_seconds": round(written_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
