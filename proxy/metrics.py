"""Counters the relay bumps for free, turned into Prometheus metrics only when scraped.

The relay runs on one event-loop thread, and prometheus-client's own ``Counter`` and
``Histogram`` take a lock on every update. So the hot path adds to plain ints and floats in
``__slots__`` objects (``RouteStats``, ``Histogram``), and a custom collector builds the metric
families from them at scrape time, which is also the only moment certificate expiry needs to be
read. Every dictionary is filled with its complete, fixed set of keys up front: label values can
never come from users (names, SQL, ports), every series exists with 0 from the first scrape
(so ``rate()`` and ``absent()`` work), and a scrape never sees a dictionary change size.

The registry belongs to ``Metrics`` (no global registry), so every test and every sidecar in one
process has its own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, cast

from cryptography import x509
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from proxy.errors import UPSTREAM_ERROR_REASONS

PREFIX: Final = "pg_tls_sidecar_"

CONNECTION_RESULTS: Final = (
    "ok",  # the session ran and ended normally
    "server_rejected",  # the server refused the login (bad password, no such database, ...)
    "upstream_error",  # no trustworthy upstream session could be opened
    "rejected",  # refused by the sidecar itself: see connections_rejected_total
    "cancel",  # a CancelRequest, forwarded
    "client_gone",  # the client left before the session was established
)
REJECT_REASONS: Final = ("limit", "protocol_error", "startup_timeout")
UPSTREAM_ERRORS: Final = tuple(sorted(UPSTREAM_ERROR_REASONS))
TRANSACTION_OUTCOMES: Final = ("commit", "rollback")
CONFIG_RELOAD_RESULTS: Final = ("success", "failure")
POOL_RESULTS: Final = ("hit", "miss")  # a warm pooled connection was handed out, or not

# ErrorResponse severities (the non-localised ``V`` field), pre-initialised; any other value
# (a localised ``S`` from a pre-9.6 server, garbage) is exported as OTHER, as the message
# scanner labels it.
SERVER_ERROR_SEVERITIES: Final = ("ERROR", "FATAL", "PANIC")
OTHER_SEVERITY: Final = "OTHER"
# The error classes of PostgreSQL's errcodes.txt (00, 01 and 02 are not errors). A class
# outside this list, or a malformed SQLSTATE, is exported as XX (internal_error), as the
# message scanner does for a malformed one: the label set stays fixed whatever a server sends.
SQLSTATE_CLASSES: Final = (
    *("03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "22", "23", "24"),
    *("25", "26", "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "40"),
    *("42", "44", "53", "54", "55", "57", "58", "72", "F0", "HV", "P0", "XX"),
)
UNKNOWN_CLASS: Final = "XX"
# How prometheus-client itself writes an ``le`` label ("0.5", "1.0", "+Inf"); untyped upstream.
_le: Final = cast(Callable[[float], str], floatToGoString)
_KNOWN_CLASSES: Final = frozenset(SQLSTATE_CLASSES)
_KNOWN_SEVERITIES: Final = frozenset(SERVER_ERROR_SEVERITIES)

# Upper bounds in seconds. Connecting to a managed server in the same region takes a few ms,
# across regions ~100 ms; a TLS handshake a few round trips; timeouts default to 10 s.
CONNECT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUERY_BUCKETS: Final = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
# Sessions last from a connect-query-disconnect (~10 ms) to a pool's connection (hours).
SESSION_BUCKETS: Final = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class Histogram:
    """A histogram cheap enough for the relay: one bisect and three additions per value."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be increasing and unique, got {bounds!r}")
        self.bounds = tuple(float(bound) for bound in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as the exposition format wants them, ending with ``+Inf``."""
        total = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((_le(bound), float(total)))
        return out


def _zeros(keys: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


class RouteStats:
    """Everything counted for one route (one ``listener`` label value).

    Sessions hold on to their route's object and add to its fields directly; nothing here
    allocates or locks on the relay's path.
    """

    __slots__ = (
        "active",
        "bytes_client_to_server",
        "bytes_server_to_client",
        "ca_certificates",
        "connect_seconds",
        "connections",
        "last_handshake_at",
        "notices",
        "pool_connections",
        "pool_idle",
        "queries",
        "query_seconds",
        "rejected",
        "server_errors",
        "session_seconds",
        "tls",
        "tls_handshake_seconds",
        "transactions",
        "upstream_chain",
        "upstream_errors",
    )

    def __init__(self) -> None:
        self.connections = _zeros(CONNECTION_RESULTS)
        self.active = 0
        self.rejected = _zeros(REJECT_REASONS)
        self.upstream_errors = _zeros(UPSTREAM_ERRORS)
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        self.queries = 0
        self.notices = 0
        self.transactions = _zeros(TRANSACTION_OUTCOMES)
        self.server_errors: dict[tuple[str, str], int] = {
            (severity, cls): 0 for severity in SERVER_ERROR_SEVERITIES for cls in SQLSTATE_CLASSES
        }
        self.connect_seconds = Histogram(CONNECT_BUCKETS)
        self.tls_handshake_seconds = Histogram(CONNECT_BUCKETS)
        self.session_seconds = Histogram(SESSION_BUCKETS)
        self.query_seconds = Histogram(QUERY_BUCKETS)
        self.tls: tuple[str, str] | None = None  # (version, cipher) of the latest handshake
        self.last_handshake_at: float | None = None  # time.monotonic() of the latest handshake
        self.upstream_chain: tuple[x509.Certificate, ...] = ()  # latest server chain, leaf first
        self.ca_certificates: tuple[x509.Certificate, ...] = ()  # configured roots
        self.pool_connections = _zeros(POOL_RESULTS)  # only counted when the pool is on
        self.pool_idle = 0

    def server_error(self, severity: str, sqlstate: str) -> None:
        """Count an ErrorResponse by its ``V`` severity and SQLSTATE."""
        key = _error_labels(severity, sqlstate[:2] if len(sqlstate) == 5 else UNKNOWN_CLASS)
        self.server_errors[key] = self.server_errors.get(key, 0) + 1


def _error_labels(severity: str, cls: str) -> tuple[str, str]:
    """Fold any (severity, class) into the fixed label set."""
    return (
        severity if severity in _KNOWN_SEVERITIES else OTHER_SEVERITY,
        cls if cls in _KNOWN_CLASSES else UNKNOWN_CLASS,
    )


class Metrics:
    """The application's registry and the per-route statistics it exports."""

    def __init__(self, version: str, routes: Sequence[str]) -> None:
        self.version = version
        self._routes: dict[str, RouteStats] = {}
        self.set_routes(routes)
        self.config_reloads = _zeros(CONFIG_RELOAD_RESULTS)
        # Set by the application: () -> (ready, max_connections), read at scrape time.
        self.state: Callable[[], tuple[bool, int]] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    def route(self, name: str) -> RouteStats:
        return self._routes[name]

    @property
    def routes(self) -> dict[str, RouteStats]:
        """Route name to statistics, in configuration order (a copy)."""
        return dict(self._routes)

    def set_routes(self, names: Sequence[str]) -> None:
        """After a configuration reload: routes that stay keep their counters (a counter that
        went back to zero would read as a restart), new ones start at zero, removed ones are no
        longer exported (sessions still running on them keep their own object)."""
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, got {list(names)!r}")
        self._routes = {name: self._routes.get(name) or RouteStats() for name in names}

    def install(self, routes: Mapping[str, RouteStats]) -> None:
        """Export exactly these route statistics (a reload built them, reusing kept routes')."""
        self._routes = dict(routes)

    def exposition(self) -> tuple[bytes, str]:
        """The text format every Prometheus version reads, with its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def _intermediate_expiry(chain: Sequence[x509.Certificate]) -> float | None:
    """The soonest expiry among the chain's intermediates, the one that breaks the chain first.

    Self-signed certificates (a root some servers send along) are not intermediates: roots are
    reported from the configured CA certificates.
    """
    expiries = [
        cert.not_valid_after_utc.timestamp() for cert in chain[1:] if cert.issuer != cert.subject
    ]
    return min(expiries) if expiries else None


class _Collector(Collector):
    """Builds every metric family from ``Metrics`` when the registry is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        routes = self._metrics.routes
        yield from self._connections(routes)
        yield from self._upstream(routes)
        yield from self._traffic(routes)
        yield from self._protocol(routes)
        yield from self._certificates(routes)
        yield from self._process()

    @staticmethod
    def _connections(routes: dict[str, RouteStats]) -> Iterator[Metric]:
        connections = CounterMetricFamily(
            f"{PREFIX}client_connections",
            "Client connections accepted, by how they ended. Alert on a rising share of "
            "upstream_error or rejected.",
            labels=["listener", "result"],
        )
        active = GaugeMetricFamily(
            f"{PREFIX}client_connections_active",
            "Client sessions open now. Alert when close to limits.max_connections.",
            labels=["listener"],
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}connections_rejected",
            "Client connections refused by the sidecar: limit (max_connections reached), "
            "protocol_error (not a PostgreSQL client), startup_timeout. Alert on any limit.",
            labels=["listener", "reason"],
        )
        for name, stats in routes.items():
            for result, value in stats.connections.items():
                connections.add_metric([name, result], value)
            active.add_metric([name], stats.active)
            for reason, value in stats.rejected.items():
                rejected.add_metric([name, reason], value)
        yield from (connections, active, rejected)

    @staticmethod
    def _upstream(routes: dict[str, RouteStats]) -> Iterator[Metric]:
        connect = HistogramMetricFamily(
            f"{PREFIX}upstream_connect_duration_seconds",
            "TCP connect to the upstream server, DNS included. Alert on a rising p99: network "
            "or server trouble.",
            labels=["listener"],
        )
        handshake = HistogramMetricFamily(
            f"{PREFIX}upstream_tls_handshake_duration_seconds",
            "SSLRequest answer plus TLS handshake with the upstream. Alert on a rising p99: an "
            "overloaded server.",
            labels=["listener"],
        )
        errors = CounterMetricFamily(
            f"{PREFIX}upstream_errors",
            "Failures to open a verified upstream session, by reason. Alert on any "
            "tls_verify_failed (certificate or CA bundle problem) and on a rising rate of "
            "the others.",
            labels=["listener", "reason"],
        )
        pool = CounterMetricFamily(
            f"{PREFIX}pool_connections",
            "Upstream connections asked of the warm TLS pool (pool.size > 0), by result: hit "
            "(a warm connection was used) or miss (the client waited for its own handshake). "
            "A rising miss share means pool.size is too small for the connection rate.",
            labels=["listener", "result"],
        )
        idle = GaugeMetricFamily(
            f"{PREFIX}pool_idle_connections",
            "Warm upstream connections ready now (through the TLS handshake, no "
            "StartupMessage). Alert when 0 for minutes with pool.size > 0: the upstream "
            "cannot be reached.",
            labels=["listener"],
        )
        for name, stats in routes.items():
            for result, value in stats.pool_connections.items():
                pool.add_metric([name, result], value)
            idle.add_metric([name], stats.pool_idle)
            connect.add_metric(
                [name], stats.connect_seconds.cumulative(), stats.connect_seconds.sum
            )
            handshake.add_metric(
                [name], stats.tls_handshake_seconds.cumulative(), stats.tls_handshake_seconds.sum
            )
            for reason, value in stats.upstream_errors.items():
                errors.add_metric([name, reason], value)
        yield from (connect, handshake, errors, pool, idle)

    @staticmethod
    def _traffic(routes: dict[str, RouteStats]) -> Iterator[Metric]:
        transferred = CounterMetricFamily(
            f"{PREFIX}bytes",
            "Bytes relayed, by direction (client_to_server, server_to_client). For capacity "
            "planning; a flat line with active sessions means stuck sessions.",
            labels=["listener", "direction"],
        )
        sessions = HistogramMetricFamily(
            f"{PREFIX}session_duration_seconds",
            "Client session length, from accept to close. Many very short sessions mean an "
            "application without a connection pool.",
            labels=["listener"],
        )
        for name, stats in routes.items():
            transferred.add_metric([name, "client_to_server"], stats.bytes_client_to_server)
            transferred.add_metric([name, "server_to_client"], stats.bytes_server_to_client)
            sessions.add_metric(
                [name], stats.session_seconds.cumulative(), stats.session_seconds.sum
            )
        yield from (transferred, sessions)

    @staticmethod
    def _protocol(routes: dict[str, RouteStats]) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            f"{PREFIX}queries",
            "Queries sent by clients, simple and extended protocol. Alert on a drop to zero "
            "while sessions are active.",
            labels=["listener"],
        )
        durations = HistogramMetricFamily(
            f"{PREFIX}query_duration_seconds",
            "Query time seen by the sidecar, from the request to ReadyForQuery. Alert on a "
            "rising p99.",
            labels=["listener"],
        )
        transactions = CounterMetricFamily(
            f"{PREFIX}transactions",
            "Transactions ended, by outcome (commit, rollback), from ReadyForQuery status "
            "changes. Alert on a rising rollback share.",
            labels=["listener", "outcome"],
        )
        errors = CounterMetricFamily(
            f"{PREFIX}server_errors",
            "ErrorResponses from the server, by severity and two-character SQLSTATE class. "
            "Alert on 28 (authentication), 53 (resources), 57 (operator intervention), "
            "58 and XX (server faults), and on any FATAL or PANIC.",
            labels=["listener", "severity", "sqlstate_class"],
        )
        notices = CounterMetricFamily(
            f"{PREFIX}notices",
            "NoticeResponses (warnings and notices) from the server. Informational.",
            labels=["listener"],
        )
        for name, stats in routes.items():
            queries.add_metric([name], stats.queries)
            durations.add_metric([name], stats.query_seconds.cumulative(), stats.query_seconds.sum)
            for outcome, value in stats.transactions.items():
                transactions.add_metric([name, outcome], value)
            # The scanner adds keys it has not seen before; fold them into the fixed set.
            folded: dict[tuple[str, str], int] = {}
            for (severity, cls), value in stats.server_errors.items():
                key = _error_labels(severity, cls)
                folded[key] = folded.get(key, 0) + value
            for (severity, cls), value in folded.items():
                errors.add_metric([name, severity, cls], value)
            notices.add_metric([name], stats.notices)
        yield from (queries, durations, transactions, errors, notices)

    @staticmethod
    def _certificates(routes: dict[str, RouteStats]) -> Iterator[Metric]:
        tls = GaugeMetricFamily(
            f"{PREFIX}upstream_tls_info",
            "TLS version and cipher of the latest upstream handshake (value 1). Alert on a "
            "version older than TLSv1.3 if the server should offer it.",
            labels=["listener", "version", "cipher"],
        )
        upstream = GaugeMetricFamily(
            f"{PREFIX}upstream_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of the server's leaf certificate and of its soonest-expiring "
            "intermediate, from the latest handshake. Alert when less than 14 days away.",
            labels=["listener", "position"],
        )
        roots = GaugeMetricFamily(
            f"{PREFIX}ca_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of each configured CA certificate (sslrootcert), by subject. "
            "Alert when less than 30 days away: the bundle needs its successor root.",
            labels=["listener", "subject"],
        )
        for name, stats in routes.items():
            if stats.tls is not None:
                tls.add_metric([name, *stats.tls], 1)
            chain = stats.upstream_chain
            if chain:
                upstream.add_metric([name, "leaf"], chain[0].not_valid_after_utc.timestamp())
                intermediate = _intermediate_expiry(chain)
                if intermediate is not None:
                    upstream.add_metric([name, "intermediate"], intermediate)
            # One series per subject; a bundle holding two versions of one root (re-issued
            # with the same name) reports the later expiry, the one that keeps working.
            expiries: dict[str, float] = {}
            for cert in stats.ca_certificates:
                subject = cert.subject.rfc4514_string()
                expiry = cert.not_valid_after_utc.timestamp()
                expiries[subject] = max(expiry, expiries.get(subject, expiry))
            for subject, expiry in expiries.items():
                roots.add_metric([name, subject], expiry)
        yield from (tls, upstream, roots)

    def _process(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            f"{PREFIX}config_reloads",
            "Configuration reloads, by result. Alert on any failure: the sidecar keeps "
            "running with the previous configuration.",
            labels=["result"],
        )
        for result, value in self._metrics.config_reloads.items():
            reloads.add_metric([result], value)
        build = GaugeMetricFamily(
            f"{PREFIX}build_info",
            "The running pg-tls-sidecar version (value 1).",
            labels=["version"],
        )
        build.add_metric([self._metrics.version], 1)
        yield from (reloads, build)
        state = self._metrics.state
        if state is not None:
            ready, limit = state()
            yield GaugeMetricFamily(
                f"{PREFIX}ready",
                "1 when /readyz answers 200 (listeners bound, not draining, below "
                "max_connections, upstream handshake recent). Alert when 0 for minutes.",
                value=1 if ready else 0,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}max_connections",
                "The configured limits.max_connections; compare client_connections_active.",
                value=limit,
            )
