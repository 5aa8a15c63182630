"""``check``'s doctor against real servers: fake upstreams that misbehave on purpose, and the
real TLS-only PostgreSQL. Each failure must name the step that failed and the likely fix."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from proxy.config import upstream_from_params
from proxy.conninfo import parse_conninfo
from proxy.demo.cluster import TlsOnlyCluster
from proxy.demo.pki import CertificateAuthority
from proxy.doctor import (
    STEPS,
    CheckReport,
    Step,
    check_upstream,
    find_anchor,
    render_step,
    render_verdict,
)
from proxy.errors import ConfigError
from proxy.settings import Timeouts, UpstreamSettings
from tests.fake_servers import SSL_REQUEST, Conn, FakeUpstream, server_context


def tls_script(ctx: ssl.SSLContext, *, direct: bool = False) -> Callable[[Conn], None]:
    """A server that accepts TLS (after SSLRequest unless ``direct``) and then only listens."""

    def script(conn: Conn) -> None:
        if not direct:
            conn.recv_exact(8)
            conn.sock.sendall(b"S")
        conn.start_tls(ctx)
        conn.drain_tls()

    return script


def recording_sni(ctx: ssl.SSLContext) -> list[str | None]:
    seen: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)  # type: ignore[assignment]
    return seen


def upstream(conninfo: str) -> UpstreamSettings:
    return upstream_from_params(parse_conninfo(conninfo, key="--upstream"), key="--upstream")


def run_check(
    up: UpstreamSettings, timeouts: Timeouts | None = None
) -> tuple[CheckReport, list[Step]]:
    emitted: list[Step] = []
    report = asyncio.run(check_upstream(up, timeouts, emit=emitted.append))
    return report, emitted


def status(report: CheckReport) -> dict[str, str]:
    return {step.name: step.status for step in report.steps}


def text(report: CheckReport, up: UpstreamSettings) -> str:
    lines = [line for step in report.steps for line in render_step(step)]
    return "\n".join(lines + render_verdict(report, up))


def assert_nothing_sent(fake: FakeUpstream) -> None:
    """The doctor never sends a byte of a session: only SSLRequests, nothing inside TLS."""
    fake.wait_done()
    assert fake.connections
    for conn in fake.connections:
        assert bytes(conn.plaintext) in (SSL_REQUEST, b"")
        assert bytes(conn.decrypted) == b""


@pytest.fixture
def fake_with(certs: dict[str, Path]) -> Iterator[Callable[[str], tuple[FakeUpstream, str]]]:
    """``fake_with("wrong_ca")`` -> a started TLS server with that certificate, and the conninfo
    the sidecar would use for it (localhost, the trusted DER root, verify-full)."""
    started: list[FakeUpstream] = []

    def start(name: str) -> tuple[FakeUpstream, str]:
        ctx = server_context(certs[f"{name}.crt"], certs[f"{name}.key"], alpn=["postgresql"])
        fake = FakeUpstream(tls_script(ctx)).__enter__()
        started.append(fake)
        return fake, f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}"

    yield start
    for fake in started:
        fake.__exit__(None, None, None)


def test_good_server_every_step_ok(certs: dict[str, Path]) -> None:
    ctx = server_context(certs["good.crt"], certs["good.key"], alpn=["postgresql"])
    sni = recording_sni(ctx)
    with FakeUpstream(tls_script(ctx)) as fake:
        up = upstream(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        report, emitted = run_check(up)
        assert_nothing_sent(fake)
    assert report.ok and report.failed_step is None
    assert [s.name for s in report.steps] == list(STEPS)
    assert emitted == report.steps  # every step was handed out as it happened
    assert status(report) == {
        "resolve": "ok",
        "tcp": "ok",
        "negotiation": "ok",
        "tls": "ok",
        "chain": "info",
        "anchor": "ok",
        "verify": "ok",
    }
    tls_step = report.steps[3]
    assert tls_step.data["alpn"] == "postgresql"
    assert tls_step.data["sni"] == "localhost" and sni == ["localhost"]
    assert str(tls_step.data["version"]).startswith("TLSv1.")
    assert tls_step.data["hello_retry_group"] is None  # Python's server takes X25519
    assert "HelloRetryRequest" not in text(report, up)
    assert report.chain_source == "sidecar"
    assert [c.subject for c in report.chain] == ["CN=localhost"]
    assert report.chain[0].issuer == "CN=hostile-test trusted root"
    assert report.anchor is not None and report.anchor.subject == "CN=hostile-test trusted root"
    assert "127.0.0.1" in report.steps[0].summary
    assert text(report, up).splitlines()[-1].startswith("OK: the sidecar reaches localhost:")
    assert len(fake.connections) == 1  # success needs no diagnostic handshake


def test_wrong_host_names_the_certificate_names_and_tls_server_name(
    fake_with: Callable[[str], tuple[FakeUpstream, str]],
) -> None:
    fake, conninfo = fake_with("wrong_host")
    up = upstream(conninfo)
    report, _ = run_check(up)
    assert_nothing_sent(fake)
    assert report.failed_step == "verify"
    assert report.error is not None and report.error.reason == "tls_verify_failed"
    assert status(report)["anchor"] == "ok"  # the chain is fine; only the name is wrong
    [diagnosis] = report.diagnoses
    assert diagnosis.problem == "host_mismatch"
    assert 'checks host "localhost"' in diagnosis.text
    assert '"db.example.com"' in diagnosis.text
    assert diagnosis.fix is not None
    assert (
        "host=db.example.com" in diagnosis.fix and "tls_server_name=db.example.com" in diagnosis.fix
    )
    assert report.chain_source == "diagnostic"
    assert report.chain[0].names == ("db.example.com",)
    rendered = text(report, up)
    assert 'FAILED at step "verify" (reason tls_verify_failed)' in rendered
    assert "non-verifying TLS handshake" in rendered


def test_expired_certificate_gives_the_date(
    certs: dict[str, Path], fake_with: Callable[[str], tuple[FakeUpstream, str]]
) -> None:
    fake, conninfo = fake_with("expired")
    report, _ = run_check(upstream(conninfo))
    assert_nothing_sent(fake)
    assert report.failed_step == "verify"
    not_after = x509.load_pem_x509_certificate(
        certs["expired.crt"].read_bytes()
    ).not_valid_after_utc
    [diagnosis] = report.diagnoses
    assert diagnosis.problem == "expired"
    assert not_after.strftime("%Y-%m-%d %H:%M:%S UTC") in diagnosis.text
    assert "(1 day ago)" in diagnosis.text
    assert report.chain[0].status == "expired"
    assert "OpenSSL verify error 10" in str(report.error)


def test_wrong_ca_names_the_issuer_and_the_roots_we_have(
    fake_with: Callable[[str], tuple[FakeUpstream, str]],
) -> None:
    fake, conninfo = fake_with("wrong_ca")
    report, _ = run_check(upstream(conninfo))
    assert_nothing_sent(fake)
    assert report.failed_step == "verify"
    assert status(report)["anchor"] == "fail"
    [diagnosis] = report.diagnoses
    assert diagnosis.problem == "wrong_ca"
    assert 'leads to "CN=some other root"' in diagnosis.text
    assert 'holds only "CN=hostile-test trusted root"' in diagnosis.text
    assert diagnosis.fix is not None and "ca convert" in diagnosis.fix
    assert report.anchor is None


def test_intermediate_in_sslrootcert_is_diagnosed(tmp_path: Path) -> None:
    """Trusting only an intermediate fails (no partial chains); the doctor says why."""
    root = CertificateAuthority.create("Test Root G2")
    issuing = root.issue_intermediate("Test Issuing CA 01")
    leaf = issuing.issue_server()
    crt, key = leaf.write(tmp_path, "server", fullchain=True)
    (tmp_path / "intermediate.pem").write_bytes(issuing.cert_pem())
    ctx = server_context(crt, key, alpn=["postgresql"])
    with FakeUpstream(tls_script(ctx)) as fake:
        up = upstream(
            f"host=localhost port={fake.port} sslrootcert={tmp_path / 'intermediate.pem'}"
        )
        report, _ = run_check(up)
    assert report.failed_step == "verify"
    assert [c.subject for c in report.chain] == ["CN=localhost", "CN=Test Issuing CA 01"]
    [diagnosis] = report.diagnoses
    assert diagnosis.problem == "intermediate_as_root"
    assert diagnosis.fix is not None and '"CN=Test Root G2"' in diagnosis.fix


def test_server_answering_n_has_ssl_off() -> None:
    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"N")
        conn.drain_plaintext()

    with FakeUpstream(script) as fake:
        up = upstream(f"host=localhost port={fake.port}")
        report, _ = run_check(up)
        assert_nothing_sent(fake)
    assert report.failed_step == "negotiation"
    assert status(report) == {"resolve": "ok", "tcp": "ok", "negotiation": "fail"}
    assert report.error is not None and report.error.reason == "ssl_refused"
    assert "answered N" in str(report.error)
    assert "ssl = on" in text(report, up)


def test_refused_port() -> None:
    # Bound but not listening: connecting is refused, and nobody else can take the port.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        up = upstream(f"host=127.0.0.1 port={port}")
        report, _ = run_check(up)
    assert report.failed_step == "tcp"
    assert status(report) == {"resolve": "ok", "tcp": "fail"}
    assert report.error is not None and report.error.reason == "refused"
    assert "is the server running" in text(report, up)


def test_unresolvable_name() -> None:
    up = upstream("host=no-such-host.invalid")
    report, _ = run_check(up)
    assert report.failed_step == "resolve"
    assert [s.name for s in report.steps] == ["resolve"]
    assert report.error is not None and report.error.reason == "dns"
    assert "no-such-host.invalid" in report.steps[0].summary


def test_silent_server_times_out_waiting_for_the_answer() -> None:
    """TCP works, the SSLRequest is never answered: the negotiation step is blamed."""

    def script(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.drain_plaintext()  # never answers; returns when the doctor hangs up

    with FakeUpstream(script) as fake:
        up = upstream(f"host=localhost port={fake.port}")
        report, _ = run_check(up, Timeouts(connect=5, tls_handshake=0.5))
    assert report.failed_step == "negotiation"
    assert status(report) == {"resolve": "ok", "tcp": "ok", "negotiation": "fail"}
    assert report.error is not None and report.error.reason == "timeout"
    assert "second connection" in report.steps[1].summary


def test_tls_failure_that_is_not_verification_fails_the_tls_step(
    certs: dict[str, Path],
) -> None:
    """Direct TLS to a server without ALPN 'postgresql': libpq refuses, so does the doctor."""
    ctx = server_context(certs["good.crt"], certs["good.key"])  # no ALPN at all
    with FakeUpstream(tls_script(ctx, direct=True)) as fake:
        up = upstream(
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']} sslnegotiation=direct"
        )
        report, _ = run_check(up)
    assert report.failed_step == "tls"
    assert status(report)["negotiation"] == "ok"
    assert "direct TLS" in report.steps[2].summary
    assert report.diagnoses[0].problem == "tls_handshake"
    assert (
        report.diagnoses[0].fix is not None and "sslnegotiation=postgres" in report.diagnoses[0].fix
    )


def test_direct_tls_success(certs: dict[str, Path]) -> None:
    ctx = server_context(certs["good.crt"], certs["good.key"], alpn=["postgresql"])
    with FakeUpstream(tls_script(ctx, direct=True)) as fake:
        up = upstream(
            f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']} sslnegotiation=direct"
        )
        report, _ = run_check(up)
        fake.wait_done()
    assert report.ok, report.diagnoses
    assert fake.connections[0].plaintext == b""  # no SSLRequest before a direct ClientHello


def test_require_without_root_skips_the_anchor(certs: dict[str, Path]) -> None:
    ctx = server_context(certs["wrong_ca.crt"], certs["wrong_ca.key"], alpn=["postgresql"])
    with FakeUpstream(tls_script(ctx)) as fake:
        up = upstream(f"host=localhost port={fake.port} sslmode=require")
        report, _ = run_check(up)
    assert report.ok
    assert status(report)["anchor"] == "skip"
    assert "not authenticated" in report.steps[-1].summary


def test_unreadable_root_file_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "root.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    up = UpstreamSettings(host="localhost", port=1, sslrootcert=str(bad))
    with pytest.raises(ConfigError, match="sslrootcert"):
        run_check(up)


def test_real_server(pg: TlsOnlyCluster, pg_upstream: str) -> None:
    up = upstream(pg_upstream)
    report, _ = run_check(up)
    assert report.ok, text(report, up)
    assert report.chain[0].subject == "CN=localhost"
    assert report.anchor is not None
    assert report.anchor.subject == "CN=pg-tls-sidecar test root CA"
    assert report.steps[3].data["version"] in ("TLSv1.2", "TLSv1.3")
    assert report.steps[3].data["sni"] == "localhost"
    # PostgreSQL 15's ssl_ecdh_curve (prime256v1) against OpenSSL's X25519-first offer.
    assert report.steps[3].data["hello_retry_group"] == "prime256v1"
    assert "key-share group prime256v1 with a HelloRetryRequest" in text(report, up)


# -- find_anchor ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hierarchy() -> dict[str, x509.Certificate]:
    root = CertificateAuthority.create("Root A")
    other = CertificateAuthority.create("Root B")
    # Same name as Root A, different key: a name match alone must not count.
    impostor = CertificateAuthority.create("Root A")
    issuing = root.issue_intermediate("Issuing A1")
    return {
        "root": root.cert,
        "other": other.cert,
        "impostor": impostor.cert,
        "issuing": issuing.cert,
        "leaf": issuing.issue_server().cert,
        "direct_leaf": root.issue_server().cert,
    }


@pytest.mark.parametrize(
    ("chain", "roots", "expected"),
    [
        (["leaf", "issuing"], ["root"], ("root", 1, False)),
        (["direct_leaf"], ["other", "root"], ("root", 0, False)),
        (["leaf", "issuing", "root"], ["root"], ("root", 1, False)),
        (["leaf", "issuing"], ["issuing", "root"], ("issuing", 0, False)),
        (["root"], ["root"], ("root", 0, True)),
        (["leaf", "issuing"], ["other"], None),
        (["leaf", "issuing"], ["impostor"], None),
        (["leaf"], ["root"], None),  # the server left out its intermediate
        ([], ["root"], None),
    ],
    ids=[
        "via-intermediate",
        "leaf-issued-by-root",
        "server-sends-root-too",
        "intermediate-trusted-first",
        "self-signed-server",
        "other-root",
        "same-name-other-key",
        "missing-intermediate",
        "no-chain",
    ],
)
def test_find_anchor(
    hierarchy: dict[str, x509.Certificate],
    chain: list[str],
    roots: list[str],
    expected: tuple[str, int, bool] | None,
) -> None:
    anchor = find_anchor([hierarchy[c] for c in chain], [hierarchy[r] for r in roots])
    if expected is None:
        assert anchor is None
    else:
        assert anchor is not None
        assert (anchor.root, anchor.chain_index, anchor.presented) == (
            hierarchy[expected[0]],
            expected[1],
            expected[2],
        )


def test_days_left_is_relative_to_now(certs: dict[str, Path]) -> None:
    """The doctor's clock is injectable, so expiry wording is testable to the day."""
    ctx = server_context(certs["good.crt"], certs["good.key"], alpn=["postgresql"])
    cert = x509.load_pem_x509_certificate(certs["good.crt"].read_bytes())
    with FakeUpstream(tls_script(ctx)) as fake:
        up = upstream(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        later = cert.not_valid_after_utc - dt.timedelta(days=10, hours=1)
        report = asyncio.run(check_upstream(up, now=later))
    assert report.chain[0].days_left == 10
    assert report.chain[0].warning is not None and "expires in 10 days" in report.chain[0].warning
