"""BackendStartupFilter: server messages until ReadyForQuery, split at every byte."""

from __future__ import annotations

import asyncio
import struct

import psycopg
import pytest

from proxy.errors import UpstreamError
from proxy.wire.backend_startup import (
    MAX_STARTUP_MESSAGE,
    BackendFilterMisuse,
    BackendStartupFilter,
)
from proxy.wire.messages import error_response
from proxy.wire.startup import GSSEncRequest, SSLRequest, StartupParser


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def auth(code: int, extra: bytes = b"") -> bytes:
    return msg(b"R", struct.pack("!i", code) + extra)


def sasl(*names: bytes) -> bytes:
    return auth(10, b"".join(n + b"\x00" for n in names) + b"\x00")


def param(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\x00" + value.encode() + b"\x00")


def key_data(pid: int, key: bytes) -> bytes:
    return msg(b"K", struct.pack("!I", pid) + key)


READY = msg(b"Z", b"I")
SASL_TLS = sasl(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256")
SASL_PLAIN = sasl(b"SCRAM-SHA-256")
SESSION = (
    auth(0)
    + param("server_version", "17.2")
    + param("client_encoding", "UTF8")
    + msg(b"N", b"SNOTICE\x00C00000\x00Mhello\x00\x00")
    + key_data(4242, b"\x01\x02\x03\x04")
    + READY
)
SCRAM = (
    auth(11, b"r=nonce,s=c2FsdA==,i=4096")  # SASLContinue
    + auth(12, b"v=c2lnbmF0dXJl")  # SASLFinal
)

# Server streams that need no rewriting, and what each says about the session.
PASSTHROUGH = {
    "trust": SESSION,
    "md5": auth(5, b"salt") + SESSION,
    "cleartext": auth(3) + SESSION,
    "scram without TLS": SASL_PLAIN + SCRAM + SESSION,
    "protocol 3.2 with long key": (
        msg(b"v", struct.pack("!ii", 0x30002, 1) + b"_pq_.x\x00")
        + auth(0)
        + key_data(7, bytes(range(32)))
        + READY
    ),
    "key of 256 bytes": auth(0) + key_data(7, b"k" * 256) + READY,
}


def run(chunks: list[bytes]) -> tuple[bytes, BackendStartupFilter]:
    f = BackendStartupFilter()
    out = []
    for chunk in chunks:
        if f.done:
            assert chunk == b""
            continue
        out.append(f.feed(chunk))
    return b"".join(out), f


def every_split(stream: bytes) -> list[list[bytes]]:
    return [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]


@pytest.mark.parametrize("stream", PASSTHROUGH.values(), ids=PASSTHROUGH.keys())
def test_passthrough_streams_split_at_every_byte(stream: bytes) -> None:
    for chunks in [*every_split(stream), [stream[i : i + 1] for i in range(len(stream))]]:
        out, f = run(chunks)
        assert out == stream
        assert f.done
        assert f.authenticated
        assert f.server_error_sqlstate is None
        assert f.take_remaining() == b""


@pytest.mark.parametrize("stream", PASSTHROUGH.values(), ids=PASSTHROUGH.keys())
def test_complete_messages_are_returned_without_copying(stream: bytes) -> None:
    f = BackendStartupFilter()
    head = stream[: -len(READY)]
    assert f.feed(head) is head
    assert f.feed(READY) is READY
    assert f.done


def test_backend_key_data_is_recorded() -> None:
    _, f = run([SESSION])
    assert f.backend_pid == 4242
    _, f = run([auth(0) + key_data(0xFFFFFFFF, b"k" * 256) + READY])
    assert f.backend_pid == 0xFFFFFFFF


def test_channel_binding_is_stripped_at_every_split() -> None:
    stream = SASL_TLS + SCRAM + SESSION
    expected = SASL_PLAIN + SCRAM + SESSION
    for chunks in [*every_split(stream), [stream[i : i + 1] for i in range(len(stream))]]:
        out, f = run(chunks)
        assert out == expected
        assert f.done
        assert f.authenticated


def test_sasl_without_channel_binding_is_not_copied() -> None:
    f = BackendStartupFilter()
    assert f.feed(SASL_PLAIN) is SASL_PLAIN


def test_a_server_offering_only_channel_binding_is_refused() -> None:
    f = BackendStartupFilter()
    with pytest.raises(UpstreamError, match="only channel-binding") as info:
        f.feed(sasl(b"SCRAM-SHA-256-PLUS"))
    assert info.value.reason == "protocol"


@pytest.mark.parametrize(
    ("stream", "sqlstate", "authenticated"),
    [
        (SASL_TLS + error_response("28P01", "password authentication failed"), "28P01", False),
        (error_response("53300", "too many clients"), "53300", False),
        (auth(0) + error_response("3D000", "no such database"), "3D000", True),
        (msg(b"E", b"SFATAL\x00Mno code\x00\x00"), None, False),
        (msg(b"E", b"SFATAL\x00C12"), None, False),  # field not terminated: no code read
    ],
)
def test_an_error_ends_startup(stream: bytes, sqlstate: str | None, authenticated: bool) -> None:
    after = b"whatever follows is relayed raw"
    for chunks in every_split(stream + after):
        f = BackendStartupFilter()
        out = b""
        rest = b""
        for chunk in chunks:
            if f.done:
                rest += chunk
            else:
                out += f.feed(chunk)
        assert f.done
        assert f.server_error_sqlstate == sqlstate
        assert f.authenticated is authenticated
        assert out + f.take_remaining() + rest == stream.replace(SASL_TLS, SASL_PLAIN) + after


def test_bytes_after_ready_for_query_are_handed_back_unexamined() -> None:
    after = b"\xff\x00not a message at all"
    f = BackendStartupFilter()
    assert f.feed(SESSION + after) == SESSION
    assert f.take_remaining() == after
    assert f.take_remaining() == b""


def test_misuse_is_a_distinct_local_error() -> None:
    f = BackendStartupFilter()
    with pytest.raises(BackendFilterMisuse):
        f.take_remaining()
    f.feed(SESSION)
    with pytest.raises(BackendFilterMisuse):
        f.feed(b"")
    assert issubclass(BackendFilterMisuse, RuntimeError)
    assert not issubclass(BackendFilterMisuse, UpstreamError)


@pytest.mark.parametrize("kind", [b"D", b"T", b"C", b"A", b"\x00", b"\x16", b"H", b"s"])
def test_unknown_message_types_are_refused_from_the_first_byte(kind: bytes) -> None:
    f = BackendStartupFilter()
    with pytest.raises(UpstreamError, match="message type") as info:
        f.feed(kind)
    assert info.value.reason == "protocol"
    with pytest.raises(UpstreamError, match="message type"):
        BackendStartupFilter().feed(auth(0) + kind)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"S" + struct.pack("!I", MAX_STARTUP_MESSAGE), True),
        (b"S" + struct.pack("!I", MAX_STARTUP_MESSAGE + 1), False),
        (b"E" + struct.pack("!I", 0xFFFFFFFF), False),
        (b"N" + struct.pack("!I", 3), False),
        (b"S" + struct.pack("!I", 0), False),
        (b"R" + struct.pack("!I", 7), False),
        (b"R" + struct.pack("!I", 8), True),
        (b"K" + struct.pack("!I", 11), False),
        (b"K" + struct.pack("!I", 12), True),
        (b"K" + struct.pack("!I", 264), True),
        (b"K" + struct.pack("!I", 265), False),
        (b"Z" + struct.pack("!I", 4), False),
        (b"Z" + struct.pack("!I", 6), False),
    ],
)
def test_lengths_are_checked_from_the_header(header: bytes, ok: bool) -> None:
    f = BackendStartupFilter()
    if ok:
        assert f.feed(header) == b""
        assert not f.done
    else:
        with pytest.raises(UpstreamError, match="length") as info:
            f.feed(header)
        assert info.value.reason == "protocol"


