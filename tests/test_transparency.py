"""What the application sees through the sidecar is what it would see from the server itself.

Real clients (libpq's psql, psycopg, PHP's PDO pgsql as WordPress-style applications use it)
through the sidecar to the real TLS-only PostgreSQL: SCRAM logins, the extended protocol,
pipelines, bulk COPY and large values with checksums on both ends, asynchronous notifications,
and the replication protocol. ``test_sidecar_e2e.py`` covers the basics (psql, psycopg COPY of
20,000 rows, pg8000, a cancel, one NOTIFY); these go further.

The multi-gigabyte COPY runs only with ``./dev test -m slow``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import client_env

MB = 1024 * 1024


@pytest.fixture
def sidecar(start_sidecar, pg):
    return start_sidecar(f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")


def _app(sidecar, **extra: object) -> str:
    return sidecar.conninfo(user="app", password="app-secret-pw", dbname="app", **extra)


# -- PHP PDO pgsql: the WordPress-style client -------------------------------------------------

PHP_SCRIPT = r"""
$pdo = new PDO(getenv('PDO_DSN'), getenv('PDO_USER'), getenv('PDO_PASSWORD'), [
    PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
    PDO::ATTR_EMULATE_PREPARES => false,
]);
$out = [];
$out['ssl'] = $pdo->query('select ssl from pg_stat_ssl where pid = pg_backend_pid()')
    ->fetchColumn();
$st = $pdo->prepare('select :a::int + :b::int, :s::text');
$st->execute([':a' => 40, ':b' => 2, ':s' => "h\u{e9}llo, w\u{f6}rld"]);
$out['row'] = $st->fetch(PDO::FETCH_NUM);
$pdo->exec('create temporary table wp_posts (id serial primary key, title text, body text)');
$pdo->beginTransaction();
$ins = $pdo->prepare('insert into wp_posts (title, body) values (?, ?)');
for ($i = 0; $i < 500; $i++) {
    $ins->execute(["post $i", str_repeat("lorem ipsum $i ", 20)]);
}
$pdo->commit();
$out['posts'] = $pdo->query('select count(*), sum(length(body)) from wp_posts')
    ->fetch(PDO::FETCH_NUM);
