"""Server-name verdicts must be libpq's: a table over real certificates, with psql as oracle."""

from __future__ import annotations

import functools
import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.demo.pki import CertificateAuthority, Issued
from proxy.errors import UpstreamError
from proxy.hostname import (
    CertificateNameMismatch,
    certificate_names,
    check_server_name,
    inet_aton,
    inet_pton6,
    is_ip_address,
)


@functools.cache
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


# name -> (common_name, dns_names, ip_addresses)
CERTS: dict[str, tuple[str | None, Sequence[str], Sequence[str]]] = {
    "cn_only": ("db.example.test", (), ()),
    "one_san": (None, ("db.example.test",), ()),
    "several_wild": ("db.example.test", ("db.example.test", "*.wildcard.test", "other.test"), ()),
    "cn_not_in_san": ("cn.example.test", ("san.example.test",), ()),
    "no_names": (None, (), ()),
    "ipv4_cn": ("192.0.2.1", (), ()),
    "ipv4_dns_san": (None, ("192.0.2.1",), ()),
    "ip_sans": ("ip-cn.example.test", ("ip.example.test",), ("192.0.2.1", "2001:db8::1")),
    "ip_san_and_ip_cn": ("192.0.2.1", (), ("192.0.2.9",)),
    "dns_san_and_ip_cn": ("192.0.2.1", ("db.example.test",), ()),
    "tld_wildcard": (None, ("*.test",), ()),
}


@functools.cache
def issued(name: str) -> Issued:
    cn, dns, ips = CERTS[name]
    return ca().issue_server(common_name=cn, dns_names=dns, ip_addresses=ips)


# (certificate, host, libpq accepts it)
CASES: list[tuple[str, str, bool]] = [
    ("cn_only", "db.example.test", True),
    ("cn_only", "DB.Example.TEST", True),
    ("cn_only", "other.example.test", False),
    ("one_san", "db.example.test", True),
    ("one_san", "example.test", False),
    ("several_wild", "other.test", True),
    ("several_wild", "x.wildcard.test", True),
    ("several_wild", "X.WildCard.Test", True),
    ("several_wild", "a.b.wildcard.test", False),  # the wildcard covers one label only
    ("several_wild", "wildcard.test", False),
    ("several_wild", "db.example.tes", False),
    ("cn_not_in_san", "cn.example.test", False),  # a DNS SAN hides the CN
    ("cn_not_in_san", "san.example.test", True),
    ("no_names", "db.example.test", False),
    ("ipv4_cn", "192.0.2.1", True),
    ("ipv4_cn", "192.000.002.001", False),  # CN is compared as a string, not as an address
    ("ipv4_cn", "192.0.2.2", False),
    ("ipv4_dns_san", "192.0.2.1", True),  # an IP host is compared against DNS SANs as text
    ("ipv4_dns_san", "192.000.002.001", False),
    ("ip_sans", "192.0.2.1", True),
    ("ip_sans", "192.000.002.001", True),  # inet_aton: leading zeros, compared as bytes
    ("ip_sans", "3221225985", True),  # inet_aton: a single 32-bit number
    ("ip_sans", "192.0.2.2", False),
    ("ip_sans", "2001:db8::1", True),
    ("ip_sans", "2001:0DB8:0:0::0001", True),
    ("ip_sans", "2001:db8::2", False),
    ("ip_sans", "ip.example.test", True),
    ("ip_sans", "ip-cn.example.test", False),  # DNS SAN present: CN ignored for names
    ("ip_san_and_ip_cn", "192.0.2.1", False),  # IP SAN present: CN ignored for addresses
    ("ip_san_and_ip_cn", "192.0.2.9", True),
    ("dns_san_and_ip_cn", "192.0.2.1", True),  # libpq's quirk: no IP SAN, so the CN counts
    ("dns_san_and_ip_cn", "db.example.test", True),
    ("tld_wildcard", "example.test", True),  # libpq allows *.tld
    ("tld_wildcard", "a.example.test", False),
]


@pytest.mark.parametrize(("cert_name", "host", "accepted"), CASES)
def test_verdict_table(cert_name: str, host: str, accepted: bool) -> None:
    cert = issued(cert_name).cert
    if accepted:
        check_server_name(cert, host)
    else:
        with pytest.raises(CertificateNameMismatch) as info:
            check_server_name(cert, host)
        assert info.value.reason == "tls_verify_failed"
        assert isinstance(info.value, UpstreamError)
        assert f'host name "{host}"' in str(info.value)


@pytest.mark.parametrize(
    ("cert_name", "host", "message"),
    [
        (
            "several_wild",
            "nope.test",
            'server certificate for "db.example.test" (and 2 other names) does not match '
            'host name "nope.test"',
        ),
        (
            "cn_not_in_san",
            "cn.example.test",
            'server certificate for "san.example.test" does not match host name "cn.example.test"',
        ),
        (
            "ip_san_and_ip_cn",
            "db.example.test",
            'server certificate for "192.0.2.9" (and 1 other name) does not match '
            'host name "db.example.test"',
        ),
    ],
)
def test_mismatch_message_follows_libpq(cert_name: str, host: str, message: str) -> None:
    with pytest.raises(CertificateNameMismatch) as info:
        check_server_name(issued(cert_name).cert, host)
    assert str(info.value) == message
    assert info.value.host == host
    assert info.value.hint is not None and "tls_server_name" in info.value.hint


def test_no_names_says_the_certificate_names_no_host() -> None:
    with pytest.raises(CertificateNameMismatch) as info:
        check_server_name(issued("no_names").cert, "db.example.test")
    assert str(info.value).startswith("could not get server's host name from server certificate")
    assert info.value.names == ()


