"""Load and backpressure: many sessions at once, connection storms, and bounded memory.

Numbers the README can quote: how many sessions one sidecar holds (250 in the default suite
against the shared 300-connection test server, 1,000 with ``-m slow`` against a server started
with ``max_connections=1100``), a ``pgbench -C`` storm with zero failures, and the sidecar
process's RSS while a client refuses to read a 1 GB result or floods COPY data at a server that
has stopped reading.
"""

from __future__ import annotations

import concurrent.futures
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.cluster import TlsOnlyCluster
from proxy.demo.pki import CertificateAuthority
from tests.conftest import APP, RunningSidecar, StartSidecar, client_env
from tests.fake_servers import (
    AUTH_OK,
    READY_IDLE,
    Conn,
    FakeUpstream,
    SidecarProcess,
    read_startup,
    serve_one_query_session,
    server_context,
)

# What the sidecar process may grow by, above its idle RSS, while 1 GB is stuck behind it. The
# relay holds at most the transports' write buffers (asyncio's high-water mark, 64 KiB, plus
# what OpenSSL and the kernel keep); 16 MiB leaves room for allocator noise, and is 1.6 % of the
# data in flight.
RSS_GROWTH_BOUND = 16 * 1024 * 1024
GIB = 1024 * 1024 * 1024
WAIT = 60.0


def _config(tmp_path: Path, upstream: str, max_connections: int) -> str:
    path = tmp_path / "load.yaml"
    path.write_text(
        f"limits: {{max_connections: {max_connections}}}\n"
        "routes:\n"
        "  - listen: ['127.0.0.1:0']\n"
        f"    upstream: '{upstream}'\n"
    )
    return str(path)


def _hold_sessions(sidecar: RunningSidecar, pg: TlsOnlyCluster, count: int) -> None:
    """Open ``count`` sessions, keep all of them open, use each, and check the server saw them."""
    info = sidecar.conninfo(password=APP.password, application_name="load-held")

    def connect(_: int) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(info, autocommit=True)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        conns = list(pool.map(connect, range(count)))
    try:
        assert sidecar.run_in_loop(lambda: len(sidecar.sidecar.sessions)) == count  # type: ignore[union-attr]
        held = pg.admin_sql(
            "select count(*), count(*) filter (where s.ssl) from pg_stat_activity a "
            "join pg_stat_ssl s using (pid) where application_name = 'load-held'"
        )
        assert held == f"{count}|{count}"  # every one is its own TLS backend

        def use(pair: tuple[int, psycopg.Connection[tuple[object, ...]]]) -> tuple[object, ...]:
            index, conn = pair
            row = conn.execute("select %s::int, pg_backend_pid()", (index,)).fetchone()
            assert row is not None
            return row

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            rows = list(pool.map(use, enumerate(conns)))
        assert [r[0] for r in rows] == list(range(count))  # no answer reached the wrong client
        assert len({r[1] for r in rows}) == count
    finally:
        for conn in conns:
            conn.close()
    sidecar.wait_idle()


def test_250_concurrent_sessions_held_and_used(
    start_sidecar: StartSidecar, pg: TlsOnlyCluster, tmp_path: Path
) -> None:
    upstream = f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}"
    sc = start_sidecar(None, config_path=_config(tmp_path, upstream, 400))
    _hold_sessions(sc, pg, 250)


@pytest.fixture
def big_cluster() -> Iterator[TlsOnlyCluster]:
    """A cluster of our own with max_connections raised (the shared one is fixed at 300).

    ``TlsOnlyCluster`` rewrites its settings file on each start and takes no max_connections
    parameter, so the value goes in with ALTER SYSTEM (postgresql.auto.conf wins) and a restart.
    """
    ca = CertificateAuthority.create("load-test root")
    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-load-"))
    cluster = TlsOnlyCluster(base, ca, ca.issue_server())
    try:
        cluster.start()
        cluster.admin_sql("alter system set max_connections = 1100")
        cluster.stop()
        cluster.start()
        assert cluster.admin_sql("show max_connections") == "1100"
        cluster.create_role(APP.user, APP.password)
        cluster.create_database(APP.dbname, owner=APP.user)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_1000_concurrent_sessions_held_and_used(
    start_sidecar: StartSidecar, big_cluster: TlsOnlyCluster, tmp_path: Path
) -> None:
    upstream = f"host=localhost port={big_cluster.port} sslrootcert={big_cluster.ca_der_path}"
    sc = start_sidecar(None, config_path=_config(tmp_path, upstream, 1050))
    _hold_sessions(sc, big_cluster, 1000)


