"""SessionScanner: protocol metrics from message headers, at every split, on any input."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire.message_scanner import (
    ERROR_FIELDS_CAP,
    MAX_PENDING_RUNS,
    ProtocolStats,
    SessionScanner,
)


class Observer:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float, /) -> None:
        self.values.append(amount)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Observer) and self.values == other.values

    def __repr__(self) -> str:
        return f"Observer({self.values!r})"


@dataclass(eq=True)
class Stats:
    queries: int = 0
    notices: int = 0
    transactions: dict[str, int] = field(default_factory=lambda: {"commit": 0, "rollback": 0})
    server_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    query_seconds: Observer = field(default_factory=Observer)


def _stats_is_a_protocol_stats(stats: Stats) -> ProtocolStats:
    return stats  # mypy checks the test double against the Protocol here


# --- message builders ---------------------------------------------------------------------


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\x00")


def ready(status: bytes) -> bytes:
    return msg(b"Z", status)


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\x00")


def fields(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"".join(code + value + b"\x00" for code, value in pairs) + b"\x00"


def error(severity: str, sqlstate: str, message: str = "boom") -> bytes:
    s, c = severity.encode(), sqlstate.encode()
    return msg(b"E", fields((b"S", s), (b"V", s), (b"C", c), (b"M", message.encode())))


def notice(text: str) -> bytes:
    return msg(
        b"N", fields((b"S", b"NOTICE"), (b"V", b"NOTICE"), (b"C", b"00000"), (b"M", text.encode()))
    )


PARSE = msg(b"P", b"\x00SELECT $1\x00\x00\x00")
BIND = msg(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00")
DESCRIBE = msg(b"D", b"P\x00")
EXECUTE = msg(b"E", b"\x00\x00\x00\x00\x00")
SYNC = msg(b"S")
ROW_DESCRIPTION = msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
ROW = msg(b"D", b"\x00\x01\x00\x00\x00\x011")
# Payloads that look like messages the scanner counts: it must hop over them by length.
LOOKALIKES = query("SELECT 1") + EXECUTE + SYNC + ready(b"I") + error("ERROR", "42601")
COPY_IN = msg(b"d", LOOKALIKES) + msg(b"d", b"1\t2\n" * 50) + msg(b"c")
COPY_OUT = msg(b"H", b"\x00\x00\x01\x00\x00") + msg(b"d", LOOKALIKES) * 3 + msg(b"c")

Direction = Literal["F", "B"]
Step = tuple[Direction, bytes, float]


@dataclass
class Case:
    steps: list[Step]
    queries: int = 0
    seconds: list[float] = field(default_factory=list)
    commit: int = 0
    rollback: int = 0
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    notices: int = 0


def cycle(sql: str, t: float, *answer: bytes, dt: float = 0.5) -> list[Step]:
    return [("F", query(sql), t), ("B", b"".join(answer), t + dt)]


CASES: dict[str, Case] = {
    "simple query": Case(
        cycle("SELECT 1", 1.0, ROW_DESCRIPTION, ROW, complete("SELECT 1"), ready(b"I")),
        queries=1,
        seconds=[0.5],
    ),
    "two syncs pipelined": Case(
        [
            ("F", PARSE + BIND + DESCRIBE + EXECUTE + SYNC + BIND + EXECUTE + SYNC, 1.0),
            ("B", msg(b"1") + msg(b"2") + ROW_DESCRIPTION + ROW + complete("SELECT 1"), 1.5),
            ("B", ready(b"I") + msg(b"2") + ROW, 2.0),
            ("B", complete("SELECT 1") + ready(b"I"), 3.0),
        ],
        queries=2,
        seconds=[1.0, 2.0],
    ),
    "begin commit": Case(
        cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T"))
        + cycle("INSERT INTO t VALUES (1)", 1.0, complete("INSERT 0 1"), ready(b"T"))
        + cycle("COMMIT", 2.0, complete("COMMIT"), ready(b"I")),
        queries=3,
        seconds=[0.5, 0.5, 0.5],
        commit=1,
    ),
    "begin rollback": Case(
        cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T"))
        + cycle("ROLLBACK", 1.0, complete("ROLLBACK"), ready(b"I")),
        queries=2,
        seconds=[0.5, 0.5],
        rollback=1,
    ),
    "error in a transaction then rollback": Case(
        cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T"))
        + cycle("SELEC", 1.0, error("ERROR", "42601"), ready(b"E"))
        + cycle("SELECT 1", 2.0, error("ERROR", "25P02"), ready(b"E"))
        + cycle("ROLLBACK", 3.0, complete("ROLLBACK"), ready(b"I")),
        queries=4,
        seconds=[0.5] * 4,
        rollback=1,
        errors={("ERROR", "42"): 1, ("ERROR", "25"): 1},
    ),
    "commit of a failed transaction": Case(
        cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T"))
        + cycle("SELEC", 1.0, error("ERROR", "42601"), ready(b"E"))
        + cycle("COMMIT", 2.0, complete("ROLLBACK"), ready(b"I")),
        queries=3,
        seconds=[0.5] * 3,
        rollback=1,
        errors={("ERROR", "42"): 1},
    ),
    "a COMMIT that fails is a rollback": Case(
        cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T"))
        + cycle("COMMIT", 1.0, error("ERROR", "40001"), ready(b"I")),
        queries=2,
        seconds=[0.5, 0.5],
        rollback=1,
        errors={("ERROR", "40"): 1},
    ),
    "rollback then commit": Case(
        cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T"))
        + cycle("ROLLBACK", 1.0, complete("ROLLBACK"), ready(b"I"))
        + cycle("BEGIN", 2.0, complete("BEGIN"), ready(b"T"))
        + cycle("COMMIT", 3.0, complete("COMMIT"), ready(b"I")),
        queries=4,
        seconds=[0.5] * 4,
        commit=1,
        rollback=1,
    ),
    "implicit transactions are not counted": Case(
        cycle("INSERT INTO t VALUES (1)", 0.0, complete("INSERT 0 1"), ready(b"I"))
        + cycle("BEGIN; SELECT 1; COMMIT", 1.0, complete("BEGIN"), complete("COMMIT"), ready(b"I"))
        + cycle(
            "ROLLBACK", 2.0, notice("no transaction in progress"), complete("ROLLBACK"), ready(b"I")
        ),
        queries=3,
        seconds=[0.5] * 3,
        notices=1,
    ),
    "a stale ROLLBACK tag does not turn a later commit into a rollback": Case(
        cycle("ROLLBACK", 0.0, complete("ROLLBACK"), ready(b"I"))
        + cycle("BEGIN", 1.0, complete("BEGIN"), ready(b"T"))
        + cycle("COMMIT", 2.0, complete("COMMIT"), ready(b"I")),
        queries=3,
        seconds=[0.5] * 3,
        commit=1,
    ),
    "extended protocol transaction": Case(
        [
            ("F", PARSE + BIND + EXECUTE + SYNC, 0.0),
            ("B", msg(b"1") + msg(b"2") + complete("BEGIN") + ready(b"T"), 0.25),
            ("F", BIND + EXECUTE + SYNC, 1.0),
            ("B", msg(b"2") + complete("COMMIT") + ready(b"I"), 1.25),
        ],
        queries=2,
        seconds=[0.25, 0.25],
        commit=1,
    ),
    "an error outside a transaction is counted, no transaction": Case(
        cycle("SELECT 1/0", 0.0, error("ERROR", "22012"), ready(b"I")),
        queries=1,
        seconds=[0.5],
        errors={("ERROR", "22"): 1},
    ),
    "notices": Case(
        [
            *cycle("DO $$ ... $$", 0.0, notice("one"), notice("two"), complete("DO"), ready(b"I")),
            ("B", notice("asynchronous, between requests"), 5.0),
        ],
        queries=1,
        seconds=[0.5],
        notices=3,
    ),
    "copy out": Case(
        cycle("COPY t TO STDOUT", 0.0, COPY_OUT, complete("COPY 3"), ready(b"I")),
        queries=1,
        seconds=[0.5],
    ),
    "copy in": Case(
        [
            ("F", query("COPY t FROM STDIN"), 0.0),
            ("B", msg(b"G", b"\x00\x00\x02\x00\x00\x00\x00"), 0.1),
            ("F", COPY_IN, 0.2),
            ("B", complete("COPY 51") + ready(b"I"), 0.5),
        ],
        queries=1,
        seconds=[0.5],
    ),
    "function call": Case(
        [
            ("F", msg(b"F", b"\x00\x00\x04\xd2\x00\x00\x00\x00\x00\x00"), 1.0),
            ("B", msg(b"V", b"\xff\xff\xff\xff") + ready(b"I"), 1.75),
        ],
        seconds=[0.75],
    ),
    "password and SASL messages are hopped over": Case(
        [
            ("F", msg(b"p", LOOKALIKES) + msg(b"p", b"SCRAM-SHA-256\x00" + LOOKALIKES), 0.0),
            *cycle("SELECT 1", 1.0, complete("SELECT 1"), ready(b"I")),
        ],
        queries=1,
        seconds=[0.5],
    ),
    "ReadyForQuery without a pending request observes nothing": Case(
        [
            ("B", ready(b"I") + ready(b"I"), 1.0),
            *cycle("SELECT 1", 2.0, complete("SELECT 1"), ready(b"I")),
        ],
        queries=1,
        seconds=[0.5],
    ),
    "flush without sync waits for the sync": Case(
        [
            ("F", PARSE + BIND + EXECUTE + msg(b"H"), 1.0),
            ("B", msg(b"1") + msg(b"2") + complete("SELECT 1"), 1.5),
            ("F", SYNC, 2.0),
            ("B", ready(b"I"), 2.5),
        ],
        queries=1,
        seconds=[0.5],
    ),
    "empty query": Case(
        cycle("", 0.0, msg(b"I"), ready(b"I")),
        queries=1,
        seconds=[0.5],
    ),
}


def run(steps: Iterable[tuple[Direction, Iterable[bytes | memoryview], float]]) -> Stats:
    stats = Stats()
    scanner = SessionScanner(stats)
    for direction, chunks, now in steps:
        feed = scanner.feed_frontend if direction == "F" else scanner.feed_backend
        for chunk in chunks:
            feed(chunk, now)
    assert not scanner.broken
    return stats


def expected(case: Case) -> Stats:
    stats = Stats(queries=case.queries, notices=case.notices, server_errors=case.errors)
    stats.transactions.update(commit=case.commit, rollback=case.rollback)
    stats.query_seconds.values.extend(case.seconds)
    return stats


def whole(steps: list[Step]) -> list[tuple[Direction, list[bytes], float]]:
    return [(d, [data], now) for d, data, now in steps]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_conversation(case: Case) -> None:
    assert run(whole(case.steps)) == expected(case)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_conversation_split_at_every_byte(case: Case) -> None:
    want = expected(case)
    for index, (direction, data, now) in enumerate(case.steps):
        for cut in range(len(data) + 1):
            steps = whole(case.steps)
            steps[index] = (direction, [data[:cut], data[cut:]], now)
            assert run(steps) == want, (index, cut)
    bytewise = [(d, [data[i : i + 1] for i in range(len(data))], t) for d, data, t in case.steps]
    assert run(bytewise) == want


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_memoryview_chunks_give_the_same_stats(case: Case) -> None:
    views = [
        (d, [memoryview(data)[i : i + 7] for i in range(0, len(data), 7)], t)
        for d, data, t in case.steps
    ]
    assert run(views) == expected(case)


def test_no_reference_to_a_chunk_is_kept() -> None:
    # bytearray cannot be resized while a memoryview of it exists: if the scanner kept a view
    # (of a header, a captured prefix, anything), the extend() below would raise BufferError.
    scanner = SessionScanner(Stats())
    stream = query("SELECT 1") + error("ERROR", "42601")
    for cut in range(len(stream) + 1):
        for buffer in (bytearray(stream[:cut]), bytearray(stream[cut:])):
            with memoryview(buffer) as view:
                scanner.feed_backend(view, 0.0)
            buffer.extend(b"more")
    assert not scanner.broken


# --- ErrorResponse labels ------------------------------------------------------------------

LONG = b"x" * ERROR_FIELDS_CAP

ERROR_LABELS: dict[str, tuple[bytes, tuple[str, str]]] = {
    "error": (fields((b"S", b"ERROR"), (b"V", b"ERROR"), (b"C", b"42601")), ("ERROR", "42")),
    "fatal": (fields((b"S", b"FATAL"), (b"V", b"FATAL"), (b"C", b"57P01")), ("FATAL", "57")),
    "panic": (fields((b"S", b"PANIC"), (b"V", b"PANIC"), (b"C", b"XX000")), ("PANIC", "XX")),
    "localised S, V wins": (
        fields((b"S", b"FEHLER"), (b"V", b"ERROR"), (b"C", b"22012")),
        ("ERROR", "22"),
    ),
    "V before S": (fields((b"V", b"FATAL"), (b"S", b"FATAL"), (b"C", b"08P01")), ("FATAL", "08")),
    "no V: fall back to S": (fields((b"S", b"ERROR"), (b"C", b"23505")), ("ERROR", "23")),
    "no V, localised S": (fields((b"S", b"ERREUR"), (b"C", b"23505")), ("OTHER", "23")),
    "warning severity": (fields((b"V", b"WARNING"), (b"C", b"01000")), ("OTHER", "01")),
    "lower-case severity": (fields((b"V", b"error"), (b"C", b"42601")), ("OTHER", "42")),
    "no severity": (fields((b"C", b"42601")), ("OTHER", "42")),
    "empty severity": (fields((b"V", b""), (b"C", b"42601")), ("OTHER", "42")),
    "no SQLSTATE": (fields((b"V", b"ERROR"), (b"M", b"oops")), ("ERROR", "XX")),
    "short SQLSTATE": (fields((b"V", b"ERROR"), (b"C", b"42")), ("ERROR", "XX")),
    "long SQLSTATE": (fields((b"V", b"ERROR"), (b"C", b"426010")), ("ERROR", "XX")),
    "lower-case SQLSTATE": (fields((b"V", b"ERROR"), (b"C", b"42p01")), ("ERROR", "XX")),
    "non-ASCII SQLSTATE": (fields((b"V", b"ERROR"), (b"C", "4ä601".encode())), ("ERROR", "XX")),
    "empty payload": (b"", ("OTHER", "XX")),
    "only the terminator": (b"\x00", ("OTHER", "XX")),
    "SQLSTATE not terminated": (b"VERROR\x00C42601", ("ERROR", "XX")),
    "SQLSTATE beyond the cap": (
        fields((b"V", b"ERROR"), (b"M", LONG), (b"C", b"42601")),
        ("ERROR", "XX"),
    ),
    "severity cut by the cap": (
        fields((b"M", LONG[:-8]), (b"V", b"ERROR"), (b"C", b"42601")),
        ("OTHER", "XX"),
    ),
    "fields after the terminator are ignored": (
        b"VERROR\x00\x00C42601\x00\x00",
        ("ERROR", "XX"),
    ),
}


@pytest.mark.parametrize(("payload", "key"), ERROR_LABELS.values(), ids=ERROR_LABELS.keys())
def test_error_labels(payload: bytes, key: tuple[str, str]) -> None:
    stream = msg(b"E", payload) + ready(b"I")
    for cut in range(len(stream) + 1):
        stats = run([("B", [stream[:cut], stream[cut:]], 0.0)])
        assert stats.server_errors == {key: 1}, cut


def test_error_fields_are_read_up_to_the_cap() -> None:
    # The C field ends exactly at the last byte of the cap: still read.
    head = fields((b"V", b"ERROR"))[:-1]
    filler = ERROR_FIELDS_CAP - len(head) - len(b"C42601\x00") - len(b"M\x00")
    payload = head + b"M" + b"y" * filler + b"\x00C42601\x00" + b"Dmore\x00\x00"
    assert payload.index(b"C42601\x00") + len(b"C42601\x00") == ERROR_FIELDS_CAP
    stats = run([("B", [msg(b"E", payload)], 0.0)])
    assert stats.server_errors == {("ERROR", "42"): 1}


# --- malformed length words -----------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 3, -1, -(2**31)])
def test_a_length_below_four_stops_the_frontend_only(length: int) -> None:
    bad = b"Q" + struct.pack("!i", length)
    stream = query("SELECT 1") + bad + query("SELECT 2") + query("SELECT 3")
    for cut in range(len(stream) + 1):
        stats = Stats()
        scanner = SessionScanner(stats)
        scanner.feed_frontend(stream[:cut], 1.0)
        scanner.feed_frontend(stream[cut:], 1.0)
        scanner.feed_frontend(query("SELECT 4"), 1.5)
        assert scanner.frontend_broken
        assert scanner.broken
        assert not scanner.backend_broken
        assert stats.queries == 1
        # The backend direction carries on: one answer pairs with the one counted query.
        scanner.feed_backend(complete("SELECT 1") + ready(b"I") + error("FATAL", "57P01"), 2.0)
        assert stats.query_seconds.values == [1.0]
        assert stats.server_errors == {("FATAL", "57"): 1}


@pytest.mark.parametrize("length", [0, 3, -1])
def test_a_length_below_four_stops_the_backend_only(length: int) -> None:
    stream = error("ERROR", "42601") + b"N" + struct.pack("!i", length) + notice("late")
    for cut in range(len(stream) + 1):
        stats = Stats()
        scanner = SessionScanner(stats)
        scanner.feed_backend(stream[:cut], 1.0)
        scanner.feed_backend(stream[cut:], 1.0)
        scanner.feed_backend(notice("later"), 1.0)
        assert scanner.backend_broken
        assert not scanner.frontend_broken
        assert stats.notices == 0
        assert stats.server_errors == {("ERROR", "42"): 1}
        scanner.feed_frontend(query("SELECT 1"), 2.0)
        assert stats.queries == 1


def test_a_length_of_exactly_four_is_an_empty_message() -> None:
    stats = run(whole([("F", SYNC + SYNC + msg(b"H") + EXECUTE, 1.0), ("B", ready(b"I") * 2, 2.0)]))
    assert stats.queries == 1
    assert stats.query_seconds.values == [1.0, 1.0]


ODD_READY = msg(b"Z") + ready(b"?") + ready(b"\x00")


@pytest.mark.parametrize(
    ("opening", "transactions"),
    [
        ([], {"commit": 0, "rollback": 0}),  # I stays I: an odd status was not taken as one
        (cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T")), {"commit": 1, "rollback": 0}),
        (
            cycle("BEGIN; SELEC", 0.0, complete("BEGIN"), error("ERROR", "42601"), ready(b"E")),
            {"commit": 0, "rollback": 1},
        ),
    ],
)
def test_ready_for_query_with_an_odd_status_keeps_the_last_status(
    opening: list[Step], transactions: dict[str, int]
) -> None:
    steps = [*opening, ("B", ODD_READY, 1.0), ("B", ready(b"I"), 2.0)]
    assert run(whole(steps)).transactions == transactions


def test_only_the_first_status_byte_is_read() -> None:
    steps = [*cycle("BEGIN", 0.0, complete("BEGIN"), ready(b"T")), ("B", ready(b"IT"), 1.0)]
    assert run(whole(steps)).transactions == {"commit": 1, "rollback": 0}


# --- chunks the scanner must not look at ----------------------------------------------------


class Opaque:
    """A chunk that can only be measured: reading any byte of it fails the test."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: object) -> bytes:
        raise AssertionError(f"the scanner read payload bytes at {index!r}")


