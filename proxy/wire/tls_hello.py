"""Spotting a TLS 1.3 HelloRetryRequest in the server's first flight, without any I/O.

Why the sidecar looks at all: a client's first ClientHello carries a key share for one group
only (OpenSSL's first: X25519), and PostgreSQL up to 17 accepts exactly one, ``ssl_ecdh_curve``,
by default ``prime256v1``. Every connection to such a server then pays a HelloRetryRequest: one
more network round trip and a wasted key generation before the real handshake starts. libpq
pays it on every connection. The sidecar reads which group the server asked for, and offers
that group first from then on (``proxy.route``), so later handshakes go straight through.

RFC 8446 section 4.1.3-4.1.4: a HelloRetryRequest is a ServerHello whose ``random`` is a fixed
value; its ``key_share`` extension holds just the selected NamedGroup.
"""

from __future__ import annotations

import struct
from typing import Final

# SHA-256("HelloRetryRequest"), RFC 8446 section 4.1.3.
HELLO_RETRY_RANDOM: Final = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)
_RECORD_HANDSHAKE: Final = 0x16
_SERVER_HELLO: Final = 0x02
_EXT_KEY_SHARE: Final = 0x0033

# NamedGroup code points (IANA TLS Supported Groups) whose OpenSSL names ``ssl.SSLContext.
# set_ecdh_curve`` accepts; a group outside this table is never offered first.
GROUP_NAMES: Final = {
    0x0017: "prime256v1",
    0x0018: "secp384r1",
    0x0019: "secp521r1",
    0x001D: "X25519",
    0x001E: "X448",
}

_U16: Final = struct.Struct("!H")


def hello_retry_group(first_flight: bytes) -> int | None:
    """The NamedGroup a HelloRetryRequest asks for, or ``None`` when the bytes are not one.

    ``first_flight`` is what the server sent first after the ClientHello, as read from the
    socket. Anything short, malformed or of another kind is ``None``: this only decides which
    key share to offer next time, and OpenSSL itself judges the handshake.
    """
    data = memoryview(first_flight)
    # TLS record: type(1) legacy_version(2) length(2); handshake: type(1) length(3).
    if len(data) < 9 or data[0] != _RECORD_HANDSHAKE or data[5] != _SERVER_HELLO:
        return None
    record_end = 5 + _U16.unpack_from(data, 3)[0]
    body_end = 9 + int.from_bytes(data[6:9], "big")
    end = min(record_end, body_end, len(data))
    # ServerHello: legacy_version(2) random(32) session_id<0..32> cipher_suite(2)
    # legacy_compression_method(1) extensions<6..2^16-1>.
    pos = 9 + 2
    if end < pos + 32 or bytes(data[pos : pos + 32]) != HELLO_RETRY_RANDOM:
        return None
    pos += 32
    if pos >= end:
        return None
    pos += 1 + data[pos] + 2 + 1
    if pos + 2 > end:
        return None
    extensions_end = min(end, pos + 2 + _U16.unpack_from(data, pos)[0])
    pos += 2
    while pos + 4 <= extensions_end:
        (ext_type,) = _U16.unpack_from(data, pos)
        (ext_len,) = _U16.unpack_from(data, pos + 2)
        pos += 4
        if ext_type == _EXT_KEY_SHARE:
            if ext_len != 2 or pos + 2 > extensions_end:
                return None
            return int(_U16.unpack_from(data, pos)[0])
        pos += ext_len
    return None
