"""Make AuthenticationSASL acceptable to a client on the sidecar's plaintext leg.

Over TLS the server offers ``SCRAM-SHA-256-PLUS``; libpq refuses any ``-PLUS`` mechanism on a
connection that is not TLS (its guard against SSL stripping) and channel binding could not
succeed through a TLS-terminating hop anyway, because the client would bind to a TLS session
it does not have. Dropping the ``-PLUS`` names lets the client choose plain SCRAM, which the
server accepts.
"""

from __future__ import annotations

import struct
from typing import Final

from proxy.errors import UpstreamError

AUTH_SASL: Final = 10
_HEADER: Final = struct.Struct("!cii")  # 'R', length, auth code
_PLUS_SUFFIX: Final = b"-PLUS"


def _malformed(problem: str) -> UpstreamError:
    return UpstreamError(
        "protocol",
        f"the upstream server sent a malformed AuthenticationSASL message: {problem}",
    )


def _split_names(message: bytes) -> list[bytes]:
    """The raw mechanism names; every framing rule is checked on the way."""
    if len(message) < _HEADER.size:
        raise _malformed(f"{len(message)} bytes is shorter than its header")
    kind, length, code = _HEADER.unpack_from(message)
    if kind != b"R" or code != AUTH_SASL:
        raise _malformed(f"message type {kind!r} with auth code {code} is not AuthenticationSASL")
    if length != len(message) - 1:
        raise _malformed(f"declared length {length} but the message holds {len(message) - 1}")
    body = message[_HEADER.size :]
    if not body.endswith(b"\x00\x00") and body != b"\x00":
        raise _malformed("the mechanism list does not end with an empty name")
    names = body[:-1].split(b"\x00")[:-1] if len(body) > 1 else []
    if not names or any(not name for name in names):
        raise _malformed("the mechanism list is empty or contains an empty name")
    return names


def parse_sasl_mechanisms(message: bytes) -> list[str]:
    """The mechanism names in an AuthenticationSASL message (``R``, code 10), in order."""
    return [name.decode("utf-8", errors="replace") for name in _split_names(message)]


def strip_channel_binding(message: bytes) -> bytes:
    """``message`` without channel-binding (``*-PLUS``) mechanisms, its length fixed.

    Returns ``message`` itself when it offers none, so callers can cheaply tell whether
    anything changed.
    """
    names = _split_names(message)
    kept = [name for name in names if not name.endswith(_PLUS_SUFFIX)]
    if len(kept) == len(names):
        return message
    if not kept:
        offered = ", ".join(name.decode("utf-8", errors="replace") for name in names)
        raise UpstreamError(
            "protocol",
            f"the server offers only channel-binding SASL mechanisms ({offered}), which "
            "cannot work through a TLS-terminating sidecar; allow SCRAM-SHA-256 on the server",
        )
    body = b"".join(name + b"\x00" for name in kept) + b"\x00"
    return _HEADER.pack(b"R", 8 + len(body), AUTH_SASL) + body
