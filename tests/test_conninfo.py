"""libpq connection strings and PG* variables: tables of inputs, with libpq itself as the oracle."""

from __future__ import annotations

import pytest

from proxy.conninfo import ENVIRONMENT_VARIABLES, params_from_environ, parse_conninfo
from proxy.errors import ConfigError

AZURE_PORTAL = (
    "host=srv.postgres.database.azure.com port=5432 dbname=postgres user=admin sslmode=require"
)

KEYWORD_CASES = [
    pytest.param(
        AZURE_PORTAL,
        {
            "host": "srv.postgres.database.azure.com",
            "port": "5432",
            "dbname": "postgres",
            "user": "admin",
            "sslmode": "require",
        },
        id="azure-portal",
    ),
    pytest.param("", {}, id="empty"),
    pytest.param(" \t\n ", {}, id="only-whitespace"),
    pytest.param("host=db", {"host": "db"}, id="single"),
    pytest.param("host = db  port =\t5433", {"host": "db", "port": "5433"}, id="space-around-eq"),
    pytest.param("host='db example'", {"host": "db example"}, id="quoted-space"),
    pytest.param(r"options='it\'s'", {"options": "it's"}, id="quoted-escaped-quote"),
    pytest.param(r"options='a\\b'", {"options": r"a\b"}, id="quoted-escaped-backslash"),
    pytest.param(r"options=a\ b", {"options": "a b"}, id="unquoted-escaped-space"),
    pytest.param(r"options=a\\b\'c", {"options": r"a\b'c"}, id="unquoted-escapes"),
    pytest.param("options=''", {"options": ""}, id="quoted-empty"),
    pytest.param("host=db options=", {"host": "db", "options": ""}, id="empty-at-end"),
    # libpq skips whitespace after '=', so the next pair becomes the value (a known trap).
    pytest.param("host= port=5432", {"host": "port=5432"}, id="space-after-eq-swallows"),
    pytest.param("host='db'port=5", {"host": "db", "port": "5"}, id="quote-then-key"),
    pytest.param("options=-cfoo=bar", {"options": "-cfoo=bar"}, id="eq-in-value"),
    pytest.param(
        "application_name='caf\u00e9 app'", {"application_name": "caf\u00e9 app"}, id="unicode"
    ),
    pytest.param("  host=db\n sslmode=verify-full\n", {"host": "db", "sslmode": "verify-full"}),
]

URI_CASES = [
    pytest.param(
        "postgresql://u:p@[::1]:5433/db?sslmode=require&application_name=x%20y",
        {
            "user": "u",
            "password": "p",
            "host": "::1",
            "port": "5433",
            "dbname": "db",
            "sslmode": "require",
            "application_name": "x y",
        },
        id="full",
    ),
    pytest.param("postgres://db.example.com", {"host": "db.example.com"}, id="short-prefix"),
    pytest.param("postgresql://", {}, id="nothing"),
    pytest.param("postgresql://db:6432", {"host": "db", "port": "6432"}, id="host-port"),
    pytest.param("postgresql://db/", {"host": "db"}, id="empty-dbname"),
    pytest.param("postgresql:///postgres?host=db", {"dbname": "postgres", "host": "db"}),
    pytest.param("postgresql://[2001:db8::7]", {"host": "2001:db8::7"}, id="ipv6"),
    pytest.param(
        "postgresql://[fe80::1%25eth0]:5432", {"host": "fe80::1%eth0", "port": "5432"}, id="zone"
    ),
    pytest.param(
        "postgresql://us%40er:p%3Aw%2Fd@db",
        {"user": "us@er", "password": "p:w/d", "host": "db"},
        id="percent-credentials",
    ),
    pytest.param("postgresql://:secret@db", {"password": "secret", "host": "db"}),
    pytest.param("postgresql://admin@db", {"user": "admin", "host": "db"}, id="user-only"),
    pytest.param(
        "postgresql://db?application_name=caf%C3%A9",
        {"host": "db", "application_name": "caf\u00e9"},
    ),
    pytest.param("postgresql://db?ssl=true", {"host": "db", "sslmode": "require"}, id="jdbc-ssl"),
    pytest.param(
        "postgresql://a:1,b:2/d", {"host": "a,b", "port": "1,2", "dbname": "d"}, id="multi-host"
    ),
    pytest.param(
        "postgresql://db?sslrootcert=%2Fetc%2Fssl%2Froot.pem&sslmode=verify-full",
        {"host": "db", "sslrootcert": "/etc/ssl/root.pem", "sslmode": "verify-full"},
    ),
    pytest.param("postgresql://db?sslmode=require&", {"host": "db", "sslmode": "require"}),
    pytest.param(
        "  postgresql://db?sslmode=require\n",
        {"host": "db", "sslmode": "require"},
        id="yaml-block-scalar",
    ),
]


@pytest.mark.parametrize(("text", "expected"), KEYWORD_CASES + URI_CASES)
def test_parses_like_libpq(text: str, expected: dict[str, str]) -> None:
    assert parse_conninfo(text) == expected


@pytest.mark.parametrize(("text", "expected"), KEYWORD_CASES + URI_CASES)
def test_libpq_agrees(text: str, expected: dict[str, str]) -> None:
    """The expectations above are libpq's own reading, checked through psycopg's libpq."""
    conninfo = pytest.importorskip("psycopg.conninfo")
    assert conninfo.conninfo_to_dict(text.strip()) == expected


