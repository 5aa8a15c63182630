"""``workers: N``: a supervisor, N real worker processes sharing the port, one admin endpoint.

The pure parts (option parsing, metric and status merging, the worker's view of the
configuration) are tables; the rest runs ``python -m proxy run --workers 2`` as a real process
tree in front of the real TLS-only PostgreSQL, with real psycopg clients, real signals and
``promtool``. Every wait polls an observable condition (a log line, a metric) with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import config, workers
from proxy.admin_merge import (
    WorkerInfo,
    cumulative_only,
    merge_families,
    merge_status,
    parse_exposition,
    parse_http_response,
    render_exposition,
)
from proxy.config import WORKERS_ENV, load_settings
from proxy.demo.cluster import TlsOnlyCluster
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.settings import MAX_WORKERS, Settings, TcpListen, UnixListen
from proxy.status_page import StatusDoc
from proxy.workers import Supervisor, WorkerSpec, apply_spec
from tests.conftest import APP, RunningSidecar, client_env

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def load(**kwargs: Any) -> Settings:
    kwargs.setdefault("config_path", None)
    kwargs.setdefault("upstream", "host=db.example.com")
    kwargs.setdefault("environ", {})
    return load_settings(**kwargs)


# --- the option


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("flag", "environ", "file_value", "expected"),
    [
        (None, {}, None, 1),
        ("2", {}, None, 2),
        ("auto", {}, None, "cpus"),
        (" AUTO ", {}, None, "cpus"),
        (str(MAX_WORKERS), {}, None, MAX_WORKERS),
        (None, {WORKERS_ENV: "3"}, None, 3),
        (None, {WORKERS_ENV: "3"}, "4", 4),  # the file wins over the environment
        ("5", {WORKERS_ENV: "3"}, "4", 5),  # and the flag over both
        (None, {}, "auto", "cpus"),
    ],
)
def test_workers_option_sources_and_precedence(
    tmp_path: Path, flag: str | None, environ: dict[str, str], file_value: str | None, expected: Any
) -> None:
    path = None
    if file_value is not None:
        path = tmp_path / "w.yaml"
        path.write_text(f"workers: {file_value}\n")
    settings = load(workers=flag, environ=environ, config_path=str(path) if path else None)
    assert settings.workers == (min(MAX_WORKERS, _cpus()) if expected == "cpus" else expected)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "out of range 1..256"),
        ("257", "out of range 1..256"),
        ("two", "is not a number of processes"),
        ("-1", "is not a number of processes"),
        ("1.5", "is not a number of processes"),
        (True, "must be a number of processes or auto"),
        (2.0, "must be a number of processes or auto"),
        ([2], "must be a number of processes or auto"),
    ],
)
def test_workers_option_errors_name_key_value_and_fix(
    tmp_path: Path, value: object, problem: str
) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(f"workers: {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as caught:
        load(config_path=str(path))
    assert caught.value.key == "workers"
    assert problem in caught.value.problem
    assert "auto" in str(caught.value.fix)
    with pytest.raises(ConfigError) as from_env:
        load(environ={WORKERS_ENV: str(value)})
    assert from_env.value.key == WORKERS_ENV


def test_workers_above_one_need_so_reuseport() -> None:
    with pytest.raises(ConfigError) as caught:
        config._workers("4", "--workers", reuse_port=False)
    assert caught.value.key == "--workers"
    assert "SO_REUSEPORT" in caught.value.problem
    assert config._workers("1", "--workers", reuse_port=False) == 1


# --- merging metrics (pure)


def _worker_metrics(ok: int, active: int, ready: bool, query_seconds: list[float]) -> str:
    metrics = Metrics("1.2.3", ["main"])
    stats = metrics.route("main")
    stats.connections["ok"] = ok
    stats.active = active
    for value in query_seconds:
        stats.query_seconds.observe(value)
    metrics.state = lambda: (ready, 200)
    return metrics.exposition()[0].decode()


def _samples(body: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = body.decode() if isinstance(body, bytes) else body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merge_adds_counters_gauges_and_buckets_and_takes_min_of_ready() -> None:
    one = parse_exposition(_worker_metrics(3, 1, True, [0.001, 0.2]))
    two = parse_exposition(_worker_metrics(4, 2, False, [0.002]))
    merged = _samples(render_exposition(merge_families([one, two])))
    main = (("listener", "main"),)
    assert merged[("pg_tls_sidecar_client_connections_total", (*main, ("result", "ok")))] == 7
    assert merged[("pg_tls_sidecar_client_connections_active", main)] == 3
    assert merged[("pg_tls_sidecar_query_duration_seconds_count", main)] == 3
    assert merged[("pg_tls_sidecar_query_duration_seconds_sum", main)] == pytest.approx(0.203)
    bucket = ("pg_tls_sidecar_query_duration_seconds_bucket", (("le", "0.0025"), *main))
    assert merged[bucket] == 2
    assert merged[("pg_tls_sidecar_ready", ())] == 0  # min: one worker is not ready
    assert merged[("pg_tls_sidecar_max_connections", ())] == 400  # each worker's 200
    assert merged[("pg_tls_sidecar_build_info", (("version", "1.2.3"),))] == 1  # max, not 2


def test_merge_takes_the_soonest_expiry_and_keeps_info_at_one() -> None:
    text = (
        "# HELP x_expiry_timestamp_seconds e\n# TYPE x_expiry_timestamp_seconds gauge\n"
        'x_expiry_timestamp_seconds{position="leaf"} %s\n'
        "# HELP x_tls_info t\n# TYPE x_tls_info gauge\n"
        'x_tls_info{version="TLSv1.3"} 1\n'
    )
    parts = [parse_exposition(text % value) for value in ("2000", "1000", "3000")]
    merged = _samples(render_exposition(merge_families(parts)))
    assert merged[("x_expiry_timestamp_seconds", (("position", "leaf"),))] == 1000
    assert merged[("x_tls_info", (("version", "TLSv1.3"),))] == 1


def test_counters_of_an_ended_worker_are_kept_gauges_are_not() -> None:
    """A restarted worker counts from zero again; the merged counter must not go down."""
    before = parse_exposition(_worker_metrics(5, 2, True, []))
    retired = cumulative_only(before)
    assert {f.type for f in retired} <= {"counter", "histogram"}
    fresh = parse_exposition(_worker_metrics(1, 0, True, []))
    merged = _samples(render_exposition(merge_families([retired, fresh])))
    main = (("listener", "main"),)
    assert merged[("pg_tls_sidecar_client_connections_total", (*main, ("result", "ok")))] == 6
    assert merged[("pg_tls_sidecar_client_connections_active", main)] == 0


def test_promtool_accepts_a_merged_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: ./dev installs the Debian package 'prometheus'")
    parts = [parse_exposition(_worker_metrics(n, n, True, [0.01 * n])) for n in (1, 2, 3)]
    body = render_exposition(merge_families(parts))
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", (200, b"ok\n")),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\nwhy\n", (503, b"why\n")),
        (b"HTTP/1.0 409 Conflict\r\ncontent-length: 2\r\n\r\nnoEXTRA", (409, b"no")),
    ],
)
def test_http_answers_are_parsed(data: bytes, expected: tuple[int, bytes]) -> None:
    assert parse_http_response(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
def test_broken_http_answers_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_http_response(data)


def _doc(sessions: list[int], at: str | None) -> StatusDoc:
    tls = None if at is None else {"version": "TLSv1.3", "cipher": "X", "alpn": None, "at": at}
    route: Any = {
        "name": "main",
        "listeners": ["127.0.0.1:5432"],
        "upstream": "db:5432",
        "server_name": "db",
        "sslmode": "verify-full",
        "sslrootcert": None,
        "active_connections": len(sessions),
        "max_connections": 10,
        "tls": tls,
        "server_certificates": [],
        "ca_certificates": [],
        "sessions": [
            {
                "id": i,
                "client": "127.0.0.1:1",
                "user": "app",
                "database": "app",
                "application": None,
                "age_seconds": 1.0,
                "bytes_client_to_server": 1,
                "bytes_server_to_client": 2,
            }
            for i in sessions
        ],
    }
    return StatusDoc(
        version="1",
        generated_at="",
        started_at="",
        uptime_seconds=0.0,
        ready=True,
        reasons=[],
        active_connections=len(sessions),
        max_connections=200,
        routes=[route],
    )


def test_status_documents_are_merged_by_route_with_each_sessions_worker() -> None:
    infos = [
        WorkerInfo(id=1, pid=101, running=True, ready=True, restarts=0, last_exit=None),
        WorkerInfo(id=2, pid=102, running=True, ready=True, restarts=1, last_exit=-9),
    ]
    base = _doc([], None)
    docs = [
        (infos[0], _doc([1, 2], "2026-01-01T00:00:01Z")),
        (infos[1], _doc([1], "2026-01-01T00:00:09Z")),
    ]
    merged = merge_status(base, infos, docs, scale=2)
    (route,) = merged["routes"]
    assert route["active_connections"] == 3 == merged["active_connections"]
    assert route["max_connections"] == 20
    assert [(s["id"], s["worker"], s["pid"]) for s in route["sessions"]] == [  # type: ignore[typeddict-item]
        (1, 1, 101),
        (2, 1, 101),
        (1, 2, 102),
    ]
    assert route["tls"] is not None and route["tls"]["at"] == "2026-01-01T00:00:09Z"
    assert merged["workers"] == infos


# --- the worker's view of the configuration (pure)


def test_a_worker_gets_the_resolved_ports_and_a_private_admin_endpoint() -> None:
    settings = load(listen=["127.0.0.1:0", "127.0.0.1:6543"], workers="2")
    spec = WorkerSpec(id=2, report_fd=9, admin=True, ports=(("default", 0, 40001),))
    assert WorkerSpec.from_json(spec.to_json()) == spec
    mine = apply_spec(settings, spec)
    assert mine.routes[0].listen == (TcpListen("127.0.0.1", 40001), TcpListen("127.0.0.1", 6543))
    assert mine.admin.listen == TcpListen("127.0.0.1", 0)
    no_admin = apply_spec(settings, WorkerSpec(id=1, report_fd=9, admin=False))
    assert no_admin.admin.listen is None
    assert no_admin.routes[0].listen[0] == TcpListen("127.0.0.1", 0)


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"id": "x", "report_fd": 1}'])
def test_a_broken_worker_spec_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerSpec.from_json(text)
    assert caught.value.key == "--worker-spec"
    assert "--workers" in str(caught.value.fix)


# --- the supervisor with stand-in workers (no PostgreSQL needed)

FLAKY_WORKER = """
import json, os, socket, sys
spec = json.loads(sys.argv[-1])
marker = sys.argv[1]
report = socket.socket(fileno=spec["report_fd"])
if not os.path.exists(marker):
    open(marker, "w").close()
    report.sendall(json.dumps({"event": "started", "admin": None}).encode() + b"\\n")
    report.recv(1)  # until the test kills us
