"""The sidecar's lifecycle: bind every listener, run sessions, drain on shutdown.

Modelled on cloud-sql-proxy: all listeners are bound before any is served (a typo in one route
must not leave a half-working sidecar); the connection counter goes up before the upstream is
dialled; shutdown stops accepting, lets open sessions finish up to the drain deadline, then cuts
the rest and says how many it cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509

from proxy import __version__, tls
from proxy.admin import AdminServer, Health
from proxy.endpoint import Endpoint
from proxy.errors import ListenError, UpstreamError
from proxy.logs import log_event
from proxy.metrics import Metrics, RouteStats
from proxy.session import Session
from proxy.settings import RouteSettings, Settings, TcpListen, UnixListen
from proxy.status_page import (
    RouteStatus,
    SessionSummary,
    StatusDoc,
    TlsSummary,
    certificate_summary,
)
from proxy.upstream import UpstreamConnection, connect_upstream

log = logging.getLogger("proxy.app")


class ConnectionLimiter:
    """Counts sessions against the global and per-route ``max_connections``."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


class RouteRuntime:
    """A route's settings plus what is built from them once: the TLS context, the counters.

    It also remembers how the upstream last answered — readiness and the status page use it —
    which is why every upstream connection (sessions, cancels, probes) goes through
    ``connect()``.
    """

    __slots__ = (
        "_global",
        "_last_chain_der",
        "active",
        "context",
        "last_error",
        "last_ok",
        "last_peer",
        "name",
        "protocol_metrics",
        "servers",
        "settings",
        "stats",
        "timeouts",
    )

    def __init__(
        self,
        settings: RouteSettings,
        context: ssl.SSLContext,
        parent: Settings,
        limiter: ConnectionLimiter,
        stats: RouteStats,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.context = context
        self.timeouts = parent.timeouts
        self.protocol_metrics = parent.admin.protocol_metrics
        self.servers: list[asyncio.Server] = []
        self.active = 0
        self._global = limiter
        self.stats = stats
        self.last_ok: float | None = None  # monotonic time of the last verified handshake
        self.last_error: str | None = None
        self.last_peer: tls.PeerInfo | None = None
        self._last_chain_der: tuple[bytes, ...] = ()
        stats.ca_certificates = _configured_roots(settings)

    async def connect(self) -> UpstreamConnection:
        """Open a verified upstream connection, recording timings, TLS facts and failures."""
        try:
            conn = await connect_upstream(self.settings.upstream, self.context, self.timeouts)
        except UpstreamError as exc:
            self.stats.upstream_errors[exc.reason] += 1
            self.last_error = str(exc)
            raise
        stats = self.stats
        stats.connect_seconds.observe(conn.connect_seconds)
        stats.tls_handshake_seconds.observe(conn.handshake_seconds)
        peer = conn.peer
        stats.tls = (peer.version, peer.cipher)
        if peer.chain_der != self._last_chain_der:  # parse only when the server's chain changes
            self._last_chain_der = peer.chain_der
            stats.upstream_chain = tuple(x509.load_der_x509_certificate(d) for d in peer.chain_der)
        self.last_ok = stats.last_handshake_at = time.monotonic()
        self.last_error = None
        self.last_peer = peer
        return conn

    def acquire_slot(self) -> Callable[[], None] | None:
        """Take one connection slot, or return ``None`` when a limit is reached."""
        cap = self.settings.max_connections
        if self._global.active >= self._global.limit or (cap is not None and self.active >= cap):
            return None
        self._global.active += 1
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._global.active -= 1
                self.active -= 1

        return release

    def at_limit(self) -> bool:
        cap = self.settings.max_connections
        return cap is not None and self.active >= cap

    def limit_description(self) -> str:
        cap = self.settings.max_connections
        if cap is not None and self.active >= cap:
            return f"route {self.name!r} allows max_connections={cap}"
        return f"the sidecar allows max_connections={self._global.limit}"


def _configured_roots(settings: RouteSettings) -> tuple[x509.Certificate, ...]:
    path = settings.upstream.sslrootcert
    if path is None or path == "system":
        return ()
    return tuple(tls.load_certificates(path))


class Sidecar:
    """Programmatic entry point; the CLI, the demo and the tests all drive this class."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limiter = ConnectionLimiter(settings.limits.max_connections)
        self.routes: list[RouteRuntime] = []
        self.sessions: dict[Session, asyncio.Task[None]] = {}
        self.draining = False
        self.started = False
        self.started_at = time.time()
        self.metrics = Metrics(__version__, [r.name for r in settings.routes])
        self.admin: AdminServer | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._probes: list[asyncio.Task[None]] = []
        self._unix_paths: list[tuple[str, int]] = []

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build every TLS context, then bind every listener; on any failure nothing serves."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self.routes = [
            RouteRuntime(
                r,
                tls.build_client_context(r.upstream),
                self.settings,
                self.limiter,
                self.metrics.route(r.name),
            )
            for r in self.settings.routes
        ]
        try:
            for route in self.routes:
                for listen in route.settings.listen:
                    route.servers.append(await self._bind(route, listen))
            if self.settings.admin.listen is not None:
                self.admin = AdminServer(self, self.settings.admin.listen)
                await self.admin.start()
        except BaseException:
            self._close_servers()
            self._close_admin()
            raise
        for route in self.routes:
            for server in route.servers:
                await server.start_serving()
            up = route.settings.upstream
            log_event(
                log,
                logging.INFO,
                "route_ready",
                "listening",
                route=route.name,
                listen=", ".join(_describe(a) for a in self._route_addresses(route)),
                upstream=up.describe(),
                sslmode=up.sslmode,
                sslrootcert=up.sslrootcert or ("system" if up.sslmode != "require" else None),
                sslnegotiation=up.sslnegotiation,
            )
            if self.admin is not None and self.settings.admin.readiness_upstream_check:
                self._probes.append(loop.create_task(self._probe_upstream(route)))
            if up.sslmode == "require" and up.sslrootcert is None:
                log.warning(
                    "route %r: sslmode=require without sslrootcert does NOT verify the server's "
                    "certificate; the upstream leg is open to a man in the middle. Set "
                    "sslrootcert and sslmode=verify-full.",
                    route.name,
                )
        self.started = True
        if self.admin is not None:
            host, port = self.admin.address
            log_event(log, logging.INFO, "admin_ready", "admin endpoint", listen=f"{host}:{port}")

    async def _probe_upstream(self, route: RouteRuntime) -> None:
        """Keep readiness honest while idle: a verified handshake at least every interval/2.

        The probe stops after the TLS handshake (no StartupMessage), which PostgreSQL accepts
        silently. Any real session's handshake counts too, so a busy sidecar never probes.
        """
        interval = self.settings.admin.readiness_upstream_interval
        healthy: bool | None = None
        while True:
            last = route.last_ok
            if last is None or time.monotonic() - last > interval / 2:
                try:
                    conn = await route.connect()
                except UpstreamError as exc:
                    if healthy is not False:
                        log.warning("route %r: upstream check failed: %s", route.name, exc)
                    healthy = False
                else:
                    conn.endpoint.close()
                    if healthy is False:
                        log.info("route %r: upstream check succeeded again", route.name)
                    healthy = True
            await asyncio.sleep(interval / 4)

    def health(self) -> Health:
        """Kubernetes probe semantics: why the sidecar should not get new connections now."""
        reasons: list[str] = []
        if not self.started:
            reasons.append("starting: listeners are not bound yet")
        if self.draining:
            reasons.append("draining: shutting down, not accepting new connections")
        if self.limiter.active >= self.limiter.limit:
            reasons.append(
                f"at max_connections: {self.limiter.active} of {self.limiter.limit} in use"
            )
        admin = self.settings.admin
        now = time.monotonic()
        for route in self.routes:
            if route.at_limit():
                reasons.append(f"route {route.name!r}: at its max_connections")
            if admin.readiness_upstream_check and (
                route.last_ok is None or now - route.last_ok > admin.readiness_upstream_interval
            ):
                why = f": {route.last_error}" if route.last_error else ""
                reasons.append(
                    f"route {route.name!r}: no verified TLS handshake with "
                    f"{route.settings.upstream.describe()} in the last "
                    f"{admin.readiness_upstream_interval:g} s{why}"
                )
        return Health(started=self.started, live=True, ready=not reasons, reasons=tuple(reasons))

    def status(self) -> StatusDoc:
        """The document behind ``/status``: facts an operator needs, never a secret."""
        now = datetime.now(UTC)
        mono = time.monotonic()
        health = self.health()
        by_route: dict[str, list[SessionSummary]] = {r.name: [] for r in self.routes}
        for session in self.sessions:
            info = session.info
            by_route.setdefault(info.route, []).append(
                SessionSummary(
                    id=info.id,
                    client=info.client,
                    user=info.user,
                    database=info.database,
                    application=info.application_name,
                    age_seconds=round(mono - info.started, 3),
                    bytes_client_to_server=session.client.bytes_in,
                    bytes_server_to_client=(
                        session.upstream.bytes_in if session.upstream is not None else 0
                    ),
                )
            )
        routes: list[RouteStatus] = []
        for route in self.routes:
            up = route.settings.upstream
            tls_summary: TlsSummary | None = None
            if route.last_peer is not None and route.last_ok is not None:
                at = datetime.fromtimestamp(time.time() - (mono - route.last_ok), UTC)
                tls_summary = TlsSummary(
                    version=route.last_peer.version,
                    cipher=route.last_peer.cipher,
                    alpn=route.last_peer.alpn,
                    at=at.isoformat(timespec="seconds").replace("+00:00", "Z"),
                )
            routes.append(
                RouteStatus(
                    name=route.name,
                    listeners=[_describe(a) for a in self._route_addresses(route)],
                    upstream=up.describe(),
                    server_name=up.verify_name,
                    sslmode=up.sslmode,
                    sslrootcert=up.sslrootcert,
                    active_connections=route.active,
                    max_connections=route.settings.max_connections,
                    tls=tls_summary,
                    server_certificates=[
                        certificate_summary(c, now) for c in route.stats.upstream_chain
                    ],
                    ca_certificates=[
                        certificate_summary(c, now) for c in route.stats.ca_certificates
                    ],
                    sessions=by_route.get(route.name, []),
                )
            )
        return StatusDoc(
            version=__version__,
            generated_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            started_at=datetime.fromtimestamp(self.started_at, UTC)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
            uptime_seconds=round(time.time() - self.started_at, 3),
            ready=health.ready,
            reasons=list(health.reasons),
            active_connections=self.limiter.active,
            max_connections=self.limiter.limit,
            routes=routes,
        )

    async def _bind(self, route: RouteRuntime, listen: TcpListen | UnixListen) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> Endpoint:
            endpoint = Endpoint("client")
            endpoint.on_connected = lambda ep: self._accept(route, ep)
            return endpoint

        try:
            if isinstance(listen, TcpListen):
                return await loop.create_server(
                    factory, listen.host, listen.port, reuse_address=True, start_serving=False
                )
            _remove_stale_socket(listen.path)
            server = await loop.create_unix_server(factory, listen.path, start_serving=False)
            os.chmod(listen.path, listen.mode)
            self._unix_paths.append((listen.path, os.stat(listen.path).st_ino))
            return server
        except OSError as exc:
            why = exc.strerror or str(exc)
            fix = ""
            if exc.errno == errno.EADDRINUSE:
                fix = "; another PostgreSQL server or sidecar is using it, choose another address"
            elif exc.errno in (errno.EACCES, errno.EPERM):
                fix = "; ports below 1024 need privileges, and the directory must be writable"
            raise ListenError(
                f"route {route.name!r}: could not listen on {listen.describe()}: {why}{fix}"
            ) from None

    def addresses(self, route: str | None = None) -> list[tuple[str, int] | str]:
        """Bound addresses (TCP as ``(host, port)`` with port 0 resolved, Unix as paths)."""
        out: list[tuple[str, int] | str] = []
        for rt in self.routes:
            if route is None or rt.name == route:
                out.extend(self._route_addresses(rt))
        return out

    @staticmethod
    def _route_addresses(route: RouteRuntime) -> list[tuple[str, int] | str]:
        out: list[tuple[str, int] | str] = []
        for server in route.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append(name if isinstance(name, str) else (name[0], name[1]))
        return out

    # -- sessions -----------------------------------------------------------------------------

    def _accept(self, route: RouteRuntime, client: Endpoint) -> None:
        assert client.transport is not None
        if self.draining:
            client.abort()
            return
        peer = client.transport.get_extra_info("peername")
        peername = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "[local]"
        session = Session(route, client, peername)
        task = asyncio.get_running_loop().create_task(session.run())
        self.sessions[session] = task
        task.add_done_callback(lambda _t: self.sessions.pop(session, None))

    # -- shutdown -----------------------------------------------------------------------------

    def request_shutdown(self, drain: float | None = None) -> None:
        """Stop accepting; open sessions may finish until the drain deadline."""
        if self.draining:
            return
        self.draining = True
        self._close_servers()
        deadline = self.settings.timeouts.drain if drain is None else drain
        log.info(
            "shutting down: no longer accepting; %d open session(s) have up to %gs to finish",
            len(self.sessions),
            deadline,
        )
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(deadline))

    def force_stop(self) -> None:
        """Cut every session now (a second SIGTERM/SIGINT)."""
        self.request_shutdown()
        for session in list(self.sessions):
            session.abort()

    async def _drain(self, deadline: float) -> None:
        started = time.monotonic()
        tasks = list(self.sessions.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=deadline)
            if pending:
                log.warning(
                    "drain deadline of %gs passed: closing %d session(s) still open",
                    deadline,
                    len(pending),
                )
                for session, task in list(self.sessions.items()):
                    if task in pending:
                        session.abort()
                await asyncio.wait(pending, timeout=5)
        for probe in self._probes:
            probe.cancel()
        if self._probes:
            await asyncio.wait(self._probes)
        self._close_admin()
        log.info("stopped after %.1fs", time.monotonic() - started)
        assert self._stopped is not None
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def wait_stopped(self) -> None:
        assert self._stopped is not None, "start() was not called"
        await asyncio.shield(self._stopped)

    async def shutdown(self, drain: float | None = None) -> None:
        self.request_shutdown(drain)
        await self.wait_stopped()

    def _close_admin(self) -> None:
        if self.admin is not None:
            self.admin.close()

    def _close_servers(self) -> None:
        for route in self.routes:
            for server in route.servers:
                server.close()
        for path, inode in self._unix_paths:
            # Remove our socket file, but not one another process created since.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self._unix_paths.clear()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a crashed process; refuse if something still listens."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"could not listen on {path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket file %s", path)
        return
    finally:
        probe.close()
    raise ListenError(f"could not listen on {path}: another server is accepting connections there")


def _describe(addr: tuple[str, int] | str) -> str:
    if isinstance(addr, str):
        return addr
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
