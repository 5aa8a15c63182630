"""A throwaway PostgreSQL that refuses plaintext, the way Azure Database for PostgreSQL does.

The sidecar exists because managed servers reject every non-TLS connection; testing it against a
server that quietly accepts plaintext would prove nothing. So this cluster listens on loopback
with ``ssl=on`` and a ``pg_hba.conf`` that rejects ``hostnossl`` and requires SCRAM over
``hostssl``; the only way in without TLS is the Unix socket, which stands in for the cloud
provider's admin path and is used here to create roles and databases.

PostgreSQL refuses to run as root, and tests in containers usually are root: then every server
process runs as the ``postgres`` OS user, which must own the data directory and the key file.
The postmaster is a direct child of this process (no ``pg_ctl`` daemonising) so that it can be
stopped by pid, dies with the process that started it (``setpriv --pdeathsig``), and is stopped
by a finalizer at interpreter exit if nobody called ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from proxy.demo.pki import CertificateAuthority, Issued
from proxy.errors import ConfigError, SidecarError

SERVER_OS_USER: Final = "postgres"  # the Debian package's account, used only when we are root
SUPERUSER: Final = "postgres"  # bootstrap superuser name, the same whoever runs initdb
START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 15.0
_POLL_INTERVAL: Final = 0.02  # waiting on the server's own readiness flag, not on a guess
_PORT_ATTEMPTS: Final = 5  # a free port can be taken between probing it and binding it
_CONF_NAME: Final = "tls_only.conf"  # included from postgresql.conf, rewritten on each start

_HBA: Final = """\
# Like Azure Database for PostgreSQL: TLS and SCRAM or nothing over TCP.
# TYPE     DATABASE     USER  ADDRESS       METHOD
local      all          all                 trust
hostssl    all          all   127.0.0.1/32  scram-sha-256
hostssl    all          all   ::1/128       scram-sha-256
hostssl    replication  all   127.0.0.1/32  scram-sha-256
hostssl    replication  all   ::1/128       scram-sha-256
hostnossl  all          all   0.0.0.0/0     reject
hostnossl  all          all   ::/0          reject
"""


class ClusterError(SidecarError):
    """The test/demo PostgreSQL could not be set up, started, or asked to do something.

    Carries the failing command's stderr (or the server log's tail) in the message, because
    PostgreSQL's own words are what explain the problem.
    """


def find_bindir(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``initdb``, ``postgres`` and ``psql`` live.

    ``PG_BINDIR`` wins so a developer can test against another major version; then
    ``pg_config`` (on Debian it comes with ``libpq-dev`` and may point at a directory without
    a server, hence the ``initdb`` check); then the newest ``/usr/lib/postgresql/*/bin``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("PG_BINDIR")
    if explicit:
        if (Path(explicit) / "initdb").is_file():
            return Path(explicit)
        raise ConfigError(
            "PG_BINDIR",
            "no initdb in this directory",
            value=explicit,
            fix="point it at a PostgreSQL server's bin directory, or unset it",
        )
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise ConfigError(
        "PG_BINDIR",
        "no PostgreSQL server binaries (initdb, postgres) found via PG_BINDIR, pg_config "
        "--bindir or /usr/lib/postgresql/*/bin",
        fix="install the server (Debian: apt-get install postgresql postgresql-client) "
        "or set PG_BINDIR",
    )


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (-1,)


def ipv6_loopback_available() -> bool:
    """Containers often run without IPv6; listening on ``::1`` there would fail the start."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _free_port(hosts: Sequence[str]) -> int:
    """A port free on every listen address (the server binds them all to one port)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        if all(_port_free(host, port) for host in hosts[1:]):
            return port
    raise ClusterError(f"could not find a TCP port free on all of {', '.join(hosts)}")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): only quotes need doubling.
    return "'" + value.replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    """The caller's ``PG*`` variables (PGHOST, PGPASSWORD, ...) must not steer our tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _stop_postmaster(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT), escalating to immediate (SIGQUIT) and SIGKILL if it hangs.

    A module-level function so the finalizer holds no reference to the cluster object.
    """
    for sig, timeout in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class TlsOnlyCluster:
    """One PostgreSQL cluster under ``base_dir``, TLS-only over TCP, trusted over its socket.

    Layout: ``data/`` (PGDATA), ``tls/`` (server certificate and key, readable by the server
    only), ``run/`` (the Unix socket), ``ca.pem`` and ``ca.cer`` (what clients trust) and
    ``postgres.log``. When running as root, ``base_dir`` is handed to the ``postgres`` user and
    its parents must be searchable by it: a ``tempfile.mkdtemp()`` directory works, pytest's
    ``tmp_path`` (under a 0700 ``/tmp/pytest-of-root``) does not.
    """

    host: Final = "127.0.0.1"

    def __init__(self, base_dir: Path, ca: CertificateAuthority, server: Issued) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.ca = ca
        self.server = server
        self.bindir = find_bindir()
        self.data_dir = self.base_dir / "data"
        self.tls_dir = self.base_dir / "tls"
        self.socket_dir = self.base_dir / "run"
        self.ca_pem_path = self.base_dir / "ca.pem"
        self.ca_der_path = self.base_dir / "ca.cer"
        self.log_path = self.base_dir / "postgres.log"
        self.listen_addresses: tuple[str, ...] = (
            ("127.0.0.1", "::1") if ipv6_loopback_available() else ("127.0.0.1",)
        )
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], TlsOnlyCluster] | None = None
        self._as_root = os.geteuid() == 0
        self._server_ids = self._lookup_server_user() if self._as_root else None

    # -- paths and commands -------------------------------------------------------------------

    @property
    def psql_path(self) -> Path:
        """The cluster's own psql, else the Debian wrapper; both speak to any server version."""
        own = self.bindir / "psql"
        return own if own.is_file() else Path(shutil.which("psql") or "/usr/bin/psql")

    def _lookup_server_user(self) -> tuple[int, int]:
        try:
            entry = pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            raise ClusterError(
                f"running as root, but there is no {SERVER_OS_USER!r} OS user to run PostgreSQL "
                "as (PostgreSQL refuses to run as root); install the Debian 'postgresql' "
                "package, which creates it, or run as a normal user"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _as_server(self, argv: Sequence[str], *, pdeathsig: bool = False) -> list[str]:
        """Prefix that runs ``argv`` as the server's OS user (and ties it to our lifetime)."""
        prefix: list[str] = []
        setpriv = shutil.which("setpriv")
        if self._server_ids is not None:
            if setpriv is None:
                raise ClusterError(
                    "running as root needs setpriv (Debian package util-linux) to start "
                    f"PostgreSQL as the {SERVER_OS_USER!r} user"
                )
            prefix = [setpriv, f"--reuid={SERVER_OS_USER}", f"--regid={SERVER_OS_USER}"]
            prefix.append("--init-groups")
        elif pdeathsig and setpriv is not None:
            prefix = [setpriv]
        # The parent-death signal fires when the *thread* that forked exits, so only a
        # cluster started from the main thread gets it; the finalizer still covers the rest.
        if prefix and pdeathsig and threading.current_thread() is threading.main_thread():
            prefix.append("--pdeathsig=INT")
        return [*prefix, "--", *argv] if prefix else list(argv)

    def _chown(self, path: Path) -> None:
        if self._server_ids is not None:
            os.chown(path, *self._server_ids)

    def _run(self, argv: Sequence[str], what: str, *, stdin: str | None = None) -> str:
        try:
            out = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=60,
                env=_clean_env(),
                cwd=self.base_dir,  # the caller's cwd may be unreadable for the postgres user
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"{what} failed: {exc}") from exc
        if out.returncode != 0:
            raise ClusterError(
                f"{what} failed (exit {out.returncode}): {out.stderr.strip() or out.stdout}"
            )
        return out.stdout

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """initdb, configure, start; returns once the server accepts connections."""
        if self._proc is not None:
            raise ClusterError(f"cluster in {self.base_dir} is already running")
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._write_tls_files(self.server)
        (self.data_dir / "pg_hba.conf").write_text(_HBA)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = _free_port(self.listen_addresses)
            self._write_conf()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._spawn_and_wait()
            except ClusterError:
                lost_race = "could not bind" in self.log_text()[log_offset:]
                if not lost_race or attempt == _PORT_ATTEMPTS:
                    raise
            else:
                return

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base_dir)  # mkdtemp() makes it 0700: the server must get through it
        for directory, mode in ((self.tls_dir, 0o700), (self.socket_dir, 0o755)):
            directory.mkdir(exist_ok=True)
            directory.chmod(mode)
            self._chown(directory)
        if self._server_ids is not None:
            # Fail with a useful message instead of initdb's "Permission denied".
            probe = self._as_server(["test", "-w", str(self.tls_dir)])
            if subprocess.run(probe, check=False, cwd="/").returncode != 0:
                raise ClusterError(
                    f"the {SERVER_OS_USER!r} user cannot reach {self.base_dir}: a parent "
                    "directory is not searchable by it; use a directory from "
                    "tempfile.mkdtemp() instead of one under a 0700 directory"
                )
        self.ca_pem_path.write_bytes(self.ca.root_pem())
        self.ca_der_path.write_bytes(self.ca.root.cert_der())

    def _initdb(self) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.data_dir)
        self._run(
            self._as_server(
                [
                    str(self.bindir / "initdb"),
                    f"--pgdata={self.data_dir}",
                    f"--username={SUPERUSER}",
                    "--auth-local=trust",
                    "--auth-host=reject",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\ninclude '{_CONF_NAME}'\n")

    def _write_tls_files(self, issued: Issued) -> None:
        cert_path, key_path = issued.write(self.tls_dir, "server", key_mode=0o600, fullchain=True)
        (self.tls_dir / "ca.pem").write_bytes(self.ca.root_pem())
        for path in (cert_path, key_path, self.tls_dir / "ca.pem"):
            self._chown(path)

    def _write_conf(self) -> None:
        settings = {
            "listen_addresses": ",".join(self.listen_addresses),
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "ssl": "on",
            "ssl_cert_file": str(self.tls_dir / "server.crt"),
            "ssl_key_file": str(self.tls_dir / "server.key"),
            "ssl_ca_file": str(self.tls_dir / "ca.pem"),
            "ssl_min_protocol_version": "TLSv1.2",
            "password_encryption": "scram-sha-256",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "32MB",
            "max_wal_senders": "4",
            "log_destination": "stderr",
            "logging_collector": "off",
            "log_connections": "on",
            "log_disconnections": "on",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
        }
        lines = [f"{key} = {_quote_literal(value)}" for key, value in settings.items()]
        (self.data_dir / _CONF_NAME).write_text(
            "# Rewritten by proxy.demo.cluster on every start.\n" + "\n".join(lines) + "\n"
        )

    def _spawn_and_wait(self) -> None:
        argv = self._as_server(
            [str(self.bindir / "postgres"), "-D", str(self.data_dir)], pdeathsig=True
        )
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=self.base_dir,
                start_new_session=True,  # a Ctrl-C meant for the test runner must not reach it
            )
        self._finalizer = weakref.finalize(self, _stop_postmaster, self._proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            returncode = self._proc.poll()
            if returncode is not None:
                self._forget_process()
                raise ClusterError(
                    f"postgres exited during startup (exit {returncode}); "
                    f"server log {self.log_path}:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ClusterError(
                    f"postgres did not become ready within {START_TIMEOUT:.0f} s; "
                    f"server log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _ready(self) -> bool:
        """The postmaster writes ``ready`` into line 8 of postmaster.pid (what pg_ctl -w reads)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return (
            len(lines) >= 8
            and self._proc is not None
            and lines[0].strip() == str(self._proc.pid)
            and lines[7].strip() == "ready"
        )

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._proc = None
        self._finalizer = None

    def stop(self) -> None:
        """Fast shutdown: open sessions are disconnected. Safe to call any number of times."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_postmaster at most once
        self._forget_process()

    @property
    def postmaster_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- administration -----------------------------------------------------------------------

    def admin_sql(self, sql: str, *, dbname: str = "postgres") -> str:
        """Runs ``sql`` as the superuser over the Unix socket; returns psql's unaligned output.

        The SQL goes in on stdin, so passwords in it never show up in ``ps``.
        """
        argv = [
            str(self.psql_path),
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        return self._run(argv, f"psql as {SUPERUSER} over {self.socket_dir}", stdin=sql).rstrip(
            "\n"
        )

    def create_role(
        self, name: str, password: str, *, superuser: bool = False, replication: bool = False
    ) -> None:
        """A login role whose password is stored as SCRAM (password_encryption is set so)."""
        options = ["LOGIN", "SUPERUSER" if superuser else "NOSUPERUSER"]
        options.append("REPLICATION" if replication else "NOREPLICATION")
        self.admin_sql(
            f"CREATE ROLE {_quote_ident(name)} {' '.join(options)} "
            f"PASSWORD {_quote_literal(password)};"
        )

    def create_database(self, name: str, owner: str) -> None:
        self.admin_sql(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)};")

    def replace_server_certificate(self, issued: Issued) -> None:
        """Swaps the server's certificate and reloads; returns once new connections present it.

        PostgreSQL re-reads its TLS files on SIGHUP (what ``pg_ctl reload`` sends), but
        asynchronously; waiting until a handshake shows the new certificate makes callers
        (CA-rotation tests) deterministic.
        """
        if self._proc is None:
            raise ClusterError("replace_server_certificate needs a running cluster; call start()")
        self._write_tls_files(issued)
        self.server = issued
        self._proc.send_signal(signal.SIGHUP)
        expected = issued.cert_der()
        deadline = time.monotonic() + START_TIMEOUT
        while self.presented_certificate() != expected:
            if time.monotonic() > deadline:
                raise ClusterError(
                    "the server still presents the old certificate after a reload; "
                    f"server log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def presented_certificate(self) -> bytes | None:
        """The DER leaf the server sends right now (SSLRequest, then an unverified handshake).

        Unverified on purpose: this only looks at what is offered, it trusts nothing.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
            if sock.recv(1) != b"S":
                return None
            with context.wrap_socket(sock) as tls:
                return tls.getpeercert(binary_form=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
