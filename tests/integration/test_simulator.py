"""Integration tests of the Track API simulator over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from worker.sandbox.simulator import Fault, TrackSimulator, main

SITE, KEY = "site-123", "key-abc"
ULID_A = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
ULID_B = "01BX5ZZKBKACTAV9WEVGEMMVRZ"
Entry = dict[str, Any]


@pytest.fixture
def sim() -> Iterator[TrackSimulator]:
    """A default simulator on an ephemeral loopback port."""
    with TrackSimulator(SITE, KEY) as simulator:
        yield simulator


@pytest.fixture
def client() -> Iterator[requests.Session]:
    """A session carrying the right Basic auth, closed after the test."""
    with requests.Session() as session:
        session.auth = (SITE, KEY)
        yield session


def identify(ident: Entry, attributes: Entry | None = None, **extra: Any) -> Entry:
    """Build an identify entry."""
    entry = {"type": "person", "action": "identify", "identifiers": ident, **extra}
    if attributes is not None:
        entry["attributes"] = attributes
    return entry


def event(ident: Entry, name: str = "signed_up", **extra: Any) -> Entry:
    """Build an event entry."""
    return {
        "type": "person",
        "action": "event",
        "identifiers": ident,
        "name": name,
        **extra,
    }


def post(
    client: requests.Session, sim: TrackSimulator, entries: list[Any]
) -> requests.Response:
    """POST a batch and return the response (its body is read by the caller)."""
    return client.post(f"{sim.url}/api/v2/batch", json={"batch": entries}, timeout=10)


def post_raw(
    client: requests.Session, sim: TrackSimulator, body: bytes
) -> requests.Response:
    """POST raw bytes as a JSON batch body."""
    headers = {"Content-Type": "application/json"}
    return client.post(
        f"{sim.url}/api/v2/batch", data=body, headers=headers, timeout=10
    )


def errors_for(
    client: requests.Session, sim: TrackSimulator, entry: Any
) -> list[Entry]:
    """Send one entry; return its errors ([] when the batch was answered 200)."""
    response = post(client, sim, [entry])
    assert response.status_code in (200, 207)
    return [] if response.status_code == 200 else list(response.json()["errors"])


def test_auth_wrong_key_returns_401(sim: TrackSimulator) -> None:
    """A wrong API key is refused with the documented 401 body."""
    response = requests.post(
        f"{sim.url}/api/v2/batch",
        json={"batch": [identify({"id": "1"})]},
        auth=(SITE, "wrong"),
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json() == {"meta": {"error": "Unauthorized request"}}
    assert sim.people() == {}


def test_auth_missing_header_returns_401(sim: TrackSimulator) -> None:
    """A request without credentials is refused on both API endpoints."""
    batch = requests.post(f"{sim.url}/api/v2/batch", json={"batch": []}, timeout=10)
    region = requests.get(f"{sim.url}/api/v1/accounts/region", timeout=10)
    assert (batch.status_code, region.status_code) == (401, 401)


def test_auth_bearer_scheme_returns_401(sim: TrackSimulator) -> None:
    """Only Basic auth is accepted, not a bearer token holding the key."""
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{sim.url}/api/v1/accounts/region"
    response = requests.get(url, headers=headers, timeout=10)
    assert response.status_code == 401


def test_region_us_returns_us_track_url(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """The default simulator reports the US region and URL."""
    response = client.get(f"{sim.url}/api/v1/accounts/region", timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "url": "https://track.customer.io",
        "region": "us",
        "environment_id": 1,
    }


def test_region_eu_returns_eu_track_url(client: requests.Session) -> None:
    """A simulator configured for the EU reports the EU region and URL."""
    with TrackSimulator(SITE, KEY, region="eu") as eu:
        body = client.get(f"{eu.url}/api/v1/accounts/region", timeout=10).json()
    assert body["region"] == "eu"
    assert body["url"] == "https://track-eu.customer.io"


def test_batch_valid_entries_returns_200_and_records_state(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A fully valid batch is answered 200 {} and lands in people and events."""
    entries = [
        identify({"email": "Ada@Example.com"}, {"plan": "pro"}, timestamp=1700000000),
        identify({"email": "ada@example.com"}, {"plan": "team", "seats": 3}),
        event(
            {"id": "42"}, "paid", id=ULID_A, timestamp=1700000001, attributes={"n": 1}
        ),
    ]
    response = post(client, sim, entries)
    assert response.status_code == 200
    assert response.json() == {}
    assert sim.people() == {
        "email:ada@example.com": {"plan": "team", "seats": 3},
        "id:42": {},
    }
    [recorded] = sim.events()
    assert recorded["person"] == "id:42"
    assert (recorded["name"], recorded["id"], recorded["timestamp"]) == (
        "paid",
        ULID_A,
        1700000001,
    )
    assert recorded["attributes"] == {"n": 1}
    snapshot = sim.snapshot()
    assert snapshot["identify_counts"] == {"email:ada@example.com": 2}
    assert snapshot["stats"]["entries_accepted"] == 3
    assert snapshot["stats"]["identify_calls"] == 2


