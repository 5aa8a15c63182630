"""StartupParser: client packets byte for byte, at every split point, plus what libpq sends."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Iterable

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from proxy.errors import ProtocolViolation
from proxy.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST,
    SSL_REQUEST_CODE,
    error_response,
)
from proxy.wire.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupEvent,
    StartupMessage,
    StartupParser,
    StartupParserMisuse,
)

GSSENC_REQUEST = struct.pack("!ii", 8, GSSENC_REQUEST_CODE)


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


def startup(params: Iterable[tuple[str, str]], protocol: tuple[int, int] = (3, 0)) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params) + b"\x00"
    return packet(protocol[0] << 16 | protocol[1], body)


def cancel(pid: int, key: bytes) -> bytes:
    return packet(CANCEL_REQUEST_CODE, struct.pack("!I", pid) + key)


def startup_of_length(total: int) -> bytes:
    """A valid 3.0 StartupMessage exactly ``total`` bytes long."""
    fixed = len(startup([("user", "u"), ("application_name", "")]))
    return startup([("user", "u"), ("application_name", "x" * (total - fixed))])


def drain(parser: StartupParser) -> list[StartupEvent]:
    events = []
    while not parser.finished and (event := parser.next_event()) is not None:
        events.append(event)
    return events


def run(chunks: Iterable[bytes]) -> tuple[list[StartupEvent], StartupParser]:
    """Feed chunks as a client would send them, pulling events after every chunk."""
    parser = StartupParser()
    events: list[StartupEvent] = []
    for chunk in chunks:
        if parser.finished:
            assert chunk == b"", "bytes after the final packet belong to take_remaining()"
            continue
        parser.feed(chunk)
        events += drain(parser)
    return events, parser


SIMPLE = startup([("user", "alice"), ("database", "shop")])


def test_simple_startup_message() -> None:
    events, parser = run([SIMPLE])
    assert events == [
        StartupMessage(
            raw=SIMPLE, protocol=(3, 0), parameters={"user": "alice", "database": "shop"}
        )
    ]
    assert parser.finished
    assert parser.take_remaining() == b""


def test_ssl_request_then_startup_split_at_every_byte() -> None:
    for i in range(len(SSL_REQUEST) + 1):
        for j in range(len(SIMPLE) + 1):
            events, parser = run([SSL_REQUEST[:i], SSL_REQUEST[i:], SIMPLE[:j], SIMPLE[j:]])
            assert [type(e) for e in events] == [SSLRequest, StartupMessage], (i, j)
            assert isinstance(events[1], StartupMessage)
            assert events[1].raw == SIMPLE
            assert parser.take_remaining() == b""


def test_events_appear_only_once_a_packet_is_complete() -> None:
    parser = StartupParser()
    for n in range(len(SIMPLE) - 1):
        parser.feed(SIMPLE[n : n + 1])
        assert parser.next_event() is None
        assert not parser.finished
    parser.feed(SIMPLE[-1:])
    assert isinstance(parser.next_event(), StartupMessage)


def test_gssenc_then_ssl_then_startup() -> None:
    events, _ = run([GSSENC_REQUEST, SSL_REQUEST, SIMPLE])
    assert [type(e) for e in events] == [GSSEncRequest, SSLRequest, StartupMessage]


def test_ssl_then_gssenc_then_cancel() -> None:
    events, _ = run([SSL_REQUEST, GSSENC_REQUEST, cancel(7, b"abcd")])
    assert events[:2] == [SSLRequest(), GSSEncRequest()]
    assert events[2] == CancelRequest(raw=cancel(7, b"abcd"), pid=7, key=b"abcd")


@pytest.mark.parametrize("request_packet", [SSL_REQUEST, GSSENC_REQUEST])
@pytest.mark.parametrize("pipelined", [b"\x00", SIMPLE[:1], SIMPLE, SSL_REQUEST])
def test_bytes_pipelined_after_an_encryption_request_are_refused(
    request_packet: bytes, pipelined: bytes
) -> None:
    parser = StartupParser()
    parser.feed(request_packet + pipelined)
    with pytest.raises(ProtocolViolation, match="CVE-2021-23214") as info:
        parser.next_event()
    assert info.value.sqlstate == "08P01"


def test_pipelined_bytes_are_judged_when_the_request_is_parsed() -> None:
    # Fed separately but not pulled in between: still buffered when the request is parsed.
    parser = StartupParser()
    parser.feed(SSL_REQUEST)
    parser.feed(SIMPLE)
    with pytest.raises(ProtocolViolation, match="unencrypted data after SSLRequest"):
        parser.next_event()


@pytest.mark.parametrize("request_packet", [SSL_REQUEST, GSSENC_REQUEST])
def test_an_encryption_request_may_come_only_once(request_packet: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="second"):
        run([request_packet, request_packet])


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE])
@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 8])
def test_encryption_requests_must_be_eight_bytes(code: int, extra: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="instead of 8"):
        run([packet(code, extra)])


@pytest.mark.parametrize("length", [*range(8), 10005, 10006, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_invalid_lengths_are_refused_as_soon_as_the_length_word_is_in(length: int) -> None:
    parser = StartupParser()
    parser.feed(struct.pack("!I", length)[:3])
    assert parser.next_event() is None
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet") as info:
        parser.feed(struct.pack("!I", length)[3:])
    assert str(length) in str(info.value)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("total", [len(SIMPLE), 100, 9999, 10000, 10001, 10004])
def test_startup_packets_up_to_the_servers_limit_pass(total: int) -> None:
    # The server's MAX_STARTUP_PACKET_LENGTH (10000) counts the body after the length word.
    raw = startup_of_length(total)
    assert len(raw) == total
    events, _ = run([raw])
    assert isinstance(events[0], StartupMessage)
    assert events[0].raw == raw


def test_an_eight_byte_startup_message_has_no_terminator() -> None:
    with pytest.raises(ProtocolViolation, match="expected terminator as last byte"):
        run([packet(3 << 16)])


@pytest.mark.parametrize(
    ("protocol", "message"),
    [
        ((2, 0), "unsupported frontend protocol 2.0: server supports 3.0 to 3.2"),
        ((4, 0), "unsupported frontend protocol 4.0: server supports 3.0 to 3.2"),
        ((1, 0), "unsupported frontend protocol 1.0: server supports 3.0 to 3.2"),
        ((0, 0), "unsupported frontend protocol 0.0: server supports 3.0 to 3.2"),
        ((1234, 5681), "unsupported frontend protocol 1234.5681: server supports 3.0 to 3.2"),
    ],
)
def test_unsupported_protocol_versions(protocol: tuple[int, int], message: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        run([startup([("user", "u")], protocol)])
    assert str(info.value) == message
    assert info.value.sqlstate == "0A000"  # PostgreSQL's ERRCODE_FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize("protocol", [(3, 0), (3, 1), (3, 2), (3, 3), (3, 0xFFFF)])
def test_every_minor_version_of_protocol_3_passes_through(protocol: tuple[int, int]) -> None:
    raw = startup([("user", "u"), ("_pq_.future", "1")], protocol)
    events, _ = run([raw])
    assert events == [
        StartupMessage(raw=raw, protocol=protocol, parameters={"user": "u", "_pq_.future": "1"})
    ]


@pytest.mark.parametrize(
    "params",
    [[], [("database", "d")], [("user", "")], [("User", "u")]],
)
def test_a_startup_message_needs_a_user(params: list[tuple[str, str]]) -> None:
    with pytest.raises(ProtocolViolation) as info:
        run([startup(params)])
    assert str(info.value) == "no PostgreSQL user name specified in startup packet"
    assert info.value.sqlstate == "28000"


@pytest.mark.parametrize(
    ("key_length", "ok"),
    [(0, False), (3, False), (4, True), (32, True), (256, True), (257, False)],
)
def test_cancel_request_lengths(key_length: int, ok: bool) -> None:
    key = bytes(range(256))[:key_length] if key_length <= 256 else b"k" * key_length
    raw = cancel(0xFFFFFFFE, key)
    assert len(raw) == 12 + key_length  # 16 and 268 are the bounds
    if ok:
        events, parser = run([raw])
        assert events == [CancelRequest(raw=raw, pid=0xFFFFFFFE, key=key)]
        assert parser.finished
    else:
        with pytest.raises(ProtocolViolation, match="invalid length of cancel request"):
            run([raw])


def test_cancel_request_of_eight_bytes_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="cancel request"):
        run([packet(CANCEL_REQUEST_CODE)])


def client_hello() -> bytes:
    """A real TLS ClientHello, as a client with sslnegotiation=direct would open with."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="db.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("prefix", [b"", SSL_REQUEST, GSSENC_REQUEST])
