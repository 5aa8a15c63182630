"""Turn the user's YAML file, command-line flags and ``PG*`` variables into ``Settings``.

Everything is checked here, before a single socket is opened: a sidecar that starts with half a
configuration fails later, under load, in a way that is much harder to read than a message at
startup. So every problem is a ``ConfigError`` naming the setting as the user wrote it, the
value found and what to write instead; unknown keys are errors (a typo must not silently fall
back to a default), and options that only make sense to the application are warned about
rather than quietly dropped.

Precedence, for the one-route case: command-line flag, then the configuration file, then the
``PG*`` environment (only when neither of the others names an upstream). A file with several
routes cannot be combined with ``--listen``/``--unix-socket``/``--upstream``: which route would
they change?
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NoReturn

import yaml

from proxy.conninfo import ENVIRONMENT_VARIABLES, params_from_environ, parse_conninfo
from proxy.errors import ConfigError
from proxy.eventloop import EVENT_LOOP_ENV, EVENT_LOOP_SETTINGS, choose_loop
from proxy.hostname import inet_aton
from proxy.settings import (
    DEFAULT_LISTEN_HOST,
    DEFAULT_PORT,
    MAX_WORKERS,
    SERVER_AUTHENTICATION_TIMEOUT,
    AdminSettings,
    EventLoopSetting,
    Limits,
    Listen,
    LogFormat,
    LogSettings,
    PoolSettings,
    ReloadSettings,
    RouteSettings,
    Settings,
    SslMode,
    SslNegotiation,
    TcpListen,
    Timeouts,
    TlsVersion,
    UnixListen,
    UpstreamSettings,
)

log = logging.getLogger("proxy.config")

SSLMODES: Final[tuple[SslMode, ...]] = ("require", "verify-ca", "verify-full")
PLAINTEXT_SSLMODES: Final = ("disable", "allow", "prefer")
SSL_NEGOTIATIONS: Final[tuple[SslNegotiation, ...]] = ("postgres", "direct")
TLS_VERSIONS: Final[tuple[TlsVersion, ...]] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

UPSTREAM_OPTIONS: Final = (
    "host",
    "hostaddr",
    "port",
    "sslmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslsni",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tls_server_name",
)
"""Connection options the sidecar uses: libpq's names, plus ``tls_server_name``."""

_STARTUP_DECIDES: Final = "the client's StartupMessage decides it, not the sidecar"
_CLIENT_LEG: Final = "it concerns the application's own connection, not the sidecar's"

APPLICATION_OPTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "dbname": _STARTUP_DECIDES,
        "user": _STARTUP_DECIDES,
        "application_name": _STARTUP_DECIDES,
        "fallback_application_name": _STARTUP_DECIDES,
        "options": _STARTUP_DECIDES,
        "target_session_attrs": "the sidecar connects to one server (only 'any' is accepted)",
        "gssencmode": "the sidecar always encrypts with TLS and answers GSSENCRequest with N",
        "sslcompression": "TLS compression is never used",
        "requiressl": "the sidecar always requires TLS",
        "channel_binding": _CLIENT_LEG,
    }
)
"""libpq options that belong to the application's session, with why the sidecar ignores them.

They are accepted, with a warning, because connection strings copied from the Azure portal or an
application's config carry them (dbname and user above all)."""

# Other libpq options: known, so the message can say "not supported" rather than "typo".
_OTHER_LIBPQ_OPTIONS: Final = frozenset(
    {
        "service",
        "client_encoding",
        "tcp_user_timeout",
        "sslcertmode",
        "requirepeer",
        "require_auth",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "replication",
        "load_balance_hosts",
        "scram_client_key",
        "scram_server_key",
        "min_protocol_version",
        "max_protocol_version",
        "sslkeylogfile",
        "oauth_issuer",
        "oauth_client_id",
        "oauth_client_secret",
        "oauth_scope",
    }
)

# Linux limits for TCP_KEEPIDLE / TCP_KEEPINTVL (32767 s) and TCP_KEEPCNT (127): a larger value
# would make setsockopt fail on the first connection instead of here.
_KEEPALIVE_LIMITS: Final = {
    "keepalives_idle": 32767,
    "keepalives_interval": 32767,
    "keepalives_count": 127,
}

_ROUTE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")

_TOP_KEYS: Final = (
    "timeouts",
    "limits",
    "logging",
    "admin",
    "reload",
    "event_loop",
    "workers",
    "routes",
)
WORKERS_ENV: Final = "PG_TLS_SIDECAR_WORKERS"  # like --workers, below file and flag
_ADMIN_KEYS: Final = ("listen", "readiness", "protocol_metrics")
_READINESS_KEYS: Final = ("upstream_check", "interval")
_ROUTE_KEYS: Final = ("name", "listen", "unix_socket", "max_connections", "pool", "upstream")
_POOL_KEYS: Final = ("size", "max_age")
MAX_POOL_SIZE: Final = 64
_UNIX_KEYS: Final = ("directory", "mode")
_DEFAULT_UNIX_MODE: Final = 0o777
_WILDCARDS: Final = frozenset({"0.0.0.0", "::"})  # noqa: S104 - compared, never bound


def _fail(key: str, problem: str, *, value: object = None, fix: str | None = None) -> NoReturn:
    raise ConfigError(key, problem, value=value, fix=fix)


def _join(key: str, name: str) -> str:
    """``routes[0].upstream`` + ``sslmode``; a flag reads better as ``--upstream sslmode``."""
    return f"{key} {name}" if key.startswith("-") else f"{key}.{name}"


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    listing = ", ".join(valid)
    if close:
        return f"did you mean {close[0]}? valid keys: {listing}"
    return f"valid keys: {listing}"


