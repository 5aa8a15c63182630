"""The warm TLS pool: configuration, hits against the real server, and what it must never do.

The properties that matter to a DBA are tested against real sockets: a pooled connection never
carries a byte of its own before the client's StartupMessage, one the server closed (or wrote
to) is never handed out, an ageing one is replaced, and a reload throws the pool away. Waits are
on the pool's own change events (``WarmPool.changed``), bounded by a timeout, never sleeps.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.metrics import RouteStats
from proxy.pool import WarmPool
from proxy.route import ConnectionLimiter, RouteRuntime
from proxy.settings import PoolSettings
from proxy.tls import build_client_context
from proxy.upstream import UpstreamConnection
from tests.fake_servers import (
    SSL_REQUEST,
    Conn,
    FakeUpstream,
    serve_one_query_session,
    server_context,
)

WAIT = 20.0  # upper bound for every wait on the pool; the events normally come in milliseconds
POOL_HITS = "pg_tls_sidecar_pool_connections_total"
POOL_IDLE = "pg_tls_sidecar_pool_idle_connections"


# -- configuration ------------------------------------------------------------------------------


def _config(path: Path, upstream: object, pool: object | None = None) -> str:
    route: dict[str, object] = {"name": "main", "listen": "127.0.0.1:0", "upstream": upstream}
    if pool is not None:
        route["pool"] = pool
    path.write_text(yaml.safe_dump({"routes": [route]}))
    return str(path)


def _load(path: str) -> PoolSettings:
    settings = load_settings(config_path=path, admin_listen="off", environ={})
    return settings.routes[0].pool


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        (None, PoolSettings(size=0, max_age=30.0)),
        ({"size": 4}, PoolSettings(size=4, max_age=30.0)),
        ({"size": 0, "max_age": 5}, PoolSettings(size=0, max_age=5.0)),
        ({"size": "64", "max_age": 59.5}, PoolSettings(size=64, max_age=59.5)),
        ({"size": 1, "max_age": 0.5}, PoolSettings(size=1, max_age=0.5)),
    ],
    ids=["default-off", "size-only", "off-with-age", "largest", "fraction"],
)
def test_pool_settings_accepted(tmp_path: Path, pool: object, expected: PoolSettings) -> None:
    assert _load(_config(tmp_path / "s.yaml", "host=db.example.com", pool)) == expected
    assert expected.enabled is (expected.size > 0)


@pytest.mark.parametrize(
    ("pool", "key", "words"),
    [
        ({"size": 65}, "routes[0].pool.size", "out of range 0..64"),
        ({"size": -1}, "routes[0].pool.size", "out of range 0..64"),
        ({"size": True}, "routes[0].pool.size", "must be an integer"),
        ({"max_age": 60}, "routes[0].pool.max_age", "authentication_timeout"),
        ({"max_age": 600}, "routes[0].pool.max_age", "below 60 s"),
        ({"max_age": 0}, "routes[0].pool.max_age", "positive"),
        ({"max_age": "soon"}, "routes[0].pool.max_age", "not a number"),
        ({"sizes": 4}, "routes[0].pool.sizes", "did you mean size"),
        ([4], "routes[0].pool", "must be a mapping"),
    ],
    ids=[
        "size-too-big",
        "size-negative",
        "size-bool",
        "age-at-timeout",
        "age-above",
        "age-zero",
        "age-text",
        "typo",
        "list",
    ],
)
def test_pool_settings_rejected(tmp_path: Path, pool: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(_config(tmp_path / "s.yaml", "host=db.example.com", pool))
    assert info.value.key == key
    assert words in str(info.value)


# -- helpers --------------------------------------------------------------------------------------


def _pool_of(sc) -> WarmPool:
    pool = sc.sidecar.routes[0].pool
    assert pool is not None, "the route has no pool"
    return pool


def _wait_for(sc, pool: WarmPool, condition: Callable[[], bool]) -> None:
    """Block until ``condition`` (evaluated on the sidecar's loop) holds, woken by pool events."""

    async def wait() -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                await pool.changed()

    sc.run_coroutine(wait)


def _sample(sc, name: str, **labels: str) -> float:
    registry = sc.sidecar.metrics.registry
    value = sc.run_in_loop(lambda: registry.get_sample_value(name, {"listener": "main", **labels}))
    return float(value or 0.0)


def _serve_sessions(certs: dict[str, Path]) -> Callable[[Conn], None]:
    """A fake upstream that answers S, completes TLS and then serves a trust-auth session."""
    context = server_context(certs["good.crt"], certs["good.key"])

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        tls = conn.start_tls(context)
        serve_one_query_session(tls, conn, value="pooled")

    return script


def _fake_upstream(certs: dict[str, Path], port: int) -> dict[str, object]:
    return {"host": "localhost", "port": port, "sslrootcert": str(certs["ca.cer"])}


# -- against the real TLS-only server -------------------------------------------------------------


def test_sessions_and_cancels_use_warm_connections(
    start_sidecar, pg, pg_upstream, app_account, tmp_path: Path
) -> None:
    path = _config(tmp_path / "s.yaml", pg_upstream, {"size": 2, "max_age": 30})
    sc = start_sidecar(config_path=path)
    pool = _pool_of(sc)
    _wait_for(sc, pool, lambda: pool.idle == 2)
    assert _sample(sc, POOL_IDLE) == 2

    with psycopg.connect(sc.conninfo(password=app_account.password)) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)
        assert conn.info.backend_pid > 0
    assert _sample(sc, POOL_HITS, result="hit") == 1
    assert _sample(sc, POOL_HITS, result="miss") == 0

    # A cancel request goes out on a warm connection too, and still cancels.
    _wait_for(sc, pool, lambda: pool.idle == 2)
    hits = _sample(sc, POOL_HITS, result="hit")
    with psycopg.connect(sc.conninfo(password=app_account.password)) as conn:
        pid = conn.info.backend_pid
        errors: list[BaseException] = []

        def cancel_when_sleeping() -> None:
            try:
                with psycopg.connect(sc.conninfo(password=app_account.password)) as watcher:
                    for _ in range(10_000):  # bounded; each query is a round trip
                        row = watcher.execute(
                            "select wait_event from pg_stat_activity where pid = %s", (pid,)
                        ).fetchone()
                        if row and row[0] == "PgSleep":
                            break
                    _wait_for(sc, pool, lambda: pool.idle >= 1)
                    conn.cancel_safe(timeout=20)  # not cancel(): PQcancel holds the GIL
            except BaseException as exc:
                errors.append(exc)

        helper = threading.Thread(target=cancel_when_sleeping)
        helper.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(60)")
        helper.join()
        assert not errors, errors
    # This session, the watcher and the cancel request each took a warm connection.
    assert _sample(sc, POOL_HITS, result="hit") == hits + 3


