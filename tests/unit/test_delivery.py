"""Unit tests of worker.delivery.Deliverer against a scripted fake TrackClient."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from worker.delivery import AbandonedError, ApiRejection, Deliverer
from worker.errors import CredentialsError, TransientError
from worker.mapping import serialize
from worker.ratelimit import RateLimiter
from worker.track import BatchResponse, ThrottledError

Step = BatchResponse | Exception | Callable[[list[dict[str, Any]]], BatchResponse]


class FakeClient:
    """A TrackClient whose answers come from a script or from a rule on the body."""

    def __init__(
        self,
        script: list[Step] | None = None,
        rule: Callable[[list[dict[str, Any]]], BatchResponse] | None = None,
    ) -> None:
        self.script = list(script or [])
        self.rule = rule
        self.bodies: list[list[dict[str, Any]]] = []
        self.on_call: Callable[[], None] | None = None
        self.calls: list[tuple[str, list[Any]]] = []
        self.anonymous_script: list[BatchResponse | Exception] = []

    def post_batch(self, body: bytes) -> BatchResponse:
        entries = json.loads(body)["batch"]
        self.bodies.append(entries)
        self.calls.append(("v2", [entry.get("n") for entry in entries]))
        if self.on_call is not None:
            self.on_call()
        step: Step | None = self.script.pop(0) if self.script else self.rule
        if step is None:
            return ok()
        if isinstance(step, Exception):
            raise step
        if isinstance(step, BatchResponse):
            return step
        return step(entries)

    def post_anonymous_event(self, body: bytes) -> BatchResponse:
        event = json.loads(body)
        self.calls.append(("v1", [event["name"]]))
        step = self.anonymous_script.pop(0) if self.anonymous_script else ok()
        if isinstance(step, Exception):
            raise step
        return step

    def sent_ids(self) -> list[list[int]]:
        return [[entry["n"] for entry in body] for body in self.bodies]


def ok() -> BatchResponse:
    return BatchResponse(200, 0.01)


def entries(count: int) -> list[bytes]:
    return [json.dumps({"n": n}).encode() for n in range(count)]


def deliverer(
    client: FakeClient,
    max_wait_s: float = 30.0,
    retry_after_max_s: float = 120.0,
    limiter: RateLimiter | None = None,
) -> tuple[Deliverer, list[float], threading.Event]:
    sleeps: list[float] = []
    stop = threading.Event()
    subject = Deliverer(
        client,  # type: ignore[arg-type]
        stop,
        max_wait_s=max_wait_s,
        retry_after_max_s=retry_after_max_s,
        limiter=limiter,
        sleep=sleeps.append,
    )
    return subject, sleeps, stop


def refuse_if_present(culprit: int, status: int) -> Callable[..., BatchResponse]:
    """Answer `status` for any request that holds the culprit entry, else 200."""

    def rule(body: list[dict[str, Any]]) -> BatchResponse:
        if any(entry["n"] == culprit for entry in body):
            return BatchResponse(status, 0.01, request_error="bad entry")
        return ok()

    return rule


def test_deliver_200_rejects_nothing() -> None:
    """A 200 answer delivers every entry in one request and one attempt."""
    client = FakeClient([ok()])
    subject, sleeps, _ = deliverer(client)

    outcome = subject.deliver(entries(3))

    assert outcome.rejected == {}
    assert (outcome.requests, outcome.attempts, outcome.last_status) == (1, 1, 200)
    assert client.sent_ids() == [[0, 1, 2]]
    assert sleeps == []


def test_deliver_207_maps_batch_index_to_entry() -> None:
    """A 207 error for batch_index 1 rejects exactly the second entry."""
    error = {"batch_index": 1, "reason": "too_long", "field": "name", "message": "x"}
    client = FakeClient([BatchResponse(207, 0.01, errors={1: error})])
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(3))

    assert outcome.rejected == {1: ApiRejection("too_long", "name", "x")}
    assert outcome.requests == 1
    assert outcome.last_status == 207


def test_deliver_207_error_without_details_uses_defaults() -> None:
    """A 207 error without reason or message gets the generic api_refused reason."""
    client = FakeClient([BatchResponse(207, 0.01, errors={0: {"batch_index": 0}})])
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(2))

    assert outcome.rejected == {
        0: ApiRejection("api_refused", None, "refused by the Track API")
    }


@pytest.mark.parametrize(
    ("count", "culprit", "requests"),
    [
        (1, 0, 1),
        (2, 1, 3),
        (4, 2, 5),
        (8, 5, 7),
        (8, 0, 7),
        (5, 4, 7),  # [0-4], [0,1], [2,3,4], [2], [3,4], [3], [4]
    ],
)
def test_deliver_400_bisects_to_single_culprit(
    count: int, culprit: int, requests: int
) -> None:
    """A whole-request 400 is split until only the culprit is rejected."""
    client = FakeClient(rule=refuse_if_present(culprit, 400))
    subject, _, _ = deliverer(client)

    with capture_logs() as logs:
        outcome = subject.deliver(entries(count), topic="persons", partition=0)

    assert outcome.rejected == {culprit: ApiRejection("api_refused", None, "bad entry")}
    assert outcome.requests == outcome.attempts == requests
    delivered = {n for body in client.sent_ids() if culprit not in body for n in body}
    assert delivered == set(range(count)) - {culprit}
    bisections = [e for e in logs if e["event"] == "batch_bisected"]
    assert all(e["log_level"] == "warning" for e in bisections)
    assert all(e["topic"] == "persons" for e in bisections)
    assert len(bisections) == (requests - 1) // 2


def test_deliver_400_two_culprits_both_rejected() -> None:
    """Two bad entries in one batch are both found and only they are rejected."""

    def rule(body: list[dict[str, Any]]) -> BatchResponse:
        bad = any(entry["n"] in (1, 6) for entry in body)
        return BatchResponse(400, 0.01) if bad else ok()

    client = FakeClient(rule=rule)
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(8))

    assert set(outcome.rejected) == {1, 6}
    assert outcome.rejected[1] == ApiRejection(
        "api_refused", None, "the Track API answered 400"
    )


def test_deliver_413_splits_until_entry_too_large() -> None:
    """A 413 is bisected like a 400 and the lone entry is rejected as too large."""
    client = FakeClient(rule=refuse_if_present(3, 413))
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(4))

    assert outcome.rejected == {
        3: ApiRejection(
            "entry_too_large", None, "the Track API refused the entry as too large"
        )
    }
    assert client.sent_ids() == [[0, 1, 2, 3], [0, 1], [2, 3], [2], [3]]
    assert outcome.requests == 5


def test_deliver_207_without_batch_index_bisects() -> None:
    """A 207 whose errors name no entry is bisected to find the entry at fault."""

    def rule(body: list[dict[str, Any]]) -> BatchResponse:
        if any(entry["n"] == 2 for entry in body):
            return BatchResponse(207, 0.01, unattributed_errors=1)
        return ok()

    client = FakeClient(rule=rule)
    subject, _, _ = deliverer(client)

    with capture_logs() as logs:
        outcome = subject.deliver(entries(3))

    assert client.sent_ids() == [[0, 1, 2], [0], [1, 2], [1], [2]]
    assert outcome.rejected == {
        2: ApiRejection("api_refused", None, "the Track API answered 207")
    }
    assert [e["status"] for e in logs if e["event"] == "batch_bisected"] == [207, 207]


def test_deliver_207_in_second_half_offsets_index() -> None:
    """A 207 on a bisected second half maps its index back to the whole batch."""
    error = {"batch_index": 0, "reason": "bad_attr", "message": "m"}
    client = FakeClient(
        [BatchResponse(400, 0.01), ok(), BatchResponse(207, 0.01, errors={0: error})]
    )
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(4))

    assert outcome.rejected == {2: ApiRejection("bad_attr", None, "m")}


@pytest.mark.parametrize(
    ("retry_after", "cap", "slept"),
    [(7.0, 120.0, 7.0), (0.0, 120.0, 0.0), (300.0, 120.0, 120.0), (12.0, 5.0, 5.0)],
)
def test_deliver_429_retry_after_honoured_and_capped(
    retry_after: float, cap: float, slept: float
) -> None:
    """A 429's Retry-After is the wait before the retry, capped at
    retry_after_max_s (not at the backoff cap, so a long hint is kept)."""
    client = FakeClient([ThrottledError(429, retry_after), ok()])
    subject, sleeps, _ = deliverer(client, max_wait_s=5.0, retry_after_max_s=cap)

    outcome = subject.deliver(entries(2))

    assert sleeps == [slept]
    assert (outcome.attempts, outcome.requests) == (2, 1)
    assert outcome.rejected == {}


def test_deliver_429_halves_the_rate_limit_and_waits_for_tokens() -> None:
    """A 429 lowers the limiter's rate; every attempt first takes a token."""
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(10.0, clock=lambda: now[0])
    client = FakeClient([ThrottledError(429, None), ok()])
    subject = Deliverer(
        client,  # type: ignore[arg-type]
        threading.Event(),
        limiter=limiter,
        sleep=sleep,
    )

    subject.deliver(entries(1))

    assert limiter.rate < 10.0
    assert len(sleeps) >= 1  # the retry backoff (a token may be waited for too)


