"""Liveness, readiness and the small HTTP server that reports them.

One daemon thread serves three paths on ``[metrics] host`` and ``port``:

- ``/metrics``: the worker's Prometheus metrics (``worker.metrics``);
- ``/healthz``: 200 while the loop turns, 503 once it has not turned for
  ``liveness_timeout_s`` (Kubernetes then restarts the container);
- ``/readyz``: 200 only when partitions are assigned, no state restore is
  running and delivery is not paused for credentials; 503 otherwise, with a
  JSON body saying why.

``HealthState`` holds the facts, set by the loop's thread (through
``Metrics``) and read by the server's; each fact is one attribute, so the GIL
keeps every read whole and no lock is needed. The server answers GET and HEAD
only, bounds the connections it serves at once (in all and per client address)
and how long any of them may stay open, and serves nothing secret.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from prometheus_client.exposition import choose_encoder

from worker import __version__
from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.metrics import Metrics
    from worker.settings import MetricsSettings

log = structlog.get_logger(__name__)

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
METRICS_PATH = "/metrics"
# Probes and scrapes are a handful of requests every few seconds; more open
# connections than this are dropped so a misbehaving client cannot pile up
# threads in the worker's process...
MAX_CONNECTIONS = 32
# ...nor take them all: the kubelet (liveness and readiness at once) and
# Prometheus each come from their own address.
MAX_CONNECTIONS_PER_CLIENT = 4
# A client silent this long in the middle of a request is cut off...
REQUEST_TIMEOUT_S = 5.0
# ...and any connection is cut off after this long, however it trickles bytes,
# so slow clients cannot hold every slot and starve the kubelet's probes.
REQUEST_DEADLINE_S = 10.0
# How often serve_forever checks for close(): bounds how long close() takes.
SHUTDOWN_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Verdict:
    """One probe's answer: whether it passes and the JSON body to send."""

    ready: bool
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return 200 if self.ready else 503


class HealthState:
    """What the probes are decided from; set by the loop, read by the server."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Start-up counts as a turn: the first heartbeat comes only after the
        # topics are checked and transactions initialised.
        self.last_heartbeat = clock()
        self.assigned = 0
        self.restoring = False
        self.credentials_paused = False

    def heartbeat(self) -> None:
        """The loop turned (or a long step inside it made progress)."""
        self.last_heartbeat = self._clock()

    def set_assigned(self, count: int) -> None:
        self.assigned = count

    def set_restoring(self, restoring: bool) -> None:
        self.restoring = restoring

    def set_credentials_paused(self, paused: bool) -> None:
        self.credentials_paused = paused

    def liveness(self, timeout_s: float) -> Verdict:
        """Alive while the last heartbeat is at most ``timeout_s`` old."""
        age = max(0.0, self._clock() - self.last_heartbeat)
        body = {"heartbeat_age_s": round(age, 3), "timeout_s": timeout_s}
        if age > timeout_s:
            return Verdict(False, {"status": "stalled", **body})
        return Verdict(True, {"status": "ok", **body})

    def readiness(self) -> Verdict:
        """Ready when partitions are assigned, state restored, delivery running."""
        reasons = []
        if self.assigned <= 0:
            reasons.append("no partitions assigned")
        if self.restoring:
            reasons.append("restoring state")
        if self.credentials_paused:
            reasons.append(
                "delivery paused: the Track API refuses CIO_SITE_ID / CIO_API_KEY"
            )
        body: dict[str, Any] = {
            "ready": not reasons,
            "assigned_partitions": self.assigned,
            "restoring": self.restoring,
            "credentials_paused": self.credentials_paused,
        }
        if reasons:
            body["reasons"] = reasons
        return Verdict(not reasons, body)


class Responder:
    """Maps a request path to (status, content type, body); no sockets here."""

    def __init__(
        self, metrics: Metrics, health: HealthState, liveness_timeout_s: float
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._liveness_timeout_s = liveness_timeout_s

    def answer(self, path: str, accept: str | None) -> tuple[int, str, bytes]:
        if path == METRICS_PATH:
            encoder, content_type = choose_encoder(accept or "")
            return 200, content_type, encoder(self._metrics.registry)
        if path == HEALTHZ_PATH:
            return _json(self._health.liveness(self._liveness_timeout_s))
        if path == READYZ_PATH:
            return _json(self._health.readiness())
        paths = [METRICS_PATH, HEALTHZ_PATH, READYZ_PATH]
        return 404, "application/json", _dumps({"error": "not found", "paths": paths})


def _json(verdict: Verdict) -> tuple[int, str, bytes]:
    return verdict.status, "application/json", _dumps(verdict.body)


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


class HealthServer:
    """The running server; ``close()`` stops it and releases the port."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving; returns within about SHUTDOWN_POLL_S. Idempotent."""
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        log.info("health_server_stopped", port=self.port)


