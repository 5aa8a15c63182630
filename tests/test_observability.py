"""Metrics, probes and the status page of a running sidecar, after real sessions.

Clients are real (psycopg through the sidecar to the TLS-only server), the admin endpoint is
read over HTTP, ``promtool`` checks the exposition, and a real Prometheus server scrapes it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "pg_tls_sidecar_"


def _get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=20)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _samples(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(address, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples, name: str, **labels: str) -> float:
    return samples[(PREFIX + name, tuple(sorted(labels.items())))]


@pytest.fixture
def observed(start_sidecar, pg):
    sc = start_sidecar(
        f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}",
        admin_listen="127.0.0.1:0",
    )
    sc.admin = sc.run_in_loop(lambda: sc.sidecar.admin.address)
    return sc


def _conninfo(sc) -> str:
    return sc.conninfo(user="app", password="app-secret-pw", dbname="app")


def test_metrics_after_commit_rollback_and_error(observed) -> None:
    sc = observed
    with psycopg.connect(_conninfo(sc), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("create temporary table m (x int)")
        conn.execute("commit")
        conn.execute("begin")
        conn.execute("insert into m values (1)")
        conn.execute("rollback")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.execute("notify sidecar_metrics")  # no notice; a plain query
    sc.wait_idle()
    samples = _samples(sc.admin)
    route = "default"
    assert _value(samples, "transactions_total", listener=route, outcome="commit") == 1
    assert _value(samples, "transactions_total", listener=route, outcome="rollback") == 1
    assert (
        _value(
            samples, "server_errors_total", listener=route, severity="ERROR", sqlstate_class="22"
        )
        == 1
    )
    assert _value(samples, "queries_total", listener=route) >= 8
    assert _value(samples, "client_connections_total", listener=route, result="ok") == 1
    assert _value(samples, "client_connections_active", listener=route) == 0
    assert _value(samples, "bytes_total", listener=route, direction="client_to_server") > 0
    assert _value(samples, "bytes_total", listener=route, direction="server_to_client") > 0
    assert _value(samples, "query_duration_seconds_count", listener=route) >= 8
    assert _value(samples, "upstream_tls_handshake_duration_seconds_count", listener=route) >= 1
    versions = [
        dict(labels)["version"]
        for (name, labels), v in samples.items()
        if name == PREFIX + "upstream_tls_info" and v == 1
    ]
    assert versions and versions[0] in ("TLSv1.2", "TLSv1.3")
    assert samples[(PREFIX + "max_connections", ())] == 200
    leaf_expiry = _value(
        samples, "upstream_certificate_expiry_timestamp_seconds", listener=route, position="leaf"
    )
    assert leaf_expiry > time.time()


def test_refused_upstream_is_counted_with_its_reason(start_sidecar, certs) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    sc = start_sidecar(
        f"host=127.0.0.1 port={closed_port} sslrootcert={certs['ca.cer']}",
        admin_listen="127.0.0.1:0",
    )
    admin = sc.run_in_loop(lambda: sc.sidecar.admin.address)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(sc.conninfo(user="app", password="x", dbname="app")).close()
    sc.wait_idle()
    samples = _samples(admin)
    # The session's attempt (the readiness probe may add more of the same reason).
    assert _value(samples, "upstream_errors_total", listener="default", reason="refused") >= 1
    assert (
        _value(samples, "client_connections_total", listener="default", result="upstream_error")
        == 1
    )
    status, body = _get(admin, "/readyz")
    assert status == 503
    assert "no verified TLS handshake" in body


def test_promtool_accepts_the_exposition(observed, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: ./dev installs the Debian package 'prometheus'")
    with psycopg.connect(_conninfo(observed)) as conn:
        conn.execute("select 1")
    status, body = _get(observed.admin, "/metrics")
    assert status == 200
    res = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_readiness_flips_at_max_connections_and_while_draining(start_sidecar, pg, tmp_path) -> None:
    cfg = tmp_path / "ready.yaml"
    cfg.write_text(
        "limits: {max_connections: 1}\n"
        "admin: {listen: '127.0.0.1:0'}\n"
        "routes:\n"
        "  - listen: ['127.0.0.1:0']\n"
        f"    upstream: 'host=localhost port={pg.port} sslrootcert={pg.ca_der_path}'\n"
    )
    sc = start_sidecar(None, config_path=str(cfg), admin_listen=None)
    admin = sc.run_in_loop(lambda: sc.sidecar.admin.address)
    assert _get(admin, "/startup")[0] == 200
    assert _get(admin, "/livez")[0] == 200
    with psycopg.connect(_conninfo(sc)) as conn:
        conn.execute("select 1")
        status, body = _get(admin, "/readyz")
        assert status == 503 and "max_connections" in body
    sc.wait_idle()
    status, body = _get(admin, "/readyz")
    assert status == 200, body  # the session's own handshake proved the upstream
    samples = _samples(admin)
    assert samples[(PREFIX + "ready", ())] == 1
    assert samples[(PREFIX + "max_connections", ())] == 1

    with psycopg.connect(_conninfo(sc)) as conn:
        assert _get(admin, "/shutdown", method="POST")[0] == 202
        status, body = _get(admin, "/readyz")
        assert status == 503 and "draining" in body
        assert _samples(admin)[(PREFIX + "ready", ())] == 0
        assert conn.execute("select 2").fetchone() == (2,)  # open sessions keep working


def test_status_page_lists_sessions_and_certificates(observed) -> None:
    with psycopg.connect(_conninfo(observed) + " application_name=<b>status-probe</b>") as conn:
        conn.execute("select 1")
        status, body = _get(observed.admin, "/status?format=json")
        assert status == 200
        doc = json.loads(body)
        (route,) = doc["routes"]
        (session,) = route["sessions"]
        assert session["user"] == "app" and session["application"] == "<b>status-probe</b>"
        assert route["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert route["server_certificates"][0]["state"] == "valid"
        assert route["ca_certificates"][0]["subject"].startswith("CN=pg-tls-sidecar test root CA")
        status, html = _get(observed.admin, "/status")
        assert status == 200
        assert "&lt;b&gt;status-probe&lt;/b&gt;" in html and "<b>status-probe" not in html
    assert "app-secret-pw" not in body + html


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: ./dev installs the Debian package 'prometheus'")
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    yield Path(binary), port


def test_real_prometheus_scrapes_the_sidecar(observed, prometheus_server, tmp_path) -> None:
    binary, port = prometheus_server
    host, admin_port = observed.admin
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pg-tls-sidecar\n"
        f"    static_configs: [{{targets: ['{host}:{admin_port}']}}]\n"
    )
    with psycopg.connect(_conninfo(observed)) as conn:
        conn.execute("select 1")
    proc = subprocess.Popen(
        [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = "/api/v1/query?query=pg_tls_sidecar_client_connections_total%7Bresult%3D%22ok%22%7D"
        deadline = time.monotonic() + 60
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline and not result:
            try:
                status, body = _get(("127.0.0.1", port), query)
            except OSError:
                status, body = 0, ""
            if status == 200:
                result = json.loads(body)["data"]["result"]
            if not result:
                # Pace the polling by waiting on Prometheus itself, which must not exit.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.5)
                assert proc.returncode is None, "prometheus exited"
        assert result, "Prometheus never returned the sidecar's series"
        assert result[0]["metric"]["listener"] == "default"  # type: ignore[index]
        assert float(result[0]["value"][1]) == 1.0  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(30)
