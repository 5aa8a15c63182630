"""The throwaway PKI must give certificates that real OpenSSL accepts as a server presents them."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.demo.pki import CertificateAuthority, Issued, KeyType

KEY_TYPES: tuple[KeyType, ...] = ("ec", "rsa")


def server_context(
    tmp_path: Path, leaf: Issued, *, client_ca: CertificateAuthority | None = None
) -> ssl.SSLContext:
    cert, key = leaf.write(tmp_path / "server", "server", fullchain=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca.cert_pem().decode())
    return ctx


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """Runs both sides of a real handshake over a socket pair; the server side in a thread."""
    client_raw, server_raw = socket.socketpair()
    client_raw.settimeout(10)
    server_raw.settimeout(10)
    outcome: dict[str, object] = {}

    def serve() -> None:
        try:
            outcome["server"] = server_ctx.wrap_socket(server_raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = client_ctx.wrap_socket(client_raw, server_hostname=server_hostname)
    finally:
        thread.join()
    if "error" in outcome:
        raise AssertionError(f"server side failed: {outcome['error']}")
    server = outcome["server"]
    assert isinstance(server, ssl.SSLSocket)
    return client, server


def python_client(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.root_pem().decode())
    return ctx


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_python_ssl_verifies_server_issued_by_root(tmp_path: Path, key_type: KeyType) -> None:
    ca = CertificateAuthority.create(key_type=key_type)
    leaf = ca.issue_server(key_type=key_type)
    client, server = handshake(server_context(tmp_path, leaf), python_client(ca), "localhost")
    with client, server:
        der = client.getpeercert(binary_form=True)
        assert der == leaf.cert_der()


def test_server_chain_through_intermediate_anchors_at_root(tmp_path: Path) -> None:
    root = CertificateAuthority.create()
    issuing = root.issue_intermediate("throwaway issuing CA", key_type="rsa")
    leaf = issuing.issue_server(dns_names=("db.example.test",), ip_addresses=())
    assert leaf.intermediates == (issuing.cert,)
    client, server = handshake(
        server_context(tmp_path, leaf), python_client(issuing), "db.example.test"
    )
    with client, server:
        assert client.version() is not None


def test_python_ssl_rejects_name_not_in_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    leaf = ca.issue_server()
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server_context(tmp_path, leaf), python_client(ca), "elsewhere.test")


def test_client_certificate_accepted_by_server_requiring_one(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    leaf = ca.issue_server()
    user = ca.issue_client("alice", key_type="rsa")
    client_ctx = python_client(ca)
    cert, key = user.write(tmp_path / "client", "alice")
    client_ctx.load_cert_chain(cert, key)
    client, server = handshake(
        server_context(tmp_path, leaf, client_ca=ca), client_ctx, "localhost"
    )
    with client, server:
        # In TLS 1.3 the server checks the client certificate after the client's handshake
        # returns; a round trip proves the server accepted it.
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        peer = server.getpeercert()
        assert peer is not None
        assert (("commonName", "alice"),) in peer["subject"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_openssl_verify_strict_accepts_chain(tmp_path: Path, key_type: KeyType) -> None:
    root = CertificateAuthority.create(key_type=key_type)
    issuing = root.issue_intermediate("issuing", key_type=key_type)
    server = issuing.issue_server(key_type=key_type)
    client = issuing.issue_client("bob", key_type=key_type)
    (tmp_path / "root.pem").write_bytes(root.cert_pem())
    (tmp_path / "inter.pem").write_bytes(issuing.chain_pem())
    (tmp_path / "server.pem").write_bytes(server.cert_pem())
    (tmp_path / "client.pem").write_bytes(client.cert_pem())
    for leaf, purpose in (("server.pem", "sslserver"), ("client.pem", "sslclient")):
        result = subprocess.run(
            [
                "openssl",
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                "root.pem",
                "-untrusted",
                "inter.pem",
                leaf,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{leaf}: OK" in result.stdout


def test_certificates_carry_realistic_extensions() -> None:
    root = CertificateAuthority.create()
    issuing = root.issue_intermediate("issuing")
    leaf = issuing.issue_server(key_type="rsa")
    user = issuing.issue_client("carol")

    root_bc = root.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_bc.critical and root_bc.value.ca and root_bc.value.path_length is None
    inter_bc = issuing.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert inter_bc.ca and inter_bc.path_length == 0
    assert issuing.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    leaf_ext = leaf.cert.extensions
    assert not leaf_ext.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf_ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    assert list(leaf_ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert list(user.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    issuer_ski = issuing.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf_aki = leaf_ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf_aki.value.key_identifier == issuer_ski.value.digest
    assert leaf_ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    serials = {c.serial_number for c in (root.cert, issuing.cert, leaf.cert, user.cert)}
    assert len(serials) == 4


def test_default_validity_starts_an_hour_ago_and_lasts_a_year() -> None:
    before = datetime.now(UTC)
    leaf = CertificateAuthority.create().issue_server()
    start, end = leaf.cert.not_valid_before_utc, leaf.cert.not_valid_after_utc
    assert before - timedelta(hours=1, minutes=1) <= start <= before - timedelta(minutes=59)
    assert timedelta(days=364) < end - before <= timedelta(days=366)


def test_no_names_gives_no_san_extension() -> None:
    leaf = CertificateAuthority.create().issue_server(
        common_name="cn-only.test", dns_names=(), ip_addresses=()
    )
    with pytest.raises(x509.ExtensionNotFound):
        leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert leaf.cert.subject.rfc4514_string() == "CN=cn-only.test"


def test_default_server_names_cover_loopback() -> None:
    leaf = CertificateAuthority.create().issue_server()
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_empty_subject_makes_san_critical() -> None:
    leaf = CertificateAuthority.create().issue_server(
        common_name=None, dns_names=("x.test",), ip_addresses=()
    )
    assert len(leaf.cert.subject) == 0
    assert leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_write_creates_private_key_file_matching_certificate(tmp_path: Path) -> None:
    leaf = CertificateAuthority.create().issue_server()
    cert_path, key_path = leaf.write(tmp_path / "out", "srv")
    assert (cert_path.name, key_path.name) == ("srv.crt", "srv.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert cert == leaf.cert
    assert key.public_key() == cert.public_key()
    _, loose = leaf.write(tmp_path / "out", "loose", key_mode=0o644)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o644


def test_encrypted_key_needs_its_password(tmp_path: Path) -> None:
    leaf = CertificateAuthority.create().issue_client("dave")
    _, key_path = leaf.write(tmp_path, "dave", password=b"s3cret")
    assert b"ENCRYPTED" in key_path.read_bytes()
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=b"s3cret")
    assert key.public_key() == leaf.cert.public_key()


def test_crl_lists_revoked_serials_and_is_signed_by_the_ca() -> None:
    ca = CertificateAuthority.create()
    revoked, kept = ca.issue_server(), ca.issue_server()
    crl = x509.load_pem_x509_crl(ca.crl([revoked], next_update_days=7))
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.cert.subject
    assert crl.get_revoked_certificate_by_serial_number(revoked.cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.cert.serial_number) is None
    assert crl.next_update_utc is not None
    assert timedelta(days=6) < crl.next_update_utc - datetime.now(UTC) <= timedelta(days=7)


def test_chain_pem_excludes_the_root() -> None:
    root = CertificateAuthority.create()
    a = root.issue_intermediate("A")
    b = a.issue_intermediate("B")
    assert root.chain_pem() == b""
    assert b.chain_pem() == b.cert_pem() + a.cert_pem()
    assert b.root is root
    assert b.root_pem() == root.cert_pem()
