"""Opening the verified TLS leg to the upstream server (asyncio plumbing, no protocol parsing).

The order is libpq's: resolve, TCP connect, send SSLRequest and read **exactly one byte** from the
raw socket, refuse if anything else is already waiting (CVE-2021-23222), then run the TLS handshake
on that same socket and check the server's name ourselves (``proxy.hostname``) before a single byte
of the client's session is sent. With ``sslnegotiation=direct`` the TLS handshake starts at once
and ALPN ``postgresql`` must be agreed.

Doing the one-byte exchange on the raw socket (``loop.sock_recv``) rather than through a
``StreamReader`` avoids the asyncio trap where bytes already buffered by the reader are silently
left out of the TLS layer (CPython gh-142352).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from proxy import tls
from proxy.endpoint import Endpoint
from proxy.errors import ConfigError, UpstreamError
from proxy.settings import Timeouts, UpstreamSettings
from proxy.tls_transport import TLSTransport, client_handshake
from proxy.wire.messages import SSL_REQUEST
from proxy.wire.negotiation import check_ssl_response

# On close we flush, send close_notify and wait this long for the server's, like libpq (which
# does not wait at all). asyncio's default of 30 s would keep a backend whose client died
# busy-waiting on an open TCP connection.
TLS_SHUTDOWN_TIMEOUT = 2.0

# Which TLS layer carries the upstream leg: the sidecar's own (``proxy.tls_transport``, the
# default) or asyncio's ``create_connection(ssl=...)``, kept selectable so that a benchmark can
# compare the two in one run and an operator has a way back if ours misbehaves.
TLS_TRANSPORT_ENV = "PG_TLS_SIDECAR_TLS_TRANSPORT"
TLS_TRANSPORTS = ("sidecar", "asyncio")
TLS_TRANSPORT = "sidecar"


def choose_tls_transport(environ: Mapping[str, str]) -> str:
    """Read ``PG_TLS_SIDECAR_TLS_TRANSPORT`` once, at start; a bad value is a ConfigError."""
    global TLS_TRANSPORT
    value = environ.get(TLS_TRANSPORT_ENV, "sidecar").strip() or "sidecar"
    if value not in TLS_TRANSPORTS:
        raise ConfigError(
            TLS_TRANSPORT_ENV,
            "is not a TLS transport this sidecar has",
            value=value,
            fix='"sidecar" (the default, the sidecar\'s own) or "asyncio" (asyncio\'s, to compare)',
            source="environment",
        )
    TLS_TRANSPORT = value
    return value


@dataclass(frozen=True, slots=True)
class UpstreamConnection:
    """A TLS session to the server, verified, with nothing sent on it yet."""

    endpoint: Endpoint
    peer: tls.PeerInfo
    address: str  # the IP actually connected to, for logs
    connect_seconds: float
    handshake_seconds: float
    # The key-share group the server asked for with a HelloRetryRequest (see wire.tls_hello);
    # None when it took the one offered, or when asyncio's TLS transport hides the bytes.
    hello_retry_group: int | None


async def connect_upstream(
    up: UpstreamSettings,
    context: ssl.SSLContext,
    timeouts: Timeouts,
    endpoint_factory: Callable[[], Endpoint] = lambda: Endpoint("upstream"),
) -> UpstreamConnection:
    """Return a verified TLS connection or raise ``UpstreamError`` with a reason and a fix."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    connect_timeout = up.connect_timeout or timeouts.connect
    try:
        async with asyncio.timeout(connect_timeout):
            sock, address = await _open_tcp(up)
    except TimeoutError:
        raise UpstreamError(
            "timeout",
            f"could not connect to the upstream server {up.describe()}: no answer within "
            f"{connect_timeout:g} s",
            hint="check the host name, port and any firewall between the sidecar and the server",
        ) from None
    connected = time.monotonic()
    try:
        _set_keepalive(sock, up)
        endpoint, retry_group = await _negotiate_tls(
            loop, sock, up, context, timeouts, endpoint_factory
        )
    except BaseException:
        sock.close()
        raise
    done = time.monotonic()
    assert endpoint.transport is not None
    ssl_object = endpoint.transport.get_extra_info("ssl_object")
    try:
        peer = tls.verify_peer(ssl_object, up)
    except BaseException:
        endpoint.abort()
        raise
    return UpstreamConnection(
        endpoint, peer, address, connected - started, done - connected, retry_group
    )


