"""The operator subcommands through argparse: help, exit codes, output, error messages.

``proxy.cli`` wires these in; here a parser built the same way (``dest="command"``) drives
``add_subcommands`` and ``dispatch`` directly, so the tests do not depend on the rest of the CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from proxy import commands
from proxy.demo.pki import CertificateAuthority
from tests.fake_servers import FakeUpstream, server_context
from tests.test_doctor import tls_script

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "config"


class Result(NamedTuple):
    code: int | None
    out: str
    err: str


Cli = Callable[..., Result]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg-tls-sidecar")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run")
    commands.add_subcommands(sub)
    return parser


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``cli("ca", "inspect", path)`` -> (exit code, stdout, stderr); no PG* variable leaks in."""
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)

    def run(*argv: str) -> Result:
        try:
            code = commands.dispatch(build_parser().parse_args(argv))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def good_server(certs: dict[str, Path]) -> Iterator[tuple[FakeUpstream, str]]:
    ctx = server_context(certs["good.crt"], certs["good.key"], alpn=["postgresql"])
    with FakeUpstream(tls_script(ctx)) as fake:
        yield fake, f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}"


@pytest.fixture
def wrong_host_server(certs: dict[str, Path]) -> Iterator[tuple[FakeUpstream, str]]:
    ctx = server_context(certs["wrong_host.crt"], certs["wrong_host.key"], alpn=["postgresql"])
    with FakeUpstream(tls_script(ctx)) as fake:
        yield fake, f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}"


# -- wiring and help -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("check", "--help"),
        ("ca", "--help"),
        ("ca", "convert", "--help"),
        ("ca", "inspect", "--help"),
        ("config", "--help"),
        ("config", "validate", "--help"),
    ],
    ids=lambda argv: "-".join(argv[:-1]),
)
def test_every_subcommand_has_help_with_examples(cli: Cli, argv: tuple[str, ...]) -> None:
    result = cli(*argv)
    assert result.code == 0
    assert "examples:\n  " in result.out  # the epilog's layout survives (raw formatter)
    assert "  pg-tls-sidecar " + argv[0] in result.out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("check", "--help"), "exit status: 0 the sidecar can connect, 1 the check failed"),
        (("ca", "inspect", "--help"), "1 at least one is expired or not yet valid"),
        (("ca", "convert", "--help"), 'openssl x509 -inform DER -in IN -out OUT"'),
        (("config", "validate", "--help"), "exit status: 0 valid, 2 invalid"),
    ],
)
def test_help_documents_exit_codes_and_formats(
    cli: Cli, argv: tuple[str, ...], expected: str
) -> None:
    result = cli(*argv)
    assert expected in " ".join(result.out.split())


def test_dispatch_leaves_other_commands_alone() -> None:
    assert commands.dispatch(argparse.Namespace(command="run")) is None
    assert commands.dispatch(argparse.Namespace()) is None


@pytest.mark.parametrize("group", ["ca", "config"])
def test_group_without_action_prints_help_and_exits_2(cli: Cli, group: str) -> None:
    result = cli(group)
    assert result.code == 2
    assert f"usage: pg-tls-sidecar {group}" in result.err


# -- check -----------------------------------------------------------------------------------


def test_check_upstream_success_prints_each_step(
    cli: Cli, good_server: tuple[FakeUpstream, str]
) -> None:
    _fake, conninfo = good_server
    result = cli("check", "--upstream", conninfo)
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("checking --upstream: localhost:")
    badges = [line[:19] for line in lines if line.startswith("[")]
    assert badges == [
        "[ ok ] resolve     ",
        "[ ok ] tcp         ",
        "[ ok ] negotiation ",
        "[ ok ] tls         ",
        "[info] chain       ",
        "[ ok ] anchor      ",
        "[ ok ] verify      ",
    ]
    assert lines[-1].startswith("OK: ")


def test_check_json_failure_is_one_document(
    cli: Cli, wrong_host_server: tuple[FakeUpstream, str]
) -> None:
    _fake, conninfo = wrong_host_server
    result = cli("check", "--json", "--upstream", conninfo)
    assert result.code == 1
    document = json.loads(result.out)
    assert document["ok"] is False
    assert document["failure"]["step"] == "verify"
    assert document["failure"]["reason"] == "tls_verify_failed"
    assert document["failure"]["diagnosis"][0]["problem"] == "host_mismatch"
    assert document["chain"][0]["names"] == ["db.example.com"]
    assert document["chain_source"] == "diagnostic"
    assert [s["step"] for s in document["steps"]][-1] == "verify"
    assert document["target"]["verify_name"] == "localhost"