def test_the_largest_allowed_message_arrives_in_pieces() -> None:
    payload = b"x\x00" + b"y" * (MAX_STARTUP_MESSAGE - 4 - 3) + b"\x00"
    big = msg(b"S", payload)
    assert len(big) == MAX_STARTUP_MESSAGE + 1
    f = BackendStartupFilter()
    out = [f.feed(big[i : i + 1000]) for i in range(0, len(big), 1000)]
    assert b"".join(out) == big
    assert f.feed(READY) is READY


# --- libpq as the oracle ------------------------------------------------------------------


async def libpq_answer_to(server_message: bytes) -> tuple[bytes, str]:
    """Send ``server_message`` to libpq after its StartupMessage; return libpq's reply.

    The reply is everything libpq sends before it closes or before we end the session with
    an ErrorResponse; libpq's error text is returned too.
    """
    replies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            parser = StartupParser()
            while not parser.finished:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed(data)
                while not parser.finished and (event := parser.next_event()) is not None:
                    if isinstance(event, SSLRequest | GSSEncRequest):
                        writer.write(b"N")
            writer.write(server_message)
            header = await reader.read(5)
            if header:
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                replies.append(header + await reader.readexactly(length - 4))
                assert kind == b"p"
                writer.write(error_response("28P01", "stopped by the test"))
                await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    handlers: list[asyncio.Task[None]] = []

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
                    host="127.0.0.1",
                    port=port,
                    user="alice",
                    password="secret",
                    sslmode="disable",
                    connect_timeout=10,
                )
            await asyncio.gather(*handlers)
    finally:
        server.close()
        await server.wait_closed()
    return b"".join(replies), str(info.value)


def test_libpq_refuses_channel_binding_on_a_plaintext_leg() -> None:
    reply, error = asyncio.run(libpq_answer_to(SASL_TLS))
    assert reply == b""
    assert "SCRAM-SHA-256-PLUS" in error
    assert "non-SSL connection" in error


def test_libpq_picks_plain_scram_from_the_stripped_message() -> None:
    f = BackendStartupFilter()
    stripped = f.feed(SASL_TLS)
    reply, error = asyncio.run(libpq_answer_to(stripped))
    # SASLInitialResponse: mechanism, then the client-first-message with GS2 flag "n"
    # (client does not support channel binding), which a server accepts from a client on a
    # plaintext leg.
    assert reply[:1] == b"p"
    mechanism, _, rest = reply[5:].partition(b"\x00")
    assert mechanism == b"SCRAM-SHA-256"
    (length,) = struct.unpack("!i", rest[:4])
    assert rest[4 : 4 + length].startswith(b"n,,n=,r=")
    assert "stopped by the test" in error
