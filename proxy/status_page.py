"""The ``/status`` document and its HTML page.

The page is for a person debugging at 3 a.m. with only a browser or ``curl``: which server, which
TLS, which certificates and when they expire, who is connected. So it is one self-contained
page (inline CSS, no JavaScript, nothing fetched), and every value in it is escaped: session
fields such as ``application_name`` are chosen by clients, certificate subjects by whoever
issued them. ``StatusDoc`` is also served as JSON, so it holds only JSON types, and no secrets
(no passwords, no keys, no cancel keys).
"""

from __future__ import annotations

import html
import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Final, Literal, TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes

EXPIRING_DAYS: Final = 30  # certificates expiring within this many days are highlighted

CertificateState = Literal["valid", "expiring", "expired", "not_yet_valid"]


class CertificateSummary(TypedDict):
    subject: str  # RFC 4514
    issuer: str
    sans: list[str]  # "DNS:name", "IP:address", ...
    serial: str  # hex
    not_before: str  # ISO 8601, UTC
    not_after: str
    days_left: int  # whole days until not_after; negative once expired (-1: a day ago)
    state: CertificateState
    self_signed: bool
    sha256: str  # fingerprint, hex with colons


class TlsSummary(TypedDict):
    version: str  # "TLSv1.3"
    cipher: str
    alpn: str | None  # "postgresql" when the server negotiated it
    at: str  # ISO 8601 time of the handshake


class SessionSummary(TypedDict):
    id: int
    client: str  # "127.0.0.1:51234", or the Unix socket path
    user: str | None  # from the StartupMessage
    database: str | None
    application: str | None
    age_seconds: float
    bytes_client_to_server: int
    bytes_server_to_client: int


class RouteStatus(TypedDict):
    name: str
    listeners: list[str]
    upstream: str  # host:port
    server_name: str  # the name verified (and sent as SNI)
    sslmode: str
    sslrootcert: str | None  # path, "system" or None; a path is not a secret
    active_connections: int
    max_connections: int | None
    tls: TlsSummary | None  # the latest successful handshake
    server_certificates: list[CertificateSummary]  # leaf first
    ca_certificates: list[CertificateSummary]
    sessions: list[SessionSummary]


