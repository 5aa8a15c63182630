"""A route at run time: its settings plus what is built from them once.

Sessions keep the ``RouteRuntime`` they started with, so a configuration reload (which builds
new ones) never changes an open session's TLS context or timeouts. Connection slots are kept
in a ``ConnectionLimiter`` per route *name* that outlives reloads, so limits stay exact while old
and new sessions overlap. A route with ``pool.size > 0`` owns a ``WarmPool``; it lives and dies
with this object (the application starts it when the route goes live and closes it when a
reload replaces the route), so a reload never hands out a connection made with an old CA.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

from cryptography import x509

from proxy import tls
from proxy.errors import ConfigError, UpstreamError
from proxy.logs import log_event
from proxy.metrics import RouteStats
from proxy.pool import WarmPool
from proxy.settings import RouteSettings, Settings
from proxy.upstream import UpstreamConnection, connect_upstream
from proxy.wire.tls_hello import GROUP_NAMES

log = logging.getLogger("proxy.route")


class ConnectionLimiter:
    """Counts sessions against a ``max_connections`` (``None``: no cap of its own)."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.active = 0

    def full(self) -> bool:
        return self.limit is not None and self.active >= self.limit


class RouteRuntime:
    """A route's settings plus what is built from them once: the TLS context, the counters.

    It also remembers how the upstream last answered — readiness and the status page use it —
    which is why every upstream connection (sessions, cancels, probes) goes through
    ``connect()``.
    """

    __slots__ = (
        "_global",
        "_key_share",
        "_key_share_frozen",
        "_last_chain_der",
        "context",
        "last_error",
        "last_ok",
        "last_peer",
        "name",
        "pool",
        "protocol_metrics",
        "settings",
        "slots",
        "stats",
        "timeouts",
    )

    def __init__(
        self,
        settings: RouteSettings,
        context: ssl.SSLContext,
        parent: Settings,
        limiter: ConnectionLimiter,
        slots: ConnectionLimiter,
        stats: RouteStats,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.context = context
        self.timeouts = parent.timeouts
        self.protocol_metrics = parent.admin.protocol_metrics
        self._global = limiter
        self.slots = slots
        slots.limit = settings.max_connections
        self.stats = stats
        self.last_ok: float | None = None  # monotonic time of the last verified handshake
        self.last_error: str | None = None
        self.last_peer: tls.PeerInfo | None = None
        self._last_chain_der: tuple[bytes, ...] = ()
        # The key-share group the server asked for (HelloRetryRequest), and a context offering
        # only it; None until the server asks, and again after it refuses (see dial()).
        self._key_share: tuple[str, ssl.SSLContext] | None = None
        self._key_share_frozen = False  # the context could not be prepared: do not try again
        stats.ca_certificates = _configured_roots(settings)
        self.pool: WarmPool | None = None
        if settings.pool.enabled:
            self.pool = WarmPool(self.name, settings.pool, self.dial, stats)

    async def connect(self) -> UpstreamConnection:
        """A verified upstream connection: a warm one from the pool if there is one, else new.

        Sessions and cancel requests both come through here; the pooled connection has sent
        nothing yet, so the caller's StartupMessage or CancelRequest is its first message.
        """
        pool = self.pool
        if pool is not None:
            conn = pool.take()
            if conn is not None:
                return conn
        return await self.dial()

    async def dial(self) -> UpstreamConnection:
        """Open a new verified upstream connection, recording timings, TLS facts and failures.

        The pool's connections are dialled here too, so their handshakes count for readiness.
        """
        learned = self._key_share
        up = self.settings.upstream
        try:
            if learned is None:
                conn = await self._connect(self.context)
            else:
                conn = await connect_upstream(up, learned[1], self.timeouts)
        except UpstreamError as exc:
            if learned is None:
                raise  # counted by _connect
            if exc.reason != "tls_handshake":
                self._count_failure(exc)
                raise
            # The server no longer takes the group it asked for before (its configuration
            # changed): forget it and try once more offering everything. Not counted as an
            # upstream error: the retry below is the connection the caller gets, or the error.
            if self._key_share is learned:
                self._key_share = None
            log_event(
                log,
                logging.WARNING,
                "tls_key_share_refused",
                "the TLS handshake offering only the key-share group the upstream server had "
                "asked for failed; offering every group again",
                route=self.name,
                group=learned[0],
                error=str(exc),
            )
            conn = await self._connect(self.context)
        retry_group = conn.hello_retry_group
        if retry_group is not None and self._key_share is None and not self._key_share_frozen:
            self._learn_key_share(retry_group)
        stats = self.stats
        stats.connect_seconds.observe(conn.connect_seconds)
        stats.tls_handshake_seconds.observe(conn.handshake_seconds)
        peer = conn.peer
        stats.tls = (peer.version, peer.cipher)
        if peer.chain_der != self._last_chain_der:  # parse only when the server's chain changes
            self._last_chain_der = peer.chain_der
            stats.upstream_chain = tuple(x509.load_der_x509_certificate(d) for d in peer.chain_der)
        self.last_ok = stats.last_handshake_at = time.monotonic()
        self.last_error = None
        self.last_peer = peer
        return conn

    async def _connect(self, context: ssl.SSLContext) -> UpstreamConnection:
        try:
            return await connect_upstream(self.settings.upstream, context, self.timeouts)
        except UpstreamError as exc:
            self._count_failure(exc)
            raise

    def _count_failure(self, exc: UpstreamError) -> None:
        self.stats.upstream_errors[exc.reason] += 1
        self.last_error = str(exc)

    def _learn_key_share(self, group: int) -> None:
        """Offer the group the server asked for from now on: one round trip less per handshake.

        The context is built again from the route's files. It is an optimisation: if they can
        no longer be read, or the roots in them changed since the route was loaded (a reload is
        how a new CA takes effect), every group stays offered and this is not tried again.
        """
        name = GROUP_NAMES.get(group)
        if name is None:
            return
        try:
            context = tls.key_share_context(self.settings.upstream, name)
        except (ConfigError, OSError) as exc:
            self._key_share_unavailable(name, str(exc))
            return
        if context is None:
            return  # this OpenSSL cannot offer that group alone
        if _roots(context) != _roots(self.context):
            self._key_share_unavailable(
                name, "the roots in sslrootcert changed since the route was loaded; reload"
            )
            return
        self._key_share = (name, context)
        log_event(
            log,
            logging.INFO,
            "tls_key_share_learned",
            f"the upstream server asks for key-share group {name} (TLS HelloRetryRequest); new "
            "connections offer it first, saving a network round trip each",
            route=self.name,
            group=name,
        )

    def _key_share_unavailable(self, name: str, why: str) -> None:
        self._key_share_frozen = True
        log_event(
            log,
            logging.WARNING,
            "tls_key_share_not_learned",
            f"the upstream server asks for key-share group {name}, but a TLS context offering "
            f"it first could not be prepared ({why}); every group stays offered",
            route=self.name,
            group=name,
        )

    @property
    def key_share_group(self) -> str | None:
        """The key-share group offered alone, once learned; ``None`` while every group is."""
        return None if self._key_share is None else self._key_share[0]

    def acquire_slot(self) -> Callable[[], None] | None:
        """Take one connection slot, or return ``None`` when a limit is reached."""
        if self._global.full() or self.slots.full():
            return None
        glob, mine = self._global, self.slots
        glob.active += 1
        mine.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                glob.active -= 1
                mine.active -= 1

        return release

    @property
    def active(self) -> int:
        return self.slots.active

    def at_limit(self) -> bool:
        return self.slots.full()

    def limit_description(self) -> str:
        if self.slots.full():
            return f"route {self.name!r} allows max_connections={self.slots.limit}"
        return f"the sidecar allows max_connections={self._global.limit}"


def _roots(context: ssl.SSLContext) -> list[bytes]:
    return context.get_ca_certs(binary_form=True)


def _configured_roots(settings: RouteSettings) -> tuple[x509.Certificate, ...]:
    path = settings.upstream.sslrootcert
    if path is None or path == "system":
        return ()
    return tuple(tls.load_certificates(path))
