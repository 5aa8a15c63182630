"""``proxy.tls_transport``: the sidecar's own TLS transport, driven directly against real servers.

Every case is a real loopback connection and a real TLS handshake verified against a throwaway
CA; the server is a Python ``ssl`` socket (or an ``SSLObject`` where the test needs to control
which bytes travel in which TCP segment) in a thread. The transport is built exactly as
``proxy.upstream._start_tls`` builds it, with a recording ``asyncio.Protocol`` on top.

Each test runs on a fresh event loop (``--event-loop uvloop`` for uvloop) whose exception
handler records every call: an exception that escapes a transport callback fails the test even
when the protocol saw the right thing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy import tls_transport
from proxy.eventloop import LoopFactory, choose_loop
from proxy.tls_transport import HIGH_WATER, TLSTransport, client_handshake
from tests.fake_servers import server_context, tls_alert_record

T = TypeVar("T")

WAIT = 10.0  # upper bound for anything that should happen promptly; never a sleep
MiB = 1024 * 1024

# -- the event loop ---------------------------------------------------------------------------

Run = Callable[..., Any]


def run_on_new_loop(
    factory: LoopFactory | None,
    main: Callable[[], Coroutine[Any, Any, T]],
    timeout: float = WAIT,
) -> T:
    """Run ``main()`` on a new loop; fail if anything reached the loop's exception handler."""
    handled: list[dict[str, Any]] = []

    async def wrapper() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: handled.append(ctx))
        return await asyncio.wait_for(main(), timeout)

    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(wrapper())
    assert handled == [], f"exceptions reached the loop's exception handler: {handled}"
    return result


@pytest.fixture
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory | None:
    return choose_loop(request.config.getoption("--event-loop"))[1]


@pytest.fixture
def run(loop_factory: LoopFactory | None) -> Run:
    def run(main: Callable[[], Coroutine[Any, Any, T]], timeout: float = WAIT) -> T:
        return run_on_new_loop(loop_factory, main, timeout)

    return run


