"""The client side of the upstream TLS session, with libpq's ``sslmode`` semantics.

Everything that decides whether the upstream is trusted is set explicitly here rather than taken
from Python's defaults, because those defaults move: Python 3.13 added
``VERIFY_X509_PARTIAL_CHAIN`` (trusting only an intermediate would then succeed, which libpq
refuses) and ``VERIFY_X509_STRICT`` (certificates without an Authority Key Identifier, which
libpq accepts, would fail). The same configuration must give the same verdict as ``psql`` on
every Python the sidecar runs on.

Host-name checking is not OpenSSL's: the context has ``check_hostname=False`` and
:func:`verify_peer` applies :mod:`proxy.hostname` (libpq's rules) right after the handshake.

Deliberate differences from libpq, each in the direction of failing closed:

* A configured ``sslcrl``/``sslcrldir`` that cannot be read is an error (libpq silently ignores
  it), and it is applied with the system trust store too (libpq skips CRLs for ``system``).
* ``sslrootcert`` unset under ``verify-ca``/``verify-full`` means the system store (libpq looks
  for ``~/.postgresql/root.crt``, which a container never has); see ``UpstreamSettings``.
* The client key must be PEM (libpq also tries DER), and an encrypted key without
  ``sslpassword`` is refused up front instead of prompting on a terminal.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .errors import ConfigError, UpstreamError
from .hostname import check_server_name
from .settings import SslMode, TlsVersion, UpstreamSettings

__all__ = [
    "ALPN_POSTGRESQL",
    "PeerInfo",
    "TlsConfigError",
    "build_client_context",
    "effective_sslmode",
    "load_certificates",
    "load_crls",
    "sni_for",
    "upstream_error_from_ssl",
    "verify_peer",
]

ALPN_POSTGRESQL: Final = "postgresql"

_TLS_VERSIONS: Final[dict[TlsVersion, ssl.TLSVersion]] = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

_PEM_CRL: Final = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)

_AZURE_ROOTS: Final = (
    "Azure Database for PostgreSQL Flexible Server chains to DigiCert Global Root G2 and "
    "Microsoft RSA Root CA 2017 (China regions: DigiCert Global Root CA); the Baltimore "
    "CyberTrust Root of older guides expired in May 2025"
)

# OpenSSL X509_V_ERR_* codes reported in SSLCertVerificationError.verify_code.
_X509_UNABLE_TO_GET_ISSUER_CERT: Final = 2
_X509_UNABLE_TO_GET_CRL: Final = 3
_X509_CERT_NOT_YET_VALID: Final = 9
_X509_CERT_HAS_EXPIRED: Final = 10
_X509_CRL_NOT_YET_VALID: Final = 11
_X509_CRL_HAS_EXPIRED: Final = 12
_X509_DEPTH_ZERO_SELF_SIGNED: Final = 18
_X509_SELF_SIGNED_IN_CHAIN: Final = 19
_X509_UNABLE_TO_GET_ISSUER_LOCALLY: Final = 20
_X509_UNABLE_TO_VERIFY_LEAF_SIGNATURE: Final = 21
_X509_CERT_REVOKED: Final = 23
_X509_INVALID_PURPOSE: Final = 26

_UNANCHORED: Final = frozenset(
    {
        _X509_UNABLE_TO_GET_ISSUER_CERT,
        _X509_DEPTH_ZERO_SELF_SIGNED,
        _X509_SELF_SIGNED_IN_CHAIN,
        _X509_UNABLE_TO_GET_ISSUER_LOCALLY,
        _X509_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    }
)

# OpenSSL reason strings that mean "no TLS version in common" (libpq's list in open_client_SSL).
_VERSION_REASONS: Final = frozenset(
    {
        "NO_PROTOCOLS_AVAILABLE",
        "UNSUPPORTED_PROTOCOL",
        "BAD_PROTOCOL_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "UNKNOWN_SSL_VERSION",
        "UNSUPPORTED_SSL_VERSION",
        "WRONG_SSL_VERSION",
        "WRONG_VERSION_NUMBER",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "VERSION_TOO_HIGH",
        "VERSION_TOO_LOW",
    }
)
_CLIENT_CERT_REASONS: Final = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    }
)


class TlsConfigError(ConfigError):
    """A TLS file named in the configuration cannot be used as it is."""


def effective_sslmode(up: UpstreamSettings) -> SslMode:
    """``sslrootcert=system`` forces ``verify-full`` (libpq 16): a public CA vouches for many
    names, so trusting it without checking the name would accept any server at all."""
    return "verify-full" if up.sslrootcert == "system" else up.sslmode


def _verifies_chain(up: UpstreamSettings) -> bool:
    # libpq: a root certificate file that exists is used even under "require".
    return effective_sslmode(up) != "require" or up.sslrootcert is not None


def _read(path: str, key: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsConfigError(
            key,
            f"could not read {what} file {path!r}: {exc.strerror or exc}",
            fix="check the path and that the sidecar's user may read it",
        ) from None


def load_certificates(path: str, *, key: str = "sslrootcert") -> list[x509.Certificate]:
    """Certificates from a PEM file (one or a bundle) or a single DER file.

    DER matters because Azure's portal offers roots as ``.cer`` downloads in DER; accepting
    them as they are spares the user an ``openssl x509 -inform der`` step that is easy to get
    wrong at 3 a.m. Other PEM blocks (keys, CRLs) in a bundle are skipped, as OpenSSL does.
    """
    data = _read(path, key, "certificate")
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
            if b"CERTIFICATE-----" in data:
                raise TlsConfigError(
                    key,
                    f"{path!r} contains a PEM certificate block that cannot be parsed",
                    fix="re-download the certificate; the file looks truncated or edited",
                ) from None
        if not certs:
            raise TlsConfigError(
                key,
                f"{path!r} contains PEM data but no certificate",
                fix="point this at the CA certificate file (-----BEGIN CERTIFICATE-----)",
            )
        return certs
    if not data.strip():
        raise TlsConfigError(key, f"{path!r} is empty", fix="put the CA certificate(s) in it")
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise TlsConfigError(
            key,
            f"{path!r} is neither a PEM certificate file nor a DER certificate",
            fix="use the .crt.pem or .cer file your provider publishes for its root CA",
        ) from None


def load_crls(path: str, *, key: str = "sslcrl") -> list[x509.CertificateRevocationList]:
    """CRLs from a PEM file (one or several) or a single DER CRL."""
    data = _read(path, key, "CRL")
    blocks = _PEM_CRL.findall(data)
    try:
        if blocks:
            return [x509.load_pem_x509_crl(block) for block in blocks]
        if b"-----BEGIN" in data:
            raise ValueError("no CRL block")
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise TlsConfigError(
            key,
            f"{path!r} is not a certificate revocation list (PEM 'X509 CRL' or DER)",
            fix="download the CRL again from the issuing CA's distribution point",
        ) from None


def build_client_context(up: UpstreamSettings) -> ssl.SSLContext:
    """An SSLContext that accepts exactly the servers libpq would accept for ``up``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # proxy.hostname decides, with libpq's rules
    ctx.minimum_version = _TLS_VERSIONS[up.ssl_min_protocol_version]
    if up.ssl_max_protocol_version is not None:
        ctx.maximum_version = _TLS_VERSIONS[up.ssl_max_protocol_version]
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    # Never partial-chain, never x509-strict, whatever this Python defaults to.
    flags = ssl.VERIFY_X509_TRUSTED_FIRST

    if _verifies_chain(up):
        ctx.verify_mode = ssl.CERT_REQUIRED
        if up.sslrootcert is None or up.sslrootcert == "system":
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            roots = load_certificates(up.sslrootcert)
            der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in roots)
            try:
                ctx.load_verify_locations(cadata=der)
            except ssl.SSLError as exc:
                raise TlsConfigError(
                    "sslrootcert",
                    f"OpenSSL refused the certificates in {up.sslrootcert!r}: {exc.reason}",
                ) from None
        if _load_crls(ctx, up):
            # libpq: X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL
            flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.verify_flags = flags

    if up.sslcert:
        _load_client_certificate(ctx, up, up.sslcert)
    return ctx


