"""Small real servers that misbehave on purpose, for the sidecar's upstream leg.

Each ``FakeUpstream`` listens on a loopback port in a thread and runs a script per connection
with a blocking socket. It records every byte received *before* TLS was established, so a test
can assert that nothing of the client's session left the sidecar in plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# -- helpers for the reliability suites (hostile clients and servers, leak checks) ----------------

GSSENC_REQUEST = struct.pack("!II", 8, 80877104)


def startup_packet(protocol: int = 196608, **params: str) -> bytes:
    """A StartupMessage; ``protocol`` is the version word (``major << 16 | minor``)."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), protocol) + body


def tls_client_hello(server_name: str | None = "localhost") -> bytes:
    """A real TLS ClientHello as OpenSSL writes it (from a ``MemoryBIO``), never sent anywhere."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def tls_alert_record(description: int, *, version: bytes = b"\x03\x03") -> bytes:
    """A plaintext fatal TLS alert record, as a server sends it to abort a handshake."""
    return b"\x15" + version + b"\x00\x02" + bytes([2, description])


def split_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """Backend messages (type, body) in ``data``; raises ValueError on a torn or bad frame."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise ValueError(f"torn message header at offset {pos}: {data[pos:]!r}")
        (length,) = struct.unpack_from("!I", data, pos + 1)
        if length < 4 or pos + 1 + length > len(data):
            raise ValueError(f"bad message length {length} at offset {pos}")
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse body by their one-letter code (``C``, ``M``, ...)."""
    if not body.endswith(b"\0"):
        raise ValueError(f"ErrorResponse body not NUL-terminated: {body!r}")
    return {f[:1].decode(): f[1:].decode() for f in body[:-1].split(b"\0") if f}


def open_fds() -> int:
    """File descriptors open in this process (the sidecar under test runs in it, in a thread)."""
    return len(os.listdir("/proc/self/fd"))


def sidecar_resources(sidecar: Any) -> tuple[int, int]:
    """(open fds in this process, tasks on the sidecar's loop) once its sessions have ended.

    ``sidecar`` is a ``tests.conftest.RunningSidecar``. The task count is read on the sidecar's
    own loop (so it includes the one task doing the reading, every time).
    """
    sidecar.wait_idle()
    tasks = sidecar.run_in_loop(lambda: len(asyncio.all_tasks()))
    return open_fds(), int(tasks)


def assert_back_to_baseline(
    sidecar: Any, baseline: tuple[int, int], timeout: float = 10.0
) -> tuple[int, int]:
    """Assert fds and tasks return to ``baseline``; returns what was seen last.

    Closing a TLS transport finishes asynchronously (close_notify, then the socket), after the
    session's task is done, so the condition is polled up to ``timeout``: the assertion is on
    the state reached, the poll only bounds how long we are willing to wait for it.
    """
    deadline = time.monotonic() + timeout
    seen = sidecar_resources(sidecar)
    while (seen[0] > baseline[0] or seen[1] > baseline[1]) and time.monotonic() < deadline:
        threading.Event().wait(0.05)
        seen = sidecar_resources(sidecar)
    assert seen[0] <= baseline[0], f"fds leaked: {baseline[0]} before, {seen[0]} after"
    assert seen[1] <= baseline[1], f"tasks leaked: {baseline[1]} before, {seen[1]} after"
    return seen


# -- the sidecar as a separate process (for RSS and fd measurements) ---------------------------


class SidecarProcess:
    """``python -m proxy run`` in a child process, for numbers only a process has (VmRSS).

    The listening port is read from the ``route_ready`` JSON log line, so no port is guessed.
    Its log goes to a file (a pipe nobody drains could fill and stall the sidecar).
    """

    def __init__(self, upstream: str, log_path: Path, *extra_args: str) -> None:
        import json
        import os
        import subprocess
        import sys
        import time

        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        argv = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0"]
        argv += ["--upstream", upstream, "--admin-listen", "off", "--log-format", "json"]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*argv, *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 30
        while True:
            for line in log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == "route_ready":
                        host, port = record["listen"].rsplit(":", 1)
                        self.host, self.port = host, int(port)
                        return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"sidecar process did not start:\n{log_path.read_text()}")
            time.sleep(0.02)  # polling the log file for the readiness line, bounded above

    def status(self, field_name: str) -> int:
        """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"{field_name} not in /proc/{self.proc.pid}/status")

    def open_fds(self) -> int:
        import os

        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
