"""The key share the server asks for: spotted in a real HelloRetryRequest, then offered first.

PostgreSQL up to 17 accepts one key-exchange group (``ssl_ecdh_curve``, ``prime256v1`` by
default) while OpenSSL clients lead with an X25519 share, so every libpq handshake pays a
HelloRetryRequest round trip. These tests use real handshakes: OpenSSL servers in memory for
the parser, TLS servers on sockets for the route, and the test PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest

from proxy.config import load_settings
from proxy.demo.pki import CertificateAuthority
from proxy.errors import UpstreamError
from proxy.metrics import RouteStats
from proxy.route import ConnectionLimiter, RouteRuntime
from proxy.tls import build_client_context
from proxy.upstream import UpstreamConnection
from proxy.wire.tls_hello import GROUP_NAMES, HELLO_RETRY_RANDOM, hello_retry_group
from tests.fake_servers import Conn, FakeUpstream, server_context

WAIT = 20.0
P256, P384, X25519 = 0x0017, 0x0018, 0x001D


def first_flight(
    cert: Path,
    key: Path,
    server_group: str,
    *,
    client_group: str | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """What a real OpenSSL server answers to a real ClientHello, captured from memory BIOs."""
    server = server_context(cert, key, max_version=max_version)
    server.set_ecdh_curve(server_group)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if client_group is not None:
        client.set_ecdh_curve(client_group)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()
    s_in.write(c_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        s.do_handshake()
    return s_out.read()


@pytest.mark.parametrize(
    ("server_group", "expected"),
    [("prime256v1", P256), ("secp384r1", P384), ("X25519", None)],
)
def test_the_group_a_real_server_asks_for(
    certs: dict[str, Path], server_group: str, expected: int | None
) -> None:
    flight = first_flight(certs["good.crt"], certs["good.key"], server_group)
    assert hello_retry_group(flight) == expected
    assert (HELLO_RETRY_RANDOM in flight) == (expected is not None)


def test_no_retry_when_the_offered_share_suits_the_server(certs: dict[str, Path]) -> None:
    flight = first_flight(
        certs["good.crt"], certs["good.key"], "prime256v1", client_group="prime256v1"
    )
    assert flight[5] == 0x02  # a ServerHello...
    assert hello_retry_group(flight) is None  # ...but not a retry request


def test_a_tls12_server_hello_is_not_a_retry(certs: dict[str, Path]) -> None:
    flight = first_flight(
        certs["good.crt"], certs["good.key"], "prime256v1", max_version=ssl.TLSVersion.TLSv1_2
    )
    assert hello_retry_group(flight) is None


def test_every_truncation_is_harmless(certs: dict[str, Path]) -> None:
    """A first read may end anywhere: a prefix gives the group or None, never an exception."""
    flight = first_flight(certs["good.crt"], certs["good.key"], "prime256v1")
    results = {hello_retry_group(flight[:n]) for n in range(len(flight) + 1)}
    assert results == {None, P256}
    assert hello_retry_group(flight[: len(flight) - 1]) in (None, P256)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"N",
        b"\x15\x03\x03\x00\x02\x02\x28",  # a handshake_failure alert
        b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",  # an empty ServerHello
        b"\x16\x03\x03\xff\xff\x02\x00\x00\x26\x03\x03" + HELLO_RETRY_RANDOM,  # no extensions
        bytes(range(256)),
    ],
)
def test_junk_is_not_a_retry(data: bytes) -> None:
    assert hello_retry_group(data) is None


def test_every_named_group_is_one_python_can_offer() -> None:
    for name in GROUP_NAMES.values():
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ecdh_curve(name)


# -- the route learns it, offers it, and forgets it when refused ----------------------------


def _route(upstream: str) -> RouteRuntime:
    settings = load_settings(
        upstream=upstream, listen=["127.0.0.1:0"], admin_listen="off", config_path=None, environ={}
    )
    route_settings = settings.routes[0]
    return RouteRuntime(
        route_settings,
        build_client_context(route_settings.upstream),
        settings,
        ConnectionLimiter(None),
        ConnectionLimiter(None),
        RouteStats(),
    )


async def _dial(route: RouteRuntime) -> UpstreamConnection:
    async with asyncio.timeout(WAIT):
        conn = await route.dial()
    conn.endpoint.close()
    async with asyncio.timeout(WAIT):
        await conn.endpoint.closed
    return conn


def test_the_route_offers_the_group_the_server_asked_for(certs: dict[str, Path]) -> None:
    group = ["prime256v1"]

    def script(conn: Conn) -> None:
        assert conn.recv_exact(8)
        conn.sock.sendall(b"S")
        ctx = server_context(certs["good.crt"], certs["good.key"])
        ctx.set_ecdh_curve(group[0])
        conn.start_tls(ctx)
        conn.drain_tls()

    async def main() -> None:
        with FakeUpstream(script) as fake:
            route = _route(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
            assert route.key_share_group is None
            first = await _dial(route)
            assert first.hello_retry_group == P256
            assert route.key_share_group == "prime256v1"
            second = await _dial(route)
            assert second.hello_retry_group is None  # straight through: no retry round trip

            # The server is reconfigured: P-256 alone is refused, the route falls back at once.
            group[0] = "secp384r1"
            third = await _dial(route)
            assert third.hello_retry_group == P384
            assert route.key_share_group == "secp384r1"
            assert (await _dial(route)).hello_retry_group is None
            assert route.stats.upstream_errors["tls_handshake"] == 0
            refused = [c for c in fake.connections if c.error is not None]
            assert len(refused) == 1 and isinstance(refused[0].error, ssl.SSLError)
            assert len(fake.connections) == 5

    asyncio.run(main())


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_nothing_is_learned_from_files_that_changed_since_load(
    certs: dict[str, Path], tmp_path: Path, change: str
) -> None:
    """The narrowed context is built from the files again: if they are gone or hold other roots
    (a reload is how a new CA takes effect), the route keeps offering every group, unharmed."""
    root = tmp_path / "root.cer"
    root.write_bytes(certs["ca.cer"].read_bytes())

    def script(conn: Conn) -> None:
        assert conn.recv_exact(8)
        conn.sock.sendall(b"S")
        ctx = server_context(certs["good.crt"], certs["good.key"])
        ctx.set_ecdh_curve("prime256v1")
        conn.start_tls(ctx)
        conn.drain_tls()

    async def main() -> None:
        with FakeUpstream(script) as fake:
            route = _route(f"host=localhost port={fake.port} sslrootcert={root}")
            if change == "removed":
                root.unlink()
            else:
                other = CertificateAuthority.create("a root the route was not loaded with")
                root.write_bytes(other.cert_der())
            for _ in range(3):
                conn = await _dial(route)
                assert conn.hello_retry_group == P256  # still asked, still answered
                assert route.key_share_group is None
            assert route.stats.upstream_errors["tls_handshake"] == 0

    asyncio.run(main())


def test_a_real_failure_is_still_reported_after_learning(certs: dict[str, Path]) -> None:
    """The fallback retries once; a server that fails both ways is an ordinary counted error."""
    fail = [False]

    def script(conn: Conn) -> None:
        assert conn.recv_exact(8)
        conn.sock.sendall(b"S")
        ctx = server_context(certs["good.crt"], certs["good.key"])
        ctx.set_ecdh_curve("prime256v1")
        if fail[0]:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("PSK")  # nothing a verifying client accepts
        conn.start_tls(ctx)
        conn.drain_tls()

    async def main() -> None:
        with FakeUpstream(script) as fake:
            route = _route(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
            await _dial(route)
            assert route.key_share_group == "prime256v1"
            fail[0] = True
            with pytest.raises(UpstreamError) as info:
                async with asyncio.timeout(WAIT):
                    await route.dial()
            assert info.value.reason == "tls_handshake"
            assert route.stats.upstream_errors["tls_handshake"] == 1
            assert route.key_share_group is None
            assert len(fake.connections) == 3  # the learned try, then one full retry

    asyncio.run(main())


def test_postgresql_asks_for_prime256v1_and_gets_it_first_time_after(pg_upstream: str) -> None:
    """The real server: PostgreSQL 15's default ssl_ecdh_curve makes libpq-like clients retry."""

    async def main() -> None:
        route = _route(pg_upstream)
        first = await _dial(route)
        assert first.hello_retry_group == P256
        assert route.key_share_group == "prime256v1"
        second = await _dial(route)
        assert second.hello_retry_group is None
        assert second.peer.version == "TLSv1.3"

    asyncio.run(main())