def test_deliver_transient_errors_retried_then_delivered() -> None:
    """5xx and connection errors are retried with bounded backoff until success."""
    client = FakeClient(
        [
            ThrottledError(503, None),
            ThrottledError(500, None),
            TransientError("Track API unreachable: ConnectionError"),
            ok(),
        ]
    )
    subject, sleeps, _ = deliverer(client, max_wait_s=4.0)

    with capture_logs() as logs:
        outcome = subject.deliver(entries(2), topic="persons", partition=1)

    assert (outcome.attempts, outcome.requests) == (4, 1)
    assert outcome.rejected == {}
    assert len(sleeps) == 3
    assert all(0.0 <= s <= 4.0 for s in sleeps)
    retries = [e for e in logs if e["event"] == "batch_retry"]
    assert [e["status"] for e in retries] == [503, 500, None]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert all(e["log_level"] == "warning" for e in retries)
    assert all(e["partition"] == 1 for e in retries)


def test_deliver_attempts_count_across_bisected_requests() -> None:
    """Attempts count every post, including retries of bisected halves."""
    client = FakeClient(
        [
            BatchResponse(400, 0.01),
            ThrottledError(502, None),
            ok(),
            BatchResponse(400, 0.01, request_error="bad"),
        ]
    )
    subject, sleeps, _ = deliverer(client)

    outcome = subject.deliver(entries(2))

    assert (outcome.requests, outcome.attempts) == (3, 4)
    assert outcome.rejected == {1: ApiRejection("api_refused", None, "bad")}
    assert len(sleeps) == 1


