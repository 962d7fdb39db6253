"""Listening sockets and the accept loop.

The https listeners accept connections themselves (instead of `loop.create_server`) so that the
`max_connections` limit applies at accept time: a connection over the limit is closed before any
TLS work is spent on it, and handshakes in progress count as connections. Each accepted socket is
then handed to `loop.connect_accepted_socket(..., ssl=...)`, which runs the handshake with the
selector's SNI callback and, once it is done, starts the HTTP protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable

from proxy.client_hello import MAX_CLIENT_HELLO, HelloVerdict, parse_client_hello
from proxy.config import Address
from proxy.errors import StartupError
from proxy.logs import log, tls_log
from proxy.metrics import Metrics
from proxy.systemd import same_address
from proxy.tls import (
    CLIENT_CERT_REASONS,
    NOTHING_IN_COMMON_REASONS,
    PLAIN_HTTP_REASONS,
    CertificateSelector,
    handshake_socket_fd,
    log_handshake,
)
from proxy.trace import ConnectionTrace, Tracer

# How many connections one wake-up of the accept loop takes before yielding to the event loop:
# big enough to clear a burst, small enough that requests in flight are not starved.
ACCEPT_BATCH = 64
# Peeking at a ClientHello that has not fully arrived: the socket stays readable while the
# peeked bytes sit in it, so waiting for readability would spin; wait this long instead,
# doubling up to the cap (a client that stalls mid-hello costs a few wake-ups a second).
PEEK_RETRY = 0.002
PEEK_RETRY_MAX = 0.1


def bind_socket(address: Address, passed: list[socket.socket] | None = None) -> socket.socket:
    """A listening, non-blocking TCP socket; errors become one clear StartupError line.

    A socket in `passed` (systemd socket activation) that is bound to this address is taken
    out of the list and used instead: the kernel kept queueing connections on it while no
    proxy ran, so a restart refuses none."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    family, _, proto, _, sockaddr = infos[0]
    for sock in passed or ():
        if same_address(sock, sockaddr):
            passed.remove(sock)  # type: ignore[union-attr]
            sock.setblocking(False)
            return sock
    # proto IPPROTO_TCP (not 0): accepted sockets inherit it, and asyncio's transports only
    # set TCP_NODELAY on sockets that say they are TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "[::]:443" should mean IPv6 only, so that "0.0.0.0:443" can be listed beside it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = (
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            if exc.errno == errno.EACCES
            else ""
        )
        raise StartupError(f"cannot listen on {address}: {exc.strerror}{hint}") from None
    return sock


class ConnectionRegistry:
    """Every live client connection, to enforce max_connections and to drain on shutdown.
    `pending` counts handshakes in progress, `protocols` the connections that completed one."""

    def __init__(self) -> None:
        self.pending = 0
        self.protocols: set = set()
        self.idle_event = asyncio.Event()
        self.idle_event.set()

    @property
    def count(self) -> int:
        return self.pending + len(self.protocols)

    def _update_idle(self) -> None:
        if self.count == 0:
            self.idle_event.set()
        else:
            self.idle_event.clear()

    def handshake_started(self) -> None:
        self.pending += 1
        self.idle_event.clear()

    def handshake_ended(self) -> None:
        self.pending -= 1
        self._update_idle()

    def add(self, protocol: object) -> None:
        self.protocols.add(protocol)
        self.idle_event.clear()

    def discard(self, protocol: object) -> None:
        self.protocols.discard(protocol)
        self._update_idle()


