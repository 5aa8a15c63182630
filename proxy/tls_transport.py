"""The upstream TLS leg as our own asyncio ``Transport``: a socket, an ``ssl.SSLObject`` over two
``MemoryBIO``s, and the event loop's reader/writer callbacks.

Why not ``loop.create_connection(ssl=...)``: asyncio's TLS transport is a protocol stacked on a
socket transport, and three of its properties cost this sidecar what it exists for.

* **Half-close.** It cannot send TLS close_notify and keep reading, so a client that shuts its
  write side after a query lost the answer. Here ``write_eof()`` sends close_notify (TLS's own
  half-close; a PostgreSQL server reads it as a clean end of input, after answering what it has)
  and the server's remaining bytes are still delivered.
* **Memory.** The stdlib transport keeps a 256 KiB read buffer *per connection* (about 300 KiB
  per idle session). Here the ciphertext and plaintext buffers are shared by every connection of
  a loop: one ``recv_into`` per wake-up, decrypted into one buffer, one ``bytes`` handed on.
* **Work per message.** Two protocol layers, each with its own buffering and state checks, sit
  between the socket and ``data_received``; here it is one callback.

Pitfalls this follows (from the issue): decrypt until ``SSLWantReadError`` on every wake-up,
because OpenSSL may hold whole records with no readiness event to come; read buffers are far
larger than a TLS record (16 KiB + overhead); ``SSLObject.write`` into a memory BIO never
needs retrying, so there is no ``SSLWantWriteError`` retry dance with moving buffers.

Closing follows libpq and asyncio: flush, send close_notify, shut the TCP write side, then wait
(bounded) for the server's close_notify or EOF so the server never sees a reset.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
import weakref
from typing import Any, Final, NamedTuple, cast

from proxy.wire.tls_hello import hello_retry_group

READ_BUFFER_SIZE: Final = 256 * 1024
HIGH_WATER: Final = 64 * 1024
LOW_WATER: Final = 16 * 1024
HANDSHAKE_READ_SIZE: Final = 64 * 1024

_OPEN, _EOF_SENT, _CLOSING, _CLOSED = range(4)

# One pair of buffers per event loop: callbacks of one loop never interleave, and the tests run
# several loops in threads.
_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[memoryview, memoryview]] = (
    weakref.WeakKeyDictionary()
)


def _loop_buffers(loop: asyncio.AbstractEventLoop) -> tuple[memoryview, memoryview]:
    pair = _buffers.get(loop)
    if pair is None:
        pair = (memoryview(bytearray(READ_BUFFER_SIZE)), memoryview(bytearray(READ_BUFFER_SIZE)))
        _buffers[loop] = pair
    return pair


class ClientHandshake(NamedTuple):
    """A finished client handshake, ready for ``TLSTransport``."""

    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    # The NamedGroup the server asked for in a HelloRetryRequest (``wire.tls_hello``), or None.
    hello_retry_group: int | None


async def client_handshake(
    sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None
) -> ClientHandshake:
    """Run the client side of the TLS handshake on a connected non-blocking socket.

    Bytes the server sends right after its Finished (TLS 1.3 session tickets) may already sit in
    ``incoming``; the transport decrypts them first thing, so nothing read here is lost.
    The caller bounds the time; ``ssl.SSLError`` and ``ConnectionError`` propagate.
    """
    loop = asyncio.get_running_loop()
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    sslobj = context.wrap_bio(
        incoming, outgoing, server_side=False, server_hostname=server_hostname
    )
    first_flight: bytes | None = None
    while True:
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            finished = False
        except ssl.SSLEOFError:  # after our write_eof below: the server hung up mid-handshake
            raise ConnectionResetError("the server closed the connection") from None
        else:
            finished = True
        if outgoing.pending:
            await loop.sock_sendall(sock, outgoing.read())
        if finished:
            group = hello_retry_group(first_flight) if first_flight else None
            return ClientHandshake(sslobj, incoming, outgoing, group)
        if incoming.eof:
            raise ConnectionResetError("the server closed the connection")
        data = await loop.sock_recv(sock, HANDSHAKE_READ_SIZE)
        if first_flight is None:
            first_flight = data
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()  # OpenSSL reports it as SSLEOFError, or the alert it saw


class TLSTransport(asyncio.Transport):
    """A client-side TLS connection on a plain socket, for one ``asyncio.Protocol``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        protocol: asyncio.Protocol,
        shutdown_timeout: float,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._protocol = protocol
        self._shutdown_timeout = shutdown_timeout
        self._cipher_buf, self._plain_buf = _loop_buffers(loop)
        self._wbuf = bytearray()
        self._state = _OPEN
        self._reading = True
        self._writing_paused = False
        self._writer_registered = False
        self._shutdown_started = False
        self._fin_pending = False  # TCP FIN to send once the queued close_notify is out
        self._backlog = bool(incoming.pending)  # bytes left undecrypted while reading was paused
        self._timeout: asyncio.TimerHandle | None = None
        self._high = HIGH_WATER
        self._low = LOW_WATER
        self._extra: dict[str, Any] = {
            "socket": sock,
            "ssl_object": sslobj,
            "sslcontext": sslobj.context,
            "peername": _safe(sock.getpeername),
            "sockname": _safe(sock.getsockname),
            "cipher": sslobj.cipher(),
            "compression": sslobj.compression(),
            "peercert": sslobj.getpeercert(),
        }
        protocol.connection_made(self)
        # The protocol may have paused reading, or even closed, from connection_made.
        if self._state == _OPEN and self._reading:
            loop.add_reader(self._fd, self._read_ready)
            if self._backlog:
                loop.call_soon(self._decrypt_and_deliver)

    # -- asyncio.BaseTransport ----------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._state >= _CLOSING

    def close(self) -> None:
        """Stop delivering data, flush what is queued, then close_notify and wait for the peer."""
        if self._state >= _CLOSING:
            return
        self._state = _CLOSING
        # We still read, to see the server's close_notify or EOF, but deliver nothing more.
        self._set_reader(True)
        self._timeout = self._loop.call_later(self._shutdown_timeout, self._shutdown_timed_out)
        if not self._wbuf:
            self._start_shutdown()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # -- asyncio.ReadTransport ----------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading and self._state < _CLOSING

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self._state < _CLOSING:
                self._set_reader(False)

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            if self._state < _CLOSING:
                self._set_reader(True)
                if self._backlog:
                    self._loop.call_soon(self._decrypt_and_deliver)

    # -- asyncio.WriteTransport ---------------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = HIGH_WATER if high is None else high
        low = high // 4 if low is None else low
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._wbuf)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            if self._state == _EOF_SENT and data:
                raise RuntimeError("Cannot call write() after write_eof()")
            return  # closing: nobody will read it (asyncio's transports drop it too)
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._send_outgoing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: close_notify after what is queued; the server's answers still arrive."""
        if self._state != _OPEN:
            return
        self._state = _EOF_SENT
        if not self._wbuf:
            self._start_shutdown()

    def abort(self) -> None:
        self._finish(None)

    # -- internals: reading -------------------------------------------------------------------

    def _read_ready(self) -> None:
        if not self._reading and self._state < _CLOSING:
            return  # paused by a callback that ran earlier in this loop iteration
        try:
            n = self._sock.recv_into(self._cipher_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if n:
            self._in.write(self._cipher_buf[:n])
        else:
            self._in.write_eof()
        self._decrypt_and_deliver()

    def _decrypt_and_deliver(self) -> None:
        """Decrypt what the BIO holds into the shared buffer and hand it on in one piece.

        Stops early, leaving the rest in the BIO, when the protocol pauses reading from
        ``data_received``; ``resume_reading`` picks it up again.
        """
        if self._state == _CLOSED:
            return
        self._backlog = False
        buf = self._plain_buf
        size = len(buf)
        filled = 0
        eof = False
        error: Exception | None = None
        sslobj = self._ssl
        incoming = self._in
        while True:
            try:
                n = cast(int, sslobj.read(size - filled, buf[filled:]))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                eof = True
                break
            except ssl.SSLError as exc:
                error = exc
                break
            if not n:
                eof = True
                break
            filled += n
            # Nothing left to decrypt: stop here instead of asking OpenSSL once more and paying
            # for an SSLWantReadError (CPython formats its message on every raise).
            more = incoming.pending or sslobj.pending() or incoming.eof
            if not more:
                break
            if filled == size:
                self._deliver(bytes(buf))
                filled = 0
                if not self._reading and self._state < _CLOSING:
                    self._backlog = True
                    return
        if self._out.pending:
            # Reading can produce records to send (alerts, key updates).
            self._send_outgoing()
        if filled:
            self._deliver(bytes(buf[:filled]))
        if error is not None:
            self._fatal(error)
        elif eof:
            self._peer_eof()

    def _deliver(self, data: bytes) -> None:
        if self._state < _CLOSING:
            self._protocol.data_received(data)

    def _peer_eof(self) -> None:
        """The server sent close_notify or closed TCP (both mean: no more data from it)."""
        if self._state >= _CLOSING:
            # Waiting for exactly this during our own close.
            self._finish(None)
            return
        self._set_reader(False)
        keep_open = self._protocol.eof_received()
        if self._state == _EOF_SENT or not keep_open:
            # Answer with our close_notify (best effort) and release the socket: the server
            # is gone, whatever was still queued for it has nobody to read it.
            self._state = _CLOSING
            self._start_shutdown()
            self._finish(None)

    # -- internals: writing -------------------------------------------------------------------

    def _send_outgoing(self) -> None:
        data = self._out.read()
        if not data:
            return
        if self._wbuf:
            self._wbuf += data
        else:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            self._wbuf += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer_registered = True
        if not self._writing_paused and len(self._wbuf) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        del self._wbuf[:sent]
        if self._wbuf:
            return
        self._loop.remove_writer(self._fd)
        self._writer_registered = False
        if self._writing_paused:
            # Paired with pause_writing even while closing, as asyncio's transports do.
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._state == _CLOSED:
            return
        if self._fin_pending:
            self._send_fin()
        elif self._state in (_EOF_SENT, _CLOSING):
            self._start_shutdown()

    # -- internals: closing -------------------------------------------------------------------

    def _start_shutdown(self) -> None:
        """Queue close_notify, then the TCP FIN; the peer's answer is awaited by ``_read_ready``."""
        if self._shutdown_started or self._state == _CLOSED:
            return
        self._shutdown_started = True
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify queued; the server's comes later (or never: we do not need it)
        except ssl.SSLError:
            pass  # the session is unusable anyway; closing TCP is all that is left
        self._send_outgoing()
        if self._state == _CLOSED:
            return
        if self._wbuf:
            self._fin_pending = True  # _write_ready sends it once close_notify is out
        else:
            self._send_fin()

    def _send_fin(self) -> None:
        self._fin_pending = False
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish(None)

    def _shutdown_timed_out(self) -> None:
        self._timeout = None
        self._finish(None)

    def _fatal(self, exc: Exception) -> None:
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        """Release the socket and tell the protocol, once, on a later loop iteration."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        self._loop.remove_reader(self._fd)
        if self._writer_registered:
            self._loop.remove_writer(self._fd)
            self._writer_registered = False
        self._wbuf = bytearray()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def _set_reader(self, on: bool) -> None:
        if self._state == _CLOSED:
            return
        if on:
            self._loop.add_reader(self._fd, self._read_ready)
        else:
            self._loop.remove_reader(self._fd)

    def __del__(self) -> None:
        if getattr(self, "_state", _CLOSED) != _CLOSED:
            # A leak (a session always closes its legs): say so as asyncio's transports do,
            # and release the descriptor.
            warnings.warn(
                f"unclosed TLS transport {self!r}", ResourceWarning, stacklevel=1, source=self
            )
            self._sock.close()


def _safe(getter: Any) -> Any:
    try:
        return getter()
    except OSError:
        return None
