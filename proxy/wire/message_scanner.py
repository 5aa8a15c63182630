"""Watch the relayed message stream for metrics: headers only, both directions, no copies.

After authentication the relay forwards every chunk unchanged; this scanner is handed the same
chunk first and learns from it what Prometheus needs (queries, request latency, transaction
outcomes, server errors by class, notices). It is built around two promises to the relay:

* **It is cheap.** A chunk is walked header to header with ``struct.unpack_from`` on the chunk
  itself; a message we do not care about is skipped by adding its length, never sliced, and a
  chunk that lies entirely inside a message costs O(1). Across chunk boundaries at
  most four header bytes are carried, plus a capped prefix of the few messages whose payload is
  read (ReadyForQuery: 1 byte, CommandComplete: 64, ErrorResponse: 1024).
* **It never breaks a session.** Nothing a peer sends can make it raise. A length word below 4
  (which PostgreSQL itself treats as a broken connection) only turns that direction's scanning
  off for the rest of the session (``frontend_broken`` / ``backend_broken``); the relay keeps
  forwarding bytes regardless.

Payloads that could hold secrets are never looked at: the client's ``p`` messages (password,
SASL) are hopped over by length like CopyData, so their bytes are never read, only counted past.

Transactions are counted from ReadyForQuery status transitions, the only place the server says
what happened: ``T`` -> ``I`` is a commit unless the request's last CommandComplete was
``ROLLBACK`` or an ErrorResponse came after it (a COMMIT that failed on a deferred constraint
or a serialization failure); ``E`` -> ``I`` is a rollback. A transaction that starts and ends
inside one request (an implicit single-statement transaction, or ``BEGIN; ...; COMMIT`` sent as
one simple Query) goes ``I`` -> ``I`` and is deliberately *not* counted: from ReadyForQuery
alone it cannot be told apart from a plain autocommit statement.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

# Caps on what is read from a payload; everything beyond is skipped unseen.
COMMAND_TAG_CAP: Final = 64
ERROR_FIELDS_CAP: Final = 1024

# Requests awaiting their ReadyForQuery are remembered as runs (one per chunk, since every
# request in a chunk shares its arrival time). A client that pipelines without reading cannot
# grow this past the cap: further requests join the newest run, whose timing is then dropped
# rather than reported wrongly, so ReadyForQuery still pairs with the right request.
MAX_PENDING_RUNS: Final = 256

SEVERITIES: Final = frozenset({"ERROR", "FATAL", "PANIC"})
OTHER_SEVERITY: Final = "OTHER"
UNKNOWN_CLASS: Final = "XX"

_INT32: Final = struct.Struct("!i")
_HEADER: Final = struct.Struct("!Bi")  # type byte, length (counting itself, signed as in PG)
_SEVERITY_LABELS: Final = {s.encode(): s for s in SEVERITIES}
_SQLSTATE_RE: Final = re.compile(rb"[0-9A-Z]{5}")

_IDLE: Final = ord("I")
_IN_TRANSACTION: Final = ord("T")
_FAILED: Final = ord("E")
_STATUSES: Final = frozenset({_IDLE, _IN_TRANSACTION, _FAILED})
_ROLLBACK: Final = b"ROLLBACK"


class _Observer(Protocol):
    def observe(self, amount: float, /) -> None: ...


class ProtocolStats(Protocol):
    """Where the counts go; ``proxy/metrics.py`` provides the real one.

    A structural type so the scanner does not depend on ``prometheus_client`` and tests can
    count into a plain object. The containers are read-only properties here (the scanner only
    mutates what they hold), which lets an implementation use plain attributes of any subtype,
    such as a Prometheus histogram for ``query_seconds``; a mutable protocol attribute would
    demand exactly the declared type.
    """

    queries: int
    notices: int

    @property
    def transactions(self) -> dict[str, int]:
        """Keys ``"commit"`` and ``"rollback"``, pre-populated."""

    @property
    def server_errors(self) -> dict[tuple[str, str], int]:
        """(severity, SQLSTATE class) -> count."""

    @property
    def query_seconds(self) -> _Observer:
        """Request start to its ReadyForQuery."""


_Handler = Callable[["SessionScanner", bytes, float], None]


def _no_handler(_scanner: SessionScanner, _prefix: bytes, _now: float) -> None:
    """Placeholder while no payload is being captured, so the slot never holds None."""


class _Direction:
    """Where one direction's stream stands between two chunks."""

    __slots__ = ("broken", "capture", "handler", "header", "remaining", "table", "want")

    def __init__(self, table: dict[int, tuple[int, _Handler]]) -> None:
        self.table = table  # message type -> (payload bytes to read, handler)
        self.remaining = 0  # payload bytes of the current message not yet passed
        self.header = b""  # a header split across chunks (at most 4 bytes)
        self.want = 0  # payload prefix bytes still to capture for ``handler``
        self.capture = bytearray()
        self.handler: _Handler = _no_handler
        self.broken = False


