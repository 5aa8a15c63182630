"""libpq's ``verify-full`` server-name check, on a parsed certificate.

Python's ``ssl.match_hostname`` (and OpenSSL's ``X509_check_host`` behind ``check_hostname``)
disagree with libpq in corners that matter to a PostgreSQL DBA: an IP address written in the CN or
in a DNS SAN, ``*.tld`` wildcards, dotted-decimal with leading zeros, and they changed between
Python versions. The sidecar promises "the same verdict psql would give", so the TLS layer runs
with ``check_hostname=False`` and calls :func:`check_server_name` after the handshake.

The rules, from ``fe-secure-common.c`` and ``fe-secure-openssl.c``
(``pgtls_verify_peer_name_matches_certificate_guts``):

* The host is an IP address when ``inet_aton`` accepts it (so ``192.000.002.001`` and even
  ``3221225985`` are IPv4) or ``inet_pton(AF_INET6)`` does.
* Every dNSName and iPAddress SAN is examined in certificate order until one matches: dNSNames
  are compared as strings even when the host is an IP address, iPAddresses as bytes (a 4-byte
  SAN against the host parsed with ``inet_aton``, a 16-byte SAN with ``inet_pton``).
* The first CN is consulted only when no SAN of the host's own type exists (dNSName for names,
  iPAddress for addresses; so an IP host may match the CN even next to DNS SANs).
* Comparison is ASCII case-insensitive; a name starting ``*.`` matches exactly one leading label
  of the host (``*.com`` included, as libpq allows it).
* A name with an embedded NUL, or an iPAddress that is neither 4 nor 16 bytes, ends the check
  with a failure even if a later name would have matched.

Deliberate differences from libpq:

* libpq compares the raw bytes of the CN's ASN.1 string; here the CN is decoded by
  ``cryptography`` and compared as UTF-8. For ASCII and UTF8String names (every real server
  certificate) that is identical; a BMPString CN, which libpq rejects as "embedded null",
  is compared by its text instead.
* glibc's ``inet_aton`` ignores anything after a space (``"10.0.0.1 junk"`` is an address); this
  parser does not, so such a host is treated as a name (and never matches anything real).
* A subjectAltName extension that cannot be parsed makes libpq fall back to the CN; here it is a
  failure, because silently ignoring SANs is the one direction that can widen what matches.
* A host that is empty or contains NUL is a failure with libpq's "host name must be specified"
  wording; libpq cannot be given such a host at all.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import UpstreamError

__all__ = [
    "CertificateNameMismatch",
    "certificate_names",
    "check_server_name",
    "inet_aton",
    "inet_pton6",
    "is_ip_address",
]

_HINT_NAMES: Final = 8  # how many certificate names a hint lists before "..."

# One inet_aton component: hex ("0x" alone is 0, as in glibc), octal (leading 0) or decimal.
_AT_PART: Final = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
# Largest value of the last component for 1, 2, 3 or 4 components (a, a.b, a.b.c, a.b.c.d).
_AT_LAST_MAX: Final = {1: 0xFFFFFFFF, 2: 0xFFFFFF, 3: 0xFFFF, 4: 0xFF}


class CertificateNameMismatch(UpstreamError):
    """The server's certificate chain verified, but it was issued for another name.

    ``names`` is everything the certificate carries (see :func:`certificate_names`), so a log
    line or a status page can show what the server *is* without re-parsing the certificate.
    """

    def __init__(self, message: str, *, host: str, names: tuple[str, ...]) -> None:
        self.host = host
        self.names = names
        if names:
            shown = ", ".join(f'"{_printable(n)}"' for n in names[:_HINT_NAMES])
            more = f" and {len(names) - _HINT_NAMES} more" if len(names) > _HINT_NAMES else ""
            hint = (
                f"the certificate is valid for {shown}{more}; connect using one of these names, "
                "or set tls_server_name to one of them when you must dial another address "
                "(a private endpoint or an IP)"
            )
        else:
            hint = "the server certificate names no host at all; it cannot pass verify-full"
        super().__init__("tls_verify_failed", message, hint=hint)


def inet_aton(text: str) -> bytes | None:
    """The 4 bytes BSD/glibc ``inet_aton`` gives for ``text``, or None if it is not an address.

    Accepts the legacy forms libpq deliberately honours (``fe-secure-common.c`` uses inet_aton
    "to accept alternative IPv4 address notations"): 1 to 4 dot-separated parts in decimal,
    octal (leading ``0``) or hex (``0x``), the last part filling the remaining bytes.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_AT_PART.fullmatch(p) for p in parts):
        return None
    values = [_at_value(p) for p in parts]
    if any(v > 0xFF for v in values[:-1]) or values[-1] > _AT_LAST_MAX[len(values)]:
        return None
    address = values[-1]
    for shift, value in zip((24, 16, 8), values[:-1], strict=False):
        address |= value << shift
    return address.to_bytes(4, "big")


