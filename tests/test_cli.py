"""The real command line in a subprocess: help, version, exit codes, signals, log lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import psycopg
import pytest

import proxy

PROXY = [sys.executable, "-m", "proxy"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def test_version_and_help() -> None:
    out = subprocess.run([*PROXY, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"pg-tls-sidecar {proxy.__version__}"
    help_text = subprocess.run(
        [*PROXY, "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--listen", "--unix-socket", "--upstream", "--config", "--log-format"):
        assert flag in help_text


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "pg-tls-sidecar"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert proxy.__version__ in out.stdout


def test_configuration_error_exits_2_before_listening() -> None:
    res = subprocess.run(
        [*PROXY, "run", "--listen", "127.0.0.1:0", "--upstream", "host=db.example sslmode=prefer"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert res.returncode == 2
    assert "sslmode" in res.stderr and "prefer" in res.stderr


def test_no_upstream_anywhere_exits_2() -> None:
    res = subprocess.run([*PROXY, "run"], capture_output=True, text=True, env=_env(), timeout=30)
    assert res.returncode == 2
    assert "PGHOST" in res.stderr


def test_address_in_use_exits_1(pg_upstream: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = subprocess.run(
            [
                *PROXY,
                "run",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                "off",
                "--upstream",
                pg_upstream,
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
    assert res.returncode == 1
    assert f"127.0.0.1:{port}" in res.stderr
    assert "in use" in res.stderr


@contextmanager
def _running(
    *args: str, env: dict[str, str] | None = None, seen: list[dict[str, object]] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The sidecar, listening; ``seen`` collects the log lines read up to then."""
    proc = subprocess.Popen(
        [
            *PROXY,
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
    )
    try:
        assert proc.stderr is not None
        port = _wait_listening(proc.stderr, seen)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_listening(stream: IO[str], seen: list[dict[str, object]] | None = None) -> int:
    for line in stream:
        doc = json.loads(line)
        if seen is not None:
            seen.append(doc)
        if doc.get("event") == "route_ready":
            return int(doc["listen"].rsplit(":", 1)[1])
    raise AssertionError("the sidecar exited before listening")


def _json_lines(stream: IO[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream if line.strip()]


def test_sigterm_drains_open_session_then_exits_0(pg_upstream: str) -> None:
    with _running("--upstream", pg_upstream) as (proc, port):
        info = f"host=127.0.0.1 port={port} user=app password=app-secret-pw dbname=app"
        with psycopg.connect(info + " sslmode=disable application_name=drainer") as conn:
            proc.send_signal(signal.SIGTERM)
            # Draining: the open session keeps working...
            assert conn.execute("select 41 + 1").fetchone() == (42,)
            # ...while new clients are no longer accepted.
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(info + " sslmode=disable connect_timeout=5").close()
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        lines = _json_lines(proc.stderr)
    closed = [d for d in lines if d.get("event") == "session_closed"]
    assert closed and closed[0]["application_name"] == "drainer"
    assert closed[0]["outcome"] == "ok"
    assert closed[0]["user"] == "app" and closed[0]["database"] == "app"
    assert closed[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert int(closed[0]["bytes_from_client"]) > 0  # type: ignore[call-overload]
    assert int(closed[0]["bytes_from_server"]) > 0  # type: ignore[call-overload]
    whole_log = json.dumps(lines)
    assert "app-secret-pw" not in whole_log
    assert "41 + 1" not in whole_log  # no payloads


def test_second_signal_exits_3_at_once(pg_upstream: str) -> None:
    with _running("--upstream", pg_upstream) as (proc, port):
        info = f"host=127.0.0.1 port={port} user=app password=app-secret-pw dbname=app"
        with psycopg.connect(info + " sslmode=disable") as conn:
            proc.send_signal(signal.SIGTERM)
            assert conn.execute("select 1").fetchone() == (1,)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 3
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")


def test_environment_only_configuration(pg) -> None:
    env = _env()
    env.update(PGHOST="localhost", PGPORT=str(pg.port), PGSSLROOTCERT=str(pg.ca_der_path))
    with _running(env=env) as (proc, port):
        info = f"host=127.0.0.1 port={port} user=app password=app-secret-pw dbname=app"
        with psycopg.connect(info + " sslmode=disable") as conn:
            row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_wait_returns_once_ready_and_fails_on_timeout(pg_upstream: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        nobody = s.getsockname()[1]
    res = subprocess.run(
        [*PROXY, "wait", "--admin", f"127.0.0.1:{nobody}", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "not ready after 1 s" in res.stderr

    with _running("--upstream", pg_upstream) as (proc, _port):
        assert proc.stderr is not None
        admin = _admin_address(proc.stderr)
        res = subprocess.run(
            [*PROXY, "wait", "--admin", admin, "--timeout", "30"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _admin_address(stream: IO[str]) -> str:
    for line in stream:
        doc = json.loads(line)
        if doc.get("event") == "admin_ready":
            return str(doc["listen"])
    raise AssertionError("the sidecar never logged its admin address")


def test_unknown_tls_transport_exits_2(pg_upstream: str) -> None:
    env = _env()
    env["PG_TLS_SIDECAR_TLS_TRANSPORT"] = "openssl-please"
    res = subprocess.run(
        [*PROXY, "run", "--listen", "127.0.0.1:0", "--upstream", pg_upstream],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert res.returncode == 2
    assert "PG_TLS_SIDECAR_TLS_TRANSPORT" in res.stderr and "openssl-please" in res.stderr


@pytest.mark.parametrize("transport", ["sidecar", "asyncio"])
def test_either_tls_transport_carries_a_verified_session(pg_upstream: str, transport: str) -> None:
    """The escape hatch (asyncio's TLS transport) must keep working, not just exist."""
    env = _env()
    env["PG_TLS_SIDECAR_TLS_TRANSPORT"] = transport
    seen: list[dict[str, object]] = []
    with _running("--upstream", pg_upstream, env=env, seen=seen) as (proc, port):
        started = [doc for doc in seen if doc.get("event") == "event_loop"]
        assert [doc["tls_transport"] for doc in started] == [transport]
        info = f"host=127.0.0.1 port={port} user=app password=app-secret-pw dbname=app"
        with psycopg.connect(info + " sslmode=disable") as conn:
            row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
            assert conn.execute("select count(*) from generate_series(1, 50000)").fetchone() == (
                50000,
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
