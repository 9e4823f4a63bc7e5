"""Writer schemas from a Confluent-compatible schema registry, fetched once per id.

``GET {url}/schemas/ids/{id}`` answers ``{"schema": "<schema JSON as text>"}``,
with ``references`` when the schema uses named types registered under other
subjects: each is fetched from ``GET {url}/subjects/{subject}/versions/{version}``
(references of references too) and parsed before the schema that uses it.
A schema id names one schema forever, so an answer is kept for the life of the
process. What the answers mean for the record that carries the id:

- 200 with an Avro schema: decode with it;
- 404: the id is unknown, the record is bad data (``DecodeError``
  ``unknown_schema_id``); the answer is remembered for ``UNKNOWN_ID_TTL_S`` so
  a run of such records does not call the registry for each;
- 200 with a schema that is not Avro or cannot be parsed, or that refers to a
  subject version the registry does not have: bad data too;
- a connection error, a timeout or any other status (5xx, 429, 401...): the
  registry is at fault, not the record. The call is retried with bounded
  exponential backoff, every wait logged, and then ``TransientError`` is raised,
  so the record is never dead-lettered for an outage.

Only the consumer loop's thread decodes, so the caches need no lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import fastavro
import requests
import structlog
from fastavro.types import Schema
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from worker.errors import DecodeError, TransientError

log = structlog.get_logger(__name__)

# (status, body) of one GET; raises OSError (requests' errors are OSErrors) when
# no answer came.
HttpGet = Callable[[str], tuple[int, bytes]]

# Six attempts, 0.2 s doubling to at most 5 s: about ten seconds of outage
# ridden out before the worker is told, short enough that the consumer's
# max.poll.interval.ms (300 s) is never at risk while the loop waits.
RETRY_ATTEMPTS = 6
FIRST_RETRY_WAIT_S = 0.2
MAX_RETRY_WAIT_S = 5.0
UNKNOWN_ID_TTL_S = 60.0
MAX_UNKNOWN_IDS = 10_000
MAX_REFERENCES = 100  # schemas one writer schema may refer to, transitively
ACCEPT = "application/vnd.schemaregistry.v1+json, application/json"


class _UnavailableError(Exception):
    """The registry gave no usable answer this time; worth another try."""


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why an id's schema cannot decode records; raised afresh each time."""

    reason: str
    message: str


class SchemaRegistry:
    """Parsed writer schemas by id, from the registry at ``url``, cached."""

    def __init__(
        self,
        url: str,
        get: HttpGet,
        *,
        attempts: int = RETRY_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url.rstrip("/")
        self._get = get
        self._attempts = attempts
        self._sleep = sleep
        self._clock = clock
        self._known: dict[int, Schema | _Refusal] = {}
        self._unknown_until: dict[int, float] = {}

    def writer_schema(self, schema_id: int) -> Schema:
        """The parsed schema of an id; DecodeError or TransientError (see module)."""
        known = self._known.get(schema_id)
        if known is None:
            known = self._lookup(schema_id)
        if isinstance(known, _Refusal):
            raise DecodeError(known.reason, known.message)
        return known

    def _lookup(self, schema_id: int) -> Schema | _Refusal:
        if self._clock() < self._unknown_until.get(schema_id, float("-inf")):
            return _unknown(schema_id)
        payload = self._fetch(f"/schemas/ids/{schema_id}", f"schema id {schema_id}")
        if payload is None:
            if len(self._unknown_until) >= MAX_UNKNOWN_IDS:
                self._unknown_until.clear()
            self._unknown_until[schema_id] = self._clock() + UNKNOWN_ID_TTL_S
            return _unknown(schema_id)
        result = self._parse_answer(schema_id, payload)
        self._known[schema_id] = result
        refused = result.reason if isinstance(result, _Refusal) else None
        log.info("writer_schema_fetched", schema_id=schema_id, refused=refused)
        return result

    def _fetch(self, path: str, what: str) -> dict[str, Any] | None:
        """The registry's answer at a path, None for a 404; retried (see module)."""
        retrying = Retrying(
            retry=retry_if_exception_type(_UnavailableError),
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(
                multiplier=FIRST_RETRY_WAIT_S, max=MAX_RETRY_WAIT_S
            ),
            sleep=self._sleep,
            before_sleep=lambda state: _log_retry(state, what),
            reraise=True,
        )
        try:
            return retrying(self._fetch_once, path)
        except _UnavailableError as exc:
            raise TransientError(
                f"schema registry gave no answer for {what} after "
                f"{self._attempts} attempts ({exc}); no record was dead-lettered, "
                "check that the registry is up and CIO_SCHEMAS__REGISTRY_URL"
            ) from exc

    def _fetch_once(self, path: str) -> dict[str, Any] | None:
        try:
            status, body = self._get(self._url + path)
        except OSError as exc:
            raise _UnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if status == 404:
            return None
        if status != 200:
            raise _UnavailableError(f"status {status}")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise _UnavailableError("an answer that is not JSON") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("schema"), str):
            raise _UnavailableError("an answer without a schema")
        return payload

    def _parse_answer(
        self, schema_id: int, payload: dict[str, Any]
    ) -> Schema | _Refusal:
        refused = _not_avro(schema_id, payload)
        if refused is not None:
            return refused
        named: dict[str, Any] = {}
        references = payload.get("references")
        refused = self._load_references(schema_id, references, named, set())
        if refused is not None:
            return refused
        parsed = _parse(schema_id, payload["schema"], named)
        if not references or isinstance(parsed, _Refusal):
            return parsed
        # Resolution against the reader schema needs each named type defined
        # where the writer first uses it, as in a schema written in one piece.
        return _parse(schema_id, json.dumps(_inline(parsed, named, set())), {})

    def _load_references(
        self,
        schema_id: int,
        references: Any,
        named: dict[str, Any],
        loaded: set[tuple[str, int]],
    ) -> _Refusal | None:
        """Parse the referenced schemas into ``named``, deepest first.

        Each reference names a subject and version; its schema may refer to
        others in turn. A subject and version is loaded once, which also ends
        any cycle.
        """
        for reference in references or []:
            subject = reference.get("subject") if isinstance(reference, dict) else None
            version = reference.get("version") if isinstance(reference, dict) else None
            if not isinstance(subject, str) or type(version) is not int:
                return _Refusal(
                    "bad_schema_reference",
                    f"schema id {schema_id} has a reference without a subject and "
                    f"version: {json.dumps(reference)[:200]}",
                )
            if (subject, version) in loaded:
                continue
            if len(loaded) >= MAX_REFERENCES:
                return _Refusal(
                    "bad_schema_reference",
                    f"schema id {schema_id} refers to more than {MAX_REFERENCES} "
                    "schemas",
                )
            loaded.add((subject, version))
            what = f"subject {subject!r} version {version}"
            path = f"/subjects/{quote(subject, safe='')}/versions/{version}"
            payload = self._fetch(path, what)
            if payload is None:
                return _Refusal(
                    "unknown_schema_reference",
                    f"schema id {schema_id} refers to {what}, which is not in the "
                    "schema registry",
                )
            refused = _not_avro(schema_id, payload) or self._load_references(
                schema_id, payload.get("references"), named, loaded
            )
            if refused is not None:
                return refused
            parsed = _parse(schema_id, payload["schema"], named)
            if isinstance(parsed, _Refusal):
                return parsed
        return None