def test_deliver_credentials_error_pauses_logs_error_then_clears() -> None:
    """401/403 are retried, logged at ERROR, and flag credentials until success."""
    client = FakeClient(
        [CredentialsError("refused (401)"), CredentialsError("refused (403)"), ok()]
    )
    subject, _, _ = deliverer(client)
    flags: list[bool] = []
    client.on_call = lambda: flags.append(subject.credentials_failing.is_set())

    with capture_logs() as logs:
        outcome = subject.deliver(entries(1), topic="persons")

    assert flags == [False, True, True]
    assert not subject.credentials_failing.is_set()
    assert outcome.rejected == {}
    assert outcome.attempts == 3
    paused = [e for e in logs if e["event"] == "delivery_paused_credentials"]
    assert [e["log_level"] for e in paused] == ["error", "error"]
    assert [e["attempt"] for e in paused] == [1, 2]
    assert all(e["topic"] == "persons" for e in paused)
    assert not [e for e in logs if e["event"] == "batch_retry"]


def test_deliver_stop_set_before_start_abandons_without_request() -> None:
    """A delivery started after shutdown began sends nothing and settles nothing."""
    client = FakeClient([ok()])
    subject, _, stop = deliverer(client)
    stop.set()

    with pytest.raises(AbandonedError):
        subject.deliver(entries(2))

    assert client.bodies == []


def test_deliver_stop_set_during_retries_abandons() -> None:
    """Shutdown during a retry loop abandons the batch instead of rejecting it."""
    client = FakeClient(rule=lambda _: ok())
    client.script = [ThrottledError(503, None)] * 3
    subject, _, stop = deliverer(client)
    client.on_call = lambda: stop.set() if len(client.bodies) == 2 else None

    with pytest.raises(AbandonedError):
        subject.deliver(entries(2))

    assert len(client.bodies) == 2


