"""Unit tests of the reject formats: dead-letter chunking and reassembly
(worker.rejects), and the archive's object names, lines and flush decisions
(worker.archive_format)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
from collections.abc import Sequence

import pytest

from tests.unit.fakes import FakeMessage
from worker.archive_format import (
    CHUNK_WAIT_S,
    FlushLimits,
    PartitionArchive,
    archive_line,
    build_objects,
    day_of,
    flush_due,
    object_key,
    parse_cut,
    plan_cut,
    retry_delay_s,
)
from worker.rejects import (
    CHUNK_COUNT,
    CHUNK_ENVELOPE,
    CHUNK_INDEX,
    CHUNK_KEYLESS,
    DEAD_LETTER_MAX_RECORD_BYTES,
    ORIGINAL_SHA256,
    ORIGINAL_SIZE,
    REASON_NAMES,
    Assembler,
    DeadLetterRecord,
    Reject,
    StoredDeadLetter,
    assemble,
    dead_letter_records,
    record_bytes,
    reject_headers,
    settled_through,
)

REJECT = Reject("validate", "entry_too_large", "the entry is over 32 KB", "first_name")
LIMITS = FlushLimits(max_records=100, max_bytes=1_000_000, max_age_s=60.0)
DLQ = "cio-dead-letters"


def message(value: bytes | None, **changes: object) -> FakeMessage:
    fields: dict[str, object] = {
        "value_bytes": value,
        "topic_name": "persons",
        "partition_number": 2,
        "offset_number": 40,
        "key_bytes": b"ann@example.com",
        "header_list": [("traceparent", b"00-abc-01")],
        "timestamp_ms": 1_764_000_000_000,
    }
    fields.update(changes)
    return FakeMessage(**fields)  # type: ignore[arg-type]


def stored(
    records: Sequence[DeadLetterRecord],
    first_offset: int = 0,
    timestamp_ms: int = 1_764_806_400_000,
) -> list[StoredDeadLetter]:
    """The dead letters as the archiver reads them back, at consecutive offsets."""
    return [
        StoredDeadLetter(
            DLQ,
            0,
            first_offset + i,
            timestamp_ms,
            r.key,
            r.value,
            tuple((n, v.encode() if isinstance(v, str) else v) for n, v in r.headers),
        )
        for i, r in enumerate(records)
    ]


def random_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# -- chunking ---------------------------------------------------------------------


def test_dead_letter_records_small_record_one_record_unchanged() -> None:
    """A record that fits is one dead letter: original key, value, headers + why."""
    original = message(b"\x00\x01avro")

    records = dead_letter_records(original, REJECT)

    assert records == [
        DeadLetterRecord(
            b"ann@example.com", b"\x00\x01avro", reject_headers(original, REJECT)
        )
    ]


@pytest.mark.parametrize("size", [1_000_001, 3_000_000, 10_000_000])
def test_dead_letter_records_oversize_value_chunks_fit_and_rejoin(size: int) -> None:
    """An oversize value becomes chunks that each fit the limit and join back to
    the exact original bytes, every chunk keyed and explained like the record."""
    value = random_bytes(size)

    records = dead_letter_records(message(value), REJECT)

    assert len(records) == -(-size // len(records[0].value or b"")) > 1
    assert all(
        record_bytes(r.key, r.value, r.headers) <= DEAD_LETTER_MAX_RECORD_BYTES
        for r in records
    )
    assert b"".join(r.value or b"" for r in records) == value
    assert {r.key for r in records} == {b"ann@example.com"}
    digest = hashlib.sha256(value).hexdigest().encode()
    for index, record in enumerate(records):
        headers = dict(record.headers)
        assert headers[CHUNK_INDEX] == str(index).encode()
        assert headers[CHUNK_COUNT] == str(len(records)).encode()
        assert headers[ORIGINAL_SIZE] == str(size).encode()
        assert headers[ORIGINAL_SHA256] == digest
        assert headers["cio.reason"] == b"entry_too_large"
        assert record.headers[0] == ("traceparent", b"00-abc-01")


def test_dead_letter_records_limit_boundary_chunks_only_above_it() -> None:
    """A record exactly at the limit stays whole; one byte more is chunked."""
    headers = reject_headers(message(b""), REJECT)
    fits = DEAD_LETTER_MAX_RECORD_BYTES - record_bytes(b"ann@example.com", b"", headers)

    whole = dead_letter_records(message(b"x" * fits), REJECT)
    split = dead_letter_records(message(b"x" * (fits + 1)), REJECT)

    assert len(whole) == 1
    assert CHUNK_INDEX not in dict(whole[0].headers)
    assert len(split) == 2


def test_dead_letter_records_keyless_chunks_share_a_made_up_key() -> None:
    """Chunks of a keyless record share a key from the source coordinates (so one
    partition) and say so; the archive line shows the original null key."""
    records = dead_letter_records(
        message(random_bytes(2_000_000), key_bytes=None), REJECT
    )

    assert {r.key for r in records} == {b"cio.chunk:persons:2:40"}
    assert all(dict(r.headers)[CHUNK_KEYLESS] == b"true" for r in records)
    (rejected,) = assemble(stored(records))
    assert rejected.first.keyless
    assert archive_line(rejected, None)["key"] is None


@pytest.mark.parametrize(
    ("key", "headers", "value"),
    [
        (b"k", [("big", b"h" * 2_000_000)], None),  # a tombstone with huge headers
        (b"k", [("big", b"h" * 2_000_000)], b""),
        (b"k", [("big", b"h" * 880_000), ("n", None)], b"v" * 300_000),
        (b"K" * 1_500_000, [], b"v" * 10),  # a huge key
        (None, [("big", b"h" * 950_000)], b"v" * 1_000),
    ],
)
def test_dead_letter_records_huge_key_or_headers_enveloped_losslessly(
    key: bytes | None, headers: list[tuple[str, bytes | None]], value: bytes | None
) -> None:
    """When the original key and headers leave no room for a slice of the
    value, the whole record travels in an envelope over chunks that each fit,
    and reading them back gives the original key, headers and value."""
    original = message(value, key_bytes=key, header_list=headers)

    records = dead_letter_records(original, REJECT)

    assert len(records) > 1
    assert all(record_bytes(*r) <= DEAD_LETTER_MAX_RECORD_BYTES for r in records)
    assert {r.key for r in records} == {b"cio.chunk:persons:2:40"}
    assert all(dict(r.headers)[CHUNK_ENVELOPE] == b"true" for r in records)
    assert all("big" not in dict(r.headers) for r in records)
    (rejected,) = assemble(stored(records))
    assert not rejected.fragment
    assert (rejected.key, rejected.headers, rejected.value) == (key, headers, value)
    line = archive_line(rejected, None)
    assert line["key"] == (None if key is None else base64.b64encode(key).decode())
    assert [name for name, _ in line["headers"]] == [name for name, _ in headers]
    assert line["reject"]["reason"] == REJECT.reason


def test_dead_letter_records_envelope_with_a_chunk_lost_is_kept_as_fragments() -> None:
    """An envelope missing a chunk is not opened; its chunks stay as fragments."""
    original = message(b"v", header_list=[("big", b"h" * 2_000_000)])
    records = dead_letter_records(original, REJECT)

    rejected = assemble(stored(records[:1] + records[2:]))

    assert all(r.fragment for r in rejected)
    assert len(rejected) == len(records) - 1


def test_reason_names_match_reject_headers() -> None:
    """The reader's list of worker headers names exactly what the writer adds."""
    headers = reject_headers(message(b"v", header_list=None), REJECT)

    assert [name for name, _ in headers] == [f"cio.{n}" for n in REASON_NAMES]


