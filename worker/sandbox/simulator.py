"""A local HTTP simulator of the Customer.io Track API, as used by this worker.

It serves ``POST /api/v2/batch``, ``POST /api/v1/events`` (anonymous events) and
``GET /api/v1/accounts/region`` behind HTTP Basic auth, validates every batch
entry and anonymous event with :mod:`worker.sandbox.simulator_rules`,
keeps the resulting people and events in memory, and can inject faults (error
statuses, Retry-After, latency) and a token-bucket rate limit. Unauthenticated
control endpoints under ``/__sim/`` expose the state to tests and the demo.

Run standalone with ``python -m worker.sandbox.simulator --port 8089``; the site id
and API key come from ``CIO_SITE_ID`` and ``CIO_API_KEY``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast
from urllib.parse import urlsplit

from worker.sandbox.simulator_rules import (
    identifier_of,
    parse_batch,
    parse_fault_specs,
    parse_json,
    validate_anonymous_event,
    validate_entry,
)

JSON = dict[str, Any]
REGION_URLS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
CONTROL_LIMIT = 1_000_000
DRAIN_LIMIT = 16 * 1024 * 1024
_CHUNK = 65_536


@dataclass(frozen=True)
class Fault:
    """One scripted answer for the next ``count`` batch requests.

    A status other than 200 is answered without applying anything; 200 with a
    ``delay_s`` processes the batch normally after sleeping (a latency spike).
    """

    status: int
    count: int = 1
    retry_after: str | None = None
    delay_s: float = 0.0
    duration_s: float = 0.0  # > 0: every request for this long, count ignored


@dataclass
class Reply:
    """An HTTP answer produced by the simulator core, independent of the socket."""

    status: int
    body: JSON
    headers: dict[str, str] = field(default_factory=dict)


_COUNTERS = (
    "requests",
    "entries_received",
    "entries_accepted",
    "entries_rejected",
    "duplicate_events",
    "anonymous_events",
    "identify_calls",
    "suppressed_ignored",
    "rate_limited",
    "faults_served",
    "max_request_bytes_seen",
    "bytes_received",
)


def _new_stats() -> JSON:
    """Return zeroed counters; the key set is part of the snapshot contract."""
    return {**dict.fromkeys(_COUNTERS, 0), "responses": {}}


def person_key(kind: str, value: str) -> str:
    """Key a profile by identifier type and value; emails are case-insensitive."""
    return f"{kind}:{value.lower() if kind == 'email' else value}"


def _meta_reply(
    status: int, message: str, headers: dict[str, str] | None = None
) -> Reply:
    """A non-batch error answer in the ``{"meta": {"error": message}}`` form."""
    return Reply(status, {"meta": {"error": message}}, headers or {})


def _batch_error(message: str) -> Reply:
    """A 400 for a body that is not a usable ``{"batch": [...]}`` object."""
    error = {"reason": "invalid", "field": "batch", "message": message}
    return Reply(400, {"errors": [error]})


class TrackSimulator:
    """In-memory Track API with fault injection; all state sits behind one lock."""

    def __init__(
        self,
        site_id: str,
        api_key: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "us",
        max_entry_bytes: int = 32_000,
        max_request_bytes: int = 500_000,
        rate_limit_rps: float | None = None,
    ) -> None:
        """Configure the simulator; nothing is bound until :meth:`start`."""
        if region not in REGION_URLS:
            raise ValueError(f"region must be one of {sorted(REGION_URLS)}")
        if rate_limit_rps is not None and rate_limit_rps <= 0:
            raise ValueError("rate_limit_rps must be positive")
        self._credentials = f"{site_id}:{api_key}".encode()
        self._address = (host, port)
        self.region = region
        self.max_entry_bytes = max_entry_bytes
        self.max_request_bytes = max_request_bytes
        self.rate_limit_rps = rate_limit_rps
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._reset_locked()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> TrackSimulator:
        """Bind and serve in a daemon thread; returns self for chaining."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = _Server(self._address, _Handler, self)
        self._thread = threading.Thread(  # short poll: stop() returns promptly
            target=self._server.serve_forever,
            args=(0.05,),
            name="track-sim",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections and release the socket."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> TrackSimulator:
        """Start on entering a ``with`` block."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop on leaving a ``with`` block."""
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- state -----------------------------------------------------------------

    def _reset_locked(self) -> None:
        """Forget every person, event, counter and fault; caller holds the lock."""
        self._people: dict[str, JSON] = {}
        self._identify_counts: Counter[str] = Counter()
        self._events: list[JSON] = []
        self._seen_ids: set[str] = set()
        self._received_ids: Counter[str] = Counter()
        self._suppressed: set[str] = set()
        self._faults: list[list[Any]] = []
        self._stats = _new_stats()
        self._tokens = float(self._bucket_capacity())
        self._refilled_at = time.monotonic()

    def reset(self) -> None:
        """Forget all state and faults, as if freshly started."""
        with self._lock:
            self._reset_locked()

    def inject(self, faults: list[Fault]) -> None:
        """Queue faults; each answers the next ``count`` batch requests in order."""
        with self._lock:
            # A timed fault's clock starts when it reaches the head of the queue.
            self._faults.extend(
                [fault, fault.count, -1.0 if fault.duration_s else None]
                for fault in faults
                if fault.count > 0
            )

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    def people(self) -> dict[str, JSON]:
        """Copy of the profiles: person key -> merged attributes."""
        return cast(dict[str, JSON], self.snapshot()["people"])

    def events(self) -> list[JSON]:
        """Copy of the accepted events in acceptance order."""
        return cast(list[JSON], self.snapshot()["events"])

    @property
    def stats(self) -> JSON:
        """Copy of the counters described in :meth:`snapshot`, without copying
        the people and events (cheap enough to poll under load)."""
        with self._lock:
            return cast(JSON, json.loads(json.dumps(self._stats)))

    def snapshot(self) -> JSON:
        """A JSON-able deep copy of people, events, counters and pending faults."""
        with self._lock:
            state = {
                "people": self._people,
                "events": self._events,
                "stats": self._stats,
                "received_event_ids": dict(self._received_ids),
                "identify_counts": dict(self._identify_counts),
                "suppressed": sorted(self._suppressed),
                "pending_faults": [
                    {**asdict(fault), "count": left} for fault, left, _ in self._faults
                ],
            }
            return cast(JSON, json.loads(json.dumps(state)))

    # -- request handling (socket-free core) -----------------------------------

    def authorized(self, header: str | None) -> bool:
        """True when ``header`` is Basic auth for this site id and key."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            supplied = base64.b64decode(token.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(supplied, self._credentials)

    def region_reply(self) -> Reply:
        """Answer the region lookup for the configured region."""
        url = REGION_URLS[self.region]
        return Reply(200, {"url": url, "region": self.region, "environment_id": 1})

    def _bucket_capacity(self) -> float:
        """Burst size of the rate limit; at least one request so it can ever pass."""
        return max(1.0, self.rate_limit_rps or 0.0)

    def _take_token_locked(self) -> bool:
        """Refill the bucket by elapsed time and take one token if available."""
        if self.rate_limit_rps is None:
            return True
        now = time.monotonic()
        elapsed, self._refilled_at = now - self._refilled_at, now
        self._tokens = min(
            self._bucket_capacity(), self._tokens + elapsed * self.rate_limit_rps
        )
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _next_fault_locked(self) -> Fault | None:
        """Pop one use of the head fault, dropping it once its count is spent."""
        while self._faults and self._faults[0][2] is not None:
            if self._faults[0][2] < 0:
                self._faults[0][2] = time.monotonic() + self._faults[0][0].duration_s
            if time.monotonic() < self._faults[0][2]:
                self._stats["faults_served"] += 1
                return cast(Fault, self._faults[0][0])
            self._faults.pop(0)  # a timed fault that has run its course
        if not self._faults:
            return None
        head = self._faults[0]
        head[1] -= 1
        if head[1] <= 0:
            self._faults.pop(0)
        self._stats["faults_served"] += 1
        return cast(Fault, head[0])

    def _admit(self, auth: str | None) -> Reply | None:
        """Apply auth, faults and rate limit; a Reply means refuse without applying."""
        if not self.authorized(auth):
            return _meta_reply(401, "Unauthorized request")
        with self._lock:
            fault = self._next_fault_locked()
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.status != 200:
                retry = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                return _meta_reply(fault.status, f"simulated {fault.status}", retry)
        with self._lock:
            if not self._take_token_locked():
                self._stats["rate_limited"] += 1
                return _meta_reply(429, "rate limit exceeded", {"Retry-After": "1"})
        return None

    def batch_reply(
        self, auth: str | None, content_type: str | None, body: bytes | None, size: int
    ) -> Reply:
        """Answer one batch request; ``body`` is None when it was over the limit."""
        with self._lock:
            self._stats["requests"] += 1
            self._stats["bytes_received"] += size
            self._stats["max_request_bytes_seen"] = max(
                self._stats["max_request_bytes_seen"], size
            )
        reply = self._batch_outcome(auth, content_type, body, size)
        with self._lock:
            responses = self._stats["responses"]
            responses[str(reply.status)] = responses.get(str(reply.status), 0) + 1
        return reply

    def _batch_outcome(
        self, auth: str | None, content_type: str | None, body: bytes | None, size: int
    ) -> Reply:
        """Run the refusal checks in order, then validate and apply the entries."""
        refused = self._refusal(auth, content_type, body, size)
        if refused is not None:
            return refused
        batch, problem = parse_batch(cast(bytes, body))
        return _batch_error(problem) if problem else self._apply_batch(batch)

    def _refusal(
        self, auth: str | None, content_type: str | None, body: bytes | None, size: int
    ) -> Reply | None:
        """Auth, faults, rate limit, size and content type, in that order."""
        refused = self._admit(auth)
        if refused is not None:
            return refused
        if body is None:
            message = f"request of {size} bytes exceeds {self.max_request_bytes} bytes"
            error = {"reason": "request_too_large", "message": message}
            return Reply(413, {"errors": [error]})
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return _batch_error("content type must be application/json")
        return None

    def anonymous_event_reply(
        self, auth: str | None, content_type: str | None, body: bytes | None, size: int
    ) -> Reply:
        """Answer ``POST /api/v1/events``: one anonymous event, 200 or a 400.

        Faults and the rate limit apply as to batches; the event is recorded
        under the person key ``anonymous:<anonymous_id>`` and its ``id`` drops
        repeats as batch events do.
        """
        with self._lock:
            self._stats["requests"] += 1
            self._stats["bytes_received"] += size
        reply = self._refusal(auth, content_type, body, size)
        if reply is None:
            event, problem = parse_json(cast(bytes, body))
            found = validate_anonymous_event(event, self.max_entry_bytes)
            if problem or found:
                message = problem or "; ".join(
                    f"{e['field']}: {e['message']}" for e in found
                )
                reply = _meta_reply(400, message)
            else:
                reply = self._apply_anonymous(event)
        with self._lock:
            responses = self._stats["responses"]
            responses[str(reply.status)] = responses.get(str(reply.status), 0) + 1
        return reply

    def _apply_anonymous(self, event: JSON) -> Reply:
        entry = {**event, "attributes": event.get("data", {})}
        with self._lock:
            self._stats["anonymous_events"] += 1
            if "id" in entry:
                self._received_ids[entry["id"].upper()] += 1
            key = f"anonymous:{event.get('anonymous_id', '')}"
            self._record_event_locked(key, entry, create_person=False)
        return Reply(200, {})

    def _apply_batch(self, batch: list[Any]) -> Reply:
        """Validate each entry independently and apply the valid ones in order."""
        errors: list[JSON] = []
        with self._lock:
            self._stats["entries_received"] += len(batch)
            for index, entry in enumerate(batch):
                found = validate_entry(entry, self.max_entry_bytes)
                if found:
                    self._stats["entries_rejected"] += 1
                    errors.extend({"batch_index": index, **err} for err in found)
                else:
                    self._stats["entries_accepted"] += 1
                    self._apply_locked(entry)
        return Reply(207, {"errors": errors}) if errors else Reply(200, {})

    def _apply_locked(self, entry: JSON) -> None:
        """Apply one valid entry to the stored state; caller holds the lock."""
        key = person_key(*identifier_of(entry["identifiers"]))
        action = entry["action"]
        if action == "event" and "id" in entry:
            self._received_ids[entry["id"].upper()] += 1
        elif action == "identify":
            self._stats["identify_calls"] += 1
            self._identify_counts[key] += 1
        if action in ("delete", "suppress"):
            self._people.pop(key, None)
            if action == "suppress":
                self._suppressed.add(key)
        elif key in self._suppressed:
            self._stats["suppressed_ignored"] += 1
        elif action == "identify":
            self._people.setdefault(key, {}).update(entry.get("attributes", {}))
        else:
            self._record_event_locked(key, entry)

    def _record_event_locked(
        self, key: str, entry: JSON, create_person: bool = True
    ) -> None:
        """Append an event unless its id was already accepted; create the person."""
        event_id = entry.get("id")
        if event_id is not None:
            if event_id.upper() in self._seen_ids:
                self._stats["duplicate_events"] += 1
                return
            self._seen_ids.add(event_id.upper())
        if create_person:
            self._people.setdefault(key, {})
        self._events.append(
            {
                "person": key,
                "name": entry["name"],
                "id": event_id,
                "timestamp": entry.get("timestamp"),
                "attributes": entry.get("attributes", {}),
                "accepted_at": time.time(),
            }
        )

    def control_reply(self, method: str, path: str, body: bytes) -> Reply:
        """Serve ``/__sim/state``, ``/__sim/stats``, ``/__sim/reset`` and
        ``/__sim/faults``."""
        if (method, path) == ("GET", "/__sim/state"):
            return Reply(200, self.snapshot())
        if (method, path) == ("GET", "/__sim/stats"):
            return Reply(200, self.stats)
        if (method, path) == ("POST", "/__sim/reset"):
            self.reset()
            return Reply(200, {})
        if (method, path) == ("POST", "/__sim/faults"):
            try:
                faults = [Fault(**spec) for spec in parse_fault_specs(body)]
            except ValueError as exc:
                return _meta_reply(400, f"invalid faults: {exc}")
            self.inject(faults)
            return Reply(200, {"queued": len(faults)})
        return _meta_reply(404, "not found")


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server that knows its simulator and its open connections."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        simulator: TrackSimulator,
    ) -> None:
        """Bind ``address``; connections are tracked so stop() can cut them."""
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        """Bind without the reverse DNS lookup the base class performs."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, open_: bool) -> None:
        """Register or forget a client connection."""
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def close_connections(self) -> None:
        """Shut down every open connection so handler threads end promptly."""
        with self._connections_lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore client disconnects and resets; they are normal for a test server."""


class _Handler(BaseHTTPRequestHandler):
    """Maps HTTP requests onto the simulator and writes JSON replies."""

    protocol_version = "HTTP/1.1"
    # Replies go out at once: with Nagle's algorithm on, a body written after
    # its headers waited for the client's delayed ACK, about 40 ms a request.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        """Name the server in the ``Server`` header without the Python version."""
        return "TrackSimulator/1"

    @property
    def sim(self) -> TrackSimulator:
        """The simulator this connection belongs to."""
        return cast(_Server, self.server).simulator

    def setup(self) -> None:
        """Register the connection so a stopping server can close it."""
        super().setup()
        cast(_Server, self.server).track(self.connection, True)

    def finish(self) -> None:
        """Forget the connection once the handler is done with it."""
        cast(_Server, self.server).track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: per-request lines would flood test and demo output."""

    def do_GET(self) -> None:
        """Route GET requests."""
        self._route("GET")

    def do_POST(self) -> None:
        """Route POST requests."""
        self._route("POST")

    def _route(self, method: str) -> None:
        """Read the body, dispatch on method and path, and send the reply."""
        path = urlsplit(self.path).path
        batch = path == "/api/v2/batch"
        anonymous = path == "/api/v1/events"
        limit = self.sim.max_request_bytes if batch or anonymous else CONTROL_LIMIT
        framed = self._read_body(limit)
        if framed is None:
            return
        body, size = framed
        auth = self.headers.get("Authorization")
        if batch and method == "POST":
            content_type = self.headers.get("Content-Type")
            reply = self.sim.batch_reply(auth, content_type, body, size)
        elif anonymous and method == "POST":
            content_type = self.headers.get("Content-Type")
            reply = self.sim.anonymous_event_reply(auth, content_type, body, size)
        elif path == "/api/v1/accounts/region" and method == "GET":
            authorized = self.sim.authorized(auth)
            unauthorized = _meta_reply(401, "Unauthorized request")
            reply = self.sim.region_reply() if authorized else unauthorized
        elif path.startswith("/__sim/") and body is not None:
            reply = self.sim.control_reply(method, path, body)
        else:
            reply = _meta_reply(404, "not found")
        if body is None and not (batch or anonymous):
            reply = _meta_reply(413, "request body too large")
        self._send(reply)

    def _read_body(self, limit: int) -> tuple[bytes | None, int] | None:
        """Return (body, size), body None when over ``limit`` (drained, not kept).

        Returns None after answering itself when the request cannot be framed or
        the client left mid-body, so the connection closes instead of misreading
        the next request. A body too large to be worth draining also closes it.
        """
        try:
            size = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            size = -1
        if size < 0 or "Transfer-Encoding" in self.headers:
            self._send(_meta_reply(411, "a valid Content-Length is required"), True)
            return None
        if size > DRAIN_LIMIT:
            self.close_connection = True
            return None, size
        chunks, remaining = [], size
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                self.close_connection = True
                return None
            remaining -= len(chunk)
            if size <= limit:
                chunks.append(chunk)
        return (b"".join(chunks) if size <= limit else None), size

    def _send(self, reply: Reply, close: bool = False) -> None:
        """Write ``reply`` as JSON with an exact Content-Length."""
        payload = json.dumps(reply.body).encode("utf-8")
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the URL as one JSON line on stdout."""
    parser = argparse.ArgumentParser(description="Customer.io Track API simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--region", choices=sorted(REGION_URLS), default="us")
    parser.add_argument("--rate-limit-rps", type=float, default=None)
    args = parser.parse_args(argv)
    site_id, api_key = os.environ.get("CIO_SITE_ID"), os.environ.get("CIO_API_KEY")
    if not site_id or not api_key:
        print("error: set CIO_SITE_ID and CIO_API_KEY", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    simulator = TrackSimulator(
        site_id,
        api_key,
        host=args.host,
        port=args.port,
        region=args.region,
        rate_limit_rps=args.rate_limit_rps,
    )
    with simulator:
        print(json.dumps({"simulator": simulator.url}), flush=True)
        while not stopping.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