def test_deliver_stop_set_during_bisection_abandons_whole_batch() -> None:
    """Shutdown mid-bisection raises rather than returning a partial outcome."""
    client = FakeClient(rule=refuse_if_present(0, 400))
    subject, _, stop = deliverer(client)
    client.on_call = lambda: stop.set() if len(client.bodies) == 2 else None

    with pytest.raises(AbandonedError):
        subject.deliver(entries(4))

    assert client.sent_ids() == [[0, 1, 2, 3], [0, 1]]


@pytest.mark.timeout(10)
def test_deliver_default_sleep_stop_during_wait_abandons_at_once() -> None:
    """Without an injected sleep, shutdown interrupts the retry wait immediately."""
    stop = threading.Event()
    client = FakeClient([ThrottledError(429, 3600.0), ok()])
    client.on_call = stop.set
    subject = Deliverer(client, stop, max_wait_s=3600.0)  # type: ignore[arg-type]

    with pytest.raises(AbandonedError):
        subject.deliver(entries(1))

    assert len(client.bodies) == 1


def test_deliver_207_index_out_of_range_bisects_to_find_the_culprit() -> None:
    """An error naming an index outside the request is not trusted: the batch is
    bisected, and only an entry refused on its own is rejected."""
    error = {"batch_index": 9, "reason": "x"}
    client = FakeClient(
        [
            BatchResponse(207, 0.01, errors={9: error}),
            BatchResponse(200, 0.01),
            BatchResponse(207, 0.01, errors={0: {"batch_index": 0, "reason": "y"}}),
        ]
    )
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(2))

    assert list(outcome.rejected) == [1]
    assert outcome.rejected[1].reason == "y"
    assert outcome.requests == 3


def test_deliver_latency_summed_over_requests() -> None:
    """The outcome's latency is the sum of every request's latency."""
    client = FakeClient(
        [BatchResponse(400, 0.25), BatchResponse(200, 0.5), BatchResponse(200, 1.0)]
    )
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(2))

    assert outcome.latency_s == pytest.approx(1.75)
    assert outcome.last_status == 200


def test_deliver_207_without_errors_bisects_instead_of_counting_all_delivered() -> None:
    """A 207 that names no failed entry is not trusted as full success: the
    batch is bisected until each entry has a clear answer."""
    client = FakeClient(
        [
            BatchResponse(207, 0.01),
            BatchResponse(200, 0.01),
            BatchResponse(207, 0.01),
        ]
    )
    subject, _, _ = deliverer(client)

    outcome = subject.deliver(entries(2))

    assert list(outcome.rejected) == [1]
    assert outcome.requests == 3


def anonymous_entry(name: str) -> bytes:
    return serialize(
        {"type": "person", "action": "event", "anonymous_id": "cookie-1",
         "name": name, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "attributes": {}}
    )  # fmt: skip


def test_anonymous_events_sent_alone_to_v1_in_batch_order() -> None:
    """Anonymous events go one per v1 request, between the v2 runs around them."""
    client = FakeClient()
    subject, _, _ = deliverer(client)
    mixed = [*entries(2), anonymous_entry("a"), anonymous_entry("b"), *entries(1)]

    outcome = subject.deliver(mixed)

    assert client.calls == [("v2", [0, 1]), ("v1", ["a"]), ("v1", ["b"]), ("v2", [0])]
    assert outcome.rejected == {}
    assert outcome.requests == 4


def test_anonymous_event_refused_by_400_is_rejected_at_its_index() -> None:
    """A v1 400 refuses that one event, named by its place in the batch."""
    client = FakeClient()
    client.anonymous_script = [
        BatchResponse(400, 0.01, request_error='{"meta":{"error":"bad name"}}')
    ]
    subject, _, _ = deliverer(client)

    outcome = subject.deliver([*entries(1), anonymous_entry("a"), *entries(1)])

    assert list(outcome.rejected) == [1]
    assert outcome.rejected[1].reason == "api_refused"
    assert "bad name" in outcome.rejected[1].message


def test_anonymous_event_retried_on_429_and_5xx() -> None:
    """A throttled anonymous event is retried, never dead-lettered."""
    client = FakeClient()
    client.anonymous_script = [ThrottledError(429, 2.0), ThrottledError(503, None)]
    subject, sleeps, _ = deliverer(client)

    outcome = subject.deliver([anonymous_entry("a")])

    assert outcome.rejected == {}
    assert outcome.attempts == 3
    assert sleeps[0] == 2.0
    assert client.calls == [("v1", ["a"])] * 3