else:
    failed = {"event": "failed", "code": 2, "message": "bad CA"}
    report.sendall(json.dumps(failed).encode() + b"\\n")
    sys.exit(2)
"""


def test_a_worker_that_never_starts_again_stops_the_supervisor_after_bounded_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It served once, was killed, and every restart fails: no endless loop, its exit code."""
    monkeypatch.setattr(workers, "BACKOFF_FIRST", 0.01)
    settings = load(workers="1", admin_listen="off", listen=["127.0.0.1:0"])
    marker = tmp_path / "served-once"
    argv = [sys.executable, "-c", FLAKY_WORKER, str(marker)]
    supervisor = Supervisor(settings, argv)
    import asyncio

    async def scenario() -> int:
        task = asyncio.create_task(supervisor.run())
        await supervisor.serving.wait()  # the first worker reported that it serves
        proc = supervisor.slots[0].proc
        assert proc is not None
        proc.kill()
        return await asyncio.wait_for(task, 30)

    code = asyncio.run(scenario())
    assert code == 2
    assert supervisor.slots[0].restarts == workers.MAX_START_FAILURES
    assert supervisor.fatal == (2, "bad CA")


def test_a_worker_failing_at_first_start_stops_everything_at_once(tmp_path: Path) -> None:
    settings = load(workers="1", admin_listen="off", listen=["127.0.0.1:0"])
    argv = [sys.executable, "-c", "raise SystemExit(2)"]
    supervisor = Supervisor(settings, argv)
    import asyncio

    assert asyncio.run(asyncio.wait_for(supervisor.run(), 30)) == 2
    assert supervisor.slots[0].restarts == 0


