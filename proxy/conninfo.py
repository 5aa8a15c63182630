"""libpq connection strings and ``PG*`` variables, read the way libpq reads them.

DBAs paste connection strings from the Azure portal, from ``psql`` history and from application
configs; the sidecar must understand them exactly as libpq would, or a string that works in
``psql`` would mean something else here. The parsers follow ``conninfo_parse`` and
``conninfo_uri_parse_options`` in libpq's ``fe-connect.c`` (PostgreSQL 18), with two deliberate
differences, both stricter:

* a key given twice is an error: libpq silently keeps the last one, which hides mistakes such as
  a ``sslmode=require`` appended after a ``sslmode=verify-full``;
* in a URI, the user-information part ends at the first ``/`` or ``?`` (RFC 3986), so an ``@``
  inside a query value is not mistaken for the end of a user name.

Nothing here knows which keys are valid: that is ``proxy.config``'s job. Error messages give
positions and key names, never values, because a connection string may carry a password.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from proxy.errors import ConfigError

URI_PREFIXES: Final = ("postgresql://", "postgres://")

# libpq's isspace() in the C locale; str.isspace() would also accept Unicode spaces libpq does not.
_SPACE: Final = frozenset(" \t\n\v\f\r")

ENVIRONMENT_VARIABLES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "PGHOST": "host",
        "PGHOSTADDR": "hostaddr",
        "PGPORT": "port",
        "PGSSLMODE": "sslmode",
        "PGSSLROOTCERT": "sslrootcert",
        "PGSSLCRL": "sslcrl",
        "PGSSLCRLDIR": "sslcrldir",
        "PGSSLCERT": "sslcert",
        "PGSSLKEY": "sslkey",
        "PGSSLSNI": "sslsni",
        "PGSSLNEGOTIATION": "sslnegotiation",
        "PGSSLMINPROTOCOLVERSION": "ssl_min_protocol_version",
        "PGSSLMAXPROTOCOLVERSION": "ssl_max_protocol_version",
        "PGCONNECT_TIMEOUT": "connect_timeout",
    }
)
"""The ``PG*`` variables the sidecar reads, and the connection option each one sets.

``PGUSER``, ``PGDATABASE``, ``PGPASSWORD`` and friends are deliberately absent: the application
sends user and database in its StartupMessage, and the sidecar never holds a password.
"""


def parse_conninfo(text: str, *, key: str = "upstream") -> dict[str, str]:
    """Parse a libpq connection string, in either ``key=value`` or URI form.

    ``key`` names the setting the string came from (``--upstream``, ``routes[0].upstream``), so
    an error points at the right line of the user's configuration. Surrounding whitespace is
    ignored, so YAML block scalars (which end in a newline) work as they look.
    """
    if "\0" in text:
        raise ConfigError(
            key,
            f"connection string contains a NUL character at position {text.index(chr(0)) + 1}",
            fix="remove it; libpq cannot represent it either",
        )
    stripped = text.strip()
    if stripped.startswith(URI_PREFIXES):
        return _parse_uri(stripped, key)
    return _parse_keywords(text, key)


def params_from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The connection options libpq would take from ``environ``.

    An empty variable counts as unset: ``PGSSLMODE=`` is how compose files and Helm charts
    usually "remove" a variable, and libpq itself treats most empty options as absent.
    """
    return {
        option: environ[variable]
        for variable, option in ENVIRONMENT_VARIABLES.items()
        if environ.get(variable, "") != ""
    }


def _store(params: dict[str, str], name: str, value: str, key: str, where: str) -> None:
    if name in params:
        raise ConfigError(
            key,
            f'option "{name}" is given twice ({where})',
            fix="keep only one; libpq would silently use the last, which hides mistakes",
        )
    params[name] = value


def _parse_keywords(text: str, key: str) -> dict[str, str]:
    """``key=value`` pairs separated by whitespace, as libpq's ``conninfo_parse``.

    Like libpq: whitespace around ``=`` is skipped (so ``host= port=5432`` sets host to
    ``port=5432``; write ``host=''`` for an empty value), a backslash escapes the next
    character in quoted and unquoted values alike, and a quoted value may be followed directly
    by the next key.
    """
    params: dict[str, str] = {}
    n = len(text)
    i = 0
    while i < n:
        if text[i] in _SPACE:
            i += 1
            continue
        name_start = i
        while i < n and text[i] != "=" and text[i] not in _SPACE:
            i += 1
        name = text[name_start:i]
        while i < n and text[i] in _SPACE:
            i += 1
        if i >= n or text[i] != "=":
            raise ConfigError(
                key,
                f'missing "=" after "{name}" at position {i + 1} of the connection string',
                fix="write key=value pairs separated by spaces, "
                "e.g. host=srv.postgres.database.azure.com sslmode=verify-full",
            )
        if not name:
            raise ConfigError(
                key,
                f'"=" without an option name at position {i + 1} of the connection string',
                fix="write key=value pairs separated by spaces",
            )
        i += 1
        while i < n and text[i] in _SPACE:
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            quote_at = i
            i += 1
            while True:
                if i >= n:
                    raise ConfigError(
                        key,
                        f'unterminated quoted value for "{name}" starting at position '
                        f"{quote_at + 1} of the connection string",
                        fix="close the value with a single quote; "
                        r"write \' for a quote and \\ for a backslash inside it",
                    )
                char = text[i]
                if char == "\\":
                    i += 1
                    if i < n:
                        value.append(text[i])
                        i += 1
                    continue
                i += 1
                if char == "'":
                    break
                value.append(char)
        else:
            while i < n and text[i] not in _SPACE:
                char = text[i]
                i += 1
                if char == "\\":
                    if i < n:
                        value.append(text[i])
                        i += 1
                else:
                    value.append(char)
        _store(params, name, "".join(value), key, f"again at position {name_start + 1}")
    return params


