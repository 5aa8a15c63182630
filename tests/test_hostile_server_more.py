"""Upstreams that cut, reset, inject or alert at every step of the TLS set-up.

``test_hostile_upstream.py`` covers the answers to the SSLRequest (``N``, ``E``, garbage, ``S``
plus bytes in the same segment), silence, and bad certificates. This file adds the failures
that happen *around* the handshake, and checks for every hostile server what a long-running
sidecar needs most: the client gets a clear error quickly (well before the 10 s handshake
timeout, so the failure was noticed, not waited out), not one byte of the client's session left
before TLS, and the failed attempt leaves no task and no file descriptor behind.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.fake_servers import (
    SSL_REQUEST,
    Conn,
    FakeUpstream,
    assert_back_to_baseline,
    error_msg,
    read_startup,
    sidecar_resources,
    tls_alert_record,
)

Script = Callable[[Conn], None]

# Every failure here must be noticed, not timed out: the sidecar's handshake limit is 10 s.
PROMPT = 5.0

ALERT_HANDSHAKE_FAILURE = 40


def _connect_fails(conninfo: str) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(conninfo, connect_timeout=20).close()
    return str(info.value), time.monotonic() - t0


def _rst(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_client_hello(conn: Conn) -> bytes:
    """Read one TLS record (the ClientHello) from the raw socket, recorded as plaintext."""
    head = conn.recv_exact(5)
    assert head[:1] == b"\x16", head  # a handshake record: the sidecar did start TLS
    (length,) = struct.unpack("!H", head[3:5])
    return head + conn.recv_exact(length)


# -- the scripts ---------------------------------------------------------------------------------


def eof_after_ssl_request(conn: Conn) -> None:
    conn.recv_exact(8)


def rst_after_ssl_request(conn: Conn) -> None:
    conn.recv_exact(8)
    _rst(conn.sock)


def eof_after_client_hello(conn: Conn) -> None:
    conn.recv_exact(8)
    conn.sock.sendall(b"S")
    _read_client_hello(conn)


def rst_after_client_hello(conn: Conn) -> None:
    conn.recv_exact(8)
    conn.sock.sendall(b"S")
    _read_client_hello(conn)
    _rst(conn.sock)


def bytes_after_s_in_separate_segment(conn: Conn) -> None:
    """``S``, then (once the sidecar is provably in TLS) a plaintext ReadyForQuery.

    The injected bytes arrive after the one-byte answer was read and checked, so the MSG_PEEK
    check cannot see them: the TLS layer must reject them as a malformed record.
    """
    conn.recv_exact(8)
    conn.sock.sendall(b"S")
    _read_client_hello(conn)
    conn.sock.sendall(b"Z\x00\x00\x00\x05I")
    conn.drain_plaintext()


def raw_alert_after_client_hello(conn: Conn) -> None:
    conn.recv_exact(8)
    conn.sock.sendall(b"S")
    _read_client_hello(conn)
    conn.sock.sendall(tls_alert_record(ALERT_HANDSHAKE_FAILURE))
    conn.drain_plaintext()


def _tls_server(ctx: ssl.SSLContext) -> Script:
    """Answer ``S`` and run a real handshake; the server side's own failure ends the script."""

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        try:
            conn.start_tls(ctx)
        except ssl.SSLError as exc:
            conn.error = exc  # expected: the server aborted with an alert
            return
        conn.drain_tls()

    return script


def _context(certs: dict[str, Path], **kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["good.crt"], certs["good.key"])
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


def tls13_only_server(certs: dict[str, Path]) -> Script:
    return _tls_server(_context(certs, minimum_version=ssl.TLSVersion.TLSv1_3))


def client_cert_required_server(certs: dict[str, Path]) -> Script:
    ctx = _context(certs)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=certs["ca.cer"].read_bytes())
    return _tls_server(ctx)