@pytest.mark.parametrize("kind", [b"p", b"d", b"B", b"P"])
def test_a_chunk_inside_a_skipped_payload_is_never_read(kind: bytes) -> None:
    stats = Stats()
    scanner = SessionScanner(stats)
    size = 10_000_000
    scanner.feed_frontend(kind + struct.pack("!i", size + 4), 0.0)
    for _ in range(10):
        scanner.feed_frontend(Opaque(size // 10), 0.0)  # type: ignore[arg-type]
    scanner.feed_frontend(query("SELECT 1"), 1.0)
    scanner.feed_backend(ready(b"I"), 2.0)
    assert stats.queries == 1
    assert stats.query_seconds.values == [1.0]


def test_a_copy_data_header_in_the_middle_of_a_chunk_is_hopped_by_length() -> None:
    stats = Stats()
    scanner = SessionScanner(stats)
    scanner.feed_backend(complete("COPY 1") + b"d" + struct.pack("!i", 4 + 1000), 0.0)
    scanner.feed_backend(Opaque(1000), 0.0)  # type: ignore[arg-type]
    scanner.feed_backend(notice("after"), 0.0)
    assert stats.notices == 1


# --- pending requests ---------------------------------------------------------------------


def test_requests_in_one_chunk_share_their_start() -> None:
    stats = run(
        whole(
            [
                ("F", SYNC * 3 + query("SELECT 1"), 1.0),
                ("B", ready(b"I"), 1.5),
                ("B", ready(b"I") + ready(b"I"), 2.0),
                ("B", ready(b"I"), 4.0),
            ]
        )
    )
    assert stats.query_seconds.values == [0.5, 1.0, 1.0, 3.0]


def test_pending_requests_are_bounded_and_stay_paired() -> None:
    stats = Stats()
    scanner = SessionScanner(stats)
    extra = 10
    for i in range(MAX_PENDING_RUNS + extra):
        scanner.feed_frontend(SYNC, float(i))  # each in its own chunk: its own run
    assert len(scanner._pending) == MAX_PENDING_RUNS
    scanner.feed_backend(ready(b"I") * (MAX_PENDING_RUNS + extra), 1000.0)
    # The newest run absorbed the overflow and lost its timing; the others are exact.
    values = stats.query_seconds.values
    assert values == [1000.0 - i for i in range(MAX_PENDING_RUNS - 1)]
    assert not scanner._pending
    # Pairing survived: the next request is timed from its own start.
    scanner.feed_frontend(query("SELECT 1"), 2000.0)
    scanner.feed_backend(ready(b"I"), 2000.25)
    assert values[-1] == 0.25
    assert len(values) == MAX_PENDING_RUNS


# --- any bytes, any chunking --------------------------------------------------------------

PROPERTIES = settings(deadline=None, max_examples=300)

frontend_messages = st.one_of(
    st.sampled_from([query("SELECT 1"), PARSE, BIND, EXECUTE, SYNC, msg(b"H"), msg(b"X")]),
    st.builds(msg, st.sampled_from([b"Q", b"E", b"S", b"F", b"p", b"d"]), st.binary(max_size=40)),
)
backend_messages = st.one_of(
    st.sampled_from([ready(b"I"), ready(b"T"), ready(b"E"), complete("ROLLBACK"), ROW]),
    st.builds(error, st.sampled_from(["ERROR", "FATAL", "WARNING"]), st.text(max_size=6)),
    st.builds(msg, st.sampled_from([b"Z", b"C", b"E", b"N", b"d"]), st.binary(max_size=40)),
)
junk = st.one_of(
    st.binary(max_size=12),
    st.builds(
        lambda k, n: k + struct.pack("!i", n),
        st.sampled_from([b"Q", b"Z", b"d"]),
        st.integers(-(2**31), 2**31 - 1),
    ),
)


def streams(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(st.one_of(messages, junk), max_size=12).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def scan(frontend: list[bytes], backend: list[bytes]) -> tuple[Stats, bool, bool]:
    stats = Stats()
    scanner = SessionScanner(stats)
    for chunk in frontend:
        scanner.feed_frontend(chunk, 1.0)
    for chunk in backend:
        scanner.feed_backend(memoryview(chunk), 3.0)
    return stats, scanner.frontend_broken, scanner.backend_broken


@PROPERTIES
@given(
    streams(frontend_messages),
    streams(backend_messages),
    st.lists(st.integers(0, 1000), max_size=8),
    st.lists(st.integers(0, 1000), max_size=8),
)
def test_any_bytes_in_any_chunking_give_the_same_stats(
    frontend: bytes, backend: bytes, front_cuts: list[int], back_cuts: list[int]
) -> None:
    reference = scan([frontend], [backend])
    assert scan(chunked(frontend, front_cuts), chunked(backend, back_cuts)) == reference
    bytewise = scan(
        [frontend[i : i + 1] for i in range(len(frontend))],
        [backend[i : i + 1] for i in range(len(backend))],
    )
    assert bytewise == reference
    stats, _, _ = reference
    assert set(stats.transactions) == {"commit", "rollback"}
    for severity, sqlstate_class in stats.server_errors:
        assert severity in {"ERROR", "FATAL", "PANIC", "OTHER"}
        assert len(sqlstate_class) == 2
        assert sqlstate_class.isascii()
        assert sqlstate_class.isalnum()
        assert sqlstate_class.upper() == sqlstate_class
    assert all(value == 2.0 for value in stats.query_seconds.values)
