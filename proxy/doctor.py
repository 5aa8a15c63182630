"""``pg-tls-sidecar check``: why can (or can't) the sidecar reach this upstream?

The verdict comes from the sidecar's own connection path, :func:`proxy.upstream.connect_upstream`
with the context :func:`proxy.tls.build_client_context` builds, never from a re-implementation:
a doctor that verifies differently from the patient diagnoses the wrong disease. Around that one
real attempt the doctor adds what a DBA needs to act: the addresses the name resolves to, what
was negotiated, the chain the server presents, which configured root anchors it, and, on
failure, the step that failed with the likely fix.

When verification fails the real attempt cannot show the certificates (OpenSSL stops before
Python sees them), so the doctor makes a second, *non-verifying* handshake purely to read the
chain the server presents. Nothing is ever sent on it, and every verdict still comes from the
verifying attempt; the second handshake only supplies the evidence for the explanation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from proxy import tls
from proxy.ca_tool import CertificateInfo, describe_certificate, format_certificate
from proxy.endpoint import Endpoint
from proxy.errors import UpstreamError
from proxy.hostname import CertificateNameMismatch
from proxy.settings import Timeouts, UpstreamSettings
from proxy.upstream import UpstreamConnection, connect_upstream
from proxy.wire.messages import SSL_REQUEST
from proxy.wire.negotiation import check_ssl_response
from proxy.wire.tls_hello import GROUP_NAMES

__all__ = [
    "STEPS",
    "Anchor",
    "CheckReport",
    "Diagnosis",
    "Step",
    "check_upstream",
    "describe_target",
    "diagnose_verify_failure",
    "find_anchor",
    "presented_chain",
    "render_step",
    "render_verdict",
]

Status = Literal["ok", "fail", "info", "skip"]

STEPS: Final = ("resolve", "tcp", "negotiation", "tls", "chain", "anchor", "verify")
"""Every step the doctor can report, in the order they happen."""

_BADGES: Final[dict[str, str]] = {
    "ok": "[ ok ]",
    "fail": "[FAIL]",
    "info": "[info]",
    "skip": "[skip]",
}
_PEM_CERT: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
_DER: Final = serialization.Encoding.DER
_ROOTS_LISTED: Final = 10  # how many configured roots a diagnosis names before "..."
_DIAGNOSTIC_NOTE: Final = (
    "seen on a second, non-verifying TLS handshake made only for this diagnosis; "
    "nothing was sent on it"
)


@dataclass
class Step:
    """One line of the doctor's report; ``details`` are the indented lines under it."""

    name: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "step": self.name,
            "status": self.status,
            "summary": self.summary,
            "details": self.details,
            **self.data,
        }


@dataclass(frozen=True)
class Diagnosis:
    """A likely cause and its fix. ``problem`` is one of ``wrong_ca``, ``host_mismatch``,
    ``expired``, ``not_yet_valid``, ``intermediate_as_root``, or an ``UpstreamError`` reason."""

    problem: str
    text: str
    fix: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"problem": self.problem, "text": self.text, "fix": self.fix}


@dataclass(frozen=True)
class Anchor:
    """The configured root that vouches for the chain, and where in the chain it attaches."""

    root: x509.Certificate
    chain_index: int  # the presented certificate this root issued (or is)
    presented: bool  # the server sent this very root itself


@dataclass
class CheckReport:
    target: dict[str, object]
    steps: list[Step] = field(default_factory=list)
    chain: list[CertificateInfo] = field(default_factory=list)
    chain_source: str | None = None  # "sidecar" (the real handshake) or "diagnostic"
    anchor: CertificateInfo | None = None
    failed_step: str | None = None
    error: UpstreamError | None = None
    diagnoses: list[Diagnosis] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed_step is None

    def to_json(self) -> dict[str, object]:
        failure: dict[str, object] | None = None
        if self.failed_step is not None:
            failure = {
                "step": self.failed_step,
                "reason": self.error.reason if self.error else None,
                "message": str(self.error) if self.error else None,
                "hint": self.error.hint if self.error else None,
                "diagnosis": [d.to_json() for d in self.diagnoses],
            }
        return {
            "ok": self.ok,
            "target": self.target,
            "steps": [s.to_json() for s in self.steps],
            "chain": [c.to_json() for c in self.chain],
            "chain_source": self.chain_source,
            "anchor": self.anchor.to_json() if self.anchor else None,
            "failure": failure,
        }


