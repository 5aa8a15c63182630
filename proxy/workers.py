"""Several worker processes sharing the listening ports: the supervisor, and a worker's link to it.

One asyncio process relays on one core. With ``workers: N`` (N > 1) the process that was started
becomes a *supervisor* that relays nothing: it starts N copies of itself
(``python -m proxy run <the same flags> --worker-spec ...``: a fresh interpreter each, never a
fork of a process that has an event loop), each running the ordinary ``Sidecar`` for every
route, and it keeps them running.

- **TCP**: every worker binds its own socket with ``SO_REUSEPORT`` and the kernel spreads new
  connections over them (by a hash of the address pair). The supervisor binds each address
  first with ``SO_REUSEPORT`` and keeps that socket bound, never listening: a bind error is
  reported before any worker starts, exactly as one process reports it; a port 0 is resolved
  once and handed to the workers; and the port stays reserved while a worker restarts.
- **Unix sockets** cannot be shared that way: the supervisor binds and listens on each one and
  the workers inherit the listening descriptor (the kernel then hands each connection to one of
  the workers waiting in ``accept``). The supervisor removes the file at the end.
- **Admin**: the supervisor serves the configured admin address. Each worker runs its endpoint
  on a loopback port of its own, which it reports over the socket it was given; the supervisor
  asks the workers when it is asked and merges the answers (``proxy.admin_merge``).
- **Signals**: SIGTERM/SIGINT are forwarded as SIGTERM (each worker drains as one process
  would; a second signal is forwarded again and cuts the sessions); SIGHUP is forwarded as is.
  The workers run in their own process group, so a Ctrl-C in a terminal reaches them once,
  through the supervisor. A worker whose supervisor disappears (its socket reaches EOF) drains
  and exits rather than holding the port forever.
- **Restarts**: a worker that dies is logged and started again after a backoff doubling from
  0.5 s to 30 s (reset once a worker has run for a minute). A worker that cannot start at all —
  while the supervisor starts, or five times in a row later — stops the whole sidecar with the
  worker's message and exit code: a broken configuration must not loop forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

from proxy import __version__
from proxy.admin import AdminServer, AdminView, Health
from proxy.admin_merge import (
    MAX_RESPONSE,
    WorkerInfo,
    add_section,
    cumulative_only,
    merge_families,
    merge_status,
    parse_exposition,
    parse_http_response,
    render_exposition,
    without,
    workers_html,
)
from proxy.app import listen_error, remove_stale_socket
from proxy.cli import EXIT_CONFIG, EXIT_FORCED, EXIT_OK, EXIT_START_FAILED
from proxy.errors import ConfigError, ListenError
from proxy.logs import FIELDS_ATTR, log_event
from proxy.metrics import PREFIX
from proxy.settings import Settings, TcpListen, UnixListen
from proxy.status_page import StatusDoc, render_html

if TYPE_CHECKING:
    from proxy.app import Sidecar

log = logging.getLogger("proxy.workers")

WORKER_SPEC_FLAG: Final = "--worker-spec"  # internal: marks a worker, never typed by a user

BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # a worker that ran this long restarts with the first backoff again
MAX_START_FAILURES: Final = 5  # consecutive failed starts of one worker before giving up
ASK_TIMEOUT: Final = 5.0  # for a worker's /metrics, /readyz, /status
RELOAD_TIMEOUT: Final = 60.0  # a reload builds TLS contexts, reads files
STOP_GRACE: Final = 30.0  # after the drain deadline, before a worker still running is killed
WORKER_ADMIN: Final = TcpListen("127.0.0.1", 0)


# --- what the supervisor tells a worker


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs besides the user's flags; travels as JSON in ``--worker-spec``.

    ``ports`` are the port-0 listeners the supervisor resolved, as (route, index in the route's
    ``listen``, port); ``unix_fds`` the inherited listening Unix sockets, as (path, fd).
    """

    id: int
    report_fd: int
    admin: bool
    ports: tuple[tuple[str, int, int], ...] = ()
    unix_fds: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """``ConfigError`` when the text is not a spec (only a person could get that wrong)."""
        try:
            raw = json.loads(text)
            return cls(
                id=int(raw["id"]),
                report_fd=int(raw["report_fd"]),
                admin=bool(raw["admin"]),
                ports=tuple((str(r), int(i), int(p)) for r, i, p in raw["ports"]),
                unix_fds=tuple((str(path), int(fd)) for path, fd in raw["unix_fds"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                WORKER_SPEC_FLAG,
                f"is not a worker specification ({exc})",
                fix="this flag is set by the supervisor; use --workers N instead",
            ) from None


def apply_spec(settings: Settings, spec: WorkerSpec) -> Settings:
    """The configuration as a worker runs it: the supervisor's ports, a private admin address.

    Applied to every reload too, so a worker's listeners never drift from its siblings'.
    """
    ports = {(route, index): port for route, index, port in spec.ports}
    routes = []
    for route in settings.routes:
        listen = tuple(
            dataclasses.replace(item, port=ports[(route.name, index)])
            if isinstance(item, TcpListen) and item.port == 0 and (route.name, index) in ports
            else item
            for index, item in enumerate(route.listen)
        )
        routes.append(dataclasses.replace(route, listen=listen))
    admin = dataclasses.replace(settings.admin, listen=WORKER_ADMIN if spec.admin else None)
    return dataclasses.replace(settings, routes=tuple(routes), admin=admin)


# --- the worker's side


class WorkerLink:
    """A worker's connection to its supervisor: reports, inherited sockets, supervisor death."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._sock = socket.socket(fileno=spec.report_fd)
        self.inherited = {path: socket.socket(fileno=fd) for path, fd in spec.unix_fds}

    def tag_logs(self) -> None:
        """Every log line of this process carries ``worker=N`` (text and JSON alike).

        The formatters render ``record.fields``; a record class whose ``fields`` adds the
        worker's number reaches every line, whatever handler a reload installs later.
        """
        worker = self.spec.id

        class WorkerLogRecord(logging.LogRecord):
            @property
            def fields(self) -> dict[str, object]:
                own: dict[str, object] = self.__dict__.get(FIELDS_ATTR, {})
                return {"worker": worker, **own}

        logging.setLogRecordFactory(WorkerLogRecord)

    def report_started(self, sidecar: Sidecar) -> None:
        admin = list(sidecar.admin.address) if sidecar.admin is not None else None
        self._send({"event": "started", "pid": os.getpid(), "admin": admin})

    def report_failed(self, code: int, message: str) -> None:
        self._send({"event": "failed", "code": code, "message": message})

    def _send(self, message: dict[str, Any]) -> None:
        # A few hundred bytes into an empty socket pair: this never blocks for long.
        with contextlib.suppress(OSError):  # the supervisor is gone: watch() will notice
            self._sock.sendall(json.dumps(message).encode() + b"\n")

    async def watch(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` when the supervisor's end closes (it died, even by SIGKILL)."""
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        while True:
            try:
                data = await loop.sock_recv(self._sock, 256)
            except OSError:
                data = b""
            if not data:
                log.warning("the supervisor is gone: draining and stopping")
                on_gone()
                return


# --- the supervisor


@dataclass(eq=False)
class _Slot:
    """One worker position (1..N); its process changes when it is restarted."""

    id: int
    proc: asyncio.subprocess.Process | None = None
    admin: tuple[str, int] | None = None
    running: bool = False  # the current process reported that it serves
    ready: bool | None = None  # its /readyz when last asked
    restarts: int = 0
    start_failures: int = 0
    last_exit: int | None = None
    final: int | None = None  # exit status during the shutdown
    scrape: list[Metric] | None = None  # the current process's latest /metrics
    retired: list[Metric] = field(default_factory=list)  # counters of its ended processes

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id,
            pid=self.pid,
            running=self.running,
            ready=self.ready,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )

    def name(self) -> str:
        return f"worker {self.id}" + (f" (pid {self.pid})" if self.pid is not None else "")


def describe_exit(code: int | None) -> str:
    if code is None:
        return "not started yet"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor(AdminView):
    """Starts, watches and stops the workers; serves the admin endpoint for all of them."""

    def __init__(
        self,
        settings: Settings,
        worker_argv: Sequence[str],
        load: Callable[[], Settings] | None = None,
    ) -> None:
        """``worker_argv`` starts one worker without its spec (``python -m proxy run ...``);
        ``load`` re-reads the configuration to warn about what a reload cannot change."""
        self.settings = settings
        self.count = settings.workers
        self.slots = [_Slot(i + 1) for i in range(self.count)]
        self.started = False
        self.serving = asyncio.Event()  # set with ``started``, for whoever embeds this class
        self.draining = False
        self.started_at = time.time()
        self.restarts_total = 0
        self.admin: AdminServer | None = None
        self._argv = list(worker_argv)
        self._load = load
        self._reserved: list[socket.socket] = []
        self._ports: list[tuple[str, int, int]] = []
        self._unix: list[tuple[str, socket.socket, int]] = []
        self.fatal: tuple[int, str] | None = None
        self._wake: asyncio.Event | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._killed: set[int] = set()

    # -- run --------------------------------------------------------------------------------

    async def run(self) -> int:
        """Bind, start the workers, keep them running until told to stop; the exit code."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            self.reserve()
            if self.settings.admin.listen is not None:
                self.admin = AdminServer(self, self.settings.admin.listen)
                await self.admin.start()
        except ListenError as exc:
            log.error("%s", exc)
            self.release()
            return EXIT_START_FAILED
        if self.admin is not None:
            host, port = self.admin.address
            log_event(log, logging.INFO, "admin_ready", "admin endpoint", listen=f"{host}:{port}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        log.info("starting %d worker processes", self.count)
        try:
            await asyncio.gather(*(self._keep_running(slot) for slot in self.slots))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if self.admin is not None:
                self.admin.close()
                await self.admin.wait_closed()
            self.release()
        code = self._exit_code()
        log.info("all %d workers stopped (exit code %d)", self.count, code)
        return code

    def reserve(self) -> None:
        """Bind every listener once, before any worker starts; ``ListenError`` as one process."""
        backlog = max(128, 2 * self.settings.limits.max_connections * self.count)
        try:
            for route in self.settings.routes:
                for index, listen in enumerate(route.listen):
                    if isinstance(listen, TcpListen):
                        port = self._reserve_tcp(route.name, listen)
                        if listen.port == 0:
                            self._ports.append((route.name, index, port))
                    else:
                        self._bind_unix(route.name, listen, backlog)
        except BaseException:
            self.release()
            raise

    def _reserve_tcp(self, route: str, listen: TcpListen) -> int:
        """Bound with SO_REUSEPORT and never listening: it receives no connection itself."""
        try:
            infos = socket.getaddrinfo(
                listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise listen_error(route, listen, exc) from None
        port, seen = listen.port, set()
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            self._reserved.append(sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as asyncio binds the workers' sockets
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sockaddr = (address[0], port, *address[2:])
                sock.bind(sockaddr)
            except OSError as exc:
                # In the words asyncio and uvloop use, so the line reads as one process's.
                why = (exc.strerror or str(exc)).lower()
                raise listen_error(
                    route,
                    listen,
                    OSError(
                        exc.errno, f"error while attempting to bind on address {sockaddr!r}: {why}"
                    ),
                ) from None
            port = sock.getsockname()[1]
        return port

    def _bind_unix(self, route: str, listen: UnixListen, backlog: int) -> None:
        remove_stale_socket(listen.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._reserved.append(sock)
        try:
            sock.bind(listen.path)
            os.chmod(listen.path, listen.mode)
            sock.listen(backlog)
            inode = os.stat(listen.path).st_ino
        except OSError as exc:
            raise listen_error(route, listen, exc) from None
        self._unix.append((listen.path, sock, inode))

    def release(self) -> None:
        """Close the reserved sockets and remove our Unix socket files (not a newer process's)."""
        for path, _sock, inode in self._unix:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self._unix.clear()
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    @property
    def ports(self) -> list[tuple[str, int, int]]:
        """The port-0 listeners as resolved: (route, index in its ``listen``, port)."""
        return list(self._ports)

    # -- one worker position ----------------------------------------------------------------

    async def _keep_running(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_FIRST
        while not self.draining:
            began = loop.time()
            code, message, served = await self._run_once(slot)
            slot.last_exit = code
            if self.draining:
                slot.final = code
                return
            slot.start_failures = 0 if served else slot.start_failures + 1
            if not served and (not self.started or slot.start_failures >= MAX_START_FAILURES):
                self._give_up(slot, code, message)
                slot.final = code
                return
            if loop.time() - began > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            slot.restarts += 1
            self.restarts_total += 1
            log_event(
                log,
                logging.WARNING,
                "worker_exited",
                f"worker {slot.id} exited unexpectedly ({describe_exit(code)}); "
                f"restarting it in {backoff:g} s",
                worker=slot.id,
                status=code,
            )
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(2 * backoff, BACKOFF_MAX)

    async def _run_once(self, slot: _Slot) -> tuple[int, str | None, bool]:
        """Start one process for ``slot`` and follow it to its end: (status, message, served)."""
        parent, child = socket.socketpair()
        spec = WorkerSpec(
            id=slot.id,
            report_fd=child.fileno(),
            admin=self.settings.admin.listen is not None,
            ports=tuple(self._ports),
            unix_fds=tuple((path, sock.fileno()) for path, sock, _ in self._unix),
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                WORKER_SPEC_FLAG,
                spec.to_json(),
                stdin=subprocess.DEVNULL,
                pass_fds=(child.fileno(), *(fd for _, fd in spec.unix_fds)),
                process_group=0,  # a terminal's Ctrl-C reaches the workers only through us
            )
        except OSError as exc:
            parent.close()
            return EXIT_START_FAILED, f"could not start {self._argv[0]}: {exc}", False
        finally:
            child.close()
        slot.proc = proc
        if self.draining:  # a stop signal arrived while it was being started
            self._signal(slot, signal.SIGTERM)
        served, message = False, None
        reader, writer = await asyncio.open_connection(sock=parent)
        try:
            while line := await reader.readline():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    report = json.loads(line)
                    if report["event"] == "started":
                        served = True
                        self._started(slot, report.get("admin"))
                    elif report["event"] == "failed":
                        message = str(report["message"])
        except (ConnectionError, ValueError):
            pass  # a worker that dies mid-line; its status says the rest
        finally:
            writer.close()
        code = await proc.wait()
        self._ended(slot)
        return code, message, served

    def _started(self, slot: _Slot, admin: object) -> None:
        if isinstance(admin, list) and len(admin) == 2:
            slot.admin = (str(admin[0]), int(admin[1]))
        slot.running = True
        log_event(
            log,
            logging.INFO,
            "worker_started",
            f"worker {slot.id} serving",
            worker=slot.id,
            pid=slot.pid,
        )
        if not self.started and not self.draining and all(s.running for s in self.slots):
            self.started = True
            self.serving.set()
            log_event(
                log,
                logging.INFO,
                "workers_ready",
                f"all {self.count} workers serving",
                pids=",".join(str(s.pid) for s in self.slots),
            )

    def _ended(self, slot: _Slot) -> None:
        """Keep the ended process's counters, so the merged ones never go down."""
        if slot.scrape is not None:
            slot.retired = merge_families([slot.retired, cumulative_only(slot.scrape)])
        slot.scrape = None
        slot.running = False
        slot.ready = None
        slot.admin = None
        slot.proc = None

    def _give_up(self, slot: _Slot, code: int, message: str | None) -> None:
        if self.fatal is not None:
            return
        why = message or (
            f"it stopped ({describe_exit(code)}) before serving; its own lines above say why"
        )
        status = code if code in (EXIT_START_FAILED, EXIT_CONFIG) else EXIT_START_FAILED
        self.fatal = (status, why)
        log.error("worker %d could not start: %s; stopping the sidecar", slot.id, why)
        self.request_shutdown()

    def _exit_code(self) -> int:
        if self.fatal is not None:
            return self.fatal[0]
        worst = EXIT_OK
        for slot in self.slots:
            code = slot.final
            if code is None or code < 0:
                killed = code is not None and -code == signal.SIGKILL and slot.id in self._killed
                terminated = code is None or -code in (signal.SIGTERM, signal.SIGINT)
                code = EXIT_FORCED if killed else EXIT_OK if terminated else EXIT_START_FAILED
            worst = max(worst, code)
        return worst

    # -- signals ----------------------------------------------------------------------------

    def _signal(self, slot: _Slot, sig: signal.Signals) -> None:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(sig)

    def _on_stop_signal(self, name: str) -> None:
        if self.draining:
            log.warning("received %s again: the workers close every session now", name)
            for slot in self.slots:
                self._signal(slot, signal.SIGTERM)
            return
        log.info(
            "received %s: the %d workers drain (send it again to stop at once)", name, self.count
        )
        self.request_shutdown()

    def _on_hangup(self) -> None:
        log.info("received SIGHUP: the workers reload the configuration")
        self._warn_unreloadable()
        for slot in self.slots:
            if slot.running:  # a worker still starting reads the configuration anyway
                self._signal(slot, signal.SIGHUP)

    def request_shutdown(self) -> None:
        """Every worker drains as on SIGTERM; the ones still running after that are killed."""
        if self.draining:
            return
        self.draining = True
        assert self._wake is not None
        self._wake.set()
        for slot in self.slots:
            self._signal(slot, signal.SIGTERM)
        deadline = self.settings.timeouts.drain + STOP_GRACE
        self._kill_timer = asyncio.get_running_loop().call_later(deadline, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.error(
                    "%s still running %g s after SIGTERM: killing it", slot.name(), STOP_GRACE
                )
                self._killed.add(slot.id)
                self._signal(slot, signal.SIGKILL)

    def _warn_unreloadable(self) -> None:
        if self._load is None:
            return
        try:
            new = self._load()
        except ConfigError:
            return  # every worker rejects it and says why
        if new.workers != self.count:
            log.warning(
                "workers changed from %d to %d: the number of processes changes at the next start",
                self.count,
                new.workers,
            )
        if new.admin.listen != self.settings.admin.listen:
            log.warning(
                "admin.listen changed: with several workers the admin endpoint moves at the "
                "next start"
            )

    # -- asking the workers -----------------------------------------------------------------

    async def _ask(
        self, slot: _Slot, method: str, path: str, seconds: float = ASK_TIMEOUT
    ) -> tuple[int, bytes]:
        """One request to a worker's private admin endpoint; OSError, TimeoutError, ValueError."""
        if slot.admin is None:
            raise ConnectionError("its admin endpoint is not known yet")
        host, port = slot.admin
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
                chunks, size = [], 0
                while chunk := await reader.read(65536):
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        raise ValueError(f"answer larger than {MAX_RESPONSE} bytes")
                    chunks.append(chunk)
            finally:
                writer.close()
        return parse_http_response(b"".join(chunks))

    async def _scrape(self, slot: _Slot) -> None:
        proc = slot.proc
        try:
            status, body = await self._ask(slot, "GET", "/metrics")
            if status != 200:
                raise ValueError(f"/metrics answered {status}")
            families = parse_exposition(body.decode())
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("%s: /metrics: %s; its previous figures are used", slot.name(), exc)
            return
        if slot.proc is proc and slot.running:  # not an answer from a process that just ended
            slot.scrape = families

    async def _readiness(self, slot: _Slot) -> list[str]:
        """Why ``slot`` is not ready; empty when it is."""
        if not slot.running:
            if self.started and not self.draining:
                return [f"worker {slot.id}: not running ({describe_exit(slot.last_exit)})"]
            return []
        try:
            status, body = await self._ask(slot, "GET", "/readyz")
        except (OSError, TimeoutError, ValueError) as exc:
            slot.ready = None
            return [
                f"{slot.name()}: its admin endpoint did not answer ({exc or type(exc).__name__})"
            ]
        slot.ready = status == 200
        if slot.ready:
            return []
        lines = body.decode(errors="replace").splitlines() or ["not ready"]
        return [f"{slot.name()}: {line}" for line in lines]

    # -- AdminView --------------------------------------------------------------------------

    async def exposition(self) -> tuple[bytes, str]:
        await asyncio.gather(*(self._scrape(s) for s in self.slots if s.running))
        parts: list[list[Metric]] = []
        for slot in self.slots:
            parts.append(slot.retired)
            if slot.scrape is not None:
                parts.append(slot.scrape)
        ready_name = f"{PREFIX}ready"
        merged = merge_families(parts)
        workers_ready = all(
            s.running and s.scrape is not None and _gauge(s.scrape, ready_name) == 1.0
            for s in self.slots
        )
        families = without(merged, [ready_name])
        families += self._own_families(self.started and not self.draining and workers_ready)
        return render_exposition(families), CONTENT_TYPE_PLAIN_0_0_4

    def _own_families(self, ready: bool) -> list[Metric]:
        ready_name = f"{PREFIX}ready"
        ready_family = Metric(
            ready_name,
            "1 when /readyz answers 200: every worker process is up and ready. Alert when 0 "
            "for minutes.",
            "gauge",
        )
        ready_family.add_sample(ready_name, {}, 1.0 if ready else 0.0)
        workers = Metric(
            f"{PREFIX}workers",
            "Worker processes serving now; compare with the configured workers. Alert when "
            "below it for minutes.",
            "gauge",
        )
        workers.add_sample(f"{PREFIX}workers", {}, float(sum(s.running for s in self.slots)))
        restarts = Metric(
            f"{PREFIX}worker_restarts",
            "Worker processes that ended unexpectedly and were started again. Alert on any "
            "increase: a worker crashed or was killed (out of memory?).",
            "counter",
        )
        restarts.add_sample(f"{PREFIX}worker_restarts_total", {}, float(self.restarts_total))
        return [ready_family, workers, restarts]

    async def health(self) -> Health:
        reasons: list[str] = []
        if not self.started:
            up = sum(s.running for s in self.slots)
            reasons.append(f"starting: {up} of {self.count} workers are serving")
        if self.draining:
            reasons.append("draining: shutting down, not accepting new connections")
        for lines in await asyncio.gather(*(self._readiness(s) for s in self.slots)):
            reasons.extend(lines)
        return Health(started=self.started, live=True, ready=not reasons, reasons=tuple(reasons))

    async def status(self) -> StatusDoc:
        health = await self.health()

        async def document(slot: _Slot) -> tuple[WorkerInfo, StatusDoc] | None:
            try:
                status, body = await self._ask(slot, "GET", "/status?format=json")
                if status != 200:
                    raise ValueError(f"/status answered {status}")
                doc: StatusDoc = json.loads(body)
            except (OSError, TimeoutError, ValueError) as exc:
                log.debug("%s: /status: %s", slot.name(), exc)
                return None
            return slot.info(), doc

        found = await asyncio.gather(*(document(s) for s in self.slots if s.running))
        now = datetime.now(UTC)
        base = StatusDoc(
            version=__version__,
            generated_at=_iso(now),
            started_at=_iso(datetime.fromtimestamp(self.started_at, UTC)),
            uptime_seconds=round(time.time() - self.started_at, 3),
            ready=health.ready,
            reasons=list(health.reasons),
            active_connections=0,
            max_connections=self.settings.limits.max_connections * self.count,
            routes=[],
        )
        docs = [item for item in found if item is not None]
        return merge_status(base, [s.info() for s in self.slots], docs, scale=self.count)

    def render_status(self, status: StatusDoc) -> str:
        return add_section(render_html(status), workers_html([s.info() for s in self.slots]))

    async def reload(self) -> tuple[bool, str]:
        """Every serving worker reloads; applied only if every one of them applied it."""
        self._warn_unreloadable()
        if self.draining:
            return False, "not reloading: the sidecar is shutting down"
        serving = [s for s in self.slots if s.running]

        async def one(slot: _Slot) -> tuple[bool, str]:
            try:
                status, body = await self._ask(slot, "POST", "/reload", RELOAD_TIMEOUT)
            except (OSError, TimeoutError, ValueError) as exc:
                return False, f"{slot.name()}: did not answer ({exc or type(exc).__name__})"
            return status == 200, f"{slot.name()}: {body.decode(errors='replace').strip()}"

        results = await asyncio.gather(*(one(s) for s in serving))
        lines = [line for _, line in results]
        lines += [
            f"worker {s.id}: not running; it reads the configuration when it starts"
            for s in self.slots
            if not s.running
        ]
        applied = bool(serving) and all(ok for ok, _ in results)
        return applied, "\n".join(lines)


def _gauge(families: Sequence[Metric], name: str) -> float | None:
    for family in families:
        if family.name == name and family.samples:
            return float(family.samples[0].value)
    return None


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def supervise(settings: Settings, worker_argv: Sequence[str], load: Callable[[], Settings]) -> int:
    """The supervisor on its own event loop (the stdlib one: it relays nothing)."""
    return asyncio.run(Supervisor(settings, worker_argv, load).run())
