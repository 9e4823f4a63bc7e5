"""Dedupe decisions of the in-memory state."""

from __future__ import annotations

import pytest

from worker.state import (
    EventDedupe,
    PartitionState,
    PersonDedupe,
    event_key,
    person_key,
)

ALICE = {"email": "Alice@Example.com"}


def test_decide_person_unchanged_attributes_are_skipped() -> None:
    """A person whose attributes equal the last delivered ones is not sent."""
    state = PartitionState()
    first = state.decide_person(ALICE, {"plan": "free", "n": 1}, PersonDedupe.UNCHANGED)

    second = state.decide_person(
        ALICE, {"n": 1, "plan": "free"}, PersonDedupe.UNCHANGED
    )

    assert not first.skip
    assert first.update is not None
    assert second.skip
    assert second.update is None


def test_decide_person_email_case_does_not_matter() -> None:
    """Emails are case-insensitive in Customer.io, so in the state too."""
    state = PartitionState()
    state.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED)

    again = state.decide_person(
        {"email": "alice@example.com"}, {"plan": "free"}, PersonDedupe.UNCHANGED
    )

    assert again.skip


def test_decide_person_changed_attribute_is_sent() -> None:
    """Any changed attribute sends the whole identify in mode unchanged."""
    state = PartitionState()
    state.decide_person(ALICE, {"plan": "free", "n": 1}, PersonDedupe.UNCHANGED)

    decision = state.decide_person(
        ALICE, {"plan": "pro", "n": 1}, PersonDedupe.UNCHANGED
    )

    assert not decision.skip
    assert decision.attributes == {"plan": "pro", "n": 1}


def test_decide_person_changed_attributes_mode_sends_only_the_changes() -> None:
    """Mode changed_attributes sends only attributes whose value changed."""
    state = PartitionState()
    mode = PersonDedupe.CHANGED_ATTRIBUTES
    state.decide_person(ALICE, {"plan": "free", "n": 1}, mode)

    decision = state.decide_person(ALICE, {"plan": "pro", "n": 1, "new": True}, mode)
    repeat = state.decide_person(ALICE, {"plan": "pro", "n": 1}, mode)

    assert decision.attributes == {"plan": "pro", "new": True}
    assert repeat.skip


def test_decide_person_off_always_sends_and_writes_nothing() -> None:
    """Mode off keeps no state."""
    state = PartitionState()

    decisions = [state.decide_person(ALICE, {"a": 1}, PersonDedupe.OFF) for _ in "ab"]

    assert [d.skip for d in decisions] == [False, False]
    assert all(d.update is None for d in decisions)
    assert len(state) == 0


def test_revert_restores_previous_digest_after_a_refusal() -> None:
    """If the API refuses an entry, the state forgets that decision."""
    state = PartitionState()
    state.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED)
    refused = state.decide_person(ALICE, {"plan": "x" * 2000}, PersonDedupe.UNCHANGED)
    assert refused.update is not None

    state.revert(refused.update)

    assert state.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED).skip


def test_revert_of_first_decision_forgets_the_person() -> None:
    """Reverting a person's first decision leaves no trace of them."""
    state = PartitionState()
    decision = state.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED)
    assert decision.update is not None

    state.revert(decision.update)

    assert len(state) == 0


def test_forget_person_sends_the_same_attributes_again() -> None:
    """After a delete, an identify with the old attributes is sent again."""
    state = PartitionState()
    state.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED)

    tombstone = state.forget_person(ALICE)

    assert tombstone.value is None
    assert tombstone.key == person_key(ALICE)
    assert not state.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED).skip


def test_load_replays_records_later_wins_and_tombstones_delete() -> None:
    """Restoring applies records in order: updates win, tombstones remove."""
    writer = PartitionState()
    first = writer.decide_person(ALICE, {"plan": "free"}, PersonDedupe.UNCHANGED).update
    second = writer.decide_person(ALICE, {"plan": "pro"}, PersonDedupe.UNCHANGED).update
    assert first is not None
    assert second is not None
    restored = PartitionState()

    restored.load(first.key, first.value)
    restored.load(second.key, second.value)

    assert restored.decide_person(ALICE, {"plan": "pro"}, PersonDedupe.UNCHANGED).skip
    restored.load(second.key, None)
    assert len(restored) == 0


@pytest.mark.parametrize("mode", [PersonDedupe.CHANGED_ATTRIBUTES])
def test_load_attribute_digests_round_trip(mode: PersonDedupe) -> None:
    """Per-attribute digests written in one process decide the same in another."""
    writer = PartitionState()
    update = writer.decide_person(ALICE, {"a": 1, "b": 2}, mode).update
    assert update is not None
    assert update.value is not None
    restored = PartitionState()

    restored.load(update.key, update.value)

    assert restored.decide_person(ALICE, {"a": 1, "b": 3}, mode).attributes == {"b": 3}


def test_decide_event_second_time_is_skipped_case_insensitively() -> None:
    """An event id already delivered is not sent again (ULIDs ignore case)."""
    state = PartitionState()
    event_id = "01HZY6M3Z5QK0V8W2X9Y7T6R5S"

    first = state.decide_event(event_id, EventDedupe.ID, now_s=100)
    second = state.decide_event(event_id.lower(), EventDedupe.ID, now_s=101)

    assert first == (False, first[1])
    assert first[1] is not None
    assert first[1].key == event_key(event_id)
    assert second == (True, None)


def test_decide_event_off_never_skips() -> None:
    """Event dedupe off sends every event."""
    state = PartitionState()

    results = [state.decide_event("X", EventDedupe.OFF, now_s=1) for _ in "ab"]

    assert results == [(False, None), (False, None)]


def test_expire_events_tombstones_only_those_past_retention() -> None:
    """Event ids older than the retention are forgotten with a tombstone each."""
    state = PartitionState()
    state.decide_event("OLD", EventDedupe.ID, now_s=1_000)
    state.decide_event("NEW", EventDedupe.ID, now_s=5_000)

    tombstones = state.expire_events(now_s=6_000, retention_s=2_000)

    assert [t.key for t in tombstones] == [event_key("OLD")]
    assert all(t.value is None for t in tombstones)
    assert state.decide_event("OLD", EventDedupe.ID, now_s=6_000)[0] is False
    assert state.decide_event("NEW", EventDedupe.ID, now_s=6_000)[0] is True


def test_expire_events_keeps_an_id_renewed_after_restore() -> None:
    """A key loaded twice expires by its latest time, not its first."""
    state = PartitionState()
    state.load(event_key("A"), b"1000")
    state.load(event_key("A"), b"5000")

    assert state.expire_events(now_s=6_000, retention_s=2_000) == []
