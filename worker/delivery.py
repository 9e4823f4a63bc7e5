"""Delivering one batch: retries, splitting, and which entries the API refused.

Entries go to ``POST /api/v2/batch``, except anonymous events, which the v2
batch cannot carry: each is sent alone to ``POST /api/v1/events``, in its place
in the batch's order.

Only the API's word about an entry's data dead-letters it: a 207 error for that
entry, a 400 for a request holding that entry alone, or a 413 for that entry
alone. Everything else (connection errors, timeouts, 408, 429, 5xx, 401, 403)
is retried with exponential backoff and jitter until it works or the worker
shuts down, so an outage pauses delivery and never turns good records into dead
letters. A whole-request 400 or 413 for several entries is bisected, and so is a
207 whose errors name no entry, none at all, or one outside the request; re-sending is
harmless because identify is idempotent and every event carries an id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_never
from tenacity.wait import wait_random_exponential

from worker.errors import CredentialsError, TransientError, WorkerError
from worker.mapping import anonymous_body, is_anonymous
from worker.metrics import Metrics
from worker.ratelimit import RateLimiter
from worker.track import BatchResponse, ThrottledError, TrackClient

log = structlog.get_logger(__name__)

FIRST_RETRY_WAIT_S = 0.5
CREDENTIALS_PROBE_MAX_S = 10.0


class AbandonedError(WorkerError):
    """Shutdown began while a batch was still being retried; nothing is settled."""


@dataclass(frozen=True, slots=True)
class ApiRejection:
    """The API's reason for refusing one entry."""

    reason: str
    field: str | None
    message: str


@dataclass(slots=True)
class Outcome:
    """How a batch ended: the refused entries by index, and what it took."""

    rejected: dict[int, ApiRejection] = field(default_factory=dict)
    requests: int = 0
    attempts: int = 0
    rate_wait_s: float = 0.0
    last_status: int = 0
    latency_s: float = 0.0


