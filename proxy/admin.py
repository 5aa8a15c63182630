"""The admin HTTP endpoint: metrics, Kubernetes probes, the status page and a shutdown hook.

It runs on the relay's own event loop rather than in a thread (prometheus-client's
``start_http_server`` binds 0.0.0.0 from a daemon thread): a probe answered from the loop proves
the loop is alive, and the statistics are read without locks from the thread that writes them.

The HTTP is deliberately small and strict, because whatever can reach this port can send it
anything: the request head is bounded (8 KiB, then 431), the whole request must arrive within
a timeout (then 408), one request per connection (``Connection: close``), no request bodies
beyond a token size, methods checked per path (405 with ``Allow``). ``POST /shutdown`` is
accepted only from a loopback peer and never from a browser (any ``Origin`` header is refused),
so neither a neighbour on the network nor a web page open on a developer's machine can stop the
sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import json
import logging
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final, NamedTuple, Protocol
from urllib.parse import parse_qs

from proxy.errors import ListenError
from proxy.metrics import Metrics
from proxy.settings import TcpListen
from proxy.status_page import StatusDoc, render_html

log = logging.getLogger("proxy.admin")

MAX_HEAD: Final = 8192  # request line plus headers
MAX_BODY: Final = 1024  # no endpoint takes a body; a small one (curl -d '') is read and ignored
READ_TIMEOUT: Final = 10.0  # for the whole request, so a slow client cannot hold a connection
LINGER_SECONDS: Final = 1.0  # after answering, how long unread input is drained before closing
LINGER_BYTES: Final = 65536

TEXT: Final = "text/plain; charset=utf-8"
JSON: Final = "application/json"
HTML: Final = "text/html; charset=utf-8"
# The status page needs nothing but its own inline style.
_HTML_POLICY: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_GET: Final = ("GET", "HEAD")
ENDPOINTS: Final[dict[str, tuple[str, ...]]] = {
    "/metrics": _GET,
    "/startup": _GET,
    "/livez": _GET,
    "/readyz": _GET,
    "/status": _GET,
    "/shutdown": ("POST",),
    "/reload": ("POST",),
}

_REQUEST_LINE: Final = re.compile(r"([A-Z]{1,16}) (/[!-~]*) HTTP/(\d)\.(\d)")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


class Health(NamedTuple):
    """The probes' view of the sidecar; ``reasons`` say why it is not ready, one per line."""

    started: bool
    live: bool
    ready: bool
    reasons: tuple[str, ...]


