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
import stat
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from proxy import __version__, tls
from proxy.admin import AdminServer, Health
from proxy.endpoint import Endpoint, close_endpoints
from proxy.errors import ConfigError, ListenError, UpstreamError
from proxy.logs import configure_logging, log_event
from proxy.metrics import Metrics, RouteStats
from proxy.pool import close_pools
from proxy.route import ConnectionLimiter, RouteRuntime
from proxy.session import Session
from proxy.settings import Listen, Settings, TcpListen, UnixListen
from proxy.status_page import (
    RouteStatus,
    SessionSummary,
    StatusDoc,
    TlsSummary,
    certificate_summary,
)

log = logging.getLogger("proxy.app")


class Sidecar:
    """Programmatic entry point; the CLI, the demo and the tests all drive this class."""

    def __init__(
        self,
        settings: Settings,
        *,
        reloader: Callable[[], Settings] | None = None,
        reuse_port: bool = False,
        inherited: Mapping[str, socket.socket] | None = None,
    ) -> None:
        """``reuse_port`` and ``inherited`` are for a worker process (``proxy.workers``): TCP
        ports shared with ``SO_REUSEPORT``, Unix sockets bound by the supervisor (by path)."""
        self.settings = settings
        self._reuse_port = reuse_port
        self._inherited = dict(inherited or {})
        self.limiter = ConnectionLimiter(settings.limits.max_connections)
        self.routes: list[RouteRuntime] = []
        self.sessions: dict[Session, asyncio.Task[None]] = {}
        self.draining = False
        self.started = False
        self.started_at = time.time()
        self.metrics = Metrics(__version__, [r.name for r in settings.routes])
        self.metrics.state = lambda: (self.health().ready, self.settings.limits.max_connections)
        self.admin: AdminServer | None = None
        self._reloader = reloader
        self._reload_lock = asyncio.Lock()
        self._by_name: dict[str, RouteRuntime] = {}
        self._slots: dict[str, ConnectionLimiter] = {}
        self._listeners: dict[tuple[str, Listen], asyncio.Server] = {}
        self._unix_inodes: dict[str, int] = {}
        self._stopped: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._probes: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Client connections a listener accepted that are not (yet) a session: a shutdown
        # waits for the ones it refuses to be closed.
        self._unclaimed: set[Endpoint] = set()
        self._closing: list[asyncio.Future[None]] = []

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build every TLS context, then bind every listener; on any failure nothing serves."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        routes = self._build_routes(self.settings)
        bound: dict[tuple[str, Listen], asyncio.Server] = {}
        try:
            for route in routes:
                for listen in route.settings.listen:
                    bound[(route.name, listen)] = await self._bind(route.name, listen)
            if self.settings.admin.listen is not None:
                self.admin = AdminServer(self, self.settings.admin.listen)
                await self.admin.start()
        except BaseException:
            self._close_listeners(bound)
            self._close_admin()
            raise
        await self._commit_routes(routes, bound)
        self.started = True
        if self.admin is not None:
            host, port = self.admin.address
            log_event(log, logging.INFO, "admin_ready", "admin endpoint", listen=f"{host}:{port}")
        if self.settings.reload.watch_files:
            # The baseline is taken now, so a change right after start() is never missed.
            self._watcher = loop.create_task(self._watch_files(self.watched_files()))

    def _build_routes(self, settings: Settings) -> list[RouteRuntime]:
        """Everything that can fail on bad TLS material, done before anything changes."""
        return [
            RouteRuntime(
                r,
                tls.build_client_context(r.upstream),
                settings,
                self.limiter,
                self._slots.setdefault(r.name, ConnectionLimiter(r.max_connections)),
                self.metrics.routes.get(r.name) or RouteStats(),
            )
            for r in settings.routes
        ]

    async def _commit_routes(
        self, routes: list[RouteRuntime], bound: dict[tuple[str, Listen], asyncio.Server]
    ) -> None:
        """Make ``routes`` the ones new clients get, serve the new listeners, restart probes.

        The replaced routes' warm pools are closed before the new ones fill: a reload may have
        changed the CA or the server, and open sessions never use a pool again.
        """
        loop = asyncio.get_running_loop()
        self._close_pools(self.routes)
        for route in routes:
            if route.pool is not None:
                route.pool.start()
        self.routes = routes
        self._by_name = {r.name: r for r in routes}
        self._listeners.update(bound)
        for server in bound.values():
            await server.start_serving()
        for probe in self._probes:
            probe.cancel()
        self._probes = []
        for route in routes:
            up = route.settings.upstream
            log_event(
                log,
                logging.INFO,
                "route_ready",
                "listening",
                route=route.name,
                listen=", ".join(_describe(a) for a in self._route_addresses(route.name)),
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

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration: all of it applies to new sessions, or none of it does.

        Open sessions keep the route objects they started with (TLS context, timeouts), so
        they continue untouched. Listeners that a route no longer has are closed (their open
        sessions go on); new ones are bound first, and a bind failure rejects the reload.
        """
        async with self._reload_lock:
            if self.draining:
                return False, "not reloading: the sidecar is shutting down"
            if self._reloader is None:
                return False, "not reloading: no configuration source to re-read"
            try:
                new = self._reloader()
                routes = self._build_routes(new)
            except ConfigError as exc:
                return self._reload_failed(str(exc))
            wanted = {(r.name, listen) for r in new.routes for listen in r.listen}
            added = [key for key in wanted if key not in self._listeners]
            removed = [key for key in self._listeners if key not in wanted]
            bound: dict[tuple[str, Listen], asyncio.Server] = {}
            new_admin: AdminServer | None = None
            try:
                # A moved Unix socket path is rebound in place: free it first.
                for key in removed:
                    if isinstance(key[1], UnixListen) and any(
                        isinstance(a[1], UnixListen) and a[1].path == key[1].path for a in added
                    ):
                        self._close_listeners({key: self._listeners.pop(key)})
                for key in added:
                    bound[key] = await self._bind(*key)
                if new.admin.listen != self.settings.admin.listen and new.admin.listen:
                    new_admin = AdminServer(self, new.admin.listen)
                    await new_admin.start()
            except ListenError as exc:
                self._close_listeners(bound)
                return self._reload_failed(str(exc))
            # Nothing below can fail on the user's input: switch over.
            old = self.settings
            self.settings = new
            self.limiter.limit = new.limits.max_connections
            self.metrics.install({r.name: r.stats for r in routes})
            if new.admin.listen != old.admin.listen:
                self._close_admin()
                self.admin = new_admin
            self._close_listeners(
                {k: self._listeners.pop(k) for k in removed if k in self._listeners}
            )
            await self._commit_routes(routes, bound)
            if new.logging != old.logging:
                configure_logging(new.logging.format, new.logging.level)
            self.metrics.config_reloads["success"] += 1
            summary = (
                f"configuration reloaded: {len(routes)} route(s), "
                f"{len(added)} listener(s) added, {len(removed)} removed; "
                "open sessions continue with the previous settings"
            )
            log.info("%s", summary)
            return True, summary

    def _reload_failed(self, why: str) -> tuple[bool, str]:
        self.metrics.config_reloads["failure"] += 1
        log.error(
            "configuration reload rejected; the previous configuration stays in force: %s", why
        )
        return False, f"configuration reload rejected; the previous configuration stays: {why}"

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (the outcome is logged and counted)."""
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_quietly(self) -> None:
        await self.reload()

    def watched_files(self) -> dict[str, tuple[int, int, int] | None]:
        """Every file the configuration names, with (inode, mtime_ns, size) or None if absent."""
        paths: list[str] = []
        if self.settings.source:
            paths.append(self.settings.source)
        for route in self.settings.routes:
            up = route.upstream
            for path in (up.sslrootcert, up.sslcrl, up.sslcrldir, up.sslcert, up.sslkey):
                if path and path != "system":
                    paths.append(path)
        out: dict[str, tuple[int, int, int] | None] = {}
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                out[path] = None
            else:
                out[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return out

    async def _watch_files(self, seen: dict[str, tuple[int, int, int] | None]) -> None:
        """Poll the named files; a change (ConfigMap symlink swaps included) means reload."""
        while True:
            await asyncio.sleep(self.settings.reload.interval)
            now = self.watched_files()
            if now != seen:
                changed = sorted(p for p in set(now) | set(seen) if now.get(p) != seen.get(p))
                log.info("configuration files changed (%s): reloading", ", ".join(changed))
                await self.reload()
                seen = self.watched_files()
                if not self.settings.reload.watch_files:
                    return

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
                    conn = await route.dial()  # never a pooled one: that would waste it
                except UpstreamError as exc:
                    if healthy is not False:
                        log.warning("route %r: upstream check failed: %s", route.name, exc)
                    healthy = False
                else:
                    await close_endpoints(conn.endpoint)
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
        if self.limiter.full():
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
                    listeners=[_describe(a) for a in self._route_addresses(route.name)],
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
            max_connections=self.settings.limits.max_connections,
            routes=routes,
        )

    async def _bind(self, name: str, listen: Listen) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> Endpoint:
            endpoint = Endpoint("client")
            endpoint.on_connected = lambda ep: self._accept(name, ep)
            self._unclaimed.add(endpoint)
            endpoint.closed.add_done_callback(lambda _f: self._unclaimed.discard(endpoint))
            return endpoint

        if self._reuse_port:
            _check_shareable(name, listen, self._inherited)
        try:
            # Like PostgreSQL: room for a connection storm of twice max_connections (the
            # kernel caps it at net.core.somaxconn); asyncio's default of 100 drops SYNs.
            backlog = max(128, 2 * self.settings.limits.max_connections)
            if isinstance(listen, TcpListen):
                return await loop.create_server(
                    factory,
                    listen.host,
                    listen.port,
                    reuse_address=True,
                    reuse_port=self._reuse_port or None,
                    backlog=backlog,
                    start_serving=False,
                )
            inherited = self._inherited.get(listen.path)
            if inherited is not None:
                # Bound and chmod-ed by the supervisor, which also removes the file at the end.
                return await loop.create_unix_server(
                    factory, sock=inherited, backlog=backlog, start_serving=False
                )
            remove_stale_socket(listen.path)
            server = await loop.create_unix_server(
                factory, listen.path, backlog=backlog, start_serving=False
            )
            os.chmod(listen.path, listen.mode)
            self._unix_inodes[listen.path] = os.stat(listen.path).st_ino
            return server
        except OSError as exc:
            raise listen_error(name, listen, exc) from None

    def addresses(self, route: str | None = None) -> list[tuple[str, int] | str]:
        """Bound addresses (TCP as ``(host, port)`` with port 0 resolved, Unix as paths)."""
        names = [r.name for r in self.routes] if route is None else [route]
        return [a for name in names for a in self._route_addresses(name)]

    def _route_addresses(self, name: str) -> list[tuple[str, int] | str]:
        out: list[tuple[str, int] | str] = []
        for (route, _listen), server in self._listeners.items():
            if route != name:
                continue
            for sock in server.sockets:
                addr = sock.getsockname()
                out.append(addr if isinstance(addr, str) else (addr[0], addr[1]))
        return out

    # -- sessions -----------------------------------------------------------------------------

    def _accept(self, name: str, client: Endpoint) -> None:
        assert client.transport is not None
        route = self._by_name.get(name)
        if self.draining or route is None:  # shutting down, or the route was just removed
            client.abort()
            return
        peer = client.transport.get_extra_info("peername")
        peername = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "[local]"
        self._unclaimed.discard(client)
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
        self._close_listeners(self._listeners)
        if self._watcher is not None:
            self._watcher.cancel()
        deadline = self.settings.timeouts.drain if drain is None else drain
        log.info(
            "shutting down: no longer accepting; %d open session(s) have up to %gs to finish",
            len(self.sessions),
            deadline,
        )
        self._close_pools(self.routes)
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
        # Connections accepted just before the listeners closed were refused by _accept; wait
        # until they are really closed, so none is left open when the loop stops.
        if self._closing:
            await asyncio.gather(*self._closing)
        refused = [ep.closed for ep in self._unclaimed]
        if refused:
            await asyncio.wait(refused, timeout=5)
        for probe in self._probes:
            probe.cancel()
        if self._probes:
            await asyncio.wait(self._probes)
        if self._tasks:  # pools still closing, a reload in flight
            await asyncio.wait(self._tasks, timeout=5)
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

    def _close_pools(self, routes: list[RouteRuntime]) -> None:
        """Close the routes' warm pools now; their TLS goodbyes finish in a tracked task."""
        pools = [r.pool for r in routes if r.pool is not None]
        if not pools:
            return
        for pool in pools:
            pool.close()
        task = asyncio.get_running_loop().create_task(close_pools(pools))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_admin(self) -> None:
        if self.admin is not None:
            self.admin.close()

    def _close_listeners(self, listeners: dict[tuple[str, Listen], asyncio.Server]) -> None:
        """Stop accepting now; close each server once the connections it accepted are set up.

        The stdlib selector loop accepts a connection in one callback and builds its transport
        in a task that runs a loop iteration later; a ``Server.close()`` in between makes that
        task fail (``Server._attach`` asserts the server is open, CPython gh-109564) and drop
        the accepted socket unclosed: the client hangs until the garbage collector closes it.
        So the loop's reader on the listening socket is removed first (nothing more is
        accepted) and the close is queued behind the transport tasks already scheduled.
        uvloop builds the transport in the accept callback itself and is closed at once.
        """
        loop = asyncio.get_running_loop()
        self._closing = [f for f in self._closing if not f.done()]
        for (_name, listen), server in list(listeners.items()):
            if isinstance(loop, asyncio.SelectorEventLoop) and server.is_serving():
                for sock in server.sockets:
                    loop.remove_reader(sock.fileno())
                closing: asyncio.Future[None] = loop.create_future()
                loop.call_soon(_close_server, server, closing)
                self._closing.append(closing)
            else:
                server.close()
            if isinstance(listen, UnixListen):
                inode = self._unix_inodes.pop(listen.path, None)
                # Remove our socket file, but not one another process created since.
                with contextlib.suppress(FileNotFoundError):
                    if inode is not None and os.stat(listen.path).st_ino == inode:
                        os.unlink(listen.path)
        listeners.clear()


def _close_server(server: asyncio.Server, closed: asyncio.Future[None]) -> None:
    server.close()
    closed.set_result(None)


def listen_error(route: str, listen: Listen, exc: OSError) -> ListenError:
    """The one wording of a bind failure, whichever process binds (a worker's supervisor too)."""
    why = exc.strerror or str(exc)
    fix = ""
    if exc.errno == errno.EADDRINUSE:
        fix = "; another PostgreSQL server or sidecar is using it, choose another address"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "; ports below 1024 need privileges, and the directory must be writable"
    return ListenError(f"route {route!r}: could not listen on {listen.describe()}: {why}{fix}")


def _check_shareable(route: str, listen: Listen, inherited: Mapping[str, socket.socket]) -> None:
    """In a worker, only listeners the supervisor prepared can be shared with its siblings.

    A reload that adds a port-0 listener would give each worker its own random port, and one
    that adds a Unix socket would have the workers fight over the path: both need a restart.
    """
    if isinstance(listen, TcpListen) and listen.port == 0:
        raise ListenError(
            f"route {route!r}: cannot add {listen.describe()} while running with several "
            "workers: port 0 is resolved once, at start; give a port number, or restart"
        )
    if isinstance(listen, UnixListen) and listen.path not in inherited:
        raise ListenError(
            f"route {route!r}: cannot add the Unix socket {listen.path} while running with "
            "several workers: the supervisor binds Unix sockets at start; restart to add one"
        )


def remove_stale_socket(path: str) -> None:
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
