"""Upstreams that refuse TLS, inject bytes, or present a certificate we must not trust.

Every case must end in a refused session, a clear error the client can display, and not one
byte of the client's StartupMessage sent before TLS was established.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.fake_servers import (
    SSL_REQUEST,
    Conn,
    FakeUpstream,
    error_msg,
    serve_one_query_session,
    server_context,
)


def _connect_fails(sidecar_conninfo: str) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar_conninfo, connect_timeout=20).close()
    return str(info.value)


def _assert_no_plaintext_leak(fake: FakeUpstream) -> None:
    assert fake.connections, "the sidecar never connected upstream"
    for conn in fake.connections:
        # Exactly the SSLRequest, nothing of the StartupMessage (user name, database...).
        assert bytes(conn.plaintext) == SSL_REQUEST, bytes(conn.plaintext)


def _answer(data: bytes) -> Callable[[Conn], None]:
    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(data)
        conn.drain_plaintext()

    return script


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"N", "refused TLS"),
        (b"E" + error_msg("secret server text")[1:], "error"),
        (b"X", "not a PostgreSQL server"),
        (b"S" + b"Z\x00\x00\x00\x05I", "CVE-2021-23222"),
    ],
    ids=["answers-N", "answers-E", "unknown-byte", "S-plus-bytes"],
)
def test_refused_negotiation_ends_session_without_plaintext(
    start_sidecar, certs, answer: bytes, expected: str
) -> None:
    with FakeUpstream(_answer(answer)) as fake:
        sc = start_sidecar(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
        fake.wait_done()
    assert expected in message
    assert "secret server text" not in message  # CVE-2024-10977: pre-TLS text is not relayed
    _assert_no_plaintext_leak(fake)


def test_server_closing_after_ssl_request(start_sidecar, certs) -> None:
    def script(conn: Conn) -> None:
        conn.recv_exact(8)

    with FakeUpstream(script) as fake:
        sc = start_sidecar(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
    assert "closed the connection" in message
    _assert_no_plaintext_leak(fake)


def _tls_script(cert: Path, key: Path) -> Callable[[Conn], None]:
    ctx = server_context(cert, key)

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        try:
            tls_sock = conn.start_tls(ctx)
        except ssl.SSLError:
            return  # the sidecar aborted the handshake: what we want for a bad certificate
        conn.drain_tls()
        del tls_sock

    return script


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        ("wrong_ca", "could not verify the certificate of server"),
        ("wrong_host", 'does not match host name "localhost"'),
        ("expired", "expired"),
    ],
)
def test_untrusted_certificate_is_refused(start_sidecar, certs, cert: str, expected: str) -> None:
    with FakeUpstream(_tls_script(certs[cert + ".crt"], certs[cert + ".key"])) as fake:
        sc = start_sidecar(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
        fake.wait_done()
    assert expected in message
    _assert_no_plaintext_leak(fake)
    for conn in fake.connections:
        assert bytes(conn.decrypted) == b"", "the sidecar sent the session to an unverified server"


def test_good_certificate_session_reaches_server(start_sidecar, certs) -> None:
    """The control case for the ones above: same fake, trusted certificate, session flows."""
    ctx = server_context(certs["good.crt"], certs["good.key"])

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        serve_one_query_session(conn.start_tls(ctx), conn, value="through-tls")

    with FakeUpstream(script) as fake:
        sc = start_sidecar(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        with psycopg.connect(sc.conninfo(user="app", password="pw", dbname="app")) as c:
            c.autocommit = True
            assert c.pgconn.parameter_status(b"server_version") == b"17.0"
    _assert_no_plaintext_leak(fake)
    assert b"user\x00app\x00" in bytes(fake.connections[0].decrypted)


def test_direct_tls_requires_and_uses_alpn(start_sidecar, certs, psql) -> None:
    """PostgreSQL 17's sslnegotiation=direct: TLS first, ALPN ``postgresql`` required."""
    ctx = server_context(certs["good.crt"], certs["good.key"], alpn=["postgresql"])

    def script(conn: Conn) -> None:
        first = conn.sock.recv(1, 2)  # MSG_PEEK: a ClientHello starts with 0x16
        assert first == b"\x16", first
        tls_sock = conn.start_tls(ctx)
        if conn.alpn != "postgresql":
            return
        serve_one_query_session(tls_sock, conn, value="direct-ok")

    with FakeUpstream(script) as fake:
        sc = start_sidecar(
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']} sslnegotiation=direct"
        )
        rc, out, err = psql(sc.conninfo(user="app", password="pw", dbname="app"), "select 1")
    assert rc == 0, err
    assert out.strip() == "direct-ok"
    assert fake.connections[0].alpn == "postgresql"
    assert bytes(fake.connections[0].plaintext) == b""


def test_direct_tls_without_alpn_is_refused(start_sidecar, certs) -> None:
    ctx = server_context(certs["good.crt"], certs["good.key"])  # no ALPN on the server

    def script(conn: Conn) -> None:
        conn.start_tls(ctx)
        conn.drain_tls()

    with FakeUpstream(script) as fake:
        sc = start_sidecar(
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']} sslnegotiation=direct"
        )
        message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
        fake.wait_done()
    assert "ALPN" in message
    assert bytes(fake.connections[0].decrypted) == b""


def _sidecar_with_timeouts(start_sidecar, tmp_path: Path, upstream: str, **timeouts: float):
    cfg = tmp_path / "sidecar.yaml"
    lines = ["timeouts:"] + [f"  {k}: {v}" for k, v in timeouts.items()]
    lines += ["routes:", "  - listen: ['127.0.0.1:0']", f"    upstream: '{upstream}'"]
    cfg.write_text("\n".join(lines) + "\n")
    return start_sidecar(None, config_path=str(cfg))


def test_server_that_never_answers_times_out(start_sidecar, certs, tmp_path: Path) -> None:
    silent = threading.Event()

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        silent.wait(30)  # accepts TCP, reads the SSLRequest, never answers

    with FakeUpstream(script) as fake:
        sc = _sidecar_with_timeouts(
            start_sidecar,
            tmp_path,
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}",
            tls_handshake=0.5,
        )
        message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
        silent.set()
    assert "did not complete TLS set-up within 0.5 s" in message
    _assert_no_plaintext_leak(fake)


def test_server_stalling_mid_handshake_times_out(start_sidecar, certs, tmp_path: Path) -> None:
    silent = threading.Event()

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        conn.sock.recv(4096)  # the ClientHello, never answered
        silent.wait(30)

    with FakeUpstream(script) as fake:
        sc = _sidecar_with_timeouts(
            start_sidecar,
            tmp_path,
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}",
            tls_handshake=0.5,
        )
        message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
        silent.set()
    assert "during the TLS handshake" in message


def test_refused_port_and_unknown_host(start_sidecar, certs) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    sc = start_sidecar(f"host=127.0.0.1 port={closed_port} sslrootcert={certs['ca.cer']}")
    message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
    assert "could not connect to the upstream server" in message
    assert "Connection refused" in message

    sc = start_sidecar(f"host=no-such-host.invalid sslrootcert={certs['ca.cer']}")
    message = _connect_fails(sc.conninfo(user="app", password="pw", dbname="app"))
    assert 'could not translate host name "no-such-host.invalid"' in message