def _load_crls(ctx: ssl.SSLContext, up: UpstreamSettings) -> bool:
    loaded = False
    if up.sslcrl:
        crls = load_crls(up.sslcrl)
        # Always hand OpenSSL a file holding only CRLs: loading the user's file directly would
        # also make any certificate in it a trusted root.
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)
        with tempfile.NamedTemporaryFile(prefix="pg-tls-sidecar-crl-", suffix=".pem") as tmp:
            tmp.write(pem)
            tmp.flush()
            ctx.load_verify_locations(cafile=tmp.name)
        loaded = True
    if up.sslcrldir:
        if not os.path.isdir(up.sslcrldir) or not os.access(up.sslcrldir, os.R_OK | os.X_OK):
            raise TlsConfigError(
                "sslcrldir",
                f"{up.sslcrldir!r} is not a readable directory",
                fix="point it at a directory prepared with 'openssl rehash'",
            )
        # As in libpq, OpenSSL looks up <hash>.r<n> CRL files (and <hash>.<n> certificates,
        # which then also count as trusted) in this directory when verifying.
        ctx.load_verify_locations(capath=up.sslcrldir)
        loaded = True
    return loaded


def key_share_context(up: UpstreamSettings, group: str) -> ssl.SSLContext | None:
    """``build_client_context(up)`` offering only the key-exchange ``group`` (an OpenSSL name).

    Used once the server has asked for ``group`` in a HelloRetryRequest (``wire.tls_hello``): it
    chose that group from everything this OpenSSL offers, so offering it alone agrees on the
    same group one round trip sooner. Python's ``ssl`` can set one group, not an order, hence
    "only"; ``proxy.route`` goes back to the full list if the server ever refuses it. ``None``
    when this OpenSSL does not know the name.
    """
    ctx = build_client_context(up)
    try:
        ctx.set_ecdh_curve(group)
    except (ValueError, ssl.SSLError):
        return None
    return ctx


