"""The opt-in warm TLS pool: upstream connections kept ready up to, never past, the handshake.

A managed server is milliseconds away, and opening a verified TLS session costs three round
trips before the client's first byte can go (TCP, SSLRequest and its one-byte answer, TLS 1.3)
— for an application that opens a connection per request, most of its connection latency. The
pool pays those round trips ahead of time: it keeps ``size`` connections through TCP, the
SSLRequest and the verified handshake, and each new client takes one and sends its own
StartupMessage on it at once.

Why it stops there: everything after the handshake belongs to the client (its user, database
and authentication). A pooled connection has sent nothing inside TLS, so handing it out is
indistinguishable, to the server, from a client that took a moment to send its StartupMessage.

What limits that moment is the server's ``authentication_timeout`` (60 s by default), which runs
from accept until the StartupMessage; once it passes, the backend exits. So a connection older
than ``max_age`` (validated below that timeout) is closed, and its replacement is dialled
shortly *before* that, so a steady pool never has a gap. A connection the server closed or
wrote to (it must not speak before our StartupMessage) is discarded, never handed out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from proxy.errors import UpstreamError
from proxy.metrics import RouteStats
from proxy.settings import PoolSettings
from proxy.upstream import TLS_SHUTDOWN_TIMEOUT, UpstreamConnection

log = logging.getLogger("proxy.pool")

# The replacement of an ageing connection is dialled this long (plus twice its own set-up
# time) before the old one expires, so the old one stays available while the new one connects.
REFRESH_LEAD: Final = 1.0
# While the upstream fails, the pool retries with one connection at a time, backing off
# between these bounds: it must not hammer a server that is down, nor inflate the error count.
RETRY_MIN: Final = 0.5
RETRY_MAX: Final = 30.0


@dataclass(slots=True)
class _Idle:
    conn: UpstreamConnection
    born: float  # monotonic time the dial *started*: the server's clock started about then
    refresh_at: float  # from here on a replacement is dialled
    expires_at: float  # from here on it is never handed out


class WarmPool:
    """``size`` verified upstream connections with nothing sent on them, for one route.

    ``take()`` is synchronous and never waits: a session either gets a warm connection or
    dials its own (a miss), so the pool can only make connecting faster. One background task
    keeps the pool full; ``close()`` stops it and closes the idle connections.
    """

    __slots__ = (
        "_closed",
        "_closing",
        "_dial",
        "_dialing",
        "_failures",
        "_idle",
        "_retry_at",
        "_task",
        "_wake",
        "_warned_early_close",
        "_watchers",
        "name",
        "settings",
        "stats",
    )

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        dial: Callable[[], Awaitable[UpstreamConnection]],
        stats: RouteStats,
    ) -> None:
        self.name = name
        self.settings = settings
        self.stats = stats
        self._dial = dial
        self._idle: collections.deque[_Idle] = collections.deque()
        self._dialing: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Future[None]] = set()  # ``closed`` of discarded connections
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = 0
        self._retry_at = 0.0
        self._warned_early_close = False
        self._watchers: list[asyncio.Future[None]] = []

    # -- used by the route --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    def take(self) -> UpstreamConnection | None:
        """The oldest usable warm connection (it is closest to expiry), or ``None``: a miss."""
        now = time.monotonic()
        found: UpstreamConnection | None = None
        while self._idle and not self._closed:
            entry = self._idle.popleft()
            if self._usable(entry, now):
                entry.conn.endpoint.closed.remove_done_callback(self._on_lost)
                found = entry.conn
                break
            self._discard(entry, now)
        self.stats.pool_connections["hit" if found is not None else "miss"] += 1
        self._publish()
        self._wake.set()
        return found

    @property
    def idle(self) -> int:
        return len(self._idle)

    def idle_connections(self) -> list[UpstreamConnection]:
        """The warm connections, oldest first (for the status page, tests and the benchmark)."""
        return [entry.conn for entry in self._idle]

    async def changed(self) -> None:
        """Return at the next change of the idle set: an event to wait on instead of polling."""
        waiter = asyncio.get_running_loop().create_future()
        self._watchers.append(waiter)
        await waiter

    def close(self) -> None:
        """Stop refilling and close every idle connection (a reload, a removed route, drain).

        Connections already handed out belong to their sessions and are not touched.
        """
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for task in self._dialing:
            task.cancel()
        now = time.monotonic()
        while self._idle:
            self._discard(self._idle.popleft(), now, quiet=True)
        self.stats.pool_idle = 0
        self._publish()

    async def wait_closed(self) -> None:
        """After ``close()``: wait for the background work and the TLS close of idle legs.

        Bounded: a server that never answers our close_notify costs at most asyncio's TLS
        shutdown timeout, after which the transport is aborted.
        """
        pending: list[asyncio.Future[None]] = [*self._dialing, *self._closing]
        if self._task is not None:
            pending.append(self._task)
        if pending:
            await asyncio.wait(pending, timeout=TLS_SHUTDOWN_TIMEOUT + 1)

    # -- the background task ------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            self._prune(now)
            fresh = sum(1 for entry in self._idle if now < entry.refresh_at)
            wanted = self.settings.size - fresh - len(self._dialing)
            if self._failures:
                # Failing: one attempt at a time, after the back-off.
                wanted = min(wanted, 1 - len(self._dialing)) if now >= self._retry_at else 0
            for _ in range(max(wanted, 0)):
                task = asyncio.get_running_loop().create_task(self._dial_one())
                self._dialing.add(task)
                task.add_done_callback(self._dialing.discard)
            timeout = self._next_deadline(now)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _dial_one(self) -> None:
        born = time.monotonic()
        try:
            conn = await self._dial()
        except UpstreamError as exc:
            # Counted and remembered for readiness by RouteRuntime; logged here once per outage.
            if not self._failures:
                log.warning(
                    "route %r: the warm pool could not open an upstream connection (clients "
                    "dial their own meanwhile): %s",
                    self.name,
                    exc,
                )
            self._note_failure()
            return
        except Exception:  # a bug, not the network: say so loudly, keep the route working
            log.exception("route %r: the warm pool failed unexpectedly", self.name)
            self._note_failure()
            return
        if self._failures:
            log.info("route %r: the warm pool connects to the upstream again", self.name)
            self._failures = 0
        if self._closed:  # closed while we were dialling
            conn.endpoint.close()
            return
        max_age = self.settings.max_age
        setup = conn.connect_seconds + conn.handshake_seconds
        lead = min(max_age / 2, REFRESH_LEAD + 2 * setup)
        entry = _Idle(conn, born, born + max_age - lead, born + max_age)
        conn.endpoint.closed.add_done_callback(self._on_lost)
        self._idle.append(entry)
        self._publish()
        self._wake.set()

    def _note_failure(self) -> None:
        self._failures += 1
        backoff = min(RETRY_MAX, RETRY_MIN * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + backoff
        self._wake.set()

    def _prune(self, now: float) -> None:
        """Drop expired, lost and talkative connections; trim the oldest beyond ``size``."""
        kept: collections.deque[_Idle] = collections.deque()
        for entry in self._idle:
            if self._usable(entry, now):
                kept.append(entry)
            else:
                self._discard(entry, now)
        while len(kept) > self.settings.size:
            self._discard(kept.popleft(), now, quiet=True)
        self._idle = kept
        self._publish()

    def _next_deadline(self, now: float) -> float | None:
        """Seconds until something changes on its own: a refresh, an expiry, a retry."""
        times = [t for e in self._idle for t in (e.refresh_at, e.expires_at) if t > now]
        if self._failures and now < self._retry_at:
            times.append(self._retry_at)
        return max(min(times) - now, 0.0) if times else None

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _usable(entry: _Idle, now: float) -> bool:
        endpoint = entry.conn.endpoint
        transport = endpoint.transport
        return (
            now < entry.expires_at
            and not endpoint.eof
            and not endpoint.closed.done()
            and endpoint.bytes_in == 0  # the server must not speak before our StartupMessage
            and transport is not None
            and not transport.is_closing()
        )

    def _discard(self, entry: _Idle, now: float, *, quiet: bool = False) -> None:
        endpoint = entry.conn.endpoint
        endpoint.closed.remove_done_callback(self._on_lost)
        age = now - entry.born
        if not quiet and now < entry.expires_at and not self._warned_early_close:
            self._warned_early_close = True
            said = "sent data" if endpoint.bytes_in else "closed it"
            log.warning(
                "route %r: the upstream server %s on an idle pooled connection after %.1f s, "
                "before pool.max_age=%g s; if its authentication_timeout is below that, lower "
                "pool.max_age (such connections are discarded, never handed out)",
                self.name,
                said,
                age,
                self.settings.max_age,
            )
        endpoint.close()
        if not endpoint.closed.done():
            self._closing.add(endpoint.closed)
            endpoint.closed.add_done_callback(self._closing.discard)

    def _on_lost(self, _closed: asyncio.Future[None]) -> None:
        if not self._closed:
            self._wake.set()

    def _publish(self) -> None:
        if not self._closed:
            self.stats.pool_idle = len(self._idle)
        watchers, self._watchers = self._watchers, []
        for waiter in watchers:
            if not waiter.done():
                waiter.set_result(None)


async def close_pools(pools: list[WarmPool]) -> None:
    """Close several pools and wait for them (drain)."""
    for pool in pools:
        pool.close()
    for pool in pools:
        await pool.wait_closed()
