"""The sidecar's exception tree.

Every failure a user can cause or meet has its own type, so callers decide what to do by type
(send an ErrorResponse, count a metric, exit with a code) and never by matching message text.
Messages are written for a DBA reading a log line at 3 a.m.: what failed, with which value, and
what to do about it.
"""

from __future__ import annotations

from typing import Final

# SQLSTATEs the sidecar itself sends to clients (PostgreSQL's errcodes.txt).
SQLSTATE_PROTOCOL_VIOLATION: Final = "08P01"
SQLSTATE_CONNECTION_FAILURE: Final = "08006"
SQLSTATE_UNABLE_TO_CONNECT: Final = "08001"
SQLSTATE_TOO_MANY_CONNECTIONS: Final = "53300"
SQLSTATE_CANNOT_CONNECT_NOW: Final = "57P03"
SQLSTATE_ADMIN_SHUTDOWN: Final = "57P01"
SQLSTATE_FEATURE_NOT_SUPPORTED: Final = "0A000"


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose; anything else escaping is a bug."""


class ConfigError(SidecarError):
    """Configuration that cannot be used: raised before anything starts listening.

    ``key`` names the offending setting as the user wrote it (``routes[0].upstream.sslmode``),
    ``value`` what was found, and ``fix`` what to write instead.
    """

    def __init__(
        self,
        key: str,
        problem: str,
        *,
        value: object = None,
        fix: str | None = None,
        source: str | None = None,
    ) -> None:
        self.key = key
        self.problem = problem
        self.value = value
        self.fix = fix
        self.source = source
        parts = []
        if source:
            parts.append(f"{source}: ")
        parts.append(f"{key}: {problem}")
        if value is not None:
            parts.append(f" (got {value!r})")
        if fix:
            parts.append(f"; {fix}")
        super().__init__("".join(parts))


class ListenError(SidecarError):
    """A configured listener could not be bound; nothing is served (all or nothing)."""


class ProtocolViolation(SidecarError):
    """The client broke the PostgreSQL startup protocol.

    Carries the SQLSTATE the client is sent in its ErrorResponse (``08P01`` unless a more
    specific code fits, as PostgreSQL itself does for an unsupported protocol version).
    """

    def __init__(self, message: str, *, sqlstate: str = SQLSTATE_PROTOCOL_VIOLATION) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class UpstreamError(SidecarError):
    """The sidecar could not open a trustworthy session to the upstream server.

    ``reason`` is one of a small fixed set (see ``UPSTREAM_ERROR_REASONS``), used as a metric
    label and in logs; the message is what the client sees in its ErrorResponse.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        sqlstate: str = SQLSTATE_UNABLE_TO_CONNECT,
        hint: str | None = None,
    ) -> None:
        if reason not in UPSTREAM_ERROR_REASONS:
            raise ValueError(f"unknown upstream error reason {reason!r}")
        self.reason = reason
        self.sqlstate = sqlstate
        self.hint = hint
        super().__init__(message)


UPSTREAM_ERROR_REASONS: Final = frozenset(
    {
        "dns",  # the host name did not resolve
        "refused",  # TCP connection refused or reset before TLS
        "timeout",  # TCP connect or TLS handshake took too long
        "ssl_refused",  # the server answered the SSLRequest with N, E or garbage
        "tls_verify_failed",  # certificate chain or host name check failed
        "tls_handshake",  # any other TLS failure (protocol version, alert, no ALPN)
        "protocol",  # the server broke the protocol (bytes after S, bad SASL message)
        "closed",  # the server closed the connection during startup
    }
)
