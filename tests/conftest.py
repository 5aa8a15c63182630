"""Shared fixtures: a throwaway CA, a TLS-only PostgreSQL, sidecars in threads, and psql.

Everything is real: the cluster is a real PostgreSQL configured like Azure (TLS and SCRAM over
TCP or nothing), the sidecar is the real ``Sidecar`` on its own event loop, and clients are
real drivers and the real ``psql``. The expensive pieces (CA, cluster) are session-scoped; each
test that needs a sidecar starts its own so that its settings and shutdown are its own.

``pytest --event-loop uvloop`` runs every sidecar under test on uvloop instead of the stdlib
loop, so the same tests cover both loops the sidecar can run on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from proxy.demo.cluster import TlsOnlyCluster, find_bindir
from proxy.demo.pki import CertificateAuthority, Issued
from proxy.errors import ConfigError
from proxy.eventloop import choose_loop

if TYPE_CHECKING:
    from proxy.app import Sidecar
    from proxy.settings import Settings

SIDECAR_START_TIMEOUT = 30.0
SIDECAR_STOP_TIMEOUT = 60.0  # the drain deadline plus slack
PSQL_TIMEOUT = 60.0


# -- the event loop the sidecars under test run on -------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop for every sidecar under test (default asyncio, the stdlib loop)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # An explicit choice, never "auto": a run that asked for uvloop must not quietly use asyncio.
    RunningSidecar.event_loop = config.getoption("--event-loop")


def pytest_report_header(config: pytest.Config) -> str:
    name, _ = choose_loop(RunningSidecar.event_loop)
    return f"sidecar event loop: {name}"


# -- the certificate authority and the server --------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The CA clients trust and the certificate the test server presents."""

    ca: CertificateAuthority
    server: Issued


@pytest.fixture(scope="session")
def pki() -> Pki:
    """One CA for the session; the server certificate names localhost, 127.0.0.1 and ::1."""
    ca = CertificateAuthority.create(common_name="pg-tls-sidecar test root CA")
    server = ca.issue_server(
        common_name="localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1", "::1")
    )
    return Pki(ca=ca, server=server)


@dataclass(frozen=True)
class Account:
    """A login on the test server; the password is SCRAM-hashed there."""

    user: str
    password: str
    dbname: str


APP = Account(user="app", password="app-secret-pw", dbname="app")
ADMIN = Account(user="admin", password="admin-secret-pw", dbname="postgres")


@pytest.fixture(scope="session")
def pg(pki: Pki) -> Iterator[TlsOnlyCluster]:
    """A started TLS-only cluster with the ``app`` and ``admin`` (superuser) accounts.

    Its directory comes from ``mkdtemp`` rather than ``tmp_path_factory``: when the tests run as
    root the server runs as ``postgres``, which cannot enter pytest's 0700 base directory.
    """
    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-test-"))
    cluster = TlsOnlyCluster(base, pki.ca, pki.server)
    try:
        cluster.start()
        cluster.create_role(APP.user, APP.password)
        cluster.create_database(APP.dbname, owner=APP.user)
        cluster.create_role(ADMIN.user, ADMIN.password, superuser=True, replication=True)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def app_account() -> Account:
    return APP


@pytest.fixture(scope="session")
def admin_account() -> Account:
    """A superuser with REPLICATION, for tests that need pg_stat_activity of others etc."""
    return ADMIN