class StatusDoc(TypedDict):
    version: str
    generated_at: str  # ISO 8601, UTC
    started_at: str
    uptime_seconds: float
    ready: bool
    reasons: list[str]  # why not ready; empty when ready
    active_connections: int
    max_connections: int
    routes: list[RouteStatus]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # cryptography is stricter than OpenSSL about some encodings
        return [f"(unreadable: {exc})"]
    names: list[str] = []
    for name in extension.value:
        if isinstance(name, x509.DNSName):
            names.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            names.append(f"IP:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            names.append(f"email:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            names.append(f"URI:{name.value}")
        else:
            names.append(type(name).__name__)
    return names


def certificate_summary(cert: x509.Certificate, now: datetime) -> CertificateSummary:
    """What a person checks on a certificate, ready for JSON. ``now`` must be timezone-aware."""
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    left = not_after - now
    days_left = int(left / timedelta(days=1))  # whole days, towards zero either way
    state: CertificateState
    if now > not_after:
        state = "expired"
    elif now < not_before:
        state = "not_yet_valid"
    elif left < timedelta(days=EXPIRING_DAYS):
        state = "expiring"
    else:
        state = "valid"
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return CertificateSummary(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=_sans(cert),
        serial=f"{cert.serial_number:x}",
        not_before=_iso(not_before),
        not_after=_iso(not_after),
        days_left=days_left,
        state=state,
        self_signed=cert.issuer == cert.subject,
        sha256=fingerprint,
    )


# --- formatting


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def duration(seconds: float) -> str:
    """``3d 4h``, ``5m 12s``: two units are enough to read an age at a glance."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value][:2]
    return " ".join(shown) or "0s"


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _client(text: str) -> str:
    """Client addresses as given, but an IPv6 peer gets its brackets for readability."""
    host, _, port = text.rpartition(":")
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return text


_CSS: Final = """
:root{color-scheme:light dark;--fg:#1d2330;--muted:#5d6577;--bg:#fff;--card:#f6f7f9;
--line:#dde1e7;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#9aa3b2;--bg:#14171c;
--card:#1c2027;--line:#2d333d;--ok:#3fb950;--warn:#d29922;--bad:#f85149}}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;padding:24px;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
h3{font-size:14px;margin:18px 0 6px;color:var(--muted);text-transform:uppercase;
letter-spacing:.04em}
.sub{color:var(--muted);margin-bottom:16px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px;
margin:16px 0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dt{color:var(--muted)}dd{margin:0}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;
overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;color:#fff}
.ok{background:var(--ok)}.warn{background:var(--warn)}.bad{background:var(--bad)}
.t-expired td,.t-not_yet_valid td{color:var(--bad)}.t-expiring td{color:var(--warn)}
.num{text-align:right;white-space:nowrap}
.empty{color:var(--muted);font-style:italic}
ul{margin:4px 0 0 18px;padding:0}
"""

_STATE_BADGE: Final[dict[CertificateState, tuple[str, str]]] = {
    "valid": ("ok", "valid"),
    "expiring": ("warn", "EXPIRING"),
    "expired": ("bad", "EXPIRED"),
    "not_yet_valid": ("bad", "NOT YET VALID"),
}


def _table(headers: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(
        f'<th class="num">{_e(h[1:])}</th>' if h.startswith(">") else f"<th>{_e(h)}</th>"
        for h in headers
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _certificates(certs: Sequence[CertificateSummary], empty: str) -> str:
    rows = []
    for cert in certs:
        css, label = _STATE_BADGE[cert["state"]]
        sans = ", ".join(cert["sans"])
        rows.append(
            f'<tr class="t-{_e(cert["state"])}">'
            f'<td class="mono">{_e(cert["subject"])}</td>'
            f'<td class="mono">{_e(cert["issuer"])}</td>'
            f'<td class="mono">{_e(sans) or "&mdash;"}</td>'
            f"<td>{_e(cert['not_after'])}</td>"
            f'<td class="num">{_e(cert["days_left"])}</td>'
            f'<td><span class="badge {css}">{_e(label)}</span></td></tr>'
        )
    headers = ("Subject", "Issuer", "Names (SAN)", "Not after", ">Days left", "State")
    return _table(headers, rows, empty)


def _sessions(sessions: Sequence[SessionSummary]) -> str:
    rows = [
        "<tr>"
        f'<td class="num">{_e(s["id"])}</td>'
        f'<td class="mono">{_e(_client(s["client"]))}</td>'
        f"<td>{_e(s['user'] or '')}</td>"
        f"<td>{_e(s['database'] or '')}</td>"
        f"<td>{_e(s['application'] or '')}</td>"
        f'<td class="num">{_e(duration(s["age_seconds"]))}</td>'
        f'<td class="num">{_e(size(s["bytes_client_to_server"]))}</td>'
        f'<td class="num">{_e(size(s["bytes_server_to_client"]))}</td>'
        "</tr>"
        for s in sessions
    ]
    headers = (
        ">Id",
        "Client",
        "User",
        "Database",
        "Application",
        ">Age",
        ">To server",
        ">To client",
    )
    return _table(headers, rows, "No active sessions.")


def _route(route: RouteStatus) -> str:
    tls = route["tls"]
    if tls is None:
        tls_text = '<span class="empty">no successful handshake yet</span>'
    else:
        alpn = tls["alpn"] or "none"
        tls_text = (
            f"{_e(tls['version'])}, <code>{_e(tls['cipher'])}</code>, ALPN {_e(alpn)} "
            f'<span class="sub">at {_e(tls["at"])}</span>'
        )
    limit = route["max_connections"]
    connections = f"{route['active_connections']}" + (f" of {limit}" if limit else "")
    details = (
        "<dl>"
        f"<dt>Listeners</dt><dd class='mono'>{_e(', '.join(route['listeners']))}</dd>"
        f"<dt>Upstream</dt><dd class='mono'>{_e(route['upstream'])}</dd>"
        f"<dt>Verified name</dt><dd class='mono'>{_e(route['server_name'])}</dd>"
        f"<dt>sslmode</dt><dd>{_e(route['sslmode'])}</dd>"
        f"<dt>Root certificates</dt><dd class='mono'>"
        f"{_e(route['sslrootcert'] or 'system trust store')}</dd>"
        f"<dt>Last TLS session</dt><dd>{tls_text}</dd>"
        f"<dt>Connections</dt><dd>{_e(connections)}</dd>"
        "</dl>"
    )
    return (
        f"<section><h2>Route {_e(route['name'])}</h2>{details}"
        "<h3>Server certificate chain</h3>"
        + _certificates(route["server_certificates"], "Not seen yet: no successful handshake.")
        + "<h3>Configured CA certificates</h3>"
        + _certificates(
            route["ca_certificates"], "None listed (system trust store, or no chain check)."
        )
        + "<h3>Active sessions</h3>"
        + _sessions(route["sessions"])
        + "</section>"
    )


def render_html(status: StatusDoc) -> str:
    """The whole page; every interpolated value passes through ``html.escape``."""
    if status["ready"]:
        readiness = '<span class="badge ok">READY</span>'
    else:
        readiness = '<span class="badge bad">NOT READY</span>'
    reasons = "".join(f"<li>{_e(reason)}</li>" for reason in status["reasons"])
    routes = "".join(_route(route) for route in status["routes"])
    summary = (
        "<section><dl>"
        f"<dt>Readiness</dt><dd>{readiness}" + (f"<ul>{reasons}</ul>" if reasons else "") + "</dd>"
        f"<dt>Uptime</dt><dd>{_e(duration(status['uptime_seconds']))} "
        f'<span class="sub">(since {_e(status["started_at"])})</span></dd>'
        f"<dt>Connections</dt><dd>{_e(status['active_connections'])} of "
        f"{_e(status['max_connections'])}</dd>"
        "</dl></section>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>pg-tls-sidecar {_e(status['version'])}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>pg-tls-sidecar {_e(status['version'])}</h1>"
        f'<div class="sub">Status at {_e(status["generated_at"])} &middot; '
        '<a href="?format=json">JSON</a> &middot; <a href="metrics">metrics</a></div>'
        f"{summary}{routes}</body></html>\n"
    )