# -- reading back and reassembly ---------------------------------------------------


def test_assemble_chunks_round_trip_byte_exact() -> None:
    """Chunks read back in order join into one record equal to the original."""
    value = random_bytes(3_000_000)
    records = stored(dead_letter_records(message(value), REJECT), first_offset=7)

    (rejected,) = assemble(records)

    assert rejected.value == value
    assert not rejected.fragment
    assert [p.offset for p in rejected.parts] == list(range(7, 7 + len(records)))


def test_assemble_interleaved_sets_and_whole_records() -> None:
    """Two chunked records written side by side and a whole one between them all
    come back whole, ordered by their first dead letter."""
    a = dead_letter_records(
        message(random_bytes(1_500_000, 1), offset_number=1), REJECT
    )
    b = dead_letter_records(
        message(random_bytes(1_500_000, 2), offset_number=2), REJECT
    )
    small = dead_letter_records(message(b"small", offset_number=3), REJECT)
    records = stored([a[0], b[0], small[0], a[1], b[1]])

    rejected = assemble(records)

    assert [r.value for r in rejected] == [
        random_bytes(1_500_000, 1),
        random_bytes(1_500_000, 2),
        b"small",
    ]
    assert not any(r.fragment for r in rejected)


def test_assemble_set_written_again_after_crash_keeps_both_losslessly() -> None:
    """A set cut short (a crash mid-write) and then written again whole: the whole
    one is joined, the early chunk is kept as a fragment."""
    value = random_bytes(2_000_000)
    chunks = dead_letter_records(message(value), REJECT)
    records = stored([chunks[0], *chunks])

    rejected = assemble(records)

    assert [r.fragment for r in rejected] == [True, False]
    assert rejected[1].value == value
    assert rejected[0].value == chunks[0].value


