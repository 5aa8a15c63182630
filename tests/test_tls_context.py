"""build_client_context + verify_peer against real TLS servers: libpq's sslmode verdicts."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxy.demo.pki import CertificateAuthority, Issued
from proxy.errors import ConfigError, UpstreamError
from proxy.hostname import CertificateNameMismatch
from proxy.settings import UpstreamSettings
from proxy.tls import (
    PeerInfo,
    TlsConfigError,
    build_client_context,
    load_certificates,
    load_crls,
    sni_for,
    upstream_error_from_ssl,
    verify_peer,
)


@dataclass
class ServerSide:
    sock: ssl.SSLSocket | None = None
    error: BaseException | None = None
    sni: list[str | None] = field(default_factory=list)
    selected_alpn: str | None = None


def server_context(
    tmp_path: Path,
    leaf: Issued,
    *,
    alpn: bool = True,
    max_version: ssl.TLSVersion | None = None,
    client_ca: CertificateAuthority | None = None,
) -> ssl.SSLContext:
    cert, key = leaf.write(tmp_path / "srv", "server", fullchain=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(["postgresql"])
    if max_version is not None:
        ctx.maximum_version = max_version
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca.cert_pem().decode())
    return ctx


def connect(server_ctx: ssl.SSLContext, up: UpstreamSettings) -> tuple[PeerInfo, ServerSide]:
    """One real handshake over a socket pair (server in a thread), then libpq's checks."""
    side = ServerSide()
    server_ctx.sni_callback = lambda _obj, name, _ctx: side.sni.append(name)
    client_ctx = build_client_context(up)
    client_raw, server_raw = socket.socketpair()
    client_raw.settimeout(10)
    server_raw.settimeout(10)

    def serve() -> None:
        try:
            side.sock = server_ctx.wrap_socket(server_raw, server_side=True)
            side.selected_alpn = side.sock.selected_alpn_protocol()
        except (ssl.SSLError, OSError) as exc:
            side.error = exc
            server_raw.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = client_ctx.wrap_socket(client_raw, server_hostname=sni_for(up))
    except ssl.SSLError as exc:
        raise upstream_error_from_ssl(exc, up) from exc
    finally:
        thread.join()
    try:
        with client:
            return verify_peer(client, up), side
    finally:
        if side.sock is not None:
            side.sock.close()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def leaf(ca: CertificateAuthority) -> Issued:
    return ca.issue_server(dns_names=("db.example.test", "localhost"))


def root_file(tmp_path: Path, ca: CertificateAuthority, name: str = "root.crt") -> str:
    path = tmp_path / name
    path.write_bytes(ca.root_pem())
    return str(path)


def up_for(**kwargs: object) -> UpstreamSettings:
    return dataclasses.replace(UpstreamSettings(host="db.example.test"), **kwargs)  # type: ignore[arg-type]


def test_trusted_ca_succeeds_with_alpn_and_sni(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    up = up_for(sslrootcert=root_file(tmp_path, ca))
    peer, side = connect(server_context(tmp_path, leaf), up)
    assert peer.version == "TLSv1.3"
    assert peer.alpn == "postgresql"
    assert peer.chain_der[0] == leaf.cert_der()
    assert peer.cipher
    assert side.sni == ["db.example.test"]
    assert side.error is None


@pytest.mark.parametrize(
    ("server_protocols", "selected"), [(["postgresql"], "postgresql"), (["h2"], None)]
)
def test_alpn_postgresql_is_offered(
    tmp_path: Path,
    ca: CertificateAuthority,
    leaf: Issued,
    server_protocols: list[str],
    selected: str | None,
) -> None:
    """The server can only select a protocol the client offered, so its choice shows the offer."""
    server_ctx = server_context(tmp_path, leaf, alpn=False)
    server_ctx.set_alpn_protocols(server_protocols)
    peer, side = connect(server_ctx, up_for(sslrootcert=root_file(tmp_path, ca)))
    assert peer.alpn == selected
    assert side.selected_alpn == selected


def test_wrong_ca_fails_verification(tmp_path: Path, leaf: Issued) -> None:
    other = CertificateAuthority.create("some other root")
    root = root_file(tmp_path, other, "other.pem")
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, leaf), up_for(sslrootcert=root))
    assert info.value.reason == "tls_verify_failed"
    assert "unable to get local issuer certificate" in str(info.value)
    assert info.value.hint is not None
    assert f"does not anchor at any root in {root}" in info.value.hint
    assert "DigiCert Global Root G2" in info.value.hint


