"""Client -> sidecar: frame and judge the packets a client sends before its StartupMessage.

A sans-I/O parser in the style of h11: the caller feeds bytes as they arrive and pulls events.
It decides nothing about answers (the caller replies ``N`` to SSLRequest and GSSENCRequest)
and holds at most one startup packet's worth of unparsed bytes, so a client cannot make the
sidecar buffer more than the server itself would.

Call :meth:`StartupParser.next_event` after every :meth:`StartupParser.feed`: bytes found
buffered behind an SSLRequest are treated as pipelined (CVE-2021-23214), exactly as the server
treats bytes it already holds when it answers.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from proxy.errors import SQLSTATE_FEATURE_NOT_SUPPORTED, ProtocolViolation
from proxy.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    LATEST_PROTOCOL,
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    WireUsageError,
    parse_startup_parameters,
)

SQLSTATE_INVALID_AUTHORIZATION_SPECIFICATION: Final = "28000"

# Largest whole packet the server accepts: its limit counts the body after the length word.
MAX_PACKET: Final = MAX_STARTUP_PACKET_LENGTH + 4
# A CancelRequest carries a 4-byte key up to PostgreSQL 17 and 4..256 bytes from 18 on.
MIN_CANCEL_PACKET: Final = 16
MAX_CANCEL_PACKET: Final = 12 + 256

_TLS_HANDSHAKE_RECORD: Final = 0x16
_INT32: Final = struct.Struct("!I")


class StartupParserMisuse(WireUsageError):
    """The sidecar's own code used :class:`StartupParser` wrongly (never the client's fault)."""


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS; the sidecar's listener is plaintext, so the answer is ``N``."""


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    """The client asks for GSSAPI encryption; always answered ``N``."""


@dataclass(frozen=True, slots=True)
class StartupMessage:
    raw: bytes  # the whole packet, forwarded upstream unchanged
    protocol: tuple[int, int]
    parameters: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class CancelRequest:
    raw: bytes  # forwarded unchanged on a new TLS connection upstream
    pid: int
    key: bytes


StartupEvent = SSLRequest | GSSEncRequest | StartupMessage | CancelRequest


def _direct_tls_violation() -> ProtocolViolation:
    return ProtocolViolation(
        "the client sent a TLS handshake (first byte 0x16, direct SSL) to the sidecar's "
        "plaintext listener; the sidecar makes the TLS connection to the server itself, so "
        "connect to the sidecar with sslmode=disable (and without sslnegotiation=direct)"
    )


def _length_violation(length: int) -> ProtocolViolation:
    return ProtocolViolation(
        f"invalid length of startup packet: {length} bytes (a startup packet is 8 to "
        f"{MAX_PACKET} bytes); the client does not speak the PostgreSQL protocol"
    )


class StartupParser:
    """Frames SSLRequest / GSSENCRequest / CancelRequest / StartupMessage packets."""

    __slots__ = ("_buf", "_finished", "_gss_seen", "_ssl_seen")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._finished = False
        self._ssl_seen = False
        self._gss_seen = False

    @property
    def finished(self) -> bool:
        """A StartupMessage or CancelRequest was returned; the rest of the stream is raw."""
        return self._finished

    def feed(self, data: bytes) -> None:
        if self._finished:
            raise StartupParserMisuse(
                "feed() after the final startup packet; relay further bytes as they are"
            )
        if len(self._buf) > MAX_PACKET:
            # Only reachable when the caller keeps feeding without pulling events.
            raise StartupParserMisuse("call next_event() after each feed()")
        self._buf += data
        self._check_head()

    def _check_head(self) -> int | None:
        """Validate the length word of the packet at the head; return it once known.

        Checked as soon as the bytes are in, so an absurd length is refused before anything
        is buffered for it.
        """
        buf = self._buf
        if not buf:
            return None
        if buf[0] == _TLS_HANDSHAKE_RECORD:
            raise _direct_tls_violation()
        if len(buf) < 4:
            return None
        (length,) = _INT32.unpack_from(buf)
        if length < 8 or length > MAX_PACKET:
            raise _length_violation(length)
        return int(length)

    def next_event(self) -> StartupEvent | None:
        """The next complete packet as an event, or ``None`` when more bytes are needed."""
        if self._finished:
            raise StartupParserMisuse(
                "next_event() after the final startup packet; use take_remaining()"
            )
        length = self._check_head()
        if length is None or len(self._buf) < length:
            return None
        packet = bytes(self._buf[:length])
        del self._buf[:length]
        (code,) = _INT32.unpack_from(packet, 4)
        if code == SSL_REQUEST_CODE:
            self._ssl_seen = self._negotiation_request(packet, "SSLRequest", self._ssl_seen)
            return SSLRequest()
        if code == GSSENC_REQUEST_CODE:
            self._gss_seen = self._negotiation_request(packet, "GSSENCRequest", self._gss_seen)
            return GSSEncRequest()
        if code == CANCEL_REQUEST_CODE:
            event: StartupEvent = _cancel_request(packet)
        else:
            event = _startup_message(packet, code)
        self._finished = True
        return event

    def _negotiation_request(self, packet: bytes, name: str, seen: bool) -> bool:
        if len(packet) != 8:
            raise ProtocolViolation(
                f"invalid {name}: {len(packet)} bytes instead of 8; "
                "the client does not speak the PostgreSQL protocol"
            )
        if seen:
            raise ProtocolViolation(
                f"the client sent a second {name} on the same connection; "
                "a PostgreSQL client asks for encryption at most once"
            )
        if self._buf:
            # CVE-2021-23214: the answer to this request decides how the following bytes are
            # to be read, so a client cannot have sent them yet; someone else did.
            raise ProtocolViolation(
                f"received unencrypted data after {name}: {len(self._buf)} bytes arrived "
                "before the sidecar answered; this is either a client bug or evidence of a "
                "man-in-the-middle attack (CVE-2021-23214)"
            )
        return True

    def take_remaining(self) -> bytes:
        """Bytes that arrived after the final packet, to be forwarded as they are."""
        if not self._finished:
            raise StartupParserMisuse("take_remaining() before the final startup packet")
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _cancel_request(packet: bytes) -> CancelRequest:
    if not MIN_CANCEL_PACKET <= len(packet) <= MAX_CANCEL_PACKET:
        raise ProtocolViolation(
            f"invalid length of cancel request: {len(packet)} bytes (expected "
            f"{MIN_CANCEL_PACKET} to {MAX_CANCEL_PACKET}: a process id and a 4 to 256 byte key)"
        )
    (pid,) = _INT32.unpack_from(packet, 8)
    return CancelRequest(raw=packet, pid=int(pid), key=packet[12:])


def _startup_message(packet: bytes, code: int) -> StartupMessage:
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_3_0[0]:
        # PostgreSQL's own wording and SQLSTATE (ERRCODE_FEATURE_NOT_SUPPORTED), so clients
        # that fall back on this message (old drivers probing protocol 2) behave as usual.
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{minor}: server supports "
            f"{PROTOCOL_3_0[0]}.{PROTOCOL_3_0[1]} to {LATEST_PROTOCOL[0]}.{LATEST_PROTOCOL[1]}",
            sqlstate=SQLSTATE_FEATURE_NOT_SUPPORTED,
        )
    parameters = parse_startup_parameters(packet[8:])
    if not parameters.get("user"):
        raise ProtocolViolation(
            "no PostgreSQL user name specified in startup packet",
            sqlstate=SQLSTATE_INVALID_AUTHORIZATION_SPECIFICATION,
        )
    return StartupMessage(
        raw=packet, protocol=(major, minor), parameters=MappingProxyType(parameters)
    )
