"""``ca convert`` and ``ca inspect``: the OpenSSL steps of a CA rotation, without OpenSSL.

Managed-server guides tell users to download a root as a DER ``.cer`` and run
``openssl x509 -inform DER ...`` on it, then to eyeball ``openssl x509 -text`` output to see
whether a bundle still holds an expired root (Azure's Baltimore CyberTrust Root, May 2025). Both
steps go wrong at 3 a.m.; these commands do them with the same certificate reader the sidecar
itself uses (:func:`proxy.tls.load_certificates`), so "``ca inspect`` can read it" means "the
sidecar can load it".

The certificate descriptions here (:func:`describe_certificate`) are shared with the
connectivity doctor (``proxy.doctor``), so both print a certificate the same way.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from proxy.errors import ConfigError
from proxy.hostname import certificate_names
from proxy.tls import TlsConfigError, load_certificates

__all__ = [
    "DEFAULT_WARN_DAYS",
    "CertificateInfo",
    "convert",
    "describe_certificate",
    "format_certificate",
    "inspect",
    "read_certificates",
    "to_pem",
    "write_atomically",
]

DEFAULT_WARN_DAYS: Final = 30
_SECONDS_PER_DAY: Final = 86400


def read_certificates(path: str, *, key: str) -> list[x509.Certificate]:
    """Every certificate in ``path``: PEM (one or a bundle), DER, or a PKCS#7 ``.p7b``.

    PEM and DER go through the sidecar's own reader, so its errors (and its acceptance) are the
    sidecar's. PKCS#7 is accepted only here, because some CAs publish their chains only in that
    form and the sidecar's ``sslrootcert`` does not read it: converting it is the way in.
    """
    try:
        return load_certificates(path, key=key)
    except TlsConfigError as original:
        certs = _pkcs7_certificates(path)
        if certs:
            return certs
        raise original from None


def _pkcs7_certificates(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    loader = (
        pkcs7.load_pem_pkcs7_certificates
        if b"-----BEGIN PKCS7-----" in data
        else pkcs7.load_der_pkcs7_certificates
    )
    try:
        return list(loader(data))
    except ValueError:
        return []


def to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    """The certificates as PEM blocks, in order: the layout ``openssl x509 -out`` writes."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` in one step (temporary file in the same directory, then rename).

    A sidecar watching its CA bundle for changes must never see a half-written file, and a
    failed write must leave the previous bundle in place.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pg-tls-sidecar-", suffix=".pem", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # a CA bundle is public; mkstemp's 0600 would lock other users out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def convert(in_path: str, out_path: str | None = None) -> tuple[bytes, list[x509.Certificate]]:
    """Read ``in_path`` (DER, PEM or PKCS#7) and return (and write to ``out_path``) the PEM.

    The result is also loaded into an OpenSSL context exactly as ``build_client_context`` does,
    so a file this writes is one the sidecar accepts as ``sslrootcert``.
    """
    certs = read_certificates(in_path, key="ca convert IN")
    pem = to_pem(certs)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except ssl.SSLError as exc:
        raise ConfigError(
            "ca convert IN",
            f"OpenSSL refuses the certificates read from {in_path!r}: {exc.reason or exc}",
            fix="re-download the certificate from the CA",
        ) from None
    if out_path is not None:
        try:
            write_atomically(out_path, pem)
        except OSError as exc:
            raise ConfigError(
                "ca convert -o",
                f"cannot write {out_path!r}: {exc.strerror or exc}",
                fix="check that the directory exists and is writable",
            ) from None
    return pem, certs


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a DBA needs to know about one certificate to decide whether to trust or replace it."""

    subject: str
    issuer: str
    sha256: str  # colon-separated upper-case hex, as ``openssl x509 -fingerprint`` prints it
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    days_left: int  # whole days until not_after (negative once expired)
    is_ca: bool
    self_signed: bool
    names: tuple[str, ...]  # DNS/IP SANs then CN(s); what a server certificate answers to
    key_id: str | None  # subjectKeyIdentifier, hex
    authority_key_id: str | None  # authorityKeyIdentifier keyid, hex
    status: str  # "valid", "expired" or "not yet valid"
    warning: str | None  # EXPIRED / NOT YET VALID / expires in N days

    @property
    def kind(self) -> str:
        if self.is_ca:
            return "root CA" if self.self_signed else "intermediate CA"
        return "leaf"

    def to_json(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "sha256": self.sha256,
            "serial": self.serial,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "days_left": self.days_left,
            "kind": self.kind,
            "is_ca": self.is_ca,
            "self_signed": self.self_signed,
            "names": list(self.names),
            "key_id": self.key_id,
            "authority_key_id": self.authority_key_id,
            "status": self.status,
            "warning": self.warning,
        }


def _hex(data: bytes) -> str:
    return data.hex(":").upper()


def _key_ids(cert: x509.Certificate) -> tuple[str | None, str | None]:
    ski: str | None = None
    aki: str | None = None
    with contextlib.suppress(x509.ExtensionNotFound, ValueError):
        ski = _hex(cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest)
    with contextlib.suppress(x509.ExtensionNotFound, ValueError):
        ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        keyid = ext.value.key_identifier
        aki = _hex(keyid) if keyid else None
    return ski, aki


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe_certificate(
    cert: x509.Certificate, *, now: datetime | None = None, warn_days: int = DEFAULT_WARN_DAYS
) -> CertificateInfo:
    """A :class:`CertificateInfo` as of ``now`` (default: the current time, UTC)."""
    now = now if now is not None else datetime.now(UTC)
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    days_left = int((not_after - now).total_seconds() // _SECONDS_PER_DAY)
    warning: str | None = None
    if now > not_after:
        status = "expired"
        ago = -days_left - 1
        warning = f"EXPIRED on {_date(not_after)} ({_days(ago)} ago)"
    elif now < not_before:
        status = "not yet valid"
        warning = f"NOT YET VALID: starts {_date(not_before)}"
    else:
        status = "valid"
        if days_left <= warn_days:
            warning = f"expires in {_days(days_left)} ({_date(not_after)})"
    try:
        names = tuple(dict.fromkeys(certificate_names(cert)))  # the CN often repeats a SAN
    except ValueError:
        names = ()
    ski, aki = _key_ids(cert)
    return CertificateInfo(
        subject=cert.subject.rfc4514_string() or "(empty subject)",
        issuer=cert.issuer.rfc4514_string() or "(empty issuer)",
        sha256=_hex(cert.fingerprint(hashes.SHA256())),
        serial=f"{cert.serial_number:X}",
        not_before=not_before,
        not_after=not_after,
        days_left=days_left,
        is_ca=_is_ca(cert),
        self_signed=_self_signed(cert),
        names=names,
        key_id=ski,
        authority_key_id=aki,
        status=status,
        warning=warning,
    )


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def format_certificate(info: CertificateInfo, *, indent: str = "  ") -> list[str]:
    """Aligned ``label  value`` lines, for ``ca inspect`` and the doctor's chain listing."""
    lines = [
        f"{indent}subject      {info.subject}",
        f"{indent}issuer       {info.issuer}",
        f"{indent}kind         {info.kind}",
    ]
    if not info.is_ca and info.names:
        lines.append(f"{indent}names        {', '.join(info.names)}")
    left = f"{info.days_left} days left" if info.status == "valid" else info.status
    lines += [
        f"{indent}not before   {_date(info.not_before)}",
        f"{indent}not after    {_date(info.not_after)} ({left})",
        f"{indent}serial       {info.serial}",
        f"{indent}sha256       {info.sha256}",
    ]
    if info.key_id:
        lines.append(f"{indent}key id       {info.key_id}")
    if info.authority_key_id and not info.self_signed:
        lines.append(f"{indent}issuer key   {info.authority_key_id}")
    if info.warning:
        lines.append(f"{indent}WARNING      {info.warning}")
    return lines


def inspect(
    path: str, *, now: datetime | None = None, warn_days: int = DEFAULT_WARN_DAYS
) -> list[CertificateInfo]:
    """Every certificate in ``path``, described; ``ConfigError`` if the file is unusable."""
    now = now if now is not None else datetime.now(UTC)
    certs = read_certificates(path, key="ca inspect FILE")
    return [describe_certificate(c, now=now, warn_days=warn_days) for c in certs]