def test_a_tls_client_hello_is_recognised_from_its_first_byte(prefix: bytes) -> None:
    hello = client_hello()
    assert hello[0] == 0x16
    parser = StartupParser()
    if prefix:
        parser.feed(prefix)
        assert parser.next_event() is not None
    with pytest.raises(ProtocolViolation, match="sslmode=disable") as info:
        parser.feed(hello[:1])
    assert "TLS handshake" in str(info.value)
    with pytest.raises(ProtocolViolation, match="sslmode=disable"):
        StartupParser().feed(hello)


def test_bytes_after_the_startup_message_are_handed_back_unchanged() -> None:
    after = b"p\x00\x00\x00\x09secret\x00Q\x00"
    events, parser = run([SIMPLE + after])
    assert isinstance(events[0], StartupMessage)
    assert parser.take_remaining() == after
    assert parser.take_remaining() == b""


def test_misuse_is_a_distinct_local_error() -> None:
    parser = StartupParser()
    with pytest.raises(StartupParserMisuse):
        parser.take_remaining()
    parser.feed(SIMPLE)
    assert parser.next_event() is not None
    with pytest.raises(StartupParserMisuse):
        parser.next_event()
    with pytest.raises(StartupParserMisuse):
        parser.feed(b"x")
    assert issubclass(StartupParserMisuse, RuntimeError)
    assert not issubclass(StartupParserMisuse, ProtocolViolation)


