"""Faults around a running sidecar: the server restarts, disappears or cannot be resolved, the
client dies or half-closes, and thousands of sessions come and go.

After each, the sidecar must have told the client something clear within a bounded time and
must be back where it started: no session, task, file descriptor or memory left behind.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import proxy.demo.cluster as cluster_module
from proxy.demo.cluster import TlsOnlyCluster
from proxy.demo.pki import CertificateAuthority
from tests.conftest import APP, RunningSidecar, StartSidecar, client_env
from tests.fake_servers import (
    AUTH_OK,
    READY_IDLE,
    SSL_REQUEST,
    Conn,
    FakeUpstream,
    msg,
    read_message,
    read_startup,
    server_context,
)

PROMPT = 10.0  # seconds within which a client must hear about a fault


def _startup_packet(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), 196608) + body


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _sqlstate(error: bytes) -> str:
    assert error[:1] == b"E", error
    return next(f[1:].decode() for f in error[5:].split(b"\0") if f[:1] == b"C")


# -- the upstream restarts ----------------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[TlsOnlyCluster]:
    """A cluster this test may stop and start (the shared ``pg`` must stay up for the others)."""
    ca = CertificateAuthority.create("faults test root")
    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-faults-"))
    cluster = TlsOnlyCluster(base, ca, ca.issue_server())
    try:
        cluster.start()
        cluster.create_role(APP.user, APP.password)
        cluster.create_database(APP.dbname, owner=APP.user)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_upstream_restart_mid_session(
    start_sidecar: StartSidecar, own_cluster: TlsOnlyCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = start_sidecar(
        f"host=localhost port={own_cluster.port} sslrootcert={own_cluster.ca_der_path}"
    )
    info = sc.conninfo(password=APP.password)
    idle = psycopg.connect(info, autocommit=True)
    busy = psycopg.connect(info, autocommit=True)
    try:
        assert idle.execute("select 1").fetchone() == (1,)
        busy.pgconn.send_query(b"select pg_sleep(60)")
        busy.pgconn.flush()
        t0 = time.monotonic()
        own_cluster.stop()  # fast shutdown: every backend is terminated
        # The query in flight ends with the server's own FATAL, relayed at once.
        messages: list[str] = []
        while busy.pgconn.is_busy():
            _wait_readable(busy.pgconn.socket, PROMPT)
            try:
                busy.pgconn.consume_input()
            except psycopg.OperationalError as exc:
                messages.append(str(exc))
                break
        result = busy.pgconn.get_result()
        if result is not None:
            messages.append(result.error_message.decode())
        messages.append(busy.pgconn.error_message.decode())
        assert any("terminating connection" in m for m in messages), messages
        assert time.monotonic() - t0 < PROMPT
        with pytest.raises(psycopg.OperationalError):
            idle.execute("select 1")
        sc.wait_idle(PROMPT)
        # While it is down, new sessions are refused at once with the reason.
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
            psycopg.connect(info).close()
        assert time.monotonic() - t0 < PROMPT
        # The server comes back on the same port (the class would pick a new one).
        port = own_cluster.port
        monkeypatch.setattr(cluster_module, "_free_port", lambda _hosts: port)
        own_cluster.start()
        with psycopg.connect(info) as again:
            assert again.execute("select 2").fetchone() == (2,)
    finally:
        idle.close()
        busy.close()


def _wait_readable(fd: int, timeout: float) -> None:
    readable, _w, _x = select.select([fd], [], [], timeout)
    if not readable:
        raise AssertionError(f"nothing arrived within {timeout} s")


def test_upstream_port_closed_and_unknown_host_fail_fast(start_sidecar: StartSidecar) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    for upstream, text in [
        (f"host=127.0.0.1 port={closed_port} sslmode=require", b"Connection refused"),
        ("host=no-such-host.invalid sslmode=require", b"could not translate host name"),
    ]:
        sc = start_sidecar(upstream)
        t0 = time.monotonic()
        with socket.create_connection((sc.host, sc.port), timeout=PROMPT) as c:
            c.sendall(_startup_packet(user="u", database="d"))
            answer = _read_all(c)
        assert time.monotonic() - t0 < PROMPT
        assert _sqlstate(answer) == "08001"
        assert text in answer
        sc.wait_idle()
        assert sc.run_in_loop(lambda sc=sc: sc.sidecar.limiter.active) == 0


# -- the client dies or half-closes ---------------------------------------------------------


def test_killed_psql_leaves_no_backend(
    start_sidecar: StartSidecar, pg: TlsOnlyCluster, psql_path: Path
) -> None:
    sc = start_sidecar(f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")
    env = client_env(APP.password)
    # PostgreSQL notices a vanished client during a query only with this check (PG 14+).
    env["PGOPTIONS"] = "-c client_connection_check_interval=100ms"
    info = sc.conninfo(application_name="killed-psql")
    proc = subprocess.Popen(
        [str(psql_path), "-X", "-c", "select pg_sleep(60)", "-d", info],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pg.admin_sql(
            "do $$ begin for i in 1..400 loop exit when exists (select 1 from pg_stat_activity "
            "where application_name = 'killed-psql' and wait_event = 'PgSleep'); "
            "perform pg_sleep(0.05); perform pg_stat_clear_snapshot(); end loop; end $$"
        )
        pid = pg.admin_sql(
            "select pid from pg_stat_activity where application_name = 'killed-psql'"
        )
        assert pid.isdigit(), pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(PROMPT)
        sc.wait_idle(PROMPT)
        pg.admin_sql(
            "do $$ begin for i in 1..200 loop "
            f"exit when not exists (select 1 from pg_stat_activity where pid = {pid}); "
            "perform pg_sleep(0.05); perform pg_stat_clear_snapshot(); end loop; end $$"
        )
        assert pg.admin_sql(f"select count(*) from pg_stat_activity where pid = {pid}") == "0"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ANSWER = msg(b"C", b"SELECT 0\0") + READY_IDLE


def _half_close_server(ctx: ssl.SSLContext, *, server_closes: bool) -> Callable[[Conn], None]:
    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        tls = conn.start_tls(ctx)
        read_startup(tls)
        tls.sendall(AUTH_OK + READY_IDLE)
        kind, body = read_message(tls)
        conn.decrypted += kind + body
        tls.sendall(ANSWER)
        if server_closes:
            # The server ends its side cleanly (close_notify, FIN) but still reads.
            raw = tls.unwrap()
            raw.shutdown(socket.SHUT_WR)
            conn.tls = None
            conn.sock = raw
            conn.drain_plaintext()
        else:
            conn.drain_tls()

    return script


@pytest.mark.parametrize(
    "closer",
    [
        # The server ends its side (close_notify, FIN): the answer, then EOF, reach the client.
        pytest.param("server", id="server_half_close_reaches_client_after_the_data"),
        # The client shuts its write side after the query: the answer still reaches it.
        pytest.param("client", id="client_half_close_still_gets_the_answer"),
    ],
)
def test_half_close(start_sidecar: StartSidecar, certs: dict[str, Path], closer: str) -> None:
    ctx = server_context(certs["good.crt"], certs["good.key"])
    with FakeUpstream(_half_close_server(ctx, server_closes=closer == "server")) as fake:
        sc = start_sidecar(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        with socket.create_connection((sc.host, sc.port), timeout=PROMPT) as c:
            c.sendall(_startup_packet(user="u", database="d"))
            got = b""
            while not got.endswith(READY_IDLE):
                chunk = c.recv(4096)
                assert chunk, f"EOF before ReadyForQuery: {got!r}"
                got += chunk
            c.sendall(msg(b"Q", b"select\0"))
            if closer == "client":
                c.shutdown(socket.SHUT_WR)
            rest = _read_all(c)
        sc.wait_idle(PROMPT)
        fake.wait_done()
    assert bytes(fake.connections[0].decrypted).endswith(b"Qselect\0")  # the query got there
    assert rest == ANSWER


# -- many cycles over success and failure paths ------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _tasks(sc: RunningSidecar) -> int:
    return int(sc.run_in_loop(lambda: len(asyncio.all_tasks())))


def _cycles(sc: RunningSidecar, dead: tuple[str, int], password: str, rounds: int) -> None:
    """``rounds`` x 4 sessions: a full login and query, a protocol violation, a client gone in
    startup, and an upstream that refuses TCP."""
    info = sc.conninfo(password=password)
    for _ in range(rounds):
        with psycopg.connect(info) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        with socket.create_connection((sc.host, sc.port), timeout=PROMPT) as c:
            c.sendall(struct.pack("!I", 4) + b"\0\0\0\0")
            assert _sqlstate(_read_all(c)) == "08P01"
        with socket.create_connection((sc.host, sc.port), timeout=PROMPT) as c:
            c.sendall(SSL_REQUEST)
            assert c.recv(1) == b"N"
        with socket.create_connection(dead, timeout=PROMPT) as c:
            c.sendall(_startup_packet(user="u", database="d"))
            assert _sqlstate(_read_all(c)) == "08001"


def _run_cycles(
    start_sidecar: StartSidecar, pg: TlsOnlyCluster, tmp_path: Path, rounds: int
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    cfg = tmp_path / "cycles.yaml"
    cfg.write_text(
        "routes:\n"
        "  - name: live\n    listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=localhost port={pg.port} sslrootcert={pg.ca_der_path}'\n"
        "  - name: dead\n    listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=127.0.0.1 port={closed_port} sslmode=require'\n"
    )
    sc = start_sidecar(None, config_path=str(cfg), listen=[])
    dead = sc.run_in_loop(lambda: sc.sidecar.addresses("dead"))[0]  # type: ignore[union-attr]
    _cycles(sc, dead, APP.password, 5)  # warm-up: lazily built things count as baseline
    sc.wait_idle()
    fds, tasks, rss = _open_fds(), _tasks(sc), _rss()
    _cycles(sc, dead, APP.password, rounds)
    sc.wait_idle()
    assert sc.run_in_loop(lambda: (len(sc.sidecar.sessions), sc.sidecar.limiter.active)) == (0, 0)  # type: ignore[union-attr]
    assert _tasks(sc) == tasks
    assert _open_fds() <= fds + 2
    assert _rss() - rss < 32 * 1024 * 1024, (_rss() - rss) // 1024


def test_1000_connect_disconnect_cycles_leave_nothing_behind(
    start_sidecar: StartSidecar, pg: TlsOnlyCluster, tmp_path: Path
) -> None:
    _run_cycles(start_sidecar, pg, tmp_path, 250)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_10000_connect_disconnect_cycles_leave_nothing_behind(
    start_sidecar: StartSidecar, pg: TlsOnlyCluster, tmp_path: Path
) -> None:
    _run_cycles(start_sidecar, pg, tmp_path, 2500)
