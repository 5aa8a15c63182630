"""Configuration loading: real files in tests/data/config and tmp_path, real environment maps."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_settings, parse_listen, upstream_from_params
from proxy.conninfo import parse_conninfo
from proxy.errors import ConfigError
from proxy.settings import (
    AdminSettings,
    Limits,
    LogSettings,
    Settings,
    TcpListen,
    Timeouts,
    UnixListen,
    UpstreamSettings,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "config"
CERTS = DATA / "certs"
KEY = "routes[1].upstream"


def upstream(params: Mapping[str, object], base_dir: Path | None = None) -> UpstreamSettings:
    return upstream_from_params(
        params, key=KEY, base_dir=str(base_dir) if base_dir is not None else None
    )


def config_error(params: Mapping[str, object], base_dir: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        upstream(params, base_dir)
    return caught.value


def load(**kwargs: Any) -> Settings:
    kwargs.setdefault("config_path", None)
    kwargs.setdefault("environ", {})
    return load_settings(**kwargs)


def load_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(**kwargs)
    return caught.value


# --- upstream_from_params: accepted input


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({"host": "db.example.com"}, {}, id="defaults"),
        pytest.param(
            {"host": "db", "port": "6432", "sslmode": "verify-ca"},
            {"port": 6432, "sslmode": "verify-ca"},
            id="strings",
        ),
        pytest.param({"host": "db", "port": 6432}, {"port": 6432}, id="yaml-int-port"),
        pytest.param({"host": "db", "sslmode": "require"}, {"sslmode": "require"}),
        pytest.param(
            {"host": "db", "sslrootcert": "system"},
            {"sslrootcert": "system", "sslmode": "verify-full"},
            id="system-store",
        ),
        pytest.param(
            {"host": "db", "sslrootcert": "system", "sslmode": "verify-full"},
            {"sslrootcert": "system"},
        ),
        pytest.param({"host": "2001:db8::1"}, {"host": "2001:db8::1"}, id="ipv6-host"),
        pytest.param({"host": "10.0.0.4"}, {"host": "10.0.0.4"}, id="ipv4-host"),
        pytest.param(
            {"host": "db.example.com", "hostaddr": "10.0.0.4"},
            {"hostaddr": "10.0.0.4"},
            id="hostaddr",
        ),
        pytest.param(
            {"host": "x.privatelink.example.com", "tls_server_name": "x.example.com"},
            {"tls_server_name": "x.example.com"},
            id="tls-server-name",
        ),
        pytest.param({"host": "db", "sslsni": "0"}, {"sslsni": False}),
        pytest.param({"host": "db", "sslsni": "true"}, {"sslsni": True}),
        pytest.param({"host": "db", "sslsni": False}, {"sslsni": False}, id="yaml-bool"),
        pytest.param({"host": "db", "sslsni": 0}, {"sslsni": False}, id="yaml-int-bool"),
        pytest.param({"host": "db", "keepalives": "0"}, {"keepalives": False}),
        pytest.param({"host": "db", "sslnegotiation": "direct"}, {"sslnegotiation": "direct"}),
        pytest.param(
            {"host": "db", "ssl_min_protocol_version": "tlsv1.3"},
            {"ssl_min_protocol_version": "TLSv1.3"},
            id="tls-version-any-case",
        ),
        pytest.param(
            {
                "host": "db",
                "ssl_min_protocol_version": "TLSv1",
                "ssl_max_protocol_version": "TLSv1.2",
            },
            {"ssl_min_protocol_version": "TLSv1", "ssl_max_protocol_version": "TLSv1.2"},
        ),
        pytest.param(
            {"host": "db", "ssl_max_protocol_version": "TLSv1.2"},
            {"ssl_max_protocol_version": "TLSv1.2"},
            id="max-equals-default-min",
        ),
        pytest.param({"host": "db", "connect_timeout": "7"}, {"connect_timeout": 7.0}),
        pytest.param({"host": "db", "connect_timeout": 2.5}, {"connect_timeout": 2.5}),
        pytest.param(
            {
                "host": "db",
                "keepalives_idle": "30",
                "keepalives_interval": 5,
                "keepalives_count": "127",
            },
            {"keepalives_idle": 30, "keepalives_interval": 5, "keepalives_count": 127},
        ),
        pytest.param(
            {"host": "db", "sslrootcert": "", "port": "", "hostaddr": None},
            {"sslrootcert": None, "port": 5432, "hostaddr": None},
            id="empty-and-null-mean-unset",
        ),
        pytest.param(
            {"host": "db", "target_session_attrs": "any", "channel_binding": "prefer"},
            {},
            id="harmless-application-options",
        ),
    ],
)
def test_upstream_accepts(params: dict[str, object], expected: dict[str, object]) -> None:
    settings = upstream(params)
    defaults = UpstreamSettings(host=str(params["host"]))
    assert settings == dataclasses.replace(defaults, **expected)


def test_azure_portal_string_works_once_the_password_is_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = (
        "host=srv.postgres.database.azure.com port=5432 dbname=postgres user=admin sslmode=require"
    )
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        settings = upstream(parse_conninfo(text))
    assert settings.host == "srv.postgres.database.azure.com"
    assert settings.sslmode == "require"
    warned = [r.getMessage() for r in caplog.records if r.name == "proxy.config"]
    assert warned == [
        f"{KEY}.dbname is ignored: the client's StartupMessage decides it, not the sidecar",
        f"{KEY}.user is ignored: the client's StartupMessage decides it, not the sidecar",
    ]


@pytest.mark.parametrize(
    "option",
    [
        "dbname",
        "user",
        "application_name",
        "options",
        "fallback_application_name",
        "target_session_attrs",
        "gssencmode",
        "sslcompression",
        "requiressl",
        "channel_binding",
    ],
)
def test_application_options_are_ignored_with_a_warning(
    option: str, caplog: pytest.LogCaptureFixture
) -> None:
    value = {"target_session_attrs": "any", "channel_binding": "disable"}.get(option, "1")
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        settings = upstream({"host": "db", option: value})
    assert settings == UpstreamSettings(host="db")
    records = [r for r in caplog.records if r.name == "proxy.config"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].getMessage().startswith(f"{KEY}.{option} is ignored: ")


# --- upstream_from_params: refused input; (params, key suffix, fragments of the message)

UPSTREAM_ERRORS = [
    pytest.param(
        {"host": "db", "sslmode": "prefer"},
        "sslmode",
        [
            "'prefer' would allow a plaintext session; the sidecar never sends data "
            "unencrypted (got 'prefer'); use require, verify-ca or verify-full"
        ],
        id="prefer",
    ),
    pytest.param({"host": "db", "sslmode": "disable"}, "sslmode", ["'disable' would allow"]),
    pytest.param({"host": "db", "sslmode": "allow"}, "sslmode", ["'allow' would allow"]),
    pytest.param(
        {"host": "db", "sslmode": "verify_full"},
        "sslmode",
        ["not a valid sslmode", "'verify_full'", "use require, verify-ca or verify-full"],
    ),
    pytest.param(
        {"host": "db", "sslmode": "require", "sslrootcert": "system"},
        "sslmode",
        ["may not be used with sslrootcert=system", "use sslmode=verify-full"],
    ),
    pytest.param(
        {"host": "db", "sslmode": "verify-ca", "sslrootcert": "system"},
        "sslmode",
        ["'verify-ca' may not be used with sslrootcert=system"],
    ),
    pytest.param({"host": "db", "password": "x"}, "password", ["never holds passwords"]),
    pytest.param({"host": "db", "passfile": "/x"}, "passfile", ["never holds passwords"]),
    pytest.param(
        {"host": "db", "channel_binding": "require"},
        "channel_binding",
        ["channel binding can never work through the sidecar", "remove channel_binding"],
    ),
    pytest.param(
        {"host": "db", "target_session_attrs": "read-write"},
        "target_session_attrs",
        ["exactly one server", "target_session_attrs=any"],
    ),
    pytest.param(
        {"host": "db", "sslmdoe": "require"},
        "sslmdoe",
        ["unknown connection option", "did you mean sslmode?"],
    ),
    pytest.param(
        {"host": "db", "service": "prod"},
        "service",
        ["unknown connection option", "does not support"],
    ),
    pytest.param({}, "host", ["is required"], id="no-host"),
    pytest.param({"host": ""}, "host", ["is required"], id="empty-host"),
    pytest.param({"host": "a,b"}, "host", ["lists several hosts", "one upstream host"]),
    pytest.param({"host": "/var/run/postgresql"}, "host", ["Unix-domain socket", "over TCP"]),
    pytest.param({"host": "@abstract"}, "host", ["Unix-domain socket"]),
    pytest.param({"host": "[::1]"}, "host", ["must not be in brackets", "write host=::1"]),
    pytest.param(parse_conninfo("host= port=5432"), "host", ["contains '='", "remove the space"]),
    pytest.param({"host": "db example"}, "host", ["not a valid host name"]),
    pytest.param({"host": "10.0.0.256"}, "host", ["not a valid host name"]),
    pytest.param({"host": 5}, "host", ["must be a string, not int"]),
    pytest.param({"host": "db", "port": "0"}, "port", ["out of range 1..65535"]),
    pytest.param({"host": "db", "port": 65536}, "port", ["out of range 1..65535"]),
    pytest.param({"host": "db", "port": "pg"}, "port", ["not a whole number"]),
    pytest.param({"host": "db", "port": True}, "port", ["must be an integer, not a boolean"]),
    pytest.param({"host": "db", "port": "5432,5433"}, "port", ["lists several ports"]),
    pytest.param({"host": "db", "hostaddr": "db2"}, "hostaddr", ["not a numeric IP address"]),
    pytest.param({"host": "db", "hostaddr": "10.0.0.1,10.0.0.2"}, "hostaddr", ["several"]),
    pytest.param({"host": "db", "tls_server_name": "a b"}, "tls_server_name", ["DNS name"]),
    pytest.param({"host": "db", "sslsni": "yes"}, "sslsni", ["must be 0 or 1"]),
    pytest.param({"host": "db", "keepalives": 2}, "keepalives", ["must be 0 or 1"]),
    pytest.param(
        {"host": "db", "sslnegotiation": "requiredirect"},
        "sslnegotiation",
        ["use postgres or direct"],
    ),
    pytest.param(
        {"host": "db", "ssl_min_protocol_version": "TLSv1.4"},
        "ssl_min_protocol_version",
        ["not a TLS protocol version", "TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"],
    ),
    pytest.param(
        {
            "host": "db",
            "ssl_min_protocol_version": "TLSv1.3",
            "ssl_max_protocol_version": "TLSv1.2",
        },
        "ssl_max_protocol_version",
        ["lower than ssl_min_protocol_version (TLSv1.3)"],
    ),
    pytest.param({"host": "db", "connect_timeout": "0"}, "connect_timeout", ["positive"]),
    pytest.param({"host": "db", "connect_timeout": -1}, "connect_timeout", ["positive"]),
    pytest.param({"host": "db", "connect_timeout": "nan"}, "connect_timeout", ["positive"]),
    pytest.param({"host": "db", "connect_timeout": "soon"}, "connect_timeout", ["not a number"]),
    pytest.param({"host": "db", "keepalives_idle": 0}, "keepalives_idle", ["1..32767"]),
    pytest.param({"host": "db", "keepalives_count": 128}, "keepalives_count", ["1..127"]),
    pytest.param(
        {"host": "db", "keepalives_interval": 1.5}, "keepalives_interval", ["must be an integer"]
    ),
]


@pytest.mark.parametrize(("params", "option", "fragments"), UPSTREAM_ERRORS)
def test_upstream_refuses(params: dict[str, object], option: str, fragments: list[str]) -> None:
    error = config_error(params)
    assert error.key == f"{KEY}.{option}"
    assert str(error).startswith(f"{KEY}.{option}: ")
    for fragment in fragments:
        assert fragment in str(error)


@pytest.mark.parametrize(
    "params",
    [
        {"host": "db", "password": "Sup3rSecret"},
        {"host": "db", "sslpassword": "Sup3rSecret"},
        {"host": "db", "sslpassword": 12345678, "sslcert": "client.crt", "sslkey": "client.key"},
    ],
    ids=["password", "sslpassword-without-key", "sslpassword-not-a-string"],
)
def test_secrets_never_appear_in_messages(params: dict[str, object]) -> None:
    error = config_error(params, CERTS)
    assert "Sup3rSecret" not in str(error)
    assert "12345678" not in str(error)
    assert error.value is None


# --- files


def test_relative_paths_resolve_against_base_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # somewhere the files are not
    settings = upstream(
        {
            "host": "db",
            "sslrootcert": "root.pem",
            "sslcrl": "./root.pem",
            "sslcrldir": ".",
            "sslcert": "client.crt",
            "sslkey": "client.key",
            "sslpassword": "pw",
        },
        CERTS,
    )
    assert settings.sslrootcert == str(CERTS / "root.pem")
    assert settings.sslcrl == str(CERTS / "root.pem")
    assert settings.sslcrldir == str(CERTS)
    assert settings.sslcert == str(CERTS / "client.crt")
    assert settings.sslkey == str(CERTS / "client.key")
    assert settings.sslpassword == "pw"


def test_relative_paths_default_to_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(CERTS)
    assert upstream({"host": "db", "sslrootcert": "root.pem"}).sslrootcert == str(
        CERTS / "root.pem"
    )


def test_absolute_paths_are_kept() -> None:
    path = str(CERTS / "root.pem")
    assert upstream({"host": "db", "sslrootcert": path}, Path("/nonexistent")).sslrootcert == path


@pytest.mark.parametrize("option", ["sslrootcert", "sslcrl", "sslcert", "sslkey"])
def test_missing_files_are_refused(option: str, tmp_path: Path) -> None:
    params = {"host": "db", "sslcert": "client.crt", "sslkey": "client.key"}
    params[option] = "missing.pem"
    error = config_error(params, CERTS)
    assert error.key == f"{KEY}.{option}"
    assert f"cannot read {CERTS / 'missing.pem'}: No such file or directory" in str(error)
    assert "relative paths are resolved against the config file's directory" in str(error)


def test_a_directory_is_not_a_certificate_file() -> None:
    error = config_error({"host": "db", "sslrootcert": "."}, CERTS)
    assert f"{CERTS} is a directory" in str(error)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "root.pem")
    error = config_error({"host": "db", "sslrootcert": "root.pem"}, tmp_path)
    assert "is not a regular file" in str(error)


def test_crl_directory_must_be_a_directory() -> None:
    error = config_error({"host": "db", "sslcrldir": "root.pem"}, CERTS)
    assert error.key == f"{KEY}.sslcrldir"
    assert "is not a directory" in str(error)


@pytest.mark.parametrize(
    ("params", "option", "fragment"),
    [
        ({"sslcert": "client.crt"}, "sslcert", "is given without sslkey"),
        ({"sslkey": "client.key"}, "sslkey", "is given without sslcert"),
        ({"sslpassword": "pw"}, "sslpassword", "is given without sslkey"),
    ],
)
def test_client_certificate_needs_both_halves(
    params: dict[str, object], option: str, fragment: str
) -> None:
    error = config_error({"host": "db", **params}, CERTS)
    assert error.key == f"{KEY}.{option}"
    assert fragment in str(error)


def test_key_names_can_be_overridden_for_the_environment() -> None:
    with pytest.raises(ConfigError) as caught:
        upstream_from_params(
            {"host": "db", "sslmode": "prefer"},
            key="environment",
            names={"sslmode": "PGSSLMODE"},
        )
    assert str(caught.value).startswith("PGSSLMODE: 'prefer' would allow a plaintext session")


def test_flag_keys_read_as_flag_and_option() -> None:
    with pytest.raises(ConfigError, match=r"^--upstream sslmode: 'allow' would allow"):
        upstream_from_params({"host": "db", "sslmode": "allow"}, key="--upstream")


# --- parse_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5432", TcpListen("127.0.0.1", 5432)),
        ("0.0.0.0:6432", TcpListen("0.0.0.0", 6432)),  # noqa: S104 - parsed, not bound
        ("localhost:5432", TcpListen("localhost", 5432)),
        ("[::1]:5432", TcpListen("::1", 5432)),
        ("[::]:0", TcpListen("::", 0)),
        ("6432", TcpListen("127.0.0.1", 6432)),
        ("0", TcpListen("127.0.0.1", 0)),
        (" 127.0.0.1:65535 ", TcpListen("127.0.0.1", 65535)),
    ],
)
def test_listen_addresses(text: str, expected: TcpListen) -> None:
    assert parse_listen(text, key="--listen") == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "missing a host or port"),
        ("127.0.0.1", "missing a host or port"),
        (":5432", "missing a host or port"),
        ("::1:5432", "IPv6 addresses must be in brackets"),
        ("[::1]5432", "is not [IPv6]:PORT"),
        ("[::1", "is not [IPv6]:PORT"),
        ("[db]:5432", "'db' is not an IPv6 address"),
        ("127.0.0.1:65536", "out of range 0..65535"),
        ("127.0.0.1:pg", "not a whole number"),
        ("127.0.0.300:5432", "not a valid address or host name"),
        ("my host:5432", "not a valid address or host name"),
        ("*:5432", "not a valid address or host name"),
    ],
)
def test_listen_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_listen(text, key="routes[0].listen[1]")
    assert caught.value.key == "routes[0].listen[1]"
    assert fragment in str(caught.value)


# --- load_settings: where the upstream comes from


def test_upstream_from_the_command_line() -> None:
    settings = load(upstream="host=db.example.com sslmode=verify-ca")
    assert settings == Settings(
        routes=(
            dataclasses.replace(
                settings.routes[0],
                name="default",
                listen=(TcpListen("127.0.0.1", 5432),),
                upstream=UpstreamSettings(host="db.example.com", sslmode="verify-ca"),
                max_connections=None,
            ),
        )
    )


def test_upstream_from_the_environment() -> None:
    environ = {"PGHOST": "env.example.com", "PGPORT": "6543", "PGUSER": "admin", "PGSSLSNI": "0"}
    route = load(environ=environ).routes[0]
    assert route.upstream == UpstreamSettings(host="env.example.com", port=6543, sslsni=False)


def test_environment_paths_resolve_against_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(CERTS)
    environ = {"PGHOST": "db", "PGSSLROOTCERT": "root.pem"}
    assert load(environ=environ).routes[0].upstream.sslrootcert == str(CERTS / "root.pem")


def test_environment_errors_name_the_variable() -> None:
    error = load_error(environ={"PGHOST": "db", "PGSSLMODE": "prefer"})
    assert error.key == "PGSSLMODE"
    assert "would allow a plaintext session" in str(error)


def test_command_line_beats_environment() -> None:
    settings = load(upstream="host=cli.example.com", environ={"PGHOST": "env.example.com"})
    assert settings.routes[0].upstream.host == "cli.example.com"


def test_file_beats_environment() -> None:
    settings = load(
        config_path=str(DATA / "valid" / "minimal.yaml"),
        environ={"PGHOST": "env.example.com", "PGSSLMODE": "disable"},
    )
    assert settings.routes[0].upstream.host == "db.example.com"


def test_command_line_beats_file(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="proxy.config"):
        settings = load(
            config_path=str(DATA / "valid" / "minimal.yaml"), upstream="host=cli.example.com"
        )
    assert settings.routes[0].upstream.host == "cli.example.com"
    assert any("--upstream replaces routes[0].upstream" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "environ",
    [{}, {"PGSSLMODE": "verify-full", "PGUSER": "app"}, {"PGHOST": ""}],
    ids=["empty", "no-host", "empty-host"],
)
def test_no_upstream_anywhere(environ: dict[str, str]) -> None:
    error = load_error(environ=environ)
    assert error.key == "upstream"
    message = str(error)
    for way in ("--upstream", "'upstream:' on the route", "PGHOST"):
        assert way in message


def test_command_line_upstream_errors_name_the_flag() -> None:
    error = load_error(upstream="host=db password=x")
    assert str(error).startswith("--upstream password: the sidecar never holds passwords")


def test_upstream_pointing_at_the_sidecar_itself_is_refused() -> None:
    error = load_error(environ={"PGHOST": "localhost", "PGPORT": "5432"})
    assert "the sidecar's own listener" in str(error)
    assert "it would connect to itself" in str(error)


@pytest.mark.parametrize(
    ("listen", "upstream_host"),
    [
        ("127.0.0.1:5432", "localhost"),
        ("localhost:5432", "127.0.0.1"),
        ("0.0.0.0:5432", "127.0.0.1"),
        ("[::]:5432", "::1"),
        ("[::1]:5432", "::1"),
        ("0.0.0.0:5432", "localhost"),
    ],
)
def test_self_loop_cases(listen: str, upstream_host: str) -> None:
    error = load_error(listen=[listen], upstream=f"host={upstream_host}")
    assert "it would connect to itself" in str(error)


@pytest.mark.parametrize(
    ("listen", "upstream_host"),
    [("0.0.0.0:5432", "::1"), ("[::1]:5432", "127.0.0.1"), ("127.0.0.1:5432", "127.0.0.2")],
)
def test_loopback_upstream_on_another_address_is_fine(listen: str, upstream_host: str) -> None:
    settings = load(listen=[listen], upstream=f"host={upstream_host} sslmode=require")
    assert settings.routes[0].upstream.host == upstream_host


def test_loopback_upstream_on_another_port_is_fine() -> None:
    settings = load(upstream="host=127.0.0.1 port=15432 sslmode=require")
    assert settings.routes[0].upstream.connect_host == "127.0.0.1"


# --- load_settings: listeners


def test_default_listener() -> None:
    assert load(upstream="host=db").routes[0].listen == (TcpListen("127.0.0.1", 5432),)


def test_listen_flags_replace_the_default() -> None:
    settings = load(upstream="host=db", listen=["127.0.0.1:6432", "[::1]:6432"])
    assert settings.routes[0].listen == (TcpListen("127.0.0.1", 6432), TcpListen("::1", 6432))


@pytest.mark.parametrize(
    ("listen", "unix_port"),
    [([], 5432), (["127.0.0.1:6432"], 6432), (["127.0.0.1:0", "127.0.0.1:7000"], 7000)],
    ids=["unix-only", "first-tcp-port", "ephemeral-skipped"],
)
def test_unix_socket_takes_the_first_tcp_port(
    listen: list[str], unix_port: int, tmp_path: Path
) -> None:
    settings = load(upstream="host=db", listen=listen, unix_sockets=[str(tmp_path)])
    unix = settings.routes[0].listen[-1]
    assert unix == UnixListen(str(tmp_path), unix_port, 0o777)
    assert len(settings.routes[0].listen) == len(listen) + 1


def test_unix_socket_mode_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(upstream="host=db", unix_sockets=["sockets"], unix_socket_mode="0660")
    assert settings.routes[0].listen == (UnixListen(str(tmp_path / "sockets"), 5432, 0o660),)


@pytest.mark.parametrize(
    ("kwargs", "key", "fragment"),
    [
        ({"unix_socket_mode": "0660"}, "--unix-socket-mode", "no Unix socket is configured"),
        ({"unix_sockets": ["/tmp"], "unix_socket_mode": "999"}, "--unix-socket-mode", "octal"),
        ({"unix_sockets": ["/tmp"], "unix_socket_mode": "1777"}, "--unix-socket-mode", "octal"),
        ({"unix_sockets": [""]}, "--unix-socket", "directory is empty"),
        ({"listen": ["127.0.0.1:6432", "127.0.0.1:6432"]}, "--listen", "is also bound by"),
        ({"listen": ["0.0.0.0:6432", "127.0.0.1:6432"]}, "--listen", "is also bound by"),
        ({"unix_sockets": ["/tmp", "/tmp/"]}, "--unix-socket", "is also bound by"),
        ({"log_format": "xml"}, "--log-format", "use text or json"),
        ({"log_level": "verbose"}, "--log-level", "debug, info, warning, error"),
    ],
)
def test_command_line_errors(kwargs: dict[str, Any], key: str, fragment: str) -> None:
    error = load_error(upstream="host=db", **kwargs)
    assert error.key == key
    assert fragment in str(error)
    assert error.source is None


@pytest.mark.parametrize(
    "listen",
    [
        ["127.0.0.1:0", "127.0.0.1:0"],
        ["0.0.0.0:6432", "[::1]:6432"],
        ["[::]:6432", "127.0.0.1:6432"],
        ["127.0.0.1:6432", "127.0.0.2:6432"],
    ],
    ids=["ephemeral", "v4-wildcard-v6", "v6-wildcard-v4", "different-hosts"],
)
def test_listeners_that_do_not_collide(listen: list[str]) -> None:
    assert len(load(upstream="host=db", listen=listen).routes[0].listen) == 2


def test_non_loopback_listener_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        load(upstream="host=db", listen=["0.0.0.0:6432", "127.0.0.1:6433"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.config"]
    assert len(warnings) == 1
    assert "0.0.0.0:6432, which is not a loopback address" in warnings[0]


def test_log_flags() -> None:
    settings = load(upstream="host=db", log_format="JSON", log_level="debug")
    assert settings.logging == LogSettings(format="json", level="DEBUG")


# --- load_settings: files


def test_minimal_file() -> None:
    path = str(DATA / "valid" / "minimal.yaml")
    settings = load(config_path=path)
    assert settings == Settings(
        routes=(
            dataclasses.replace(
                settings.routes[0],
                name="default",
                listen=(TcpListen("127.0.0.1", 5432),),
                upstream=UpstreamSettings(host="db.example.com"),
            ),
        ),
        source=path,
    )


def test_file_paths_resolve_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    route = load(config_path=str(DATA / "valid" / "relative-paths.yaml")).routes[0]
    assert route.upstream.sslrootcert == str(CERTS / "root.pem")
    assert route.upstream.sslcert == str(CERTS / "client.crt")
    assert route.upstream.sslkey == str(CERTS / "client.key")
    assert route.upstream.sslcrldir == str(CERTS)


def test_two_routes() -> None:
    settings = load(config_path=str(DATA / "valid" / "two-routes.yaml"))
    assert settings.timeouts == Timeouts(connect=2.5, tls_handshake=3, startup=4, drain=5)
    assert settings.limits == Limits(max_connections=20)
    assert settings.logging == LogSettings(format="json", level="WARNING")
    a, b = settings.routes
    assert (a.name, a.listen, a.max_connections) == ("a", (TcpListen("127.0.0.1", 0),), None)
    assert a.upstream == UpstreamSettings(host="a.example.com", port=6543, sslmode="require")
    assert b.listen == (TcpListen("127.0.0.1", 0), TcpListen("127.0.0.1", 0))
    assert b.max_connections == 5
    assert b.upstream == UpstreamSettings(
        host="b.example.com", port=5433, sslsni=False, keepalives_idle=30
    )


def test_null_means_default() -> None:
    settings = load(config_path=str(DATA / "valid" / "nulls.yaml"))
    assert (settings.timeouts, settings.limits, settings.logging) == (
        Timeouts(),
        Limits(),
        LogSettings(),
    )
    assert settings.routes[0].name == "default"
    assert settings.routes[0].listen == (TcpListen("127.0.0.1", 5432),)
    assert settings.routes[0].upstream == UpstreamSettings(host="db.example.com")


def test_single_file_route_takes_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "routes:\n"
        "  - name: main\n"
        '    listen: "127.0.0.1:5432"\n'
        '    unix_socket: {directory: sockets, mode: "0700"}\n'
        "    upstream: host=file.example.com\n"
    )
    settings = load(config_path=str(config), listen=["127.0.0.1:6432"], unix_socket_mode="0770")
    (route,) = settings.routes
    assert route.name == "main"
    assert route.listen == (
        TcpListen("127.0.0.1", 6432),
        UnixListen(str(tmp_path / "sockets"), 6432, 0o770),
    )
    assert route.upstream.host == "file.example.com"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"listen": ["127.0.0.1:7000"]},
        {"unix_sockets": ["/tmp"]},
        {"upstream": "host=db"},
        {"unix_socket_mode": "0700"},
    ],
    ids=["listen", "unix-socket", "upstream", "unix-socket-mode"],
)
def test_flags_are_ambiguous_with_several_routes(kwargs: dict[str, Any]) -> None:
    error = load_error(config_path=str(DATA / "valid" / "two-routes.yaml"), **kwargs)
    assert error.key.startswith("--")
    assert "is ambiguous with 2 routes" in str(error)
    assert "which route" in str(error)


def test_log_flags_work_with_several_routes() -> None:
    settings = load(config_path=str(DATA / "valid" / "two-routes.yaml"), log_level="ERROR")
    assert settings.logging == LogSettings(format="json", level="ERROR")


# (file in tests/data/config/invalid, key, fragments of the message)
INVALID_FILES = [
    ("empty.yaml", "--config", ["the configuration file is empty"]),
    ("not-a-mapping.yaml", "--config", ["must be a mapping of settings, not a list"]),
    ("syntax.yaml", "line 4, column 1", ["invalid YAML"]),
    ("duplicate-key.yaml", "line 4, column 5", ["duplicate key 'upstream' (first at line 3)"]),
    ("duplicate-top-key.yaml", "line 2, column 1", ["duplicate key 'limits'"]),
    ("unknown-top-key.yaml", "timeout", ["unknown key; did you mean timeouts?"]),
    ("unknown-route-key.yaml", "routes[0].upstrem", ["unknown key; did you mean upstream?"]),
    ("unknown-timeout-key.yaml", "timeouts.conect", ["did you mean connect?"]),
    ("unknown-unix-key.yaml", "routes[0].unix_socket[0].perms", ["unknown key"]),
    (
        "unknown-upstream-option.yaml",
        "routes[0].upstream.sslmdoe",
        ["unknown connection option; did you mean sslmode?"],
    ),
    (
        "plaintext-sslmode.yaml",
        "routes[1].upstream.sslmode",
        [
            "routes[1].upstream.sslmode: 'prefer' would allow a plaintext session; the sidecar "
            "never sends data unencrypted (got 'prefer'); use require, verify-ca or verify-full"
        ],
    ),
    ("password.yaml", "routes[0].upstream.password", ["never holds passwords"]),
    ("channel-binding.yaml", "routes[0].upstream.channel_binding", ["can never work"]),
    ("duplicate-route-name.yaml", "routes[1].name", ["already used by routes[0]"]),
    ("unnamed-routes.yaml", "routes[1].name", ["already used by routes[0]", "unique name"]),
    ("same-address.yaml", "routes[1].listen", ["127.0.0.1:5432 is also bound by route 'a'"]),
    ("wildcard-overlap.yaml", "routes[1].listen", ["is also bound by route 'a'"]),
    ("same-unix-socket.yaml", "routes[1].unix_socket", ["/tmp/.s.PGSQL.5432 is also bound"]),
    ("unquoted-mode.yaml", "routes[0].unix_socket[0].mode", ["quoted octal string, not int"]),
    ("routes-not-list.yaml", "routes", ["must be a list of routes, not a mapping"]),
    ("routes-empty.yaml", "routes", ["is an empty list"]),
    ("missing-upstream-multi.yaml", "routes[1].upstream", ["required when the file defines"]),
    ("bad-timeout.yaml", "timeouts.connect", ["must be a positive number of seconds"]),
    ("bad-level.yaml", "logging.level", ["'verbose'", "debug, info, warning, error"]),
    ("bad-limit.yaml", "limits.max_connections", ["not a whole number"]),
    ("listen-wrong-type.yaml", "routes[0].listen[0]", ["must be a string, not a mapping"]),
    ("upstream-wrong-type.yaml", "routes[0].upstream", ["connection string or a mapping"]),
    ("missing-root-file.yaml", "routes[0].upstream.sslrootcert", ["No such file"]),
    ("system-with-verify-ca.yaml", "routes[0].upstream.sslmode", ["sslrootcert=system"]),
    ("bad-route-name.yaml", "routes[0].name", ["not a valid route name", "'my route'"]),
]


@pytest.mark.parametrize(
    ("name", "key", "fragments"), INVALID_FILES, ids=[c[0] for c in INVALID_FILES]
)
def test_invalid_files(name: str, key: str, fragments: list[str]) -> None:
    path = str(DATA / "invalid" / name)
    error = load_error(config_path=path, environ={"PGHOST": "env.example.com"})
    assert error.key == key
    assert error.source == path
    assert str(error).startswith(f"{path}: {key}: ")
    for fragment in fragments:
        assert fragment in str(error)


def test_every_invalid_file_is_in_the_table() -> None:
    assert sorted(p.name for p in (DATA / "invalid").iterdir()) == sorted(
        c[0] for c in INVALID_FILES
    )


def test_password_from_a_file_is_not_echoed() -> None:
    error = load_error(config_path=str(DATA / "invalid" / "password.yaml"))
    assert "Sup3rSecret" not in str(error)


def test_missing_file() -> None:
    error = load_error(config_path="/nonexistent/sidecar.yaml")
    assert error.key == "--config"
    assert "cannot read the configuration file: No such file or directory" in str(error)
    assert "'/nonexistent/sidecar.yaml'" in str(error)


def test_directory_as_config_file(tmp_path: Path) -> None:
    error = load_error(config_path=str(tmp_path))
    assert "cannot read the configuration file: Is a directory" in str(error)


def test_non_utf8_file(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_bytes(b"routes:\n  - upstream: host=caf\xe9\n")
    error = load_error(config_path=str(config))
    assert "not UTF-8" in str(error)


def test_non_string_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("routes:\n  - 1: x\n    upstream: host=db\n")
    error = load_error(config_path=str(config))
    assert error.key == "routes[0]"
    assert "keys must be strings, not int" in str(error)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "routes:\n"
        "  - name: a\n"
        '    listen: "127.0.0.1:0"\n'
        "    upstream: &up {host: a.example.com, sslmode: require}\n"
        "  - name: b\n"
        '    listen: "127.0.0.1:0"\n'
        "    upstream: {<<: *up, host: b.example.com}\n"
    )
    a, b = load(config_path=str(config)).routes
    assert b.upstream == dataclasses.replace(a.upstream, host="b.example.com")


# --- the files shipped in config/


def test_the_example_configuration_loads(tmp_path: Path) -> None:
    example = tmp_path / "sidecar.example.yaml"
    shutil.copy(REPO / "config" / "sidecar.example.yaml", example)
    (tmp_path / "certs").mkdir()
    for name in ("azure-roots.pem", "internal-ca.pem", "client.crt", "client.key"):
        (tmp_path / "certs" / name).write_text("placeholder\n")
    settings = load(config_path=str(example))
    assert [route.name for route in settings.routes] == ["main", "reporting", "private", "mtls"]
    main, reporting, private, mtls = settings.routes
    assert main.listen == (
        TcpListen("127.0.0.1", 5432),
        TcpListen("::1", 5432),
        UnixListen("/var/run/postgresql", 5432, 0o777),
    )
    assert main.upstream.sslrootcert == str(tmp_path / "certs" / "azure-roots.pem")
    assert reporting.upstream.ssl_max_protocol_version == "TLSv1.3"
    assert private.upstream.verify_name == "contoso-private.postgres.database.azure.com"
    assert private.listen[-1] == UnixListen("/tmp/pg-private", 6432, 0o777)
    assert mtls.upstream.sslkey == str(tmp_path / "certs" / "client.key")
    for route in settings.routes:
        assert route.upstream.sslmode in ("verify-full", "verify-ca")


def test_defaults_file_matches_settings(tmp_path: Path) -> None:
    """config/defaults.yaml documents every default; it must say what settings.py does."""
    defaults = REPO / "config" / "defaults.yaml"
    document = yaml.safe_load(defaults.read_text())
    route = document["routes"][0]
    documented = {
        "timeouts": set(document["timeouts"]),
        "limits": set(document["limits"]),
        "logging": set(document["logging"]),
        "upstream": set(route["upstream"]) | {"host"},
    }
    declared = {
        "timeouts": {f.name for f in dataclasses.fields(Timeouts)},
        "limits": {f.name for f in dataclasses.fields(Limits)},
        "logging": {f.name for f in dataclasses.fields(LogSettings)},
        "upstream": {f.name for f in dataclasses.fields(UpstreamSettings)},
    }
    assert documented == declared

    # Loaded with a host, the file gives exactly what no file at all gives.
    route["upstream"]["host"] = "db.example.com"
    with_host = tmp_path / "defaults.yaml"
    with_host.write_text(yaml.safe_dump(document))
    from_file = load(config_path=str(with_host))
    assert dataclasses.replace(from_file, source=None) == load(upstream="host=db.example.com")


def test_defaults_file_runs_with_an_upstream_flag() -> None:
    path = str(REPO / "config" / "defaults.yaml")
    settings = load(config_path=path, upstream="host=db.example.com")
    assert dataclasses.replace(settings, source=None) == load(upstream="host=db.example.com")


def test_defaults_file_alone_asks_for_a_host() -> None:
    error = load_error(config_path=str(REPO / "config" / "defaults.yaml"))
    assert error.key == "routes[0].upstream.host"
    assert "is required" in str(error)


@pytest.mark.parametrize(
    ("upstream_text", "source_is_file", "key"),
    [
        ("host=localhost port=6432", True, "routes[0].upstream"),
        (None, False, "--upstream"),
    ],
    ids=["from-file", "from-flag"],
)
def test_self_loop_names_where_the_upstream_came_from(
    upstream_text: str | None, source_is_file: bool, key: str, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f'routes:\n  - listen: "0.0.0.0:6432"\n    upstream: "{upstream_text or "host=db"}"\n'
    )
    flag = None if upstream_text else "host=127.0.0.1 port=6432"
    error = load_error(config_path=str(config), upstream=flag)
    assert error.key == key
    assert (error.source == str(config)) is source_is_file
    assert "it would connect to itself" in str(error)


def test_refused_upstream_logs_no_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        config_error({"dbname": "postgres", "host": "db", "password": "x"})
    assert [r for r in caplog.records if r.name == "proxy.config"] == []


# --- the admin endpoint


def test_admin_defaults() -> None:
    admin = load(upstream="host=db").admin
    assert admin == AdminSettings()
    assert admin.listen == TcpListen("127.0.0.1", 9432)
    assert admin.readiness_upstream_check is True
    assert admin.readiness_upstream_interval == 30.0
    assert admin.protocol_metrics is True


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("127.0.0.1:0", TcpListen("127.0.0.1", 0)),
        ("9500", TcpListen("127.0.0.1", 9500)),
        ("[::1]:9432", TcpListen("::1", 9432)),
        ("off", None),
        (" OFF ", None),
    ],
)
def test_admin_listen_flag(flag: str, expected: TcpListen | None) -> None:
    assert load(upstream="host=db", admin_listen=flag).admin.listen == expected


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("admin: null\n", AdminSettings()),
        ("admin: {listen: null, readiness: null}\n", AdminSettings()),
        ("admin: {listen: off}\n", AdminSettings(listen=None)),  # YAML reads off as false
        ('admin: {listen: "off"}\n', AdminSettings(listen=None)),
        ("admin: {listen: false}\n", AdminSettings(listen=None)),
        ("admin: {listen: 9555}\n", AdminSettings(listen=TcpListen("127.0.0.1", 9555))),
        (
            'admin: {listen: "0.0.0.0:9432"}\n',
            AdminSettings(listen=TcpListen("0.0.0.0", 9432)),  # noqa: S104 - parsed, not bound
        ),
        (
            "admin:\n  readiness: {upstream_check: false, interval: 2.5}\n"
            "  protocol_metrics: false\n",
            AdminSettings(
                readiness_upstream_check=False,
                readiness_upstream_interval=2.5,
                protocol_metrics=False,
            ),
        ),
    ],
)
def test_admin_section(document: str, expected: AdminSettings, tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(document)
    assert load(config_path=str(config), upstream="host=db").admin == expected


def test_admin_flag_replaces_only_the_address(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text('admin: {listen: "127.0.0.1:9600", readiness: {interval: 5}}\n')
    admin = load(config_path=str(config), upstream="host=db", admin_listen="127.0.0.1:0").admin
    assert admin == AdminSettings(listen=TcpListen("127.0.0.1", 0), readiness_upstream_interval=5)


@pytest.mark.parametrize(
    ("document", "key", "fragment"),
    [
        ("admin: {lisen: x}\n", "admin.lisen", "unknown key; did you mean listen?"),
        ('admin: {listen: "localhost"}\n', "admin.listen", "missing a host or port"),
        ("admin: {listen: [a]}\n", "admin.listen", "must be HOST:PORT or off, not a list"),
        ("admin: {listen: on}\n", "admin.listen", "must be HOST:PORT or off, not a boolean"),
        ("admin: {readiness: {interval: 0}}\n", "admin.readiness.interval", "positive"),
        ("admin: {readiness: {intervall: 5}}\n", "admin.readiness.intervall", "did you mean"),
        ("admin: {readiness: true}\n", "admin.readiness", "must be a mapping"),
        ("admin: {protocol_metrics: maybe}\n", "admin.protocol_metrics", "0 or 1"),
        ("admin: [listen]\n", "admin", "must be a mapping, not a list"),
    ],
)
def test_admin_section_errors(document: str, key: str, fragment: str, tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(document)
    error = load_error(config_path=str(config), upstream="host=db")
    assert error.key == key
    assert error.source == str(config)
    assert fragment in str(error)


@pytest.mark.parametrize("flag", ["nonsense", "127.0.0.1:99999", ":9432"])
def test_admin_listen_flag_errors(flag: str) -> None:
    error = load_error(upstream="host=db", admin_listen=flag)
    assert error.key == "--admin-listen"


@pytest.mark.parametrize(
    ("route_listen", "admin_listen"),
    [
        ("127.0.0.1:9432", None),  # a route on the default admin port
        ("127.0.0.1:6432", "127.0.0.1:6432"),
        ("127.0.0.1:6432", "0.0.0.0:6432"),
        ("[::]:6432", "[::1]:6432"),
    ],
)
def test_admin_address_must_not_be_a_route_listener(
    route_listen: str, admin_listen: str | None
) -> None:
    error = load_error(upstream="host=db", listen=[route_listen], admin_listen=admin_listen)
    assert error.key == ("--admin-listen" if admin_listen else "admin.listen")
    assert "is also bound by route 'default'" in str(error)
    assert "own port" in str(error)


def test_admin_collision_in_a_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text('admin: {listen: "127.0.0.1:6432"}\nroutes:\n  - listen: "6432"\n')
    error = load_error(config_path=str(config), upstream="host=db")
    assert (error.key, error.source) == ("admin.listen", str(config))


@pytest.mark.parametrize(
    ("route_listen", "admin_listen"),
    [
        ("127.0.0.1:9432", "off"),
        ("127.0.0.1:6432", "127.0.0.1:6433"),
        ("127.0.0.1:6432", "127.0.0.2:6432"),
        ("[::]:6432", "127.0.0.1:6432"),  # other address family
        ("127.0.0.1:0", "127.0.0.1:0"),  # ephemeral ports never collide
    ],
)
def test_admin_addresses_that_do_not_collide(route_listen: str, admin_listen: str) -> None:
    load(upstream="host=db", listen=[route_listen], admin_listen=admin_listen)


def test_non_loopback_admin_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        load(upstream="host=db", admin_listen="0.0.0.0:9432")
    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.config"]
    assert len(warnings) == 1
    assert "admin endpoint listens on 0.0.0.0:9432, which is not a loopback address" in warnings[0]


def test_loopback_admin_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        load(upstream="host=db", admin_listen="[::1]:9432")
    assert [r for r in caplog.records if r.name == "proxy.config"] == []


def test_defaults_file_documents_the_admin_section() -> None:
    field_for = {
        "listen": "listen",
        "readiness.upstream_check": "readiness_upstream_check",
        "readiness.interval": "readiness_upstream_interval",
        "protocol_metrics": "protocol_metrics",
    }
    admin = yaml.safe_load((REPO / "config" / "defaults.yaml").read_text())["admin"]
    keys = {name for name in admin if name != "readiness"}
    keys |= {f"readiness.{name}" for name in admin["readiness"]}
    assert keys == set(field_for)
    assert set(field_for.values()) == {f.name for f in dataclasses.fields(AdminSettings)}


def test_example_configuration_admin_section(tmp_path: Path) -> None:
    example = yaml.safe_load((REPO / "config" / "sidecar.example.yaml").read_text())
    config = tmp_path / "admin.yaml"
    config.write_text(yaml.safe_dump({"admin": example["admin"]}))
    assert load(config_path=str(config), upstream="host=db").admin == AdminSettings()