# -- TLS contexts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_ctx(certs: dict[str, Path]) -> ssl.SSLContext:
    """verify-full against the test CA, as the sidecar's upstream context does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=certs["ca.cer"].read_bytes())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx


def make_server_ctx(
    certs: dict[str, Path], name: str = "good", version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    return server_context(certs[f"{name}.crt"], certs[f"{name}.key"], max_version=version)


@pytest.fixture(scope="module")
def server_ctx(certs: dict[str, Path]) -> ssl.SSLContext:
    return make_server_ctx(certs)


# -- the server ---------------------------------------------------------------------------------

Script = Callable[[socket.socket], Any]


class Server:
    """Accepts ``count`` loopback connections and runs ``script(sock)`` on each in a thread.

    What a script returns (or raises) is its connection's result, so the test asserts on the
    server's view in the test thread: ``server.result(i)``.
    """

    def __init__(self, script: Script, count: int = 1) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.results: list[concurrent.futures.Future[Any]] = [
            concurrent.futures.Future() for _ in range(count)
        ]
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Server:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        self.listener.close()
        self._acceptor.join(WAIT)
        for t in self._threads:
            t.join(WAIT)

    def _accept(self) -> None:
        for future in self.results:
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                future.set_exception(exc)
                continue
            sock.settimeout(WAIT)
            # Without it, a small send after another waits for the client's delayed ACK, and
            # "the server has sent it" would not mean "it is in the client's receive queue".
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(sock, future), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, future: concurrent.futures.Future[Any]) -> None:
        try:
            future.set_result(self.script(sock))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            sock.close()

    def result(self, index: int = 0, timeout: float = WAIT) -> Any:
        return self.results[index].result(timeout)

    def wait_all(self, timeout: float = WAIT) -> None:
        concurrent.futures.wait(self.results, timeout)
        for t in self._threads:
            t.join(timeout)


def tls_accept(sock: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """Server side; a TCP EOF without close_notify raises SSLEOFError instead of reading b''."""
    return ctx.wrap_socket(sock, server_side=True, suppress_ragged_eofs=False)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 256 * 1024))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_to_close_notify(tls: ssl.SSLSocket) -> bytes:
    """Everything the client sends until its close_notify (a ragged EOF raises SSLEOFError)."""
    buf = bytearray()
    while chunk := tls.recv(256 * 1024):
        buf += chunk
    return bytes(buf)


def how_it_ended(tls: ssl.SSLSocket) -> str:
    """Read to the end and name it: 'close_notify', 'ragged' (TCP FIN only) or 'reset'."""
    try:
        read_to_close_notify(tls)
    except ssl.SSLEOFError:
        return "ragged"
    except ConnectionResetError:
        return "reset"
    return "close_notify"


def raw_sendall(tls: ssl.SSLSocket, data: bytes) -> None:
    """Bytes straight onto the TCP connection, past the TLS layer."""
    socket.socket.sendall(tls, data)


def tcp_shutdown_write(tls: ssl.SSLSocket) -> None:
    """A TCP FIN without close_notify, keeping the TLS session readable."""
    dup = socket.socket(fileno=os.dup(tls.fileno()))
    try:
        dup.shutdown(socket.SHUT_WR)
    finally:
        dup.close()


def bio_accept(
    sock: socket.socket, ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Server handshake over memory BIOs: the script decides what goes in which send."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("client left during the handshake") from None
            incoming.write(chunk)
        else:
            return obj, incoming, outgoing


def bio_read_to_end(
    sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO
) -> tuple[bytes, str]:
    """What the client sends, and how it ended: 'close_notify' or 'ragged'."""
    buf = bytearray()
    while True:
        try:
            chunk = obj.read(65536)
        except ssl.SSLWantReadError:
            raw = sock.recv(65536)
            if raw:
                incoming.write(raw)
            else:
                incoming.write_eof()
            continue
        except ssl.SSLZeroReturnError:
            return bytes(buf), "close_notify"
        except ssl.SSLEOFError:
            return bytes(buf), "ragged"
        if not chunk:
            return bytes(buf), "close_notify"
        buf += chunk


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_when_let(ctx: ssl.SSLContext, let: threading.Event) -> Callable[[socket.socket], str]:
    """A server script that reads nothing until the test sets ``let`` (so the client's write
    buffer fills), then reads to the client's close_notify, answers with its own and returns
    the digest of what it read."""

    def script(sock: socket.socket) -> str:
        with tls_accept(sock, ctx) as tls:
            if not let.wait(WAIT):
                raise TimeoutError("the test never let the server read")
            data = read_to_close_notify(tls)
            tls.unwrap()
        return sha(data)

    return script


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the client ---------------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """Records every callback in order; futures for the ones a test waits on."""

    def __init__(self, keep_open: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.keep_open = keep_open
        self.transport: asyncio.Transport | None = None
        self.events: list[tuple[str, Any]] = []
        self.data = bytearray()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.write_paused: asyncio.Future[None] = loop.create_future()
        self.write_resumed: asyncio.Future[None] = loop.create_future()
        self._want: tuple[int, asyncio.Future[None]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append(("made", None))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", len(data)))
        self.data += data
        if self._want is not None and len(self.data) >= self._want[0]:
            self._want[1].set_result(None)
            self._want = None

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        self.eof.set_result(None)
        return self.keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(("lost", exc))
        self.lost.set_result(exc)  # a second call raises InvalidStateError: the handler sees it

    def pause_writing(self) -> None:
        self.events.append(("pause_writing", None))
        if not self.write_paused.done():
            self.write_paused.set_result(None)

    def resume_writing(self) -> None:
        self.events.append(("resume_writing", None))
        if not self.write_resumed.done():
            self.write_resumed.set_result(None)

    async def received(self, n: int) -> bytes:
        """Wait until at least ``n`` bytes arrived (or the connection ended)."""
        if len(self.data) < n:
            waiter = self.loop.create_future()
            self._want = (n, waiter)
            await asyncio.wait([waiter, self.lost], return_when=asyncio.FIRST_COMPLETED)
        assert len(self.data) >= n, f"got {len(self.data)} of {n} bytes; events {self.events}"
        return bytes(self.data)

    def kinds(self) -> list[str]:
        """The callback names in order, runs of data_received collapsed into one 'data'."""
        out: list[str] = []
        for kind, _ in self.events:
            if not (kind == "data" and out and out[-1] == "data"):
                out.append(kind)
        return out


async def connect(
    port: int, ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        sslobj, incoming, outgoing, _group = await client_handshake(sock, ctx, hostname)
    except BaseException:
        sock.close()
        raise
    return sock, sslobj, incoming, outgoing


async def open_transport(
    port: int,
    ctx: ssl.SSLContext,
    protocol: Recorder | None = None,
    shutdown_timeout: float = WAIT,
) -> tuple[TLSTransport, Recorder, socket.socket]:
    sock, sslobj, incoming, outgoing = await connect(port, ctx)
    proto = protocol if protocol is not None else Recorder()
    transport = TLSTransport(
        asyncio.get_running_loop(), sock, sslobj, incoming, outgoing, proto, shutdown_timeout
    )
    return transport, proto, sock


async def lost(proto: Recorder, within: float = WAIT) -> BaseException | None:
    """The exception connection_lost got, which must come within ``within`` seconds."""
    return await asyncio.wait_for(asyncio.shield(proto.lost), within)


def assert_lost_once(proto: Recorder) -> None:
    assert [k for k, _ in proto.events].count("lost") == 1, proto.events


# == 1. round trip ==============================================================================


def test_round_trip_and_extra_info(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    def script(sock: socket.socket) -> tuple[bytes, bytes]:
        with tls_accept(sock, server_ctx) as tls:
            request = recv_exact(tls, 5)
            tls.sendall(b"world:" + request)
            rest = read_to_close_notify(tls)
            tls.unwrap()
        return request, rest

    async def main() -> None:
        transport, proto, sock = await open_transport(server.port, client_ctx)
        transport.write(b"hello")
        assert await proto.received(11) == b"world:hello"
        sslobj = transport.get_extra_info("ssl_object")
        assert isinstance(sslobj, ssl.SSLObject) and sslobj.server_hostname == "localhost"
        assert transport.get_extra_info("peername") == ("127.0.0.1", server.port)
        assert transport.get_extra_info("sockname") == sock.getsockname()
        assert transport.get_extra_info("socket") is sock
        cipher = transport.get_extra_info("cipher")
        assert cipher == sslobj.cipher() and cipher[1].startswith("TLSv1.")
        assert dict(x[0] for x in transport.get_extra_info("peercert")["subject"]) == {
            "commonName": "localhost"
        }
        assert transport.get_extra_info("no such key", "dflt") == "dflt"
        assert transport.get_protocol() is proto
        assert transport.is_reading() and not transport.is_closing()
        transport.close()
        assert transport.is_closing()
        assert await lost(proto) is None
        assert proto.kinds() == ["made", "data", "lost"]
        assert sock.fileno() == -1

    with Server(script) as server:
        run(main)
        assert server.result() == (b"hello", b"")


# == 2. data right after the handshake ==========================================================

GREETING = b"server speaks first" * 10


def test_data_in_the_servers_last_handshake_flight_is_delivered(
    run: Run, client_ctx: ssl.SSLContext, certs: dict[str, Path]
) -> None:
    """TLS 1.2: the server's Finished and its first record leave in one TCP segment.

    The client's handshake ends on that segment, so the record is already in the incoming BIO
    when the transport is built and no readiness event will ever announce it.
    """
    ctx = make_server_ctx(certs, version=ssl.TLSVersion.TLSv1_2)

    def script(sock: socket.socket) -> bytes:
        obj, _, outgoing = bio_accept(sock, ctx)
        obj.write(GREETING)
        sock.sendall(outgoing.read())  # Finished + GREETING in one send
        rest = bytearray()
        while chunk := sock.recv(65536):  # the client's close_notify, then its FIN
            rest += chunk
        return bytes(rest)

    async def main() -> None:
        sock, sslobj, incoming, outgoing = await connect(server.port, client_ctx)
        assert sslobj.version() == "TLSv1.2"
        # The case under test: the greeting arrived together with the handshake's end.
        assert incoming.pending > 0
        proto = Recorder()
        transport = TLSTransport(
            asyncio.get_running_loop(), sock, sslobj, incoming, outgoing, proto, WAIT
        )
        assert await proto.received(len(GREETING)) == GREETING
        transport.close()
        assert await lost(proto) is None

    with Server(script) as server:
        run(main)
        assert server.result() != b""  # a close_notify record came before the FIN


def test_data_sent_right_after_the_handshake_is_delivered(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    """TLS 1.3: session tickets and the greeting follow the handshake, before any client byte."""

    def script(sock: socket.socket) -> str:
        with tls_accept(sock, server_ctx) as tls:
            tls.sendall(GREETING)
            return how_it_ended(tls)

    async def main() -> None:
        transport, proto, _ = await open_transport(server.port, client_ctx)
        assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert await proto.received(len(GREETING)) == GREETING
        transport.close()
        assert await lost(proto) is None

    with Server(script) as server:
        run(main)
        assert server.result() == "close_notify"


# == 3. large transfer, both directions at once, with a slow reader ==============================

BIG = 8 * MiB
CONSUMER_LIMIT = 256 * 1024
CONSUMER_STEP = 64 * 1024


class SlowConsumer(Recorder):
    """Buffers what arrives; past 256 KiB it pauses reading and drains 64 KiB per timer tick.

    Records any data_received while paused, and whether the socket had bytes waiting when
    reading resumed (proof that the pause held data back, not just that none happened to come).
    """

    def __init__(self) -> None:
        super().__init__()
        self.hash = hashlib.sha256()
        self.total = 0
        self.buffered = 0
        self.paused = False
        self.pauses = 0
        self.delivered_while_paused: list[int] = []
        self.readable_at_resume = 0

    def data_received(self, data: bytes) -> None:
        if self.paused:
            self.delivered_while_paused.append(len(data))
        self.hash.update(data)
        self.total += len(data)
        self.buffered += len(data)
        if self.total >= BIG and self._want is not None:
            self._want[1].set_result(None)
            self._want = None
        if self.buffered > CONSUMER_LIMIT and not self.paused:
            assert self.transport is not None
            self.transport.pause_reading()
            assert not self.transport.is_reading()
            self.paused = True
            self.pauses += 1
            self.loop.call_later(0.001, self._consume)

    def _consume(self) -> None:
        assert self.transport is not None
        self.buffered = max(0, self.buffered - CONSUMER_STEP)
        if self.buffered > CONSUMER_STEP:
            self.loop.call_later(0.001, self._consume)
            return
        sock = self.transport.get_extra_info("socket")
        if sock.fileno() != -1 and select.select([sock], [], [], 0)[0]:
            self.readable_at_resume += 1
        self.paused = False
        self.transport.resume_reading()
        assert self.transport.is_reading()

    async def all_received(self) -> None:
        if self.total < BIG:
            waiter = self.loop.create_future()
            self._want = (BIG, waiter)
            await asyncio.wait([waiter, self.lost], return_when=asyncio.FIRST_COMPLETED)


def duplex_server(tls: ssl.SSLSocket, send: bytes, expect: int, record: int) -> str:
    """Send ``send`` in writes of ``record`` bytes (one TLS record each, up to 16 KiB) while
    reading ``expect`` bytes, in one thread (an SSLSocket is not safe to read and write from
    two), then read to the client's close_notify and answer it. Returns the sha256 of what
    was read."""
    tls.setblocking(False)
    digest = hashlib.sha256()
    got = sent = 0
    view = memoryview(send)
    deadline = time.monotonic() + WAIT
    while got < expect or sent < len(send):
        progressed = False
        if got < expect:
            with contextlib.suppress(ssl.SSLWantReadError):
                while got < expect:
                    chunk = tls.recv(256 * 1024)
                    if not chunk:
                        raise ConnectionError(f"client ended after {got} of {expect} bytes")
                    digest.update(chunk)
                    got += len(chunk)
                    progressed = True
        if sent < len(send):
            with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                while sent < len(send):
                    sent += tls.send(view[sent : sent + record])
                    progressed = True
        if not progressed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"duplex stalled: read {got}/{expect}, sent {sent}")
            select.select([tls] if got < expect else [], [tls] if sent < len(send) else [], [], 1.0)
    tls.setblocking(True)
    tls.settimeout(WAIT)
    if read_to_close_notify(tls):
        raise AssertionError("client sent more than it was asked to")
    tls.unwrap()
    return digest.hexdigest()


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(16384, id="16k-records"),
        pytest.param(
            5243,
            id="5243-byte-records",
        ),
    ],
)
def test_large_transfer_both_ways_with_a_reader_that_pauses(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, record: int
) -> None:
    """8 MiB each way at once; the server writes ``record``-byte TLS records."""
    down = payload(BIG, seed=1)
    up = payload(BIG, seed=2)

    def script(sock: socket.socket) -> str:
        with tls_accept(sock, server_ctx) as tls:
            return duplex_server(tls, down, len(up), record)

    async def main() -> SlowConsumer:
        proto = SlowConsumer()
        transport, _, _ = await open_transport(server.port, client_ctx, proto)
        view = memoryview(up)
        for offset in range(0, len(up), CONSUMER_STEP):
            if proto.write_paused.done() and not proto.write_resumed.done():
                await proto.write_resumed
            if proto.write_resumed.done():  # re-arm for the next pause
                proto.write_paused = asyncio.get_running_loop().create_future()
                proto.write_resumed = asyncio.get_running_loop().create_future()
            transport.write(view[offset : offset + CONSUMER_STEP])
        await proto.all_received()
        transport.close()
        assert await lost(proto) is None
        return proto

    with Server(script) as server:
        proto = run(main, timeout=30)
        assert server.result(timeout=30) == sha(up)
    assert proto.total == BIG
    assert proto.hash.hexdigest() == sha(down)
    assert proto.pauses >= 8, "the consumer never had to pause: the test proves nothing"
    assert proto.readable_at_resume >= 1, "no data was ever held back by a pause"
    assert proto.delivered_while_paused == [], (
        f"data_received was called {len(proto.delivered_while_paused)} times while reading "
        f"was paused ({sum(proto.delivered_while_paused)} bytes)"
    )


class PausedFromTheStart(Recorder):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()


async def io_poll_barrier() -> None:
    """Return after the loop has polled for I/O at least once from now on.

    Any fd that is readable now is reported by that poll, so a transport still reading would
    have had its data delivered by the time this returns.
    """
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    try:
        b.send(b"x")
        polled: asyncio.Future[None] = loop.create_future()
        loop.add_reader(a.fileno(), lambda: polled.done() or polled.set_result(None))
        try:
            await asyncio.wait_for(polled, WAIT)
        finally:
            loop.remove_reader(a.fileno())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "flight",
    [
        pytest.param(
            "tls13-after-handshake",
        ),
        pytest.param(
            "tls12-same-flight",
        ),
    ],
)
def test_pause_reading_in_connection_made_holds_data_back(
    run: Run, client_ctx: ssl.SSLContext, certs: dict[str, Path], flight: str
) -> None:
    """asyncio's own transports honour a pause_reading() made in connection_made."""
    tls12 = flight == "tls12-same-flight"
    ctx = make_server_ctx(certs, version=ssl.TLSVersion.TLSv1_2 if tls12 else None)
    sent = threading.Event()

    def script(sock: socket.socket) -> None:
        if tls12:
            obj, _, outgoing = bio_accept(sock, ctx)
            obj.write(GREETING)
            sock.sendall(outgoing.read())
            sent.set()
            while sock.recv(65536):
                pass
        else:
            with tls_accept(sock, ctx) as tls:
                tls.sendall(GREETING)
                sent.set()
                how_it_ended(tls)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, sslobj, incoming, outgoing = await connect(server.port, client_ctx)
        proto = PausedFromTheStart()
        transport = TLSTransport(loop, sock, sslobj, incoming, outgoing, proto, WAIT)
        try:
            assert not transport.is_reading()
            assert await loop.run_in_executor(None, sent.wait, WAIT)
            # The greeting is in this socket's receive queue (TCP_NODELAY) or the BIO now.
            await io_poll_barrier()
            await io_poll_barrier()
            assert proto.data == b"", "data_received while reading was paused"
        except BaseException:
            transport.abort()
            raise
        transport.resume_reading()
        assert await proto.received(len(GREETING)) == GREETING
        transport.close()
        assert await lost(proto) is None

    with Server(script) as server:
        run(main)
        server.result()


