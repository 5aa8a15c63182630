"""Real clients through the sidecar to the real TLS-only PostgreSQL 15 test server.

The clients speak plaintext (``sslmode=disable``) to the sidecar; the server only accepts TLS
(``hostnossl ... reject``) with SCRAM passwords, so every passing test here is proof that the
sidecar upgraded the session, verified the server and let SCRAM through.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pg8000.native
import psycopg
import pytest

from tests.fake_servers import read_message

STAT_SSL = "select ssl, version, cipher from pg_stat_ssl where pid = pg_backend_pid()"


@pytest.fixture
def sidecar(start_sidecar, pg):
    return start_sidecar(f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")


def _conninfo(sidecar) -> str:
    return sidecar.conninfo(user="app", password="app-secret-pw", dbname="app")


def test_psql_through_sidecar_is_tls_on_the_server(sidecar, psql) -> None:
    rc, out, err = psql(_conninfo(sidecar), STAT_SSL)
    assert rc == 0, err
    ssl_on, version, cipher = out.strip().split("|")
    assert ssl_on == "t"
    assert version in ("TLSv1.2", "TLSv1.3")
    assert cipher


def test_psycopg_queries_and_copy(sidecar) -> None:
    with psycopg.connect(_conninfo(sidecar)) as conn:
        assert conn.pgconn.ssl_in_use is False  # the client leg is plaintext...
        row = conn.execute(STAT_SSL).fetchone()
        assert row is not None and row[0] is True  # ...the server leg is TLS
        conn.execute("create temporary table t (id int, payload text)")
        with conn.cursor().copy("copy t from stdin") as copy:
            for i in range(20000):
                copy.write_row((i, f"row {i} " + "x" * 50))
        assert conn.execute("select count(*), sum(id) from t").fetchone() == (20000, 199990000)
        out = io.BytesIO()
        with conn.cursor().copy("copy (select * from t order by id) to stdout") as copy:
            for chunk in copy:
                out.write(chunk)
        lines = out.getvalue().splitlines()
        assert len(lines) == 20000
        assert lines[12345] == b"12345\trow 12345 " + b"x" * 50


def test_pg8000_connects_through_sidecar(sidecar) -> None:
    conn = pg8000.native.Connection(
        "app", password="app-secret-pw", database="app", host=sidecar.host, port=sidecar.port
    )
    try:
        assert conn.run("select ssl from pg_stat_ssl where pid = pg_backend_pid()") == [[True]]
        assert conn.run("select :v::int + 1", v=41) == [[42]]
    finally:
        conn.close()


def test_plaintext_directly_to_server_is_rejected(pg) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            f"host=127.0.0.1 port={pg.port} user=app password=app-secret-pw dbname=app "
            "sslmode=disable"
        ).close()


def test_wrong_password_error_comes_from_the_server(sidecar) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(sidecar.conninfo(user="app", password="wrong", dbname="app")).close()


def test_cancel_request_stops_pg_sleep(sidecar) -> None:
    with psycopg.connect(_conninfo(sidecar), autocommit=True) as conn:
        pid = conn.info.backend_pid
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with psycopg.connect(_conninfo(sidecar)) as watcher:
                    # Wait (bounded) until the backend really is sleeping, then cancel.
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        state = watcher.execute(
                            "select wait_event from pg_stat_activity where pid = %s", (pid,)
                        ).fetchone()
                        if state and state[0] == "PgSleep":
                            break
                    started.set()
                    # cancel_safe, not cancel: libpq's PQcancel blocks holding the GIL, which
                    # would starve the in-process sidecar thread that must relay it.
                    conn.cancel_safe(timeout=20)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(60)")
        t.join()
        assert not errors, errors
        assert started.is_set()
        assert time.monotonic() - t0 < 30
        assert conn.execute("select 1").fetchone() == (1,)


def test_listen_notify(sidecar) -> None:
    with (
        psycopg.connect(_conninfo(sidecar), autocommit=True) as listener,
        psycopg.connect(_conninfo(sidecar), autocommit=True) as sender,
    ):
        listener.execute("listen sidecar_test")
        sender.execute("notify sidecar_test, 'hello'")
        gen = listener.notifies(timeout=10, stop_after=1)
        notes = list(gen)
        assert [(n.channel, n.payload) for n in notes] == [("sidecar_test", "hello")]


def test_unix_socket_listener(start_sidecar, pg, psql, tmp_path: Path) -> None:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    sc = start_sidecar(
        f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}",
        listen=["127.0.0.1:0"],
        unix_sockets=[str(sock_dir)],
    )
    sockets = [a for a in sc.sidecar.addresses() if isinstance(a, str)]
    assert len(sockets) == 1 and sockets[0].startswith(str(sock_dir) + "/.s.PGSQL.")
    port = sockets[0].rsplit(".", 1)[1]
    rc, out, err = psql(
        f"host={sock_dir} port={port} user=app password=app-secret-pw dbname=app", STAT_SSL
    )
    assert rc == 0, err
    assert out.startswith("t|")


# -- startup-phase protocol errors, seen from a raw socket -------------------------------------


def _raw_exchange(sidecar, payload: bytes) -> bytes:
    """Send ``payload``, return everything the sidecar answers until it closes."""
    with socket.create_connection((sidecar.host, sidecar.port), timeout=20) as s:
        s.sendall(payload)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _startup_packet(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), 196608) + body


def _sqlstate(error: bytes) -> str:
    assert error[:1] == b"E", error
    fields = error[5:].split(b"\0")
    codes = [f[1:].decode() for f in fields if f[:1] == b"C"]
    return codes[0]


@pytest.mark.parametrize(
    ("payload", "sqlstate"),
    [
        (struct.pack("!I", 4) + b"\0\0\0\0", "08P01"),  # length below 8
        # PostgreSQL's limit is 10000 bytes after the length word: 10005 in all is one too many.
        (struct.pack("!I", 10005) + struct.pack("!I", 196608), "08P01"),
        (struct.pack("!II", 8, 80877103) + b"junk", "08P01"),  # pipelined after SSLRequest
        # Unsupported protocol: PostgreSQL's own SQLSTATE, which old drivers probing 2.0 expect.
        (struct.pack("!II", 8, 0x00020000), "0A000"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "08P01"),  # a TLS ClientHello
    ],
    ids=["short", "too-long", "pipelined-after-sslrequest", "protocol-2", "clienthello"],
)
def test_startup_violations_get_an_error_response(sidecar, payload: bytes, sqlstate: str) -> None:
    answer = _raw_exchange(sidecar, payload)
    assert _sqlstate(answer) == sqlstate


def test_ssl_request_answered_n_then_startup_proceeds(sidecar) -> None:
    with socket.create_connection((sidecar.host, sidecar.port), timeout=20) as s:
        s.sendall(struct.pack("!II", 8, 80877103))
        assert s.recv(1) == b"N"
        s.sendall(_startup_packet(user="app", database="app"))
        kind, body = read_message(s)
        # SCRAM request with the -PLUS variant removed by the sidecar.
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10
        assert body[4:] == b"SCRAM-SHA-256\0\0"


def test_max_connections_refuses_with_53300_and_opens_no_upstream(
    start_sidecar, pg, tmp_path: Path
) -> None:
    cfg = tmp_path / "limit.yaml"
    cfg.write_text(
        "limits: {max_connections: 1}\n"
        "routes:\n"
        "  - name: limited\n"
        "    listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=localhost port={pg.port} sslrootcert={pg.ca_der_path}'\n"
    )
    sc = start_sidecar(None, config_path=str(cfg))
    info = sc.conninfo(user="app", password="app-secret-pw", dbname="app")
    with psycopg.connect(info + " application_name=holder"):
        before = pg.admin_sql("select count(*) from pg_stat_activity where usename = 'app'")
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(info + " application_name=excess").close()
        # libpq does not expose the SQLSTATE of a connection failure: read it off the wire.
        assert _sqlstate(_raw_exchange(sc, _startup_packet(user="app", database="app"))) == "53300"
        after = pg.admin_sql("select count(*) from pg_stat_activity where usename = 'app'")
        assert before == after
    # The slot is released when the first session ends.
    sc.wait_idle()
    with psycopg.connect(info) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_startup_timeout_drops_silent_client(start_sidecar, pg, tmp_path: Path) -> None:
    cfg = tmp_path / "timeout.yaml"
    cfg.write_text(
        "timeouts: {startup: 0.5}\n"
        "routes:\n"
        "  - listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=localhost port={pg.port} sslrootcert={pg.ca_der_path}'\n"
    )
    sc = start_sidecar(None, config_path=str(cfg))
    answer = _raw_exchange(sc, b"")  # connect, send nothing, read until closed
    assert answer == b""  # nothing readable to send before a startup packet, like PostgreSQL


def test_protocol_3_2_request_is_negotiated_down_by_the_server(sidecar) -> None:
    """libpq 18 asks for 3.2; PostgreSQL 15 answers NegotiateProtocolVersion through us."""
    info = _conninfo(sidecar) + " min_protocol_version=3.0 max_protocol_version=3.2"
    with psycopg.connect(info) as conn:
        assert conn.pgconn.protocol_version == 3
        assert conn.execute("select 1").fetchone() == (1,)


def test_gssenc_then_ssl_request_both_answered_n(sidecar) -> None:
    with socket.create_connection((sidecar.host, sidecar.port), timeout=20) as s:
        s.sendall(struct.pack("!II", 8, 80877104))
        assert s.recv(1) == b"N"
        s.sendall(struct.pack("!II", 8, 80877103))
        assert s.recv(1) == b"N"
        s.sendall(_startup_packet(user="app", database="app"))
        kind, body = read_message(s)
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10


def test_upstream_leg_has_tcp_keepalive(sidecar) -> None:
    with psycopg.connect(_conninfo(sidecar)) as conn:
        conn.execute("select 1")

        def keepalive() -> tuple[int, int]:
            (session,) = sidecar.sidecar.sessions
            sock = session.upstream.transport.get_extra_info("socket")
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            )

        assert sidecar.run_in_loop(keepalive) == (1, 60)


def test_server_ending_the_session_closes_the_client(sidecar, pg) -> None:
    """pg_terminate_backend: the server closes its TLS leg, the client sees a clean error."""
    with psycopg.connect(_conninfo(sidecar), autocommit=True) as conn:
        pid = conn.info.backend_pid
        pg.admin_sql(f"select pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    sidecar.wait_idle()
    assert _backend_gone(pg, pid)


def test_client_half_close_ends_the_backend(sidecar, pg) -> None:
    """A client that shuts down its write side: the server's backend goes away too."""
    with psycopg.connect(_conninfo(sidecar) + " application_name=half-closer") as conn:
        pid = conn.info.backend_pid
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_WR)
            sidecar.wait_idle()
        finally:
            sock.close()
    assert _backend_gone(pg, pid)