def test_check_a_route_of_a_config_file(
    cli: Cli, tmp_path: Path, good_server: tuple[FakeUpstream, str]
) -> None:
    _fake, conninfo = good_server
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "timeouts: {connect: 3}\n"
        "routes:\n"
        "  - name: other\n"
        '    listen: "127.0.0.1:0"\n'
        "    upstream: host=unused.example.com\n"
        "  - name: db\n"
        '    listen: "127.0.0.1:0"\n'
        f'    upstream: "{conninfo}"\n'
    )
    result = cli("check", "--config", str(config), "--route", "db")
    assert result.code == 0, result.out + result.err
    assert result.out.startswith(f"checking route 'db' of {config}: localhost:")

    ambiguous = cli("check", "--config", str(config))
    assert ambiguous.code == 2
    assert "defines 2 routes" in ambiguous.err and "other, db" in ambiguous.err

    unknown = cli("check", "--config", str(config), "--route", "nope")
    assert unknown.code == 2
    assert "--route: " in unknown.err and "'nope'" in unknown.err and "other, db" in unknown.err


def test_check_from_pg_environment(
    cli: Cli,
    certs: dict[str, Path],
    good_server: tuple[FakeUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _ = good_server
    monkeypatch.setenv("PGHOST", "localhost")
    monkeypatch.setenv("PGPORT", str(fake.port))
    monkeypatch.setenv("PGSSLROOTCERT", str(certs["ca.cer"]))
    result = cli("check")
    assert result.code == 0, result.out + result.err
    assert result.out.startswith("checking the PG* environment: localhost:")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("check",), "nothing to check"),
        (("check", "--route", "main"), "--route: needs --config"),
        (("check", "--upstream", "host=db.example.com sslmode=prefer"), "sslmode"),
        (("check", "--upstream", "host=db.example.com password=x"), "never holds passwords"),
        (("check", "--config", "/nonexistent/sidecar.yaml"), "/nonexistent/sidecar.yaml"),
        (("check", "--config", "a.yaml", "--upstream", "host=x"), "not allowed with argument"),
    ],
    ids=["nothing", "route-without-config", "plaintext", "password", "no-file", "both"],
)
def test_check_usage_and_configuration_errors_exit_2(
    cli: Cli, argv: tuple[str, ...], expected: str
) -> None:
    result = cli(*argv)
    assert result.code == 2
    assert expected in result.err
    assert result.out == ""


def test_check_refused_exits_1(cli: Cli) -> None:
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        result = cli("check", "--upstream", f"host=127.0.0.1 port={port}")
    assert result.code == 1
    assert "[FAIL] tcp" in result.out
    assert 'FAILED at step "tcp" (reason refused)' in result.out


# -- ca --------------------------------------------------------------------------------------


def test_ca_convert_to_stdout_matches_openssl(
    tmp_path: Path,
    certs: dict[str, Path],
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    expected = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(certs["ca.cer"])],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    code = commands.dispatch(build_parser().parse_args(["ca", "convert", str(certs["ca.cer"])]))
    out, err = capsysbinary.readouterr()
    assert code == 0
    assert out == expected
    assert err == b""


def test_ca_convert_to_file(cli: Cli, tmp_path: Path, certs: dict[str, Path]) -> None:
    out = tmp_path / "root.pem"
    result = cli("ca", "convert", str(certs["ca.cer"]), "-o", str(out))
    assert result.code == 0
    assert result.out == ""
    assert f"wrote 1 certificate to {out}" in result.err
    assert out.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\n")