# == 4. write backpressure ======================================================================


@pytest.mark.parametrize("high", [None, 256 * 1024], ids=["default-limits", "high-256k"])
def test_writes_pause_while_the_server_does_not_read_and_resume_when_it_does(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, high: int | None
) -> None:
    reading = threading.Event()

    script = read_when_let(server_ctx, reading)

    async def main() -> tuple[int, int]:
        transport, proto, _ = await open_transport(server.port, client_ctx)
        if high is not None:
            transport.set_write_buffer_limits(high=high)
        low, high_water = transport.get_write_buffer_limits()
        assert high_water == (HIGH_WATER if high is None else high) and low < high_water
        chunk = 64 * 1024
        written = 0
        while not proto.write_paused.done():
            assert written < len(sent), "pause_writing never came"
            transport.write(sent[written : written + chunk])
            written += chunk
        assert transport.get_write_buffer_size() > high_water
        assert not proto.write_resumed.done()
        reading.set()
        await asyncio.wait_for(asyncio.shield(proto.write_resumed), WAIT)
        assert transport.get_write_buffer_size() <= low
        assert proto.kinds().count("pause_writing") == 1
        transport.close()
        assert await lost(proto) is None
        return written, transport.get_write_buffer_size()

    sent = payload(32 * MiB, seed=3)
    with Server(script) as server:
        written, _ = run(main, timeout=30)
        assert server.result(timeout=30) == sha(sent[:written])