def test_assemble_missing_chunk_gives_fragments_with_coordinates() -> None:
    """A set missing its last chunk comes back as fragments, each still carrying
    the chunk headers a reader needs to join it later."""
    chunks = dead_letter_records(message(random_bytes(2_500_000)), REJECT)
    records = stored(chunks[:-1])

    rejected = assemble(records)

    assert all(r.fragment for r in rejected)
    lines = [archive_line(r, None) for r in rejected]
    assert [line["fragment"]["index"] for line in lines] == list(range(len(chunks) - 1))
    assert {line["fragment"]["count"] for line in lines} == {len(chunks)}


def test_assemble_chunks_not_matching_digest_are_fragments() -> None:
    """A complete set whose bytes do not match the recorded digest is not passed
    off as the original."""
    chunks = dead_letter_records(message(random_bytes(1_500_000)), REJECT)
    forged = DeadLetterRecord(
        chunks[1].key, b"x" * len(chunks[1].value or b""), chunks[1].headers
    )

    rejected = assemble(stored([chunks[0], forged]))

    assert [r.fragment for r in rejected] == [True, True]


def test_assemble_chunk_out_of_sequence_is_a_fragment() -> None:
    """A chunk whose set never started here is a fragment, not an error."""
    chunks = dead_letter_records(message(random_bytes(1_500_000)), REJECT)

    rejected = assemble(stored([chunks[1]]))

    assert len(rejected) == 1
    assert rejected[0].fragment


def test_assembler_is_settled_only_between_sets() -> None:
    """The assembler reports an open set until its last chunk arrives."""
    chunks = stored(dead_letter_records(message(random_bytes(1_500_000)), REJECT))
    assembler = Assembler()

    assembler.add(chunks[0])
    open_after_first = not assembler.is_settled
    done = assembler.add(chunks[1])

    assert open_after_first
    assert assembler.is_settled
    assert len(done) == 1


def test_settled_through_stops_before_an_open_set() -> None:
    """Records up to the one before an incomplete set can be archived; none can
    when the first record opens a set."""
    whole = dead_letter_records(message(b"w"), REJECT)
    chunks = dead_letter_records(message(random_bytes(2_000_000)), REJECT)

    tail_open = stored([*whole, *whole, chunks[0]])
    head_open = stored([chunks[0], *whole])
    complete = stored([*whole, *chunks])

    assert settled_through(tail_open) == 1
    assert settled_through(head_open) is None
    assert settled_through(complete) == len(chunks)