def _check_key_permissions(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TlsConfigError(
            "sslkey",
            f"could not stat private key file {path!r}: {exc.strerror or exc}",
            fix="check the path",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise TlsConfigError("sslkey", f"private key file {path!r} is not a regular file")
    if st.st_uid == 0:
        loose = st.st_mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)
    else:
        loose = st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    if loose:
        raise TlsConfigError(
            "sslkey",
            f"private key file {path!r} has group or world access "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            fix="chmod 0600 it if owned by the sidecar's user, or at most 0640 if owned by root",
        )


def _load_client_certificate(ctx: ssl.SSLContext, up: UpstreamSettings, cert_path: str) -> None:
    key_path = up.sslkey or cert_path
    certs = load_certificates(cert_path, key="sslcert")
    _check_key_permissions(key_path)
    password = up.sslpassword.encode() if up.sslpassword else None
    key_data = _read(key_path, "sslkey", "private key")
    try:
        try:
            key = serialization.load_pem_private_key(key_data, password=password)
        except TypeError:
            if password is None:
                raise TlsConfigError(
                    "sslkey",
                    f"private key file {key_path!r} is encrypted",
                    fix="set sslpassword, or decrypt the key with 'openssl pkey'",
                ) from None
            # libpq ignores a password given for an unencrypted key; so do we.
            key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, UnsupportedAlgorithm):
        problem = (
            "could not be decrypted with sslpassword"
            if password is not None
            else "is not a PEM private key"
        )
        raise TlsConfigError(
            "sslkey",
            f"private key file {key_path!r} {problem}",
            fix="check sslpassword and that the file holds the key for sslcert",
        ) from None

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise TlsConfigError(
            "sslkey",
            f"certificate {cert_path!r} does not match private key file {key_path!r}",
            fix="pair each client certificate with the key it was issued for",
        )

    password_cb: Callable[[], bytes] = lambda: password or b""  # noqa: E731 - never prompt
    try:
        ctx.load_cert_chain(cert_path, key_path, password=password_cb)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            "sslcert",
            f"OpenSSL could not load client certificate {cert_path!r} with key {key_path!r}: "
            f"{exc.reason}",
        ) from None


def sni_for(up: UpstreamSettings) -> str | None:
    """The TLS server name to send, or None.

    libpq's test is textual, not a parse: no SNI when the name is only digits and dots or
    contains a colon (RFC 6066 forbids IP literals in SNI). Azure routes on SNI, so sending the
    name whenever libpq would matters more than being clever about odd address spellings.
    """
    if not up.sslsni:
        return None
    name = up.verify_name
    if not name or ":" in name or name.strip("0123456789.") == "":
        return None
    return name


@dataclass(frozen=True)
class PeerInfo:
    """What was negotiated with the upstream, for logs, metrics and the status page."""

    version: str
    cipher: str
    alpn: str | None
    chain_der: tuple[bytes, ...]  # leaf first; only the leaf where Python cannot give more