# == 5. write_eof: TLS half-close ===============================================================

REPLY = payload(300 * 1024, seed=5)


@pytest.mark.parametrize("queued", [False, True], ids=["buffer-empty", "buffer-queued"])
def test_write_eof_sends_close_notify_after_the_data_and_still_reads_the_reply(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, queued: bool
) -> None:
    request = payload(16 * MiB if queued else 1000, seed=4)
    reading = threading.Event()

    def script(sock: socket.socket) -> str:
        with tls_accept(sock, server_ctx) as tls:
            if not reading.wait(WAIT):
                raise TimeoutError("the test never let the server read")
            data = read_to_close_notify(tls)  # b'' from recv: close_notify, not a TCP EOF
            tls.sendall(REPLY)
            tls.unwrap()
        return sha(data)

    async def main() -> Recorder:
        transport, proto, _ = await open_transport(server.port, client_ctx)
        assert transport.can_write_eof()
        transport.write(request)
        assert (transport.get_write_buffer_size() > 0) == queued
        transport.write_eof()
        assert not transport.is_closing()
        reading.set()
        assert await lost(proto) is None
        return proto

    with Server(script) as server:
        if not queued:
            reading.set()
        proto = run(main)
        assert server.result() == sha(request)
    assert bytes(proto.data) == REPLY
    flow = ("pause_writing", "resume_writing")
    assert [k for k in proto.kinds() if k not in flow] == ["made", "data", "eof", "lost"]
    assert_lost_once(proto)


