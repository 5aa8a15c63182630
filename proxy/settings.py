"""The validated, immutable configuration the running sidecar works from.

These dataclasses are the contract between configuration loading (``proxy.config``, which turns
YAML, conninfo strings, command-line flags and ``PG*`` variables into them and rejects anything
invalid) and the rest of the program, which may trust every field: paths were readable, numbers
are in range, enumerations hold one of their allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

SslMode = Literal["require", "verify-ca", "verify-full"]
SslNegotiation = Literal["postgres", "direct"]
TlsVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
LogFormat = Literal["text", "json"]
EventLoopSetting = Literal["auto", "asyncio", "uvloop"]  # auto: uvloop when installed

DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
MAX_WORKERS: Final = 256
DEFAULT_PORT: Final = 5432


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Where and how to reach the TLS-only server, in libpq's vocabulary.

    ``sslrootcert`` is a file path, the literal ``"system"`` (the OS trust store, which like
    libpq forces ``verify-full``), or ``None``: with ``verify-ca``/``verify-full`` that means the
    system store (libpq would look for ``~/.postgresql/root.crt``, which a container never has);
    with ``require`` it means no chain check at all, exactly as libpq does.
    """

    host: str
    port: int = DEFAULT_PORT
    hostaddr: str | None = None  # libpq: connect here, but verify and send SNI for ``host``
    tls_server_name: str | None = None  # sidecar extension: name to verify/SNI instead of host
    sslmode: SslMode = "verify-full"
    sslrootcert: str | None = None
    sslcrl: str | None = None
    sslcrldir: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslpassword: str | None = field(default=None, repr=False)
    sslsni: bool = True
    sslnegotiation: SslNegotiation = "postgres"
    ssl_min_protocol_version: TlsVersion = "TLSv1.2"
    ssl_max_protocol_version: TlsVersion | None = None
    connect_timeout: float | None = None  # None: use Timeouts.connect
    keepalives: bool = True
    keepalives_idle: int = 60  # seconds; Azure's load balancer drops idle flows after ~240 s
    keepalives_interval: int = 10
    keepalives_count: int = 6

    @property
    def verify_name(self) -> str:
        """The name the certificate must carry (and SNI sends) under ``verify-full``."""
        return self.tls_server_name or self.host

    @property
    def connect_host(self) -> str:
        """The address actually dialled."""
        return self.hostaddr or self.host

    def describe(self) -> str:
        """``host:port`` for logs, never with secrets."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TcpListen:
    host: str
    port: int

    def describe(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixListen:
    """A Unix socket created as ``directory/.s.PGSQL.<port>``, as PostgreSQL names it."""

    directory: str
    port: int = DEFAULT_PORT
    mode: int = 0o777  # PostgreSQL's unix_socket_permissions default

    @property
    def path(self) -> str:
        return f"{self.directory.rstrip('/') or '/'}/.s.PGSQL.{self.port}"

    def describe(self) -> str:
        return self.path


Listen = TcpListen | UnixListen

# PostgreSQL's authentication_timeout default (also Azure's): a connection must deliver its
# StartupMessage within this many seconds of being accepted, or the server drops it.
SERVER_AUTHENTICATION_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The opt-in warm TLS pool: upstream connections kept ready up to the TLS handshake.

    A new client then skips the TCP, SSLRequest and TLS round trips. A pooled connection has
    sent no StartupMessage, so the server's ``authentication_timeout`` clock is running on it:
    one older than ``max_age`` seconds is closed and replaced, and ``max_age`` must stay below
    that timeout (60 s by default) or a client could be handed a connection the server is
    about to drop.
    """

    size: int = 0  # 0: no pool
    max_age: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.size > 0


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """One or more local listeners forwarding to one upstream."""

    name: str
    listen: tuple[Listen, ...]
    upstream: UpstreamSettings
    max_connections: int | None = None  # None: only the global limit applies
    pool: PoolSettings = PoolSettings()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. Every wait on a peer is bounded by one of these."""

    connect: float = 10.0  # TCP connect to the upstream
    tls_handshake: float = 10.0  # SSLRequest answer plus the TLS handshake
    startup: float = 10.0  # client must send its startup packet within this
    drain: float = 30.0  # on SIGTERM, how long open sessions may finish


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 200


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: LogFormat = "text"
    level: str = "INFO"


DEFAULT_ADMIN_PORT: Final = 9432  # no common exporter uses it; next to PostgreSQL's 5432


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin HTTP endpoint: metrics, probes, status page and the shutdown hook.

    Loopback by default because the status page names users, databases and client addresses;
    in Kubernetes, where probes and Prometheus reach the pod's IP, it has to be widened.
    """

    listen: TcpListen | None = TcpListen(DEFAULT_LISTEN_HOST, DEFAULT_ADMIN_PORT)  # None: off
    # Ready only if an upstream TLS handshake succeeded within the interval (probing when idle),
    # so a pod whose server or CA bundle is broken is taken out of rotation.
    readiness_upstream_check: bool = True
    readiness_upstream_interval: float = 30.0
    protocol_metrics: bool = True  # per-message metrics: queries, transactions, server errors


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    """When the configuration is re-read besides SIGHUP and ``POST /reload``.

    With ``watch_files`` every file the configuration names (the YAML file itself, CA bundles,
    CRLs, client certificates and keys) is checked every ``interval`` seconds; a change — also
    a Kubernetes ConfigMap/Secret update, which swaps a symlink — triggers a reload.
    """

    watch_files: bool = True
    interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    routes: tuple[RouteSettings, ...]
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    logging: LogSettings = LogSettings()
    admin: AdminSettings = AdminSettings()
    reload: ReloadSettings = ReloadSettings()
    source: str | None = None  # the config file this came from, for messages
    # Read once at start (a reload cannot swap the running loop); see proxy.eventloop.
    event_loop: EventLoopSetting = "auto"
    # Processes relaying sessions; above 1 a supervisor runs that many workers sharing the
    # listening ports with SO_REUSEPORT (see proxy.workers). Read once at start.
    workers: int = 1