def test_batch_mixed_entries_returns_207_and_applies_valid(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """Invalid entries are reported by index while valid neighbours are applied."""
    entries = [
        identify({"id": "1"}, {"a": 1}),
        identify({"id": "2"}, {"plan": "x" * 1001}),
        event({"id": "3"}, "ok"),
        {"type": "object", "action": "identify", "identifiers": {"id": "4"}},
    ]
    response = post(client, sim, entries)
    assert response.status_code == 207
    errors = response.json()["errors"]
    assert [(e["batch_index"], e["reason"], e["field"]) for e in errors] == [
        (1, "too_long", "attributes.plan"),
        (3, "unsupported_type", "type"),
    ]
    assert (
        errors[0]["message"]
        == "value for attribute 'plan' cannot be longer than 1000 bytes"
    )
    assert set(sim.people()) == {"id:1", "id:3"}
    stats = sim.stats
    assert (stats["entries_received"], stats["entries_accepted"]) == (4, 2)
    assert stats["entries_rejected"] == 2


def test_event_name_100_ascii_bytes_accepted(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """An event name of exactly 100 bytes is within the limit."""
    assert errors_for(client, sim, event({"id": "1"}, "e" * 100)) == []


def test_event_name_108_utf8_bytes_refused(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """36 CJK characters are 108 UTF-8 bytes, over the 100-byte name limit."""
    [error] = errors_for(client, sim, event({"id": "1"}, "事" * 36))
    assert (error["reason"], error["field"]) == ("too_long", "name")
    assert error["message"] == "event name cannot be longer than 100 bytes"
    assert sim.events() == []


def test_event_name_blank_refused(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A whitespace-only event name is blank."""
    [error] = errors_for(client, sim, event({"id": "1"}, "   "))
    assert (error["field"], error["message"]) == (
        "name",
        "event name must not be blank",
    )


@pytest.mark.parametrize(("size", "accepted"), [(1000, True), (1001, False)])
def test_attribute_value_size_limit_enforced(
    sim: TrackSimulator, client: requests.Session, size: int, accepted: bool
) -> None:
    """A 1000-byte attribute value passes and a 1001-byte one is refused."""
    errors = errors_for(client, sim, identify({"id": "1"}, {"bio": "b" * size}))
    assert (errors == []) is accepted


def test_attribute_value_non_string_measured_as_json(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A list value is measured by its compact JSON length."""
    value = ["x" * 497, "y" * 497]  # compact JSON is 1001 bytes
    [error] = errors_for(client, sim, identify({"id": "1"}, {"tags": value}))
    assert error["field"] == "attributes.tags"


@pytest.mark.parametrize(("count", "accepted"), [(300, True), (301, False)])
def test_attribute_count_limit_enforced(
    sim: TrackSimulator, client: requests.Session, count: int, accepted: bool
) -> None:
    """300 attributes in one identify pass and 301 are refused."""
    attributes = {f"a{i}": i for i in range(count)}
    errors = errors_for(client, sim, identify({"id": "1"}, attributes))
    assert (errors == []) is accepted
    if not accepted:
        assert errors[0]["message"] == (
            "cannot identify more than 300 attributes in one request"
        )


@pytest.mark.parametrize(("size", "accepted"), [(150, True), (151, False)])
def test_attribute_name_size_limit_enforced(
    sim: TrackSimulator, client: requests.Session, size: int, accepted: bool
) -> None:
    """An attribute name of 150 bytes passes and one of 151 bytes is refused."""
    errors = errors_for(client, sim, identify({"id": "1"}, {"n" * size: 1}))
    assert (errors == []) is accepted


@pytest.mark.parametrize(("size", "accepted"), [(150, True), (151, False)])
def test_identifier_size_limit_enforced(
    sim: TrackSimulator, client: requests.Session, size: int, accepted: bool
) -> None:
    """An identifier of 150 bytes passes and one of 151 bytes is refused."""
    errors = errors_for(client, sim, identify({"cio_id": "c" * size}))
    assert (errors == []) is accepted
    if not accepted:
        assert (errors[0]["reason"], errors[0]["field"]) == (
            "too_long",
            "identifiers.cio_id",
        )


def test_identifier_empty_string_refused(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """An empty id is refused with the documented message."""
    [error] = errors_for(client, sim, identify({"id": ""}))
    assert error["message"] == "id attribute cannot be an empty string"


@pytest.mark.parametrize(
    "identifiers", [{}, {"id": "1", "email": "a@b.c"}, {"phone": "+1555"}, "id:1", None]
)
def test_identifiers_not_exactly_one_supported_refused(
    sim: TrackSimulator, client: requests.Session, identifiers: Any
) -> None:
    """Identifiers must be an object with exactly one of id, email, cio_id."""
    [error] = errors_for(client, sim, identify(identifiers))
    assert error["field"].startswith("identifiers")


def test_entry_over_max_entry_bytes_refused(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """An entry of valid attributes totalling over 32,000 bytes is refused."""
    attributes = {f"k{i}": "v" * 900 for i in range(40)}
    [error] = errors_for(client, sim, identify({"id": "1"}, attributes))
    assert error["reason"] == "entry_too_large"
    assert sim.people() == {}


@pytest.mark.parametrize(
    ("entry", "reason", "field"),
    [
        (
            {"type": "person", "action": "page", "identifiers": {"id": "1"}},
            "unsupported_action",
            "action",
        ),
        ("not an object", "invalid", "entry"),
        (event({"id": "1"}, timestamp=True), "invalid", "timestamp"),
        (event({"id": "1"}, timestamp="1700000000"), "invalid", "timestamp"),
        (event({"id": "1"}, attributes=[1, 2]), "invalid", "attributes"),
        (event({"id": "1"}, id="not-a-ulid"), "invalid", "id"),
        (event({"id": "1"}, id="81ARZ3NDEKTSV4RRFFQ69G5FAV"), "invalid", "id"),
        (identify({"id": "1"}, timestamp=1.5), "invalid", "timestamp"),
    ],
)
def test_entry_rule_violation_reports_reason_and_field(
    sim: TrackSimulator, client: requests.Session, entry: Any, reason: str, field: str
) -> None:
    """Each rule names its reason and the offending field."""
    [error] = errors_for(client, sim, entry)
    assert (error["reason"], error["field"]) == (reason, field)


def test_event_data_not_a_hash_uses_documented_message(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """Event data that is not an object gets the documented message."""
    [error] = errors_for(client, sim, event({"id": "1"}, attributes="x"))
    assert error["message"] == "event data must be a hash"


def test_event_lowercase_ulid_accepted(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """ULIDs are case-insensitive."""
    assert errors_for(client, sim, event({"id": "1"}, id=ULID_A.lower())) == []


def test_batch_over_max_request_bytes_returns_413(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A body over max_request_bytes is refused whole with 413."""
    filler = [identify({"id": str(i)}, {"v": "x" * 900}) for i in range(600)]
    response = post(client, sim, filler)
    assert response.status_code == 413
    assert response.json()["errors"][0]["reason"] == "request_too_large"
    assert sim.people() == {}
    assert sim.stats["max_request_bytes_seen"] > 500_000
    follow_up = post(client, sim, [identify({"id": "after"})])
    assert follow_up.status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"entries": []}', b'{"batch": {}}', b'{"batch": []}'],
)
def test_batch_malformed_body_returns_400(
    sim: TrackSimulator, client: requests.Session, body: bytes
) -> None:
    """Bad JSON, a non-object, a missing, non-list or empty batch give 400."""
    response = post_raw(client, sim, body)
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert (error["reason"], error["field"]) == ("invalid", "batch")
    assert sim.stats["entries_received"] == 0


def test_batch_non_json_content_type_returns_400(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A batch sent as form data is refused."""
    body = json.dumps({"batch": [identify({"id": "1"})]})
    headers = {"Content-Type": "text/plain"}
    url = f"{sim.url}/api/v2/batch"
    response = client.post(url, data=body, headers=headers, timeout=10)
    assert response.status_code == 400


def test_event_duplicate_id_ignored_and_counted(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A second event with the same id is accepted but not recorded again."""
    first = post(client, sim, [event({"id": "1"}, "paid", id=ULID_A)])
    second = post(client, sim, [event({"id": "1"}, "paid", id=ULID_A.lower())])
    third = post(client, sim, [event({"id": "1"}, "paid", id=ULID_B)])
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert [e["id"] for e in sim.events()] == [ULID_A, ULID_B]
    snapshot = sim.snapshot()
    assert snapshot["received_event_ids"] == {ULID_A: 2, ULID_B: 1}
    assert snapshot["stats"]["duplicate_events"] == 1


def test_fault_503_twice_then_200(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """Two injected 503s answer two requests, with Retry-After, applying nothing."""
    sim.inject([Fault(503, count=2, retry_after="2")])
    answers = [post(client, sim, [identify({"id": str(i)})]) for i in range(3)]
    assert [r.status_code for r in answers] == [503, 503, 200]
    assert answers[0].headers["Retry-After"] == "2"
    assert answers[0].json() == {"meta": {"error": "simulated 503"}}
    assert "Retry-After" not in answers[2].headers
    assert sim.people() == {"id:2": {}}
    assert sim.stats["responses"] == {"503": 2, "200": 1}


def test_fault_sequence_served_in_order(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """Queued faults are consumed head first, one request per count."""
    sim.inject([Fault(429, retry_after="1"), Fault(500), Fault(401)])
    codes = [post(client, sim, [identify({"id": "1"})]).status_code for _ in range(4)]
    assert codes == [429, 500, 401, 200]


def test_fault_delay_with_200_processes_slowly(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A 200 fault with a delay answers late but applies the batch."""
    sim.inject([Fault(200, delay_s=0.3)])
    started = time.monotonic()
    response = post(client, sim, [identify({"id": "slow"})])
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert "id:slow" in sim.people()


def test_fault_not_consumed_by_unauthorized_request(sim: TrackSimulator) -> None:
    """A refused-by-auth request leaves the fault queue untouched."""
    sim.inject([Fault(503)])
    url = f"{sim.url}/api/v2/batch"
    response = requests.post(url, json={"batch": []}, auth=("x", "y"), timeout=10)
    assert response.status_code == 401
    assert sim.snapshot()["pending_faults"][0]["status"] == 503


def test_rate_limit_exceeded_returns_429_with_retry_after(
    client: requests.Session,
) -> None:
    """Beyond the bucket capacity the simulator answers 429 and applies nothing."""
    with TrackSimulator(SITE, KEY, rate_limit_rps=2) as limited:
        codes = [post(client, limited, [identify({"id": str(i)})]) for i in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert codes[2].headers["Retry-After"] == "1"
        assert "id:2" not in limited.people()
        assert limited.stats["rate_limited"] == 1
        time.sleep(0.6)
        assert post(client, limited, [identify({"id": "later"})]).status_code == 200


def test_delete_and_suppress_remove_profiles(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """Delete removes a profile; suppress also ignores later data for that person."""
    setup = [identify({"id": "1"}, {"a": 1}), identify({"id": "2"}, {"b": 2})]
    removal = [
        {"type": "person", "action": "delete", "identifiers": {"id": "1"}},
        {"type": "person", "action": "suppress", "identifiers": {"id": "2"}},
    ]
    later = [identify({"id": "2"}, {"c": 3}), event({"id": "2"}, "x")]
    for batch in (setup, removal, later):
        assert post(client, sim, batch).status_code == 200
    snapshot = sim.snapshot()
    assert snapshot["people"] == {}
    assert snapshot["events"] == []
    assert snapshot["suppressed"] == ["id:2"]
    assert snapshot["stats"]["suppressed_ignored"] == 2


def test_control_endpoints_state_faults_reset(sim: TrackSimulator) -> None:
    """The /__sim endpoints expose state, queue faults and reset without auth."""
    with requests.Session() as control, requests.Session() as api:
        api.auth = (SITE, KEY)
        spec = {
            "faults": [{"status": 503, "count": 1, "retry_after": "2", "delay_s": 0}]
        }
        queued = control.post(f"{sim.url}/__sim/faults", json=spec, timeout=10)
        assert queued.json() == {"queued": 1}
        assert post(api, sim, [identify({"id": "1"})]).status_code == 503
        assert post(api, sim, [identify({"id": "1"})]).status_code == 200
        state = control.get(f"{sim.url}/__sim/state", timeout=10).json()
        assert state["people"] == {"id:1": {}}
        assert state["stats"]["requests"] == 2
        stats = control.get(f"{sim.url}/__sim/stats", timeout=10).json()
        assert stats == state["stats"]
        assert control.post(f"{sim.url}/__sim/reset", timeout=10).status_code == 200
        state = control.get(f"{sim.url}/__sim/state", timeout=10).json()
        assert state["people"] == {}
        assert state["stats"]["requests"] == 0


def test_control_faults_invalid_spec_returns_400(sim: TrackSimulator) -> None:
    """A fault without a status is refused and nothing is queued."""
    url = f"{sim.url}/__sim/faults"
    response = requests.post(url, json={"faults": [{"count": 2}]}, timeout=10)
    assert response.status_code == 400
    assert sim.snapshot()["pending_faults"] == []


def test_server_concurrent_batches_all_counted(sim: TrackSimulator) -> None:
    """Parallel clients are served concurrently and every entry is counted once."""

    def send(worker: int) -> None:
        with requests.Session() as session:
            session.auth = (SITE, KEY)
            for i in range(10):
                entry = identify({"id": f"{worker}-{i}"})
                assert post(session, sim, [entry]).status_code == 200

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sim.people()) == 80
    assert sim.stats["requests"] == 80


def test_main_missing_credentials_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without CIO_SITE_ID and CIO_API_KEY the command refuses to start."""
    monkeypatch.delenv("CIO_SITE_ID", raising=False)
    monkeypatch.delenv("CIO_API_KEY", raising=False)
    assert main(["--port", "0"]) == 2
    assert "CIO_SITE_ID" in capsys.readouterr().err


def test_main_standalone_serves_until_sigterm() -> None:
    """The module prints its URL as JSON, serves, and exits 0 on SIGTERM."""
    env = {**os.environ, "CIO_SITE_ID": SITE, "CIO_API_KEY": KEY}
    command = [sys.executable, "-m", "worker.sandbox.simulator", "--port", "0"]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["simulator"]
        region = requests.get(
            f"{url}/api/v1/accounts/region", auth=(SITE, KEY), timeout=10
        )
        assert region.json()["region"] == "us"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def post_anonymous(
    client: requests.Session, sim: TrackSimulator, event: Any
) -> requests.Response:
    """POST one anonymous event to the v1 endpoint."""
    return client.post(f"{sim.url}/api/v1/events", json=event, timeout=10)


def test_anonymous_event_accepted_and_recorded_without_a_profile(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """A v1 anonymous event is stored under its anonymous id; no person is made."""
    body = {"anonymous_id": "cookie-1", "name": "viewed", "id": ULID_A,
            "timestamp": 1700000000, "data": {"page": "/pricing"}}  # fmt: skip

    response = post_anonymous(client, sim, body)

    assert response.status_code == 200
    snapshot = sim.snapshot()
    assert snapshot["people"] == {}
    [stored] = snapshot["events"]
    assert (stored["person"], stored["name"], stored["id"]) == (
        "anonymous:cookie-1",
        "viewed",
        ULID_A,
    )
    assert stored["attributes"] == {"page": "/pricing"}
    assert snapshot["stats"]["anonymous_events"] == 1


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"anonymous_id": "c", "name": " "}, "name"),
        ({"anonymous_id": "c", "name": "日" * 36}, "name"),
        ({"anonymous_id": "c", "name": "n", "id": "not-a-ulid"}, "id"),
        ({"anonymous_id": "c", "name": "n", "data": "text"}, "data"),
        ({"anonymous_id": "c", "name": "n", "timestamp": "soon"}, "timestamp"),
        ({"anonymous_id": 7, "name": "n"}, "anonymous_id"),
        ({"anonymous_id": "", "name": "n"}, "data.recipient"),
        ({"anonymous_id": "c", "name": "n", "type": "track"}, "type"),
        ([{"anonymous_id": "c", "name": "n"}], "body"),
    ],
)
def test_anonymous_event_invalid_returns_400_naming_field(
    sim: TrackSimulator, client: requests.Session, event: Any, field: str
) -> None:
    """An invalid anonymous event is refused whole with a message naming the field."""
    response = post_anonymous(client, sim, event)

    assert response.status_code == 400
    assert response.json()["meta"]["error"].startswith(f"{field}: ")
    assert sim.snapshot()["events"] == []


def test_anonymous_event_repeated_id_dropped(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """The same event id twice is answered 200 and stored once."""
    body = {"anonymous_id": "cookie-1", "name": "viewed", "id": ULID_B}

    statuses = [post_anonymous(client, sim, body).status_code for _ in range(2)]

    assert statuses == [200, 200]
    snapshot = sim.snapshot()
    assert len(snapshot["events"]) == 1
    assert snapshot["received_event_ids"] == {ULID_B: 2}
    assert snapshot["stats"]["duplicate_events"] == 1


def test_anonymous_event_wrong_key_401_and_faults_apply(
    sim: TrackSimulator, client: requests.Session
) -> None:
    """Auth and injected faults apply to anonymous events as to batches."""
    body = {"anonymous_id": "cookie-1", "name": "viewed"}
    wrong = requests.post(
        f"{sim.url}/api/v1/events", json=body, auth=(SITE, "nope"), timeout=10
    )
    sim.inject([Fault(503, retry_after="2")])

    faulted = post_anonymous(client, sim, body)
    accepted = post_anonymous(client, sim, body)

    assert wrong.status_code == 401
    assert (faulted.status_code, faulted.headers["Retry-After"]) == (503, "2")
    assert accepted.status_code == 200
