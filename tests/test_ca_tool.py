"""``ca convert`` and ``ca inspect``, with the real ``openssl`` binary as the oracle."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from proxy.ca_tool import (
    convert,
    describe_certificate,
    format_certificate,
    inspect,
    read_certificates,
    write_atomically,
)
from proxy.demo.pki import CertificateAuthority
from proxy.errors import ConfigError
from proxy.settings import UpstreamSettings
from proxy.tls import build_client_context, load_certificates

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def openssl(*args: str) -> bytes:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("the openssl binary is needed as the oracle (apt-get install openssl)")
    return subprocess.run([binary, *args], capture_output=True, check=True, timeout=30).stdout


@pytest.fixture(scope="module")
def azure_like() -> dict[str, CertificateAuthority]:
    """Two current roots, one expired like Baltimore, one expiring soon, an intermediate."""
    g2 = CertificateAuthority.create(
        "Test Global Root G2",
        key_type="rsa",
        not_before=NOW - dt.timedelta(days=3650),
        not_after=NOW + dt.timedelta(days=3650),
    )
    dead = CertificateAuthority.create(
        "Test CyberTrust Root",
        not_before=NOW - dt.timedelta(days=9000),
        not_after=NOW - dt.timedelta(days=20, hours=1),
    )
    soon = CertificateAuthority.create(
        "Test Soon Root",
        not_before=NOW - dt.timedelta(days=400),
        not_after=NOW + dt.timedelta(days=12, hours=1),
    )
    issuing = g2.issue_intermediate(
        "Test CA 01",
        not_before=NOW - dt.timedelta(days=100),
        not_after=NOW + dt.timedelta(days=900),
    )
    return {"g2": g2, "dead": dead, "soon": soon, "issuing": issuing}


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_der_convert_is_byte_identical_to_openssl(tmp_path: Path, key_type: str) -> None:
    ca = CertificateAuthority.create("Converted Root", key_type=key_type)  # type: ignore[arg-type]
    der = tmp_path / "root.cer"
    der.write_bytes(ca.cert_der())
    expected_file = tmp_path / "openssl.pem"
    openssl("x509", "-inform", "DER", "-in", str(der), "-out", str(expected_file))
    ours = tmp_path / "ours.pem"
    pem, certs = convert(str(der), str(ours))
    assert ours.read_bytes() == expected_file.read_bytes()
    assert pem == expected_file.read_bytes()
    assert [c.subject.rfc4514_string() for c in certs] == ["CN=Converted Root"]


def test_pem_bundle_keeps_order_and_drops_everything_but_certificates(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority]
) -> None:
    leaf = azure_like["issuing"].issue_server()
    bundle = tmp_path / "mixed.pem"
    bundle.write_bytes(
        b"Bag Attributes: junk a GUI exporter writes\r\n"
        + azure_like["g2"].cert_pem().replace(b"\n", b"\r\n")
        + leaf.key_pem()
        + azure_like["dead"].cert_pem()
    )
    pem, certs = convert(str(bundle))
    assert b"PRIVATE KEY" not in pem and b"\r" not in pem and b"Bag" not in pem
    assert pem == azure_like["g2"].cert_pem() + azure_like["dead"].cert_pem()
    assert [c.subject.rfc4514_string() for c in certs] == [
        "CN=Test Global Root G2",
        "CN=Test CyberTrust Root",
    ]


@pytest.mark.parametrize("encoding", ["DER", "PEM"])
def test_pkcs7_bundle_converts(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority], encoding: str
) -> None:
    certs = [azure_like["g2"].cert, azure_like["issuing"].cert]
    p7b = tmp_path / "chain.p7b"
    p7b.write_bytes(pkcs7.serialize_certificates(certs, getattr(serialization.Encoding, encoding)))
    with pytest.raises(ConfigError):
        load_certificates(str(p7b))  # the sidecar itself does not read PKCS#7 ...
    out = tmp_path / "chain.pem"
    convert(str(p7b), str(out))  # ... so conversion is the way in
    # PKCS#7 stores a SET OF certificates: DER sorts them, so compare as sets, and the order
    # with what openssl prints.
    converted = load_certificates(str(out))
    assert sorted(c.subject.rfc4514_string() for c in converted) == [
        "CN=Test CA 01",
        "CN=Test Global Root G2",
    ]
    assert set(converted) == set(certs)
    openssl_view = openssl("pkcs7", "-inform", encoding, "-in", str(p7b), "-print_certs")
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----\n.+?-----END CERTIFICATE-----\n", openssl_view, re.S
    )
    assert out.read_bytes() == b"".join(blocks)


def test_converted_bundle_is_a_usable_sslrootcert(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority]
) -> None:
    der = tmp_path / "root.cer"
    der.write_bytes(azure_like["g2"].cert_der())
    out = tmp_path / "roots.pem"
    convert(str(der), str(out))
    context = build_client_context(UpstreamSettings(host="db", sslrootcert=str(out)))
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "Test Global Root G2"),),)
    ]


def test_output_replaces_the_old_file_atomically_and_world_readable(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority]
) -> None:
    out = tmp_path / "roots.pem"
    out.write_bytes(b"old bundle")
    inode = out.stat().st_ino
    der = tmp_path / "root.cer"
    der.write_bytes(azure_like["g2"].cert_der())
    convert(str(der), str(out))
    assert out.read_bytes() == azure_like["g2"].cert_pem()
    assert out.stat().st_ino != inode  # renamed into place, never rewritten in place
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["root.cer", "roots.pem"]  # no temporary left


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "dir-in-the-way"
    target.mkdir()
    with pytest.raises(OSError):
        write_atomically(str(target), b"data")  # rename onto a directory fails
    assert sorted(os.listdir(tmp_path)) == ["dir-in-the-way"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"hello, I am not a certificate\n", "neither a PEM certificate file nor a DER"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot be parsed"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no certificate"),
    ],
    ids=["empty", "text", "truncated-pem", "key-only"],
)
def test_unusable_input_names_the_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "input.cer"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        convert(str(path), str(tmp_path / "out.pem"))
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.key == "ca convert IN"
    assert not (tmp_path / "out.pem").exists()


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file or directory"):
        read_certificates(str(tmp_path / "nope.cer"), key="ca inspect FILE")


def test_unwritable_output_is_a_config_error(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority]
) -> None:
    der = tmp_path / "root.cer"
    der.write_bytes(azure_like["g2"].cert_der())
    with pytest.raises(ConfigError, match="cannot write") as info:
        convert(str(der), str(tmp_path / "missing-dir" / "out.pem"))
    assert info.value.key == "ca convert -o"


# -- inspect ---------------------------------------------------------------------------------


def test_inspect_bundle_with_expired_and_expiring_roots(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority]
) -> None:
    bundle = tmp_path / "azure-roots.pem"
    bundle.write_bytes(
        azure_like["g2"].cert_pem()
        + azure_like["dead"].cert_pem()
        + azure_like["soon"].cert_pem()
        + azure_like["issuing"].cert_pem()
    )
    infos = inspect(str(bundle), now=NOW)
    assert [(i.subject, i.kind, i.status) for i in infos] == [
        ("CN=Test Global Root G2", "root CA", "valid"),
        ("CN=Test CyberTrust Root", "root CA", "expired"),
        ("CN=Test Soon Root", "root CA", "valid"),
        ("CN=Test CA 01", "intermediate CA", "valid"),
    ]
    g2, dead, soon, issuing = infos
    assert g2.warning is None
    assert dead.warning is not None and dead.warning.startswith("EXPIRED on ")
    assert "(20 days ago)" in dead.warning
    assert soon.days_left == 12
    assert soon.warning is not None and soon.warning.startswith("expires in 12 days")
    assert issuing.issuer == "CN=Test Global Root G2"
    assert issuing.authority_key_id == g2.key_id
    assert "WARNING      EXPIRED on" in "\n".join(format_certificate(dead))


def test_fingerprint_and_serial_match_openssl(
    tmp_path: Path, azure_like: dict[str, CertificateAuthority]
) -> None:
    path = tmp_path / "g2.pem"
    path.write_bytes(azure_like["g2"].cert_pem())
    [info] = inspect(str(path))
    out = openssl("x509", "-in", str(path), "-noout", "-fingerprint", "-sha256", "-serial")
    lines = dict(line.split("=", 1) for line in out.decode().splitlines())
    assert lines["sha256 Fingerprint"] == info.sha256
    assert lines["serial"].lstrip("0") == info.serial


@pytest.mark.parametrize(
    ("offset_days", "status", "warning"),
    [
        (-1, "not yet valid", "NOT YET VALID: starts "),
        (0, "valid", None),
        (335, "valid", "expires in 30 days"),
        (334, "valid", None),
        (366, "expired", "EXPIRED on "),
    ],
    ids=["before", "first-day", "30-days-left", "31-days-left", "after"],
)
def test_validity_wording(offset_days: int, status: str, warning: str | None) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ca = CertificateAuthority.create(
        "Window", not_before=start, not_after=start + dt.timedelta(days=365, hours=1)
    )
    now = start + dt.timedelta(days=offset_days, minutes=30)
    info = describe_certificate(ca.cert, now=now)
    assert info.status == status
    if warning is None:
        assert info.warning is None
    else:
        assert info.warning is not None and info.warning.startswith(warning)


def test_leaf_lists_its_names_once(azure_like: dict[str, CertificateAuthority]) -> None:
    leaf = azure_like["issuing"].issue_server(
        common_name="db.example.com", dns_names=("db.example.com", "*.db.example.com")
    )
    info = describe_certificate(leaf.cert, now=NOW)
    assert info.kind == "leaf"
    assert info.names == ("db.example.com", "*.db.example.com", "127.0.0.1", "::1")
    assert isinstance(leaf.cert, x509.Certificate)