def test_split_headers_keeps_an_originals_own_cio_header() -> None:
    """Only the trailing run the worker appended is split off; an original
    header named cio.* that precedes it stays with the original headers."""
    original = [("cio.stage", b"upstream"), ("x", None)]
    (record,) = stored(dead_letter_records(message(b"v", header_list=original), REJECT))

    kept, added = record.split_headers()

    assert kept == original
    assert [name for name, _ in added] == [f"cio.{n}" for n in REASON_NAMES]


# -- flush decisions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "age_s", "due"),
    [
        (0, 0, 999.0, False),
        (1, 10, 0.0, False),
        (99, 10, 59.9, False),
        (100, 10, 0.0, True),
        (1, 1_000_000, 0.0, True),
        (1, 10, 60.0, True),
    ],
)
def test_flush_due_on_count_bytes_or_age(
    count: int, size: int, age_s: float, due: bool
) -> None:
    """A buffer is due at max_records, at max_bytes, or when its oldest record
    has waited max_age_s; an empty one never is."""
    now = 1000.0

    result = flush_due(count, size, now - age_s if count else None, LIMITS, now)

    assert result is due


def test_plan_cut_not_due_waits() -> None:
    """Nothing is cut before a trigger fires."""
    records = stored(dead_letter_records(message(b"v"), REJECT))

    assert plan_cut(records, [0.0], LIMITS, 1.0, due=False) is None


def test_plan_cut_due_cuts_after_last_settled_record() -> None:
    """A due buffer is cut after its last record that leaves no chunk set open."""
    chunks = dead_letter_records(message(random_bytes(2_000_000)), REJECT)
    records = stored([*dead_letter_records(message(b"v"), REJECT), chunks[0]], 10)

    cut = plan_cut(records, [0.0, 0.0], LIMITS, 1.0, due=True)

    assert cut == 10


def test_plan_cut_caps_a_range_at_max_records_without_splitting_a_set() -> None:
    """A due buffer longer than max_records is cut after max_records records,
    or after the chunk set that straddles that point."""
    limits = FlushLimits(max_records=3, max_bytes=10**9, max_age_s=60.0)
    whole = dead_letter_records(message(b"v"), REJECT)
    chunks = dead_letter_records(message(random_bytes(2_000_000)), REJECT)
    plain = stored(whole * 7)
    straddling = stored([*whole, *whole, chunks[0], chunks[1], chunks[2], *whole])

    assert plan_cut(plain, [0.0] * 7, limits, 1.0, due=True) == 2
    assert plan_cut(straddling, [0.0] * 6, limits, 1.0, due=True) == 4


def test_plan_cut_caps_a_range_at_max_bytes() -> None:
    """A range also ends once it holds max_bytes of keys and values."""
    limits = FlushLimits(max_records=1000, max_bytes=25, max_age_s=60.0)
    records = stored([DeadLetterRecord(b"k", b"v" * 9, [])] * 5)  # 10 bytes each

    cut = plan_cut(records, [0.0] * 5, limits, 1.0, due=True)

    assert cut == 2


def test_plan_cut_head_set_incomplete_waits_then_takes_all() -> None:
    """A first record opening a set holds the flush until the set has waited
    CHUNK_WAIT_S; then everything is cut and the set goes as fragments."""
    chunks = dead_letter_records(message(random_bytes(2_000_000)), REJECT)
    records = stored([chunks[0], *dead_letter_records(message(b"v"), REJECT)], 5)
    read_at = [100.0, 100.0]

    early = plan_cut(records, read_at, LIMITS, 100.0 + CHUNK_WAIT_S - 1, due=True)
    late = plan_cut(records, read_at, LIMITS, 100.0 + CHUNK_WAIT_S, due=True)

    assert early is None
    assert late == 6


@pytest.mark.parametrize(
    ("metadata", "committed", "cut"),
    [
        ("cio.archive.cut=42", 40, 42),
        ("cio.archive.cut=40", 40, 40),
        ("cio.archive.cut=39", 40, None),
        ("cio.archive.cut=x", 40, None),
        ("", 40, None),
        (None, 40, None),
        ("something else", 40, None),
    ],
)
def test_parse_cut_reads_only_a_valid_range_end(
    metadata: str | None, committed: int, cut: int | None
) -> None:
    """Only a well-formed cut at or after the committed offset is honoured."""
    assert parse_cut(metadata, committed) == cut


