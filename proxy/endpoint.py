"""One side of a session (client or upstream) as an asyncio ``Protocol``.

Why a Protocol and not streams: the relay's hot path is ``data_received`` handing the very same
``bytes`` object to the other side's ``transport.write`` — no copy, no per-message Python work,
no task switch. Backpressure is the transport's own flow control: when the other side's write
buffer passes its high-water mark, asyncio calls ``pause_writing`` on *that* endpoint, which stops
reading from the endpoint feeding it; ``resume_writing`` starts it again. Memory per session is
therefore bounded by the two transports' write buffers, whatever the peers do.

Before relaying starts (startup and authentication) the session coroutine reads from an endpoint
with ``await read()``; the inbox is bounded and reading pauses when it is full.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from proxy.metrics import RouteStats

INBOX_LIMIT: Final = 64 * 1024


class Endpoint(asyncio.Protocol):
    """A transport plus the bookkeeping the relay needs; ``name`` is 'client' or 'upstream'."""

    __slots__ = (
        "_closed",
        "_inbox",
        "_inbox_size",
        "_read_paused",
        "_waiter",
        "bytes_in",
        "closed_exc",
        "counts_upstream_bytes",
        "eof",
        "name",
        "observe",
        "on_connected",
        "sink",
        "source",
        "stats",
        "tls",
        "transport",
        "write_paused",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.tls = False
        # Set by the listener so an accepted connection starts its session coroutine.
        self.on_connected: Callable[[Endpoint], None] | None = None
        # Metrics: byte counters bumped inline, and the protocol scanner for this direction
        # (``None`` when protocol metrics are off or before the session is established).
        self.stats: RouteStats | None = None
        self.counts_upstream_bytes = name == "upstream"
        self.observe: Callable[[bytes, float], None] | None = None
        self.sink: Endpoint | None = None  # where data read here goes, once relaying
        self.source: Endpoint | None = None  # who writes into this endpoint while relaying
        self.bytes_in = 0
        self.eof = False
        self.write_paused = False
        self.closed_exc: BaseException | None = None
        self._inbox: list[bytes] = []
        self._inbox_size = 0
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)
        self.tls = self.transport.get_extra_info("ssl_object") is not None
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            observe = self.observe
            if observe is None:
                sink.write(data)
            else:
                # Forward first, then scan: the arrival time is taken before the write, but the
                # protocol metrics' work happens while the bytes are already on their way, so it
                # stays off every query's round trip. The scanner keeps no reference to ``data``.
                now = time.monotonic()
                sink.write(data)
                observe(data, now)
        size = len(data)
        self.bytes_in += size
        stats = self.stats
        if stats is not None:
            if self.counts_upstream_bytes:
                stats.bytes_server_to_client += size
            else:
                stats.bytes_client_to_server += size
        if sink is not None:
            return
        self._inbox.append(data)
        self._inbox_size += size
        if self._inbox_size >= INBOX_LIMIT:
            self._pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        sink = self.sink
        if sink is not None:
            sink.peer_finished()
        self._wake()
        # Keep our write side open: the other direction may still be relaying (half-close).
        # Only the client leg asks: on the upstream leg EOF means the server ended the session
        # (and asyncio's TLS transport, still selectable, warns if asked).
        return None if self.tls else True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_exc = exc
        self.eof = True
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake()
        sink = self.sink
        if sink is not None:
            sink.close()
            source = self.source
            if source is not None:
                # Nobody left to deliver to: stop reading and let the session end.
                source.close()
        # Not relaying yet (authentication): the session coroutine sees the loss through
        # read() and sends the client an error of its own before closing it.

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.source is not None:
            self.source._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.source is not None:
            self.source._resume_reading()

    # -- used by the session ------------------------------------------------------------------

    async def read(self) -> bytes:
        """Everything buffered so far, waiting for at least one byte; ``b''`` at EOF."""
        while not self._inbox:
            if self.eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take_inbox()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def relay_to(self, sink: Endpoint) -> None:
        """From now on, bytes arriving here go straight to ``sink`` (buffered ones first)."""
        if self._inbox:
            data = self._take_inbox()
            if self.observe is not None:
                self.observe(data, time.monotonic())
            sink.write(data)
        self.sink = sink
        sink.source = self
        if sink.write_paused:
            self._pause_reading()
        else:
            self._resume_reading()
        if self.eof:
            if self._closed.done():
                sink.close()
            else:
                sink.peer_finished()

    def peer_finished(self) -> None:
        """The endpoint feeding us reached EOF: pass the half-close on.

        On the upstream leg ``write_eof`` sends TLS close_notify and the server's remaining
        answers are still relayed (``tls_transport``). asyncio's TLS transport (selectable for
        comparison) cannot half-close: the leg is then closed, after flushing, instead.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def close(self) -> None:
        """Close after flushing what is already queued for this peer."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def closed(self) -> asyncio.Future[None]:
        """Resolves once the transport is gone (``connection_lost`` ran)."""
        return self._closed

    # -- internals ----------------------------------------------------------------------------

    def _take_inbox(self) -> bytes:
        chunks = self._inbox
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._inbox = []
        self._inbox_size = 0
        if self.sink is None:
            self._resume_reading()
        return data

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            if not self.transport.is_closing():
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


CLOSE_TIMEOUT: Final = 3.0  # above upstream.TLS_SHUTDOWN_TIMEOUT: a TLS close gets its chance


async def close_endpoints(*endpoints: Endpoint | None) -> None:
    """Close (flushing) and wait until the transports are gone; abort what lingers.

    A client that never reads would keep a flushing close open forever, and a TLS close waits
    for the peer's close_notify: both are bounded here.
    """
    live = [ep for ep in endpoints if ep is not None and ep.transport is not None]
    for ep in live:
        ep.close()
    waiting = [ep.closed for ep in live if not ep.closed.done()]
    if not waiting:
        return
    _done, pending = await asyncio.wait(waiting, timeout=CLOSE_TIMEOUT)
    if pending:
        for ep in live:
            if not ep.closed.done():
                ep.abort()
        await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