class HttpsListener:
    """One TLS listening socket with its own accept loop."""

    def __init__(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        protocol_factory: Callable[[str], asyncio.Protocol],
        registry: ConnectionRegistry,
        handshake_timeout: Callable[[], float],
        max_connections: Callable[[], int],
        selector: CertificateSelector | None = None,
    ) -> None:
        self.sock = sock
        self.ssl_context = ssl_context
        # Chooses the front context per connection when a site asks for client certificates.
        self.selector = selector
        self.protocol_factory = protocol_factory
        self.registry = registry
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task] = set()
        self.metrics: Metrics | None = None  # set by the server while `[server] admin` is on
        self.tracer: Tracer | None = None  # set by the server with `run --trace`
        self.accepting = False
        self.address = sock.getsockname()

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self.accepting = True

    def stop_accepting(self) -> None:
        if self.accepting:
            self.loop.remove_reader(self.sock.fileno())
            self.accepting = False
        self.sock.close()

    def _pause_accepting(self, seconds: float) -> None:
        # Out of file descriptors: accept() would fail again at once, spinning the loop.
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.accepting:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        limit = self.max_connections()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s): pausing this listener for 1 s", exc.strerror)
                    self._pause_accepting(1.0)
                # ECONNABORTED and friends: that one client gave up; keep going.
                return
            if self.registry.count >= limit:
                # Closing at once costs almost nothing and keeps the process responsive.
                conn.close()
                if self.metrics is not None:
                    self.metrics.connections_refused += 1
                if tls_log.isEnabledFor(logging.DEBUG):
                    tls_log.debug("%s: refused, max_connections=%d reached", peer, limit)
                continue
            # No setblocking/TCP_NODELAY here: both event loops' transports set them.
            self.registry.handshake_started()
            task = self.loop.create_task(self._handshake(conn, peer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handshake(self, conn: socket.socket, peer: object) -> None:
        # This task's own context: the SNI callback finds the socket for its refusal alert.
        handshake_socket_fd.set(conn.fileno())
        trace: ConnectionTrace | None = None
        try:
            context = self.ssl_context
            timeout = self.handshake_timeout()
            selector = self.selector
            tracer = self.tracer
            if tracer is not None or (selector is not None and selector.asks_client_certificates):
                # Only then: every other handshake starts at once, as before.
                started = self.loop.time()
                verdict = await self._peek_client_hello(conn, started + timeout)
                if verdict.state == "hello" and selector is not None:
                    context = selector.front_context(verdict.server_name)
                # Not a ClientHello: the plain context, and OpenSSL says what is wrong.
                timeout = max(0.001, started + timeout - self.loop.time())
                if tracer is not None:
                    # The trace's clock is time.monotonic(): uvloop's counts milliseconds.
                    trace = tracer.start(
                        _peer_text(peer),
                        _peer_text(self.address),
                        time.monotonic() - (self.loop.time() - started),
                        verdict,
                    )
            # The client's address is known from accept(): the protocol gets it here rather
            # than asking the socket again.
            protocol = self.protocol_factory(peer[0] if isinstance(peer, tuple) else "")
            if trace is not None:
                protocol.trace = trace  # type: ignore[attr-defined]
            # Under uvloop the second item is the TLS layer's protocol, not ours: ours is the
            # application transport's.
            transport, _ = await self.loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=context,
                ssl_handshake_timeout=timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            conn.close()
            if self.metrics is not None:
                self.metrics.handshake_failed(failure_reason(exc))
            if trace is not None:
                trace.handshake_failed(_reason(exc), time.monotonic())
            if isinstance(exc, ssl.SSLError) and exc.reason in PLAIN_HTTP_REASONS:
                client = peer[0] if isinstance(peer, tuple) else str(peer)
                if _plain_http_clients.first_time(client):
                    log.info(
                        "%s sent plain HTTP to the HTTPS port %s: answered 400 (said once "
                        "per client); the URL should start with https://",
                        client,
                        _peer_text(self.address),
                    )
            elif tls_log.isEnabledFor(logging.DEBUG):
                tls_log.debug("%s: handshake failed: %s", _peer_text(peer), _reason(exc))
        except asyncio.CancelledError:
            conn.close()  # a drain: the handshake carried no request yet
            raise
        except Exception:
            conn.close()
            log.exception("%s: unexpected error during the TLS handshake", _peer_text(peer))
        else:
            # A connection that already closed (its on_close ran) must not be counted again.
            if not transport.is_closing():
                self.registry.add(transport.get_protocol())
            metrics = self.metrics
            if metrics is not None:
                ssl_object = transport.get_extra_info("ssl_object")
                if ssl_object is not None:
                    metrics.handshake_done(
                        ssl_object.version(),
                        ssl_object.selected_alpn_protocol(),
                        ssl_object.session_reused,
                    )
            if tls_log.isEnabledFor(logging.DEBUG):  # nothing formatted when debug is off
                log_handshake(transport.get_extra_info("ssl_object"), _peer_text(peer))
        finally:
            self.registry.handshake_ended()

    async def _peek_client_hello(self, conn: socket.socket, deadline: float) -> HelloVerdict:
        """The client's first bytes read with MSG_PEEK (left in the socket for OpenSSL) until
        they are a whole ClientHello or clearly none. TimeoutError at `deadline`, EOFError if
        the client closes first."""
        conn.setblocking(False)
        retry = PEEK_RETRY
        while True:
            try:
                data: bytes | None = conn.recv(MAX_CLIENT_HELLO + 64, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = None
            if data == b"":
                raise EOFError("the client closed before its ClientHello")
            if data:
                verdict = parse_client_hello(data)
                if verdict.state != "incomplete":
                    return verdict
            left = deadline - self.loop.time()
            if left <= 0:
                raise TimeoutError
            if data:
                await asyncio.sleep(min(retry, left))
                retry = min(retry * 2, PEEK_RETRY_MAX)
            else:
                await self._readable(conn.fileno(), left)

    async def _readable(self, fd: int, limit: float) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(fd, _resolve, ready)
        try:
            await asyncio.wait_for(ready, limit)
        finally:
            # Before the TLS transport takes the socket over: it registers its own reader.
            self.loop.remove_reader(fd)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class OncePerKey:
    """Remembers the keys it has seen, up to `size` of them (then it starts over), so that a
    line is logged once per client without a client being able to grow memory."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.seen: set[str] = set()

    def first_time(self, key: str) -> bool:
        if key in self.seen:
            return False
        if len(self.seen) >= self.size:
            self.seen.clear()
        self.seen.add(key)
        return True


_plain_http_clients = OncePerKey()


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def _handshake_timed_out(exc: BaseException) -> bool:
    # Both event loops' TLS layers end a handshake past ssl_handshake_timeout with this error
    # (their own words: "SSL handshake is taking longer than ... seconds").
    return isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) or _handshake_timed_out(exc):
        return "timed out (handshake_timeout)"
    if isinstance(exc, ssl.SSLError) and exc.reason in NOTHING_IN_COMMON_REASONS:
        return f"{exc}: {NOTHING_IN_COMMON_REASONS[exc.reason]}; alert sent"
    if isinstance(exc, ssl.SSLError) and exc.reason == "CALLBACK_FAILED":
        return (
            "refused by the SNI callback: no certificate for the name it asked for yet, no "
            "default_site, or a client_auth site's ClientHello that could not be read first"
        )
    return str(exc) or type(exc).__name__


def failure_reason(exc: BaseException) -> str:
    """The `reason` label of tlsproxy_handshake_failures_total for a failed handshake."""
    if isinstance(exc, TimeoutError) or _handshake_timed_out(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        reason = exc.reason
        if reason == "CALLBACK_FAILED":
            return "no_certificate"
        if reason in PLAIN_HTTP_REASONS:
            return "plain_http"
        if reason in CLIENT_CERT_REASONS:
            return "client_certificate"
        if reason in NOTHING_IN_COMMON_REASONS:
            version = "version" in NOTHING_IN_COMMON_REASONS[reason]
            return "protocol_version" if version else "no_shared_cipher"
        return "other"
    # EOFError, resets, SSLEOFError: the client went away before finishing.
    return "client_closed"


async def close_plain_server(server: asyncio.base_events.Server) -> None:
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 1.0)