def http_getter(
    username: str = "", password: str = "", timeout_s: float = 5.0
) -> HttpGet:
    """A ``requests`` getter, with basic auth when a username is given."""
    session = requests.Session()
    if username:
        session.auth = (username, password)
    session.headers["Accept"] = ACCEPT

    def get(url: str) -> tuple[int, bytes]:
        response = session.get(url, timeout=timeout_s)
        return response.status_code, response.content

    return get


def _not_avro(schema_id: int, payload: dict[str, Any]) -> _Refusal | None:
    kind = payload.get("schemaType", "AVRO")
    if kind == "AVRO":
        return None
    return _Refusal(
        "not_avro_schema",
        f"schema id {schema_id} is a {kind} schema; this topic takes Avro",
    )


def _parse(schema_id: int, text: str, named: dict[str, Any]) -> Schema | _Refusal:
    """Parse a schema's text; types it names come from ``named``, where the
    named types it defines are added."""
    try:
        return fastavro.parse_schema(json.loads(text), named)
    except Exception as exc:  # fastavro raises many kinds for a malformed schema
        return _Refusal(
            "bad_writer_schema",
            f"schema id {schema_id} is not a valid Avro schema: "
            f"{type(exc).__name__}: {exc}",
        )


def _inline(schema: Any, named: dict[str, Any], defined: set[str]) -> Any:
    """A parsed schema as one self-contained schema: each named type referred to
    by name is written out in full where it is first used, later uses keep the
    name (which also leaves recursive types as they are)."""
    if isinstance(schema, str):
        if schema in named and schema not in defined:
            return _inline(named[schema], named, defined)
        return schema
    if isinstance(schema, list):
        return [_inline(branch, named, defined) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: v for k, v in schema.items() if not k.startswith("__")}
    if schema.get("type") in ("record", "error", "enum", "fixed"):
        defined.add(schema["name"])
    if "fields" in schema:
        result["fields"] = [
            {**f, "type": _inline(f["type"], named, defined)} for f in schema["fields"]
        ]
    for key in ("items", "values"):
        if key in schema:
            result[key] = _inline(schema[key], named, defined)
    if isinstance(schema.get("type"), dict | list):
        result["type"] = _inline(schema["type"], named, defined)
    return result


def _unknown(schema_id: int) -> _Refusal:
    return _Refusal(
        "unknown_schema_id",
        f"schema id {schema_id} is not in the schema registry: the producer used "
        "another registry, or the schema was deleted",
    )


def _log_retry(state: RetryCallState, what: str) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "schema_registry_retry",
        schema=what,
        attempt=state.attempt_number,
        wait_s=round(state.upcoming_sleep, 3),
        error=str(error),
    )