def unrecognized_name_server(certs: dict[str, Path]) -> Script:
    """A server whose SNI callback refuses every name (as a multi-tenant gateway might)."""
    ctx = _context(certs)

    def refuse(_sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> int:
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    ctx.sni_callback = refuse  # type: ignore[assignment]
    return _tls_server(ctx)


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    script: Callable[[dict[str, Path]], Script]
    expected: tuple[str, ...]  # every one of these is in the client's error message
    upstream_extra: str = ""  # appended to the sidecar's upstream conninfo


def _plain(script: Script) -> Callable[[dict[str, Path]], Script]:
    return lambda _certs: script


CASES = [
    Case("eof-after-sslrequest", _plain(eof_after_ssl_request), ("closed the connection",)),
    Case(
        "rst-after-sslrequest",
        _plain(rst_after_ssl_request),
        ("waiting for the answer to the SSLRequest",),
    ),
    Case(
        "eof-after-clienthello",
        _plain(eof_after_client_hello),
        ("during the TLS handshake",),
    ),
    Case(
        "rst-after-clienthello",
        _plain(rst_after_client_hello),
        ("during the TLS handshake",),
    ),
    Case(
        "S-then-bytes-in-separate-segment",
        _plain(bytes_after_s_in_separate_segment),
        ("TLS handshake with server",),
    ),
    Case(
        "raw-alert-handshake-failure",
        _plain(raw_alert_after_client_hello),
        ("TLS handshake with server", "HANDSHAKE_FAILURE"),
    ),
    Case(
        "alert-unrecognized-name",
        unrecognized_name_server,
        ("TLS handshake with server", "UNRECOGNIZED_NAME"),
    ),
    Case(
        "server-tls13-only-vs-sidecar-max-tls12",
        tls13_only_server,
        ("TLS handshake with server", "PROTOCOL_VERSION", "TLS 1.2 and 1.3"),
        upstream_extra=" ssl_max_protocol_version=TLSv1.2",
    ),
    Case(
        "client-cert-required-tls12",
        client_cert_required_server,
        # OpenSSL's server answers a missing certificate with a generic handshake_failure
        # alert; libpq shows the same words ("sslv3 alert handshake failure").
        ("TLS handshake with server", "HANDSHAKE_FAILURE"),
        upstream_extra=" ssl_max_protocol_version=TLSv1.2",
    ),
]


def _upstream(fake: FakeUpstream, certs: dict[str, Path], extra: str = "") -> str:
    return f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}{extra}"


def _client(sc) -> str:
    return sc.conninfo(user="app", password="pw", dbname="app")


def _assert_nothing_before_tls(fake: FakeUpstream) -> None:
    assert fake.connections, "the sidecar never connected upstream"
    for conn in fake.connections:
        # The SSLRequest, then at most TLS records (which start 0x16): nothing of the session.
        plain = bytes(conn.plaintext)
        assert plain[:8] == SSL_REQUEST, plain
        assert plain[8:9] in (b"", b"\x16"), plain
        assert b"user\x00app" not in plain
        assert bytes(conn.decrypted) == b"", "session bytes reached an unverified server"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_server_fails_promptly_without_leaks(start_sidecar, certs, case: Case) -> None:
    with FakeUpstream(case.script(certs)) as fake:
        sc = start_sidecar(_upstream(fake, certs, case.upstream_extra))
        baseline = sidecar_resources(sc)
        message, elapsed = _connect_fails(_client(sc))
        fake.wait_done()
        for expected in case.expected:
            assert expected in message, message
        assert elapsed < PROMPT, f"{elapsed:.1f} s: the failure was waited out, not noticed"
        _assert_nothing_before_tls(fake)
        assert_back_to_baseline(sc, baseline)


def test_client_cert_required_tls13_gets_a_clear_error(start_sidecar, certs) -> None:
    """TLS 1.3: the server checks the client certificate after the client's handshake is done.

    The sidecar's handshake succeeds, it sends the StartupMessage (encrypted), and the server's
    ``certificate required`` alert arrives on the first read — unless the server's RST (it
    closes with our StartupMessage unread) overtakes it, a race libpq has too. Either way the
    client gets the sidecar's error naming what happened, not a bare EOF.
    """
    with FakeUpstream(client_cert_required_server(certs)) as fake:
        sc = start_sidecar(_upstream(fake, certs))
        baseline = sidecar_resources(sc)
        message, elapsed = _connect_fails(_client(sc))
        fake.wait_done()
        assert elapsed < PROMPT
        _assert_nothing_before_tls(fake)
        assert_back_to_baseline(sc, baseline)
        assert "closed the connection during authentication" in message, message
        text = message.lower().replace("_", " ")
        assert "certificate required" in text or "connection reset" in text, message


def test_client_cert_required_tls13_still_fails_cleanly(start_sidecar, certs) -> None:
    """The part of the case above that holds today: refused, prompt, nothing leaked."""
    with FakeUpstream(client_cert_required_server(certs)) as fake:
        sc = start_sidecar(_upstream(fake, certs))
        baseline = sidecar_resources(sc)
        _message, elapsed = _connect_fails(_client(sc))
        fake.wait_done()
    assert elapsed < PROMPT
    _assert_nothing_before_tls(fake)
    assert_back_to_baseline(sc, baseline)


