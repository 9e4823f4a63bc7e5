"""The Customer.io Track API client: one pooled session, Basic auth, and the
classification of every response into what the caller does next.

This module makes single HTTP calls and translates failures into the worker's
errors; retrying and splitting batches belong to ``delivery``.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from worker import __version__
from worker.errors import CredentialsError, TransientError

# Statuses that say "try again later", never "this data is bad".
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 522, 524})
CREDENTIAL_STATUSES = frozenset({401, 403})
BATCH_PATH = "/api/v2/batch"
ANONYMOUS_EVENT_PATH = "/api/v1/events"


@dataclass(frozen=True, slots=True)
class BatchResponse:
    """What the API said about one batch request.

    ``errors`` maps a 0-based entry index to the API's error for that entry
    (a 207 answer); ``request_error`` carries a whole-request 400's message.
    """

    status: int
    latency_s: float
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)
    unattributed_errors: int = 0
    request_error: str = ""


class ThrottledError(TransientError):
    """A 408, 429 or 5xx answer; ``retry_after_s`` is the server's hint, if any."""

    def __init__(self, status: int, retry_after_s: float | None) -> None:
        super().__init__(f"Track API answered {status}; retrying later")
        self.status = status
        self.retry_after_s = retry_after_s


class TrackClient:
    """Calls the Track API with a site id and API key; safe across threads."""

    def __init__(
        self,
        url: str,
        site_id: str,
        api_key: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        pool_size: int = 8,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._session = requests.Session()
        self._session.auth = (site_id, api_key)
        self._session.headers.update(
            {
                "Content-Type": "application/json",
                "User-Agent": f"cio-worker/{__version__}",
            }
        )
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    def region(self) -> dict[str, Any]:
        """``GET /api/v1/accounts/region``: the workspace's region and host."""
        response = self._request("GET", "/api/v1/accounts/region")
        if response.status_code in CREDENTIAL_STATUSES:
            raise CredentialsError(
                f"Track API refused the site id and API key ({response.status_code}); "
                "check CIO_SITE_ID and CIO_API_KEY"
            )
        if response.status_code != 200:
            raise TransientError(f"region lookup answered {response.status_code}")
        result: dict[str, Any] = response.json()
        return result

    def post_batch(self, body: bytes) -> BatchResponse:
        """``POST /api/v2/batch``; returns 200, 207, 400 or 413 answers.

        Raises ThrottledError for 408/429/5xx, CredentialsError for 401/403 and
        TransientError for connection failures, timeouts and any other status.
        """
        return self._post(BATCH_PATH, body)

    def post_anonymous_event(self, body: bytes) -> BatchResponse:
        """``POST /api/v1/events``, one anonymous event; answers and raises as
        ``post_batch`` does (a 400 or 413 refuses the one event)."""
        return self._post(ANONYMOUS_EVENT_PATH, body)

    def _post(self, path: str, body: bytes) -> BatchResponse:
        started = time.monotonic()
        response = self._request("POST", path, data=body)
        latency_s = time.monotonic() - started
        status = response.status_code
        if status in (200, 207):
            return BatchResponse(status, latency_s, *_entry_errors(response))
        if status in (400, 413):
            return BatchResponse(status, latency_s, request_error=_text(response))
        if status in CREDENTIAL_STATUSES:
            error = CredentialsError(
                f"Track API refused the site id and API key ({status}); delivery is "
                "paused until CIO_SITE_ID and CIO_API_KEY are valid"
            )
            error.status = status
            raise error
        if status in RETRYABLE_STATUSES:
            raise ThrottledError(status, parse_retry_after(response.headers))
        raise TransientError(f"Track API answered {status}: {_text(response)}")

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            return self._session.request(
                method, self.url + path, timeout=self._timeout, **kwargs
            )
        except requests.RequestException as exc:
            # The exception text never holds the credentials: they travel in a
            # header, and the URL carries none.
            raise TransientError(
                f"Track API unreachable: {type(exc).__name__}"
            ) from exc


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), or None."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (now if now is not None else time.time()))


def _entry_errors(response: requests.Response) -> tuple[dict[int, dict[str, Any]], int]:
    """Per-entry errors keyed by batch_index, and how many named no index."""
    try:
        payload = response.json()
    except ValueError:
        return {}, 0
    errors: dict[int, dict[str, Any]] = {}
    unattributed = 0
    for error in payload.get("errors") or [] if isinstance(payload, dict) else []:
        index = error.get("batch_index") if isinstance(error, dict) else None
        if isinstance(index, int) and not isinstance(index, bool):
            errors[index] = error
        else:
            unattributed += 1
    return errors, unattributed


def _text(response: requests.Response) -> str:
    try:
        return json.dumps(response.json(), separators=(",", ":"))[:500]
    except ValueError:
        return response.text[:500]