def test_reload_discards_the_pool_but_not_open_sessions(
    start_sidecar, pg, pg_upstream, app_account, tmp_path: Path
) -> None:
    path = _config(tmp_path / "s.yaml", pg_upstream, {"size": 2})
    sc = start_sidecar(config_path=path)
    old = _pool_of(sc)
    with psycopg.connect(sc.conninfo(password=app_account.password)) as conn:
        # The session may have taken a warm connection; wait for the refill, then reload.
        _wait_for(sc, old, lambda: old.idle == 2)
        warm = sc.run_in_loop(old.idle_connections)
        ok, summary = sc.run_coroutine(sc.sidecar.reload)
        assert ok, summary
        new = _pool_of(sc)
        assert new is not old
        assert sc.run_in_loop(lambda: old.idle) == 0
        # Every warm connection of the old pool is closed (or closing), none was handed out.
        for upstream in warm:
            assert sc.run_in_loop(lambda u=upstream: u.endpoint.transport.is_closing())
        _wait_for(sc, new, lambda: new.idle == 2)
        # The session opened before the reload goes on.
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
    assert not {id(c) for c in warm} & {id(c) for c in sc.run_in_loop(new.idle_connections)}


# -- against fake upstreams that record every byte ------------------------------------------------


def test_nothing_is_sent_on_a_pooled_connection_before_the_startup_message(
    start_sidecar, certs, tmp_path: Path
) -> None:
    with FakeUpstream(_serve_sessions(certs)) as fake:
        path = _config(tmp_path / "s.yaml", _fake_upstream(certs, fake.port), {"size": 2})
        sc = start_sidecar(config_path=path)
        pool = _pool_of(sc)
        _wait_for(sc, pool, lambda: pool.idle == 2)
        with psycopg.connect(sc.conninfo(user="pooler", dbname="db1")) as conn:
            assert conn.execute("select 1").fetchone() == ("pooled",)
        assert _sample(sc, POOL_HITS, result="hit") == 1
        _wait_for(sc, pool, lambda: pool.idle == 2)
        sc.stop()
        fake.wait_done()
    assert len(fake.connections) == 3
    for conn in fake.connections:
        # Before TLS: only our SSLRequest, as for any session.
        assert bytes(conn.plaintext) == SSL_REQUEST
    used = [c for c in fake.connections if c.decrypted]
    idle = [c for c in fake.connections if not c.decrypted]
    # One connection carried a session, and its first byte inside TLS is the StartupMessage.
    assert len(used) == 1 and len(idle) == 2
    data = bytes(used[0].decrypted)
    length = int.from_bytes(data[:4], "big")
    first = data[:length]
    assert first[4:8] == b"\x00\x03\x00\x00"  # protocol 3.0: a StartupMessage, nothing before it
    assert b"user\0pooler\0" in first and b"database\0db1\0" in first