# --- real worker processes in front of the real server


class Supervised:
    """``python -m proxy run --workers 2`` with a JSON log file; addresses read from its log."""

    def __init__(self, tmp_path: Path, *args: str, workers: str = "2") -> None:
        self.log_path = tmp_path / f"sidecar-{time.monotonic_ns()}.log"
        env = client_env()
        argv = [sys.executable, "-m", "proxy", "run", "--workers", workers, "--log-format", "json"]
        argv += ["--event-loop", RunningSidecar.event_loop]  # pytest --event-loop, as elsewhere
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*argv, *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for(self, what: str, ready: Callable[[], Any], timeout: float = START_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = ready()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: not within {timeout:g} s\n{self.log_path.read_text()}"
                )
            time.sleep(0.02)  # polling an observable condition, bounded above

    def event(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r.get("event") == name and all(r.get(k) == v for k, v in fields.items())
        ]

    def started(self) -> Supervised:
        self.wait_for("workers serving", lambda: self.event("workers_ready") or self.exited())
        assert self.proc.poll() is None, self.log_path.read_text()
        admin = [r for r in self.event("admin_ready") if "worker" not in r]
        self.admin = admin[0]["listen"] if admin else None
        listen = self.event("route_ready")[0]["listen"].split(", ")[0]
        host, port = listen.rsplit(":", 1)
        self.host, self.port = host, int(port)
        return self

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def get(self, path: str, method: str = "GET") -> tuple[int, str]:
        assert self.admin is not None
        host, port = self.admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def metric(self, name: str, **labels: str) -> float:
        status, body = self.get("/metrics")
        assert status == 200
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        raise AssertionError(f"{name} {labels} not in /metrics")

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status?format=json")
        assert code == 200
        doc: dict[str, Any] = json.loads(body)
        return doc

    def conninfo(self, **extra: Any) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            user=APP.user,
            password=APP.password,
            dbname=APP.dbname,
            sslmode="disable",
            connect_timeout=10,
            **extra,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"supervisor did not stop\n{self.log_path.read_text()}"
                ) from None
        return self.proc.returncode


