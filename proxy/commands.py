"""The operator subcommands: ``check``, ``ca convert``, ``ca inspect``, ``config validate``.

Kept out of ``proxy.cli`` so the long-running ``run`` and these one-shot tools do not share a
module: ``cli`` calls :func:`add_subcommands` while building its parser and :func:`dispatch`
after parsing. Each command turns its inputs into the same objects ``run`` uses (``Settings``
from ``proxy.config``, contexts from ``proxy.tls``), so a green ``config validate`` or
``check`` means ``run`` will accept the same thing.

Exit codes (as for ``run``): 0 success, 1 the check failed (or ``ca inspect`` found an expired
or not yet valid certificate), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from cryptography.utils import CryptographyDeprecationWarning

from proxy import ca_tool, doctor, tls
from proxy.config import load_settings, upstream_from_params
from proxy.conninfo import ENVIRONMENT_VARIABLES, params_from_environ, parse_conninfo
from proxy.errors import ConfigError
from proxy.settings import RouteSettings, Settings, Timeouts, UpstreamSettings

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "add_subcommands",
    "check_target",
    "dispatch",
    "validate_config",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2

_PROG: Final = "pg-tls-sidecar"

CHECK_EPILOG: Final = """\
steps: resolve -> tcp -> negotiation (SSLRequest, or direct TLS) -> tls -> chain -> anchor ->
verify. The verdict comes from the sidecar's own connection path; when verification fails, a
second, non-verifying handshake (on which nothing is sent) reads the server's chain to explain
why: wrong CA, host name mismatch, expired certificate.

exit status: 0 the sidecar can connect, 1 the check failed, 2 usage or configuration error.

examples:
  # one route of a configuration file (the only one, or the one named):
  pg-tls-sidecar check --config /etc/pg-tls-sidecar/sidecar.yaml --route main

  # a connection string, CA as downloaded from the portal:
  pg-tls-sidecar check --upstream "host=mydb.postgres.database.azure.com sslrootcert=ca.cer"

  # libpq's environment variables, machine-readable output:
  PGHOST=mydb.postgres.database.azure.com PGSSLROOTCERT=/certs/ca.pem pg-tls-sidecar check --json
"""

CA_EPILOG: Final = """\
examples:
  pg-tls-sidecar ca convert DigiCertGlobalRootG2.crt -o /certs/azure-roots.pem
  pg-tls-sidecar ca inspect /certs/azure-roots.pem
"""

CONVERT_EPILOG: Final = """\
IN may be a DER certificate (.cer/.crt as Azure's portal offers them), PEM (one certificate or
a bundle; anything but certificates, such as keys, is dropped) or PKCS#7 (.p7b, PEM or DER).
The output is PEM, one block per certificate in input order; for a DER input it is byte for
byte what "openssl x509 -inform DER -in IN -out OUT" writes. OUT is replaced atomically, so a
sidecar watching it never reads half a file.

examples:
  # Azure's DER download to the PEM file sslrootcert points at:
  pg-tls-sidecar ca convert "Microsoft RSA Root Certificate Authority 2017.crt" -o ms-root.pem

  # build a bundle of both Azure roots:
  { pg-tls-sidecar ca convert DigiCertGlobalRootG2.crt
    pg-tls-sidecar ca convert "Microsoft RSA Root Certificate Authority 2017.crt"
  } > /certs/azure-roots.pem