def test_pgbench_connection_storm_has_no_errors(
    start_sidecar: StartSidecar, pg: TlsOnlyCluster, tmp_path: Path
) -> None:
    """``pgbench -C``: a new connection (SCRAM over TLS upstream) for every transaction."""
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        pytest.fail("pgbench not found: install the Debian package postgresql-client")
    sc = start_sidecar(f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")
    script = tmp_path / "storm.sql"
    script.write_text("select 1;\n")
    clients, per_client = 8, 60
    out = subprocess.run(
        [
            pgbench,
            "-n",
            "-C",
            "-c",
            str(clients),
            "-j",
            "2",
            "-t",
            str(per_client),
            "-f",
            str(script),
            "-h",
            sc.host,
            "-p",
            str(sc.port),
            "-U",
            APP.user,
            APP.dbname,
        ],
        capture_output=True,
        text=True,
        env={**client_env(APP.password), "PGSSLMODE": "disable"},
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    total = clients * per_client
    assert f"number of transactions actually processed: {total}/{total}" in out.stdout, out.stdout
    assert "number of failed transactions: 0 " in out.stdout, out.stdout
    sc.wait_idle()
    stats = sc.run_in_loop(lambda: dict(sc.sidecar.routes[0].stats.connections))  # type: ignore[union-attr]
    assert stats.get("ok", 0) >= total
    assert sum(v for k, v in stats.items() if k != "ok") == 0, stats


# -- RSS of a sidecar process under stalled peers ---------------------------------------------


def _backend_waits_on_client_write(pg: TlsOnlyCluster, application_name: str) -> bool:
    """Bounded wait (inside the server) until the backend is blocked sending to its client."""
    pg.admin_sql(
        "do $$ begin for i in 1..600 loop "
        "exit when exists (select 1 from pg_stat_activity where "
        f"application_name = '{application_name}' and wait_event = 'ClientWrite'); "
        "perform pg_sleep(0.05); perform pg_stat_clear_snapshot(); end loop; end $$"
    )
    return (
        pg.admin_sql(
            "select count(*) from pg_stat_activity where "
            f"application_name = '{application_name}' and wait_event = 'ClientWrite'"
        )
        == "1"
    )


def test_rss_bounded_while_client_stops_reading_1gb_result(
    pg: TlsOnlyCluster, tmp_path: Path
) -> None:
    sidecar = SidecarProcess(
        f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}", tmp_path / "sidecar.log"
    )
    try:
        info = (
            f"host={sidecar.host} port={sidecar.port} user={APP.user} dbname={APP.dbname} "
            f"password={APP.password} sslmode=disable application_name=rss-reader"
        )
        with psycopg.connect(info) as warm:  # the first session's allocations are baseline
            warm.execute("select repeat('x', 1000000)").fetchone()
        baseline = sidecar.status("VmRSS")
        conn = psycopg.connect(info)
        try:
            # 1,000 rows of 1 MB, never read. The server ends up blocked in ClientWrite only
            # if every buffer on the way, the sidecar's included, has stopped growing.
            conn.pgconn.send_query(b"select repeat('x', 1000000) from generate_series(1, 1000)")
            conn.pgconn.flush()
            assert _backend_waits_on_client_write(pg, "rss-reader")
            peak = sidecar.status("VmHWM")
            assert sidecar.status("VmRSS") - baseline < RSS_GROWTH_BOUND
            assert peak - baseline < RSS_GROWTH_BOUND, (peak - baseline) // 1024
        finally:
            conn.pgconn.finish()
    finally:
        assert sidecar.stop() == 0, sidecar.log_path.read_text()


def _send_until_stalled(sock: socket.socket, limit: int, quiet: float = 2.0) -> int:
    """Send CopyData until the socket accepts nothing for ``quiet`` s; return bytes sent.

    A stall is the absence of progress, so a quiet period is the only way to see one; it only
    ends the test's pushing, it synchronises nothing.
    """
    chunk = b"d" + struct.pack("!I", 4 + 65536) + b"x" * 65536
    sock.setblocking(False)
    sent = 0
    pending = memoryview(chunk)
    while sent < limit:
        _r, writable, _x = select.select([], [sock], [], quiet)
        if not writable:
            break
        try:
            n = sock.send(pending)
        except BlockingIOError:
            continue
        sent += n
        pending = pending[n:]
        if not pending:
            pending = memoryview(chunk)
    return sent


def test_rss_bounded_during_copy_flood_against_stalled_server(
    certs: dict[str, Path], tmp_path: Path
) -> None:
    release = threading.Event()
    ctx = server_context(certs["good.crt"], certs["good.key"])

    def stalled_server(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        tls = conn.start_tls(ctx)
        read_startup(tls)
        tls.sendall(AUTH_OK + READY_IDLE)
        release.wait(WAIT)  # then never reads again

    with FakeUpstream(stalled_server) as fake:
        sidecar = SidecarProcess(
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}",
            tmp_path / "sidecar.log",
        )
        try:
            baseline = sidecar.status("VmRSS")
            client = socket.create_connection((sidecar.host, sidecar.port), timeout=WAIT)
            try:
                body = b"user\0app\0database\0app\0\0"
                client.sendall(struct.pack("!II", 8 + len(body), 196608) + body)
                got = b""
                while not got.endswith(READY_IDLE):
                    got += client.recv(4096)
                sent = _send_until_stalled(client, GIB)
                assert sent < GIB // 4, f"{sent} bytes accepted: the sidecar never pushed back"
                peak = sidecar.status("VmHWM")
                assert peak - baseline < RSS_GROWTH_BOUND, (peak - baseline) // 1024
            finally:
                release.set()
                client.close()
        finally:
            assert sidecar.stop() == 0, sidecar.log_path.read_text()


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit_key", ["global", "route"])
def test_over_max_connections_gets_53300_and_opens_no_upstream(
    start_sidecar: StartSidecar, certs: dict[str, Path], tmp_path: Path, limit_key: str
) -> None:
    ctx = server_context(certs["good.crt"], certs["good.key"])

    def server(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        serve_one_query_session(conn.start_tls(ctx), conn, value="held")

    with FakeUpstream(server) as fake:
        upstream = f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}"
        cfg = tmp_path / "limit.yaml"
        limits = "limits: {max_connections: 2}\n" if limit_key == "global" else ""
        route_limit = "    max_connections: 2\n" if limit_key == "route" else ""
        cfg.write_text(
            limits + "routes:\n  - listen: ['127.0.0.1:0']\n"
            f"    upstream: '{upstream}'\n" + route_limit
        )
        sc = start_sidecar(None, config_path=str(cfg))
        held = [psycopg.connect(sc.conninfo(user="u", dbname="d")) for _ in range(2)]
        try:
            with socket.create_connection((sc.host, sc.port), timeout=20) as s:
                body = b"user\0u\0database\0d\0\0"
                s.sendall(struct.pack("!II", 8 + len(body), 196608) + body)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            assert answer[:1] == b"E"
            assert b"C53300\0" in answer
            assert b"too many clients" in answer
            assert len(fake.connections) == 2  # the refused client never reached the server
        finally:
            for conn in held:
                conn.close()
        sc.wait_idle()
        with psycopg.connect(sc.conninfo(user="u", dbname="d")) as conn:
            assert conn.execute("select 1").fetchone() == ("held",)


@pytest.fixture(autouse=True)
def _no_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PG"):
            monkeypatch.delenv(key, raising=False)