def serve(
    settings: MetricsSettings, metrics: Metrics, health: HealthState | None = None
) -> HealthServer:
    """Start serving /metrics, /healthz and /readyz in a daemon thread.

    ``health`` defaults to ``metrics.health``. Raises ConfigError when the
    address cannot be bound (port in use, unknown host).
    """
    responder = Responder(
        metrics, health or metrics.health, settings.liveness_timeout_s
    )
    try:
        server = _Server((settings.host, settings.port), responder)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc}; set CIO_METRICS__PORT (0: any free port) or "
            "CIO_METRICS__HOST"
        ) from exc
    thread = threading.Thread(
        target=server.serve_forever,
        args=(SHUTDOWN_POLL_S,),
        name="cio-health",
        daemon=True,
    )
    thread.start()
    running = HealthServer(server, thread)
    log.info("health_server_started", host=running.host, port=running.port)
    return running


@contextmanager
def serving(
    settings: MetricsSettings, metrics: Metrics, health: HealthState | None = None
) -> Iterator[HealthServer]:
    """``serve`` for the length of a ``with`` block."""
    server = serve(settings, metrics, health)
    try:
        yield server
    finally:
        server.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2 * MAX_CONNECTIONS  # listen backlog

    def __init__(self, address: tuple[str, int], responder: Responder) -> None:
        self.responder = responder
        # Open connection -> (client address, cut-off time); at most
        # MAX_CONNECTIONS entries, so scanning it is cheap.
        self._open: dict[Any, tuple[str, float]] = {}
        self._open_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without the reverse DNS lookup HTTPServer.server_bind makes."""
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = (
            str(self.server_address[0]),
            int(self.server_address[1]),
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._admit(request, str(client_address[0])):
            self.shutdown_request(request)  # over a limit: drop it unanswered
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def _admit(self, request: Any, client: str) -> bool:
        with self._open_lock:
            clients = [c for c, _ in self._open.values()]
            if (
                len(clients) >= MAX_CONNECTIONS
                or clients.count(client) >= MAX_CONNECTIONS_PER_CLIENT
            ):
                return False
            self._open[request] = (client, time.monotonic() + REQUEST_DEADLINE_S)
            return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)

    def service_actions(self) -> None:
        """Cut off connections past their deadline (called every poll)."""
        now = time.monotonic()
        with self._open_lock:
            expired = [r for r, (_, deadline) in self._open.items() if deadline < now]
        for request in expired:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)  # its thread then ends

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or was cut off: not the operator's concern."""
        log.debug("health_request_failed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.0"  # one request per connection: slots free fast

    def version_string(self) -> str:
        return f"cio-worker/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log; say nothing."""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            status, content_type, body = self.server.responder.answer(
                path, self.headers.get("Accept")
            )
        except Exception:
            log.error("health_answer_failed", path=path, exc_info=True)
            status, content_type = 500, "application/json"
            body = _dumps({"error": "internal error"})
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)
