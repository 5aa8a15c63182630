"""Micro-benchmark of the metrics scanner on the relay's hot path (not collected by pytest).

Run from the repository root: ``.venv/bin/python -m tests.bench_scanner``.

Two workloads, each fed exactly as the relay would (whole chunks, same bytes objects):

* COPY out: a server streaming 100-byte CopyData messages in 64 KiB chunks, so messages
  straddle chunk boundaries. This is the worst case for bytes per message.
* pgbench -S: Bind/Execute/Sync from the client, BindComplete/RowDescription/DataRow/
  CommandComplete/ReadyForQuery back, one chunk per direction per transaction. This is the
  worst case for Python work per byte.

For scale, the pgbench workload also prints a baseline loop that only calls an empty method
per chunk: the difference is what the scanner adds to ``data_received``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.wire.message_scanner import SessionScanner

CHUNK = 64 * 1024
COPY_BYTES = 60 * 1024 * 1024
COPY_MESSAGE = 100  # bytes on the wire, header included
PGBENCH_TRANSACTIONS = 200_000
ROUNDS = 5


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


class Observer:
    def __init__(self) -> None:
        self.count = 0

    def observe(self, amount: float, /) -> None:
        self.count += 1


@dataclass
class Stats:
    queries: int = 0
    notices: int = 0
    transactions: dict[str, int] = field(default_factory=lambda: {"commit": 0, "rollback": 0})
    server_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    query_seconds: Observer = field(default_factory=Observer)


def copy_out_chunks() -> tuple[list[bytes], int]:
    row = msg(b"d", b"x" * (COPY_MESSAGE - 6) + b"\n")
    assert len(row) == COPY_MESSAGE
    count = COPY_BYTES // COPY_MESSAGE
    stream = row * count
    return [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)], count


def pgbench_exchange() -> tuple[bytes, bytes, int]:
    aid = struct.pack("!hhih", 0, 1, 4, 0) + b"\x00\x01\x86\xa0"  # 0 formats, 1 param, int4
    frontend = (
        msg(b"B", b"\x00P0_1\x00" + aid + b"\x00\x00")
        + msg(b"E", b"\x00\x00\x00\x00\x00")
        + msg(b"S")
    )
    row_description = msg(
        b"T",
        struct.pack("!h", 1) + b"abalance\x00" + struct.pack("!ihihih", 16397, 3, 23, 4, -1, 0),
    )
    backend = (
        msg(b"2")
        + row_description
        + msg(b"D", struct.pack("!hi", 1, 4) + b"1234")
        + msg(b"C", b"SELECT 1\x00")
        + msg(b"Z", b"I")
    )
    return frontend, backend, 3 + 5


def best_of(run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - start)
    return best


def report(name: str, elapsed_ns: float, messages: int, size: int) -> None:
    per_message = elapsed_ns / messages
    mb_per_s = size / (elapsed_ns / 1e9) / 1e6
    print(f"{name:<34} {per_message:8.1f} ns/message {mb_per_s:10.1f} MB/s")


class _Null:
    def feed(self, data: bytes, now: float) -> None:
        pass


def main() -> None:
    chunks, copy_messages = copy_out_chunks()
    copy_size = sum(len(c) for c in chunks)

    def copy_scan() -> None:
        scanner = SessionScanner(Stats())
        for chunk in chunks:
            scanner.feed_backend(chunk, 1.0)

    print(f"COPY out: {copy_messages} messages of {COPY_MESSAGE} bytes in {len(chunks)} chunks")
    elapsed = best_of(copy_scan)
    report("  scanner", elapsed, copy_messages, copy_size)
    print(f"{'':<34} {elapsed / len(chunks) / 1000:8.1f} us per 64 KiB chunk")

    frontend, backend, per_exchange = pgbench_exchange()
    messages = PGBENCH_TRANSACTIONS * per_exchange
    size = PGBENCH_TRANSACTIONS * (len(frontend) + len(backend))
    stats = Stats()

    def pgbench_scan() -> None:
        scanner = SessionScanner(stats)
        for i in range(PGBENCH_TRANSACTIONS):
            now = float(i)
            scanner.feed_frontend(frontend, now)
            scanner.feed_backend(backend, now + 0.5)

    def pgbench_null() -> None:
        null = _Null()
        for i in range(PGBENCH_TRANSACTIONS):
            now = float(i)
            null.feed(frontend, now)
            null.feed(backend, now + 0.5)

    print(
        f"pgbench -S: {PGBENCH_TRANSACTIONS} transactions, {per_exchange} messages and "
        f"{len(frontend) + len(backend)} bytes each"
    )
    elapsed = best_of(pgbench_scan)
    report("  scanner", elapsed, messages, size)
    print(f"{'':<34} {elapsed / PGBENCH_TRANSACTIONS:8.1f} ns/transaction")
    report("  baseline (empty call per chunk)", best_of(pgbench_null), messages, size)
    assert stats.queries == ROUNDS * PGBENCH_TRANSACTIONS
    assert stats.query_seconds.count == ROUNDS * PGBENCH_TRANSACTIONS


if __name__ == "__main__":
    main()
