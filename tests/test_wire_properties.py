"""Properties of the wire parsers over generated input: any bytes, any chunking.

Only the two protocol error types may escape, chunking never changes what a peer's bytes
mean, and nothing past a message's declared length is ever looked at.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ProtocolViolation, UpstreamError
from proxy.wire.backend_startup import BackendStartupFilter
from proxy.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
)
from proxy.wire.startup import (
    GSSEncRequest,
    SSLRequest,
    StartupEvent,
    StartupMessage,
    StartupParser,
)

SETTINGS = settings(deadline=None, max_examples=300)


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!II", 8 + len(body), code) + body


names = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF, exclude_categories=["Cs"]),
    max_size=12,
)
startup_packets = st.builds(
    lambda params, minor, user: packet(
        3 << 16 | minor,
        b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())
        + (b"user\x00" + user.encode() + b"\x00" if user is not None else b"")
        + b"\x00",
    ),
    st.dictionaries(names.filter(lambda n: n not in ("", "user")), names, max_size=4),
    st.integers(0, 0xFFFF),
    st.none() | names,
)
client_packets = st.one_of(
    st.just(packet(SSL_REQUEST_CODE)),
    st.just(packet(GSSENC_REQUEST_CODE)),
    startup_packets,
    st.binary(min_size=4, max_size=300).map(lambda b: packet(CANCEL_REQUEST_CODE, b)),
    st.builds(packet, st.integers(0, 0xFFFFFFFF), st.binary(max_size=40)),
    st.binary(max_size=20),  # anything at all
)


@st.composite
def client_conversations(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Packets plus cut points that often fall on packet boundaries, as a client waiting
    for each answer produces, so multi-packet conversations get past the pipelining rule."""
    packets = draw(st.lists(client_packets, max_size=5))
    boundaries = list(itertools.accumulate(len(p) for p in packets))
    cuts = [b for b in boundaries if draw(st.booleans())]
    cuts += draw(st.lists(st.integers(0, 2000), max_size=6))
    return b"".join(packets), cuts


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class Outcome:
    events: list[StartupEvent]
    error: str | None
    rest: bytes  # bytes after the final packet: take_remaining() plus chunks not fed


def run_parser(chunks: list[bytes]) -> Outcome:
    parser = StartupParser()
    events: list[StartupEvent] = []
    rest = b""
    try:
        for chunk in chunks:
            if parser.finished:
                rest += chunk
                continue
            parser.feed(chunk)
            while not parser.finished and (event := parser.next_event()) is not None:
                events.append(event)
        if parser.finished:
            rest = parser.take_remaining() + rest
    except ProtocolViolation as exc:
        return Outcome(events, str(exc), b"")
    return Outcome(events, None, rest)


def run_bytewise(data: bytes) -> Outcome:
    return run_parser([data[i : i + 1] for i in range(len(data))])


@SETTINGS
@given(client_conversations())
def test_startup_parser_chunking_never_changes_the_meaning(
    conversation: tuple[bytes, list[int]],
) -> None:
    data, cuts = conversation
    # Only ProtocolViolation may escape (run_parser lets anything else through).
    reference = run_bytewise(data)
    outcome = run_parser(chunked(data, cuts))
    if outcome.error is not None and "CVE-2021-23214" in outcome.error:
        # A chunk ran past an SSLRequest/GSSENCRequest: the bytes were pipelined, which
        # only a chunking can show. Everything before it must still agree.
        assert reference.events[: len(outcome.events)] == outcome.events
        assert isinstance(reference.events[len(outcome.events)], SSLRequest | GSSEncRequest)
        return
    assert outcome == reference


@SETTINGS
@given(client_conversations())
def test_startup_parser_never_reads_past_the_final_packet(
    conversation: tuple[bytes, list[int]],
) -> None:
    data, cuts = conversation
    outcome = run_parser(chunked(data, cuts))
    if outcome.error is not None or not outcome.events:
        return
    final = outcome.events[-1]
    if isinstance(final, SSLRequest | GSSEncRequest):
        return  # not finished: every byte was needed
    raw = final.raw
    (declared,) = struct.unpack("!I", raw[:4])
    assert len(raw) == declared
    assert data.endswith(raw + outcome.rest)
    # Whatever follows the final packet changes nothing about it.
    consumed = len(data) - len(outcome.rest)
    chunks: list[bytes] = []
    for chunk in chunked(data, cuts):
        taken = sum(len(c) for c in chunks)
        if taken >= consumed:
            break
        chunks.append(chunk[: consumed - taken])
    chunks[-1] += b"\x16\xff junk after"  # arrives together with the final packet's end
    other = run_parser(chunks)
    assert other.events == outcome.events
    assert other.rest == b"\x16\xff junk after"