def _at_value(part: str) -> int:
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    if part.startswith("0"):
        return int(part, 8)
    return int(part, 10)


def inet_pton6(text: str) -> bytes | None:
    """The 16 bytes ``inet_pton(AF_INET6)`` gives, or None; scope ids (``%eth0``) are refused
    as inet_pton refuses them, although Python's ``ipaddress`` would accept them."""
    if "%" in text:
        return None
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        return None


def is_ip_address(host: str) -> bool:
    """libpq's ``is_ip_address``: decides whether DNS or IP SANs suppress the CN."""
    return inet_aton(host) is not None or inet_pton6(host) is not None


def _fold(name: str) -> bytes:
    """pg_strcasecmp folds ASCII only; ``bytes.lower`` does exactly that."""
    return name.encode("utf-8", "surrogateescape").lower()


def _wildcard_matches(pattern: bytes, host: bytes) -> bool:
    if len(pattern) < 3 or not pattern.startswith(b"*."):
        return False
    if len(pattern) > len(host):
        return False
    suffix = pattern[1:]  # ".example.com"
    if not host.endswith(suffix):
        return False
    return b"." not in host[: len(host) - len(suffix)]


def _printable(name: str) -> str:
    return name.replace("\x00", "\\0")


def _ip_text(value: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # str() of an IPv4-mapped IPv6 address changed in Python 3.13; pin the libpq-like form.
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return f"::ffff:{value.ipv4_mapped}"
    return str(value)


def _general_names(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


def _common_names(cert: x509.Certificate) -> list[str]:
    return [
        a.value if isinstance(a.value, str) else a.value.decode("latin-1")
        for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Every host name the certificate carries: dNSName and iPAddress SANs in certificate
    order, then the subject CN(s), whether or not libpq would consult them."""
    names: list[str] = []
    for gn in _general_names(cert):
        if isinstance(gn, x509.DNSName):
            names.append(gn.value)
        elif isinstance(gn, x509.IPAddress):
            value = gn.value
            if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                names.append(_ip_text(value))
            else:
                names.append(str(value))
    names.extend(_common_names(cert))
    return tuple(names)


def check_server_name(cert: x509.Certificate, host: str) -> None:
    """Raise :class:`CertificateNameMismatch` unless libpq's verify-full would accept ``host``."""
    try:
        general_names = _general_names(cert)
        names = certificate_names(cert)
    except ValueError as exc:  # cryptography could not decode the extensions
        raise CertificateNameMismatch(
            f'could not read the subjectAltName of the server certificate to check host name "'
            f'{_printable(host)}": {exc}',
            host=host,
            names=(),
        ) from None
    if not host or "\x00" in host:
        raise CertificateNameMismatch(
            "host name must be specified for a verified SSL connection", host=host, names=names
        )

    host_bytes = _fold(host)
    host_v4 = inet_aton(host)
    host_v6 = inet_pton6(host)
    host_is_ip = host_v4 is not None or host_v6 is not None
    examined = 0
    first_name: str | None = None
    check_cn = True

    def refuse(message: str) -> CertificateNameMismatch:
        return CertificateNameMismatch(message, host=host, names=names)

    def match_name(name: str) -> bool:
        nonlocal examined, first_name
        examined += 1
        if "\x00" in name:
            raise refuse(
                f'server certificate name "{_printable(name)}" contains an embedded NUL byte '
                f'(a forged-name attack, CVE-2009-4034); refusing it for host name "{host}"'
            )
        if first_name is None:
            first_name = name
        folded = _fold(name)
        return folded == host_bytes or _wildcard_matches(folded, host_bytes)

    for gn in general_names:
        if isinstance(gn, x509.DNSName):
            if not host_is_ip:
                check_cn = False
            if match_name(gn.value):
                return
        elif isinstance(gn, x509.IPAddress):
            if host_is_ip:
                check_cn = False
            examined += 1
            value = gn.value
            if not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise refuse(
                    f"server certificate contains an IP address entry of invalid length "
                    f"({value}, {len(value.network_address.packed) * 2} bytes); refusing it "
                    f'for host name "{host}"'
                )
            if first_name is None:
                first_name = _ip_text(value)
            wanted = host_v4 if isinstance(value, ipaddress.IPv4Address) else host_v6
            if wanted is not None and wanted == value.packed:
                return

    if check_cn:
        common_names = _common_names(cert)
        if common_names and match_name(common_names[0]):
            return

    if examined > 1:
        other = "name" if examined == 2 else "names"
        message = (
            f'server certificate for "{first_name}" (and {examined - 1} other {other}) '
            f'does not match host name "{host}"'
        )
    elif examined == 1:
        message = f'server certificate for "{first_name}" does not match host name "{host}"'
    else:
        message = (
            "could not get server's host name from server certificate: it has no DNS or IP "
            f'subjectAltName and no common name to compare with host name "{host}"'
        )
    raise refuse(message)
