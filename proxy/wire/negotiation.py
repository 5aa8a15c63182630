"""Sidecar -> upstream: judge the server's one-byte answer to our SSLRequest.

The answer arrives before any TLS, so it is the one moment an attacker on the path can speak
for the server. Each check here is the fix for a real libpq bug (the CVE is named in the
message), and none of them lets a byte from that moment reach the client.
"""

from __future__ import annotations

from proxy.errors import UpstreamError
from proxy.wire.messages import SSL_REQUEST


def ssl_request_packet() -> bytes:
    """The 8-byte SSLRequest the sidecar sends first on every upstream connection."""
    return SSL_REQUEST


def check_ssl_response(answer: bytes, *, more_buffered: bool) -> None:
    """Raise unless ``answer`` lets the TLS handshake start now.

    ``answer`` is what was read for the single answer byte (``b""`` at end of stream);
    ``more_buffered`` says whether any further byte was already received with it. A longer
    ``answer`` counts as ``more_buffered``.
    """
    first = answer[:1]
    extra = more_buffered or len(answer) > 1
    if first == b"S":
        if extra:
            raise UpstreamError(
                "protocol",
                "the upstream server sent unencrypted bytes after agreeing to TLS (answer S "
                "to the SSLRequest); they cannot be trusted and the connection is dropped "
                "(CVE-2021-23222); something between the sidecar and the server is "
                "tampering with the connection",
            )
        return
    if first == b"N":
        raise UpstreamError(
            "ssl_refused",
            "the upstream server refused TLS (answered N to the SSLRequest); the sidecar "
            "never sends a session unencrypted",
            hint="enable TLS on the server (ssl = on in postgresql.conf; always on for Azure "
            "Database for PostgreSQL) and check that host and port point at the PostgreSQL "
            "server itself, not at a pooler or proxy without TLS",
        )
    if first == b"E":
        # CVE-2024-10977: the error text comes from an unauthenticated peer; showing it would
        # let anyone on the path put words in the server's mouth.
        raise UpstreamError(
            "ssl_refused",
            "the upstream server answered the SSLRequest with an error before TLS was set "
            "up; its text is not shown because nothing proves it came from the server "
            "(CVE-2024-10977)",
            hint="look in the server's log for why it rejected the connection (too many "
            "connections, pg_hba.conf, a server too old for TLS negotiation)",
        )
    if first == b"":
        raise UpstreamError(
            "closed",
            "the upstream server closed the connection without answering the SSLRequest",
            hint="check that host and port point at a PostgreSQL server and that it is not "
            "shutting down or out of connections",
        )
    raise UpstreamError(
        "protocol",
        f"the upstream server answered 0x{first[0]:02x} to the SSLRequest, which is not a "
        "PostgreSQL server's answer",
        hint="check that host and port point at a PostgreSQL server (not, for example, an "
        "HTTP or TLS-only endpoint)",
    )
