"""A minimal stand-in for the Track API v1 calls the official client makes.

The worker's simulator serves only ``POST /api/v2/batch``; the ``customerio``
client's ``identify`` and ``track`` call v1 endpoints. This stub answers those
two, behind the same Basic auth, and nothing else:

- ``PUT /api/v1/customers/{id}`` (identify): 200 ``{}``;
- ``POST /api/v1/customers/{id}/events`` (track): 200 ``{}``;
- ``GET /__stub/state``: how many of each it answered, and the body bytes.

It parses each JSON body but validates and stores nothing, so it is cheaper per
call than the real API or the simulator: a naive loop measured against it looks
faster than it would be. It runs in its own process:
``CIO_SITE_ID=s CIO_API_KEY=k python -m bench.v1stub --port 0``.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, ClassVar


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's session expects
    # Headers and body go out in two writes; with Nagle on, the body waits for
    # the client's delayed ACK (40 ms on Linux), which no real API adds.
    disable_nagle_algorithm = True
    credentials: ClassVar[bytes] = b""
    counts: ClassVar[Counter[str]] = Counter()
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: one line per request would dwarf the work measured."""

    def do_PUT(self) -> None:
        self._answer("PUT")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_GET(self) -> None:
        if self.path == "/__stub/state":
            with self.lock:
                self._send(200, dict(self.counts))
        else:
            self._send(404, {"meta": {"error": "not found"}})

    def _answer(self, method: str) -> None:
        size = int(self.headers.get("Content-Length") or "0")
        body = self.rfile.read(size)
        parts = self.path.split("?")[0].strip("/").split("/")
        if not self._authorized():
            self._send(401, {"meta": {"error": "Unauthorized request"}})
            return
        kind = _kind(method, parts)
        if kind is None:
            self._send(404, {"meta": {"error": "not found"}})
            return
        try:
            json.loads(body or b"{}")
        except ValueError:
            self._send(400, {"meta": {"error": "invalid JSON"}})
            return
        with self.lock:
            self.counts[kind] += 1
            self.counts["bytes"] += size
        self._send(200, {})

    def _authorized(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            supplied = base64.b64decode(token.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(supplied, self.credentials)

    def _send(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _kind(method: str, parts: list[str]) -> str | None:
    """identify, track, or None for any other path."""
    if parts[:3] != ["api", "v1", "customers"]:
        return None
    if method == "PUT" and len(parts) == 4:
        return "identify"
    if method == "POST" and len(parts) == 5 and parts[4] == "events":
        return "track"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.v1stub")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    site_id, api_key = os.environ.get("CIO_SITE_ID"), os.environ.get("CIO_API_KEY")
    if not site_id or not api_key:
        print("error: set CIO_SITE_ID and CIO_API_KEY", file=sys.stderr)
        return 2
    _Handler.credentials = f"{site_id}:{api_key}".encode()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    print(json.dumps({"stub": f"http://{host!s}:{port}"}), flush=True)
    server.serve_forever(0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
