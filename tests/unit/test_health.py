"""Unit tests of worker.health: the probe decisions, and the server on loopback.

The server tests bind 127.0.0.1 on port 0 (a free port) and talk to it only.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from worker import committer, loop, statestore
from worker.errors import ConfigError
from worker.health import (
    HEALTHZ_PATH,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    HealthServer,
    HealthState,
    Responder,
    _Handler,
    serve,
    serving,
)
from worker.metrics import Metrics
from worker.settings import MetricsSettings, TrackSettings

LOOPBACK = MetricsSettings(host="127.0.0.1", port=0)


class FakeClock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ready_state() -> HealthState:
    state = HealthState()
    state.set_assigned(3)
    return state


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def server() -> Iterator[HealthServer]:
    metrics = Metrics()
    with serving(LOOPBACK, metrics) as running:
        yield running


# -- the decisions --------------------------------------------------------------


def test_liveness_passes_until_the_heartbeat_is_older_than_the_timeout() -> None:
    """Alive at exactly the timeout, stalled just past it, alive after a beat."""
    clock = FakeClock()
    state = HealthState(clock=clock)

    clock.now += 60
    at_timeout = state.liveness(timeout_s=60)
    clock.now += 0.001
    past = state.liveness(timeout_s=60)
    state.heartbeat()
    again = state.liveness(timeout_s=60)

    assert at_timeout.ready
    assert at_timeout.status == 200
    assert not past.ready
    assert past.status == 503
    assert past.body["status"] == "stalled"
    assert past.body["timeout_s"] == 60
    assert again.ready


def test_liveness_counts_start_up_from_the_state_s_creation() -> None:
    """Before the first heartbeat the worker is alive for one timeout."""
    clock = FakeClock()
    state = HealthState(clock=clock)

    clock.now += 119

    assert state.liveness(timeout_s=120).ready


@pytest.mark.parametrize(
    ("assigned", "restoring", "paused", "reasons"),
    [
        (0, False, False, ["no partitions assigned"]),
        (2, True, False, ["restoring state"]),
        (
            2,
            False,
            True,
            ["delivery paused: the Track API refuses CIO_SITE_ID / CIO_API_KEY"],
        ),
        (0, True, True, None),
    ],
)
def test_readiness_fails_with_every_reason_that_applies(
    assigned: int, restoring: bool, paused: bool, reasons: list[str] | None
) -> None:
    """Not ready without partitions, while restoring, or while paused."""
    state = HealthState()
    state.set_assigned(assigned)
    state.set_restoring(restoring)
    state.set_credentials_paused(paused)

    verdict = state.readiness()

    assert verdict.status == 503
    assert verdict.body["ready"] is False
    if reasons is not None:
        assert verdict.body["reasons"] == reasons
    else:
        assert len(verdict.body["reasons"]) == 3


def test_readiness_passes_with_partitions_state_and_credentials() -> None:
    """Ready once assigned, restored and delivering; no reasons in the body."""
    verdict = ready_state().readiness()

    assert verdict.status == 200
    assert verdict.body == {
        "ready": True,
        "assigned_partitions": 3,
        "restoring": False,
        "credentials_paused": False,
    }


def test_default_liveness_timeout_outlasts_every_blocking_step() -> None:
    """The default is longer than each step that blocks the loop without a
    heartbeat while healthy: start-up (topic checks, state topic, transactions),
    a rebalance's settling, a shutdown, a commit try, a restore's watermark
    look-up (restore progress itself beats)."""
    startup_s = (
        loop.METADATA_TIMEOUT_S
        + 2 * statestore.ADMIN_TIMEOUT_S
        + committer.TRANSACTION_TIMEOUT_S
    )
    steps = {
        "start-up": startup_s,
        "revoke or shutdown": TrackSettings().shutdown_timeout_s,
        "commit try": 2 * committer.TRANSACTION_TIMEOUT_S,
        "restore start": statestore.ADMIN_TIMEOUT_S,
    }

    timeout_s = MetricsSettings().liveness_timeout_s

    assert all(timeout_s > s for s in steps.values()), steps


def test_metrics_settings_defaults_suit_a_pod() -> None:
    """Every interface (probes reach the pod's address), port 9108."""
    settings = MetricsSettings()

    assert (settings.host, settings.port) == ("0.0.0.0", 9108)


# -- the responder --------------------------------------------------------------


def test_responder_answers_each_path_with_its_content_type() -> None:
    """/metrics in the Prometheus text format, probes in JSON, others 404."""
    metrics = Metrics(ready_state())
    responder = Responder(metrics, metrics.health, liveness_timeout_s=60)

    status, content_type, body = responder.answer("/metrics", None)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"cio_worker_records_consumed_total" in body or b"# HELP" in body
    assert responder.answer("/healthz", None)[:2] == (200, "application/json")
    assert responder.answer("/readyz", None)[0] == 200
    missing = responder.answer("/admin", None)
    assert missing[0] == 404
    assert json.loads(missing[2])["paths"] == ["/metrics", "/healthz", "/readyz"]


def test_responder_serves_openmetrics_when_asked() -> None:
    """A scraper asking for OpenMetrics gets it."""
    metrics = Metrics()
    responder = Responder(metrics, metrics.health, liveness_timeout_s=60)

    _, content_type, body = responder.answer(
        "/metrics", "application/openmetrics-text; version=1.0.0"
    )

    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


# -- the server on loopback -----------------------------------------------------


def test_serve_port_zero_binds_a_free_port_and_answers_every_path(
    server: HealthServer,
) -> None:
    """The three paths answer over HTTP; a query string is ignored."""
    metrics_status, headers, body = get(server.url + "/metrics")
    health_status, _, health = get(server.url + "/healthz?verbose=1")
    ready_status, _, ready = get(server.url + "/readyz")

    assert server.port > 0
    assert server.host == "127.0.0.1"
    assert metrics_status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Cache-Control"] == "no-store"
    assert b"cio_worker_heartbeat_age_seconds" in body
    assert health_status == 200
    assert json.loads(health)["status"] == "ok"
    assert ready_status == 503
    assert json.loads(ready)["reasons"] == ["no partitions assigned"]


def test_serve_reflects_the_state_the_loop_sets() -> None:
    """/readyz follows the HealthState without a restart of the server."""
    metrics = Metrics()

    with serving(LOOPBACK, metrics) as running:
        before = get(running.url + "/readyz")[0]
        metrics.set_assigned(4)
        after = get(running.url + "/readyz")[0]
        metrics.set_credentials_paused(True)
        paused = get(running.url + "/readyz")

    assert (before, after, paused[0]) == (503, 200, 503)
    assert "delivery paused" in json.loads(paused[2])["reasons"][0]


def test_serve_healthz_goes_503_when_the_loop_stalls() -> None:
    """With the heartbeat older than liveness_timeout_s, /healthz is 503."""
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    settings = MetricsSettings(host="127.0.0.1", port=0, liveness_timeout_s=30)

    with serving(settings, metrics) as running:
        clock.now += 31
        status, _, body = get(running.url + HEALTHZ_PATH)

    assert status == 503
    assert json.loads(body)["status"] == "stalled"


def test_serve_head_has_no_body_and_other_methods_are_refused(
    server: HealthServer,
) -> None:
    """HEAD answers headers only; POST is not implemented (501)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("HEAD", "/healthz")
    head = connection.getresponse()
    head_body = head.read()
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("POST", "/metrics", body=b"x" * 10)
    post = connection.getresponse()
    post.read()
    connection.close()

    assert head.status == 200
    assert int(head.getheader("Content-Length") or 0) > 0
    assert head_body == b""
    assert post.status == 501


def test_serve_does_not_tell_its_python_version(server: HealthServer) -> None:
    """The Server header names the worker only."""
    _, headers, _ = get(server.url + "/healthz")

    assert headers["Server"].startswith("cio-worker/")
    assert "Python" not in headers["Server"]


def test_serve_close_releases_the_port_and_is_idempotent() -> None:
    """After close() the same port can be bound again; a second close is a no-op."""
    running = serve(LOOPBACK, Metrics())
    port = running.port

    running.close()
    running.close()
    again = serve(MetricsSettings(host="127.0.0.1", port=port), Metrics())
    again.close()

    assert again.port == port


def test_serve_port_in_use_is_a_config_error_naming_the_setting() -> None:
    """A taken port stops start-up with what to change (exit code 2)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(ConfigError, match="CIO_METRICS__PORT"):
            serve(MetricsSettings(host="127.0.0.1", port=port), Metrics())


def connect_from(client: str, port: int) -> socket.socket:
    """A connection from another loopback address (127.0.0.0/8 is all local)."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=(client, 0)
    )


def dropped_at_once(client: str, port: int) -> bool:
    """Whether a request from ``client`` is closed unanswered; retried for a
    while, since the server takes earlier connections one by one."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with connect_from(client, port) as extra:
            extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            if extra.recv(1024) == b"":
                return True
    return False


def test_serve_limits_connections_per_client_and_others_still_get_through(
    server: HealthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client holding MAX_CONNECTIONS_PER_CLIENT idle connections has the
    next one dropped, while another client's probe is answered."""
    monkeypatch.setattr(_Handler, "timeout", 10.0)
    idle = [
        connect_from("127.0.0.2", server.port)
        for _ in range(MAX_CONNECTIONS_PER_CLIENT)
    ]
    try:
        dropped = dropped_at_once("127.0.0.2", server.port)
        other = get(server.url + "/healthz")[0]
    finally:
        for conn in idle:
            conn.close()

    assert dropped
    assert other == 200


def test_serve_drops_connections_past_the_total_limit_and_recovers(
    server: HealthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MAX_CONNECTIONS idle connections from several clients, a new one
    is dropped; once they go away the probes answer again."""
    monkeypatch.setattr(_Handler, "timeout", 10.0)
    clients = [
        f"127.0.0.{10 + i // MAX_CONNECTIONS_PER_CLIENT}"
        for i in range(MAX_CONNECTIONS)
    ]
    idle = [connect_from(client, server.port) for client in clients]
    try:
        dropped = dropped_at_once("127.0.0.99", server.port)
    finally:
        for conn in idle:
            conn.close()

    assert dropped
    assert get(server.url + "/healthz")[0] == 200


def test_serve_cuts_off_trickling_clients_after_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that keeps sending a header line now and then (slowloris) is
    cut off at REQUEST_DEADLINE_S, though each read is within the timeout."""
    monkeypatch.setattr("worker.health.REQUEST_DEADLINE_S", 0.5)
    monkeypatch.setattr(_Handler, "timeout", 5.0)

    with serving(LOOPBACK, Metrics()) as running:
        slow = connect_from("127.0.0.3", running.port)
        slow.sendall(b"GET /healthz HTTP/1.0\r\n")
        started = time.monotonic()
        cut = False
        while not cut and time.monotonic() - started < 5:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                slow.settimeout(0.2)
                cut = slow.recv(1024) == b""
            except TimeoutError:
                continue
            except OSError:
                cut = True
        slow.close()
        waited = time.monotonic() - started

    assert cut
    assert waited < 3


def test_serve_cuts_off_a_client_that_never_finishes_its_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow client (half a request line) is disconnected after the timeout."""
    monkeypatch.setattr(_Handler, "timeout", 0.3)

    with serving(LOOPBACK, Metrics()) as running:
        slow = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        slow.sendall(b"GET /heal")
        started = time.monotonic()
        closed = slow.recv(1024)
        waited = time.monotonic() - started
        slow.close()

    assert closed == b""
    assert waited < 3


def test_serve_refuses_an_oversized_request_line(server: HealthServer) -> None:
    """A 70 kB request line is answered 414 and the server keeps serving."""
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    conn.sendall(b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
    answer = conn.recv(1024)
    conn.close()

    assert answer.startswith(b"HTTP/1.0 414")
    assert get(server.url + "/healthz")[0] == 200