class _Run:
    """Requests that arrived in one chunk, awaiting one ReadyForQuery each."""

    __slots__ = ("count", "start")

    def __init__(self, start: float) -> None:
        self.start: float | None = start  # None: timing dropped (see MAX_PENDING_RUNS)
        self.count = 1


def _first_word(tag: bytes) -> bytes:
    return tag.split(b"\x00", 1)[0].split(b" ", 1)[0]


def _error_labels(prefix: bytes) -> tuple[str, str]:
    """(severity, SQLSTATE class) of an ErrorResponse, from a bounded set of labels.

    ``V`` is the untranslated severity (protocol 3.0 since PostgreSQL 9.6); ``S`` may be
    localised ("FEHLER"), which then counts as OTHER. A missing, truncated or malformed SQLSTATE
    counts as class XX, so no peer can invent label values.
    """
    fields = prefix.split(b"\x00")
    del fields[-1]  # after the last NUL: empty, or a field cut off by the cap
    severity = localised = sqlstate = None
    for field in fields:
        if not field:
            break  # the list's terminator
        code = field[0]
        if code == 0x56:  # 'V'
            severity = field[1:]
        elif code == 0x53:  # 'S'
            localised = field[1:]
        elif code == 0x43:  # 'C'
            sqlstate = field[1:]
    if severity is None:
        severity = localised
    label = _SEVERITY_LABELS.get(severity, OTHER_SEVERITY) if severity else OTHER_SEVERITY
    if sqlstate is not None and _SQLSTATE_RE.fullmatch(sqlstate):
        return label, sqlstate[:2].decode("ascii")
    return label, UNKNOWN_CLASS


