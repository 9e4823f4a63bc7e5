"""What an operator sees of `cio-worker run`: /metrics, /healthz and /readyz.

Each test starts the real command in a subprocess with its health server on
127.0.0.1 and port 0; the port it took is read from its ``health_server_started``
log event. The figures scraped from /metrics are checked against what the Track
API simulator itself counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ROOT, Topics
from worker.sandbox.sample import build_sample, produce
from worker.sandbox.simulator import Fault, TrackSimulator

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 90.0


class RunningWorker:
    """`python -m worker run` in a subprocess, its stderr read by a thread."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                self.lines.append(line)
                if '"health_server_started"' in line:
                    self._port = int(json.loads(line)["port"])

    @property
    def url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._port is None:
            assert self.process.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, (
                "no health_server_started event: is `cio-worker run` serving "
                "worker.health?\n" + "".join(self.lines)
            )
            time.sleep(0.05)
        return f"http://127.0.0.1:{self._port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            url = self.url + path  # loopback http only
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every sample of /metrics: name -> sorted labels -> value."""
        status, body = self.get("/metrics")
        assert status == 200
        found: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                found[sample.name][labels] = sample.value
        return found

    def stop(self) -> str:
        """SIGTERM, wait for exit 0, return everything it logged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=90)
        self._reader.join(timeout=10)
        output = "".join(self.lines)
        assert self.process.returncode == 0, output
        return output


@pytest.fixture
def start_worker(worker_env: dict[str, str]) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(**extra: str) -> RunningWorker:
        env = {
            **os.environ,
            **worker_env,
            "CIO_METRICS__HOST": "127.0.0.1",
            "CIO_METRICS__PORT": "0",
            "CIO_BATCH__MAX_ENTRIES": "50",
            "CIO_BATCH__LINGER_MS": "20",
            **extra,
        }
        worker = RunningWorker(env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(timeout=30)
        worker._reader.join(timeout=10)


def total(scrape: dict[str, Any], name: str) -> float:
    return float(sum(scrape.get(name, {}).values()))


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = SETTLE_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_run_metrics_match_what_the_simulator_received(
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
    start_worker: Callable[..., RunningWorker],
) -> None:
    """Consumed, delivered, dead-lettered, requests, entries and bytes on
    /metrics equal the simulator's own counts; lag ends at 0; probes pass."""
    sample = build_sample(150, 450, ROOT / "schemas", bad=True)
    produce(kafka_bootstrap, sample, topics.person, topics.event)
    records = len(sample.records)

    worker = start_worker()

    def settled() -> bool:
        scrape = worker.scrape()
        done = sum(
            total(scrape, f"cio_worker_records_{kind}_total")
            for kind in ("delivered", "skipped", "dead_lettered")
        )
        lags = scrape.get("cio_worker_consumer_lag", {})
        return (
            done == records
            and total(scrape, "cio_worker_buffered_bytes") == 0
            and len(lags) == 6  # 3 person + 3 event partitions, one worker
            and set(lags.values()) == {0.0}
        )

    wait_for(settled, "every record to be settled and the lag sampled at 0")
    scrape = worker.scrape()
    stats = simulator.stats
    health = worker.get("/healthz")
    ready = worker.get("/readyz")
    worker.stop()

    assert total(scrape, "cio_worker_records_consumed_total") == records
    assert (
        total(scrape, "cio_worker_records_delivered_total")
        == (stats["entries_accepted"])
    )
    assert total(scrape, "cio_worker_records_dead_lettered_total") == (
        sample.expected_rejects
    )
    topics_seen = {
        dict(labels)["topic"] for labels in scrape["cio_worker_records_consumed_total"]
    }
    assert topics_seen == {topics.person, topics.event}
    responses = {
        dict(labels)["status"]: value
        for labels, value in scrape["cio_worker_track_responses_total"].items()
    }
    assert responses == {k: float(v) for k, v in stats["responses"].items()}
    assert (
        total(scrape, "cio_worker_track_request_duration_seconds_count")
        == (stats["requests"])
    )
    assert total(scrape, "cio_worker_request_entries_sum") == stats["entries_received"]
    assert (
        total(scrape, "cio_worker_request_body_bytes_sum") == (stats["bytes_received"])
    )
    assert total(scrape, "cio_worker_transactions_total") >= 1
    assert total(scrape, "cio_worker_batches_total") >= stats["requests"]
    assert total(scrape, "cio_worker_assigned_partitions") == 6
    assert total(scrape, "cio_worker_state_restoring") == 0
    assert total(scrape, "cio_worker_state_restores_total") >= 1
    assert total(scrape, "cio_worker_credentials_paused") == 0
    assert total(scrape, "cio_worker_heartbeat_age_seconds") < 5
    assert health[0] == 200
    assert ready[0] == 200
    assert json.loads(ready[1])["ready"] is True


def test_readyz_is_503_while_the_api_refuses_the_credentials_and_200_after(
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
    start_worker: Callable[..., RunningWorker],
) -> None:
    """A run of 401s pauses delivery: /readyz says why with 503 while /healthz
    stays 200; once the API accepts again everything is delivered, nothing is
    dead-lettered, and /readyz is back to 200."""
    worker = start_worker(CIO_TRACK__RETRY_MAX_WAIT_S="0.5")
    wait_for(lambda: worker.get("/readyz")[0] == 200, "the worker to be ready")
    simulator.inject([Fault(status=401, count=40)])
    sample = build_sample(60, 140, ROOT / "schemas", bad=False)
    produce(kafka_bootstrap, sample, topics.person, topics.event)

    paused: list[tuple[int, dict[str, Any], int, float]] = []

    def saw_pause() -> bool:
        status, body = worker.get("/readyz")
        if status == 503:
            scrape = worker.scrape()
            paused.append(
                (
                    status,
                    json.loads(body),
                    worker.get("/healthz")[0],
                    total(scrape, "cio_worker_credentials_paused"),
                )
            )
        return bool(paused)

    wait_for(saw_pause, "/readyz to report the credentials pause", timeout_s=60)
    wait_for(
        lambda: simulator.stats["entries_accepted"] == len(sample.records),
        "every record to be delivered after the pause",
    )
    wait_for(lambda: worker.get("/readyz")[0] == 200, "/readyz to recover", 30)
    scrape = worker.scrape()
    worker.stop()

    status, body, healthz, gauge = paused[0]
    assert status == 503
    assert body["credentials_paused"] is True
    assert any("CIO_API_KEY" in reason for reason in body["reasons"])
    assert healthz == 200
    assert gauge == 1
    assert total(scrape, "cio_worker_credentials_paused") == 0
    assert total(scrape, "cio_worker_records_dead_lettered_total") == 0
    retries = {
        dict(labels)["reason"]: value
        for labels, value in scrape["cio_worker_retries_total"].items()
    }
    assert retries.get("credentials", 0) >= 1