try {
    $pdo->query('select 1/0');
} catch (PDOException $e) {
    $out['error'] = $e->getCode();
}
$out['after_error'] = $pdo->query('select 7')->fetchColumn();
echo json_encode($out), "\n";
"""


@pytest.fixture(scope="session")
def php() -> str:
    found = shutil.which("php")
    if found is None:
        pytest.fail("php not found: install the Debian packages php-cli php-pgsql (./dev does)")
    mods = subprocess.run([found, "-m"], capture_output=True, text=True, check=True).stdout
    if "pdo_pgsql" not in mods.split():
        pytest.fail("PHP has no pdo_pgsql: install the Debian package php-pgsql (./dev does)")
    return found


def _run_php(php: str, sidecar, password: str) -> subprocess.CompletedProcess[str]:
    env = client_env()
    env.update(
        PDO_DSN=f"pgsql:host={sidecar.host};port={sidecar.port};dbname=app;sslmode=disable",
        PDO_USER="app",
        PDO_PASSWORD=password,  # in the environment, never on the command line
    )
    return subprocess.run(
        [php, "-r", PHP_SCRIPT], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_php_pdo_pgsql_scram_login_prepared_statements_and_errors(sidecar, php) -> None:
    out = _run_php(php, sidecar, "app-secret-pw")
    assert out.returncode == 0, out.stderr + out.stdout
    result = json.loads(out.stdout)
    assert result["ssl"] is True  # PDO spoke plaintext to us; the server saw TLS
    assert result["row"] == [42, "héllo, wörld"]
    expected_body = sum(len(f"lorem ipsum {i} " * 20) for i in range(500))
    assert result["posts"] == [500, expected_body]
    assert result["error"] == "22012"  # division_by_zero, the server's SQLSTATE, unchanged
    assert result["after_error"] == 7


def test_php_pdo_wrong_password_shows_the_servers_message(sidecar, php) -> None:
    out = _run_php(php, sidecar, "not-the-password")
    assert out.returncode != 0
    assert 'password authentication failed for user "app"' in out.stderr + out.stdout


# -- psycopg: pipeline mode, server-side prepared statements, parameter status -----------------


def test_psycopg_pipeline_mode_with_an_error_in_the_middle(sidecar) -> None:
    with psycopg.connect(_app(sidecar), autocommit=True) as conn:
        conn.execute("create temporary table p (id int primary key, v text)")
        with conn.pipeline() as pipe:
            cur = conn.cursor()
            cur.executemany("insert into p values (%s, %s)", [(i, f"v{i}") for i in range(1000)])
            results = [conn.execute("select count(*), max(id) from p") for _ in range(3)]
            pipe.sync()
            assert [r.fetchone() for r in results] == [(1000, 999)] * 3
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute("insert into p values (%s, 'dup')", (5,))
            conn.execute("select 1")
        assert conn.execute("select count(*) from p").fetchone() == (1000,)


def test_server_side_prepared_statements(sidecar) -> None:
    with psycopg.connect(_app(sidecar), autocommit=True) as conn:
        query = "select %s::int * 2, %s::text || '!'"
        for i in range(5):
            assert conn.execute(query, (i, f"n{i}"), prepare=True).fetchone() == (2 * i, f"n{i}!")
        prepared = conn.execute(
            "select count(*) from pg_prepared_statements where statement like '%* 2%'"
        ).fetchone()
        assert prepared == (1,)


def test_parameter_status_changes_reach_the_client(sidecar) -> None:
    with psycopg.connect(_app(sidecar), autocommit=True) as conn:
        conn.execute("set application_name = 'changed-through-sidecar'")
        assert conn.info.parameter_status("application_name") == "changed-through-sidecar"
        conn.execute("set timezone = 'Asia/Kathmandu'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Kathmandu"
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("do $$ begin raise notice 'notice via sidecar'; end $$")
        assert notices == ["notice via sidecar"]


# -- large values and bulk COPY, checksummed on both ends -----------------------------------------


def test_large_bytea_round_trip(sidecar) -> None:
    """50 MB in one parameter and back in one row; the server hashes what it stored."""
    payload = hashlib.shake_256(b"sidecar").digest(50 * MB)
    with psycopg.connect(_app(sidecar), autocommit=True) as conn:
        conn.execute("create temporary table blob (b bytea)")
        conn.execute("insert into blob values (%b)", (payload,))
        server_md5, size = conn.execute("select md5(b), length(b) from blob").fetchone()
        assert size == len(payload)
        assert server_md5 == hashlib.md5(payload).hexdigest()  # noqa: S324 - a checksum
        back = conn.execute("select b from blob", binary=True).fetchone()[0]
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def _rows(total_bytes: int) -> Iterator[bytes]:
    """Deterministic COPY text lines (no characters that COPY escapes), ~1 KB each."""
    i = 0
    sent = 0
    while sent < total_bytes:
        line = b"%d\t%s\n" % (i, hashlib.sha256(b"%d" % i).hexdigest().encode() * 15)
        yield line
        sent += len(line)
        i += 1


def _copy_round_trip(sidecar, total_bytes: int) -> None:
    """COPY FROM STDIN a stream, COPY TO STDOUT it back: the same bytes, hashed both ways."""
    sent = hashlib.sha256()
    n_rows = 0
    with psycopg.connect(_app(sidecar), autocommit=True) as conn:
        conn.execute("create unlogged table if not exists copy_rt (id bigint, payload text)")
        conn.execute("truncate copy_rt")
        try:
            with conn.cursor().copy("copy copy_rt from stdin") as copy:
                batch: list[bytes] = []
                for line in _rows(total_bytes):
                    sent.update(line)
                    n_rows += 1
                    batch.append(line)
                    if len(batch) == 256:
                        copy.write(b"".join(batch))
                        batch.clear()
                copy.write(b"".join(batch))
            count, payload_bytes = conn.execute(
                "select count(*), sum(length(payload)) from copy_rt"
            ).fetchone()
            assert count == n_rows
            assert payload_bytes == n_rows * 64 * 15
            received = hashlib.sha256()
            size = 0
            with conn.cursor().copy("copy (select * from copy_rt order by id) to stdout") as copy:
                for chunk in copy:
                    received.update(chunk)
                    size += len(chunk)
            assert size >= total_bytes
            assert received.hexdigest() == sent.hexdigest()
        finally:
            conn.execute("drop table if exists copy_rt")


def test_copy_from_and_to_round_trip_checksums(sidecar) -> None:
    _copy_round_trip(sidecar, 32 * MB)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 3 GB each way; the default 120 s is for the fast suite
def test_multi_gigabyte_copy_round_trip_checksums(sidecar) -> None:
    _copy_round_trip(sidecar, 3 * 1024 * MB)


# -- asynchronous notifications -------------------------------------------------------------------


def test_notifications_many_large_and_only_on_commit(sidecar) -> None:
    with (
        psycopg.connect(_app(sidecar), autocommit=True) as listener,
        psycopg.connect(_app(sidecar)) as sender,
    ):
        listener.execute("listen big")
        payloads = [f"{i}:" + "p" * (7990 - len(str(i))) for i in range(200)]  # max is 7999
        for p in payloads[:100]:
            sender.execute("select pg_notify('big', %s)", (p,))
        # Nothing is delivered before the sender commits.
        listener.execute("select 1")
        assert list(listener.notifies(timeout=0.2)) == []
        sender.commit()
        for p in payloads[100:]:
            sender.execute("select pg_notify('big', %s)", (p,))
        sender.commit()
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=200)]
        assert got == payloads


# -- the replication protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["database", "true"])
def test_replication_connection_identify_system(sidecar, pg, psql, mode: str) -> None:
    """``replication=database`` (logical) and ``true`` (physical) walsender sessions."""
    info = sidecar.conninfo(
        user="admin", password="admin-secret-pw", dbname="postgres", replication=mode
    )
    rc, out, err = psql(info, "IDENTIFY_SYSTEM")
    assert rc == 0, err
    system_id, timeline, _xlogpos, dbname = out.split("|")
    assert system_id == pg.admin_sql("select system_identifier from pg_control_system()")
    assert int(timeline) >= 1
    assert dbname == ("postgres" if mode == "database" else "")


def test_pg_basebackup_streams_through_the_sidecar(sidecar, pg, tmp_path: Path) -> None:
    """A physical base backup with WAL streamed on a second replication connection."""
    target = tmp_path / "backup"
    env = client_env("admin-secret-pw")
    out = subprocess.run(
        [
            str(pg.bindir / "pg_basebackup"),
            "-d",
            sidecar.conninfo(user="admin", dbname="postgres"),
            "-D",
            str(target),
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            "--manifest-checksums=SHA256",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    verify = subprocess.run(
        [str(pg.bindir / "pg_verifybackup"), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr + verify.stdout
    assert "successfully verified" in verify.stdout


# -- what cannot work through any TLS-terminating hop ---------------------------------------------


def test_channel_binding_require_fails_with_a_clear_message(sidecar, psql) -> None:
    """SCRAM channel binding ties the login to the TLS session the *client* sees.

    The client's leg to the sidecar is plaintext, so there is no TLS session to bind to, and
    the sidecar removes SCRAM-SHA-256-PLUS from the server's offer (otherwise libpq aborts:
    "server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection"). A client
    that insists on channel binding therefore refuses to log in; that refusal is channel
    binding doing its job (it exists to detect a hop like this one).
    """
    rc, _out, err = psql(_app(sidecar, channel_binding="require"), "select 1")
    assert rc != 0
    assert "channel binding" in err, err
    rc, out, err = psql(_app(sidecar, channel_binding="prefer"), "select 1")
    assert (rc, out) == (0, "1"), err


def test_sql_identifiers_and_unicode_pass_unchanged(sidecar) -> None:
    """Multi-byte text in names and values: the relay never reinterprets bytes."""
    with psycopg.connect(_app(sidecar), autocommit=True) as conn:
        name = "tablé_数据_🐘"
        conn.execute(sql.SQL("create temporary table {} (v text)").format(sql.Identifier(name)))
        value = "ünïcødé 数据 🐘 \x01\t"
        conn.execute(sql.SQL("insert into {} values (%s)").format(sql.Identifier(name)), (value,))
        got = conn.execute(sql.SQL("select v from {}").format(sql.Identifier(name))).fetchone()
        assert got == (value,)
