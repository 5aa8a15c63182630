"""Clients that are not PostgreSQL clients, or are broken, slow, or many and silent.

The sidecar listens where any local process can reach it. Whatever such a process sends before
a valid StartupMessage must end in either a PostgreSQL ErrorResponse (so a real but confused
client can show why) or a quiet close, within ``timeouts.startup``; it must never open an
upstream connection, never buffer more than one startup packet, and never leave a task or a
file descriptor behind. The upstream here is a fake TLS server that counts connections, so
"no upstream connection" is asserted, not assumed.
"""

from __future__ import annotations

import os
import random
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_servers import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    Conn,
    FakeUpstream,
    assert_back_to_baseline,
    error_fields,
    serve_one_query_session,
    server_context,
    sidecar_resources,
    split_messages,
    startup_packet,
    tls_client_hello,
)

STARTUP_TIMEOUT = 2.0
CANCEL_CODE = 80877102


@pytest.fixture
def upstream(certs) -> Iterator[FakeUpstream]:
    """A well-behaved TLS server (trust auth, answers one query); counts connections."""
    ctx = server_context(certs["good.crt"], certs["good.key"])

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        serve_one_query_session(conn.start_tls(ctx), conn, value="ok")

    with FakeUpstream(script) as fake:
        yield fake


def _start(start_sidecar, tmp_path: Path, fake: FakeUpstream, certs, startup: float):
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"timeouts: {{startup: {startup}}}\n"
        "routes:\n"
        "  - listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=localhost port={fake.port} sslrootcert={certs['ca.cer']}'\n"
    )
    return start_sidecar(None, config_path=str(cfg))


@pytest.fixture
def sidecar(start_sidecar, tmp_path: Path, upstream: FakeUpstream, certs):
    return _start(start_sidecar, tmp_path, upstream, certs, STARTUP_TIMEOUT)


def _exchange(sc, payload: bytes, *, eof: bool = False, limit: float = 10.0) -> tuple[bytes, float]:
    """Send ``payload`` (then EOF if asked); everything the sidecar sends until it closes.

    Returns the answer and the seconds until the sidecar closed the connection.
    """
    t0 = time.monotonic()
    with socket.create_connection((sc.host, sc.port), timeout=limit) as s:
        if payload:
            s.sendall(payload)
        if eof:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out, time.monotonic() - t0


def _one_error(answer: bytes, n_prefix: int = 0) -> dict[str, str]:
    """Assert the answer is ``n_prefix`` times ``N`` then exactly one ErrorResponse."""
    assert answer[:n_prefix] == b"N" * n_prefix, answer
    messages = split_messages(answer[n_prefix:])
    assert [kind for kind, _ in messages] == [b"E"], answer
    fields = error_fields(messages[0][1])
    assert fields["S"] == "FATAL" and fields["V"] == "FATAL", fields
    return fields


def _well_behaved_session_works(sc) -> None:
    with psycopg.connect(sc.conninfo(user="app", password="pw", dbname="app")) as conn:
        conn.autocommit = True
        assert conn.execute("select 1").fetchone() == ("ok",)


# -- length fields -------------------------------------------------------------------------------