@SETTINGS
@given(startup_packets, st.lists(st.integers(0, 2000), max_size=8))
def test_generated_startup_messages_round_trip(raw: bytes, cuts: list[int]) -> None:
    outcome = run_parser(chunked(raw, cuts))
    if outcome.error is not None:
        assert outcome.error == "no PostgreSQL user name specified in startup packet"
        return
    (event,) = outcome.events
    assert isinstance(event, StartupMessage)
    assert event.raw == raw
    assert event.parameters["user"]


# --- server side --------------------------------------------------------------------------


def msg(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


cstr = st.binary(max_size=20).map(lambda b: b.replace(b"\x00", b"") + b"\x00")
server_messages = st.one_of(
    st.builds(
        lambda c, x: msg(b"R", struct.pack("!I", c) + x),
        st.sampled_from([0, 3, 5, 11, 12]),
        st.binary(max_size=30),
    ),
    st.builds(lambda a, b: msg(b"S", a + b), cstr, cstr),
    st.builds(
        lambda p, k: msg(b"K", struct.pack("!I", p) + k),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=4, max_size=256),
    ),
    st.builds(lambda x: msg(b"N", x), st.binary(max_size=40)),
    st.builds(lambda x: msg(b"v", x), st.binary(max_size=40)),
)
endings = st.one_of(
    st.sampled_from([b"I", b"T", b"E"]).map(lambda s: msg(b"Z", s)),
    st.builds(lambda x: msg(b"E", x), st.binary(max_size=40)),
)
mechanisms = st.lists(
    st.sampled_from([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"X-PLUS", b"OAUTHBEARER"]),
    min_size=1,
    max_size=4,
)


def run_filter(chunks: list[bytes]) -> tuple[bytes, bytes, BackendStartupFilter]:
    """Output, everything after the end of startup, and the filter."""
    f = BackendStartupFilter()
    out = []
    rest = b""
    for chunk in chunks:
        if f.done:
            rest += chunk
        else:
            out.append(f.feed(chunk))
    if f.done:
        rest = f.take_remaining() + rest
    return b"".join(out), rest, f


@SETTINGS
@given(
    st.lists(server_messages, max_size=6).map(b"".join),
    endings,
    st.binary(max_size=30),
    st.lists(st.integers(0, 2000), max_size=8),
)
def test_filter_output_is_its_input_without_sasl(
    body: bytes, end: bytes, after: bytes, cuts: list[int]
) -> None:
    stream = body + end + after
    out, rest, f = run_filter(chunked(stream, cuts))
    assert f.done
    assert out == body + end
    assert rest == after  # never read past the message that ended startup


@SETTINGS
@given(
    st.lists(server_messages, max_size=3).map(b"".join),
    mechanisms,
    st.lists(server_messages, max_size=3).map(b"".join),
    endings,
    st.lists(st.integers(0, 2000), max_size=8),
)
def test_filter_strips_channel_binding_whatever_the_chunking(
    before: bytes, names: list[bytes], after: bytes, end: bytes, cuts: list[int]
) -> None:
    def sasl(ns: list[bytes]) -> bytes:
        return msg(b"R", struct.pack("!I", 10) + b"".join(n + b"\x00" for n in ns) + b"\x00")

    kept = [n for n in names if not n.endswith(b"-PLUS")]
    stream = before + sasl(names) + after + end
    try:
        out, rest, f = run_filter(chunked(stream, cuts))
    except UpstreamError as exc:
        assert not kept
        assert exc.reason == "protocol"
        return
    assert kept
    assert out == before + sasl(kept) + after + end
    assert rest == b""
    assert f.done


@SETTINGS
@given(st.binary(max_size=200), st.lists(st.integers(0, 2000), max_size=8))
def test_filter_on_arbitrary_bytes_fails_only_with_upstream_error(
    data: bytes, cuts: list[int]
) -> None:
    try:
        out, rest, _ = run_filter(chunked(data, cuts))
    except UpstreamError as exc:
        assert exc.reason == "protocol"
        return
    # Nothing is invented or lost: what was emitted, held back or handed on is the input
    # unless a SASL message was rewritten (which only ever shortens it).
    assert len(out) + len(rest) <= len(data)