def test_expired_leaf_fails(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    expired = ca.issue_server(
        dns_names=("db.example.test",),
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, expired), up_for(sslrootcert=root_file(tmp_path, ca)))
    assert info.value.reason == "tls_verify_failed"
    assert "certificate has expired" in str(info.value)
    assert info.value.hint is not None and "clock" in info.value.hint


def test_der_cer_root_works(tmp_path: Path, ca: CertificateAuthority, leaf: Issued) -> None:
    cer = tmp_path / "DigiCertGlobalRootG2.cer"
    cer.write_bytes(ca.cert_der())
    peer, _ = connect(server_context(tmp_path, leaf), up_for(sslrootcert=str(cer)))
    assert peer.chain_der[0] == leaf.cert_der()


def test_bundle_with_right_root_last_works(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    bundle = tmp_path / "bundle.pem"
    others = [CertificateAuthority.create(f"unrelated root {i}").cert_pem() for i in range(3)]
    bundle.write_bytes(b"".join(others) + ca.cert_pem())
    assert len(load_certificates(str(bundle))) == 4
    peer, _ = connect(server_context(tmp_path, leaf), up_for(sslrootcert=str(bundle)))
    assert peer.alpn == "postgresql"


def test_require_without_root_accepts_self_signed(tmp_path: Path) -> None:
    self_signed = CertificateAuthority.create("db.example.test")
    server = Issued(self_signed.cert, self_signed.key)
    peer, _ = connect(server_context(tmp_path, server), up_for(sslmode="require"))
    assert peer.chain_der[0] == self_signed.cert_der()


def test_require_with_root_checks_the_chain(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    other = root_file(tmp_path, CertificateAuthority.create("other"), "other.pem")
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, leaf), up_for(sslmode="require", sslrootcert=other))
    assert info.value.reason == "tls_verify_failed"
    # ...but it does not check the name, exactly like libpq
    up = up_for(sslmode="require", sslrootcert=root_file(tmp_path, ca), host="not-the-name.test")
    peer, _ = connect(server_context(tmp_path, leaf), up)
    assert peer.version


@pytest.mark.parametrize(("sslmode", "accepted"), [("verify-ca", True), ("verify-full", False)])
def test_name_checked_only_under_verify_full(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued, sslmode: str, accepted: bool
) -> None:
    up = up_for(sslmode=sslmode, sslrootcert=root_file(tmp_path, ca), host="wrong.example.test")
    if accepted:
        assert connect(server_context(tmp_path, leaf), up)[0].version
    else:
        with pytest.raises(CertificateNameMismatch) as info:
            connect(server_context(tmp_path, leaf), up)
        assert info.value.reason == "tls_verify_failed"
        assert 'does not match host name "wrong.example.test"' in str(info.value)


def test_name_check_is_remembered_per_name_and_never_for_a_refusal(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    """The name check is cached by certificate and name (it was the costliest Python per new
    session); a pass for one name must not let another through, before or after a pass."""
    root = root_file(tmp_path, ca)
    server = server_context(tmp_path, leaf)
    wrong = up_for(sslrootcert=root, host="wrong.example.test")
    right = up_for(sslrootcert=root)
    for up, accepted in ((wrong, False), (right, True), (right, True), (wrong, False)):
        if accepted:
            assert connect(server, up)[0].chain_der[0] == leaf.cert_der()
        else:
            with pytest.raises(CertificateNameMismatch):
                connect(server, up)
    # Another certificate for other names, checked against the name that just passed.
    other = ca.issue_server(dns_names=("other.example.test",))
    with pytest.raises(CertificateNameMismatch):
        connect(server_context(tmp_path / "other", other), right)


def test_tls_server_name_is_verified_and_sent(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    up = up_for(
        host="10.1.2.3", tls_server_name="db.example.test", sslrootcert=root_file(tmp_path, ca)
    )
    _, side = connect(server_context(tmp_path, leaf), up)
    assert side.sni == ["db.example.test"]


def test_crl_revokes(tmp_path: Path, ca: CertificateAuthority) -> None:
    revoked = ca.issue_server(dns_names=("db.example.test",))
    kept = ca.issue_server(dns_names=("db.example.test",))
    crl = tmp_path / "root.crl"
    crl.write_bytes(ca.crl([revoked]))
    up = up_for(sslrootcert=root_file(tmp_path, ca), sslcrl=str(crl))
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, revoked), up)
    assert info.value.reason == "tls_verify_failed"
    assert "certificate revoked" in str(info.value)
    assert connect(server_context(tmp_path, kept), up)[0].version


