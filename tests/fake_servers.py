"""Small real servers that misbehave on purpose, for the sidecar's upstream leg.

Each ``FakeUpstream`` listens on a loopback port in a thread and runs a script per connection
with a blocking socket. It records every byte received *before* TLS was established, so a test
can assert that nothing of the client's session left the sidecar in plaintext.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SSL_REQUEST = struct.pack("!II", 8, 80877103)


@dataclass
class Conn:
    sock: socket.socket
    plaintext: bytearray = field(default_factory=bytearray)  # received before TLS
    decrypted: bytearray = field(default_factory=bytearray)  # received inside TLS
    tls: ssl.SSLSocket | None = None
    alpn: str | None = None
    sni: str | None = None
    error: BaseException | None = None

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        self.plaintext += buf
        return buf

    def drain_plaintext(self) -> None:
        """Read until the peer closes, recording what it sent (it should send nothing)."""
        self.sock.settimeout(10)
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                self.plaintext += chunk

    def start_tls(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        tls_sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = tls_sock
        self.alpn = tls_sock.selected_alpn_protocol()
        return tls_sock

    def drain_tls(self) -> None:
        assert self.tls is not None
        self.tls.settimeout(10)
        with contextlib.suppress(OSError):
            while chunk := self.tls.recv(65536):
                self.decrypted += chunk


Script = Callable[[Conn], None]


class FakeUpstream:
    """``with FakeUpstream(script) as fake: ... fake.port ... fake.connections``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[Conn] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._accept_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        self._accept_thread.join(5)
        for conn in self.connections:
            with contextlib.suppress(OSError):
                (conn.tls or conn.sock).close()
        for t in self._threads:
            t.join(5)

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(10)
            conn = Conn(sock)
            self.connections.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: Conn) -> None:
        try:
            self.script(conn)
        except (OSError, ssl.SSLError) as exc:
            conn.error = exc
        finally:
            with contextlib.suppress(OSError):
                (conn.tls or conn.sock).close()

    def wait_done(self, timeout: float = 10) -> None:
        """Wait until every connection's script has finished (they end when the peer closes)."""
        for t in list(self._threads):
            t.join(timeout)


def server_context(
    cert: Path,
    key: Path,
    *,
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


# -- messages a server sends ---------------------------------------------------------------


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_msg(text: str, code: str = "28000") -> bytes:
    body = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + text.encode() + b"\0\0"
    return msg(b"E", body)


AUTH_OK = msg(b"R", struct.pack("!I", 0))
READY_IDLE = msg(b"Z", b"I")
BACKEND_KEY = msg(b"K", struct.pack("!II", 4242, 0x01020304))


def parameter_status(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def read_message(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    head = _recv_exact(sock, 5)
    (length,) = struct.unpack("!I", head[1:])
    return head[:1], _recv_exact(sock, length - 4)


def read_startup(sock: socket.socket | ssl.SSLSocket) -> bytes:
    head = _recv_exact(sock, 4)
    (length,) = struct.unpack("!I", head)
    return head + _recv_exact(sock, length - 4)


def _recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def serve_one_query_session(tls_sock: ssl.SSLSocket, conn: Conn, *, value: str) -> None:
    """Answer a StartupMessage and one simple Query like a trust-auth server would."""
    startup = read_startup(tls_sock)
    conn.decrypted += startup
    tls_sock.sendall(
        AUTH_OK
        + parameter_status("server_version", "17.0")
        + parameter_status("client_encoding", "UTF8")
        + parameter_status("standard_conforming_strings", "on")
        + parameter_status("DateStyle", "ISO, MDY")
        + parameter_status("integer_datetimes", "on")
        + BACKEND_KEY
        + READY_IDLE
    )
    while True:
        try:
            kind, body = read_message(tls_sock)
        except ConnectionError:
            return
        conn.decrypted += kind + body
        if kind == b"X":
            return
        if kind == b"Q":
            field_desc = b"answer\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
            row = struct.pack("!h", 1) + struct.pack("!I", len(value)) + value.encode()
            tls_sock.sendall(
                msg(b"T", struct.pack("!h", 1) + field_desc)
                + msg(b"D", row)
                + msg(b"C", b"SELECT 1\0")
                + READY_IDLE
            )