def test_names_lists_everything_the_certificate_carries() -> None:
    assert certificate_names(issued("ip_sans").cert) == (
        "ip.example.test",
        "192.0.2.1",
        "2001:db8::1",
        "ip-cn.example.test",
    )
    with pytest.raises(CertificateNameMismatch) as info:
        check_server_name(issued("ip_sans").cert, "wrong.test")
    assert info.value.names == certificate_names(issued("ip_sans").cert)
    assert info.value.hint is not None and '"2001:db8::1"' in info.value.hint


@pytest.mark.parametrize(
    ("cn", "dns", "host"),
    [
        ("db.example.test\x00.evil.test", (), "db.example.test"),
        (None, ("db.example.test\x00.evil.test",), "db.example.test"),
        # libpq stops at the NUL name even though a later SAN matches the host
        (None, ("bad\x00name.test", "db.example.test"), "db.example.test"),
    ],
)
def test_embedded_nul_never_matches(cn: str | None, dns: Sequence[str], host: str) -> None:
    cert = ca().issue_server(common_name=cn, dns_names=dns, ip_addresses=()).cert
    with pytest.raises(CertificateNameMismatch, match="embedded NUL"):
        check_server_name(cert, host)


def test_ip_entry_of_invalid_length_fails_the_check() -> None:
    key = ca().issue_server().key
    san = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_network("192.0.2.0/24")),
            x509.DNSName("db.example.test"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca().cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca().cert.not_valid_before_utc)
        .not_valid_after(ca().cert.not_valid_after_utc)
        .add_extension(san, critical=True)
        .sign(ca().key, hashes.SHA256())
    )
    with pytest.raises(CertificateNameMismatch, match="invalid length"):
        check_server_name(cert, "db.example.test")


@pytest.mark.parametrize("host", ["", "db.example.test\x00"])
def test_empty_or_nul_host_is_refused(host: str) -> None:
    with pytest.raises(CertificateNameMismatch, match="host name must be specified"):
        check_server_name(issued("cn_only").cert, host)


@pytest.mark.parametrize(
    ("text", "packed"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.000.002.001", "192.0.2.1"),
        ("010.0.0.1", "8.0.0.1"),  # leading zero means octal
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.258", "10.1.1.2"),
        ("3221225985", "192.0.2.1"),
        ("0xffffffff", "255.255.255.255"),
        ("0x", "0.0.0.0"),  # noqa: S104 - an address value, nothing binds
        ("256.0.0.1", None),
        ("1.2.3.4.5", None),
        ("1.2.3.", None),
        ("09.1.1.1", None),  # 9 is not an octal digit
        ("0x100000000", None),
        ("1.0x1000000", None),
        ("localhost", None),
        ("", None),
        ("1.2.3.4 ", None),  # deliberate: glibc would ignore trailing text after a space
    ],
)
def test_inet_aton_parses_like_libc(text: str, packed: str | None) -> None:
    expected = None if packed is None else ipaddress.IPv4Address(packed).packed
    assert inet_aton(text) == expected


@pytest.mark.parametrize(
    ("text", "is_v6"),
    [("::1", True), ("::ffff:192.0.2.1", True), ("fe80::1%eth0", False), ("1.2.3.4", False)],
)
def test_inet_pton6_refuses_scope_ids(text: str, is_v6: bool) -> None:
    assert (inet_pton6(text) is not None) is is_v6


@pytest.mark.parametrize(
    ("host", "ip"),
    [("db.example.test", False), ("192.000.002.001", True), ("::1", True), ("1e100", False)],
)
def test_is_ip_address(host: str, ip: bool) -> None:
    assert is_ip_address(host) is ip


# --- psql as the oracle -------------------------------------------------------------------

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
ORACLE_OK = "oracle: name accepted"


def _error_response(message: str) -> bytes:
    body = b"SFATAL\x00C08006\x00M" + message.encode() + b"\x00\x00"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def _fake_postgres(listener: socket.socket, context: ssl.SSLContext) -> None:
    """Answers one SSLRequest with S, does the handshake, and rejects the startup packet with a
    known message: seeing that message proves libpq accepted the server's name."""
    conn, _ = listener.accept()
    conn.settimeout(10)
    with conn:
        if conn.recv(8) != SSL_REQUEST:
            return
        conn.sendall(b"S")
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                if tls.recv(4):
                    tls.sendall(_error_response(ORACLE_OK))
        except (ssl.SSLError, OSError):
            return  # libpq refused the certificate and closed


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql (libpq) not installed")
@pytest.mark.parametrize(("cert_name", "host", "accepted"), CASES)
def test_psql_agrees(tmp_path: Path, cert_name: str, host: str, accepted: bool) -> None:
    leaf = issued(cert_name)
    cert_path, key_path = leaf.write(tmp_path, "server")
    root_path = ca().write(tmp_path, "root")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        server = threading.Thread(target=_fake_postgres, args=(listener, context))
        server.start()
        try:
            result = subprocess.run(
                [
                    "psql",
                    "-X",
                    "-w",
                    "-c",
                    "select 1",
                    f"host='{host}' hostaddr=127.0.0.1 port={port} user=u dbname=d "
                    f"sslmode=verify-full sslrootcert={root_path} connect_timeout=10",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={"PATH": "/usr/bin:/bin", "PGSSLCERT": "/nonexistent"},
            )
        finally:
            server.join()
    libpq_accepted = ORACLE_OK in result.stderr
    assert libpq_accepted is accepted, result.stderr
    ours_accepted = True
    try:
        check_server_name(leaf.cert, host)
    except CertificateNameMismatch as exc:
        ours_accepted = False
        libpq_message = result.stderr.rstrip("\n").split(" failed: ", 1)[1]
        assert str(exc).startswith(libpq_message)
    assert ours_accepted is accepted
