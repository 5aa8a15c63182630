"""Backpressure: a peer that stops reading must not make the sidecar buffer without bound.

The relay must pause reading one leg while the other leg's write buffer is full. These tests
make one side stall for real (a client that never reads a 400 MB result from PostgreSQL; a server
that stops reading during a COPY flood) and then look inside the running sidecar: the stalled
direction's buffer stays below a small bound and the opposite leg has stopped reading.
"""

from __future__ import annotations

import socket
import struct
import threading

import psycopg
import pytest

from proxy.endpoint import Endpoint
from tests.fake_servers import (
    AUTH_OK,
    READY_IDLE,
    Conn,
    FakeUpstream,
    read_startup,
    server_context,
)

# Loopback socket buffers (a few MB) absorb part of the stream; what the sidecar itself holds
# must stay near asyncio's write-buffer high-water mark, far below the data in flight.
SIDECAR_BUFFER_BOUND = 4 * 1024 * 1024
WAIT_SECONDS = 60.0


@pytest.fixture
def relay_paused(monkeypatch: pytest.MonkeyPatch) -> dict[str, threading.Event]:
    """Events set when the relay pauses reading the client or the upstream leg.

    Spies on ``Endpoint._pause_reading`` so the test waits for the event itself, not a delay.
    Only pauses made while relaying (the endpoint has a sink) count as backpressure.
    """
    events = {"client": threading.Event(), "upstream": threading.Event()}
    original = Endpoint._pause_reading

    def spy(self: Endpoint) -> None:
        original(self)
        if self.sink is not None:
            events[self.name].set()

    monkeypatch.setattr(Endpoint, "_pause_reading", spy)
    return events


def _only_session(sc):
    sessions = list(sc.sidecar.sessions)
    return sessions[0] if len(sessions) == 1 else None


def _buffered(endpoint: Endpoint | None) -> int:
    assert endpoint is not None and endpoint.transport is not None
    return endpoint.transport.get_write_buffer_size()


def _reading(endpoint: Endpoint | None) -> bool:
    assert endpoint is not None and endpoint.transport is not None
    return endpoint.transport.is_reading()


def test_client_that_stops_reading_pauses_the_server_leg(start_sidecar, pg, relay_paused) -> None:
    sc = start_sidecar(f"host=localhost port={pg.port} sslrootcert={pg.ca_der_path}")
    conn = psycopg.connect(sc.conninfo(user="app", password="app-secret-pw", dbname="app"))
    try:
        # 400 rows of 1 MB: far more than any buffer; sent without ever reading the result.
        conn.pgconn.send_query(b"select repeat('x', 1000000) from generate_series(1, 400)")
        conn.pgconn.flush()

        assert relay_paused["upstream"].wait(WAIT_SECONDS)
        assert sc.run_in_loop(lambda: _reading(_only_session(sc).upstream)) is False
        held = sc.run_in_loop(lambda: _buffered(_only_session(sc).client))
        assert isinstance(held, int)
        assert held < SIDECAR_BUFFER_BOUND
        relayed = sc.run_in_loop(lambda: _only_session(sc).upstream.bytes_in)
        assert isinstance(relayed, int) and relayed < 100 * 1024 * 1024
    finally:
        conn.pgconn.finish()  # close without draining the result


def test_copy_flood_against_stalled_server_pauses_the_client_leg(
    start_sidecar, certs, relay_paused
) -> None:
    ctx = server_context(certs["good.crt"], certs["good.key"])
    release = threading.Event()

    def stalling_server(conn: Conn) -> None:
        conn.recv_exact(8)
        conn.sock.sendall(b"S")
        tls = conn.start_tls(ctx)
        read_startup(tls)
        tls.sendall(AUTH_OK + READY_IDLE)
        release.wait(WAIT_SECONDS)  # a server that has stopped reading

    with FakeUpstream(stalling_server) as fake:
        sc = start_sidecar(f"host=localhost port={fake.port} sslrootcert={certs['ca.cer']}")
        client = socket.create_connection((sc.host, sc.port), timeout=WAIT_SECONDS)
        try:
            body = b"user\0app\0database\0app\0\0"
            client.sendall(struct.pack("!II", 8 + len(body), 196608) + body)
            got = b""
            while not got.endswith(READY_IDLE):
                got += client.recv(4096)
            chunk = b"d" + struct.pack("!I", 4 + 65536) + b"x" * 65536
            flooder_sent = [0]

            def flood() -> None:
                # Blocks for good once every buffer is full; ends when the socket is closed.
                try:
                    for _ in range(8000):  # 500 MB, never reached
                        client.sendall(chunk)
                        flooder_sent[0] += len(chunk)
                except OSError:
                    pass

            flooder = threading.Thread(target=flood, daemon=True)
            flooder.start()

            assert relay_paused["client"].wait(WAIT_SECONDS)
            assert sc.run_in_loop(lambda: _reading(_only_session(sc).client)) is False
            held = sc.run_in_loop(lambda: _buffered(_only_session(sc).upstream))
            assert isinstance(held, int)
            assert held < SIDECAR_BUFFER_BOUND
            assert flooder_sent[0] < 200 * 1024 * 1024
        finally:
            release.set()
            client.close()
            flooder.join(WAIT_SECONDS)


@pytest.fixture(autouse=True)
def _no_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PGHOST", "PGPORT", "PGSSLMODE"):
        monkeypatch.delenv(key, raising=False)
