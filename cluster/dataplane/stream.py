"""Transport kind "tcp": the data plane's messages as length-prefixed frames over plain TCP, no gRPC.
Only cluster/dataplane/transport.py uses this module; it knows bytes and sockets, not tensors or protobuf.

Why: a gRPC call from Python costs ~0.3 ms on a loaded 2-core machine before any tensor moves (its
server hands each call from a polling thread to a worker thread; each side runs a few dozen Python
frames of gRPC's own), several times a socket round trip. Here the caller's thread writes the request
and reads the reply itself, and the server's thread for that connection reads the request, runs the
handler and writes the reply: no hand-off between threads on either end.

Wire, little-endian:
    connection start, client -> server   MAGIC, u16 token length, token (UTF-8)
    request                              u32 payload length, u8 method (ATTENTION, EXPERTS, ECHO), payload
    reply                                u32 payload length, u8 status (a gRPC status code's number),
                                         payload: the reply message if OK, else a UTF-8 message
Payloads are the proto/dataplane.proto messages, serialized as gRPC would send them.

One call at a time per connection: a Channel keeps idle connections to its peer and opens another when
all are busy (a router's fan-out from one thread holds one per peer; concurrent callers, one each).

Checks, as the gRPC kind's: the server reads the hello before anything else and compares the token in
constant time; a wrong one (or a peer that does not speak this) is answered UNAUTHENTICATED and the
connection closed, before a byte of a request is read. A payload over the limit is refused before it
is read or allocated (RESOURCE_EXHAUSTED; the sender's own Channel refuses it before sending). Every
call has a deadline: the client's socket operations time out at it (DEADLINE_EXCEEDED; the connection
is dropped, since its reply may still come). The server allows timeout_s for each read and write
of a frame it has started, and waits without limit for the next frame (an idle connection in a
client's pool).
"""

from __future__ import annotations

import hmac
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

MAGIC = b"moeray-dataplane/1\n"  # a peer speaking something else fails here, not in a parser
_TOKEN_LENGTH = struct.Struct("<H")
FRAME = struct.Struct("<IB")  # payload length; method (request) or status (reply)
ATTENTION, EXPERTS, ECHO = 1, 2, 3
# gRPC's status codes by number (grpc.StatusCode), so errors read the same on both kinds
CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
         "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
         "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
_NUMBER = {code: i for i, code in enumerate(CODES)}
_CLOSING = ("UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE")  # the server closes the connection after these

Handler = Callable[[int, bytearray], "tuple[str, bytes | bytearray]"]
"""(method, request payload) -> (status code name, reply payload or UTF-8 error message)."""


class StreamError(Exception):
    """A call failed: `code` is a gRPC status code's name, `message` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _read(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """Exactly `n` bytes (before `deadline`, if given: TimeoutError); EOFError if the peer closes first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        if deadline is not None:
            sock.settimeout(_left(deadline))
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the peer closed the connection")
        got += k
    return buf


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _send(sock: socket.socket, parts: Sequence[bytes | bytearray]) -> None:
    """All of `parts`, in one system call unless the socket's buffer fills."""
    sent = sock.sendmsg(parts)
    total = sum(len(p) for p in parts)
    if sent < total:
        sock.sendall(memoryview(b"".join(parts))[sent:])


# ---- server ----------------------------------------------------------------------------------------


class Server:
    """Serves `handle` on host:port (0: a free one), one thread per connection and at most `workers`
    handlers at once. `address` is "host:port" as bound."""

    def __init__(self, host: str, port: int, *, token: str, max_bytes: int, timeout_s: float, workers: int,
                 handle: Handler):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        bracketed = f"[{host}]" if ":" in host else host
        try:  # SO_REUSEADDR but not SO_REUSEPORT: a port another server listens on fails, not shared
            self._listener = socket.create_server((host, port), family=family)
        except OSError as e:
            raise OSError(f"data plane cannot bind {bracketed}:{port}: {e}") from e
        self.address = f"{bracketed}:{self._listener.getsockname()[1]}"
        self._token, self._max_bytes, self._timeout, self._handle = token.encode(), max_bytes, timeout_s, handle
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a call ends
        self._connections: set[socket.socket] = set()
        self._calls = 0  # handlers running
        self._stopped = False
        threading.Thread(target=self._accept, name="moeray-dataplane-accept", daemon=True).start()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight ones get `grace` seconds to reply (None: cut off now)."""
        with self._lock:
            self._stopped = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            if grace:
                self._idle.wait_for(lambda: self._calls == 0, grace)
            for sock in self._connections:  # their threads see the connection end and close it
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # stop() closed the listener
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                self._connections.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="moeray-dataplane", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._timeout)
            if not self._hello(sock):
                return
            header = bytearray(FRAME.size)
            while True:
                sock.settimeout(None)  # between calls: as long as the client keeps the connection
                got = sock.recv_into(header)
                if got == 0:
                    return  # the client closed it
                sock.settimeout(self._timeout)  # a started frame: no read of it may stall longer
                if got < FRAME.size:
                    header[got:] = _read(sock, FRAME.size - got)
                n, method = FRAME.unpack(header)
                if n > self._max_bytes:
                    return self._refuse(sock, "RESOURCE_EXHAUSTED",
                                        f"request of {n} bytes is over the limit of {self._max_bytes}")
                payload = _read(sock, n)
                with self._slots:
                    with self._lock:
                        if self._stopped:
                            return self._refuse(sock, "UNAVAILABLE", "data plane server is stopping")
                        self._calls += 1
                    try:
                        code, body = self._handle(method, payload)
                    finally:
                        with self._lock:
                            self._calls -= 1
                            self._idle.notify_all()
                _send(sock, [FRAME.pack(len(body), _NUMBER[code]), body])
        except (OSError, EOFError):
            pass  # the client went, stalled past timeout_s, or stop() cut the connection
        finally:
            with self._lock:
                self._connections.discard(sock)
            sock.close()

    def _hello(self, sock: socket.socket) -> bool:
        """Is the peer ours: the magic, then the pipeline's token (any, when this server has none)?"""
        head = _read(sock, len(MAGIC) + _TOKEN_LENGTH.size)
        if head[: len(MAGIC)] != MAGIC:
            self._refuse(sock, "UNAUTHENTICATED", "data plane: not a moeray data-plane peer")
            return False
        token = _read(sock, _TOKEN_LENGTH.unpack_from(head, len(MAGIC))[0])
        if self._token and not hmac.compare_digest(bytes(token), self._token):
            self._refuse(sock, "UNAUTHENTICATED", "data plane: missing or wrong pipeline token")
            return False
        return True

    def _refuse(self, sock: socket.socket, code: str, message: str) -> None:
        """Answer `code` and end the connection. What the client sent on is read and dropped first (up to
        timeout_s): closing a socket with unread input resets it, and the reset would destroy the answer."""
        body = message.encode()
        _send(sock, [FRAME.pack(len(body), _NUMBER[code]), body])
        sock.shutdown(socket.SHUT_WR)
        deadline, scratch = time.monotonic() + self._timeout, bytearray(1 << 16)
        while sock.recv_into(scratch):
            sock.settimeout(_left(deadline))