def test_feeding_without_pulling_events_is_bounded() -> None:
    parser = StartupParser()
    parser.feed(startup_of_length(10004) + b"x" * 10)
    with pytest.raises(StartupParserMisuse, match="next_event"):
        parser.feed(b"more")


def test_a_partial_packet_never_buffers_more_than_the_servers_limit() -> None:
    parser = StartupParser()
    raw = startup_of_length(10004)
    parser.feed(raw[:-1])
    assert parser.next_event() is None
    parser.feed(raw[-1:])
    assert isinstance(parser.next_event(), StartupMessage)


def test_parameters_are_read_only() -> None:
    events, _ = run([SIMPLE])
    assert isinstance(events[0], StartupMessage)
    with pytest.raises(TypeError):
        events[0].parameters["user"] = "mallory"  # type: ignore[index]


# --- What libpq really sends ------------------------------------------------------------


async def capture_libpq(**conninfo: str) -> tuple[list[list[StartupEvent]], str]:
    """Run a server that speaks like the sidecar and connect libpq to it.

    The server answers N to encryption requests and refuses the StartupMessage with an
    ErrorResponse, so the test also proves libpq accepts what ``error_response`` builds.
    Returns the events of each connection libpq opened, in order, and libpq's error text.
    """
    connections: list[list[StartupEvent]] = []
    handlers: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events: list[StartupEvent] = []
        connections.append(events)
        parser = StartupParser()
        try:
            while not parser.finished:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed(data)
                while not parser.finished and (event := parser.next_event()) is not None:
                    events.append(event)
                    if isinstance(event, SSLRequest | GSSEncRequest):
                        writer.write(b"N")
            writer.write(
                error_response("08006", "captured by the test", hint="a hint\x00with a NUL")
            )
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await handle(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(30):
            with pytest.raises(psycopg.OperationalError) as info:
                await psycopg.AsyncConnection.connect(
                    make_conninfo(host="127.0.0.1", port=port, connect_timeout=10, **conninfo)
                )
            # libpq has closed every connection by now: each handler sees EOF and ends.
            await asyncio.gather(*handlers)
    finally:
        server.close()
        await server.wait_closed()
    return connections, str(info.value)


@pytest.mark.parametrize(
    ("conninfo", "kinds", "protocol"),
    [
        ({"sslmode": "disable"}, [[StartupMessage]], (3, 0)),
        ({"sslmode": "prefer"}, [[SSLRequest, StartupMessage]], (3, 0)),
        # allow: plaintext first; after our error libpq retries with an SSLRequest, gets N
        # and gives up.
        ({"sslmode": "allow"}, [[StartupMessage], [SSLRequest]], (3, 0)),
        ({"sslmode": "disable", "max_protocol_version": "latest"}, [[StartupMessage]], (3, 2)),
    ],
)
def test_libpq_startup_packets(
    conninfo: dict[str, str], kinds: list[list[type]], protocol: tuple[int, int]
) -> None:
    connections, error = asyncio.run(
        capture_libpq(user="alice", dbname="shop", application_name="wire-test", **conninfo)
    )
    assert [[type(e) for e in events] for events in connections] == kinds
    message = connections[0][-1]
    assert isinstance(message, StartupMessage)
    assert message.protocol == protocol
    assert message.parameters["user"] == "alice"
    assert message.parameters["database"] == "shop"
    assert message.parameters["application_name"] == "wire-test"
    assert "captured by the test" in error
    assert "a hint\ufffdwith a NUL" in error