BAD_LENGTHS = [*range(8), 10005, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@pytest.mark.parametrize("length", BAD_LENGTHS, ids=[f"len-{n:#x}" for n in BAD_LENGTHS])
def test_bad_length_field_is_refused_at_once(sidecar, upstream, length: int) -> None:
    """Refused as soon as the length word is in: no waiting for 2 GB that will never come."""
    baseline = sidecar_resources(sidecar)
    answer, elapsed = _exchange(sidecar, struct.pack("!II", length, 196608))
    fields = _one_error(answer)
    assert fields["C"] == "08P01"
    assert f"invalid length of startup packet: {length} bytes" in fields["M"]
    assert elapsed < STARTUP_TIMEOUT, "refused by the startup timeout, not by the length check"
    assert upstream.connections == []
    assert_back_to_baseline(sidecar, baseline)


@pytest.mark.parametrize("length", [10001, 10004], ids=["issue-10001", "largest-10004"])
def test_largest_legal_startup_packets_are_forwarded_unchanged(
    sidecar, upstream, length: int
) -> None:
    """PostgreSQL's limit is 10000 bytes after the length word: 10004 in all still passes."""
    bare = startup_packet(user="app", database="app", application_name="")
    packet = startup_packet(user="app", database="app", application_name="x" * (length - len(bare)))
    assert len(packet) == length
    with socket.create_connection((sidecar.host, sidecar.port), timeout=10) as s:
        s.sendall(packet)
        got = b""
        while not got.endswith(b"Z\x00\x00\x00\x05I"):  # until ReadyForQuery
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        s.sendall(b"X\x00\x00\x00\x04")
    upstream.wait_done()
    assert bytes(upstream.connections[0].decrypted).startswith(packet)


# -- truncated packets, then EOF -----------------------------------------------------------------

_STARTUP = startup_packet(user="app", database="app")

TRUNCATED = {
    "one-byte": (b"\x00", 0),
    "three-bytes": (b"\x00\x00\x00", 0),
    "sslrequest-minus-one": (SSL_REQUEST[:7], 0),
    "length-only": (_STARTUP[:4], 0),
    "half-startup": (_STARTUP[: len(_STARTUP) // 2], 0),
    "startup-minus-one": (_STARTUP[:-1], 0),
    "sslrequest-then-eof": (SSL_REQUEST, 1),
    "sslrequest-then-half-startup": (SSL_REQUEST, 1),  # second part sent after the N
    "cancel-minus-one": (struct.pack("!III", 16, CANCEL_CODE, 1234) + b"\0\0\0", 0),
}


@pytest.mark.parametrize("name", TRUNCATED)
def test_truncated_packet_then_eof_is_closed_quietly(sidecar, upstream, name: str) -> None:
    """Like PostgreSQL ("incomplete startup packet"): nothing is sent back, no upstream."""
    payload, n_answers = TRUNCATED[name]
    baseline = sidecar_resources(sidecar)
    t0 = time.monotonic()
    with socket.create_connection((sidecar.host, sidecar.port), timeout=10) as s:
        s.sendall(payload)
        if n_answers:
            assert s.recv(1) == b"N"
            if name.endswith("half-startup"):
                s.sendall(_STARTUP[:9])
        s.shutdown(socket.SHUT_WR)
        rest = s.recv(65536)
    assert rest == b""
    assert time.monotonic() - t0 < STARTUP_TIMEOUT, "the EOF was not noticed"
    assert upstream.connections == []
    assert_back_to_baseline(sidecar, baseline)


# -- slowloris -------------------------------------------------------------------------------------


def test_one_byte_then_silence_is_dropped_at_the_deadline(
    start_sidecar, tmp_path: Path, upstream, certs
) -> None:
    sc = _start(start_sidecar, tmp_path, upstream, certs, startup=1.0)
    answer, elapsed = _exchange(sc, b"\x00")
    assert answer == b""
    assert 1.0 <= elapsed < 4.0, elapsed
    assert upstream.connections == []


def test_trickling_client_is_cut_at_the_deadline_despite_progress(
    start_sidecar, tmp_path: Path, upstream, certs
) -> None:
    """The startup limit is a deadline for the whole packet, not an idle timer per byte.

    The client sends one byte, then waits up to 0.1 s for the sidecar's verdict (EOF) before
    the next one: the pace is the stimulus, and the loop ends on the sidecar's close.
    """
    sc = _start(start_sidecar, tmp_path, upstream, certs, startup=1.0)
    packet = startup_packet(user="app", database="app", application_name="x" * 9000)
    t0 = time.monotonic()
    sent = 0
    with socket.create_connection((sc.host, sc.port), timeout=10) as s:
        s.settimeout(0.1)
        for byte in packet:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            try:
                if s.recv(1) == b"":
                    break
            except TimeoutError:
                continue
        else:
            pytest.fail("the sidecar let the whole trickled packet through")
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 4.0, elapsed
    assert sent < len(packet)
    assert upstream.connections == []


# -- garbage, repeated and pipelined requests, other protocols -----------------------------------

_rng = random.Random(20240601)

GARBAGE = {
    "http-get": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "08P01", "invalid length"),
    "ssh-banner": (b"SSH-2.0-OpenSSH_9.6\r\n", "08P01", "invalid length"),
    "all-ones": (b"\xff" * 16, "08P01", "invalid length"),
    "real-tls-clienthello": (tls_client_hello(), "08P01", "sslmode=disable"),
    "second-sslrequest": (SSL_REQUEST + b"", "08P01", "second SSLRequest"),
    "second-gssencrequest": (GSSENC_REQUEST, "08P01", "second GSSENCRequest"),
    "sslrequest-with-body": (struct.pack("!II", 12, 80877103) + b"\0\0\0\0", "08P01", "12 bytes"),
    "cancel-too-short": (struct.pack("!III", 12, CANCEL_CODE, 1), "08P01", "cancel request"),
    "cancel-too-long": (
        struct.pack("!III", 300, CANCEL_CODE, 1) + b"k" * 288,
        "08P01",
        "cancel request",
    ),
    "no-user": (startup_packet(database="app"), "28000", "no PostgreSQL user name"),
    "unterminated-params": (
        struct.pack("!II", 16, 196608) + b"user\0app",
        "08P01",
        "",
    ),
    "random-bytes": (
        bytes([_rng.randrange(0x17, 0x100)]) + _rng.randbytes(63),
        "08P01",
        "invalid length",
    ),
}
# The "second" requests follow a first one that was answered N.
_FIRST = {"second-sslrequest": SSL_REQUEST, "second-gssencrequest": GSSENC_REQUEST}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_gets_one_error_response_and_no_upstream(sidecar, upstream, name: str) -> None:
    payload, sqlstate, words = GARBAGE[name]
    baseline = sidecar_resources(sidecar)
    first = _FIRST.get(name)
    if first is None:
        answer, _ = _exchange(sidecar, payload)
        fields = _one_error(answer)
    else:
        with socket.create_connection((sidecar.host, sidecar.port), timeout=10) as s:
            s.sendall(first)
            assert s.recv(1) == b"N"
            s.sendall(payload)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        fields = _one_error(answer)
    assert fields["C"] == sqlstate, fields
    assert words in fields["M"], fields
    assert upstream.connections == []
    assert_back_to_baseline(sidecar, baseline)


@pytest.mark.parametrize(
    ("first", "name"),
    [(SSL_REQUEST, "SSLRequest"), (GSSENC_REQUEST, "GSSENCRequest")],
    ids=["after-sslrequest", "after-gssencrequest"],
)
def test_startup_pipelined_after_encryption_request_is_refused(
    sidecar, upstream, first: bytes, name: str
) -> None:
    """CVE-2021-23214: a StartupMessage sent before the answer was not sent by the client."""
    answer, _ = _exchange(sidecar, first + _STARTUP)
    fields = _one_error(answer)
    assert fields["C"] == "08P01"
    assert f"received unencrypted data after {name}" in fields["M"]
    assert "CVE-2021-23214" in fields["M"]
    assert upstream.connections == []


PROTOCOLS = [(1, 0), (2, 0), (4, 0), (0, 0), (65535, 65535), (1234, 5677)]


@pytest.mark.parametrize("version", PROTOCOLS, ids=[f"{a}.{b}" for a, b in PROTOCOLS])
def test_unsupported_protocol_major_gets_postgresqls_answer(
    sidecar, upstream, version: tuple[int, int]
) -> None:
    major, minor = version
    answer, _ = _exchange(sidecar, startup_packet(major << 16 | minor, user="app"))
    fields = _one_error(answer)
    assert fields["C"] == "0A000"
    assert fields["M"].startswith(f"unsupported frontend protocol {major}.{minor}:")
    assert upstream.connections == []


def test_newer_protocol_minor_and_pq_options_are_forwarded_unchanged(sidecar, upstream) -> None:
    """3.x and ``_pq_.*`` options are the server's to negotiate (NegotiateProtocolVersion)."""
    packet = startup_packet(3 << 16 | 9999, user="app", database="app", _pq_test="on")
    with socket.create_connection((sidecar.host, sidecar.port), timeout=10) as s:
        s.sendall(packet)
        got = b""
        while not got.endswith(b"Z\x00\x00\x00\x05I"):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        s.sendall(b"X\x00\x00\x00\x04")
    upstream.wait_done()
    assert bytes(upstream.connections[0].decrypted).startswith(packet)


def test_real_tls_client_gets_an_error_it_can_see_as_plaintext(sidecar, upstream) -> None:
    """A client configured for TLS to the sidecar: its handshake fails, it does not hang."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((sidecar.host, sidecar.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")
    assert upstream.connections == []


# -- any bytes at all ----------------------------------------------------------------------------

_prefixes = st.sampled_from([b"", SSL_REQUEST, GSSENC_REQUEST, SSL_REQUEST[:4], _STARTUP[:8]])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(prefix=_prefixes, tail=st.binary(max_size=80))
def test_any_bytes_then_eof_end_in_n_error_or_silence(sidecar, upstream, prefix, tail) -> None:
    """Whatever arrives: N answers, then at most one well-formed ErrorResponse, then close.

    One sidecar serves every example (the point is that it keeps serving).
    """
    answer, elapsed = _exchange(sidecar, prefix + tail, eof=True)
    assert elapsed < STARTUP_TIMEOUT + 3
    rest = answer.lstrip(b"N")
    assert len(answer) - len(rest) <= 2, answer  # at most one SSLRequest and one GSSENCRequest
    if rest:
        kinds = [kind for kind, _ in split_messages(rest)]
        if kinds != [b"E"]:
            # Only a StartupMessage that really parses may open a session upstream.
            assert upstream.connections, answer
        else:
            fields = error_fields(split_messages(rest)[0][1])
            assert fields["C"] in ("08P01", "0A000", "28000"), fields


def test_sidecar_still_serves_after_all_that(sidecar, upstream) -> None:
    """The control case: the same fixture, a real client, a session that works."""
    for name in ("http-get", "real-tls-clienthello", "no-user"):
        _exchange(sidecar, GARBAGE[name][0])
    _well_behaved_session_works(sidecar)
    assert len(upstream.connections) == 1


# -- many half-open connections ------------------------------------------------------------------


def _half_open_flood(sc, count: int) -> float:
    """Open ``count`` connections that send nothing; return when the sidecar closed them all."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    try:
        for _ in range(count):
            s = socket.create_connection((sc.host, sc.port), timeout=10)
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
        # A session still works while the flood is held: half-open clients take no slot.
        _well_behaved_session_works(sc)
        open_left = count
        deadline = time.monotonic() + STARTUP_TIMEOUT + 30
        while open_left:
            assert time.monotonic() < deadline, f"{open_left} connections never closed"
            for key, _ in sel.select(timeout=1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                assert sock.recv(1) == b""  # EOF, and no bytes: nothing to say before startup
                sel.unregister(sock)
                open_left -= 1
        return time.monotonic() - t0
    finally:
        sel.close()
        for s in socks:
            s.close()


def _half_open_case(start_sidecar, tmp_path, upstream, certs, count: int) -> None:
    sc = _start(start_sidecar, tmp_path, upstream, certs, startup=STARTUP_TIMEOUT)
    _well_behaved_session_works(sc)
    upstream.wait_done()
    baseline = sidecar_resources(sc)
    elapsed = _half_open_flood(sc, count)
    assert elapsed >= STARTUP_TIMEOUT
    upstream.wait_done()
    fds, tasks = assert_back_to_baseline(sc, baseline)
    assert len(upstream.connections) == 2  # the two real sessions, not one per flood socket
    print(f"{count} half-open connections dropped in {elapsed:.1f} s; fds {fds}, tasks {tasks}")


def test_a_thousand_half_open_connections_are_dropped_and_forgotten(
    start_sidecar, tmp_path: Path, upstream, certs
) -> None:
    _half_open_case(start_sidecar, tmp_path, upstream, certs, 1000)


@pytest.mark.slow
def test_thousands_of_half_open_connections_are_dropped_and_forgotten(
    start_sidecar, tmp_path: Path, upstream, certs
) -> None:
    # Each costs two descriptors in this process (both ends); stay under the soft limit.
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(6000, (soft - 200) // 2)
    if count < 2000:
        pytest.skip(f"RLIMIT_NOFILE {soft} is too low for thousands of connections")
    _half_open_case(start_sidecar, tmp_path, upstream, certs, count)


def test_process_fd_count_helper_sees_new_sockets() -> None:
    """The leak checks above rely on /proc/self/fd counting this process's sockets."""
    before = len(os.listdir("/proc/self/fd"))
    with socket.socket():
        assert len(os.listdir("/proc/self/fd")) == before + 1
    assert len(os.listdir("/proc/self/fd")) == before


def test_listen_backlog_is_sized_for_connection_storms(sidecar) -> None:
    """1,000 sequential connects took ~10 s here, nearly all of it in SYN retransmits."""
    import shutil
    import subprocess

    ss = shutil.which("ss")
    assert ss is not None, "install iproute2 (./dev does)"
    out = subprocess.run(
        [ss, "-ltnH", f"sport = :{sidecar.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    backlog = int(out[2])  # for a listening socket, Send-Q is the backlog it was given
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    limit = sidecar.settings.limits.max_connections
    assert backlog >= min(2 * limit, somaxconn), f"listen backlog {backlog}"