class SessionScanner:
    """Both directions of one session; the two directions share state (pending request times).

    ``feed_frontend`` takes client -> server bytes from just after the StartupMessage,
    ``feed_backend`` server -> client bytes from just after the first ReadyForQuery, so each
    first chunk begins with a message type byte. ``now`` must come from a monotonic clock
    (``loop.time()``): latencies are differences of it. Chunks may be ``bytes`` or a
    ``memoryview`` of unsigned bytes; no reference to a chunk is kept after the call.
    """

    __slots__ = ("_backend", "_frontend", "_last_tag", "_pending", "_stats", "_status")

    def __init__(self, stats: ProtocolStats) -> None:
        self._stats = stats
        self._frontend = _Direction(_FRONTEND_TABLE)
        self._backend = _Direction(_BACKEND_TABLE)
        self._pending: deque[_Run] = deque()
        self._status = _IDLE
        self._last_tag = b""

    @property
    def frontend_broken(self) -> bool:
        """The client sent a length word below 4; its direction is no longer scanned."""
        return self._frontend.broken

    @property
    def backend_broken(self) -> bool:
        """The server sent a length word below 4; its direction is no longer scanned."""
        return self._backend.broken

    @property
    def broken(self) -> bool:
        return self._frontend.broken or self._backend.broken

    def feed_frontend(self, data: bytes | memoryview, now: float) -> None:
        direction = self._frontend
        if not direction.broken:
            self._scan(direction, data, now)

    def feed_backend(self, data: bytes | memoryview, now: float) -> None:
        direction = self._backend
        if not direction.broken:
            self._scan(direction, data, now)

    # -- framing ------------------------------------------------------------------------------

    def _scan(self, d: _Direction, data: bytes | memoryview, now: float) -> None:
        n = len(data)
        pos = d.remaining
        if pos:
            if d.want:
                self._capture(d, data, n, now)
            if pos >= n:
                d.remaining = pos - n  # the whole chunk is payload: nothing else to do
                return
            d.remaining = 0
        elif d.header:
            pos = self._complete_header(d, data, n, now)
            if pos < 0:
                return
        table = d.table
        unpack = _HEADER.unpack_from
        last_header = n - 5
        while pos <= last_header:
            kind, length = unpack(data, pos)
            if length < 4:
                d.broken = True
                return
            entry = table.get(kind)
            if entry is None:
                pos += 1 + length
                continue
            # _begin() inlined: these are a third of the messages in an OLTP exchange.
            cap, handler = entry
            body = pos + 5
            pos += 1 + length
            end = body + (cap if cap < length - 4 else length - 4)
            if end <= n:
                handler(self, bytes(data[body:end]) if end > body else b"", now)
            else:
                d.capture = bytearray(data[body:])
                d.want = end - n
                d.handler = handler
        if pos > n:
            d.remaining = pos - n
        elif pos < n:
            d.header = bytes(data[pos:])

    def _complete_header(self, d: _Direction, data: bytes | memoryview, n: int, now: float) -> int:
        """Offset in ``data`` of the message after the one whose header was split, or -1."""
        need = 5 - len(d.header)
        header = d.header + bytes(data[:need])
        if len(header) < 5:
            d.header = header
            return -1
        d.header = b""
        length: int = _INT32.unpack_from(header, 1)[0]
        if length < 4:
            d.broken = True
            return -1
        entry = d.table.get(header[0])
        if entry is None:
            return need + length - 4
        return self._begin(d, entry, data, need, length - 4, n, now)

    def _begin(
        self,
        d: _Direction,
        entry: tuple[int, _Handler],
        data: bytes | memoryview,
        body: int,
        size: int,
        n: int,
        now: float,
    ) -> int:
        """Handle a message we care about whose payload starts at ``body``; return its end."""
        cap, handler = entry
        want = cap if cap < size else size
        end = body + want
        if end <= n:
            handler(self, bytes(data[body:end]) if want else b"", now)
        else:
            d.capture = bytearray(data[body:])
            d.want = end - n
            d.handler = handler
        return body + size

    def _capture(self, d: _Direction, data: bytes | memoryview, n: int, now: float) -> None:
        want = d.want
        if want > n:
            d.capture += data
            d.want = want - n
            return
        d.capture += data[:want]
        prefix = bytes(d.capture)
        handler = d.handler
        d.want = 0
        d.capture = bytearray()
        d.handler = _no_handler
        handler(self, prefix, now)

    # -- frontend messages --------------------------------------------------------------------

    def _on_query(self, _prefix: bytes, now: float) -> None:
        self._stats.queries += 1
        self._request(now)

    def _on_execute(self, _prefix: bytes, _now: float) -> None:
        self._stats.queries += 1

    def _on_sync(self, _prefix: bytes, now: float) -> None:
        self._request(now)

    def _request(self, now: float) -> None:
        """A request the server answers with exactly one ReadyForQuery."""
        pending = self._pending
        if pending:
            last = pending[-1]
            if last.start == now:
                last.count += 1
                return
            if len(pending) >= MAX_PENDING_RUNS:
                last.start = None
                last.count += 1
                return
        pending.append(_Run(now))

    # -- backend messages ---------------------------------------------------------------------

    def _on_ready(self, prefix: bytes, now: float) -> None:
        pending = self._pending
        if pending:
            run = pending[0]
            if run.count > 1:
                run.count -= 1
            else:
                pending.popleft()
            if run.start is not None:
                self._stats.query_seconds.observe(now - run.start)

        if prefix:
            status = prefix[0]
            previous = self._status
            if status == _IDLE and previous != _IDLE:
                if previous == _FAILED or _first_word(self._last_tag) == _ROLLBACK:
                    outcome = "rollback"
                else:
                    outcome = "commit"
                transactions = self._stats.transactions
                transactions[outcome] = transactions.get(outcome, 0) + 1
            if status in _STATUSES:
                self._status = status
        self._last_tag = b""

    def _on_command_complete(self, prefix: bytes, _now: float) -> None:
        self._last_tag = prefix  # capped; its first word is only needed when a transaction ends

    def _on_error(self, prefix: bytes, _now: float) -> None:
        # Only a failing COMMIT (deferred constraint, serialization failure) takes the status
        # from T straight to I with an error; the transaction is then rolled back, as if the
        # tag had said so. Any other error in a transaction leaves status E.
        self._last_tag = _ROLLBACK
        key = _error_labels(prefix)
        errors = self._stats.server_errors
        errors[key] = errors.get(key, 0) + 1

    def _on_notice(self, _prefix: bytes, _now: float) -> None:
        self._stats.notices += 1


# Message types worth stopping at, with how much of the payload to read. Every other type
# (CopyData, DataRow, the client's password and SASL messages, ...) is hopped over by length.
_FRONTEND_TABLE: Final[dict[int, tuple[int, _Handler]]] = {
    ord("Q"): (0, SessionScanner._on_query),  # Query
    ord("E"): (0, SessionScanner._on_execute),  # Execute
    ord("S"): (0, SessionScanner._on_sync),  # Sync
    ord("F"): (0, SessionScanner._on_sync),  # FunctionCall
}
_BACKEND_TABLE: Final[dict[int, tuple[int, _Handler]]] = {
    ord("Z"): (1, SessionScanner._on_ready),  # ReadyForQuery
    ord("C"): (COMMAND_TAG_CAP, SessionScanner._on_command_complete),  # CommandComplete
    ord("E"): (ERROR_FIELDS_CAP, SessionScanner._on_error),  # ErrorResponse
    ord("N"): (0, SessionScanner._on_notice),  # NoticeResponse
}
