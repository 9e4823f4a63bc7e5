"""A tiny Confluent-compatible schema registry on loopback, for the integration tier.

It serves ``GET /schemas/ids/{id}`` and ``GET /subjects/{subject}/versions/{n}``
from dicts, answers 404 for an unknown id or subject version and 401 when basic
auth is required and missing or wrong, like the real one.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote

_PATH = re.compile(r"/schemas/ids/([0-9]+)")
_SUBJECT_PATH = re.compile(r"/subjects/([^/]+)/versions/([0-9]+)")
Reference = dict[str, Any]  # {"name": ..., "subject": ..., "version": ...}


class RegistryStub:
    """Serves schemas by id on 127.0.0.1 and a free port until closed."""

    def __init__(
        self,
        schemas: dict[int, Any],
        *,
        schema_types: dict[int, str] | None = None,
        references: dict[int, list[Reference]] | None = None,
        subjects: dict[tuple[str, int], tuple[Any, list[Reference]]] | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        self.schemas = schemas
        self.schema_types = schema_types or {}
        self.references = references or {}
        self.subjects = subjects or {}
        self.requests: list[tuple[str, int]] = []
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._expected_auth = f"Basic {token}" if username else None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RegistryStub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, path: str, authorization: str | None) -> tuple[int, Any]:
        """The status and JSON body for one GET (socket-free, for reading)."""
        if self._expected_auth and authorization != self._expected_auth:
            return 401, {"error_code": 401, "message": "Unauthorized"}
        by_subject = _SUBJECT_PATH.fullmatch(path)
        if by_subject is not None:
            subject = unquote(by_subject.group(1))
            found = self.subjects.get((subject, int(by_subject.group(2))))
            if found is None:
                return 404, {"error_code": 40402, "message": "Version not found"}
            schema, references = found
            body = {"subject": subject, "schema": json.dumps(schema)}
            return 200, {**body, "references": references} if references else body
        match = _PATH.fullmatch(path)
        if match is None or int(match.group(1)) not in self.schemas:
            return 404, {"error_code": 40403, "message": "Schema not found"}
        schema_id = int(match.group(1))
        schema = self.schemas[schema_id]
        body = {"schema": schema if isinstance(schema, str) else json.dumps(schema)}
        if schema_id in self.schema_types:
            body["schemaType"] = self.schema_types[schema_id]
        if schema_id in self.references:
            body["references"] = self.references[schema_id]
        return 200, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = stub.answer(self.path, self.headers.get("Authorization"))
                stub.requests.append((self.path, status))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "application/vnd.schemaregistry.v1+json"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test asserts on stub.requests instead

        return Handler