def _type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


# --- scalar conversions: values come as strings (conninfo, flags, environment) or YAML scalars


def _text(value: object, key: str) -> str:
    if isinstance(value, str):
        return value
    _fail(key, f"must be a string, not {_type_name(value)}", value=value)


def _integer(value: object, key: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        _fail(key, f"must be an integer, not {_type_name(value)}", value=value)
    if isinstance(value, str):
        if not value.strip().isdigit() or not value.strip().isascii():
            _fail(key, "is not a whole number", value=value, fix=f"use {low}..{high}")
        number = int(value.strip())
    else:
        number = value
    if not low <= number <= high:
        _fail(key, f"is out of range {low}..{high}", value=value)
    return number


def _seconds(value: object, key: str) -> float:
    """A positive, finite number of seconds; libpq only takes integers, fractions do no harm."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _fail(key, f"must be a number of seconds, not {_type_name(value)}", value=value)
    try:
        number = float(value)
    except ValueError:
        _fail(key, "is not a number of seconds", value=value, fix="write e.g. 10 or 2.5")
    if not math.isfinite(number) or number <= 0:
        _fail(
            key,
            "must be a positive number of seconds",
            value=value,
            fix="every wait is bounded; libpq's 0 meaning 'wait forever' is not supported",
        )
    return number


def _boolean(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    _fail(key, "must be 0 or 1 (or true/false)", value=value)


def _choice(value: object, key: str, choices: Sequence[str], *, fold: bool = False) -> str:
    text = _text(value, key)
    for choice in choices:
        if text == choice or (fold and text.lower() == choice.lower()):
            return choice
    _fail(key, "is not a valid value", value=value, fix=f"use one of {', '.join(choices)}")


def _resolve(path: str, base_dir: str | None) -> str:
    """Relative paths are relative to the config file, so a config directory can be moved."""
    return os.path.normpath(os.path.join(base_dir or os.getcwd(), path))


def _readable_file(value: object, key: str, base_dir: str | None) -> str:
    """The file exists, is a regular file and opens; parsing it is ``proxy.tls``'s job.

    Regular files only: opening a FIFO would block startup, and a directory is a typo.
    """
    path = _resolve(_text(value, key), base_dir)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            _fail(key, f"{path} is {kind}", value=value, fix="give the path of a PEM file")
        with open(path, "rb"):
            pass
    except OSError as exc:
        _fail(
            key,
            f"cannot read {path}: {exc.strerror}",
            value=value,
            fix="check the path (relative paths are resolved against the config file's "
            "directory, or the working directory for flags and environment) and permissions",
        )
    return path


def _readable_directory(value: object, key: str, base_dir: str | None) -> str:
    path = _resolve(_text(value, key), base_dir)
    if not os.path.isdir(path):
        _fail(key, f"{path} is not a directory", value=value, fix="give a directory of CRLs")
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        _fail(key, f"cannot read directory {path}: {exc.strerror}", value=value)
    return path


# --- upstream


def upstream_from_params(
    params: Mapping[str, object],
    *,
    key: str,
    base_dir: str | None = None,
    names: Mapping[str, str] | None = None,
) -> UpstreamSettings:
    """Validate libpq-named connection options into ``UpstreamSettings``.

    ``key`` prefixes option names in messages (``routes[0].upstream`` gives
    ``routes[0].upstream.sslmode``); ``names`` overrides that per option, so options read from
    the environment are reported as ``PGSSLMODE``. Relative file paths are resolved against
    ``base_dir`` (the working directory when ``None``) and returned absolute, so a later change
    of directory cannot change which file is read. An empty string or ``None`` counts as unset,
    like libpq's empty options and YAML's ``null``.
    """

    def label(name: str) -> str:
        return names[name] if names and name in names else _join(key, name)

    given: dict[str, object] = {}
    ignored: list[str] = []
    for name, value in params.items():
        if not isinstance(name, str):
            _fail(key, "option names must be strings", value=name)
        _check_option_name(name, value, label(name))
        if name in APPLICATION_OPTIONS:
            ignored.append(name)
            continue
        if value is None or value == "":
            continue
        given[name] = value

    def text(name: str) -> str | None:
        return _text(given[name], label(name)) if name in given else None

    host = text("host")
    if host is None:
        _fail(
            label("host"),
            "is required: the sidecar needs the upstream server's name",
            fix="add host=<server>.postgres.database.azure.com",
        )
    _check_host(host, label("host"))

    port = DEFAULT_PORT
    if "port" in given:
        raw_port = given["port"]
        if isinstance(raw_port, str) and "," in raw_port:
            _fail(
                label("port"), "lists several ports", value=raw_port, fix="give one port per route"
            )
        port = _integer(raw_port, label("port"), low=1, high=65535)

    hostaddr = text("hostaddr")
    if hostaddr is not None:
        _check_ip(hostaddr, label("hostaddr"))

    tls_server_name = text("tls_server_name")
    if tls_server_name is not None and not _is_host_name_or_ip(tls_server_name):
        _fail(
            label("tls_server_name"),
            "is not a DNS name or IP address",
            value=tls_server_name,
            fix="give the name the server's certificate carries",
        )

    sslmode: SslMode = "verify-full"
    if "sslmode" in given:
        sslmode = _sslmode(given["sslmode"], label("sslmode"))

    sslrootcert = text("sslrootcert")
    if sslrootcert == "system":
        if "sslmode" in given and sslmode != "verify-full":
            _fail(
                label("sslmode"),
                f"'{sslmode}' may not be used with sslrootcert=system: any certificate from "
                "a public CA would be accepted",
                value=sslmode,
                fix="use sslmode=verify-full (as libpq 16+ requires) or a CA file in sslrootcert",
            )
    elif sslrootcert is not None:
        sslrootcert = _readable_file(sslrootcert, label("sslrootcert"), base_dir)

    files = {
        name: _readable_file(given[name], label(name), base_dir)
        for name in ("sslcrl", "sslcert", "sslkey")
        if name in given
    }
    sslcrldir = None
    if "sslcrldir" in given:
        sslcrldir = _readable_directory(given["sslcrldir"], label("sslcrldir"), base_dir)
    for present, missing in (("sslcert", "sslkey"), ("sslkey", "sslcert")):
        if present in files and missing not in files:
            _fail(
                label(present),
                f"is given without {missing}",
                fix="a client certificate needs both sslcert and sslkey",
            )
    sslpassword = None
    if "sslpassword" in given:
        if not isinstance(given["sslpassword"], str):
            # No value in this message: it is a secret.
            _fail(label("sslpassword"), "must be a string", fix="quote it in YAML")
        sslpassword = given["sslpassword"]
        if "sslkey" not in files:
            _fail(
                label("sslpassword"),
                "is given without sslkey",
                fix="sslpassword decrypts the client key; remove it or add sslcert and sslkey",
            )

    min_version: TlsVersion = "TLSv1.2"
    if "ssl_min_protocol_version" in given:
        min_version = _tls_version(
            given["ssl_min_protocol_version"], label("ssl_min_protocol_version")
        )
    max_version: TlsVersion | None = None
    if "ssl_max_protocol_version" in given:
        max_version = _tls_version(
            given["ssl_max_protocol_version"], label("ssl_max_protocol_version")
        )
        if TLS_VERSIONS.index(max_version) < TLS_VERSIONS.index(min_version):
            _fail(
                label("ssl_max_protocol_version"),
                f"is lower than ssl_min_protocol_version ({min_version})",
                value=max_version,
                fix="make the maximum at least the minimum",
            )

    sslnegotiation: SslNegotiation = "postgres"
    if "sslnegotiation" in given:
        # 'direct' needs sslmode require or stronger, which every allowed sslmode is.
        sslnegotiation = _ssl_negotiation(given["sslnegotiation"], label("sslnegotiation"))

    keepalive_settings = {
        name: _integer(given[name], label(name), low=1, high=_KEEPALIVE_LIMITS[name])
        for name in _KEEPALIVE_LIMITS
        if name in given
    }

    defaults = UpstreamSettings(host=host)
    settings = UpstreamSettings(
        host=host,
        port=port,
        hostaddr=hostaddr,
        tls_server_name=tls_server_name,
        sslmode=sslmode,
        sslrootcert=sslrootcert,
        sslcrl=files.get("sslcrl"),
        sslcrldir=sslcrldir,
        sslcert=files.get("sslcert"),
        sslkey=files.get("sslkey"),
        sslpassword=sslpassword,
        sslsni=_boolean(given["sslsni"], label("sslsni")) if "sslsni" in given else True,
        sslnegotiation=sslnegotiation,
        ssl_min_protocol_version=min_version,
        ssl_max_protocol_version=max_version,
        connect_timeout=(
            _seconds(given["connect_timeout"], label("connect_timeout"))
            if "connect_timeout" in given
            else None
        ),
        keepalives=(
            _boolean(given["keepalives"], label("keepalives")) if "keepalives" in given else True
        ),
        keepalives_idle=keepalive_settings.get("keepalives_idle", defaults.keepalives_idle),
        keepalives_interval=keepalive_settings.get(
            "keepalives_interval", defaults.keepalives_interval
        ),
        keepalives_count=keepalive_settings.get("keepalives_count", defaults.keepalives_count),
    )
    # Only now, so a configuration that is refused does not also log noise about it.
    for name in ignored:
        log.warning("%s is ignored: %s", label(name), APPLICATION_OPTIONS[name])
    return settings


def _check_option_name(name: str, value: object, label: str) -> None:
    if name in UPSTREAM_OPTIONS:
        return
    if name in ("password", "passfile"):
        _fail(
            label,
            "the sidecar never holds passwords",
            fix="remove it here and configure the password in the application, which "
            "authenticates through the sidecar",
        )
    if name == "channel_binding" and isinstance(value, str) and value.strip() == "require":
        _fail(
            label,
            "channel binding can never work through the sidecar: the client's TLS session "
            "(if any) ends at the sidecar, so there is no channel to bind to the server's",
            value=value,
            fix="remove channel_binding, and set channel_binding=disable or prefer in the "
            "application; the sidecar itself verifies the server",
        )
    if name == "target_session_attrs" and value not in (None, "", "any"):
        _fail(
            label,
            "the sidecar connects to exactly one server and does not check its role",
            value=value,
            fix="remove it or use target_session_attrs=any",
        )
    if name in APPLICATION_OPTIONS:
        return
    if name in _OTHER_LIBPQ_OPTIONS:
        _fail(
            label,
            "unknown connection option for the sidecar (a libpq option it does not support)",
            fix="remove it; if the application needs it, set it in the application's own "
            "connection string",
        )
    _fail(label, "unknown connection option", fix=_suggest(name, UPSTREAM_OPTIONS))


def _sslmode(value: object, key: str) -> SslMode:
    text = _text(value, key)
    if text in PLAINTEXT_SSLMODES:
        _fail(
            key,
            f"'{text}' would allow a plaintext session; the sidecar never sends data unencrypted",
            value=text,
            fix="use require, verify-ca or verify-full",
        )
    for mode in SSLMODES:
        if text == mode:
            return mode
    _fail(
        key,
        "is not a valid sslmode",
        value=text,
        fix="use require, verify-ca or verify-full (verify-full is the default)",
    )


def _ssl_negotiation(value: object, key: str) -> SslNegotiation:
    text = _text(value, key)
    for choice in SSL_NEGOTIATIONS:
        if text == choice:
            return choice
    _fail(key, "is not a valid sslnegotiation", value=text, fix="use postgres or direct")


def _tls_version(value: object, key: str) -> TlsVersion:
    text = _text(value, key)
    # libpq compares these names case-insensitively.
    for version in TLS_VERSIONS:
        if text.lower() == version.lower():
            return version
    _fail(key, "is not a TLS protocol version", value=text, fix=f"use {', '.join(TLS_VERSIONS)}")


def _check_host(host: str, key: str) -> None:
    if "," in host:
        _fail(
            key,
            "lists several hosts; the sidecar forwards each route to one upstream host",
            value=host,
            fix="give one host, or define one route per server",
        )
    if host.startswith(("/", "@")):
        _fail(
            key,
            "is a Unix-domain socket; the upstream must be reached over TCP to use TLS",
            value=host,
            fix="give the server's DNS name or IP address",
        )
    if host.startswith("[") and host.endswith("]"):
        _fail(key, "must not be in brackets", value=host, fix=f"write host={host[1:-1]}")
    if "=" in host:
        _fail(
            key,
            "contains '=': a space after 'host=' makes libpq take the next option as the host",
            value=host,
            fix="remove the space after 'host='",
        )
    if not _is_host_name_or_ip(host):
        _fail(key, "is not a valid host name or IP address", value=host)


def _is_host_name_or_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if inet_aton(text) is not None:
            return True  # libpq's (and the resolver's) IPv4 forms: 192.000.002.001, 0x7f.1
        if re.fullmatch(r"[0-9.]+", text):
            return False  # looks like IPv4 but is not one, e.g. 10.0.0.256
        return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None
    return True


def _check_ip(text: str, key: str) -> None:
    if "," in text:
        _fail(key, "lists several addresses", value=text, fix="give one address per route")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        _fail(
            key,
            "is not a numeric IP address",
            value=text,
            fix="hostaddr takes an address such as 10.0.0.4; put names in host",
        )


# --- listeners


def parse_listen(text: str, *, key: str) -> TcpListen:
    """``HOST:PORT``, ``[IPv6]:PORT`` or a bare ``PORT`` on 127.0.0.1; port 0 means ephemeral."""
    spec = text.strip()
    fix = "write HOST:PORT, [IPv6]:PORT or PORT, e.g. 127.0.0.1:5432"
    if spec.isdigit() and spec.isascii():
        return TcpListen(DEFAULT_LISTEN_HOST, _integer(spec, key, low=0, high=65535))
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0 or spec[close + 1 : close + 2] != ":":
            _fail(key, "is not [IPv6]:PORT", value=text, fix=fix)
        host, port_text = spec[1:close], spec[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            _fail(key, f"'{host}' is not an IPv6 address", value=text, fix=fix)
    else:
        host, colon, port_text = spec.rpartition(":")
        if not colon or not host:
            _fail(key, "is missing a host or port", value=text, fix=fix)
        if ":" in host:
            _fail(key, "IPv6 addresses must be in brackets", value=text, fix="write [::1]:5432")
        if not _is_host_name_or_ip(host):
            _fail(key, f"'{host}' is not a valid address or host name", value=text, fix=fix)
    return TcpListen(host, _integer(port_text, key, low=0, high=65535))


def _parse_mode(value: object, key: str) -> int:
    """An octal string: YAML would read an unquoted 0777 as 511 but 777 as 777, silently."""
    if not isinstance(value, str):
        _fail(
            key,
            f"must be a quoted octal string, not {_type_name(value)}",
            value=value,
            fix='write mode: "0777" (quoted, so YAML cannot misread it as a decimal number)',
        )
    digits = value.strip().removeprefix("0o")
    if not digits or any(d not in "01234567" for d in digits) or int(digits, 8) > 0o777:
        _fail(key, "is not an octal permission mode 0000..0777", value=value, fix='e.g. "0770"')
    return int(digits, 8)


# --- YAML


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(name)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if first is not None:
                mark = key_node.start_mark
                _fail(
                    f"line {mark.line + 1}, column {mark.column + 1}",
                    f"duplicate key {name!r} (first at line {first.start_mark.line + 1})",
                    fix="keep one of them; YAML would silently use the last",
                )
            seen[name] = key_node
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        _fail("--config", f"cannot read the configuration file: {exc.strerror}", value=path)
    except UnicodeDecodeError:
        _fail("--config", "the configuration file is not UTF-8 text", value=path)
    with _source(path):
        return _parse_yaml(text, path)


def _parse_yaml(text: str, path: str) -> dict[str, object]:
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        _fail(where, f"invalid YAML: {exc.problem}", fix="fix the YAML syntax")
    except yaml.YAMLError as exc:
        _fail("YAML", f"invalid YAML: {exc}")
    if document is None:
        _fail(
            "--config",
            "the configuration file is empty",
            value=path,
            fix="see config/sidecar.example.yaml",
        )
    if not isinstance(document, dict):
        _fail(
            "--config",
            f"the configuration file must be a mapping of settings, not {_type_name(document)}",
            value=path,
            fix="see config/sidecar.example.yaml",
        )
    return _mapping(document, "top level", _TOP_KEYS)


def _mapping(value: object, key: str, allowed: Sequence[str]) -> dict[str, object]:
    """Check a YAML mapping's keys; ``null`` values count as absent."""
    if not isinstance(value, dict):
        _fail(key, f"must be a mapping, not {_type_name(value)}", value=value)
    result: dict[str, object] = {}
    for name, item in value.items():
        where = name if key == "top level" else f"{key}.{name}"
        if not isinstance(name, str):
            _fail(f"{key}", f"keys must be strings, not {_type_name(name)}", value=name)
        if name not in allowed:
            _fail(where, "unknown key", fix=_suggest(name, allowed))
        if item is not None:
            result[name] = item
    return result


def _timeouts(value: object) -> Timeouts:
    fields = _mapping(value, "timeouts", ("connect", "tls_handshake", "startup", "drain"))
    return Timeouts(**{name: _seconds(item, f"timeouts.{name}") for name, item in fields.items()})


def _limits(value: object) -> Limits:
    fields = _mapping(value, "limits", ("max_connections",))
    if "max_connections" in fields:
        return Limits(
            _integer(fields["max_connections"], "limits.max_connections", low=1, high=1_000_000)
        )
    return Limits()


def _log_format(value: object, key: str) -> LogFormat:
    text = _text(value, key)
    for choice in LOG_FORMATS:
        if text.lower() == choice:
            return choice
    _fail(key, "is not a log format", value=text, fix="use text or json")


def _log_level(value: object, key: str) -> str:
    return _choice(value, key, LOG_LEVELS, fold=True).upper()


def _logging(value: object) -> LogSettings:
    fields = _mapping(value, "logging", ("format", "level"))
    settings = LogSettings()
    return LogSettings(
        format=_log_format(fields["format"], "logging.format")
        if "format" in fields
        else settings.format,
        level=_log_level(fields["level"], "logging.level") if "level" in fields else settings.level,
    )


def _reload(value: object) -> ReloadSettings:
    fields = _mapping(value, "reload", ("watch_files", "interval"))
    defaults = ReloadSettings()
    return ReloadSettings(
        watch_files=(
            _boolean(fields["watch_files"], "reload.watch_files")
            if "watch_files" in fields
            else defaults.watch_files
        ),
        interval=(
            _seconds(fields["interval"], "reload.interval")
            if "interval" in fields
            else defaults.interval
        ),
    )


def _event_loop(value: object, key: str) -> tuple[EventLoopSetting, str]:
    """The choice and the key it came from, so a missing uvloop is blamed on the right source."""
    text = _text(value, key).strip().lower()
    for choice in EVENT_LOOP_SETTINGS:
        if text == choice:
            return choice, key
    _fail(
        key,
        "is not an event loop choice",
        value=value,
        fix="use auto (uvloop when installed, else the stdlib loop), asyncio or uvloop",
    )


def _workers(value: object, key: str, *, reuse_port: bool | None = None) -> int:
    """A number of worker processes, or ``auto``: one per CPU this process may run on.

    Above 1 the workers share each TCP port through ``SO_REUSEPORT``; without it (not Linux,
    not a BSD) there is no way to spread connections, so that is refused here rather than at
    the first bind. ``reuse_port`` overrides the platform check (tests).
    """
    fix = f"use a whole number 1..{MAX_WORKERS}, or auto (one per CPU)"
    if isinstance(value, str) and value.strip().lower() == "auto":
        number = min(MAX_WORKERS, _cpu_count())
    elif isinstance(value, bool) or not isinstance(value, int | str):
        _fail(key, f"must be a number of processes or auto, not {_type_name(value)}", fix=fix)
    elif isinstance(value, str) and not (value.strip().isdigit() and value.strip().isascii()):
        _fail(key, "is not a number of processes", value=value, fix=fix)
    else:
        number = int(value)
        if not 1 <= number <= MAX_WORKERS:
            _fail(key, f"is out of range 1..{MAX_WORKERS}", value=value, fix=fix)
    available = hasattr(socket, "SO_REUSEPORT") if reuse_port is None else reuse_port
    if number > 1 and not available:
        _fail(
            key,
            "needs SO_REUSEPORT, which this platform does not offer",
            value=value,
            fix="use workers: 1 (one process) here; several workers run on Linux",
        )
    return number


def _cpu_count() -> int:
    """CPUs this process may use (a container's cpuset, taskset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# --- admin endpoint


def _admin_listen(value: object, key: str) -> TcpListen | None:
    """``HOST:PORT``, a bare port, or off: YAML reads an unquoted ``off``/``false`` as False."""
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        _fail(
            key,
            f"must be HOST:PORT or off, not {_type_name(value)}",
            value=value,
            fix='e.g. "127.0.0.1:9432", or off to run without the admin endpoint',
        )
    return parse_listen(value, key=key)


def _admin(value: object) -> AdminSettings:
    fields = _mapping(value, "admin", _ADMIN_KEYS)
    defaults = AdminSettings()
    readiness = _mapping(fields.get("readiness", {}), "admin.readiness", _READINESS_KEYS)
    return AdminSettings(
        listen=(
            _admin_listen(fields["listen"], "admin.listen")
            if "listen" in fields
            else defaults.listen
        ),
        readiness_upstream_check=(
            _boolean(readiness["upstream_check"], "admin.readiness.upstream_check")
            if "upstream_check" in readiness
            else defaults.readiness_upstream_check
        ),
        readiness_upstream_interval=(
            _seconds(readiness["interval"], "admin.readiness.interval")
            if "interval" in readiness
            else defaults.readiness_upstream_interval
        ),
        protocol_metrics=(
            _boolean(fields["protocol_metrics"], "admin.protocol_metrics")
            if "protocol_metrics" in fields
            else defaults.protocol_metrics
        ),
    )


def _check_admin(
    admin: AdminSettings, key: str, source: str | None, routes: list[RouteSettings]
) -> None:
    """The admin port must not take a route's address: one of the two would fail to bind."""
    listen = admin.listen
    if listen is None:
        return
    for route in routes:
        for listener in route.listen:
            if _conflict(listen, listener):
                with _source(source):
                    _fail(
                        key,
                        f"{listen.describe()} is also bound by route '{route.name}'",
                        fix="give the admin endpoint its own port (default 9432), or off",
                    )
    if not _is_loopback(listen.host):
        log.warning(
            "the admin endpoint listens on %s, which is not a loopback address: metrics and the "
            "status page (user, database and client names, no secrets) are reachable from the "
            "network; POST /shutdown is still only accepted from loopback",
            listen.describe(),
        )


# --- routes


@dataclass
class _Route:
    """A route being assembled: parts may still come from flags or the environment."""

    name: str
    key: str  # where it was defined, for messages: routes[0], or "command line"
    tcp: list[TcpListen] | None = None  # None: not given
    tcp_key: str = ""
    unix: list[tuple[str, int]] | None = None  # (directory, mode)
    unix_key: str = ""
    upstream: UpstreamSettings | None = None
    upstream_raw: object = None  # file's upstream, validated only if used
    upstream_key: str = ""
    upstream_source: str | None = None  # the file, when the upstream came from it
    base_dir: str | None = None
    source: str | None = None
    max_connections: int | None = None
    pool: PoolSettings = dataclasses.field(default_factory=PoolSettings)


@contextmanager
def _source(source: str | None) -> Iterator[None]:
    """Name the config file in errors about its contents."""
    try:
        yield
    except ConfigError as exc:
        if source is None or exc.source is not None:
            raise
        raise ConfigError(
            exc.key, exc.problem, value=exc.value, fix=exc.fix, source=source
        ) from exc


def _file_route(value: object, key: str, base_dir: str, source: str) -> _Route:
    fields = _mapping(value, key, _ROUTE_KEYS)
    route = _Route(name="default", key=key, base_dir=base_dir, source=source)
    if "name" in fields:
        route.name = _text(fields["name"], f"{key}.name")
        if not _ROUTE_NAME.fullmatch(route.name):
            _fail(
                f"{key}.name",
                "is not a valid route name",
                value=route.name,
                fix="use letters, digits, '_', '.' and '-' (it appears in logs and metrics)",
            )
    if "listen" in fields:
        route.tcp_key = f"{key}.listen"
        items = fields["listen"]
        items = items if isinstance(items, list) else [items]
        route.tcp = []
        for index, item in enumerate(items):
            item_key = f"{key}.listen[{index}]"
            if isinstance(item, int) and not isinstance(item, bool):
                item = str(item)
            route.tcp.append(parse_listen(_text(item, item_key), key=item_key))
    if "unix_socket" in fields:
        route.unix_key = f"{key}.unix_socket"
        items = fields["unix_socket"]
        items = items if isinstance(items, list) else [items]
        route.unix = [
            _unix_socket(item, f"{key}.unix_socket[{index}]", base_dir)
            for index, item in enumerate(items)
        ]
    if "max_connections" in fields:
        route.max_connections = _integer(
            fields["max_connections"], f"{key}.max_connections", low=1, high=1_000_000
        )
    if "pool" in fields:
        route.pool = _pool(fields["pool"], f"{key}.pool")
    if "upstream" in fields:
        route.upstream_key = f"{key}.upstream"
        route.upstream_raw = fields["upstream"]
        if not isinstance(route.upstream_raw, str | dict):
            _fail(
                route.upstream_key,
                f"must be a connection string or a mapping, not {_type_name(route.upstream_raw)}",
                fix='e.g. upstream: "host=srv.postgres.database.azure.com sslmode=verify-full"',
            )
    return route


def _pool(value: object, key: str) -> PoolSettings:
    """``pool: {size, max_age}``; the bounds protect the server, which pays for every slot."""
    fields = _mapping(value, key, _POOL_KEYS)
    defaults = PoolSettings()
    size = defaults.size
    if "size" in fields:
        size = _integer(fields["size"], f"{key}.size", low=0, high=MAX_POOL_SIZE)
    max_age = defaults.max_age
    if "max_age" in fields:
        max_age = _seconds(fields["max_age"], f"{key}.max_age")
        if max_age >= SERVER_AUTHENTICATION_TIMEOUT:
            _fail(
                f"{key}.max_age",
                f"must be below {SERVER_AUTHENTICATION_TIMEOUT:g} s, PostgreSQL's default "
                "authentication_timeout: a pooled connection has not sent its StartupMessage "
                "yet, and the server drops it once that timeout has passed since it was "
                "accepted",
                value=fields["max_age"],
                fix="use e.g. 30; if the server's authentication_timeout was lowered, stay "
                "well below it",
            )
    return PoolSettings(size=size, max_age=max_age)


def _unix_socket(value: object, key: str, base_dir: str | None) -> tuple[str, int]:
    mode = _DEFAULT_UNIX_MODE
    if isinstance(value, dict):
        fields = _mapping(value, key, _UNIX_KEYS)
        if "directory" not in fields:
            _fail(f"{key}.directory", "is required", fix="e.g. directory: /var/run/postgresql")
        directory = _text(fields["directory"], f"{key}.directory")
        if "mode" in fields:
            mode = _parse_mode(fields["mode"], f"{key}.mode")
    else:
        directory = _text(value, key)
    if not directory:
        _fail(key, "the socket directory is empty", fix="e.g. /var/run/postgresql")
    return _resolve(directory, base_dir), mode


def _file_upstream(route: _Route) -> UpstreamSettings:
    raw = route.upstream_raw
    params: Mapping[str, object]
    if isinstance(raw, str):
        params = parse_conninfo(raw, key=route.upstream_key)
    else:
        assert isinstance(raw, dict)  # checked when the route was read
        params = raw
    return upstream_from_params(params, key=route.upstream_key, base_dir=route.base_dir)


def load_settings(
    *,
    config_path: str | None,
    listen: Sequence[str] = (),
    unix_sockets: Sequence[str] = (),
    unix_socket_mode: str | None = None,
    upstream: str | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    admin_listen: str | None = None,
    event_loop: str | None = None,
    workers: str | None = None,
    environ: Mapping[str, str],
) -> Settings:
    """Build the whole configuration, or raise ``ConfigError`` before anything is started.

    The arguments are the CLI's flags (``--config``, ``--listen``, ``--unix-socket``,
    ``--unix-socket-mode``, ``--upstream``, ``--log-format``, ``--log-level``,
    ``--admin-listen``: ``HOST:PORT`` or ``off``, ``--event-loop``, ``--workers``) and the
    process environment, passed in so tests never touch ``os.environ``.
    """
    timeouts, limits, log_settings, reload = Timeouts(), Limits(), LogSettings(), ReloadSettings()
    admin, admin_key, admin_source = AdminSettings(), "admin.listen", config_path
    routes: list[_Route] = []
    # Flag, then file, then environment, like everything else; "auto" when none says.
    loop_choice: tuple[EventLoopSetting, str] = ("auto", "event_loop")
    loop_source: str | None = None
    if EVENT_LOOP_ENV in environ:
        loop_choice = _event_loop(environ[EVENT_LOOP_ENV], EVENT_LOOP_ENV)
    # The same order for workers: flag, then file, then environment.
    worker_count = 1
    if environ.get(WORKERS_ENV):
        worker_count = _workers(environ[WORKERS_ENV], WORKERS_ENV)
    if config_path is not None:
        document = _read_yaml(config_path)
        with _source(config_path):
            base_dir = os.path.dirname(os.path.abspath(config_path))
            if "timeouts" in document:
                timeouts = _timeouts(document["timeouts"])
            if "limits" in document:
                limits = _limits(document["limits"])
            if "logging" in document:
                log_settings = _logging(document["logging"])
            if "admin" in document:
                admin = _admin(document["admin"])
            if "reload" in document:
                reload = _reload(document["reload"])
            if document.get("event_loop") is not None:
                loop_choice = _event_loop(document["event_loop"], "event_loop")
                loop_source = config_path
            if document.get("workers") is not None:
                worker_count = _workers(document["workers"], "workers")
            if "routes" in document:
                routes = _file_routes(document["routes"], base_dir, config_path)

    flags = {
        "--listen": bool(listen),
        "--unix-socket": bool(unix_sockets),
        "--upstream": upstream is not None,
        "--unix-socket-mode": unix_socket_mode is not None,
    }
    if len(routes) > 1:
        for flag, given in flags.items():
            if given:
                _fail(
                    flag,
                    f"is ambiguous with {len(routes)} routes in {config_path}: which route "
                    "would it change?",
                    fix="set it on the route in the configuration file",
                )
    if not routes:
        routes = [_Route(name="default", key="command line")]
    if len(routes) == 1:
        _apply_flags(routes[0], listen, unix_sockets, unix_socket_mode, upstream, environ)
    else:
        for route in routes:
            if route.upstream_raw is None:
                with _source(route.source):
                    _fail(
                        f"{route.key}.upstream",
                        "is required when the file defines several routes",
                        fix='e.g. upstream: "host=srv.postgres.database.azure.com"',
                    )
            with _source(route.source):
                route.upstream = _file_upstream(route)
            route.upstream_source = route.source

    if log_format is not None:
        log_settings = LogSettings(_log_format(log_format, "--log-format"), log_settings.level)
    if log_level is not None:
        log_settings = LogSettings(log_settings.format, _log_level(log_level, "--log-level"))

    if event_loop is not None:
        loop_choice, loop_source = _event_loop(event_loop, "--event-loop"), None
    # Here and not only at start: `config validate` and `check` then report a missing uvloop.
    with _source(loop_source):
        choose_loop(loop_choice[0], key=loop_choice[1])

    if workers is not None:
        worker_count = _workers(workers, "--workers")

    if admin_listen is not None:
        admin = dataclasses.replace(admin, listen=_admin_listen(admin_listen, "--admin-listen"))
        admin_key, admin_source = "--admin-listen", None

    finished = _finish_routes(routes)
    _check_admin(admin, admin_key, admin_source, finished)
    _warn_exposed(finished)
    return Settings(
        routes=tuple(finished),
        timeouts=timeouts,
        limits=limits,
        logging=log_settings,
        admin=admin,
        reload=reload,
        source=config_path,
        event_loop=loop_choice[0],
        workers=worker_count,
    )


def _file_routes(value: object, base_dir: str, source: str) -> list[_Route]:
    if not isinstance(value, list):
        _fail("routes", f"must be a list of routes, not {_type_name(value)}", fix="- name: main")
    if not value:
        _fail("routes", "is an empty list", fix="define at least one route, or remove 'routes'")
    routes = [
        _file_route(item, f"routes[{index}]", base_dir, source) for index, item in enumerate(value)
    ]
    seen: dict[str, str] = {}
    for route in routes:
        if route.name in seen:
            _fail(
                f"{route.key}.name",
                f"route name is already used by {seen[route.name]}",
                value=route.name,
                fix="give every route a unique name",
            )
        seen[route.name] = route.key
    return routes


def _apply_flags(
    route: _Route,
    listen: Sequence[str],
    unix_sockets: Sequence[str],
    unix_socket_mode: str | None,
    upstream: str | None,
    environ: Mapping[str, str],
) -> None:
    """Command-line flags replace the single route's settings of the same kind."""
    if listen:
        route.tcp = [parse_listen(item, key="--listen") for item in listen]
        route.tcp_key = "--listen"
    if unix_sockets:
        route.unix = [_unix_socket(item, "--unix-socket", None) for item in unix_sockets]
        route.unix_key = "--unix-socket"
    if unix_socket_mode is not None:
        mode = _parse_mode(unix_socket_mode, "--unix-socket-mode")
        if not route.unix:
            _fail(
                "--unix-socket-mode",
                "is given but no Unix socket is configured",
                value=unix_socket_mode,
                fix="add --unix-socket DIR, or remove --unix-socket-mode",
            )
        route.unix = [(directory, mode) for directory, _ in route.unix]

    if upstream is not None:
        if route.upstream_raw is not None:
            log.info("--upstream replaces %s from %s", route.upstream_key, route.source)
        route.upstream = upstream_from_params(
            parse_conninfo(upstream, key="--upstream"), key="--upstream"
        )
        route.upstream_key = "--upstream"
        return
    if route.upstream_raw is not None:
        with _source(route.source):
            route.upstream = _file_upstream(route)
        route.upstream_source = route.source
        return
    env_params = params_from_environ(environ)
    if "host" in env_params or "hostaddr" in env_params:
        names = {option: variable for variable, option in ENVIRONMENT_VARIABLES.items()}
        route.upstream = upstream_from_params(env_params, key="environment", names=names)
        route.upstream_key = "PGHOST"
        return
    _fail(
        "upstream",
        "no upstream server is configured",
        fix="give one with --upstream 'host=SERVER.postgres.database.azure.com', "
        "with 'upstream:' on the route in the configuration file, "
        "or with the PGHOST (and PGSSLMODE, PGSSLROOTCERT, ...) environment variables",
    )


def _finish_routes(routes: list[_Route]) -> list[RouteSettings]:
    """Default listener, Unix socket ports, and checks that span routes."""
    bound: list[tuple[Listen, str]] = []
    finished: list[RouteSettings] = []
    for route in routes:
        tcp = route.tcp
        if tcp is None and not route.unix:
            tcp = [TcpListen(DEFAULT_LISTEN_HOST, DEFAULT_PORT)]
        tcp = tcp or []
        # libpq cannot use port 0, so an ephemeral TCP port gives the socket the default name.
        unix_port = next((item.port for item in tcp if item.port != 0), DEFAULT_PORT)
        listeners: list[Listen] = list(tcp)
        listeners += [
            UnixListen(directory, unix_port, mode) for directory, mode in route.unix or []
        ]
        if not listeners:
            _fail(
                route.tcp_key or route.key,
                "the route has no listener",
                fix="give at least one listen address or unix_socket",
            )
        for listener in listeners:
            where = route.unix_key if isinstance(listener, UnixListen) else route.tcp_key
            where = where or f"{route.key}.listen"
            for other, other_where in bound:
                if _conflict(listener, other):
                    with _source(None if where.startswith("-") else route.source):
                        _fail(
                            where,
                            f"{listener.describe()} is also bound by {other_where}",
                            fix="give every listener its own address, port or directory",
                        )
            bound.append((listener, f"route '{route.name}' ({where})"))
        assert route.upstream is not None
        finished.append(
            RouteSettings(
                name=route.name,
                listen=tuple(listeners),
                upstream=route.upstream,
                max_connections=route.max_connections,
                pool=route.pool,
            )
        )
    for index, settings in enumerate(finished):
        _check_not_self(settings, bound, routes[index])
    return finished


def _conflict(a: Listen, b: Listen) -> bool:
    if isinstance(a, UnixListen) or isinstance(b, UnixListen):
        return isinstance(a, UnixListen) and isinstance(b, UnixListen) and a.path == b.path
    if a.port == 0 or a.port != b.port:
        return False
    if a.host == b.host:
        return True
    # A wildcard address takes the port on every address of its family (asyncio binds IPv6
    # sockets with IPV6_V6ONLY, so the families do not collide).
    family_a, family_b = _family(a.host), _family(b.host)
    return family_a == family_b != 0 and bool({a.host, b.host} & _WILDCARDS)


def _family(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reaches(host: str, listener_host: str) -> bool:
    """Whether dialling loopback ``host`` could land on a listener bound to ``listener_host``."""
    if "localhost" in (host, listener_host):
        return _is_loopback(listener_host) or listener_host in _WILDCARDS
    if host == listener_host:
        return True
    return listener_host in _WILDCARDS and _family(host) == _family(listener_host)


def _check_not_self(route: RouteSettings, bound: list[tuple[Listen, str]], draft: _Route) -> None:
    """Refuse an upstream that is the sidecar's own listener: PGHOST=localhost, shared with the
    application's container, would otherwise make the sidecar connect to itself forever."""
    upstream = route.upstream
    if not _is_loopback(upstream.connect_host):
        return
    for listener, where in bound:
        if (
            isinstance(listener, TcpListen)
            and listener.port == upstream.port
            and _reaches(upstream.connect_host, listener.host)
        ):
            with _source(draft.upstream_source):
                _fail(
                    draft.upstream_key or f"{draft.key}.upstream",
                    f"{upstream.describe()} is the sidecar's own listener ({where}); "
                    "it would connect to itself",
                    fix="point the upstream at the real server (if PGHOST is meant for the "
                    "application, give the sidecar --upstream)",
                )


def _warn_exposed(routes: list[RouteSettings]) -> None:
    for route in routes:
        for listener in route.listen:
            if isinstance(listener, TcpListen) and not _is_loopback(listener.host):
                log.warning(
                    "route %r listens on %s, which is not a loopback address: clients reach it "
                    "in plaintext over the network",
                    route.name,
                    listener.describe(),
                )
