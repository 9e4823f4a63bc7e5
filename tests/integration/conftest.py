"""Real services for the integration tier: the Kafka broker and the simulator.

The broker is the project's own single-node KRaft broker, started once per
session on port 19192 (so it never collides with a demo broker on 19092) and
stopped at the end, unless ``KAFKA_BOOTSTRAP_SERVERS`` names one to use instead.
Every test gets its own topics and consumer group.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.s3_server import (  # noqa: F401 (fixtures, used by name)
    archive_env,
    s3_bucket,
    s3_endpoint,
)
from worker.sandbox.broker import LocalBroker, default_home
from worker.sandbox.sample import create_topics
from worker.sandbox.simulator import TrackSimulator

TEST_BROKER_PORT = 19192
SITE_ID = "test-site"
API_KEY = "test-key-0123456789"

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a running broker for the whole session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = LocalBroker(
        default_home()
        if "CIO_SANDBOX_HOME" in os.environ
        else ROOT / ".cache" / "kafka",
        TEST_BROKER_PORT,
    )
    broker.stop()
    broker.wipe()
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
        broker.wipe()


@pytest.fixture
def simulator() -> Iterator[TrackSimulator]:
    """A fresh Track API simulator on a free loopback port."""
    with TrackSimulator(SITE_ID, API_KEY) as sim:
        yield sim


@dataclass(frozen=True)
class Topics:
    person: str
    event: str
    dead_letter: str
    group: str


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    """Unique topics (3 partitions each) and a unique group for one test."""
    run = uuid.uuid4().hex[:10]
    names = Topics(
        f"t-{run}.persons", f"t-{run}.events", f"t-{run}.dead-letters", f"g-{run}"
    )
    create_topics(
        kafka_bootstrap,
        {names.person: 3, names.event: 3, names.dead_letter: 1},
    )
    return names


@pytest.fixture
def worker_env(
    kafka_bootstrap: str,
    simulator: TrackSimulator,
    topics: Topics,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """Environment that points a worker at this test's broker, topics and simulator."""
    env = {
        "CIO_SITE_ID": SITE_ID,
        "CIO_API_KEY": API_KEY,
        "CIO_TRACK__BASE_URL": simulator.url,
        "CIO_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CIO_KAFKA__GROUP_ID": topics.group,
        "CIO_KAFKA__PERSON_TOPIC": topics.person,
        "CIO_KAFKA__EVENT_TOPIC": topics.event,
        "CIO_KAFKA__DEAD_LETTER_TOPIC": topics.dead_letter,
        "CIO_LOG__FORMAT": "json",
        # Several workers run at once: each serves metrics on a free loopback port.
        "CIO_METRICS__HOST": "127.0.0.1",
        "CIO_METRICS__PORT": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    return env