@pytest.mark.parametrize("how", ["write_eof", "close"])
def test_pause_writing_is_paired_with_resume_writing_when_draining_after(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, how: str
) -> None:
    data = payload(16 * MiB, seed=10)
    reading = threading.Event()

    script = read_when_let(server_ctx, reading)

    async def main() -> Recorder:
        transport, proto, _ = await open_transport(server.port, client_ctx)
        transport.write(data)
        assert transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
        assert proto.write_paused.done()
        getattr(transport, how)()
        reading.set()
        assert await lost(proto) is None
        return proto

    with Server(script) as server:
        proto = run(main)
        assert server.result() == sha(data)
    kinds = proto.kinds()
    assert "resume_writing" in kinds and kinds.index("resume_writing") < kinds.index("lost")


# == 6. close ===================================================================================


def test_close_flushes_queued_data_then_close_notify(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    data = payload(16 * MiB, seed=6)
    reading = threading.Event()

    script = read_when_let(server_ctx, reading)

    async def main() -> float:
        transport, proto, sock = await open_transport(server.port, client_ctx)
        transport.write(data)
        assert transport.get_write_buffer_size() > 0
        transport.close()
        transport.write(b"ignored after close")
        started = time.monotonic()
        reading.set()
        assert await lost(proto) is None
        assert_lost_once(proto)
        assert sock.fileno() == -1
        return time.monotonic() - started

    with Server(script) as server:
        elapsed = run(main, timeout=30)
        assert server.result() == sha(data)
    # Finished by the server's close_notify, not by the shutdown timeout (WAIT).
    assert elapsed < WAIT / 2


@pytest.mark.parametrize("queued", [False, True], ids=["buffer-empty", "buffer-queued"])
def test_close_is_bounded_by_shutdown_timeout_when_the_server_never_answers(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, queued: bool
) -> None:
    release = threading.Event()

    def script(sock: socket.socket) -> None:
        with tls_accept(sock, server_ctx):
            release.wait(WAIT)  # neither reads nor closes until the client has given up

    async def main() -> float:
        transport, proto, sock = await open_transport(server.port, client_ctx, shutdown_timeout=0.2)
        if queued:
            transport.write(payload(16 * MiB, seed=7))
            assert transport.get_write_buffer_size() > 0
        started = time.monotonic()
        transport.close()
        assert await lost(proto, within=5) is None
        assert sock.fileno() == -1
        assert_lost_once(proto)
        return time.monotonic() - started

    with Server(script) as server:
        try:
            elapsed = run(main)
        finally:
            release.set()
        server.result()
    assert 0.15 <= elapsed < 3.0


# == 7. abort ===================================================================================


def test_abort_loses_the_connection_at_once_and_closes_the_socket(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    aborted = threading.Event()

    def script(sock: socket.socket) -> str:
        with tls_accept(sock, server_ctx) as tls:
            aborted.wait(WAIT)
            return how_it_ended(tls)

    async def main() -> None:
        transport, proto, sock = await open_transport(server.port, client_ctx)
        transport.write(payload(16 * MiB, seed=8))
        assert transport.get_write_buffer_size() > 0
        transport.abort()
        assert sock.fileno() == -1
        assert transport.is_closing()
        assert transport.get_write_buffer_size() == 0
        aborted.set()
        # No I/O is needed: the callback is already scheduled.
        assert await lost(proto, within=1) is None
        transport.abort()
        transport.close()
        await asyncio.sleep(0)  # one loop iteration: a second connection_lost would run here
        assert_lost_once(proto)

    with Server(script) as server:
        run(main)
        assert server.result() in ("ragged", "reset")


# == 8. the server ends the session badly =======================================================


def test_tcp_eof_without_close_notify_is_an_eof(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    def script(sock: socket.socket) -> str:
        with tls_accept(sock, server_ctx) as tls:
            tls.sendall(b"bye")
            tcp_shutdown_write(tls)
            try:
                read_to_close_notify(tls)
            except ssl.SSLEOFError:
                return "ragged"
            except ssl.SSLError as exc:
                return f"alert {exc.reason}"
            return "close_notify"

    async def main() -> Recorder:
        _, proto, sock = await open_transport(server.port, client_ctx)
        assert await lost(proto) is None
        assert sock.fileno() == -1
        return proto

    with Server(script) as server:
        proto = run(main)
        end = server.result()
    assert bytes(proto.data) == b"bye"
    assert proto.kinds() == ["made", "data", "eof", "lost"]
    # The client answers at the TLS level before its FIN. After an unexpected EOF OpenSSL 3
    # has already failed the session with a decode_error alert, which is what goes out then.
    assert end in ("close_notify", "alert TLSV1_ALERT_DECODE_ERROR")


@pytest.mark.parametrize("keep_open", [False, True], ids=["close-on-eof", "keep-open"])
def test_server_close_notify_is_an_eof_and_the_write_side_can_stay_open(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, keep_open: bool
) -> None:
    """The server half-closes with close_notify and keeps reading (what write_eof does)."""

    def script(sock: socket.socket) -> tuple[bytes, str]:
        obj, incoming, outgoing = bio_accept(sock, server_ctx)
        obj.write(b"bye")
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.unwrap()
        sock.sendall(outgoing.read())
        return bio_read_to_end(sock, obj, incoming)

    async def main() -> Recorder:
        transport, proto, _ = await open_transport(
            server.port, client_ctx, Recorder(keep_open=keep_open)
        )
        await asyncio.wait_for(asyncio.shield(proto.eof), WAIT)
        if keep_open:
            assert not transport.is_closing() and not proto.lost.done()
            transport.write(b"still writing")
            transport.close()
        assert await lost(proto) is None
        return proto

    with Server(script) as server:
        proto = run(main)
        after, end = server.result()
    assert bytes(proto.data) == b"bye"
    assert proto.kinds() == ["made", "data", "eof", "lost"]
    assert (after, end) == (b"still writing" if keep_open else b"", "close_notify")


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x17\x03\x03\x00\x40" + bytes(64), id="record-with-bad-mac"),
        pytest.param(tls_alert_record(40), id="plaintext-fatal-alert"),
        pytest.param(b"HTTP/1.0 400 Bad Request\r\n\r\n", id="not-tls"),
    ],
)
def test_garbage_after_the_handshake_is_an_ssl_error(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, garbage: bytes
) -> None:
    def script(sock: socket.socket) -> None:
        with tls_accept(sock, server_ctx) as tls:
            tls.sendall(b"fine so far")
            raw_sendall(tls, garbage)
            with contextlib.suppress(OSError):
                while socket.socket.recv(tls, 65536):  # until the client drops the connection
                    pass

    async def main() -> Recorder:
        _, proto, sock = await open_transport(server.port, client_ctx)
        exc = await lost(proto)
        assert isinstance(exc, ssl.SSLError), repr(exc)
        assert sock.fileno() == -1
        return proto

    with Server(script) as server:
        proto = run(main)
        server.result()
    assert bytes(proto.data) == b"fine so far"
    assert proto.kinds() == ["made", "data", "lost"]


# == 9. reset ===================================================================================


@pytest.mark.parametrize("while_", ["reading", "writing"])
def test_reset_by_the_server_is_connection_lost_with_an_oserror(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, while_: str
) -> None:
    go = threading.Event()

    def script(sock: socket.socket) -> None:
        tls = tls_accept(sock, server_ctx)
        try:
            tls.sendall(b"x" * 1000)
            if not go.wait(WAIT):
                raise TimeoutError("the test never asked for the reset")
            reset(tls)
        finally:
            tls.close()

    async def main() -> None:
        transport, proto, _ = await open_transport(server.port, client_ctx)
        await proto.received(1000)
        if while_ == "writing":
            transport.write(payload(16 * MiB, seed=9))
            assert transport.get_write_buffer_size() > 0
        go.set()
        exc = await lost(proto)
        assert isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError), repr(exc)
        assert_lost_once(proto)

    with Server(script) as server:
        run(main)
        server.result()


