"""The PostgreSQL wire protocol as far as the sidecar needs it, without any I/O.

Bytes go in, events or bytes come out, and a peer that breaks the protocol gets a
:class:`proxy.errors.ProtocolViolation` (client) or :class:`proxy.errors.UpstreamError`
(server). A :class:`WireUsageError` means the sidecar's own code called a parser wrongly.
Keeping sockets out makes every rule testable byte for byte, at every split point.
"""

from proxy.wire.backend_startup import BackendFilterMisuse, BackendStartupFilter
from proxy.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    LATEST_PROTOCOL,
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_REQUEST,
    SSL_REQUEST_CODE,
    WireUsageError,
    error_response,
    parse_startup_parameters,
)
from proxy.wire.negotiation import check_ssl_response, ssl_request_packet
from proxy.wire.sasl import parse_sasl_mechanisms, strip_channel_binding
from proxy.wire.startup import (
    CancelRequest,
    GSSEncRequest,
    SSLRequest,
    StartupEvent,
    StartupMessage,
    StartupParser,
    StartupParserMisuse,
)

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "LATEST_PROTOCOL",
    "MAX_STARTUP_PACKET_LENGTH",
    "PROTOCOL_3_0",
    "SSL_REQUEST",
    "SSL_REQUEST_CODE",
    "BackendFilterMisuse",
    "BackendStartupFilter",
    "CancelRequest",
    "GSSEncRequest",
    "SSLRequest",
    "StartupEvent",
    "StartupMessage",
    "StartupParser",
    "StartupParserMisuse",
    "WireUsageError",
    "check_ssl_response",
    "error_response",
    "parse_sasl_mechanisms",
    "parse_startup_parameters",
    "ssl_request_packet",
    "strip_channel_binding",
]
