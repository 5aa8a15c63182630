"""A throwaway certificate authority for demos and tests.

Real TLS handshakes against a real PostgreSQL need real certificates: the point of this module is
that they look like what a managed server presents (CA with BasicConstraints and KeyUsage, leaves
with ExtendedKeyUsage, key identifiers, random serials, intermediates) so that OpenSSL, as used by
Python's ``ssl`` module and by PostgreSQL itself, verifies them exactly as it would in production.
Nothing here is meant to protect anything: keys are written unencrypted and live for a year.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_VALIDITY = timedelta(days=365)
BACKDATE = timedelta(hours=1)  # tolerate clock skew between the test host and containers


def new_key(key_type: KeyType = "ec") -> PrivateKey:
    """P-256 or RSA-2048: what managed servers present today, and fast enough for tests."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; use 'ec' or 'rsa'")


def _validity(not_before: datetime | None, not_after: datetime | None) -> tuple[datetime, datetime]:
    start = not_before if not_before is not None else datetime.now(UTC) - BACKDATE
    end = not_after if not_after is not None else start + DEFAULT_VALIDITY + BACKDATE
    return start, end


def _name(common_name: str | None) -> x509.Name:
    if common_name is None:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    """A leaf certificate with its key and the intermediates a peer must send along with it.

    ``intermediates`` runs from the issuing CA upwards and stops before the self-signed root,
    which the verifying side is expected to hold already.
    """

    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def fullchain_pem(self) -> bytes:
        """Leaf then intermediates: the file a server's ``ssl_cert_file`` should hold."""
        return b"".join(_pem(c) for c in (self.cert, *self.intermediates))

    def key_pem(self, password: bytes | None = None) -> bytes:
        """PKCS#8 PEM; encrypted only when a password is given (to test ``sslpassword``)."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def write(
        self,
        directory: Path,
        name: str,
        *,
        key_mode: int = 0o600,
        fullchain: bool = False,
        password: bytes | None = None,
    ) -> tuple[Path, Path]:
        """Writes ``name.crt`` (PEM) and ``name.key``; returns their paths.

        The key file is created with ``key_mode`` from the start (never briefly world-readable),
        and re-chmodded afterwards in case it already existed or the umask interfered.
        """
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{name}.crt"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.fullchain_pem() if fullchain else self.cert_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, key_mode)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem(password))
        os.chmod(key_path, key_mode)
        return cert_path, key_path


@dataclass(frozen=True)
class CertificateAuthority:
    """A root (``parent is None``) or intermediate CA that can issue further certificates."""

    cert: x509.Certificate
    key: PrivateKey
    parent: CertificateAuthority | None = None

    @classmethod
    def create(
        cls,
        common_name: str = "pg-tls-sidecar throwaway root CA",
        *,
        key_type: KeyType = "ec",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> CertificateAuthority:
        key = new_key(key_type)
        start, end = _validity(not_before, not_after)
        name = _name(common_name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    @property
    def root(self) -> CertificateAuthority:
        ca = self
        while ca.parent is not None:
            ca = ca.parent
        return ca

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """This CA and its parents, excluding the self-signed root (empty for a root)."""
        chain: list[x509.Certificate] = []
        ca: CertificateAuthority | None = self
        while ca is not None and ca.parent is not None:
            chain.append(ca.cert)
            ca = ca.parent
        return tuple(chain)

    def _builder(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        not_before: datetime | None,
        not_after: datetime | None,
    ) -> x509.CertificateBuilder:
        start, end = _validity(not_before, not_after)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def issue_intermediate(
        self,
        common_name: str,
        *,
        key_type: KeyType = "ec",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> CertificateAuthority:
        """An intermediate that may issue leaves only (pathlen 0), like public issuing CAs."""
        key = new_key(key_type)
        cert = (
            self._builder(_name(common_name), key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return CertificateAuthority(cert=cert, key=key, parent=self)

    def issue_server(
        self,
        *,
        common_name: str | None = "localhost",
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
        key_type: KeyType = "ec",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        """A serverAuth leaf; no names at all in ``dns_names``/``ip_addresses`` means no SAN."""
        key = new_key(key_type)
        general_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        general_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = self._leaf_builder(
            _name(common_name), key, not_before, not_after, ExtendedKeyUsageOID.SERVER_AUTH
        )
        if general_names:
            # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            builder = builder.add_extension(
                x509.SubjectAlternativeName(general_names), critical=common_name is None
            )
        return Issued(builder.sign(self.key, hashes.SHA256()), key, self.intermediates)

    def issue_client(
        self,
        common_name: str,
        *,
        key_type: KeyType = "ec",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        """A clientAuth leaf whose CN is the PostgreSQL user name (``clientcert=verify-full``)."""
        key = new_key(key_type)
        builder = self._leaf_builder(
            _name(common_name), key, not_before, not_after, ExtendedKeyUsageOID.CLIENT_AUTH
        )
        return Issued(builder.sign(self.key, hashes.SHA256()), key, self.intermediates)

    def _leaf_builder(
        self,
        subject: x509.Name,
        key: PrivateKey,
        not_before: datetime | None,
        not_after: datetime | None,
        purpose: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        rsa_key = isinstance(key, rsa.RSAPrivateKey)
        return (
            self._builder(subject, key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=rsa_key,  # RSA key exchange needs it; EC keys must not
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        )

    def crl(
        self, revoked: Sequence[Issued | x509.Certificate] = (), *, next_update_days: int = 30
    ) -> bytes:
        """A PEM CRL signed by this CA listing ``revoked``.

        OpenSSL's full-chain CRL check (what libpq enables when a CRL is configured) wants one
        CRL per CA in the chain, root included, so tests usually concatenate an empty root CRL
        with the issuing CA's.
        """
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + timedelta(days=next_update_days))
            .add_extension(self._authority_key_identifier(), critical=False)
            .add_extension(x509.CRLNumber(x509.random_serial_number()), critical=False)
        )
        for item in revoked:
            cert = item.cert if isinstance(item, Issued) else item
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(now - BACKDATE)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """This CA's certificate and its parents' up to, excluding, the root (b"" for a root).

        That is what a server sends after its leaf; ``root_pem`` is what a client trusts.
        """
        return b"".join(_pem(c) for c in self.intermediates)

    def root_pem(self) -> bytes:
        return _pem(self.root.cert)

    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def write(self, directory: Path, name: str) -> Path:
        """Writes this CA's certificate as ``name.crt`` (PEM); the key is never written."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.crt"
        path.write_bytes(self.cert_pem())
        return path


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
