"""Command line: ``pg-tls-sidecar run|demo``; flags, signals and exit codes live here only.

Exit codes (documented in the README):
  0  stopped cleanly (SIGTERM/SIGINT, sessions drained or cut at the drain deadline)
  1  could not start: a listener could not be bound, or an unexpected failure
  2  usage or configuration error (nothing was started)
  3  stopped at once by a second SIGTERM/SIGINT during the drain

SIGHUP re-reads the configuration (see ``Sidecar.reload``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.errors import ConfigError, ListenError

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_CONFIG = 2
EXIT_FORCED = 3

# One variable moves the admin endpoint for both `run` and `wait` (and so the HEALTHCHECK).
ADMIN_ENV = "PG_TLS_SIDECAR_ADMIN_LISTEN"

if TYPE_CHECKING:
    from proxy.settings import Settings
    from proxy.workers import WorkerLink

log = logging.getLogger("proxy.cli")

RUN_EPILOG = """\
examples:
  # one upstream, CA file as downloaded from the portal (DER .cer is fine), verify-full:
  pg-tls-sidecar run --upstream "host=mydb.postgres.database.azure.com sslrootcert=/certs/ca.cer"

  # the connection URI from the Azure portal works as is (user/dbname are the app's business):
  pg-tls-sidecar run --upstream "postgresql://mydb.postgres.database.azure.com:5432/postgres"

  # configuration by environment alone (libpq's variables):
  PGHOST=mydb.postgres.database.azure.com PGSSLROOTCERT=/certs/ca.pem pg-tls-sidecar run

  # several routes, timeouts and limits from a file:
  pg-tls-sidecar run --config /etc/pg-tls-sidecar/sidecar.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-tls-sidecar",
        description="Plaintext PostgreSQL in on localhost, verified TLS out to a managed server.",
    )
    parser.add_argument("--version", action="version", version=f"pg-tls-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the sidecar",
        description="Accept plaintext PostgreSQL connections and forward each over verified TLS.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", metavar="FILE", help="YAML configuration file")
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="TCP address to accept clients on (repeatable; default 127.0.0.1:5432)",
    )
    run.add_argument(
        "--unix-socket",
        metavar="DIR",
        action="append",
        default=[],
        help="also accept clients on DIR/.s.PGSQL.<port>, like a local server (repeatable)",
    )
    run.add_argument(
        "--unix-socket-mode", metavar="MODE", help="permissions of the socket file (default 0777)"
    )
    run.add_argument(
        "--upstream",
        metavar="CONNINFO",
        help="libpq key=value string or postgresql:// URI of the TLS-only server "
        "(default: the PG* environment variables)",
    )
    run.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        default=os.environ.get(ADMIN_ENV) or None,
        help="address of the /metrics, /readyz, /status endpoint (default 127.0.0.1:9432; "
        f"'off' disables it; environment: {ADMIN_ENV})",
    )
    run.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        type=str.lower,
        help="auto (default): uvloop when installed (pip install 'pg-tls-sidecar[uvloop]'), "
        "else the stdlib loop; environment: PG_TLS_SIDECAR_EVENT_LOOP",
    )
    run.add_argument(
        "--workers",
        metavar="N",
        help="worker processes sharing the listening ports with SO_REUSEPORT, for hosts with "
        "more than two cores; auto: one per CPU (default 1: one process); environment: "
        "PG_TLS_SIDECAR_WORKERS",
    )
    # Set by the supervisor when it starts a worker; not for users.
    run.add_argument("--worker-spec", help=argparse.SUPPRESS)
    run.add_argument("--log-format", choices=("text", "json"), help="log format (default text)")
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        type=str.lower,
        help="log level (default info)",
    )

    wait = sub.add_parser(
        "wait",
        help="block until the local sidecar is ready (for entrypoints and HEALTHCHECK)",
        description="Poll the admin endpoint's /readyz until it answers 200.",
        epilog="""\
examples:
  pg-tls-sidecar wait --timeout 30 && exec php-fpm     # start the app once the proxy is ready
  pg-tls-sidecar wait --probe live --timeout 3         # a container HEALTHCHECK

exit codes: 0 ready (or live), 1 not ready before the timeout, 2 usage error""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wait.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=os.environ.get(ADMIN_ENV) or "127.0.0.1:9432",
        help=f"the sidecar's admin address (default ${ADMIN_ENV}, else 127.0.0.1:9432; "
        "a wildcard address is asked on loopback)",
    )
    wait.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds"
    )
    wait.add_argument(
        "--probe",
        choices=("ready", "live", "startup"),
        default="ready",
        help="which probe to wait for (default ready)",
    )

    from proxy.commands import add_subcommands

    add_subcommands(sub)

    demo = sub.add_parser(
        "demo",
        help="start a local TLS-only PostgreSQL, the sidecar, and a plaintext client through it",
        description="A self-contained demonstration; needs the PostgreSQL server binaries.",
        epilog="""\
examples:
  pg-tls-sidecar demo          # keeps running; prints a psql command to try, Ctrl-C to stop
  pg-tls-sidecar demo --once   # for scripts: exit 0 once the plaintext client got through""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--once", action="store_true", help="exit after the client has connected")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _cmd_run(args)
    if args.command in ("check", "ca", "config"):
        from proxy.commands import dispatch
        from proxy.logs import configure_logging

        # The loader's warnings (ignored conninfo options...) as readable lines on stderr.
        configure_logging("text", "warning")
        code = dispatch(args)
        if code is not None:
            return code
    if args.command == "wait":
        return _cmd_wait(args)
    if args.command == "demo":
        from proxy.demo.run import main as demo_main

        return demo_main(once=args.once)
    parser.print_help(sys.stderr)
    return EXIT_CONFIG


def _cmd_wait(args: argparse.Namespace) -> int:
    from proxy.config import parse_listen
    from proxy.wait import wait_ready

    try:
        admin = parse_listen(args.admin, key="--admin")
    except ConfigError as exc:
        print(f"pg-tls-sidecar wait: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    path = {"ready": "/readyz", "live": "/livez", "startup": "/startup"}[args.probe]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(admin.host, admin.host)  # noqa: S104
    return wait_ready(host, admin.port, timeout=args.timeout, path=path)


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.config import load_settings
    from proxy.eventloop import choose_loop
    from proxy.logs import configure_logging
    from proxy.upstream import choose_tls_transport

    link: WorkerLink | None = None
    if args.worker_spec is not None:
        from proxy.workers import WorkerLink, WorkerSpec

        try:
            link = WorkerLink(WorkerSpec.from_json(args.worker_spec))
        except ConfigError as exc:
            print(f"pg-tls-sidecar: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        link.tag_logs()
    # Log in the requested format from the first line: the loader itself warns (ignored options).
    configure_logging(args.log_format or "text", args.log_level or "info")

    in_use: list[Settings] = []

    def load() -> Settings:
        new = load_settings(
            config_path=args.config,
            listen=args.listen,
            unix_sockets=args.unix_socket,
            unix_socket_mode=args.unix_socket_mode,
            upstream=args.upstream,
            admin_listen=args.admin_listen,
            log_format=args.log_format,
            log_level=args.log_level,
            event_loop=args.event_loop,
            workers=args.workers,
            environ=os.environ,
        )
        if link is not None:
            # A worker: its supervisor warns about what a reload cannot change, once.
            from proxy.workers import apply_spec

            return apply_spec(new, link.spec)
        if in_use and new.event_loop != in_use[0].event_loop:
            log.warning(
                "event_loop changed from %s to %s: a running loop cannot be swapped, "
                "the change takes effect at the next start",
                in_use[0].event_loop,
                new.event_loop,
            )
        if in_use and new.workers != in_use[0].workers and in_use[0].workers == 1:
            log.warning(
                "workers changed from 1 to %d: the number of processes changes at the next start",
                new.workers,
            )
        return new

    try:
        settings = load()
        loop_name, loop_factory = choose_loop(settings.event_loop)
        choose_tls_transport(os.environ)
    except ConfigError as exc:
        print(f"pg-tls-sidecar: configuration error: {exc}", file=sys.stderr)
        if link is not None:
            link.report_failed(EXIT_CONFIG, f"configuration error: {exc}")
        return EXIT_CONFIG
    in_use.append(settings)
    configure_logging(settings.logging.format, settings.logging.level)
    if link is None and settings.workers > 1:
        from proxy.workers import supervise

        return supervise(settings, _worker_argv(args), load)
    # SIGHUP, POST /reload and file changes re-run the same load with the same flags.
    # asyncio.Runner rather than asyncio.run: only it takes a loop factory on Python 3.11.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(settings, load, loop_name, link))


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """``run`` with the flags this process was given, for a worker (its spec is added later).

    ``--flag=value``, so a value starting with ``-`` cannot be read as a flag. The environment
    and the working directory are inherited, so relative paths and PG* variables read alike.
    """
    argv = [sys.executable, "-m", "proxy", "run"]
    for flag, values in (("--listen", args.listen), ("--unix-socket", args.unix_socket)):
        argv += [f"{flag}={value}" for value in values]
    for flag, value in (
        ("--config", args.config),
        ("--unix-socket-mode", args.unix_socket_mode),
        ("--upstream", args.upstream),
        ("--admin-listen", args.admin_listen),
        ("--event-loop", args.event_loop),
        ("--log-format", args.log_format),
        ("--log-level", args.log_level),
        ("--workers", args.workers),
    ):
        if value is not None:
            argv.append(f"{flag}={value}")
    return argv


async def _serve(
    settings: Settings, load: Callable[[], Settings], loop_name: str, link: WorkerLink | None
) -> int:
    from proxy.app import Sidecar
    from proxy.logs import log_event
    from proxy.upstream import TLS_TRANSPORT

    sidecar = Sidecar(
        settings,
        reloader=load,
        reuse_port=link is not None,
        inherited=link.inherited if link is not None else None,
    )
    forced = False
    stop_requested = False

    def on_signal(name: str) -> None:
        nonlocal forced, stop_requested
        if not sidecar.started:
            # Still binding: stop as soon as start() returns.
            stop_requested = True
        elif sidecar.draining:
            forced = True
            log.warning("received %s again: closing every session now", name)
            sidecar.force_stop()
        else:
            log.info("received %s: draining (send it again to stop at once)", name)
            sidecar.request_shutdown()

    def on_hangup() -> None:
        if sidecar.started:
            log.info("received SIGHUP: reloading the configuration")
            sidecar.request_reload()
        else:
            log.warning("received SIGHUP while starting: ignored")

    loop = asyncio.get_running_loop()
    loop_class = type(loop)
    log_event(
        log,
        logging.INFO,
        "event_loop",
        f"event loop: {loop_name} (event_loop {settings.event_loop}); "
        f"upstream TLS transport: {TLS_TRANSPORT}",
        loop=loop_name,
        setting=settings.event_loop,
        tls_transport=TLS_TRANSPORT,
        loop_class=f"{loop_class.__module__}.{loop_class.__qualname__}",
    )
    # Handlers first: a signal that arrives while starting must not kill the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await sidecar.start()
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        if link is not None:
            link.report_failed(EXIT_CONFIG, f"configuration error: {exc}")
        return EXIT_CONFIG
    except ListenError as exc:
        log.error("%s", exc)
        if link is not None:
            link.report_failed(EXIT_START_FAILED, str(exc))
        return EXIT_START_FAILED
    watcher: asyncio.Task[None] | None = None
    if link is not None:
        link.report_started(sidecar)
        watcher = loop.create_task(link.watch(sidecar.request_shutdown))
    if stop_requested:
        sidecar.request_shutdown()
    await sidecar.wait_stopped()
    if watcher is not None:
        watcher.cancel()
    return EXIT_FORCED if forced else EXIT_OK