def test_der_crl_revokes(tmp_path: Path, ca: CertificateAuthority) -> None:
    revoked = ca.issue_server(dns_names=("db.example.test",))
    pem = ca.crl([revoked])
    der = x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)
    crl = tmp_path / "root.crl.der"
    crl.write_bytes(der)
    assert len(load_crls(str(crl))) == 1
    up = up_for(sslrootcert=root_file(tmp_path, ca), sslcrl=str(crl))
    with pytest.raises(UpstreamError, match="certificate revoked"):
        connect(server_context(tmp_path, revoked), up)


def test_crl_check_covers_whole_chain(tmp_path: Path) -> None:
    root = CertificateAuthority.create()
    issuing = root.issue_intermediate("issuing")
    leaf = issuing.issue_server(dns_names=("db.example.test",))
    only_issuing = tmp_path / "issuing.crl"
    only_issuing.write_bytes(issuing.crl())
    up = up_for(sslrootcert=root_file(tmp_path, root), sslcrl=str(only_issuing))
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, leaf), up)
    assert "unable to get certificate CRL" in str(info.value)
    assert info.value.hint is not None and "the root included" in info.value.hint
    both = tmp_path / "both.crl"
    both.write_bytes(root.crl() + issuing.crl())
    assert connect(
        server_context(tmp_path, leaf), up_for(sslrootcert=up.sslrootcert, sslcrl=str(both))
    )[0]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
def test_crl_directory_revokes(tmp_path: Path, ca: CertificateAuthority) -> None:
    revoked = ca.issue_server(dns_names=("db.example.test",))
    crldir = tmp_path / "crls"
    crldir.mkdir()
    (crldir / "root.crl.pem").write_bytes(ca.crl([revoked]))
    subprocess.run(["openssl", "rehash", str(crldir)], check=True, capture_output=True)
    assert any(p.name.endswith(".r0") for p in crldir.iterdir())
    up = up_for(sslrootcert=root_file(tmp_path, ca), sslcrldir=str(crldir))
    with pytest.raises(UpstreamError, match="certificate revoked"):
        connect(server_context(tmp_path, revoked), up)


def test_only_intermediate_as_root_fails(tmp_path: Path) -> None:
    root = CertificateAuthority.create()
    issuing = root.issue_intermediate("issuing")
    leaf = issuing.issue_server(dns_names=("db.example.test",))
    inter = tmp_path / "intermediate.pem"
    inter.write_bytes(issuing.cert_pem())
    up = up_for(sslrootcert=str(inter))
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, leaf), up)
    assert info.value.reason == "tls_verify_failed"
    # Proof the test can tell: with partial-chain (Python 3.13's default) the same setup passes.
    permissive = build_client_context(up)
    permissive.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    client_raw, server_raw = socket.socketpair()
    server_ctx = server_context(tmp_path, leaf)
    thread = threading.Thread(
        target=lambda: server_ctx.wrap_socket(server_raw, server_side=True).close()
    )
    thread.start()
    with permissive.wrap_socket(client_raw, server_hostname="db.example.test") as client:
        thread.join()
        assert client.version()