def test_ca_convert_bad_input_names_the_file(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.cer"
    bad.write_bytes(b"\x30\x82\x01")
    result = cli("ca", "convert", str(bad))
    assert result.code == 2
    assert str(bad) in result.err
    assert result.err.startswith("pg-tls-sidecar ca convert: error: ca convert IN: ")


@pytest.fixture
def bundle_with_expired_root(tmp_path: Path) -> Path:
    now = dt.datetime.now(dt.UTC)
    current = CertificateAuthority.create("Current Root")
    expired = CertificateAuthority.create(
        "Expired Root",
        not_before=now - dt.timedelta(days=3000),
        not_after=now - dt.timedelta(days=200),
    )
    path = tmp_path / "roots.pem"
    path.write_bytes(current.cert_pem() + expired.cert_pem())
    return path


def test_ca_inspect_expired_root_exits_1(cli: Cli, bundle_with_expired_root: Path) -> None:
    result = cli("ca", "inspect", str(bundle_with_expired_root))
    assert result.code == 1
    assert result.out.startswith(f"{bundle_with_expired_root}: 2 certificates\n[0]\n")
    assert "subject      CN=Current Root" in result.out
    assert "WARNING      EXPIRED on " in result.out
    assert result.out.rstrip().endswith(
        "summary: 1 expired or not yet valid, 0 expiring within 30 days"
    )


def test_ca_inspect_json_and_warn_days(cli: Cli, bundle_with_expired_root: Path) -> None:
    result = cli("ca", "inspect", "--json", "--warn-days", "400", str(bundle_with_expired_root))
    assert result.code == 1
    document = json.loads(result.out)
    assert [c["status"] for c in document["certificates"]] == ["valid", "expired"]
    assert document["certificates"][0]["warning"].startswith("expires in 36")  # a year's validity
    assert (document["invalid"], document["expiring"]) == (1, 1)


def test_ca_inspect_all_valid_exits_0(cli: Cli, certs: dict[str, Path]) -> None:
    result = cli("ca", "inspect", str(certs["ca.cer"]))
    assert result.code == 0
    assert "kind         root CA" in result.out


def test_ca_inspect_missing_file_exits_2(cli: Cli, tmp_path: Path) -> None:
    result = cli("ca", "inspect", str(tmp_path / "missing.pem"))
    assert result.code == 2
    assert "missing.pem" in result.err and "No such file" in result.err


def test_ca_inspect_rejects_negative_warn_days(cli: Cli, certs: dict[str, Path]) -> None:
    result = cli("ca", "inspect", "--warn-days", "-1", str(certs["ca.cer"]))
    assert result.code == 2
    assert "must be 0 or more" in result.err


# -- config validate -------------------------------------------------------------------------


def example_config(tmp_path: Path, *, placeholder: str | None = None) -> Path:
    """config/sidecar.example.yaml with the certificate files it names really present."""
    example = tmp_path / "sidecar.example.yaml"
    shutil.copy(REPO / "config" / "sidecar.example.yaml", example)
    ca = CertificateAuthority.create("Example Root")
    client = ca.issue_client("app")
    certs_dir = tmp_path / "certs"
    client.write(certs_dir, "client")
    (certs_dir / "azure-roots.pem").write_bytes(ca.cert_pem())
    (certs_dir / "internal-ca.pem").write_bytes(ca.cert_pem())
    if placeholder is not None:
        (certs_dir / placeholder).write_text("placeholder\n")
    return example


def test_validate_the_example_configuration(cli: Cli, tmp_path: Path) -> None:
    example = example_config(tmp_path)
    result = cli("config", "validate", str(example))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"{example}: valid, 4 routes"
    routes = [line.split(":")[0].strip() for line in lines if line.startswith("  route ")]
    assert routes == ["route main", "route reporting", "route private", "route mtls"]
    assert "-> contoso-main.postgres.database.azure.com:5432" in result.out
    assert f"roots: {tmp_path / 'certs' / 'azure-roots.pem'} (1)" in result.out
    assert "tls_server_name contoso-private.postgres.database.azure.com" in result.out
    assert f"client certificate {tmp_path / 'certs' / 'client.crt'}" in result.out


@pytest.mark.parametrize(
    ("placeholder", "key"),
    [
        ("azure-roots.pem", "routes[0].upstream.sslrootcert"),
        ("client.key", "routes[3].upstream.sslkey"),
    ],
)
def test_validate_builds_every_tls_context(
    cli: Cli, tmp_path: Path, placeholder: str, key: str
) -> None:
    """Files that exist but are not what they claim: only the TLS layer can tell, and run
    would refuse to start, so validate must too."""
    example = example_config(tmp_path, placeholder=placeholder)
    if placeholder == "client.key":
        os.chmod(tmp_path / "certs" / "client.key", 0o600)
    result = cli("config", "validate", str(example))
    assert result.code == 2
    assert result.out == ""
    assert f"{example}: {key}: " in result.err
    assert placeholder in result.err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("syntax.yaml", "line "),
        ("unknown-top-key.yaml", "timeout"),
        ("missing-root-file.yaml", "routes[0].upstream.sslrootcert"),
        ("plaintext-sslmode.yaml", "sslmode"),
    ],
)
def test_validate_broken_files_exit_2_naming_file_and_key(
    cli: Cli, name: str, expected: str
) -> None:
    path = DATA / "invalid" / name
    result = cli("config", "validate", str(path))
    assert result.code == 2
    assert str(path) in result.err
    assert expected in result.err
    assert result.out == ""


def test_validate_warns_about_an_expired_root_but_passes(cli: Cli, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    dead = CertificateAuthority.create(
        "Dead Root", not_before=now - dt.timedelta(days=900), not_after=now - dt.timedelta(days=3)
    )
    live = CertificateAuthority.create("Live Root")
    (tmp_path / "roots.pem").write_bytes(live.cert_pem() + dead.cert_pem())
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "routes:\n  - name: main\n    upstream: host=db.example.com sslrootcert=roots.pem\n"
    )
    result = cli("config", "validate", str(config))
    assert result.code == 0
    assert 'warning: root "CN=Dead Root": EXPIRED on ' in result.out
    assert "Live Root" not in result.out
