"""Phase C, the naive loop: what a user writes with the official client.

One call per record with the ``customerio`` package: ``identify`` for a person,
``track`` for an event, each a v1 request (``PUT /api/v1/customers/{id}``,
``POST /api/v1/customers/{id}/events``) answered by ``bench.v1stub``. The
client builds ``https://`` URLs only; its ``base_url`` is pointed at the
loopback stub over plain http, which also leaves out the client's https-only
retry adapter (no request failed, so no retry would have run). It runs on a
sample and prints progress as JSON lines, like ``bench.ceiling``::

    CIO_SITE_ID=s CIO_API_KEY=k python -m bench.naive --url http://127.0.0.1:N \
        --bootstrap 127.0.0.1:19292 --person-topic P --event-topic E --records 5000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import fastavro
from customerio import CustomerIO

from bench.ceiling import assigned_consumer, read_records
from worker.avro import load_schema


def identify(client: CustomerIO, record: dict[str, Any]) -> None:
    """A person: every non-null field and free-form attribute, by email."""
    email = record.pop("person_email")
    extra = record.pop("attributes") or {}
    attributes = {k: v for k, v in {**extra, **record}.items() if v is not None}
    client.identify(id=email, email=email, **attributes)


def track(client: CustomerIO, record: dict[str, Any]) -> None:
    """An event: its name, id and timestamp, the rest as event data."""
    data = dict(record.get("data") or {})
    for name in ("value", "currency"):
        if record.get(name) is not None:
            data[name] = record[name]
    client.track(
        record["person_email"],
        record["event_name"],
        data=data,
        id=record.get("event_id"),
        timestamp=record.get("timestamp"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("--url", required=True, help="the v1 stub's root URL")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--person-topic", required=True)
    parser.add_argument("--event-topic", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)

    client = CustomerIO(os.environ["CIO_SITE_ID"], os.environ["CIO_API_KEY"])
    client.base_url = args.url.rstrip("/") + "/api/v1"  # loopback, plain http
    person_schema = load_schema(Path("schemas/person.avsc"))
    event_schema = load_schema(Path("schemas/person_event.avsc"))

    def deliver(message: Any) -> None:
        person = message.topic() == args.person_topic
        schema = person_schema if person else event_schema
        record = fastavro.schemaless_reader(io.BytesIO(message.value()), schema, None)
        assert isinstance(record, dict)
        (identify if person else track)(client, record)

    topics = [args.person_topic, args.event_topic]
    consumer, ends = assigned_consumer(
        args.bootstrap, topics, "bench-naive", args.records
    )
    try:
        summary = read_records(consumer, ends, args.timeout_s, deliver)
    finally:
        consumer.close()
        client.close()
    print(json.dumps({"summary": summary}), flush=True)
    return 0 if summary["records"] == sum(ends.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
