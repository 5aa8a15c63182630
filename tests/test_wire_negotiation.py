"""The upstream's answer to our SSLRequest: only a lone ``S`` lets TLS start."""

from __future__ import annotations

import pytest

from proxy.errors import UpstreamError
from proxy.wire.messages import SSL_REQUEST
from proxy.wire.negotiation import check_ssl_response, ssl_request_packet


def test_ssl_request_packet() -> None:
    assert ssl_request_packet() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f" == SSL_REQUEST


def test_a_lone_s_starts_tls() -> None:
    check_ssl_response(b"S", more_buffered=False)  # raises on every other answer


@pytest.mark.parametrize(
    ("answer", "more_buffered", "reason", "text"),
    [
        (b"S", True, "protocol", "CVE-2021-23222"),
        (b"S\x16", False, "protocol", "CVE-2021-23222"),
        (b"N", False, "ssl_refused", "answered N to the SSLRequest"),
        (b"N", True, "ssl_refused", "never sends a session unencrypted"),
        (b"E", False, "ssl_refused", "CVE-2024-10977"),
        (b"E", True, "ssl_refused", "CVE-2024-10977"),
        (b"", False, "closed", "closed the connection"),
        (b"H", False, "protocol", "answered 0x48 to the SSLRequest"),
        (b"\x16", True, "protocol", "answered 0x16 to the SSLRequest"),
        (b"\x00", False, "protocol", "answered 0x00"),
        (b"s", False, "protocol", "answered 0x73"),
        (b"G", False, "protocol", "not a PostgreSQL server's answer"),
    ],
)
def test_every_other_answer_is_refused(
    answer: bytes, more_buffered: bool, reason: str, text: str
) -> None:
    with pytest.raises(UpstreamError) as info:
        check_ssl_response(answer, more_buffered=more_buffered)
    assert info.value.reason == reason
    assert text in str(info.value)
    assert info.value.sqlstate == "08001"


def test_refusal_names_the_server_setting() -> None:
    with pytest.raises(UpstreamError) as info:
        check_ssl_response(b"N", more_buffered=False)
    assert info.value.hint is not None
    assert "ssl = on" in info.value.hint


def test_pre_tls_error_text_is_never_repeated() -> None:
    # What an attacker on the path would like the client to read.
    injected = b"E\x00\x00\x00\x2eSFATAL\x00C28000\x00Mcall 555-0100 for your password\x00\x00"
    with pytest.raises(UpstreamError) as info:
        check_ssl_response(injected, more_buffered=True)
    assert info.value.reason == "ssl_refused"
    assert "555-0100" not in str(info.value)
    assert "555-0100" not in (info.value.hint or "")