@pytest.fixture
def supervised(tmp_path: Path, pg_upstream: str) -> Iterator[Callable[..., Supervised]]:
    running: list[Supervised] = []

    def start(*args: str, workers: str = "2", upstream: str | None = None) -> Supervised:
        base = ["--upstream", upstream or pg_upstream]
        item = Supervised(tmp_path, *base, *args, workers=workers)
        running.append(item)
        return item

    yield start
    for item in running:
        item.stop()


def _select_one(conninfo: str) -> None:
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_sessions_spread_over_workers_and_the_admin_endpoint_merges_them(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    sidecar = supervised("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0").started()
    pids = {r["pid"] for r in sidecar.event("worker_started")}
    assert len(pids) == 2 and sidecar.proc.pid not in pids
    ok_before = sidecar.metric("pg_tls_sidecar_client_connections_total", result="ok")

    # Held open, so /status lists them; the kernel hashes each client port to a worker.
    held: list[psycopg.Connection[Any]] = []
    try:
        seen: set[int] = set()
        while len(held) < 20 or (seen != pids and len(held) < 60):
            conn = psycopg.connect(sidecar.conninfo())
            held.append(conn)
            assert conn.execute("select 1").fetchone() == (1,)
            if len(held) >= 20:
                sessions = sidecar.status()["routes"][0]["sessions"]
                seen = {s["pid"] for s in sessions}
        doc = sidecar.status()
        assert {w["pid"] for w in doc["workers"]} == pids
        assert seen == pids, "every connection went to one worker"
        assert len(doc["routes"][0]["sessions"]) == len(held) == doc["active_connections"]
        assert sidecar.metric("pg_tls_sidecar_client_connections_active") == len(held)
        code, page = sidecar.get("/status")
        assert code == 200 and "Worker processes" in page and str(min(pids)) in page
    finally:
        for conn in held:
            conn.close()
    total = ok_before + len(held)
    sidecar.wait_for(
        "every session counted",
        lambda: sidecar.metric("pg_tls_sidecar_client_connections_total", result="ok") == total,
    )
    assert sidecar.metric("pg_tls_sidecar_workers") == 2
    assert sidecar.metric("pg_tls_sidecar_worker_restarts_total") == 0
    assert sidecar.metric("pg_tls_sidecar_max_connections") == 400  # 2 x limits.max_connections

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: ./dev installs the Debian package 'prometheus'")
    _, body = sidecar.get("/metrics")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr

    sidecar.wait_for("ready", lambda: sidecar.get("/readyz")[0] == 200)
    assert sidecar.get("/livez") == (200, "ok\n")
    assert sidecar.get("/startup")[0] == 200
    code, text = sidecar.get("/reload", "POST")
    assert code == 200, text
    assert text.count("configuration reloaded") == 2
    # Every line a worker wrote carries its number; the supervisor's own lines do not.
    by_worker = {r.get("worker") for r in sidecar.records() if r.get("event") == "route_ready"}
    assert by_worker == {1, 2}


def test_a_killed_worker_is_restarted_and_counters_do_not_go_down(
    supervised: Callable[..., Supervised],
) -> None:
    sidecar = supervised("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0").started()
    victim = sidecar.event("worker_started")[0]["pid"]
    # Sessions until one of them lands on the victim, so that its counts are at stake.
    held: list[psycopg.Connection[Any]] = []
    try:
        while not any(s["pid"] == victim for s in sidecar.status()["routes"][0]["sessions"]):
            assert len(held) < 40, "no session reached the first worker"
            held.append(psycopg.connect(sidecar.conninfo()))
    finally:
        for conn in held:
            conn.close()
    sidecar.wait_for(
        "sessions counted",
        lambda: sidecar.metric("pg_tls_sidecar_client_connections_total", result="ok") == len(held),
    )
    os.kill(victim, signal.SIGKILL)
    sidecar.wait_for(
        "the worker restarted",
        lambda: (
            len(sidecar.event("worker_started")) == 3
            and sidecar.metric("pg_tls_sidecar_workers") == 2
        ),
    )
    exited = sidecar.event("worker_exited")
    assert len(exited) == 1 and exited[0]["status"] == -signal.SIGKILL
    assert sidecar.metric("pg_tls_sidecar_worker_restarts_total") == 1
    # The dead worker's sessions are still counted: a counter that went down would be a reset.
    ok = sidecar.metric("pg_tls_sidecar_client_connections_total", result="ok")
    assert ok == len(held)
    for _ in range(4):
        _select_one(sidecar.conninfo())
    new_pids = {w["pid"] for w in sidecar.status()["workers"]}
    assert victim not in new_pids and len(new_pids) == 2
    assert sidecar.stop() == 0


def test_sigterm_drains_an_idle_session_and_exits_zero(
    supervised: Callable[..., Supervised],
) -> None:
    sidecar = supervised("--listen", "127.0.0.1:0", "--admin-listen", "off").started()
    sidecar.proc.send_signal(signal.SIGHUP)  # forwarded: each worker reloads
    sidecar.wait_for(
        "both workers reloaded",
        lambda: (
            {
                r.get("worker")
                for r in sidecar.records()
                if r.get("msg", "").startswith("configuration reloaded")
            }
            == {1, 2}
        ),
    )
    with psycopg.connect(sidecar.conninfo(), autocommit=True) as conn:
        conn.execute("select 1")
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.wait_for(
            "both workers draining",
            lambda: sum("shutting down" in r.get("msg", "") for r in sidecar.records()) == 2,
        )
        assert sidecar.proc.poll() is None  # the open session holds its worker
        assert conn.execute("select 2").fetchone() == (2,)  # and still works
    assert sidecar.proc.wait(STOP_TIMEOUT) == 0
    with pytest.raises(OSError):
        socket.create_connection((sidecar.host, sidecar.port), timeout=5).close()


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaps in a container counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_workers_stop_when_their_supervisor_is_killed(
    supervised: Callable[..., Supervised],
) -> None:
    """Orphaned workers must not hold the port forever: they drain and exit."""
    sidecar = supervised("--listen", "127.0.0.1:0", "--admin-listen", "off").started()
    pids = [r["pid"] for r in sidecar.event("worker_started")]
    sidecar.proc.kill()
    sidecar.proc.wait()
    sidecar.wait_for("orphaned workers gone", lambda: all(_gone(pid) for pid in pids))
    assert (
        sum(
            r.get("msg") == "the supervisor is gone: draining and stopping"
            for r in sidecar.records()
        )
        == 2
    )
    with pytest.raises(OSError):
        socket.create_connection((sidecar.host, sidecar.port), timeout=5).close()


def test_unix_socket_listener_is_shared_by_the_workers(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    directory = tmp_path / "sock"
    directory.mkdir()
    sidecar = supervised(
        "--unix-socket", str(directory), "--unix-socket-mode", "0770", "--admin-listen", "off"
    )
    sidecar.wait_for("workers serving", lambda: sidecar.event("workers_ready") or sidecar.exited())
    path = UnixListen(str(directory)).path
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o770)
    for _ in range(6):
        _select_one(
            psycopg.conninfo.make_conninfo(
                host=str(directory),
                port=5432,
                user=APP.user,
                password=APP.password,
                dbname=APP.dbname,
                connect_timeout=10,
            )
        )
    assert sidecar.stop() == 0
    assert not os.path.exists(path)  # the supervisor removed the file it created


def test_a_worker_configuration_error_stops_the_supervisor_with_its_message(
    supervised: Callable[..., Supervised], pg: TlsOnlyCluster, tmp_path: Path
) -> None:
    """The CA file is readable (the supervisor's load passes) but no certificate: each worker
    fails building its TLS context."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    sidecar = supervised(
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        upstream=f"host=localhost port={pg.port} sslrootcert={bogus}",
    )
    assert sidecar.proc.wait(START_TIMEOUT) == 2
    text = sidecar.log_path.read_text()
    supervisor_line = [
        r for r in sidecar.records() if "could not start" in r.get("msg", "") and "worker" not in r
    ]
    assert supervisor_line, text
    assert str(bogus) in supervisor_line[0]["msg"]
    assert "worker_restarts" not in text and not sidecar.event("worker_exited")


def test_a_busy_port_is_reported_as_by_one_process_before_any_worker_starts(
    supervised: Callable[..., Supervised],
) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    lines: dict[str, list[str]] = {}
    try:
        for count in ("1", "2"):
            sidecar = supervised(
                "--listen", f"127.0.0.1:{port}", "--admin-listen", "off", workers=count
            )
            assert sidecar.proc.wait(START_TIMEOUT) == 1
            lines[count] = [r["msg"] for r in sidecar.records() if r.get("level") == "error"]
            assert not sidecar.event("worker_started")
    finally:
        busy.close()
    assert lines["2"] == lines["1"]
    (line,) = lines["2"]
    assert line.startswith(f"route 'default': could not listen on 127.0.0.1:{port}: ")
    assert "address already in use; another PostgreSQL server or sidecar is using it" in line