# ---- client ----------------------------------------------------------------------------------------


class Channel:
    """Calls to one server over pooled connections; safe to use from several threads."""

    def __init__(self, address: str, token: str, max_bytes: int):
        host, port = address.rsplit(":", 1)
        self._peer = (host.strip("[]"), int(port))
        token_bytes = token.encode()
        self._hello = MAGIC + _TOKEN_LENGTH.pack(len(token_bytes)) + token_bytes
        self._max_bytes = max_bytes
        self._idle: list[socket.socket] = []  # connections with no call in flight
        self._closed = False

    def send(self, method: int, payload: bytes, deadline: float) -> Call:
        """Send a request now; the Call's reply() waits for the answer. Errors surface there too."""
        if len(payload) > self._max_bytes:
            return Call(self, None, deadline, StreamError(
                "RESOURCE_EXHAUSTED", f"request of {len(payload)} bytes is over the limit of {self._max_bytes}"))
        sock = None
        try:
            sock, parts = self._connection(deadline), [FRAME.pack(len(payload), method), payload]
            if sock is None:
                sock = socket.create_connection(self._peer, timeout=_left(deadline))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                parts.insert(0, self._hello)  # with the first request: no round trip of its own
            sock.settimeout(_left(deadline))
            _send(sock, parts)
        except (OSError, EOFError) as e:
            if sock is not None:
                sock.close()
            return Call(self, None, deadline, _failure(e))
        return Call(self, sock, deadline)

    def _connection(self, deadline: float) -> socket.socket | None:
        """An idle connection the server has not closed, or None."""
        while self._idle:
            try:
                sock = self._idle.pop()
            except IndexError:  # another thread took the last one
                return None
            sock.settimeout(0)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    raise EOFError("unexpected bytes from the server")  # never: one reply per request
                # b"": the server closed it (it stopped, or restarted)
            except BlockingIOError:
                return sock  # nothing to read: open and quiet, as an idle connection is
            except (OSError, EOFError):
                pass
            sock.close()
        return None

    def _release(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
        else:
            self._idle.append(sock)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _failure(e: BaseException) -> StreamError:
    if isinstance(e, TimeoutError):
        return StreamError("DEADLINE_EXCEEDED", "deadline exceeded")
    if isinstance(e, EOFError):
        return StreamError("UNAVAILABLE", "the server closed the connection")
    return StreamError("UNAVAILABLE", f"{type(e).__name__}: {e}")


class Call:
    """A request sent (or that failed to be). reply() -> the reply payload, or StreamError."""

    __slots__ = ("_channel", "_deadline", "_outcome", "_sock")

    def __init__(self, channel: Channel, sock: socket.socket | None, deadline: float,
                 error: StreamError | None = None):
        self._channel, self._sock, self._deadline = channel, sock, deadline
        self._outcome: bytearray | StreamError | None = error  # None until the reply has come

    def reply(self) -> bytearray:
        if self._outcome is None:
            sock, self._sock = self._sock, None
            assert sock is not None  # a request that was sent, or _outcome would hold its error
            self._outcome = self._receive(sock)
        if isinstance(self._outcome, StreamError):
            raise self._outcome
        return self._outcome

    def _receive(self, sock: socket.socket) -> bytearray | StreamError:
        try:
            n, status = FRAME.unpack(_read(sock, FRAME.size, self._deadline))
            if n > self._channel._max_bytes:
                sock.close()
                return StreamError("RESOURCE_EXHAUSTED",
                                   f"reply of {n} bytes is over the limit of {self._channel._max_bytes}")
            body = _read(sock, n, self._deadline)
        except (OSError, EOFError) as e:
            sock.close()
            return _failure(e)
        code = CODES[status] if status < len(CODES) else "UNKNOWN"
        if code in _CLOSING:
            sock.close()
        else:
            self._channel._release(sock)
        return body if code == "OK" else StreamError(code, body.decode(errors="replace"))