def test_retry_delay_doubles_up_to_a_minute() -> None:
    """Attempts at a failing range back off 2, 4, 8 ... seconds, at most 60."""
    delays = [retry_delay_s(n) for n in range(1, 9)]

    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_partition_archive_take_through_keeps_the_rest() -> None:
    """Taking a range removes exactly its records and their bytes."""
    part = PartitionArchive(0)
    for index, record in enumerate(stored([DeadLetterRecord(b"k", b"v" * 10, [])] * 4)):
        part.add(record, float(index))

    taken = part.take_through(1)

    assert [r.offset for r in taken] == [0, 1]
    assert [r.offset for r in part.records] == [2, 3]
    assert part.read_at == [2.0, 3.0]
    assert part.buffered_bytes == 2 * 11
    assert part.start == 0


# -- names and lines -------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "topic", "expected"),
    [
        (
            "cio-rejects",
            "persons",
            "cio-rejects/persons/dt=2025-12-04/part-0003-"
            "00000000000000000010-00000000000000000020.jsonl.gz",
        ),
        (
            "/a/b/",
            "person-events",
            "a/b/person-events/dt=2025-12-04/part-0003-"
            "00000000000000000010-00000000000000000020.jsonl.gz",
        ),
        (
            "",
            "persons",
            "persons/dt=2025-12-04/part-0003-"
            "00000000000000000010-00000000000000000020.jsonl.gz",
        ),
        (
            "p",
            "../etc/x y",
            "p/_etc_x_y/dt=2025-12-04/part-0003-"
            "00000000000000000010-00000000000000000020.jsonl.gz",
        ),
        (
            "p",
            "",
            "p/_unknown/dt=2025-12-04/part-0003-"
            "00000000000000000010-00000000000000000020.jsonl.gz",
        ),
    ],
)
def test_object_key_layout(prefix: str, topic: str, expected: str) -> None:
    """Keys are prefix/source topic/dt=day/part-partition-first-last, with the
    topic made safe for a key."""
    key = object_key(prefix, topic, "2025-12-04", 3, 10, 20)

    assert key == expected


@pytest.mark.parametrize(
    ("timestamp_ms", "day"),
    [
        (1_764_806_400_000, "2025-12-04"),
        (1_764_892_799_999, "2025-12-04"),
        (-1, "unknown"),
    ],
)
def test_day_of_is_the_utc_date(timestamp_ms: int, day: str) -> None:
    """The day folder is the UTC date of the dead letter's timestamp."""
    assert day_of(timestamp_ms) == day


def test_archive_line_whole_record_holds_bytes_reasons_and_coordinates() -> None:
    """A line has the original key and value in base64, the original headers,
    the decoded record, the reasons and both coordinates."""
    original = message(b"\x00\xffvalue", header_list=[("trace", b"t1"), ("nil", None)])
    (record,) = stored(dead_letter_records(original, REJECT), first_offset=9)
    (rejected,) = assemble([record])

    line = archive_line(rejected, {"person_email": "ann@example.com"})

    assert line == {
        "dead_letter": {
            "topic": DLQ,
            "partition": 0,
            "offset": 9,
            "offsets": [9],
            "timestamp": 1_764_806_400_000,
        },
        "source": {
            "topic": "persons",
            "partition": 2,
            "offset": 40,
            "timestamp": 1_764_000_000_000,
        },
        "reject": {
            "stage": "validate",
            "reason": "entry_too_large",
            "field": "first_name",
            "message": "the entry is over 32 KB",
            "attempts": 1,
            "worker_version": line["reject"]["worker_version"],
        },
        "key": base64.b64encode(b"ann@example.com").decode(),
        "value": base64.b64encode(b"\x00\xffvalue").decode(),
        "value_bytes": 7,
        "value_sha256": hashlib.sha256(b"\x00\xffvalue").hexdigest(),
        "headers": [["trace", base64.b64encode(b"t1").decode()], ["nil", None]],
        "decoded": {"person_email": "ann@example.com"},
        "fragment": None,
    }