class Deliverer:
    """Sends batches with retries; one instance is shared by the sender threads."""

    def __init__(
        self,
        client: TrackClient,
        stop: threading.Event,
        *,
        max_wait_s: float = 30.0,
        retry_after_max_s: float = 120.0,
        limiter: RateLimiter | None = None,
        metrics: Metrics | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._client = client
        self._stop = stop
        self._max_wait_s = max_wait_s
        self._retry_after_max_s = retry_after_max_s
        self._limiter = limiter
        self._sleep = sleep or self._interruptible_sleep
        self._backoff = wait_random_exponential(
            multiplier=FIRST_RETRY_WAIT_S, max=max_wait_s
        )
        self.credentials_failing = threading.Event()

    def deliver(self, entries: list[bytes], **context: Any) -> Outcome:
        """Send the entries; return which were refused. Raises AbandonedError.

        Anonymous events go one by one to ``/api/v1/events``, everything else in
        v2 batches; runs are sent in entry order, so the partition's order holds.
        """
        outcome = Outcome()
        base = 0
        for anonymous, run in _runs(entries):
            if anonymous:
                for index, entry in enumerate(run):
                    self._send_anonymous(entry, base + index, outcome, context)
            else:
                self._send(run, base, outcome, context)
            base += len(run)
        return outcome

    def _send_anonymous(
        self, entry: bytes, index: int, outcome: Outcome, context: dict[str, Any]
    ) -> None:
        body = anonymous_body(entry)
        response = self._post(
            body, 1, self._client.post_anonymous_event, outcome, context
        )
        if response.status != 200:
            outcome.rejected[index] = _single_rejection(response)

    def _send(
        self, entries: list[bytes], base: int, outcome: Outcome, context: dict[str, Any]
    ) -> None:
        body = b'{"batch":[' + b",".join(entries) + b"]}"
        response = self._post(
            body, len(entries), self._client.post_batch, outcome, context
        )
        misplaced = any(not 0 <= i < len(entries) for i in response.errors)
        # A 207 says some entry failed; one that names none cannot be trusted.
        unexplained = response.status == 207 and not response.errors
        if (
            response.status in (200, 207)
            and not response.unattributed_errors
            and not misplaced
            and not unexplained
        ):
            for index, error in response.errors.items():
                outcome.rejected[base + index] = _rejection(error)
            return

        if len(entries) == 1:
            outcome.rejected[base] = _single_rejection(response)
            return
        # A whole-request answer, or errors that name no entry: find the culprits.
        middle = len(entries) // 2
        log.warning(
            "batch_bisected", status=response.status, entries=len(entries), **context
        )
        self._send(entries[:middle], base, outcome, context)
        self._send(entries[middle:], base + middle, outcome, context)

    def _post(
        self,
        body: bytes,
        entry_count: int,
        post: Callable[[bytes], BatchResponse],
        outcome: Outcome,
        context: dict[str, Any],
    ) -> BatchResponse:
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=self._wait,
            stop=stop_never,
            sleep=self._sleep,
            before_sleep=lambda state: self._log_retry(state, context),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if self._stop.is_set():
                    raise AbandonedError("shutdown during delivery")
                if self._limiter is not None:
                    waited = self._limiter.acquire(self._sleep)
                    outcome.rate_wait_s += waited
                    if waited and self._metrics is not None:
                        self._metrics.record_rate_limit_wait(waited)
                outcome.attempts += 1
                response = post(body)
        self.credentials_failing.clear()
        if self._metrics is not None:
            self._metrics.observe_request(
                response.status, response.latency_s, entry_count, len(body)
            )
        outcome.requests += 1
        outcome.last_status = response.status
        outcome.latency_s += response.latency_s
        return response

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, ThrottledError):
            if error.status == 429 and self._limiter is not None:
                self._limiter.throttled()
            if error.retry_after_s is not None:
                return min(error.retry_after_s, self._retry_after_max_s)
        backoff = float(self._backoff(state))
        if isinstance(error, CredentialsError):
            # Probe often enough that a fixed key is noticed within seconds.
            return min(backoff, CREDENTIALS_PROBE_MAX_S)
        return backoff

    def _log_retry(self, state: RetryCallState, context: dict[str, Any]) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait_s = round(state.upcoming_sleep, 3)
        if self._metrics is not None and error is not None:
            self._metrics.record_retry(error, wait_s)
        if isinstance(error, CredentialsError):
            self.credentials_failing.set()
            log.error(
                "delivery_paused_credentials",
                attempt=state.attempt_number,
                wait_s=wait_s,
                error=str(error),
                **context,
            )
            return
        log.warning(
            "batch_retry",
            attempt=state.attempt_number,
            wait_s=wait_s,
            status=getattr(error, "status", None),
            error=str(error),
            **context,
        )

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise AbandonedError("shutdown during a retry wait")


def _runs(entries: list[bytes]) -> list[tuple[bool, list[bytes]]]:
    """The entries cut into runs of anonymous events and of batch entries."""
    runs: list[tuple[bool, list[bytes]]] = []
    for entry in entries:
        anonymous = is_anonymous(entry)
        if runs and runs[-1][0] == anonymous:
            runs[-1][1].append(entry)
        else:
            runs.append((anonymous, [entry]))
    return runs


def _rejection(error: dict[str, Any]) -> ApiRejection:
    return ApiRejection(
        reason=str(error.get("reason") or "api_refused"),
        field=error.get("field"),
        message=str(error.get("message") or "refused by the Track API"),
    )


def _single_rejection(response: BatchResponse) -> ApiRejection:
    if response.status == 413:
        return ApiRejection(
            "entry_too_large", None, "the Track API refused the entry as too large"
        )
    if response.errors:
        return _rejection(next(iter(response.errors.values())))
    return ApiRejection(
        "api_refused",
        None,
        response.request_error or f"the Track API answered {response.status}",
    )