# (text, fragments the message must contain)
ERROR_CASES = [
    pytest.param("host", ['missing "=" after "host"', "position 5"], id="no-eq"),
    pytest.param("host db", ['missing "=" after "host"', "position 6"], id="no-eq-before-word"),
    pytest.param("=db", ['"=" without an option name', "position 1"], id="no-name"),
    pytest.param("host='db", ['unterminated quoted value for "host"', "position 6"]),
    pytest.param("host='db\\'", ["unterminated quoted value"], id="escaped-closing-quote"),
    pytest.param("host=a host=b", ['option "host" is given twice', "libpq would silently"]),
    pytest.param("postgresql://a/?host=b", ['option "host" is given twice'], id="uri-dup"),
    pytest.param("postgresql://u@h?user=v", ['option "user" is given twice'], id="uri-dup-user"),
    pytest.param("postgresql://[::1", ['missing "]"', "position 14"], id="open-bracket"),
    pytest.param("postgresql://[]:5432", ['empty IPv6 address "[]"'], id="empty-brackets"),
    pytest.param(
        "postgresql://[::1]x", ['unexpected character "x" at position 19'], id="after-bracket"
    ),
    pytest.param("postgresql://db/%zz", ["invalid percent-encoding at position 17"]),
    pytest.param("postgresql://db/%4", ["invalid percent-encoding"], id="short-percent"),
    pytest.param("postgresql://db/a%00b", ["forbidden %00"], id="nul-percent"),
    pytest.param("postgresql://db/%C3", ["not valid UTF-8"], id="bad-utf8"),
    pytest.param("postgresql://db?sslmode", ['missing "=" in the URI query parameter']),
    pytest.param("postgresql://db?a=b=c", ['a second "=" in the URI query parameter']),
    pytest.param("postgresql://db?=x", ["empty option name"], id="empty-query-name"),
    pytest.param("postgresql://db/my db", ["space in the connection URI at position 19", "%20"]),
    pytest.param("host=a\0b", ["NUL character at position 7"], id="nul"),
]


@pytest.mark.parametrize(("text", "fragments"), ERROR_CASES)
def test_malformed_strings_say_where(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_conninfo(text, key="routes[2].upstream")
    message = str(caught.value)
    assert message.startswith("routes[2].upstream: ")
    assert caught.value.key == "routes[2].upstream"
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "text",
    [
        "password=Sup3rSecret host=a host=b",
        "password='Sup3rSecret",
        "postgresql://admin:Sup3rSecret@[::1",
        "postgresql://admin:Sup3rSecret@db?password=x",
        "postgresql://admin:Sup3rSecret@db/%zz",
    ],
)
def test_errors_never_echo_a_password(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_conninfo(text)
    assert "Sup3rSecret" not in str(caught.value)
    assert caught.value.value is None


def test_default_key_names_the_upstream() -> None:
    with pytest.raises(ConfigError, match=r"^upstream: missing"):
        parse_conninfo("host")


def test_environment_reads_libpq_variables_only() -> None:
    environ = {
        "PGHOST": "srv.postgres.database.azure.com",
        "PGHOSTADDR": "10.0.0.4",
        "PGPORT": "6432",
        "PGSSLMODE": "verify-ca",
        "PGSSLROOTCERT": "/etc/ssl/root.pem",
        "PGSSLCRL": "/etc/ssl/crl.pem",
        "PGSSLCRLDIR": "/etc/ssl/crls",
        "PGSSLCERT": "/etc/ssl/client.crt",
        "PGSSLKEY": "/etc/ssl/client.key",
        "PGSSLSNI": "0",
        "PGSSLNEGOTIATION": "direct",
        "PGSSLMINPROTOCOLVERSION": "TLSv1.3",
        "PGSSLMAXPROTOCOLVERSION": "TLSv1.3",
        "PGCONNECT_TIMEOUT": "7",
        # The application's business, never the sidecar's:
        "PGUSER": "admin",
        "PGPASSWORD": "Sup3rSecret",
        "PGDATABASE": "postgres",
        "PGAPPNAME": "app",
        "PGSSLPASSWORD": "x",
        "HOME": "/root",
    }
    assert params_from_environ(environ) == {
        "host": "srv.postgres.database.azure.com",
        "hostaddr": "10.0.0.4",
        "port": "6432",
        "sslmode": "verify-ca",
        "sslrootcert": "/etc/ssl/root.pem",
        "sslcrl": "/etc/ssl/crl.pem",
        "sslcrldir": "/etc/ssl/crls",
        "sslcert": "/etc/ssl/client.crt",
        "sslkey": "/etc/ssl/client.key",
        "sslsni": "0",
        "sslnegotiation": "direct",
        "ssl_min_protocol_version": "TLSv1.3",
        "ssl_max_protocol_version": "TLSv1.3",
        "connect_timeout": "7",
    }


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {}),
        ({"PGHOST": "db"}, {"host": "db"}),
        ({"PGHOST": "db", "PGSSLMODE": ""}, {"host": "db"}),
        ({"PGHOST": ""}, {}),
        ({"pghost": "db"}, {}),
    ],
    ids=["nothing", "host", "empty-is-unset", "empty-host", "case-sensitive"],
)
def test_environment_edge_cases(environ: dict[str, str], expected: dict[str, str]) -> None:
    assert params_from_environ(environ) == expected


def test_every_variable_names_a_libpq_option() -> None:
    """Each variable maps to the option libpq's PQconninfoOptions gives it."""
    psycopg = pytest.importorskip("psycopg")
    libpq_env = {
        option.envvar.decode(): option.keyword.decode()
        for option in psycopg.pq.Conninfo.get_defaults()
        if option.envvar
    }
    for variable, option in ENVIRONMENT_VARIABLES.items():
        assert libpq_env[variable] == option