def _backend_gone(pg, pid: int) -> bool:
    """Wait (inside the server, bounded to 10 s) for a backend to exit; True if it did."""
    pg.admin_sql(
        "do $$ begin for i in 1..200 loop "
        f"exit when not exists (select 1 from pg_stat_activity where pid = {pid}); "
        "perform pg_sleep(0.05); perform pg_stat_clear_snapshot(); end loop; end $$"
    )
    return pg.admin_sql(f"select count(*) from pg_stat_activity where pid = {pid}") == "0"


def test_client_killed_mid_query_leaves_no_backend(sidecar, pg) -> None:
    conn = psycopg.connect(_conninfo(sidecar), autocommit=True)
    pid = conn.info.backend_pid
    # PostgreSQL notices a vanished client during a query only with this check (PG 14+); the
    # sidecar's part is to close the upstream leg at once, which this makes observable.
    conn.execute("set client_connection_check_interval = '100ms'")
    conn.pgconn.send_query(b"select pg_sleep(30)")
    conn.pgconn.flush()
    # An abrupt close (RST) of the client socket, as when the application process dies.
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    conn.pgconn.finish()
    sidecar.wait_idle()
    assert _backend_gone(pg, pid)


def test_stale_unix_socket_is_replaced_and_a_live_one_refused(
    start_sidecar, pg, tmp_path: Path
) -> None:
    from proxy.errors import ListenError

    sock_dir = tmp_path / "run"
    sock_dir.mkdir()
    stale = sock_dir / ".s.PGSQL.5432"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))  # a socket file nobody listens on: what a crash leaves behind
    leftover.close()
    upstream = f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}"
    sc = start_sidecar(upstream, listen=[], unix_sockets=[str(sock_dir)])
    assert sc.run_in_loop(sc.sidecar.addresses) == [str(stale)]
    assert oct(os.stat(stale).st_mode & 0o777) == "0o777"
    # A second sidecar on the same directory must not steal the live socket.
    with pytest.raises(ListenError, match="another server is accepting connections there"):
        start_sidecar(upstream, listen=[], unix_sockets=[str(sock_dir)])
    sc.stop()
    assert not stale.exists()  # removed on shutdown