@pytest.fixture(scope="session")
def pg_upstream(pg: TlsOnlyCluster) -> str:
    """The sidecar's ``upstream`` conninfo for the test server, verify-full by default."""
    return f"host=localhost port={pg.port} sslrootcert={pg.ca_pem_path}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For fake upstreams: a trusted CA (``ca.cer``, DER), a good certificate and bad ones."""
    d = tmp_path_factory.mktemp("upstream-certs")
    ca = CertificateAuthority.create("hostile-test trusted root")
    other = CertificateAuthority.create("some other root")
    now = dt.datetime.now(dt.UTC)
    issued: dict[str, Issued] = {
        "good": ca.issue_server(),
        "wrong_ca": other.issue_server(),
        "wrong_host": ca.issue_server(
            common_name="db.example.com", dns_names=("db.example.com",), ip_addresses=()
        ),
        "expired": ca.issue_server(
            not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
    }
    out: dict[str, Path] = {}
    for name, item in issued.items():
        crt, key = item.write(d, name)
        out[name + ".crt"] = crt
        out[name + ".key"] = key
    out["ca.cer"] = d / "ca.cer"
    out["ca.cer"].write_bytes(ca.cert_der())
    return out


# -- conninfo -----------------------------------------------------------------------------------


def conninfo(**params: object) -> str:
    """libpq ``key=value`` syntax, quoted by psycopg; parameters that are None are left out."""
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def client_env(password: str | None = None) -> dict[str, str]:
    """The environment for libpq tools: none of the developer's PG* settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env["PGPASSFILE"] = os.devnull
    if password is not None:
        env["PGPASSWORD"] = password
    return env


# -- the sidecar in a thread ----------------------------------------------------------------------


class RunningSidecar:
    """A ``Sidecar`` on its own event loop in a background thread.

    Synchronous clients (psycopg, pg8000, a psql subprocess) can then be used straight from the
    test. Start-up is awaited through a Future, never by sleeping; any exception the sidecar's
    loop raises is re-raised by ``stop()``. The loop is the one ``--event-loop`` names (set on
    the class by ``pytest_configure``), whatever ``settings.event_loop`` says.
    """

    event_loop = "asyncio"

    def __init__(self, settings: Settings, reloader: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.reloader = reloader
        self.loop_name, self._loop_factory = choose_loop(self.event_loop)
        self.sidecar: Sidecar | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: concurrent.futures.Future[list[tuple[str, int] | str]] = (
            concurrent.futures.Future()
        )
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sidecar-under-test", daemon=True)

    def start(self) -> RunningSidecar:
        """Returns once every listener is bound; a start-up error is raised here, once."""
        self._thread.start()
        try:
            self.addresses = self._started.result(timeout=SIDECAR_START_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise AssertionError(
                f"sidecar did not start within {SIDECAR_START_TIMEOUT:.0f} s"
            ) from None
        except BaseException:
            self._thread.join(timeout=SIDECAR_STOP_TIMEOUT)
            self._stopped = True
            self._error = None  # raised here; teardown must not report it a second time
            raise
        return self

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self._loop_factory) as runner:
                runner.run(self._main())
        except BaseException as exc:  # handed to the test thread by stop()
            self._error = exc
            if not self._started.done():
                self._started.set_exception(exc)

    async def _main(self) -> None:
        from proxy.app import Sidecar

        self._loop = asyncio.get_running_loop()
        self.sidecar = Sidecar(self.settings, reloader=self.reloader)
        await self.sidecar.start()
        self._started.set_result(self.sidecar.addresses())
        await self.sidecar.wait_stopped()

    @property
    def tcp_addresses(self) -> list[tuple[str, int]]:
        return [a for a in self.addresses if isinstance(a, tuple)]

    @property
    def host(self) -> str:
        return self.tcp_addresses[0][0]

    @property
    def port(self) -> int:
        return self.tcp_addresses[0][1]

    def conninfo(
        self,
        user: str = APP.user,
        password: str | None = None,
        dbname: str = APP.dbname,
        **extra: object,
    ) -> str:
        """A plaintext (``sslmode=disable``) conninfo for the first TCP listener."""
        return conninfo(
            host=self.host,
            port=self.port,
            user=user,
            password=password,
            dbname=dbname,
            sslmode="disable",
            connect_timeout=10,
            **extra,
        )

    def run_in_loop(self, fn: Callable[[], Any], timeout: float = SIDECAR_STOP_TIMEOUT) -> Any:
        """Call ``fn`` on the sidecar's own loop thread (to read its state safely)."""
        assert self._loop is not None

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def run_coroutine(
        self, factory: Callable[[], Any], timeout: float = SIDECAR_STOP_TIMEOUT
    ) -> Any:
        """Run ``await factory()`` on the sidecar's loop and return its result."""
        assert self._loop is not None

        async def call() -> Any:
            return await factory()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def wait_idle(self, timeout: float = SIDECAR_STOP_TIMEOUT) -> None:
        """Return once every session the sidecar has accepted so far has ended."""
        assert self._loop is not None and self.sidecar is not None
        sidecar = self.sidecar

        async def idle() -> None:
            tasks = list(sidecar.sessions.values())
            if tasks:
                await asyncio.wait(tasks)

        asyncio.run_coroutine_threadsafe(asyncio.wait_for(idle(), timeout), self._loop).result(
            timeout + 5
        )

    def stop(self, drain: float | None = None) -> None:
        """Graceful shutdown (like SIGTERM), then re-raise whatever the loop raised."""
        if not self._stopped:
            self._stopped = True
            if self._thread.is_alive() and self._loop is not None and self.sidecar is not None:
                self._request_shutdown(self._loop, self.sidecar, drain)
            self._thread.join(timeout=SIDECAR_STOP_TIMEOUT)
            if self._thread.is_alive():
                raise AssertionError(
                    f"sidecar thread still running {SIDECAR_STOP_TIMEOUT:.0f} s after shutdown"
                )
        if self._error is not None:
            raise self._error

    @staticmethod
    def _request_shutdown(
        loop: asyncio.AbstractEventLoop, sidecar: Sidecar, drain: float | None
    ) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(sidecar.shutdown(drain=drain), loop)
        except RuntimeError:
            return  # "Event loop is closed": the sidecar already stopped by itself
        # Cancelled: the loop finished (the sidecar stopped by itself) before running it.
        with contextlib.suppress(concurrent.futures.CancelledError):
            future.result(timeout=SIDECAR_STOP_TIMEOUT)


StartSidecar = Callable[..., RunningSidecar]


@pytest.fixture
def start_sidecar() -> Iterator[StartSidecar]:
    """``start_sidecar(upstream, **load_settings_kwargs)`` -> a started ``RunningSidecar``.

    Listens on ``127.0.0.1:0`` unless ``listen=`` says otherwise and reads no environment
    unless ``environ=`` is given. Every sidecar still running at teardown is stopped, and an
    error from any of them fails the test.
    """
    started: list[RunningSidecar] = []

    def start_sidecar(upstream: str | None = None, **kwargs: Any) -> RunningSidecar:
        from proxy.config import load_settings

        kwargs.setdefault("listen", ["127.0.0.1:0"])
        # No admin endpoint (and so no readiness probes) unless a test asks for one.
        kwargs.setdefault("admin_listen", "off")
        kwargs.setdefault("environ", {})
        kwargs.setdefault("config_path", None)
        settings = load_settings(upstream=upstream, **kwargs)
        # A reload re-reads the same sources, as the CLI's SIGHUP does.
        running = RunningSidecar(settings, lambda: load_settings(upstream=upstream, **kwargs))
        started.append(running)
        return running.start()

    yield start_sidecar
    errors = []
    for running in started:
        try:
            running.stop()
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


# -- psql -----------------------------------------------------------------------------------------


def str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


class PsqlResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


Psql = Callable[..., PsqlResult]


@pytest.fixture(scope="session")
def psql_path() -> Path:
    """The server's own psql when the binaries are installed, else the one on PATH.

    Independent of ``pg``: tests against fake servers use psql without starting a cluster.
    """
    try:
        own = find_bindir() / "psql"
    except ConfigError:
        own = None
    if own is not None and own.is_file():
        return own
    found = shutil.which("psql")
    if found is None:
        pytest.fail("psql not found: install the Debian package postgresql-client (./dev does)")
    return Path(found)


@pytest.fixture
def psql(psql_path: Path) -> Psql:
    """``psql(conninfo, sql, password=None, env=None)`` -> (returncode, stdout, stderr).

    Runs ``psql -XAt -c SQL``. The password, given separately or inside ``conninfo``, travels
    in PGPASSWORD and never on the command line, where any local user could read it in ``ps``.
    """

    def run(
        conninfo: str,
        sql: str,
        *,
        password: str | None = None,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> PsqlResult:
        params = conninfo_to_dict(conninfo)
        in_conninfo = params.pop("password", None)
        conninfo = make_conninfo(**params)
        environ = client_env(password if password is not None else str_or_none(in_conninfo))
        if env:
            environ.update(env)
        out = subprocess.run(
            [str(psql_path), "-XAt", "-v", "ON_ERROR_STOP=1", *args, "-d", conninfo, "-c", sql],
            capture_output=True,
            text=True,
            env=environ,
            timeout=PSQL_TIMEOUT,
            check=False,
        )
        return PsqlResult(out.returncode, out.stdout.rstrip("\n"), out.stderr)

    return run
