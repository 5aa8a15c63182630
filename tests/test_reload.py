"""Configuration reload: new sessions get the new configuration, open ones are untouched,
and a bad configuration is rejected whole while the old one stays in force."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pki import CertificateAuthority
from tests.fake_servers import Conn, FakeUpstream, serve_one_query_session, server_context

COPY_ROWS = 400_000
COPY_QUERY = f"copy (select i, repeat('x', 100) from generate_series(1, {COPY_ROWS}) i) to stdout"


def _expected_copy_md5() -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for i in range(1, COPY_ROWS + 1):
        digest.update(f"{i}\t{'x' * 100}\n".encode())
    return digest.hexdigest()


def _write_config(path: Path, upstream: str, *, extra: str = "") -> None:
    path.write_text(
        f"reload: {{watch_files: false}}\n{extra}"
        "routes:\n"
        "  - name: main\n"
        "    listen: ['127.0.0.1:0']\n"
        f"    upstream: '{upstream}'\n"
    )


def _reload(sc) -> tuple[bool, str]:
    return sc.run_coroutine(sc.sidecar.reload)


def _reloads(sc, result: str) -> int:
    return sc.run_in_loop(lambda: sc.sidecar.metrics.config_reloads[result])


def _app(sc) -> str:
    return sc.conninfo(user="app", password="app-secret-pw", dbname="app")


def test_reload_during_copy_keeps_the_stream_and_new_sessions_use_the_new_ca(
    start_sidecar, pg, pki, tmp_path: Path
) -> None:
    other = CertificateAuthority.create("a second root, added by the reload")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.cert_pem() + pki.ca.cert_pem())  # the right root is last
    cfg = tmp_path / "sidecar.yaml"
    _write_config(cfg, f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")
    sc = start_sidecar(None, config_path=str(cfg))

    started = threading.Event()
    result: dict[str, object] = {}

    def copy_out() -> None:
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with psycopg.connect(_app(sc)) as conn, conn.cursor().copy(COPY_QUERY) as copy:
                for chunk in copy:
                    started.set()
                    digest.update(chunk)
            result["md5"] = digest.hexdigest()
        except BaseException as exc:
            result["error"] = exc
            started.set()

    t = threading.Thread(target=copy_out)
    t.start()
    assert started.wait(60)
    _write_config(cfg, f"host=localhost port={pg.port} sslrootcert={bundle}")
    applied, message = _reload(sc)
    assert applied, message
    t.join(120)
    assert "error" not in result, result.get("error")
    assert result["md5"] == _expected_copy_md5()  # byte-exact across the reload
    assert _reloads(sc, "success") == 1
    # New sessions are verified against the new bundle.
    with psycopg.connect(_app(sc)) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
    roots = sc.run_in_loop(lambda: len(sc.sidecar.routes[0].stats.ca_certificates))
    assert roots == 2


def _rotating_server(certs: dict[str, Path]) -> Callable[[Conn], None]:
    """A server whose certificate comes from ``certs['current']`` at each connection."""

    def script(conn: Conn) -> None:
        ctx = server_context(certs["crt"], certs["key"])
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        try:
            tls_sock = conn.start_tls(ctx)
        except OSError:
            return
        serve_one_query_session(tls_sock, conn, value="rotated")

    return script


@pytest.fixture
def rotated(
    tmp_path: Path,
) -> Iterator[tuple[FakeUpstream, Path, CertificateAuthority, CertificateAuthority]]:
    old_ca = CertificateAuthority.create("the old root")
    new_ca = CertificateAuthority.create("the new root")
    crt, key = new_ca.issue_server().write(tmp_path, "server")  # already rotated to the new CA
    roots = tmp_path / "roots.pem"
    roots.write_bytes(old_ca.cert_pem())
    with FakeUpstream(_rotating_server({"crt": crt, "key": key})) as fake:
        yield fake, roots, old_ca, new_ca


def test_ca_rotation_needs_the_new_root_and_a_reload(start_sidecar, rotated, tmp_path) -> None:
    fake, roots, old_ca, new_ca = rotated
    cfg = tmp_path / "sidecar.yaml"
    _write_config(cfg, f"host=localhost port={fake.port} sslrootcert={roots}")
    sc = start_sidecar(None, config_path=str(cfg))
    info = sc.conninfo(user="app", password="pw", dbname="app")
    with pytest.raises(psycopg.OperationalError, match="could not verify the certificate"):
        psycopg.connect(info).close()

    roots.write_bytes(old_ca.cert_pem() + new_ca.cert_pem())
    applied, message = _reload(sc)
    assert applied, message
    with psycopg.connect(info) as conn:
        assert conn.pgconn.parameter_status(b"server_version") == b"17.0"


def test_changed_ca_file_is_picked_up_without_a_signal(start_sidecar, rotated, tmp_path) -> None:
    fake, roots, old_ca, new_ca = rotated
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        "reload: {watch_files: true, interval: 0.1}\n"
        "routes:\n"
        "  - listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=localhost port={fake.port} sslrootcert={roots}'\n"
    )
    reloaded = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("configuration reloaded"):
                reloaded.set()

    handler = Watch()
    app_log = logging.getLogger("proxy.app")
    level = app_log.level
    app_log.setLevel(logging.INFO)
    app_log.addHandler(handler)
    try:
        sc = start_sidecar(None, config_path=str(cfg))
        # Like a Kubernetes ConfigMap update: a new file swapped in under the same name.
        staged = roots.with_suffix(".new")
        staged.write_bytes(old_ca.cert_pem() + new_ca.cert_pem())
        os.replace(staged, roots)
        assert reloaded.wait(30), "the file change did not trigger a reload"
    finally:
        app_log.removeHandler(handler)
        app_log.setLevel(level)
    with psycopg.connect(sc.conninfo(user="app", password="pw", dbname="app")) as conn:
        assert conn.pgconn.parameter_status(b"server_version") == b"17.0"


def _bad_yaml(cfg: Path, good: str, tmp: Path) -> None:
    cfg.write_text("routes: [\n")


def _unknown_key(cfg: Path, good: str, tmp: Path) -> None:
    _write_config(cfg, good, extra="limits: {max_conections: 5}\n")


def _garbage_pem(cfg: Path, good: str, tmp: Path) -> None:
    bad = tmp / "garbage.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    _write_config(cfg, good.split(" sslrootcert=")[0] + f" sslrootcert={bad}")


def _malformed_der(cfg: Path, good: str, tmp: Path) -> None:
    bad = tmp / "broken.cer"
    bad.write_bytes(b"\x30\x82\x05\x00" + os.urandom(64))
    _write_config(cfg, good.split(" sslrootcert=")[0] + f" sslrootcert={bad}")


def _unreadable_file(cfg: Path, good: str, tmp: Path) -> None:
    _write_config(cfg, good.split(" sslrootcert=")[0] + f" sslrootcert={tmp / 'missing.pem'}")


def _key_not_matching(cfg: Path, good: str, tmp: Path) -> None:
    ca = CertificateAuthority.create("client ca")
    crt, _ = ca.issue_client("app").write(tmp, "client")
    _, other_key = ca.issue_client("someone else").write(tmp, "other")
    _write_config(cfg, good + f" sslcert={crt} sslkey={other_key}")


@pytest.mark.parametrize(
    "breaker",
    [_bad_yaml, _unknown_key, _garbage_pem, _malformed_der, _unreadable_file, _key_not_matching],
    ids=["bad-yaml", "unknown-key", "garbage-pem", "malformed-der", "missing-file", "key-mismatch"],
)
def test_bad_reload_keeps_the_old_configuration(
    start_sidecar, pg, tmp_path: Path, breaker: Callable[[Path, str, Path], None]
) -> None:
    good = f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}"
    cfg = tmp_path / "sidecar.yaml"
    _write_config(cfg, good)
    sc = start_sidecar(None, config_path=str(cfg))
    with psycopg.connect(_app(sc)) as open_session:
        breaker(cfg, good, tmp_path)
        applied, message = _reload(sc)
        assert not applied
        assert "previous configuration stays" in message
        assert _reloads(sc, "failure") == 1 and _reloads(sc, "success") == 0
        # The open session is untouched and new sessions still work with the old settings.
        assert open_session.execute("select 1").fetchone() == (1,)
        with psycopg.connect(_app(sc)) as fresh:
            assert fresh.execute("select 2").fetchone() == (2,)


def test_reload_adds_and_removes_listeners_without_touching_other_routes(
    start_sidecar, pg, tmp_path: Path
) -> None:
    upstream = f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}"
    cfg = tmp_path / "sidecar.yaml"
    route = "  - name: {name}\n    listen: ['127.0.0.1:0']\n    upstream: '" + upstream + "'\n"
    cfg.write_text("reload: {watch_files: false}\nroutes:\n" + route.format(name="a"))
    sc = start_sidecar(None, config_path=str(cfg))
    (a_port,) = [p for _h, p in sc.run_in_loop(lambda: sc.sidecar.addresses("a"))]
    with psycopg.connect(_app(sc)) as held:
        cfg.write_text("reload: {watch_files: false}\nroutes:\n" + route.format(name="b"))
        applied, message = _reload(sc)
        assert applied, message
        (b_port,) = [p for _h, p in sc.run_in_loop(lambda: sc.sidecar.addresses("b"))]
        assert held.execute("select 3").fetchone() == (3,)  # route a's open session goes on
    assert sc.port == a_port
    with pytest.raises(psycopg.OperationalError):  # route a's listener is gone
        psycopg.connect(_app(sc)).close()
    b_info = _app(sc).replace(f"port={a_port}", f"port={b_port}")
    with psycopg.connect(b_info) as conn:
        assert conn.execute("select 4").fetchone() == (4,)


def test_sighup_reloads_the_cli(pg, tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    _write_config(cfg, f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            str(cfg),
            "--admin-listen",
            "off",
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        lines = iter(proc.stderr)
        assert any(json.loads(line).get("event") == "route_ready" for line in lines)
        _write_config(
            cfg,
            f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}",
            extra="limits: {max_connections: 7}\n",
        )
        proc.send_signal(signal.SIGHUP)
        assert any(
            json.loads(line).get("msg", "").startswith("configuration reloaded") for line in lines
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