"""

INSPECT_EPILOG: Final = """\
Lists every certificate in FILE (PEM bundle, DER or PKCS#7): subject, issuer, kind, validity,
days left, serial and SHA-256 fingerprint, with a warning for certificates that are expired,
not yet valid, or expire within --warn-days days.

exit status: 0 every certificate is currently valid (expiring-soon warnings do not change it),
1 at least one is expired or not yet valid (remove it from the bundle: it can only confuse),
2 the file cannot be read or holds no certificate.

examples:
  pg-tls-sidecar ca inspect /certs/azure-roots.pem
  pg-tls-sidecar ca inspect --warn-days 90 --json /certs/azure-roots.pem
"""

CONFIG_EPILOG: Final = """\
examples:
  pg-tls-sidecar config validate /etc/pg-tls-sidecar/sidecar.yaml
"""

VALIDATE_EPILOG: Final = """\
Runs exactly the checks "run" makes before it listens (the YAML, every key and value, every
referenced file, and an OpenSSL context for each route's CA, CRL and client certificate),
then prints a summary of the routes. Nothing is bound and no server is contacted: use
"pg-tls-sidecar check" for that. As with run, a route without an upstream in the file takes it
from the PG* environment variables.

exit status: 0 valid, 2 invalid (the message names the file, the key or line, and the fix).

examples:
  pg-tls-sidecar config validate /etc/pg-tls-sidecar/sidecar.yaml
  pg-tls-sidecar config validate config/sidecar.example.yaml && systemctl reload pg-tls-sidecar
"""


def add_subcommands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``check``, ``ca`` and ``config`` to the parser whose subparsers ``sub`` is."""
    raw = argparse.RawDescriptionHelpFormatter

    check = sub.add_parser(
        "check",
        help="diagnose the TLS connection to an upstream server, step by step",
        description="Connect to one upstream the way the sidecar does and explain the result.",
        epilog=CHECK_EPILOG,
        formatter_class=raw,
    )
    source = check.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="YAML configuration file")
    source.add_argument(
        "--upstream",
        metavar="CONNINFO",
        help="libpq key=value string or postgresql:// URI (default: the PG* variables)",
    )
    check.add_argument(
        "--route", metavar="NAME", help="the route of --config to check (needed if several)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON document")

    ca = sub.add_parser(
        "ca",
        help="convert and inspect CA certificate files",
        description="Convert and inspect CA certificate files without OpenSSL.",
        epilog=CA_EPILOG,
        formatter_class=raw,
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    ca.set_defaults(ops_parser=ca)
    convert = ca_sub.add_parser(
        "convert",
        help="DER/PEM/PKCS#7 certificate(s) to PEM",
        description="Convert certificates to PEM, the format sslrootcert bundles use.",
        epilog=CONVERT_EPILOG,
        formatter_class=raw,
    )
    convert.add_argument("input", metavar="IN", help="certificate file to read")
    convert.add_argument(
        "-o", "--output", metavar="OUT", help="write the PEM here (default: standard output)"
    )
    inspect = ca_sub.add_parser(
        "inspect",
        help="list the certificates in a file, with expiry warnings",
        description="Show every certificate in a CA bundle and warn about expiry.",
        epilog=INSPECT_EPILOG,
        formatter_class=raw,
    )
    inspect.add_argument("file", metavar="FILE", help="certificate file or bundle")
    inspect.add_argument(
        "--warn-days",
        metavar="N",
        type=_non_negative_int,
        default=ca_tool.DEFAULT_WARN_DAYS,
        help="warn about certificates expiring within N days (default %(default)s)",
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON document")

    config = sub.add_parser(
        "config",
        help="validate a configuration file",
        description="Work with configuration files.",
        epilog=CONFIG_EPILOG,
        formatter_class=raw,
    )
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config.set_defaults(ops_parser=config)
    validate = config_sub.add_parser(
        "validate",
        help="check a configuration file as run would, without starting",
        description="Validate a configuration file exactly as 'run' does, without starting.",
        epilog=VALIDATE_EPILOG,
        formatter_class=raw,
    )
    validate.add_argument("file", metavar="FILE", help="YAML configuration file")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the command ``args`` names and return its exit code; None if it is not ours."""
    command = getattr(args, "command", None)
    if command == "check":
        return _cmd_check(args, os.environ)
    if command == "ca":
        if args.ca_command == "convert":
            return _cmd_convert(args)
        if args.ca_command == "inspect":
            return _cmd_inspect(args)
        args.ops_parser.print_help(sys.stderr)
        return EXIT_CONFIG
    if command == "config":
        if args.config_command == "validate":
            return _cmd_validate(args, os.environ)
        args.ops_parser.print_help(sys.stderr)
        return EXIT_CONFIG
    return None


def _error(command: str, exc: Exception) -> int:
    print(f"{_PROG} {command}: error: {exc}", file=sys.stderr)
    return EXIT_CONFIG


# -- check -------------------------------------------------------------------------------------


def check_target(
    *,
    config_path: str | None,
    route: str | None,
    upstream: str | None,
    environ: Mapping[str, str],
) -> tuple[UpstreamSettings, Timeouts, str]:
    """The upstream to check, the timeouts to use, and how to name it; ``ConfigError`` if the
    arguments do not select exactly one upstream."""
    if route is not None and config_path is None:
        raise ConfigError(
            "--route", "needs --config", value=route, fix="add --config FILE, or drop --route"
        )
    if config_path is not None:
        settings = load_settings(config_path=config_path, environ=environ)
        chosen = _choose_route(settings, route, config_path)
        return chosen.upstream, settings.timeouts, f"route '{chosen.name}' of {config_path}"
    if upstream is not None:
        params = parse_conninfo(upstream, key="--upstream")
        return upstream_from_params(params, key="--upstream"), Timeouts(), "--upstream"
    env_params = params_from_environ(environ)
    if "host" not in env_params and "hostaddr" not in env_params:
        raise ConfigError(
            "upstream",
            "nothing to check",
            fix="give --config FILE [--route NAME], --upstream CONNINFO, or set PGHOST (and "
            "PGSSLROOTCERT, PGSSLMODE, ...)",
        )
    names = {option: variable for variable, option in ENVIRONMENT_VARIABLES.items()}
    up = upstream_from_params(env_params, key="environment", names=names)
    return up, Timeouts(), "the PG* environment"


def _choose_route(settings: Settings, name: str | None, config_path: str) -> RouteSettings:
    names = [r.name for r in settings.routes]
    if name is None:
        if len(settings.routes) == 1:
            return settings.routes[0]
        raise ConfigError(
            "--route",
            f"{config_path} defines {len(names)} routes; which one should be checked?",
            fix=f"add --route with one of: {', '.join(names)}",
        )
    for candidate in settings.routes:
        if candidate.name == name:
            return candidate
    raise ConfigError(
        "--route",
        f"{config_path} has no route of that name",
        value=name,
        fix=f"use one of: {', '.join(names)}",
    )


def _cmd_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    out = sys.stdout
    try:
        up, timeouts, label = check_target(
            config_path=args.config, route=args.route, upstream=args.upstream, environ=environ
        )
    except ConfigError as exc:
        return _error("check", exc)

    def emit(step: doctor.Step) -> None:
        print("\n".join(doctor.render_step(step)), file=out, flush=True)

    if not args.json:
        print(doctor.describe_target(up, label), file=out, flush=True)
    try:
        report = asyncio.run(
            doctor.check_upstream(
                up, timeouts, label=label, emit=(lambda _s: None) if args.json else emit
            )
        )
    except ConfigError as exc:
        return _error("check", exc)
    if args.json:
        json.dump(report.to_json(), out, indent=2)
        out.write("\n")
    else:
        print("\n".join(doctor.render_verdict(report, up)), file=out)
    return EXIT_OK if report.ok else EXIT_FAILED


# -- ca ----------------------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        pem, certs = ca_tool.convert(args.input, args.output)
    except ConfigError as exc:
        return _error("ca convert", exc)
    if args.output is None:
        _write_bytes(sys.stdout, pem)
    else:
        count = f"{len(certs)} certificate{'s' if len(certs) != 1 else ''}"
        print(f"{_PROG} ca convert: wrote {count} to {args.output}", file=sys.stderr)
    return EXIT_OK


def _write_bytes(stream: TextIO, data: bytes) -> None:
    """Exact bytes on a text stream (no newline translation where the platform would do it)."""
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode("ascii"))


def _cmd_inspect(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    try:
        with warnings.catch_warnings():
            # Old roots with non-positive serials (still in system bundles) parse with a
            # deprecation warning per certificate; the listing shows them as they are.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            infos = ca_tool.inspect(args.file, now=now, warn_days=args.warn_days)
    except ConfigError as exc:
        return _error("ca inspect", exc)
    invalid = sum(1 for i in infos if i.status != "valid")
    expiring = sum(1 for i in infos if i.status == "valid" and i.warning)
    if args.json:
        document = {
            "file": args.file,
            "certificates": [i.to_json() for i in infos],
            "invalid": invalid,
            "expiring": expiring,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        count = f"{len(infos)} certificate{'s' if len(infos) != 1 else ''}"
        print(f"{args.file}: {count}")
        for index, info in enumerate(infos):
            print(f"[{index}]")
            print("\n".join(ca_tool.format_certificate(info)))
        print(
            f"summary: {invalid} expired or not yet valid, {expiring} expiring within "
            f"{args.warn_days} days"
        )
    return EXIT_FAILED if invalid else EXIT_OK


# -- config validate ---------------------------------------------------------------------------


def validate_config(path: str, environ: Mapping[str, str]) -> Settings:
    """What ``run`` checks before listening: ``load_settings`` and every route's TLS context."""
    settings = load_settings(config_path=path, environ=environ)
    for index, route in enumerate(settings.routes):
        try:
            tls.build_client_context(route.upstream)
        except ConfigError as exc:
            raise ConfigError(
                f"routes[{index}].upstream.{exc.key}",
                exc.problem,
                value=exc.value,
                fix=exc.fix,
                source=path,
            ) from exc
    return settings


def _cmd_validate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        settings = validate_config(args.file, environ)
    except ConfigError as exc:
        return _error("config validate", exc)
    print("\n".join(_summary(args.file, settings, now=datetime.now(UTC))))
    return EXIT_OK


def _summary(path: str, settings: Settings, *, now: datetime) -> list[str]:
    routes = settings.routes
    lines = [f"{path}: valid, {len(routes)} route{'s' if len(routes) != 1 else ''}"]
    for route in routes:
        up = route.upstream
        listen = ", ".join(item.describe() for item in route.listen)
        lines.append(f"  route {route.name}: {listen} -> {up.describe()}")
        facts = [f"sslmode {tls.effective_sslmode(up)}"]
        if up.sslrootcert == "system" or (up.sslrootcert is None and up.sslmode != "require"):
            facts.append("roots: system trust store")
        elif up.sslrootcert is not None:
            certs = tls.load_certificates(up.sslrootcert)
            facts.append(f"roots: {up.sslrootcert} ({len(certs)})")
        if up.hostaddr:
            facts.append(f"hostaddr {up.hostaddr}")
        if up.tls_server_name:
            facts.append(f"tls_server_name {up.tls_server_name}")
        if up.sslnegotiation == "direct":
            facts.append("direct TLS")
        if up.sslcert:
            facts.append(f"client certificate {up.sslcert}")
        if up.sslcrl or up.sslcrldir:
            facts.append("CRL checked")
        if route.max_connections is not None:
            facts.append(f"max_connections {route.max_connections}")
        lines.append("    " + ", ".join(facts))
        lines += _root_warnings(up, now=now)
    t = settings.timeouts
    lines.append(
        f"  timeouts: connect {t.connect:g} s, tls_handshake {t.tls_handshake:g} s, "
        f"startup {t.startup:g} s, drain {t.drain:g} s; max_connections "
        f"{settings.limits.max_connections}; logging {settings.logging.format} "
        f"{settings.logging.level.lower()}"
    )
    return lines


def _root_warnings(up: UpstreamSettings, *, now: datetime) -> list[str]:
    """Roots that are dead weight or about to be: valid configuration, but worth a look."""
    if up.sslrootcert is None or up.sslrootcert == "system":
        return []
    warnings = []
    for cert in tls.load_certificates(up.sslrootcert):
        info = ca_tool.describe_certificate(cert, now=now)
        if info.warning:
            warnings.append(f'    warning: root "{info.subject}": {info.warning}')
    return warnings