def _ignore(_step: Step) -> None:
    return None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _sni_text(up: UpstreamSettings) -> str:
    sni = tls.sni_for(up)
    if sni is not None:
        return sni
    if not up.sslsni:
        return "none (sslsni=0)"
    return "none (the name is an IP address)"


def _target(up: UpstreamSettings, label: str) -> dict[str, object]:
    return {
        "source": label,
        "host": up.host,
        "port": up.port,
        "hostaddr": up.hostaddr,
        "verify_name": up.verify_name,
        "sslmode": tls.effective_sslmode(up),
        "sslrootcert": up.sslrootcert,
        "sslnegotiation": up.sslnegotiation,
        "sni": tls.sni_for(up),
    }


def describe_target(up: UpstreamSettings, label: str) -> str:
    """The header line: what is checked, with the settings that decide the verdict."""
    mode = tls.effective_sslmode(up)
    roots = up.sslrootcert or ("system trust store" if mode != "require" else "none")
    dial = f" via {up.hostaddr}" if up.hostaddr else ""
    name = f", certificate name {up.tls_server_name}" if up.tls_server_name else ""
    return (
        f"checking {label}: {up.describe()}{dial} (sslmode {mode}, sslrootcert {roots}, "
        f"sslnegotiation {up.sslnegotiation}{name})"
    )


# -- reading certificates ----------------------------------------------------------------------


def presented_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, ...]:
    """DER certificates exactly as the server sent them, leaf first.

    Python 3.13 made ``get_unverified_chain`` public; from 3.10 it exists on the private
    ``_sslobj``. Without either, only the leaf is available (``getpeercert``).
    """
    holders: list[Any] = [ssl_object, getattr(ssl_object, "_sslobj", None)]
    for holder in holders:
        getter = getattr(holder, "get_unverified_chain", None)
        if getter is None:
            continue
        chain = getter()
        if not chain:
            continue
        out: list[bytes] = []
        for item in chain:
            if isinstance(item, bytes):
                out.append(item)
            else:  # _ssl.Certificate (3.10-3.12): PEM is its default encoding
                pem = item.public_bytes()
                cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
                out.append(cert.public_bytes(_DER))
        return tuple(out)
    leaf = ssl_object.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def _load_der_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    certs = []
    for der in chain_der:
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue  # a certificate cryptography cannot parse: show the rest
    return certs


def _system_roots() -> tuple[str, list[x509.Certificate]]:
    """The certificates OpenSSL's default store most likely holds (for anchor matching only)."""
    paths = ssl.get_default_verify_paths()
    for cafile in (paths.cafile, paths.openssl_cafile):
        if cafile and os.path.isfile(cafile):
            return f"the system trust store ({cafile})", _pem_blocks(cafile)
    certs: list[x509.Certificate] = []
    capath = paths.capath or paths.openssl_capath
    if capath and os.path.isdir(capath):
        seen: set[bytes] = set()
        for entry in sorted(os.listdir(capath)):
            for cert in _pem_blocks(os.path.join(capath, entry)):
                der = cert.public_bytes(_DER)
                if der not in seen:
                    seen.add(der)
                    certs.append(cert)
        return f"the system trust store ({capath})", certs
    return "the system trust store", certs


