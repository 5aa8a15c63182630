"""The admin endpoint: a real AdminServer on its own event loop, real HTTP from http.client and
raw sockets, real certificates on the status page."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from proxy.admin import MAX_HEAD, AdminServer, Health, _is_loopback, parse_head
from proxy.demo.pki import CertificateAuthority
from proxy.errors import ListenError
from proxy.metrics import Metrics
from proxy.settings import TcpListen
from proxy.status_page import (
    CertificateSummary,
    RouteStatus,
    StatusDoc,
    certificate_summary,
    render_html,
)

T = TypeVar("T")
TIMEOUT = 30.0  # a bound on every wait, never a synchronisation
HOSTILE = "<script>alert('x')</script>&\"pwned\""
NOW = datetime.now(UTC).replace(microsecond=0)


# --- an AdminSource made of plain fields


@dataclass
class Source:
    metrics: Metrics = field(default_factory=lambda: Metrics("9.9.9", ["main"]))
    current: Health = field(default_factory=lambda: Health(True, True, True, ()))
    doc: StatusDoc | None = None
    shutdowns: int = 0
    reloads: int = 0
    reload_result: tuple[bool, str] = (True, "configuration reloaded")
    status_error: Exception | None = None

    def health(self) -> Health:
        return self.current

    def status(self) -> StatusDoc:
        if self.status_error is not None:
            raise self.status_error
        assert self.doc is not None
        return self.doc

    def request_shutdown(self) -> None:
        self.shutdowns += 1

    async def reload(self) -> tuple[bool, str]:
        self.reloads += 1
        return self.reload_result


class LoopThread:
    """An event loop in a thread, as the sidecar runs one; tests talk to it over sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        async def run() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(TIMEOUT)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@dataclass
class Running:
    server: AdminServer
    source: Source
    loop: LoopThread

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[http.client.HTTPResponse, bytes]:
        host, port = self.address
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()


def start(
    loop: LoopThread, source: Source, listen: TcpListen, read_timeout: float = 10.0
) -> AdminServer:
    server = AdminServer(source, listen, read_timeout=read_timeout)
    loop.call(server.start)
    return server


def stop(loop: LoopThread, server: AdminServer) -> None:
    async def close() -> None:
        server.close()
        await server.wait_closed()

    loop.call(close)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def admin(loop: LoopThread) -> Iterator[Running]:
    source = Source(doc=status_doc())
    server = start(loop, source, TcpListen("127.0.0.1", 0))
    yield Running(server, source, loop)
    stop(loop, server)


