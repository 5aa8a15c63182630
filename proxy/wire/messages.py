"""Constants and small encoders/decoders shared by the wire-protocol modules.

Everything here is pure: bytes in, values out, or values in, bytes out. The numbers come from
PostgreSQL's ``src/include/libpq/pqcomm.h`` so the sidecar judges a packet exactly as the
server behind it would.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from proxy.errors import ProtocolViolation

SSL_REQUEST_CODE: Final = 80877103  # PG_PROTOCOL(1234, 5679)
GSSENC_REQUEST_CODE: Final = 80877104  # PG_PROTOCOL(1234, 5680)
CANCEL_REQUEST_CODE: Final = 80877102  # PG_PROTOCOL(1234, 5678)

# The server's limit on a startup packet's body (everything after the length word).
MAX_STARTUP_PACKET_LENGTH: Final = 10000

SSL_REQUEST: Final = struct.pack("!ii", 8, SSL_REQUEST_CODE)

PROTOCOL_3_0: Final = (3, 0)
LATEST_PROTOCOL: Final = (3, 2)

_SQLSTATE_RE: Final = re.compile(r"[0-9A-Z]{5}")


class WireUsageError(RuntimeError):
    """Our own code called a wire parser in a state where the call makes no sense.

    Kept apart from :class:`proxy.errors.SidecarError` on purpose: a peer can never cause it,
    so catching it alongside protocol errors would hide a bug.
    """


def _cstring(text: str) -> bytes:
    # A NUL inside the text would end the field early and shift every later field; surrogates
    # (from surrogateescape-decoded input) would make encode() raise. Neither may break the
    # message, so both are replaced.
    return text.replace("\x00", "\ufffd").encode("utf-8", errors="replace") + b"\x00"


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse (``E``) the client's driver shows like one from the server itself.

    ``V`` (the untranslated severity, protocol 3.0 since PostgreSQL 9.6) is always sent so
    drivers that key on it, such as psycopg, classify the error correctly.
    """
    if not _SQLSTATE_RE.fullmatch(sqlstate):
        raise ValueError(f"SQLSTATE must be five characters 0-9/A-Z, got {sqlstate!r}")
    fields = [
        b"S" + _cstring(severity),
        b"V" + _cstring(severity),
        b"C" + _cstring(sqlstate),
        b"M" + _cstring(message),
    ]
    if detail is not None:
        fields.append(b"D" + _cstring(detail))
    if hint is not None:
        fields.append(b"H" + _cstring(hint))
    body = b"".join(fields) + b"\x00"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def parse_startup_parameters(body: bytes) -> dict[str, str]:
    """Decode a StartupMessage's ``name\\0value\\0...\\0`` list (the bytes after the version).

    The layout rule is the server's (``ProcessStartupPacket``): pairs of NUL-terminated
    strings, then one NUL that must be the very last byte. Values are decoded with
    ``errors="replace"`` because they are only read for logs and routing; the packet itself is
    forwarded unchanged. A repeated name is refused because the server would silently take
    the last one while our logs showed the first.
    """
    end = len(body)
    params: dict[str, str] = {}
    seen: set[bytes] = set()
    offset = 0
    while offset < end and body[offset] != 0:
        name_end = body.find(b"\x00", offset)
        if name_end < 0 or name_end + 1 >= end:
            break  # name or value runs off the end: reported below as a layout error
        value_end = body.find(b"\x00", name_end + 1)
        if value_end < 0:
            offset = end
            break
        raw_name = body[offset:name_end]
        name = raw_name.decode("utf-8", errors="replace")
        if raw_name in seen or name in params:
            raise ProtocolViolation(
                f"invalid startup packet: parameter {name!r} appears more than once; "
                "the client must send each startup parameter once"
            )
        seen.add(raw_name)
        params[name] = body[name_end + 1 : value_end].decode("utf-8", errors="replace")
        offset = value_end + 1
    if offset != end - 1:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    return params