# == 10. handshake failures =====================================================================


def _verified_by_the_client(name: str) -> Callable[[dict[str, Path]], Script]:
    def make(certs: dict[str, Path]) -> Script:
        ctx = make_server_ctx(certs, name)

        def script(sock: socket.socket) -> None:
            with contextlib.suppress(ssl.SSLError, OSError), tls_accept(sock, ctx) as tls:
                tls.recv(1)

        return script

    return make


def _after_client_hello(then: Callable[[socket.socket], None]) -> Callable[..., Script]:
    def make(_certs: dict[str, Path]) -> Script:
        def script(sock: socket.socket) -> None:
            hello = sock.recv(65536)
            assert hello[:1] == b"\x16"  # a handshake record
            then(sock)

        return script

    return make


def _send_then_close(data: bytes) -> Callable[[socket.socket], None]:
    def then(sock: socket.socket) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.recv(65536)  # wait for the client to drop the connection

    return then


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        pytest.param(_verified_by_the_client("wrong_ca"), ssl.SSLCertVerificationError, id="ca"),
        pytest.param(
            _verified_by_the_client("wrong_host"), ssl.SSLCertVerificationError, id="host"
        ),
        pytest.param(
            _verified_by_the_client("expired"), ssl.SSLCertVerificationError, id="expired"
        ),
        pytest.param(_after_client_hello(_send_then_close(b"")), ConnectionResetError, id="fin"),
        pytest.param(_after_client_hello(reset), ConnectionResetError, id="rst"),
        pytest.param(
            _after_client_hello(_send_then_close(b"\x16\x03\x03\x00\x50" + bytes(10))),
            ConnectionResetError,
            id="truncated-record-then-fin",
        ),
        pytest.param(
            _after_client_hello(_send_then_close(b"HTTP/1.0 400 Bad Request\r\n\r\n")),
            ssl.SSLError,
            id="not-tls",
        ),
        pytest.param(
            # One byte cannot be judged; OpenSSL waits for a whole record header and sees EOF.
            _after_client_hello(_send_then_close(b"N")),
            ConnectionResetError,
            id="one-byte-then-fin",
        ),
        pytest.param(
            _after_client_hello(_send_then_close(tls_alert_record(40))),
            ssl.SSLError,
            id="handshake-failure-alert",
        ),
    ],
)
def test_handshake_failures(
    run: Run,
    client_ctx: ssl.SSLContext,
    certs: dict[str, Path],
    server: Callable[[dict[str, Path]], Script],
    expected: type[Exception],
) -> None:
    async def main() -> BaseException:
        with pytest.raises((ssl.SSLError, ConnectionError)) as info:
            sock, *_ = await connect(srv.port, client_ctx)
            sock.close()
        return info.value

    with Server(server(certs)) as srv:
        exc = run(main)
        srv.result()  # the server script itself ran as intended
    # Exactly the documented kind: a verification failure is not mistaken for a reset, and a
    # server that hangs up is a ConnectionResetError, not an SSLError about an EOF.
    assert type(exc) is expected or (
        expected is ssl.SSLError
        and isinstance(exc, ssl.SSLError)
        and not isinstance(exc, ssl.SSLCertVerificationError | ssl.SSLEOFError)
    ), repr(exc)