def raw(address: tuple[str, int], data: bytes, *, half_close: bool = False) -> bytes:
    """Send bytes as they are and read the answer until the server closes."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode()


# --- a status document with real certificates


def status_doc() -> StatusDoc:
    root = CertificateAuthority.create("Sidecar Test Root")
    issuing = root.issue_intermediate("Sidecar Issuing CA")
    leaf = issuing.issue_server(
        common_name="db.example.com", dns_names=("db.example.com",), ip_addresses=("10.0.0.4",)
    ).cert
    retired = datetime(2025, 5, 12, 23, 59, tzinfo=UTC)
    baltimore = CertificateAuthority.create(
        "Baltimore CyberTrust Root", not_before=retired - timedelta(days=9000), not_after=retired
    ).cert
    route = RouteStatus(
        name="main",
        listeners=["127.0.0.1:5432"],
        upstream="db.example.com:5432",
        server_name="db.example.com",
        sslmode="verify-full",
        sslrootcert="/etc/ssl/azure-roots.pem",
        active_connections=1,
        max_connections=None,
        tls={
            "version": "TLSv1.3",
            "cipher": "TLS_AES_256_GCM_SHA384",
            "alpn": "postgresql",
            "at": "2025-06-01T12:00:00Z",
        },
        server_certificates=[certificate_summary(c, NOW) for c in (leaf, issuing.cert)],
        ca_certificates=[certificate_summary(c, NOW) for c in (root.cert, baltimore)],
        sessions=[
            {
                "id": 17,
                "client": "127.0.0.1:51234",
                "user": "app",
                "database": "orders",
                "application": HOSTILE,
                "age_seconds": 3725.0,
                "bytes_client_to_server": 2048,
                "bytes_server_to_client": 5 * 1024 * 1024,
            }
        ],
    )
    return StatusDoc(
        version="9.9.9",
        generated_at="2025-06-01T12:00:05Z",
        started_at="2025-06-01T11:00:00Z",
        uptime_seconds=3605.0,
        ready=True,
        reasons=[],
        active_connections=1,
        max_connections=200,
        routes=[route],
    )


# --- endpoints


def test_metrics(admin: Running) -> None:
    admin.source.metrics.route("main").queries += 3
    response, body = admin.request("GET", "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    assert response.getheader("Content-Length") == str(len(body))
    assert response.getheader("Connection") == "close"
    assert b'pg_tls_sidecar_queries_total{listener="main"} 3.0' in body
    assert b'pg_tls_sidecar_build_info{version="9.9.9"} 1.0' in body


def test_head_has_the_get_headers_and_no_body(admin: Running) -> None:
    get, get_body = admin.request("GET", "/metrics")
    head, head_body = admin.request("HEAD", "/metrics")
    assert head.status == 200
    assert head_body == b""
    assert head.getheader("Content-Length") == str(len(get_body))
    assert head.getheader("Content-Type") == get.getheader("Content-Type")
    # Nothing after the head on the wire either.
    answer = raw(admin.address, b"HEAD /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.endswith(b"\r\n\r\n")
    assert b"Content-Length: 3\r\n" in answer


@pytest.mark.parametrize(
    ("health", "path", "status", "body"),
    [
        (Health(False, True, False, ("starting",)), "/startup", 503, b"starting\n"),
        (Health(True, True, True, ()), "/startup", 200, b"started\n"),
        (Health(True, True, True, ()), "/livez", 200, b"ok\n"),
        (Health(True, False, False, ()), "/livez", 503, b"not live\n"),
        (Health(True, True, True, ()), "/readyz", 200, b"ok\n"),
        (
            Health(True, True, False, ("draining", "route main: at max_connections (5)")),
            "/readyz",
            503,
            b"draining\nroute main: at max_connections (5)\n",
        ),
        (Health(True, True, False, ()), "/readyz", 503, b"not ready\n"),
    ],
)
def test_probes(admin: Running, health: Health, path: str, status: int, body: bytes) -> None:
    admin.source.current = health
    response, answer = admin.request("GET", path)
    assert response.status == status
    assert answer == body
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert response.getheader("Cache-Control") == "no-store"


def test_readiness_flips_and_back(admin: Running) -> None:
    assert admin.request("GET", "/readyz")[0].status == 200
    admin.source.current = Health(True, True, False, ("draining",))
    assert admin.request("GET", "/readyz")[0].status == 503
    admin.source.current = Health(True, True, True, ())
    assert admin.request("GET", "/readyz")[0].status == 200


def test_status_json(admin: Running) -> None:
    response, body = admin.request("GET", "/status?format=json")
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    document = json.loads(body)
    assert document == json.loads(json.dumps(admin.source.doc))
    assert document["routes"][0]["sessions"][0]["application"] == HOSTILE


def test_status_html_escapes_everything(admin: Running) -> None:
    response, body = admin.request("GET", "/status")
    page = body.decode()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "default-src 'none'" in (response.getheader("Content-Security-Policy") or "")
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;pwned&quot;" in page


def test_status_format_is_checked(admin: Running) -> None:
    response, body = admin.request("GET", "/status?format=xml")
    assert response.status == 400
    assert b"format must be html or json" in body


# --- the status page itself


def test_page_shows_the_chain_and_an_expired_root() -> None:
    page = render_html(status_doc())
    assert "pg-tls-sidecar 9.9.9" in page
    assert "TLSv1.3" in page and "TLS_AES_256_GCM_SHA384" in page and "postgresql" in page
    assert "CN=db.example.com" in page
    assert "DNS:db.example.com, IP:10.0.0.4" in page
    assert "CN=Sidecar Issuing CA" in page
    baltimore_row = next(row for row in page.split("<tr") if "Baltimore CyberTrust Root" in row)
    assert 'class="t-expired"' in baltimore_row
    assert "EXPIRED" in baltimore_row
    assert "2025-05-12T23:59:00Z" in baltimore_row
    assert "1h 2m" in page  # the session's age
    assert "5.0 MiB" in page and "2.0 KiB" in page
    assert "READY" in page


def test_page_lists_why_not_ready() -> None:
    doc = status_doc()
    doc["ready"] = False
    doc["reasons"] = ["draining", "<b>bold</b>"]
    page = render_html(doc)
    assert "NOT READY" in page
    assert "<li>draining</li>" in page
    assert "<li>&lt;b&gt;bold&lt;/b&gt;</li>" in page


def test_page_before_any_handshake() -> None:
    doc = status_doc()
    route = doc["routes"][0]
    route["tls"] = None
    route["server_certificates"] = []
    route["ca_certificates"] = []
    route["sessions"] = []
    page = render_html(doc)
    assert "no successful handshake yet" in page
    assert "No active sessions." in page


@pytest.mark.parametrize(
    ("not_before", "not_after", "state", "days_left"),
    [
        (-10, 400, "valid", 399),
        (-10, 29, "expiring", 28),
        (-400, -1, "expired", -1),
        (5, 400, "not_yet_valid", 399),
    ],
)
def test_certificate_summary(not_before: int, not_after: int, state: str, days_left: int) -> None:
    ca = CertificateAuthority.create(
        "Summary Root",
        not_before=NOW + timedelta(days=not_before),
        not_after=NOW + timedelta(days=not_after, seconds=-1),
    )
    summary: CertificateSummary = certificate_summary(ca.cert, NOW)
    assert summary["state"] == state
    assert summary["days_left"] == days_left
    assert summary["subject"] == "CN=Summary Root"
    assert summary["self_signed"] is True
    assert summary["sans"] == []
    assert len(summary["sha256"].split(":")) == 32
    json.dumps(summary)  # JSON-able as it is


# --- methods, paths and malformed requests


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/metrics", "GET, HEAD"),
        ("PUT", "/status", "GET, HEAD"),
        ("DELETE", "/readyz", "GET, HEAD"),
        ("GET", "/shutdown", "POST"),
        ("HEAD", "/shutdown", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(admin: Running, method: str, path: str, allow: str) -> None:
    response, _ = admin.request(method, path)
    assert response.status == 405
    assert response.getheader("Allow") == allow
    assert admin.source.shutdowns == 0


@pytest.mark.parametrize("path", ["/", "/metrics/", "/METRICS", "/status.json", "/../metrics"])
def test_unknown_paths_are_404(admin: Running, path: str) -> None:
    response, body = admin.request("GET", path)
    assert response.status == 404
    assert b"/metrics" in body  # says what exists


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\x00y\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (
            b"POST /shutdown HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
        ),
        (
            b"POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
            413,
        ),
        (b"GET /livez HTTP/1.0\r\n\r\n", 200),  # HTTP/1.0 needs no Host
    ],
)
def test_malformed_requests(admin: Running, request_bytes: bytes, status: int) -> None:
    answer = raw(admin.address, request_bytes, half_close=True)
    assert status_line(answer).startswith(f"HTTP/1.1 {status} ")
    assert admin.source.shutdowns == 0


def test_oversized_head_is_431(admin: Running) -> None:
    response, body = admin.request("GET", "/metrics", headers={"X-Padding": "a" * MAX_HEAD})
    assert response.status == 431
    assert b"exceed 8192 bytes" in body


def test_a_head_just_under_the_limit_is_served(admin: Running) -> None:
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
    padded = head.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (MAX_HEAD - len(head)))
    assert len(padded) == MAX_HEAD
    assert status_line(raw(admin.address, padded)) == "HTTP/1.1 200 OK"


def test_slow_request_is_cut_off_with_408(loop: LoopThread) -> None:
    source = Source()
    server = start(loop, source, TcpListen("127.0.0.1", 0), read_timeout=0.2)
    try:
        # Half a request and then nothing: the server must answer and close on its own.
        answer = raw(server.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert status_line(answer) == "HTTP/1.1 408 Request Timeout"
        assert b"within 0.2 s" in answer
    finally:
        stop(loop, server)


def test_connection_closed_without_a_request(admin: Running) -> None:
    assert raw(admin.address, b"", half_close=True) == b""
    assert admin.request("GET", "/livez")[0].status == 200  # still serving


def test_the_server_closes_after_one_response(admin: Running) -> None:
    two = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw(admin.address, two)
    assert answer.count(b"HTTP/1.1 200 OK") == 1
    assert answer.endswith(b"\r\n\r\nok\n")


def test_non_2xx_are_logged_at_debug(admin: Running, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="proxy.admin"):
        admin.request("GET", "/nope")
        admin.request("GET", "/livez")
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.admin"]
    assert len(messages) == 1
    assert messages[0].startswith("admin GET '/nope' from 127.0.0.1:")
    assert ": 404 404 Not Found: no such endpoint" in messages[0]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "proxy.admin")


def test_a_failing_source_is_a_500_not_a_dead_endpoint(
    admin: Running, caplog: pytest.LogCaptureFixture
) -> None:
    admin.source.status_error = RuntimeError("bug in status")
    with caplog.at_level(logging.ERROR, logger="proxy.admin"):
        response, body = admin.request("GET", "/status")
    assert response.status == 500
    assert b"bug in status" not in body  # details go to the log, not to the client
    assert any("bug in status" in (r.exc_text or "") for r in caplog.records)
    assert admin.request("GET", "/livez")[0].status == 200


# --- shutdown


def test_shutdown_from_loopback(admin: Running) -> None:
    response, body = admin.request("POST", "/shutdown")
    assert response.status == 202
    assert body == b"shutting down\n"
    assert admin.source.shutdowns == 1


def test_shutdown_with_a_small_body(admin: Running) -> None:
    response, _ = admin.request("POST", "/shutdown", body=b"now=1")
    assert response.status == 202
    assert admin.source.shutdowns == 1


def test_shutdown_refuses_web_pages(admin: Running) -> None:
    response, body = admin.request("POST", "/shutdown", headers={"Origin": "http://evil.test"})
    assert response.status == 403
    assert b"Origin" in body
    assert admin.source.shutdowns == 0


@pytest.mark.parametrize(
    ("result", "status"),
    [((True, "configuration reloaded"), 200), ((False, "routes[0].upstream: bad"), 409)],
)
def test_reload_reports_whether_it_applied(
    admin: Running, result: tuple[bool, str], status: int
) -> None:
    admin.source.reload_result = result
    response, body = admin.request("POST", "/reload")
    assert response.status == status
    assert body == result[1].encode() + b"\n"
    assert admin.source.reloads == 1


def test_reload_refuses_web_pages(admin: Running) -> None:
    response, _ = admin.request("POST", "/reload", headers={"Origin": "http://evil.test"})
    assert response.status == 403
    assert admin.source.reloads == 0


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for UDP connect
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def test_shutdown_refused_from_the_network(loop: LoopThread) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    source = Source()
    server = start(loop, source, TcpListen(address, 0))
    try:
        answer = raw(server.address, b"POST /shutdown HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_line(answer) == "HTTP/1.1 403 Forbidden"
        assert b"only from a loopback address" in answer
        assert source.shutdowns == 0
        answer = raw(server.address, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_line(answer) == "HTTP/1.1 200 OK"  # everything else is served
    finally:
        stop(loop, server)


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (("127.0.0.1", 1), True),
        (("127.8.9.10", 1), True),
        (("::1", 1, 0, 0), True),
        (("::ffff:127.0.0.1", 1, 0, 0), True),
        (("10.0.0.4", 1), False),
        (("::ffff:10.0.0.4", 1, 0, 0), False),
        (("fe80::1%eth0", 1, 0, 2), False),
        ("/run/admin.sock", False),
        (None, False),
    ],
)
def test_loopback_peers(peer: object, loopback: bool) -> None:
    assert _is_loopback(peer) is loopback


def test_header_parsing() -> None:
    request = parse_head(
        b"GET /status?format=json&x=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a:  2 \r\n\r\n"
    )
    assert (request.method, request.path, request.query) == ("GET", "/status", "format=json&x=1")
    assert request.headers["x-a"] == ["1", "2"]
    assert request.header("HOST") == "a"


# --- lifecycle


def test_port_zero_is_resolved(admin: Running) -> None:
    host, port = admin.address
    assert host == "127.0.0.1"
    assert port > 0


def test_address_in_use_is_a_listen_error(admin: Running, loop: LoopThread) -> None:
    host, port = admin.address
    second = AdminServer(Source(), TcpListen(host, port))
    with pytest.raises(ListenError) as caught:
        loop.call(second.start)
    message = str(caught.value)
    assert f"admin endpoint: could not listen on 127.0.0.1:{port}" in message
    assert "--admin-listen" in message


def test_address_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not listening"):
        _ = AdminServer(Source(), TcpListen("127.0.0.1", 0)).address


def test_close_stops_listening(loop: LoopThread) -> None:
    server = start(loop, Source(), TcpListen("127.0.0.1", 0))
    address = server.address
    # A connection that is open (half a request) when the server closes is closed too.
    pending = socket.create_connection(address, timeout=TIMEOUT)
    try:
        pending.sendall(b"GET /livez HTTP/1.1\r\n")
        assert raw(address, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
        stop(loop, server)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=TIMEOUT).close()
        # Whatever the server said before closing, it did close.
        while pending.recv(65536):
            pass
    finally:
        pending.close()