def _closes_after_startup_message(certs: dict[str, Path], *, reset: bool) -> Script:
    """Completes TLS, reads the StartupMessage, then goes away (FIN, or RST like a crash)."""
    ctx = _context(certs)

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        tls_sock = conn.start_tls(ctx)
        conn.decrypted += read_startup(tls_sock)
        if reset:
            _rst(tls_sock)

    return script


def test_server_closing_during_authentication_gets_the_sidecars_error(start_sidecar, certs) -> None:
    """A plain close (FIN) while the client waits for authentication: the sidecar says so."""
    with FakeUpstream(_closes_after_startup_message(certs, reset=False)) as fake:
        sc = start_sidecar(_upstream(fake, certs))
        baseline = sidecar_resources(sc)
        message, elapsed = _connect_fails(_client(sc))
        fake.wait_done()
        assert_back_to_baseline(sc, baseline)
    assert elapsed < PROMPT
    assert "closed the connection during authentication" in message, message


def test_server_reset_during_authentication_gets_the_sidecars_error(start_sidecar, certs) -> None:
    with FakeUpstream(_closes_after_startup_message(certs, reset=True)) as fake:
        sc = start_sidecar(_upstream(fake, certs))
        baseline = sidecar_resources(sc)
        message, elapsed = _connect_fails(_client(sc))
        fake.wait_done()
        assert elapsed < PROMPT
        assert b"user\x00app\x00" in bytes(fake.connections[0].decrypted)
        assert_back_to_baseline(sc, baseline)
    assert "closed the connection during authentication" in message, message


# -- many hostile servers in a row: nothing accumulates -------------------------------------------


def _answer_then_drain(data: bytes) -> Script:
    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(data)
        conn.drain_plaintext()

    return script


def test_rounds_of_hostile_servers_leave_nothing_behind(
    start_sidecar, certs, tmp_path: Path
) -> None:
    """One sidecar meets every kind of hostile server (old and new) round after round.

    The baseline is taken after a first round, so lazily created things (the SSL context's
    loaded roots, resolver threads) are not counted as leaks; every later round must end at it.
    """

    def never_answers(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.drain_plaintext()  # silent until the sidecar gives up and closes

    def stalls_mid_handshake(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        _read_client_hello(conn)
        conn.drain_plaintext()

    scripts: list[Script] = [
        _answer_then_drain(b"N"),
        _answer_then_drain(b"E" + error_msg("pre-TLS text")[1:]),
        _answer_then_drain(b"X"),
        _answer_then_drain(b"S" + b"Z\x00\x00\x00\x05I"),
        never_answers,
        stalls_mid_handshake,
        eof_after_ssl_request,
        rst_after_ssl_request,
        eof_after_client_hello,
        rst_after_client_hello,
        bytes_after_s_in_separate_segment,
        raw_alert_after_client_hello,
        unrecognized_name_server(certs),
        client_cert_required_server(certs),
        _tls_server(_wrong_host_context(certs)),
    ]
    turn = itertools.count()

    def rotating(conn: Conn) -> None:
        scripts[next(turn) % len(scripts)](conn)

    cfg = tmp_path / "sidecar.yaml"
    with FakeUpstream(rotating) as fake:
        cfg.write_text(
            "timeouts: {tls_handshake: 0.5}\n"
            "routes:\n"
            "  - listen: ['127.0.0.1:0']\n"
            f"    upstream: '{_upstream(fake, certs)}'\n"
        )
        sc = start_sidecar(None, config_path=str(cfg))
        for _ in scripts:
            _connect_fails(_client(sc))
        # The fake upstream lives in this process too: its sockets count until its scripts end.
        fake.wait_done()
        baseline = sidecar_resources(sc)
        rounds = 3
        for _ in range(rounds * len(scripts)):
            _message, elapsed = _connect_fails(_client(sc))
            assert elapsed < PROMPT
        fake.wait_done()
        seen = assert_back_to_baseline(sc, baseline)
    assert len(fake.connections) == (rounds + 1) * len(scripts)
    assert seen[0] <= baseline[0]
    _assert_nothing_before_tls(fake)


def _wrong_host_context(certs: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["wrong_host.crt"], certs["wrong_host.key"])
    return ctx