# == 11. two loops in two threads ===============================================================


def test_two_loops_in_two_threads_at_once(
    loop_factory: LoopFactory | None, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    size = 4 * MiB
    barrier = threading.Barrier(2)

    def echo(sock: socket.socket) -> int:
        total = 0
        with tls_accept(sock, server_ctx) as tls:
            while chunk := tls.recv(256 * 1024):
                tls.sendall(chunk)
                total += len(chunk)
            tls.unwrap()
        return total

    def client(seed: int) -> tuple[bool, Any]:
        data = payload(size, seed)

        async def main() -> tuple[bool, Any]:
            loop = asyncio.get_running_loop()
            transport, proto, _ = await open_transport(server.port, client_ctx)
            await loop.run_in_executor(None, barrier.wait, WAIT)  # both connected: go
            view = memoryview(data)
            for offset in range(0, size, 64 * 1024):
                transport.write(view[offset : offset + 64 * 1024])
            same = await proto.received(size) == data
            buffers = tls_transport._loop_buffers(loop)
            transport.close()
            assert await lost(proto) is None
            return same, buffers

        return run_on_new_loop(loop_factory, main, timeout=30)

    with Server(echo, count=2) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client, seed) for seed in (11, 12)]
        (same1, buffers1), (same2, buffers2) = (f.result(60) for f in futures)
        assert [server.result(i) for i in range(2)] == [size, size]
    assert same1 and same2
    assert buffers1[0].obj is not buffers2[0].obj and buffers1[1].obj is not buffers2[1].obj