class AdminSource(Protocol):
    """What the endpoint needs from the application (``proxy.app``, or a test double)."""

    @property
    def metrics(self) -> Metrics: ...

    def health(self) -> Health: ...

    def status(self) -> StatusDoc: ...

    def request_shutdown(self) -> None:
        """Start the same graceful drain as SIGTERM; must return at once."""
        ...

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration like SIGHUP; (applied?, what happened)."""
        ...


class AdminView:
    """What the endpoint serves, asked asynchronously.

    One process answers from its own memory (``LocalView``); a supervisor of worker processes
    has to ask each worker first (``proxy.workers``), so every question may wait.
    """

    async def exposition(self) -> tuple[bytes, str]:
        """The metrics body and its Content-Type."""
        raise NotImplementedError

    async def health(self) -> Health:
        raise NotImplementedError

    async def status(self) -> StatusDoc:
        raise NotImplementedError

    def render_status(self, status: StatusDoc) -> str:
        """The HTML page for ``status``."""
        return render_html(status)

    def request_shutdown(self) -> None:
        """Start the same graceful drain as SIGTERM; must return at once."""
        raise NotImplementedError

    async def reload(self) -> tuple[bool, str]:
        raise NotImplementedError


class LocalView(AdminView):
    """The view of one sidecar process: its own statistics, read on its own loop."""

    def __init__(self, source: AdminSource) -> None:
        self._source = source

    async def exposition(self) -> tuple[bytes, str]:
        return self._source.metrics.exposition()

    async def health(self) -> Health:
        return self._source.health()

    async def status(self) -> StatusDoc:
        return self._source.status()

    def request_shutdown(self) -> None:
        self._source.request_shutdown()

    async def reload(self) -> tuple[bool, str]:
        return await self._source.reload()


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class HttpError(Exception):
    """A request the endpoint refuses; carries the status and a one-line explanation."""

    def __init__(
        self, status: int, detail: str, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers

    def response(self) -> Response:
        phrase = HTTPStatus(self.status).phrase
        body = f"{self.status} {phrase}: {self.detail}\n".encode()
        return Response(self.status, body, TEXT, self.headers)


class _ClientLeft(Exception):
    """The peer closed before sending anything: nothing to answer (a TCP probe does this)."""


# --- request parsing


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request head (and a tiny body, discarded), or ``HttpError``.

    The reader's limit must be ``MAX_HEAD``: ``readuntil`` then refuses a longer head by itself.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"request line and headers exceed {MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _ClientLeft from None
        raise HttpError(400, "the request head ended early") from None
    request = parse_head(head)
    await _discard_body(reader, request)
    return request


def parse_head(head: bytes) -> Request:
    """Request line and header fields of an HTTP/1.x request, CRLF-terminated."""
    lines = head.decode("latin-1").split("\r\n")[:-2]  # the head ends with an empty line
    match = _REQUEST_LINE.fullmatch(lines[0]) if lines else None
    if match is None:
        raise HttpError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != "1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            # Also refuses obsolete line folding (a line starting with whitespace).
            raise HttpError(400, "malformed header field")
        value = value.strip(" \t")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise HttpError(400, f"control character in header field {name}")
        headers.setdefault(name.lower(), []).append(value)
    if minor != "0" and "host" not in headers:
        raise HttpError(400, "an HTTP/1.1 request needs a Host header")
    path, _, query = target.partition("?")
    return Request(method, path, query, headers)


async def _discard_body(reader: asyncio.StreamReader, request: Request) -> None:
    if "transfer-encoding" in request.headers:
        raise HttpError(411, "send the body with Content-Length (no endpoint takes a body)")
    lengths = request.headers.get("content-length", [])
    if not lengths:
        return
    if len(set(lengths)) != 1 or not lengths[0].isdigit() or not lengths[0].isascii():
        raise HttpError(400, "invalid Content-Length")
    length = int(lengths[0])
    if length > MAX_BODY:
        raise HttpError(413, f"no endpoint takes a body; at most {MAX_BODY} bytes are accepted")
    try:
        await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "the request body ended early") from None


def _is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _describe_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


# --- the server


class AdminServer:
    """Serves the admin endpoints on one TCP address from the running event loop."""

    def __init__(
        self,
        source: AdminSource | AdminView,
        listen: TcpListen,
        *,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self._source = source if isinstance(source, AdminView) else LocalView(source)
        self._listen = listen
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind, or raise ``ListenError`` (nothing is left listening)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self._listen.host, self._listen.port, limit=MAX_HEAD
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ListenError(
                f"admin endpoint: could not listen on {self._listen.describe()}: {why}; "
                "choose another address with --admin-listen or admin.listen, or turn it off "
                "with --admin-listen off"
            ) from None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address, with port 0 resolved."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the admin endpoint is not listening")
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        """Stop accepting, and close open connections once their answer is written."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def wait_closed(self) -> None:
        """Wait until every connection's handler has finished (call after ``close``)."""
        if self._server is not None:
            await self._server.wait_closed()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        try:
            await self._exchange(reader, writer, peer)
        except (ConnectionError, TimeoutError, _ClientLeft):
            pass  # the peer left or stalled; nothing more can be said to it
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        request: Request | None = None
        try:
            async with asyncio.timeout(self._read_timeout):
                request = await read_request(reader)
            response = await self._dispatch(request, peer)
        except HttpError as exc:
            response = exc.response()
        except TimeoutError:
            response = HttpError(
                408, f"the request did not arrive within {self._read_timeout:g} s"
            ).response()
        except (ConnectionError, _ClientLeft):
            raise
        except Exception:
            log.exception("admin endpoint: error answering %s", _describe_peer(peer))
            response = HttpError(500, "internal error, see the sidecar's log").response()

        if response.status >= 300:
            log.debug(
                "admin %s %s from %s: %d %s",
                request.method if request else "-",
                repr(request.path) if request else "-",
                _describe_peer(peer),
                response.status,
                response.body.decode(errors="replace").strip(),
            )
        head_only = request is not None and request.method == "HEAD"
        writer.write(_serialize(response, head_only=head_only))
        async with asyncio.timeout(self._read_timeout):
            await writer.drain()
        await _linger(reader, writer)

    async def _dispatch(self, request: Request, peer: object) -> Response:
        allowed = ENDPOINTS.get(request.path)
        if allowed is None:
            raise HttpError(404, f"no such endpoint; try {', '.join(ENDPOINTS)}")
        if request.method not in allowed:
            raise HttpError(
                405,
                f"{request.path} accepts {' and '.join(allowed)}",
                headers=(("Allow", ", ".join(allowed)),),
            )
        if request.path == "/metrics":
            body, content_type = await self._source.exposition()
            return Response(200, body, content_type)
        if request.path == "/shutdown":
            return self._shutdown(request, peer)
        if request.path == "/reload":
            self._check_local_operator(request, peer, "reload")
            applied, message = await self._source.reload()
            return Response(200 if applied else 409, message.encode() + b"\n")
        if request.path == "/status":
            return await self._status(request)
        health = await self._source.health()
        if request.path == "/startup":
            return _probe(health.started, "started", ("starting",))
        if request.path == "/livez":
            return _probe(health.live, "ok", ("not live",))
        return _probe(health.ready, "ok", health.reasons or ("not ready",))

    async def _status(self, request: Request) -> Response:
        formats = parse_qs(request.query, keep_blank_values=True).get("format", ["html"])
        if len(formats) != 1 or formats[0] not in ("html", "json"):
            raise HttpError(400, "format must be html or json")
        status = await self._source.status()
        if formats[0] == "json":
            body = json.dumps(status, indent=2, ensure_ascii=False).encode() + b"\n"
            return Response(200, body, JSON)
        return Response(
            200,
            self._source.render_status(status).encode(),
            HTML,
            (("Content-Security-Policy", _HTML_POLICY),),
        )

    @staticmethod
    def _check_local_operator(request: Request, peer: object, what: str) -> None:
        """Operations that change the sidecar: loopback peers only, never from a web page."""
        if not _is_loopback(peer):
            raise HttpError(403, f"{what} is accepted only from a loopback address")
        if request.header("origin") is not None:
            raise HttpError(403, f"{what} is not accepted from a web page (Origin header)")

    def _shutdown(self, request: Request, peer: object) -> Response:
        self._check_local_operator(request, peer, "shutdown")
        log.info("shutdown requested over the admin endpoint by %s", _describe_peer(peer))
        self._source.request_shutdown()
        return Response(202, b"shutting down\n")


def _probe(ok: bool, good: str, bad: tuple[str, ...]) -> Response:
    if ok:
        return Response(200, f"{good}\n".encode())
    return Response(503, "".join(f"{line}\n" for line in bad).encode())


def _serialize(response: Response, *, head_only: bool) -> bytes:
    phrase = HTTPStatus(response.status).phrase
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
        *response.headers,
    ]
    head = f"HTTP/1.1 {response.status} {phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else response.body)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client still sends before closing.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the
    answer before the client reads it (a 431 is sent while the oversized head is still
    arriving). Bounded in time and bytes, so it costs a stalled client nothing.
    """
    if writer.can_write_eof():
        writer.write_eof()
    remaining = LINGER_BYTES
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_SECONDS):
            while remaining > 0:
                chunk = await reader.read(min(remaining, 16384))
                if not chunk:
                    return
                remaining -= len(chunk)