async def _open_tcp(up: UpstreamSettings) -> tuple[socket.socket, str]:
    loop = asyncio.get_running_loop()
    host = up.connect_host
    try:
        infos = _numeric_address(host, up.port) or await loop.getaddrinfo(
            host, up.port, type=socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        raise UpstreamError(
            "dns",
            f'could not translate host name "{host}" to an address: {exc.strerror}',
            hint="check the upstream host name; with a private endpoint, check the DNS zone",
        ) from None
    errors: list[str] = []
    for family, type_, proto, _canon, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            errors.append(f"{_host_of(sockaddr)} port {up.port}: {why}")
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, _host_of(sockaddr)
    raise UpstreamError(
        "refused",
        f"could not connect to the upstream server {up.describe()}: " + "; ".join(errors),
        hint="is the server running and accepting TCP connections on that port?",
    )


AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


@lru_cache(maxsize=64)
def _numeric_address(host: str, port: int) -> tuple[AddrInfo, ...]:
    """An IP literal (``hostaddr``, or a host given as an address) needs no resolver call.

    ``loop.getaddrinfo`` always goes through the default thread pool: two thread hand-offs per
    connection for an answer we already have. Cached: the answer never changes for a literal.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ()  # a name, or a form only the resolver knows (scope ids, "127.1")
    if ip.version == 4:
        return ((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port)),)
    return ((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0)),)


def _host_of(sockaddr: object) -> str:
    host = sockaddr[0] if isinstance(sockaddr, tuple) else sockaddr
    return host if isinstance(host, str) else repr(host)


def _set_keepalive(sock: socket.socket, up: UpstreamSettings) -> None:
    """Keep idle sessions alive through cloud load balancers (Azure drops flows idle ~4 min)."""
    if not up.keepalives:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, up.keepalives_idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, up.keepalives_interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, up.keepalives_count)


async def _negotiate_tls(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    up: UpstreamSettings,
    context: ssl.SSLContext,
    timeouts: Timeouts,
    endpoint_factory: Callable[[], Endpoint],
) -> tuple[Endpoint, int | None]:
    limit = timeouts.tls_handshake
    step = "waiting for the answer to the SSLRequest"
    try:
        async with asyncio.timeout(limit):
            if up.sslnegotiation == "postgres":
                await loop.sock_sendall(sock, SSL_REQUEST)
                answer = await loop.sock_recv(sock, 1)
                check_ssl_response(answer, more_buffered=_more_buffered(sock))
            step = "during the TLS handshake"
            return await _start_tls(loop, sock, up, context, limit, endpoint_factory)
    except TimeoutError:
        raise UpstreamError(
            "timeout",
            f"the upstream server {up.describe()} did not complete TLS set-up within {limit:g} s "
            f"(stalled {step})",
            hint="is this port a PostgreSQL server? raise timeouts.tls_handshake for slow links",
        ) from None
    except ssl.SSLError as exc:
        raise tls.upstream_error_from_ssl(exc, up) from None
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
        raise UpstreamError(
            "closed",
            f"the upstream server {up.describe()} closed the connection {step}: "
            f"{exc.strerror or exc}",
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            raise UpstreamError(
                "closed", f"the upstream server {up.describe()} reset the connection {step}"
            ) from None
        raise


async def _start_tls(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    up: UpstreamSettings,
    context: ssl.SSLContext,
    limit: float,
    endpoint_factory: Callable[[], Endpoint],
) -> tuple[Endpoint, int | None]:
    server_hostname = tls.sni_for(up) or None
    if TLS_TRANSPORT == "asyncio":
        _transport, endpoint = await loop.create_connection(
            endpoint_factory,
            sock=sock,
            ssl=context,
            server_hostname=server_hostname or "",
            ssl_handshake_timeout=limit + 1,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
        return endpoint, None
    endpoint = endpoint_factory()  # before the handshake, as asyncio does (the doctor relies on it)
    hs = await client_handshake(sock, context, server_hostname)
    TLSTransport(loop, sock, hs.sslobj, hs.incoming, hs.outgoing, endpoint, TLS_SHUTDOWN_TIMEOUT)
    return endpoint, hs.hello_retry_group


def _more_buffered(sock: socket.socket) -> bool:
    """True when the server already sent more than its one-byte answer (never legitimate)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False
