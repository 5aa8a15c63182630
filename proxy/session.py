"""One client session from accept to close: the glue between the wire modules and the sockets.

The flow (see ARCHITECTURE.md):

1. read the client's startup packets (``wire.startup``), answering ``N`` to SSLRequest and
   GSSENCRequest, until a StartupMessage or a CancelRequest — bounded by ``timeouts.startup``;
2. a CancelRequest goes out on its own fresh TLS connection and the client gets no reply;
3. otherwise check the connection limits, open the verified TLS leg (``upstream``), send the
   StartupMessage unchanged, and relay client bytes raw from then on;
4. server bytes pass through ``wire.backend_startup`` until authentication is over (to drop
   SCRAM-SHA-256-PLUS from the mechanism list), then they too are relayed raw;
5. wait for both legs to close, log one line.

Any failure before the relay reaches the client as a PostgreSQL ErrorResponse it can display.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.endpoint import Endpoint, close_endpoints
from proxy.errors import (
    SQLSTATE_CONNECTION_FAILURE,
    SQLSTATE_TOO_MANY_CONNECTIONS,
    ProtocolViolation,
    SidecarError,
    UpstreamError,
)
from proxy.logs import log_event
from proxy.upstream import UpstreamConnection
from proxy.wire.backend_startup import BackendStartupFilter
from proxy.wire.message_scanner import SessionScanner
from proxy.wire.messages import error_response
from proxy.wire.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupMessage,
    StartupParser,
)

if TYPE_CHECKING:
    from proxy.route import RouteRuntime

log = logging.getLogger("proxy.session")

_ids = itertools.count(1)

SSL_NOT_SUPPORTED = b"N"
CANCEL_FORWARD_TIMEOUT = 10.0


@dataclass(slots=True)
class SessionInfo:
    """What the logs (and later the status page) know about a session; never a payload."""

    id: int
    route: str
    client: str
    started: float = field(default_factory=time.monotonic)
    user: str | None = None
    database: str | None = None
    application_name: str | None = None
    upstream_address: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    outcome: str = "open"
    error: str | None = None


class Session:
    """Drives one accepted client connection; ``run()`` never raises except on cancellation."""

    __slots__ = ("_release", "client", "info", "route", "upstream")

    def __init__(self, route: RouteRuntime, client: Endpoint, peername: str) -> None:
        self.route = route
        self.client = client
        self.upstream: Endpoint | None = None
        self.info = SessionInfo(id=next(_ids), route=route.name, client=peername)
        self._release: Callable[[], None] | None = None

    async def run(self) -> None:
        self.route.stats.active += 1
        self.client.stats = self.route.stats
        try:
            await self._run()
        except _ClientGone as exc:
            self.info.outcome = "client_gone"
            self.info.error = str(exc)
        except _LimitReached as exc:
            self._fail("limit", str(exc), SQLSTATE_TOO_MANY_CONNECTIONS)
        except ProtocolViolation as exc:
            self._fail("protocol_error", str(exc), exc.sqlstate)
        except UpstreamError as exc:
            self._fail(f"upstream_{exc.reason}", str(exc), exc.sqlstate, hint=exc.hint)
        except TimeoutError:
            self._fail(
                "startup_timeout",
                "the client sent no complete startup packet within "
                f"{self.route.timeouts.startup:g} s",
                None,
            )
        finally:
            self.route.stats.active -= 1
            if self._release is not None:
                self._release()
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()
            self._record_outcome()
            self._log_closed()
            # The session ends when its sockets are really closed (a TLS close waits for the
            # server's close_notify), so a drain never stops the loop under a closing transport.
            await close_endpoints(self.client, self.upstream)

    def abort(self) -> None:
        """Cut the session now (drain deadline passed, or a forced exit)."""
        if self.info.outcome == "open":
            self.info.outcome = "shutdown"
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()

    # -- phases -------------------------------------------------------------------------------

    async def _run(self) -> None:
        async with asyncio.timeout(self.route.timeouts.startup):
            parser, event = await self._read_startup()
        if isinstance(event, CancelRequest):
            await self._forward_cancel(event)
            return
        self._note_startup(event)
        self._release = self.route.acquire_slot()
        if self._release is None:
            # Like PostgreSQL: the error goes after the StartupMessage so the client can show it.
            raise _LimitReached(self.route.limit_description())
        conn = await self.route.connect()
        self.upstream = conn.endpoint
        self._note_upstream(conn)
        upstream = conn.endpoint
        upstream.stats = self.route.stats
        scanner = SessionScanner(self.route.stats) if self.route.protocol_metrics else None
        rest = parser.take_remaining()
        upstream.write(event.raw + rest)
        if scanner is not None:
            # Scanning starts right after the StartupMessage; password messages are hopped over.
            if rest:
                scanner.feed_frontend(rest, time.monotonic())
            self.client.observe = scanner.feed_frontend
        self.client.relay_to(upstream)
        if not await self._relay_authentication(upstream, scanner):
            return
        log_event(
            log,
            logging.INFO,
            "session_opened",
            "session opened",
            **self._fields(),
        )
        self.info.outcome = "ok"
        await asyncio.gather(self.client.closed, upstream.closed)
        self.route.stats.session_seconds.observe(time.monotonic() - self.info.started)
        if self.info.outcome == "ok" and upstream.closed_exc is not None:
            self.info.outcome = "upstream_lost"
            self.info.error = str(upstream.closed_exc)

    async def _read_startup(self) -> tuple[StartupParser, StartupMessage | CancelRequest]:
        parser = StartupParser()
        client = self.client
        while True:
            event = parser.next_event()
            if event is None:
                data = await client.read()
                if not data:
                    raise _ClientGone("the client closed the connection during startup")
                parser.feed(data)
                continue
            if isinstance(event, (SSLRequest, GSSEncRequest)):
                client.write(SSL_NOT_SUPPORTED)
                continue
            return parser, event

    async def _forward_cancel(self, event: CancelRequest) -> None:
        """Send the cancel key on a fresh verified connection, as libpq's PQcancel would."""
        self.info.outcome = "cancel"
        conn = await self.route.connect()
        self.upstream = conn.endpoint
        self._note_upstream(conn)
        conn.endpoint.write(event.raw)
        # The server processes the request and closes; wait for that so the client (which
        # waits for our EOF) knows the cancel has been delivered.
        try:
            async with asyncio.timeout(CANCEL_FORWARD_TIMEOUT):
                while await conn.endpoint.read():
                    pass
        except TimeoutError:
            log.warning(
                "cancel request: the upstream server did not close within %gs",
                CANCEL_FORWARD_TIMEOUT,
            )

    async def _relay_authentication(
        self, upstream: Endpoint, scanner: SessionScanner | None
    ) -> bool:
        """Pass server messages through the startup filter until the session is established."""
        filt = BackendStartupFilter()
        client = self.client
        while not filt.done:
            data = await upstream.read()
            if not data:
                self.info.outcome = "upstream_closed_during_startup"
                why = upstream.closed_exc
                detail = f": {why}" if why is not None else ""
                message = f"the upstream server closed the connection during authentication{detail}"
                self.info.error = message
                client.write(error_response(SQLSTATE_CONNECTION_FAILURE, message))
                return False
            out = filt.feed(data)
            if out:
                client.write(out)
        rest = filt.take_remaining()
        if rest:
            client.write(rest)
        if scanner is not None and filt.server_error_sqlstate is None:
            if rest:
                scanner.feed_backend(rest, time.monotonic())
            upstream.observe = scanner.feed_backend
        if filt.server_error_sqlstate is not None:
            self.info.outcome = "server_rejected"
            self.info.error = f"SQLSTATE {filt.server_error_sqlstate}"
        upstream.relay_to(client)
        return filt.server_error_sqlstate is None

    # -- bookkeeping --------------------------------------------------------------------------

    def _note_startup(self, event: StartupMessage) -> None:
        params = event.parameters
        self.info.user = params.get("user")
        self.info.database = params.get("database") or self.info.user
        self.info.application_name = params.get("application_name")

    def _note_upstream(self, conn: UpstreamConnection) -> None:
        self.info.upstream_address = conn.address
        self.info.tls_version = conn.peer.version
        self.info.tls_cipher = conn.peer.cipher

    def _fail(
        self, outcome: str, message: str, sqlstate: str | None, hint: str | None = None
    ) -> None:
        self.info.outcome = outcome
        self.info.error = message
        if sqlstate is not None:
            self.client.write(error_response(sqlstate, message, hint=hint))

    def _fields(self) -> dict[str, object]:
        info = self.info
        up = self.route.settings.upstream
        return {
            "id": info.id,
            "route": info.route,
            "client": info.client,
            "user": info.user,
            "database": info.database,
            "application_name": info.application_name,
            "upstream": up.describe(),
            "upstream_addr": info.upstream_address,
            "tls_version": info.tls_version,
            "cipher": info.tls_cipher,
        }

    def _record_outcome(self) -> None:
        """Count the session under one bounded ``result`` (and ``reason``) label."""
        stats = self.route.stats
        outcome = self.info.outcome
        if outcome in ("ok", "shutdown", "open"):
            result = "ok"
        elif outcome in ("limit", "protocol_error", "startup_timeout"):
            result = "rejected"
            stats.rejected[outcome] += 1
        elif outcome in ("upstream_lost", "upstream_closed_during_startup"):
            result = "upstream_error"
            stats.upstream_errors["closed"] += 1
        elif outcome.startswith("upstream_"):
            result = "upstream_error"  # counted by reason where it happened (RouteRuntime.connect)
        elif outcome in ("server_rejected", "cancel", "client_gone"):
            result = outcome
        else:  # pragma: no cover - every outcome above is listed; keep the label set bounded
            result = "client_gone"
        stats.connections[result] += 1

    def _log_closed(self) -> None:
        info = self.info
        fields = self._fields()
        fields.update(
            duration_s=round(time.monotonic() - info.started, 3),
            bytes_from_client=self.client.bytes_in,
            bytes_from_server=self.upstream.bytes_in if self.upstream is not None else 0,
            outcome=info.outcome,
            error=info.error,
        )
        level = logging.INFO if info.outcome in ("ok", "cancel", "shutdown") else logging.WARNING
        log_event(log, level, "session_closed", "session closed", **fields)


class _ClientGone(SidecarError):
    """The client left before finishing startup; there is nobody to send an error to."""


class _LimitReached(SidecarError):
    def __init__(self, description: str) -> None:
        super().__init__(f"sorry, too many clients already ({description})")