def test_build_objects_groups_by_topic_and_day_deterministically() -> None:
    """One object per source topic and day, named by the range; building the
    same range twice gives the same keys and the same bytes."""
    person = dead_letter_records(message(b"p"), REJECT)
    event = dead_letter_records(message(b"e", topic_name="person-events"), REJECT)
    records = [
        *stored(person, 0, 1_764_806_400_000),
        *stored(event, 1, 1_764_806_400_000),
        *stored(person, 2, 1_764_892_800_000),  # the next day
    ]

    first = build_objects(records, 0, 0, 2, "pre", lambda topic, value: None)
    again = build_objects(records, 0, 0, 2, "pre", lambda topic, value: None)

    assert [(o.key, o.body) for o in first] == [(o.key, o.body) for o in again]
    assert [o.key.split("/part-")[0] for o in first] == [
        "pre/person-events/dt=2025-12-04",
        "pre/persons/dt=2025-12-04",
        "pre/persons/dt=2025-12-05",
    ]
    assert all(
        o.key.endswith("-00000000000000000000-00000000000000000002.jsonl.gz")
        for o in first
    )
    lines = [
        json.loads(line) for o in first for line in gzip.decompress(o.body).splitlines()
    ]
    assert sorted(line["dead_letter"]["offset"] for line in lines) == [0, 1, 2]
    assert [o.lines for o in first] == [1, 1, 1]


def test_build_objects_joins_chunks_and_decodes_whole_records_only() -> None:
    """An oversize record is one line with the whole value; fragments are not
    decoded."""
    value = random_bytes(2_000_000)
    chunks = dead_letter_records(message(value), REJECT)
    seen: list[int] = []

    def decode(topic: str, data: bytes | None) -> dict[str, object] | None:
        seen.append(len(data or b""))
        return {"ok": True}

    (obj,) = build_objects(stored(chunks), 0, 0, len(chunks) - 1, "p", decode)

    (line,) = [json.loads(x) for x in gzip.decompress(obj.body).splitlines()]
    assert base64.b64decode(line["value"]) == value
    assert line["dead_letter"]["offsets"] == list(range(len(chunks)))
    assert line["decoded"] == {"ok": True}
    assert seen == [len(value)]
    assert obj.fragments == 0


@pytest.mark.parametrize(
    "own",
    [
        [("trace", b"t"), (CHUNK_INDEX, b"0"), (CHUNK_COUNT, b"2"),
         (ORIGINAL_SIZE, b"99"), (ORIGINAL_SHA256, b"ab" * 32)],
        [("cio.reason", b"old"), ("cio.stage", b"api")],
        [(f"cio.{name}", b"earlier") for name in REASON_NAMES],  # a dead letter
    ],
)  # fmt: skip
def test_original_cio_headers_survive_reading_back(
    own: list[tuple[str, bytes]],
) -> None:
    """A record that already carried ``cio.*`` headers, chunk headers included,
    keeps them all when its dead letter is read back, and is not taken for a
    chunk."""
    records = dead_letter_records(message(b"v", header_list=own), REJECT)

    (rejected,) = assemble(stored(records))

    assert not rejected.fragment
    assert rejected.headers == own
    assert rejected.first.reasons()["reason"] == REJECT.reason
    assert archive_line(rejected, None)["headers"] == [
        [name, base64.b64encode(value).decode()] for name, value in own
    ]


def test_oversize_record_with_own_chunk_headers_joined_once() -> None:
    """Chunking a record whose own headers look like chunk headers still joins
    to the original, with those headers kept."""
    own = [(CHUNK_INDEX, b"7"), (CHUNK_COUNT, b"9")]
    value = random.Random(4).randbytes(2_000_000)

    records = dead_letter_records(message(value, header_list=own), REJECT)
    (rejected,) = assemble(stored(records))

    assert len(records) == 3
    assert (rejected.value, rejected.headers) == (value, own)