def test_certificate_without_authority_key_identifier_accepted(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """X509_STRICT (Python 3.13's default) rejects this; libpq does not, and neither do we."""
    template = ca.issue_server(dns_names=("db.example.test",))
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(template.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.cert.not_valid_before_utc)
        .not_valid_after(template.cert.not_valid_after_utc)
    )
    for ext in template.cert.extensions:
        if not isinstance(ext.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    no_aki = Issued(builder.sign(ca.key, hashes.SHA256()), template.key)
    peer, _ = connect(server_context(tmp_path, no_aki), up_for(sslrootcert=root_file(tmp_path, ca)))
    assert peer.chain_der[0] == no_aki.cert_der()


def test_tls13_client_vs_tls12_server_fails(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    server_ctx = server_context(tmp_path, leaf, max_version=ssl.TLSVersion.TLSv1_2)
    up = up_for(sslrootcert=root_file(tmp_path, ca), ssl_min_protocol_version="TLSv1.3")
    with pytest.raises(UpstreamError) as info:
        connect(server_ctx, up)
    assert info.value.reason == "tls_handshake"
    assert info.value.hint is not None and "between TLSv1.3 and" in info.value.hint


def test_max_version_is_applied(tmp_path: Path, ca: CertificateAuthority, leaf: Issued) -> None:
    up = up_for(sslrootcert=root_file(tmp_path, ca), ssl_max_protocol_version="TLSv1.2")
    assert connect(server_context(tmp_path, leaf), up)[0].version == "TLSv1.2"


def test_direct_negotiation_requires_alpn(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    up = up_for(sslrootcert=root_file(tmp_path, ca), sslnegotiation="direct")
    with pytest.raises(UpstreamError) as info:
        connect(server_context(tmp_path, leaf, alpn=False), up)
    assert info.value.reason == "tls_handshake"
    assert "ALPN" in str(info.value)
    assert connect(server_context(tmp_path, leaf), up)[0].alpn == "postgresql"


# --- client certificates --------------------------------------------------------------------


def client_files(
    tmp_path: Path, user: Issued, mode: int = 0o600, password: bytes | None = None
) -> tuple[str, str]:
    cert, key = user.write(tmp_path / "client", "user", key_mode=mode, password=password)
    return str(cert), str(key)


def test_client_certificate_is_presented(
    tmp_path: Path, ca: CertificateAuthority, leaf: Issued
) -> None:
    cert, key = client_files(tmp_path, ca.issue_client("alice"))
    up = up_for(sslrootcert=root_file(tmp_path, ca), sslcert=cert, sslkey=key)
    side = ServerSide()
    server_ctx = server_context(tmp_path, leaf, client_ca=ca)
    client_raw, server_raw = socket.socketpair()

    def serve() -> None:
        side.sock = server_ctx.wrap_socket(server_raw, server_side=True)

    thread = threading.Thread(target=serve)
    thread.start()
    with build_client_context(up).wrap_socket(client_raw, server_hostname=sni_for(up)) as client:
        thread.join()
        client.sendall(b"x")  # TLS 1.3: the server judges the client certificate after this
        assert side.sock is not None
        with side.sock:
            assert side.sock.recv(1) == b"x"
            peer = side.sock.getpeercert()
            assert peer is not None and (("commonName", "alice"),) in peer["subject"]


def test_encrypted_key_with_password(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert, key = client_files(tmp_path, ca.issue_client("bob"), password=b"hunter2")
    ctx = build_client_context(up_for(sslcert=cert, sslkey=key, sslpassword="hunter2"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsConfigError, match="is encrypted") as info:
        build_client_context(up_for(sslcert=cert, sslkey=key))
    assert info.value.key == "sslkey"
    with pytest.raises(TlsConfigError, match="could not be decrypted") as wrong:
        build_client_context(up_for(sslcert=cert, sslkey=key, sslpassword="wrong-pw"))
    assert "wrong-pw" not in str(wrong.value)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o660])
def test_key_with_loose_permissions_rejected(
    tmp_path: Path, ca: CertificateAuthority, mode: int
) -> None:
    cert, key = client_files(tmp_path, ca.issue_client("carol"), mode=mode)
    with pytest.raises(TlsConfigError) as info:
        build_client_context(up_for(sslcert=cert, sslkey=key))
    assert isinstance(info.value, ConfigError)
    assert key in str(info.value) and f"{mode:04o}" in str(info.value)
    assert "group or world access" in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a root-owned key file")
def test_root_owned_key_may_be_group_readable(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert, key = client_files(tmp_path, ca.issue_client("dave"), mode=0o640)
    assert build_client_context(up_for(sslcert=cert, sslkey=key)).verify_mode == ssl.CERT_REQUIRED


def test_mismatched_key_rejected(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert, _ = client_files(tmp_path, ca.issue_client("erin"))
    _, other_key = ca.issue_client("frank").write(tmp_path / "other", "frank")
    with pytest.raises(TlsConfigError, match="does not match private key file") as info:
        build_client_context(up_for(sslcert=cert, sslkey=str(other_key)))
    assert b"PRIVATE KEY" not in str(info.value).encode()


def test_key_that_is_not_a_key_rejected(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert, key = client_files(tmp_path, ca.issue_client("gina"))
    Path(key).write_bytes(b"not a key\n")
    with pytest.raises(TlsConfigError, match="is not a PEM private key"):
        build_client_context(up_for(sslcert=cert, sslkey=key))


# --- configuration-level behaviour -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\x00\x01garbage", "neither a PEM certificate file nor a DER certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            "cannot be parsed",
        ),
    ],
)
def test_unusable_root_file_is_a_config_error(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "root.pem"
    path.write_bytes(content)
    with pytest.raises(TlsConfigError, match=problem) as info:
        build_client_context(up_for(sslrootcert=str(path)))
    assert info.value.key == "sslrootcert"
    assert str(path) in str(info.value)


def test_missing_root_file_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TlsConfigError, match="could not read certificate file") as info:
        build_client_context(up_for(sslrootcert=missing))
    assert missing in str(info.value)


def test_bad_crl_is_a_config_error(tmp_path: Path, ca: CertificateAuthority) -> None:
    bad = tmp_path / "bad.crl"
    bad.write_bytes(ca.cert_pem())  # a certificate is not a CRL
    with pytest.raises(TlsConfigError, match="not a certificate revocation list") as info:
        build_client_context(up_for(sslrootcert=root_file(tmp_path, ca), sslcrl=str(bad)))
    assert info.value.key == "sslcrl"
    with pytest.raises(TlsConfigError, match="not a readable directory"):
        build_client_context(up_for(sslrootcert=root_file(tmp_path, ca), sslcrldir=str(bad)))


@pytest.mark.parametrize(
    ("sslmode", "rootcert", "verify_mode"),
    [
        ("require", None, ssl.CERT_NONE),
        ("require", "file", ssl.CERT_REQUIRED),
        ("verify-ca", "file", ssl.CERT_REQUIRED),
        ("verify-ca", None, ssl.CERT_REQUIRED),
        ("verify-full", "file", ssl.CERT_REQUIRED),
        ("verify-full", "system", ssl.CERT_REQUIRED),
        ("require", "system", ssl.CERT_REQUIRED),  # system forces verify-full
    ],
)
def test_verify_mode_and_flags(
    tmp_path: Path,
    ca: CertificateAuthority,
    sslmode: str,
    rootcert: str | None,
    verify_mode: ssl.VerifyMode,
) -> None:
    root = root_file(tmp_path, ca) if rootcert == "file" else rootcert
    ctx = build_client_context(up_for(sslmode=sslmode, sslrootcert=root))
    assert ctx.verify_mode == verify_mode
    assert ctx.check_hostname is False
    assert ctx.verify_flags & ssl.VERIFY_X509_TRUSTED_FIRST
    assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    assert not ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert not ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_crl_flags_only_with_crl(tmp_path: Path, ca: CertificateAuthority) -> None:
    crl = tmp_path / "root.crl"
    crl.write_bytes(ca.crl())
    ctx = build_client_context(up_for(sslrootcert=root_file(tmp_path, ca), sslcrl=str(crl)))
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN == ssl.VERIFY_CRL_CHECK_CHAIN


@pytest.mark.parametrize(
    ("host", "server_name", "sslsni", "sni"),
    [
        ("db.example.test", None, True, "db.example.test"),
        ("db.example.test", None, False, None),
        ("192.0.2.1", None, True, None),
        ("::1", None, True, None),
        ("2001:db8::1", None, True, None),
        ("10.0.0.1", "pg.example.test", True, "pg.example.test"),
        ("0x7f.1", None, True, "0x7f.1"),  # libpq's textual test: not digits-and-dots only
    ],
)
def test_sni_for(host: str, server_name: str | None, sslsni: bool, sni: str | None) -> None:
    assert sni_for(up_for(host=host, tls_server_name=server_name, sslsni=sslsni)) == sni
