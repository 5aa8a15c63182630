"""AuthenticationSASL: parse the mechanism list, drop channel binding, keep everything else."""

from __future__ import annotations

import struct

import pytest

from proxy.errors import UpstreamError
from proxy.wire.sasl import parse_sasl_mechanisms, strip_channel_binding


def sasl(*names: bytes, code: int = 10) -> bytes:
    body = struct.pack("!i", code) + b"".join(n + b"\x00" for n in names) + b"\x00"
    return b"R" + struct.pack("!i", len(body) + 4) + body


# The message PostgreSQL sends over TLS (channel binding listed first), from the protocol docs.
OVER_TLS = b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
# What it sends without TLS, and what the sidecar must turn OVER_TLS into.
PLAIN = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"


def test_real_messages_are_what_the_builder_makes() -> None:
    assert sasl(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256") == OVER_TLS
    assert sasl(b"SCRAM-SHA-256") == PLAIN


@pytest.mark.parametrize(
    ("message", "names"),
    [
        (OVER_TLS, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
        (PLAIN, ["SCRAM-SHA-256"]),
        (sasl(b"SCRAM-SHA-256-PLUS"), ["SCRAM-SHA-256-PLUS"]),
        (sasl(b"A", b"B-PLUS", b"C"), ["A", "B-PLUS", "C"]),
        (sasl(b"X\xff"), ["X\ufffd"]),
    ],
)
def test_parse_sasl_mechanisms(message: bytes, names: list[str]) -> None:
    assert parse_sasl_mechanisms(message) == names


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (OVER_TLS, PLAIN),
        (sasl(b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS"), PLAIN),
        (sasl(b"A-PLUS", b"B", b"C-PLUS", b"D"), sasl(b"B", b"D")),
        (sasl(b"FUTURE-MECH-PLUS", b"SCRAM-SHA-256"), PLAIN),
    ],
)
def test_strip_channel_binding(message: bytes, expected: bytes) -> None:
    stripped = strip_channel_binding(message)
    assert stripped == expected
    (length,) = struct.unpack("!i", stripped[1:5])
    assert length == len(stripped) - 1


@pytest.mark.parametrize(
    "message", [PLAIN, sasl(b"A", b"B"), sasl(b"PLUS"), sasl(b"SCRAM-SHA-256-plus")]
)
def test_nothing_to_strip_returns_the_same_object(message: bytes) -> None:
    assert strip_channel_binding(message) is message


@pytest.mark.parametrize(
    "message", [sasl(b"SCRAM-SHA-256-PLUS"), sasl(b"SCRAM-SHA-256-PLUS", b"OTHER-PLUS")]
)
def test_only_channel_binding_offered(message: bytes) -> None:
    with pytest.raises(UpstreamError) as info:
        strip_channel_binding(message)
    assert info.value.reason == "protocol"
    text = str(info.value)
    assert text.startswith("the server offers only channel-binding SASL mechanisms (")
    assert "SCRAM-SHA-256-PLUS" in text
    assert text.endswith("allow SCRAM-SHA-256 on the server")


def framed(kind: bytes, payload: bytes) -> bytes:
    """A message with a correct length word around any payload, to test one fault at a time."""
    return kind + struct.pack("!i", len(payload) + 4) + payload


SASL_CODE = struct.pack("!i", 10)

MALFORMED = [
    b"",
    b"R",
    b"R\x00\x00\x00\x08",  # header cut short
    framed(b"R", SASL_CODE),  # no list at all
    framed(b"R", SASL_CODE + b"\x00"),  # an empty list
    framed(b"R", SASL_CODE + b"\x00\x00"),  # one empty name
    sasl(b"SCRAM-SHA-256", code=11),  # SASLContinue, not SASL
    framed(b"E", SASL_CODE + b"SCRAM-SHA-256\x00\x00"),  # not an 'R' message
    framed(b"R", SASL_CODE + b"SCRAM-SHA-256\x00"),  # list without its terminator
    framed(b"R", SASL_CODE + b"SCRAM-SHA-256"),  # name without its NUL
    framed(b"R", SASL_CODE + b"A\x00\x00B\x00\x00"),  # an empty name inside the list
    PLAIN + b"\x00",  # a byte beyond the declared length
    PLAIN[:1] + struct.pack("!i", 0x17 + 1) + PLAIN[5:],  # length larger than the message
    PLAIN[:1] + struct.pack("!i", 0x17 - 1) + PLAIN[5:],  # length smaller than the message
]


@pytest.mark.parametrize("message", MALFORMED)
def test_malformed_messages(message: bytes) -> None:
    for function in (parse_sasl_mechanisms, strip_channel_binding):
        with pytest.raises(UpstreamError) as info:
            function(message)
        assert info.value.reason == "protocol"
        assert "malformed AuthenticationSASL" in str(info.value)
