"""Server -> client during authentication: frame messages until the session is established.

Only one message is ever changed (AuthenticationSASL, see :mod:`proxy.wire.sasl`); every
other byte is forwarded exactly as the server sent it. Once ReadyForQuery or an ErrorResponse
has passed, the caller stops using this filter and relays raw bytes, so the per-message cost
is paid only during startup.
"""

from __future__ import annotations

import struct
from typing import Final

from proxy.errors import UpstreamError
from proxy.wire.messages import WireUsageError
from proxy.wire.sasl import AUTH_SASL, strip_channel_binding

# Far above anything a server sends before ReadyForQuery (the largest is an ErrorResponse),
# low enough that a hostile or broken peer cannot make us hold megabytes.
MAX_STARTUP_MESSAGE: Final = 64 * 1024

AUTH_OK: Final = 0
_INT32: Final = struct.Struct("!I")

# Message types the server may send before the session is ready, with the allowed range of
# the length field (which counts itself but not the type byte).
_LENGTH_RANGE: Final[dict[int, tuple[int, int]]] = {
    ord("R"): (8, MAX_STARTUP_MESSAGE),  # Authentication*: at least the auth code
    ord("S"): (4, MAX_STARTUP_MESSAGE),  # ParameterStatus
    ord("K"): (12, 8 + 256),  # BackendKeyData: pid + 4-byte key, up to 256 bytes from PG 18
    ord("v"): (4, MAX_STARTUP_MESSAGE),  # NegotiateProtocolVersion
    ord("N"): (4, MAX_STARTUP_MESSAGE),  # NoticeResponse
    ord("E"): (4, MAX_STARTUP_MESSAGE),  # ErrorResponse: ends startup
    ord("Z"): (5, 5),  # ReadyForQuery: ends startup
}
_ENDS_STARTUP: Final = frozenset({ord("Z"), ord("E")})


class BackendFilterMisuse(WireUsageError):
    """The sidecar's own code used :class:`BackendStartupFilter` wrongly."""


def _error_sqlstate(body: bytes | memoryview) -> str | None:
    """The ``C`` field of an ErrorResponse body, or ``None`` if absent or unreadable."""
    data = bytes(body)
    offset = 0
    while offset < len(data) and data[offset] != 0:
        end = data.find(b"\x00", offset + 1)
        if end < 0:
            return None
        if data[offset] == ord("C"):
            return data[offset + 1 : end].decode("ascii", errors="replace")
        offset = end + 1
    return None


class BackendStartupFilter:
    """Frames server messages until the session is established; rewrites AuthenticationSASL."""

    __slots__ = (
        "_buf",
        "_done",
        "_remaining",
        "authenticated",
        "backend_pid",
        "server_error_sqlstate",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        self._remaining = b""
        self.backend_pid: int | None = None
        self.authenticated = False
        self.server_error_sqlstate: str | None = None

    @property
    def done(self) -> bool:
        """ReadyForQuery or an ErrorResponse has been passed on; the rest is relayed raw."""
        return self._done

    def take_remaining(self) -> bytes:
        """Bytes that followed the message that ended startup, unexamined."""
        if not self._done:
            raise BackendFilterMisuse("take_remaining() before startup ended")
        rest, self._remaining = self._remaining, b""
        return rest

    def feed(self, data: bytes) -> bytes:
        """Bytes to send to the client now: complete messages, rewritten where needed.

        An incomplete message at the end is held back (at most one message, capped) until
        the rest arrives.
        """
        if self._done:
            raise BackendFilterMisuse("feed() after startup ended; relay bytes raw instead")
        if self._buf:
            self._buf += data
            source: bytes | bytearray = self._buf
        else:
            source = data
        view = memoryview(source)
        try:
            out, consumed, changed = self._frame(view)
        finally:
            view.release()
        if self._done:
            self._remaining = bytes(source[consumed:])
            self._buf = bytearray()
        elif source is data:
            if consumed < len(data):
                self._buf = bytearray(data[consumed:])
        else:
            del self._buf[:consumed]
        if not changed and source is data and consumed == len(data):
            return data  # the common case: whole messages, nothing to rewrite, no copy
        return b"".join(out)

    def _frame(self, view: memoryview) -> tuple[list[bytes], int, bool]:
        out: list[bytes] = []
        changed = False
        start = 0  # first byte not yet copied to out
        offset = 0
        total = len(view)
        while total - offset >= 5:
            kind = view[offset]
            (length,) = _INT32.unpack_from(view, offset + 1)
            self._check_header(kind, length)
            end = offset + 1 + length
            if end > total:
                break
            if kind == ord("R"):
                (code,) = _INT32.unpack_from(view, offset + 5)
                if code == AUTH_OK:
                    self.authenticated = True
                elif code == AUTH_SASL:
                    message = bytes(view[offset:end])
                    stripped = strip_channel_binding(message)
                    if stripped is not message:
                        out.append(bytes(view[start:offset]))
                        out.append(stripped)
                        start = end
                        changed = True
            elif kind == ord("K"):
                (pid,) = _INT32.unpack_from(view, offset + 5)
                self.backend_pid = int(pid)
            elif kind == ord("E"):
                self.server_error_sqlstate = _error_sqlstate(view[offset + 5 : end])
            offset = end
            if kind in _ENDS_STARTUP:
                self._done = True
                break
        if total - offset >= 1 and not self._done:
            # Check what we can of a partial header now, so junk is refused before buffering.
            kind = view[offset]
            if kind not in _LENGTH_RANGE:
                raise self._unknown_type(kind)
        out.append(bytes(view[start:offset]))
        return out, offset, changed

    @staticmethod
    def _unknown_type(kind: int) -> UpstreamError:
        return UpstreamError(
            "protocol",
            f"the upstream server sent message type {chr(kind)!r} (0x{kind:02x}) during "
            "authentication, which a PostgreSQL server never sends before the session is "
            "ready",
        )

    def _check_header(self, kind: int, length: int) -> None:
        limits = _LENGTH_RANGE.get(kind)
        if limits is None:
            raise self._unknown_type(kind)
        low, high = limits
        if not low <= length <= high:
            raise UpstreamError(
                "protocol",
                f"the upstream server sent a {chr(kind)!r} message with length {length} during "
                f"authentication (allowed: {low} to {high} bytes)",
            )