def _peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, ...]:
    # get_verified_chain/get_unverified_chain are public from Python 3.13 on.
    for name in ("get_verified_chain", "get_unverified_chain"):
        getter = getattr(ssl_object, name, None)
        if getter is None:
            continue
        chain = getter()
        if chain and all(isinstance(c, bytes) for c in chain):
            return tuple(chain)
    leaf = ssl_object.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def verify_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, up: UpstreamSettings) -> PeerInfo:
    """The checks libpq makes after the handshake: ALPN for direct TLS, then the server name."""
    cipher = ssl_object.cipher()
    alpn = ssl_object.selected_alpn_protocol()
    peer = PeerInfo(
        version=ssl_object.version() or "unknown",
        cipher=cipher[0] if cipher else "unknown",
        alpn=alpn,
        chain_der=_peer_chain(ssl_object),
    )
    if up.sslnegotiation == "direct" and alpn != ALPN_POSTGRESQL:
        raise UpstreamError(
            "tls_handshake",
            f"server {up.describe()} did not negotiate ALPN protocol {ALPN_POSTGRESQL!r} on a "
            f"direct TLS connection (got {alpn!r})",
            hint="direct TLS needs PostgreSQL 17 or later; use sslnegotiation=postgres",
        )
    if effective_sslmode(up) == "verify-full":
        if not peer.chain_der:
            raise UpstreamError(
                "tls_verify_failed", f"server {up.describe()} presented no certificate"
            )
        _check_server_name_once(peer.chain_der[0], up.verify_name)
    return peer


@lru_cache(maxsize=64)
def _check_server_name_once(leaf_der: bytes, host: str) -> None:
    """``check_server_name`` on the DER bytes, remembering the pairs that passed.

    The check is a pure function of the certificate's bytes and the name, and a server presents
    the same certificate to every connection: parsing it again each time (``cryptography``, the
    SAN extension) was the largest piece of Python in a new session. A mismatch raises, so it is
    never cached and every refused connection is checked and reported afresh.
    """
    check_server_name(x509.load_der_x509_certificate(leaf_der), host)


def _root_description(up: UpstreamSettings) -> str:
    if up.sslrootcert is None or up.sslrootcert == "system":
        return "the system trust store"
    return up.sslrootcert


def _verify_hint(code: int, up: UpstreamSettings) -> str | None:
    if code in _UNANCHORED:
        return (
            f"the server's chain does not anchor at any root in {_root_description(up)}; "
            f"{_AZURE_ROOTS}. Put the root certificates (not intermediates) in sslrootcert"
        )
    if code in (_X509_CERT_HAS_EXPIRED, _X509_CERT_NOT_YET_VALID):
        return (
            "a certificate in the server's chain is outside its validity period; if the "
            "server's certificate is current, check this host's clock (date -u)"
        )
    if code == _X509_CERT_REVOKED:
        return "the CA has revoked the server's certificate (see sslcrl/sslcrldir)"
    if code == _X509_UNABLE_TO_GET_CRL:
        return (
            "CRL checking is on (sslcrl/sslcrldir) and covers the whole chain: every CA in it, "
            "the root included, needs a CRL"
        )
    if code in (_X509_CRL_HAS_EXPIRED, _X509_CRL_NOT_YET_VALID):
        return "a configured CRL is outside its validity period; download a current one"
    if code == _X509_INVALID_PURPOSE:
        return "the server certificate is not issued for TLS server authentication"
    return None


def upstream_error_from_ssl(exc: ssl.SSLError, up: UpstreamSettings) -> UpstreamError:
    """Turn an OpenSSL failure during the upstream handshake into a reasoned UpstreamError."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = int(exc.verify_code or 0)
        message = exc.verify_message or exc.reason or str(exc)
        return UpstreamError(
            "tls_verify_failed",
            f"could not verify the certificate of server {up.describe()}: {message} "
            f"(OpenSSL verify error {code})",
            hint=_verify_hint(code, up),
        )
    reason = exc.reason or ""
    hint: str | None = None
    if reason in _VERSION_REASONS:
        upper = up.ssl_max_protocol_version or "the newest this OpenSSL supports"
        hint = (
            "the server may not support any TLS version between "
            f"{up.ssl_min_protocol_version} and {upper}; Azure accepts TLS 1.2 and 1.3"
        )
    elif reason in _CLIENT_CERT_REASONS:
        hint = "the server rejected the client certificate (sslcert) or required one"
    elif reason == "TLSV1_ALERT_NO_APPLICATION_PROTOCOL":
        hint = "the server does not speak ALPN 'postgresql'; use sslnegotiation=postgres"
    detail = reason or exc.strerror or type(exc).__name__
    return UpstreamError(
        "tls_handshake",
        f"TLS handshake with server {up.describe()} failed: {detail}",
        hint=hint,
    )