def _pem_blocks(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    certs = []
    for block in _PEM_CERT.findall(data):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue
    return certs


@contextlib.contextmanager
def _quiet_legacy_certificates() -> Iterator[None]:
    """System stores still carry old roots with non-positive serials; cryptography warns about
    each one, which says nothing about the server being checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def _configured_roots(up: UpstreamSettings) -> tuple[str, list[x509.Certificate]]:
    if up.sslrootcert is not None and up.sslrootcert != "system":
        return up.sslrootcert, tls.load_certificates(up.sslrootcert)
    with _quiet_legacy_certificates():
        return _system_roots()


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def find_anchor(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> Anchor | None:
    """The first root (walking up from the leaf, as OpenSSL's trusted-first search does) that
    signed a presented certificate, or that the server presented itself."""
    for index, cert in enumerate(chain):
        for root in roots:
            if cert == root:
                return Anchor(root, index, presented=True)
        for root in roots:
            if _issued_by(cert, root):
                return Anchor(root, index, presented=False)
    return None


# -- the check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    address: str
    version: str
    cipher: str
    alpn: str | None
    chain_der: tuple[bytes, ...]


def _diagnostic_handshake(up: UpstreamSettings, timeouts: Timeouts) -> _Probe:
    """TCP, SSLRequest (unless direct) and a TLS handshake that verifies nothing; no data sent.

    The same context as the sidecar's (versions, ALPN, SNI, client certificate), with only the
    certificate check switched off, so the server behaves as it does for the sidecar.
    """
    context = tls.build_client_context(up)
    context.verify_mode = ssl.CERT_NONE
    connect_timeout = up.connect_timeout or timeouts.connect
    with socket.create_connection((up.connect_host, up.port), timeout=connect_timeout) as sock:
        address = str(sock.getpeername()[0])
        sock.settimeout(timeouts.tls_handshake)
        if up.sslnegotiation == "postgres":
            sock.sendall(SSL_REQUEST)
            check_ssl_response(sock.recv(1), more_buffered=False)
        with context.wrap_socket(sock, server_hostname=tls.sni_for(up)) as tls_sock:
            cipher = tls_sock.cipher()
            return _Probe(
                address=address,
                version=tls_sock.version() or "unknown",
                cipher=cipher[0] if cipher else "unknown",
                alpn=tls_sock.selected_alpn_protocol(),
                chain_der=presented_chain(tls_sock),
            )


def _tcp_probe(up: UpstreamSettings, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    with socket.create_connection((up.connect_host, up.port), timeout=timeout) as sock:
        return str(sock.getpeername()[0]), time.monotonic() - started


async def _resolve(up: UpstreamSettings) -> Step:
    loop = asyncio.get_running_loop()
    host = up.connect_host
    try:
        infos = await loop.getaddrinfo(host, up.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Step("resolve", "fail", f'could not resolve "{host}": {exc.strerror}')
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return Step("resolve", "ok", f"{host} -> {', '.join(addresses)}", data={"addresses": addresses})


def _negotiation_ok(up: UpstreamSettings) -> Step:
    if up.sslnegotiation == "direct":
        return Step(
            "negotiation",
            "ok",
            "direct TLS (sslnegotiation=direct): no SSLRequest, ALPN 'postgresql' required",
        )
    return Step("negotiation", "ok", "sent SSLRequest; the server answered 'S' (TLS accepted)")


async def check_upstream(
    up: UpstreamSettings,
    timeouts: Timeouts | None = None,
    *,
    label: str = "--upstream",
    emit: Callable[[Step], None] = _ignore,
    now: datetime | None = None,
) -> CheckReport:
    """Run the sidecar's connection path against ``up`` and explain the outcome.

    ``emit`` is called with each step as soon as it is known (the text output prints it then,
    so a step that hangs shows where). Raises ``ConfigError`` when the TLS files themselves are
    unusable: that is a configuration problem, not a failed check.
    """
    timeouts = timeouts or Timeouts()
    context = tls.build_client_context(up)
    report = CheckReport(target=_target(up, label))

    def add(step: Step) -> None:
        report.steps.append(step)
        emit(step)

    resolved = await _resolve(up)
    add(resolved)

    negotiated = False

    def endpoint_factory() -> Endpoint:
        nonlocal negotiated
        negotiated = True  # asyncio builds the protocol just before the TLS handshake starts
        return Endpoint("upstream")

    try:
        conn = await connect_upstream(up, context, timeouts, endpoint_factory)
    except UpstreamError as exc:
        report.error = exc
        await _explain_failure(report, add, up, timeouts, exc, negotiated=negotiated, now=now)
        return report
    try:
        _report_success(report, add, up, conn, now=now)
    finally:
        await _close(conn.endpoint, timeouts.tls_handshake)
    return report


async def _close(endpoint: Endpoint, limit: float) -> None:
    """Close with a TLS close_notify so the server logs nothing; cut it if it does not answer."""
    endpoint.close()
    try:
        async with asyncio.timeout(limit):
            await endpoint.closed
    except TimeoutError:
        endpoint.abort()
        await endpoint.closed


def _report_success(
    report: CheckReport,
    add: Callable[[Step], None],
    up: UpstreamSettings,
    conn: UpstreamConnection,
    *,
    now: datetime | None,
) -> None:
    peer = conn.peer
    add(
        Step(
            "tcp",
            "ok",
            f"connected to {conn.address} port {up.port} in {_ms(conn.connect_seconds)}",
            data={"address": conn.address, "seconds": round(conn.connect_seconds, 6)},
        )
    )
    add(_negotiation_ok(up))
    retry = conn.hello_retry_group
    group = None if retry is None else GROUP_NAMES.get(retry, f"0x{retry:04x}")
    note = (
        None
        if group is None
        else f"the server asked for key-share group {group} with a HelloRetryRequest, one more "
        "round trip; `run` offers that group first from its second connection on"
    )
    add(
        _tls_step(
            up, peer.version, peer.cipher, peer.alpn, conn.handshake_seconds, note=note, retry=group
        )
    )
    assert conn.endpoint.transport is not None
    ssl_object = conn.endpoint.transport.get_extra_info("ssl_object")
    chain_der = presented_chain(ssl_object) if ssl_object is not None else peer.chain_der
    certs = _load_der_chain(chain_der or peer.chain_der)
    _chain_steps(report, add, up, certs, source="sidecar", now=now)
    mode = tls.effective_sslmode(up)
    if mode == "verify-full":
        summary = (
            f'certificate chain verified and host name "{up.verify_name}" matches the '
            "certificate (verify-full)"
        )
    elif mode == "verify-ca":
        summary = "certificate chain verified (verify-ca: the host name is not checked)"
    elif up.sslrootcert is not None:
        summary = "certificate chain verified against sslrootcert (require with a root file)"
    else:
        summary = "encrypted but the server is not authenticated (sslmode=require, no sslrootcert)"
    add(Step("verify", "ok", summary))


def _tls_step(
    up: UpstreamSettings,
    version: str,
    cipher: str,
    alpn: str | None,
    seconds: float | None,
    *,
    note: str | None,
    retry: str | None = None,
) -> Step:
    took = f", handshake {_ms(seconds)}" if seconds is not None else ""
    summary = f"{version}, {cipher}, ALPN {alpn or 'none'}, SNI {_sni_text(up)}{took}"
    return Step(
        "tls",
        "ok",
        summary,
        details=[f"({note})"] if note else [],
        data={
            "version": version,
            "cipher": cipher,
            "alpn": alpn,
            "sni": tls.sni_for(up),
            "hello_retry_group": retry,
        },
    )


def _chain_steps(
    report: CheckReport,
    add: Callable[[Step], None],
    up: UpstreamSettings,
    certs: list[x509.Certificate],
    *,
    source: str,
    now: datetime | None,
) -> tuple[Anchor | None, str | None, list[x509.Certificate] | None]:
    """Add the chain and anchor steps; return the anchor and the roots compared against."""
    infos = [describe_certificate(c, now=now) for c in certs]
    report.chain = infos
    report.chain_source = source
    count = _plural(len(infos), "certificate")
    details: list[str] = []
    if source == "diagnostic":
        details.append("(from the diagnostic handshake)")
    for index, info in enumerate(infos):
        details.append(f"[{index}]")
        details += format_certificate(info, indent="  ")
    add(Step("chain", "info", f"{count} as presented by the server", details=details))

    if tls.effective_sslmode(up) == "require" and up.sslrootcert is None:
        add(
            Step(
                "anchor",
                "skip",
                "not checked: sslmode=require without sslrootcert does not verify the chain "
                "(as in libpq)",
            )
        )
        return None, None, None
    roots_label, roots = _configured_roots(up)
    with _quiet_legacy_certificates():
        anchor = find_anchor(certs, roots)
    if anchor is None:
        add(
            Step(
                "anchor",
                "fail",
                f"no certificate in {roots_label} ({_plural(len(roots), 'certificate')}) issued "
                "any certificate the server presented",
            )
        )
        return None, roots_label, roots
    with _quiet_legacy_certificates():
        info = describe_certificate(anchor.root, now=now)
    report.anchor = info
    how = (
        f"the server sent it as [{anchor.chain_index}]"
        if anchor.presented
        else f"it issued [{anchor.chain_index}]"
    )
    add(
        Step(
            "anchor",
            "ok",
            f'"{info.subject}" from {roots_label}; {how}',
            details=[
                f"  not after    {_date(info.not_after)} ({info.days_left} days left)",
                f"  sha256       {info.sha256}",
            ],
            data={"root": info.subject, "roots": roots_label, "chain_index": anchor.chain_index},
        )
    )
    return anchor, roots_label, roots


async def _explain_failure(
    report: CheckReport,
    add: Callable[[Step], None],
    up: UpstreamSettings,
    timeouts: Timeouts,
    exc: UpstreamError,
    *,
    negotiated: bool,
    now: datetime | None,
) -> None:
    def fail(step: str) -> None:
        report.failed_step = step
        add(Step(step, "fail", str(exc), details=[f"hint: {exc.hint}"] if exc.hint else []))

    reason = exc.reason
    reached = Step("tcp", "ok", f"connected to {up.connect_host} port {up.port}")
    if reason == "dns":
        report.failed_step = "resolve"
        if report.steps and report.steps[-1].name == "resolve":
            report.steps[-1].details.append(str(exc))
        else:
            fail("resolve")
    elif reason == "refused":
        fail("tcp")
    elif reason == "timeout" and not negotiated:
        # Did TCP stall, or the answer to the SSLRequest? Ask TCP alone, once.
        limit = up.connect_timeout or timeouts.connect
        try:
            address, seconds = await asyncio.to_thread(_tcp_probe, up, limit)
        except OSError:
            fail("tcp")
        else:
            add(
                Step(
                    "tcp",
                    "ok",
                    f"connected to {address} port {up.port} in {_ms(seconds)} (on a second "
                    "connection made only for this diagnosis)",
                )
            )
            fail("negotiation")
    elif not negotiated:
        add(reached)
        fail("negotiation")
    elif reason != "tls_verify_failed":
        add(reached)
        add(_negotiation_ok(up))
        fail("tls")
    else:
        add(reached)
        add(_negotiation_ok(up))
        await _explain_verify_failure(report, add, up, timeouts, exc, now=now)
        fail("verify")
    if report.failed_step is not None and not report.diagnoses:
        report.diagnoses.append(Diagnosis(reason, str(exc), exc.hint))


async def _explain_verify_failure(
    report: CheckReport,
    add: Callable[[Step], None],
    up: UpstreamSettings,
    timeouts: Timeouts,
    exc: UpstreamError,
    *,
    now: datetime | None,
) -> None:
    try:
        probe = await asyncio.to_thread(_diagnostic_handshake, up, timeouts)
    except (OSError, ssl.SSLError, UpstreamError) as probe_error:
        add(
            Step(
                "chain",
                "skip",
                f"could not read the server's certificates on a diagnostic handshake either: "
                f"{probe_error}",
            )
        )
        return
    add(_tls_step(up, probe.version, probe.cipher, probe.alpn, None, note=_DIAGNOSTIC_NOTE))
    certs = _load_der_chain(probe.chain_der)
    anchor, roots_label, roots = _chain_steps(report, add, up, certs, source="diagnostic", now=now)
    report.diagnoses += diagnose_verify_failure(exc, up, certs, anchor, roots_label, roots, now=now)


def diagnose_verify_failure(
    exc: UpstreamError,
    up: UpstreamSettings,
    chain: Sequence[x509.Certificate],
    anchor: Anchor | None,
    roots_label: str | None,
    roots: Sequence[x509.Certificate] | None,
    *,
    now: datetime | None = None,
) -> list[Diagnosis]:
    """Every likely cause visible in the evidence, most specific first."""
    now = now if now is not None else datetime.now(UTC)
    if isinstance(exc, CertificateNameMismatch):
        return [_host_mismatch(exc, up)]
    found: list[Diagnosis] = []
    for index, cert in enumerate(chain):
        info = describe_certificate(cert, now=now)
        if info.status == "expired":
            found.append(
                Diagnosis(
                    "expired",
                    f'certificate [{index}] "{info.subject}" expired on '
                    f"{_date(info.not_after)} ({_plural(-info.days_left - 1, 'day')} ago)",
                    "the server must present a renewed certificate; if that date looks wrong, "
                    "check this host's clock (date -u)",
                )
            )
        elif info.status == "not yet valid":
            found.append(
                Diagnosis(
                    "not_yet_valid",
                    f'certificate [{index}] "{info.subject}" is not valid before '
                    f"{_date(info.not_before)}",
                    "check this host's clock (date -u); a clock behind the server's rejects "
                    "freshly issued certificates",
                )
            )
    if anchor is not None:
        root = describe_certificate(anchor.root, now=now)
        if root.status != "valid":
            found.append(
                Diagnosis(
                    "expired" if root.status == "expired" else "not_yet_valid",
                    f'the root "{root.subject}" in {roots_label} is {root.status} '
                    f"(valid {_date(root.not_before)} to {_date(root.not_after)})",
                    "replace it with the CA's current root certificate",
                )
            )
        elif not root.self_signed:
            found.append(
                Diagnosis(
                    "intermediate_as_root",
                    f'"{root.subject}" in {roots_label} is an intermediate CA, not a root; '
                    "the sidecar (like libpq) never trusts a chain that stops at an intermediate",
                    f'add the root that issued it ("{root.issuer}") to sslrootcert; trust roots, '
                    "never intermediates (they rotate without notice)",
                )
            )
    elif roots is not None and chain:
        found.append(_wrong_ca(chain, roots_label or "sslrootcert", roots, now=now))
    return found


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _wrong_ca(
    chain: Sequence[x509.Certificate],
    roots_label: str,
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
) -> Diagnosis:
    top = describe_certificate(chain[-1], now=now)
    if top.self_signed:
        leads_to = top.subject
        key = f" (key id {top.key_id})" if top.key_id else ""
    else:
        leads_to = top.issuer
        key = f" (key id {top.authority_key_id})" if top.authority_key_id else ""
    subjects = [r.subject.rfc4514_string() for r in roots]
    if not subjects:
        have = f"{roots_label} holds no certificate"
    elif len(subjects) <= _ROOTS_LISTED:
        have = f"{roots_label} holds only " + ", ".join(f'"{s}"' for s in subjects)
    else:
        have = f"{roots_label} holds {len(subjects)} other certificates"
    fix = (
        f'put the root CA certificate "{leads_to}" in sslrootcert (if "{leads_to}" is an '
        "intermediate, the root above it; trust roots, never intermediates); a DER .cer "
        "download converts with: pg-tls-sidecar ca convert ROOT.cer -o root.pem"
    )
    return Diagnosis(
        "wrong_ca",
        f'wrong CA: the server\'s chain leads to "{leads_to}"{key}, but {have}',
        fix,
    )


def _host_mismatch(exc: CertificateNameMismatch, up: UpstreamSettings) -> Diagnosis:
    checked = (
        f'tls_server_name "{up.tls_server_name}"' if up.tls_server_name else f'host "{up.host}"'
    )
    names = tuple(dict.fromkeys(exc.names))  # a CN repeating a SAN is one name
    if not names:
        return Diagnosis(
            "host_mismatch",
            f"host name mismatch: the sidecar checks {checked}, and the server certificate "
            "names no host at all",
            "the server needs a certificate with its name; verify-ca skips the name check",
        )
    shown = ", ".join(f'"{n}"' for n in names)
    example = names[0].replace("*", "SERVER", 1) if names[0].startswith("*.") else names[0]
    return Diagnosis(
        "host_mismatch",
        f"host name mismatch: the sidecar checks {checked}, but the certificate carries {shown}",
        f"connect with host={example}; or, to keep dialling {up.connect_host}, set "
        f"tls_server_name={example} (or host={example} hostaddr=<the server's IP address>)",
    )


# -- text output -------------------------------------------------------------------------------


def render_step(step: Step) -> list[str]:
    """``[ ok ] tcp          connected to ...`` and the step's details indented under it."""
    lines = [f"{_BADGES[step.status]} {step.name:<12} {step.summary}"]
    lines += [f"{'':20}{line}" for line in step.details]
    return lines


def render_verdict(report: CheckReport, up: UpstreamSettings) -> list[str]:
    if report.ok:
        return [
            f"OK: the sidecar reaches {up.describe()} over TLS "
            f"({tls.effective_sslmode(up)}); sessions on this route can start"
        ]
    reason = report.error.reason if report.error else "unknown"
    lines = [f'FAILED at step "{report.failed_step}" (reason {reason}): sessions would be refused']
    for diagnosis in report.diagnoses:
        lines.append(f"  cause: {diagnosis.text}")
        if diagnosis.fix:
            lines.append(f"  fix:   {diagnosis.fix}")
    return lines
