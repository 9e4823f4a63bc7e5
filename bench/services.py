"""The servers a benchmark run starts on loopback and stops again.

The broker is the sandbox's own KRaft launcher on a port of the benchmark's
(19292 by default), so a shared dev broker on 19092 or the tests' on 19192 is
never touched. The Track API simulator and the v1 stub each run in their own
process, so their CPU is not counted against the worker or the naive loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.procstat import cpu_seconds, die_with_parent
from worker.sandbox.broker import BrokerError, LocalBroker, default_home

BENCH_BROKER_PORT = 19292
SITE_ID = "bench-site"
# A throwaway key for the loopback simulator only; it opens nothing real.
API_KEY = "bench-track-api-key"
START_TIMEOUT_S = 30.0
BROKER_STARTS = 3
STOP_TIMEOUT_S = 10.0
# /__sim/state copies every person and event the simulator holds: after a
# million records that takes a while, so its reads get a generous timeout.
STATE_TIMEOUT_S = 300.0


@dataclass
class Server:
    """A server process on loopback and the URL it announced."""

    name: str
    process: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_s(self) -> float | None:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def bench_broker(port: int = BENCH_BROKER_PORT) -> LocalBroker:
    return LocalBroker(default_home(), port=port)


@contextlib.contextmanager
def running_broker(port: int, keep: bool) -> Iterator[LocalBroker]:
    """A fresh broker on ``port`` (its data wiped first), stopped afterwards."""
    broker = bench_broker(port)
    for attempt in range(1, BROKER_STARTS + 1):
        broker.stop()
        broker.wipe()
        try:
            broker.start()
            break
        except BrokerError:
            # A start can still fail on a busy machine (a port in TIME_WAIT
            # outlasting the launcher's own retries); one more attempt is cheap.
            if attempt == BROKER_STARTS:
                raise
    try:
        yield broker
    finally:
        broker.stop()
        if not keep:
            broker.wipe()


def broker_pid(broker: LocalBroker) -> int | None:
    try:
        return int(broker.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def start_simulator(rate_limit_rps: float | None = None) -> Server:
    """``python -m worker.sandbox.simulator`` on a free loopback port."""
    args = ["-m", "worker.sandbox.simulator", "--host", "127.0.0.1", "--port", "0"]
    if rate_limit_rps is not None:
        args += ["--rate-limit-rps", str(rate_limit_rps)]
    return _start("simulator", args, "simulator")


def start_v1_stub() -> Server:
    """The v1 stub the naive loop calls (see ``bench.v1stub``)."""
    return _start("v1-stub", ["-m", "bench.v1stub", "--port", "0"], "stub")


def _start(name: str, args: list[str], url_key: str) -> Server:
    env = dict(os.environ, CIO_SITE_ID=SITE_ID, CIO_API_KEY=API_KEY)
    process = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = process.stdout.readline()  # the server's first line names its URL
    if not line or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"{name} did not start")
    url = str(json.loads(line)[url_key])
    return Server(name, process, url)


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
        return json.loads(response.read())


def post_json(url: str, body: Any = None, timeout_s: float = 10.0) -> Any:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(  # noqa: S310 (loopback URLs we started)
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        return json.loads(response.read())


def simulator_state(simulator: Server) -> tuple[dict[str, Any], float]:
    """The simulator's whole state and how long it took to fetch."""
    started = time.monotonic()
    state = get_json(simulator.url + "/__sim/state", STATE_TIMEOUT_S)
    return state, time.monotonic() - started


def reset_simulator(simulator: Server) -> None:
    post_json(simulator.url + "/__sim/reset")