# == 12. file descriptors =======================================================================

CYCLES = 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_over_many_connections(
    run: Run, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> None:
    """close, abort, write_eof and a server that hangs up, in turn; then the count is back."""

    def script(sock: socket.socket) -> str:
        with tls_accept(sock, server_ctx) as tls:
            tls.sendall(b"hi")
            try:
                read_to_close_notify(tls)
            except (ssl.SSLEOFError, ConnectionResetError):
                return "ragged"
            tls.sendall(b"bye")
            tls.unwrap()
            return "close_notify"

    async def cycle(mode: str) -> None:
        transport, proto, sock = await open_transport(server.port, client_ctx)
        await proto.received(2)
        transport.write(b"some data")
        if mode == "close":
            transport.close()
        elif mode == "abort":
            transport.abort()
        elif mode == "write_eof":
            transport.write_eof()
        await lost(proto)
        assert sock.fileno() == -1

    modes = ["close", "abort", "write_eof"]

    async def main() -> tuple[int, int]:
        await cycle("close")  # warm-up: whatever the loop allocates once is allocated now
        server.results[0].result(WAIT)
        before = open_fds()
        for i in range(CYCLES):
            await cycle(modes[i % len(modes)])
        await asyncio.get_running_loop().run_in_executor(None, server.wait_all)
        return before, open_fds()

    with Server(script, count=CYCLES + 1) as server:
        before, after = run(main, timeout=60)
        ends = [server.result(i) for i in range(CYCLES + 1)]
    assert after <= before, f"{after - before} fds leaked over {CYCLES} connections"
    assert ends.count("close_notify") > CYCLES // 2