def _race_take_after_close(
    make_lost: Callable[[Conn], None],
    seen: Callable[[UpstreamConnection], Awaitable[object]],
    certs: dict[str, Path],
) -> None:
    """Fill a one-connection pool, let the server ``make_lost`` it, call ``take()`` at once.

    ``seen`` waits for the server's doing to reach the endpoint, and ``take()`` runs right
    after, before the pool's own maintenance has looked (its wake-up is queued behind the
    test's), so it is ``take()``'s own check that must refuse the connection.
    """
    context = server_context(certs["good.crt"], certs["good.key"])
    lost = threading.Event()

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        conn.start_tls(context)
        if not lost.is_set():
            lost.set()
            make_lost(conn)
            return
        conn.drain_tls()

    async def main() -> tuple[object, int, bool]:
        with FakeUpstream(script) as fake:
            settings = load_settings(
                upstream=f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}",
                listen=["127.0.0.1:0"],
                admin_listen="off",
                config_path=None,
                environ={},
            )
            route_settings = settings.routes[0]
            stats = RouteStats()
            route = RouteRuntime(
                route_settings,
                build_client_context(route_settings.upstream),
                settings,
                ConnectionLimiter(None),
                ConnectionLimiter(None),
                stats,
            )
            pool = WarmPool("main", PoolSettings(size=1, max_age=30), route.dial, stats)
            pool.start()
            try:
                async with asyncio.timeout(WAIT):
                    while pool.idle < 1:
                        await pool.changed()
                    first = pool.idle_connections()[0]
                    await seen(first)
                taken = pool.take()
                refused = taken is not first
                if taken is not None:
                    taken.endpoint.close()
                return taken, stats.pool_connections["miss"], refused
            finally:
                pool.close()
                await pool.wait_closed()

    taken, misses, refused = asyncio.run(main())
    assert refused, "a connection the server had closed or written to was handed out"
    assert taken is None and misses == 1


def test_a_connection_the_server_closed_is_never_handed_out(certs) -> None:
    def close_idle(conn: Conn) -> None:
        assert conn.tls is not None
        conn.tls.close()  # like a backend whose authentication_timeout passed

    _race_take_after_close(close_idle, lambda c: c.endpoint.closed, certs)


def test_a_connection_the_server_wrote_to_is_never_handed_out(certs) -> None:
    def speak_first(conn: Conn) -> None:
        assert conn.tls is not None
        conn.tls.sendall(b"E\x00\x00\x00\x04")  # a server must not speak before our startup
        conn.drain_tls()

    _race_take_after_close(speak_first, lambda c: c.endpoint.read(), certs)


def test_ageing_connections_are_replaced_before_max_age(
    start_sidecar, certs, tmp_path: Path
) -> None:
    context = server_context(certs["good.crt"], certs["good.key"])

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        conn.start_tls(context)
        conn.drain_tls()

    with FakeUpstream(script) as fake:
        upstream = _fake_upstream(certs, fake.port)
        path = _config(tmp_path / "s.yaml", upstream, {"size": 1, "max_age": 1.5})
        sc = start_sidecar(config_path=path)
        pool = _pool_of(sc)
        _wait_for(sc, pool, lambda: pool.idle == 1)
        first = sc.run_in_loop(lambda: pool.idle_connections()[0])
        born = sc.run_in_loop(lambda: pool._idle[0].born)
        # Replaced: a new connection is idle and the first one is closed by the pool.
        _wait_for(
            sc,
            pool,
            lambda: (
                pool.idle == 1
                and pool.idle_connections()[0] is not first
                and first.endpoint.transport.is_closing()
            ),
        )
        replaced_at = sc.run_in_loop(lambda: pool._idle[0].born)
        assert replaced_at - born < 1.5  # the replacement was dialled before max_age
        sc.stop()
        fake.wait_done()
    assert len(fake.connections) >= 2
    assert not any(c.decrypted for c in fake.connections)  # none of them carried anything


def test_pool_refills_after_the_upstream_fails(start_sidecar, certs, tmp_path: Path) -> None:
    """A failing upstream is retried with back-off; errors are counted, never handed out."""
    context = server_context(certs["wrong_host.crt"], certs["wrong_host.key"])

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        try:
            conn.start_tls(context)
        except ssl.SSLError:
            return
        conn.drain_tls()

    with FakeUpstream(script) as fake:
        path = _config(tmp_path / "s.yaml", _fake_upstream(certs, fake.port), {"size": 2})
        sc = start_sidecar(config_path=path)
        pool = _pool_of(sc)
        stats = sc.sidecar.routes[0].stats
        _wait_for(sc, pool, lambda: stats.upstream_errors["tls_verify_failed"] >= 2)
        assert sc.run_in_loop(lambda: pool.idle) == 0
        # Back-off: one attempt at a time, so far fewer connections than a tight loop makes.
        assert len(fake.connections) <= 4
        sc.stop()
