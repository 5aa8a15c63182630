"""ErrorResponse encoding and startup-parameter decoding, byte for byte."""

from __future__ import annotations

import struct

import pytest

from proxy.errors import ProtocolViolation
from proxy.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST,
    SSL_REQUEST_CODE,
    error_response,
    parse_startup_parameters,
)


def split_error_fields(message: bytes) -> list[tuple[str, bytes]]:
    """Decode an ErrorResponse the way libpq does, checking the framing on the way."""
    assert message[:1] == b"E"
    (length,) = struct.unpack("!i", message[1:5])
    assert length == len(message) - 1
    body = message[5:]
    assert body.endswith(b"\x00")
    fields = []
    offset = 0
    while body[offset] != 0:
        end = body.index(b"\x00", offset)
        fields.append((chr(body[offset]), body[offset + 1 : end]))
        offset = end + 1
    assert offset == len(body) - 1
    return fields


def test_request_codes_match_postgresql() -> None:
    assert bytes.fromhex("0000000804d2162f") == SSL_REQUEST
    assert (SSL_REQUEST_CODE >> 16, SSL_REQUEST_CODE & 0xFFFF) == (1234, 5679)
    assert (GSSENC_REQUEST_CODE >> 16, GSSENC_REQUEST_CODE & 0xFFFF) == (1234, 5680)
    assert (CANCEL_REQUEST_CODE >> 16, CANCEL_REQUEST_CODE & 0xFFFF) == (1234, 5678)


def test_error_response_exact_bytes() -> None:
    body = b"SFATAL\x00VFATAL\x00C08P01\x00Mbad\x00\x00"
    assert error_response("08P01", "bad") == b"E" + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [("S", b"FATAL"), ("V", b"FATAL"), ("C", b"08006"), ("M", b"m")]),
        (
            {"detail": "d", "hint": "h"},
            [
                ("S", b"FATAL"),
                ("V", b"FATAL"),
                ("C", b"08006"),
                ("M", b"m"),
                ("D", b"d"),
                ("H", b"h"),
            ],
        ),
        (
            {"hint": "h", "severity": "ERROR"},
            [("S", b"ERROR"), ("V", b"ERROR"), ("C", b"08006"), ("M", b"m"), ("H", b"h")],
        ),
        (
            {"detail": ""},
            [("S", b"FATAL"), ("V", b"FATAL"), ("C", b"08006"), ("M", b"m"), ("D", b"")],
        ),
    ],
)
def test_error_response_fields(kwargs: dict[str, str], expected: list[tuple[str, bytes]]) -> None:
    assert split_error_fields(error_response("08006", "m", **kwargs)) == expected


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("caf\u00e9", "caf\u00e9".encode()),
        ("a\x00b", "a\ufffdb".encode()),
        ("\x00", "\ufffd".encode()),
        ("lone \udcff surrogate", b"lone ? surrogate"),
    ],
)
def test_error_response_text_never_breaks_the_message(text: str, encoded: bytes) -> None:
    fields = dict(split_error_fields(error_response("08P01", text, detail=text, hint=text)))
    assert fields["M"] == fields["D"] == fields["H"] == encoded


@pytest.mark.parametrize("sqlstate", ["", "08P0", "08P011", "08p01", "08P0\x00"])
def test_error_response_refuses_an_invalid_sqlstate(sqlstate: str) -> None:
    with pytest.raises(ValueError, match="SQLSTATE"):
        error_response(sqlstate, "m")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x00" * 0 + b"user\x00bob\x00\x00", {"user": "bob"}),
        (
            b"user\x00bob\x00database\x00shop\x00application_name\x00psql\x00\x00",
            {"user": "bob", "database": "shop", "application_name": "psql"},
        ),
        (b"user\x00\x00\x00", {"user": ""}),
        (b"\x00", {}),
        (b"_pq_.x\x00y\x00user\x00u\x00\x00", {"_pq_.x": "y", "user": "u"}),
        (b"user\x00caf\xc3\xa9\x00\x00", {"user": "caf\u00e9"}),
        (b"user\x00caf\xe9\x00\x00", {"user": "caf\ufffd"}),
        (b"replication\x00database\x00user\x00r\x00\x00", {"replication": "database", "user": "r"}),
    ],
)
def test_parse_startup_parameters(body: bytes, expected: dict[str, str]) -> None:
    assert parse_startup_parameters(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no terminator at all
        b"user",  # name without NUL
        b"user\x00",  # value missing
        b"user\x00bob",  # value without NUL
        b"user\x00bob\x00",  # no final terminator
        b"user\x00\x00",  # empty value, then nothing: the server reads this as unterminated
        b"user\x00bob\x00\x00\x00",  # terminator not the last byte
        b"user\x00bob\x00\x00x",
        b"\x00\x00",
        b"\x00user\x00bob\x00\x00",
    ],
)
def test_parse_startup_parameters_layout_errors(body: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="expected terminator as last byte") as info:
        parse_startup_parameters(body)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    "body",
    [
        b"user\x00a\x00user\x00b\x00\x00",
        b"user\x00a\x00database\x00d\x00user\x00a\x00\x00",
        # Two different invalid names that decode to the same text are just as ambiguous.
        b"k\xff\x00a\x00k\xfe\x00b\x00user\x00u\x00\x00",
    ],
)
def test_parse_startup_parameters_refuses_duplicates(body: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="more than once"):
        parse_startup_parameters(body)