def _parse_uri(text: str, key: str) -> dict[str, str]:
    """``postgresql://[user[:password]@][host][:port][,...][/dbname][?k=v&...]``.

    Follows libpq's ``conninfo_uri_parse_options``: every part is percent-decoded, IPv6 hosts
    are bracketed, several ``host:port`` pairs become comma-separated ``host`` and ``port``
    values (``proxy.config`` rejects those), and ``ssl=true`` means ``sslmode=require`` (libpq's
    JDBC compatibility).
    """
    for position, char in enumerate(text, start=1):
        if char in _SPACE:
            raise ConfigError(
                key,
                f"space in the connection URI at position {position}",
                fix="percent-encode spaces as %20",
            )
    params: dict[str, str] = {}
    n = len(text)
    p = len(next(prefix for prefix in URI_PREFIXES if text.startswith(prefix)))

    authority_end = p
    while authority_end < n and text[authority_end] not in "/?":
        authority_end += 1
    at = text.find("@", p, authority_end)
    if at >= 0:
        user, colon, password = text[p:at].partition(":")
        if user:
            _store(params, "user", _decode(user, key, p), key, "in the URI")
        if colon and password:
            _store(params, "password", _decode(password, key, p), key, "in the URI")
        p = at + 1

    hosts: list[str] = []
    ports: list[str] = []
    terminator = ""
    while True:
        if p < n and text[p] == "[":
            close = text.find("]", p + 1)
            if close < 0:
                raise ConfigError(
                    key,
                    f'missing "]" after the IPv6 address starting at position {p + 1} '
                    "of the connection URI",
                    fix="write IPv6 hosts as [2001:db8::1]",
                )
            if close == p + 1:
                raise ConfigError(
                    key,
                    f'empty IPv6 address "[]" at position {p + 1} of the connection URI',
                    fix="put the address between the brackets, e.g. [::1]",
                )
            host_text, host_at = text[p + 1 : close], p + 1
            p = close + 1
            if p < n and text[p] not in ":/?,":
                raise ConfigError(
                    key,
                    f'unexpected character "{text[p]}" at position {p + 1} of the connection '
                    'URI after an IPv6 address (expected ":", "/", "?" or ",")',
                    fix="write [address]:port",
                )
        else:
            host_at = p
            while p < n and text[p] not in ":/?,":
                p += 1
            host_text = text[host_at:p]
        hosts.append(_decode(host_text, key, host_at))
        terminator = text[p] if p < n else ""
        if terminator == ":":
            p += 1
            port_at = p
            while p < n and text[p] not in "/?,":
                p += 1
            ports.append(_decode(text[port_at:p], key, port_at))
            terminator = text[p] if p < n else ""
        if terminator != ",":
            break
        p += 1
    if ",".join(hosts):
        _store(params, "host", ",".join(hosts), key, "in the URI")
    if ",".join(ports):
        _store(params, "port", ",".join(ports), key, "in the URI")

    if terminator == "/":
        p += 1
        dbname_at = p
        while p < n and text[p] != "?":
            p += 1
        dbname = _decode(text[dbname_at:p], key, dbname_at)
        if dbname:
            _store(params, "dbname", dbname, key, "in the URI")
        terminator = text[p] if p < n else ""

    if terminator == "?":
        _parse_query(text, p + 1, params, key)
    return params


def _parse_query(text: str, start: int, params: dict[str, str], key: str) -> None:
    n = len(text)
    p = start
    while p < n:
        end = text.find("&", p)
        if end < 0:
            end = n
        pair = text[p:end]
        name, equals, value = pair.partition("=")
        if not equals:
            raise ConfigError(
                key,
                f'missing "=" in the URI query parameter at position {p + 1}',
                fix="write ?key=value&key=value",
            )
        if "=" in value:
            raise ConfigError(
                key,
                f'a second "=" in the URI query parameter at position {p + 1}',
                fix="percent-encode '=' inside a value as %3D",
            )
        decoded_name = _decode(name, key, p)
        decoded_value = _decode(value, key, p + len(name) + 1)
        if decoded_name == "ssl" and decoded_value == "true":
            decoded_name, decoded_value = "sslmode", "require"
        if not decoded_name:
            raise ConfigError(
                key,
                f"empty option name in the URI query at position {p + 1}",
                fix="write ?key=value&key=value",
            )
        _store(params, decoded_name, decoded_value, key, f"in the URI query at position {p + 1}")
        p = end + 1


def _decode(part: str, key: str, offset: int) -> str:
    """Percent-decode one URI component; ``offset`` is where it starts, for messages."""
    if "%" not in part:
        return part
    out = bytearray()
    i = 0
    while i < len(part):
        char = part[i]
        if char != "%":
            out += char.encode()
            i += 1
            continue
        digits = part[i + 1 : i + 3]
        if len(digits) != 2 or not all(d in "0123456789abcdefABCDEF" for d in digits):
            raise ConfigError(
                key,
                f"invalid percent-encoding at position {offset + i + 1} of the connection URI",
                fix="a % must be followed by two hex digits; write a literal % as %25",
            )
        byte = int(digits, 16)
        if byte == 0:
            raise ConfigError(
                key,
                f"forbidden %00 at position {offset + i + 1} of the connection URI",
                fix="remove it; libpq cannot represent a NUL byte either",
            )
        out.append(byte)
        i += 3
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            key,
            f"percent-encoded bytes starting at position {offset + 1} of the connection URI "
            "are not valid UTF-8",
            fix="percent-encode the UTF-8 bytes of the text",
        ) from None
