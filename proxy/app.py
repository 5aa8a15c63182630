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

from proxy import tls
from proxy.endpoint import Endpoint
from proxy.errors import ListenError
from proxy.logs import log_event
from proxy.session import Session
from proxy.settings import RouteSettings, Settings, TcpListen, UnixListen

log = logging.getLogger("proxy.app")


class ConnectionLimiter:
    """Counts sessions against the global and per-route ``max_connections``."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


class RouteRuntime:
    """A route's settings plus what is built from them once: the TLS context, the counters."""

    __slots__ = ("_global", "active", "context", "name", "servers", "settings", "timeouts")

    def __init__(
        self,
        settings: RouteSettings,
        context: ssl.SSLContext,
        parent: Settings,
        limiter: ConnectionLimiter,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.context = context
        self.timeouts = parent.timeouts
        self.servers: list[asyncio.Server] = []
        self.active = 0
        self._global = limiter

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

    def limit_description(self) -> str:
        cap = self.settings.max_connections
        if cap is not None and self.active >= cap:
            return f"route {self.name!r} allows max_connections={cap}"
        return f"the sidecar allows max_connections={self._global.limit}"


class Sidecar:
    """Programmatic entry point; the CLI, the demo and the tests all drive this class."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limiter = ConnectionLimiter(settings.limits.max_connections)
        self.routes: list[RouteRuntime] = []
        self.sessions: dict[Session, asyncio.Task[None]] = {}
        self.draining = False
        self._stopped: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._unix_paths: list[tuple[str, int]] = []

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build every TLS context, then bind every listener; on any failure nothing serves."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self.routes = [
            RouteRuntime(r, tls.build_client_context(r.upstream), self.settings, self.limiter)
            for r in self.settings.routes
        ]
        try:
            for route in self.routes:
                for listen in route.settings.listen:
                    route.servers.append(await self._bind(route, listen))
        except BaseException:
            self._close_servers()
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
            if up.sslmode == "require" and up.sslrootcert is None:
                log.warning(
                    "route %r: sslmode=require without sslrootcert does NOT verify the server's "
                    "certificate; the upstream leg is open to a man in the middle. Set "
                    "sslrootcert and sslmode=verify-full.",
                    route.name,
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
