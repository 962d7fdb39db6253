"""One keep-alive HTTP/1.1 connection to an upstream server (TCP or unix socket).

A Protocol, not streams: bytes from the upstream go straight into the response parser, which
calls the exchange that currently owns the connection. The request head was already written
from the h11-validated request, so no HTTP client library sits on this path.

While the connection is idle in the pool, an EOF or any unexpected byte removes it from the
pool: the server closed it (uvicorn does after 5 s), and it must not be handed out again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from proxy.downstream.flow import tune_write_buffer
from proxy.errors import UpstreamError
from proxy.logs import upstream_log
from proxy.upstream.response_parser import ResponseError, ResponseHandler, ResponseParser

if TYPE_CHECKING:
    from proxy.upstream.pool import ServerSlot, UpstreamPool


class UpstreamUser(ResponseHandler, Protocol):
    """What a connection reports to the exchange that uses it."""

    def upstream_failed(self, error: UpstreamError) -> None: ...
    def feed_done(self) -> None: ...
    def client_stalled(self) -> None: ...
    def internal_error(self) -> None: ...
    def upstream_write_paused(self) -> None: ...
    def upstream_write_resumed(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_loop",
        "_read_timeout",
        "_timer",
        "closed",
        "last_activity",
        "parser",
        "pool",
        "reading_paused",
        "requests",
        "sent",
        "slot",
        "transport",
        "tunnel",
        "user",
    )

    def __init__(self, pool: UpstreamPool, slot: ServerSlot) -> None:
        self.pool = pool
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(pool.limits.max_header_bytes)
        self.user: UpstreamUser | None = None
        self.closed = False
        self.tunnel = False
        self.sent = False  # has any byte of the current request been written
        self.requests = 0  # requests begun on this connection (>1: it was reused)
        self.reading_paused = False
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()
        self._read_timeout = pool.limits.upstream_read_timeout
        self._timer: asyncio.TimerHandle | None = None

    # --- used by the exchange -------------------------------------------------------------

    def begin(self, user: UpstreamUser, *, head_request: bool) -> None:
        """Start a request/response cycle owned by `user`."""
        self.user = user
        self.sent = False
        self.requests += 1
        self.parser.start(user, head_request=head_request)
        self.last_activity = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self.last_activity + self._read_timeout, self._check_read_timeout
            )

    def write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if transport.is_closing():  # failing already; connection_lost will tell the exchange
            return
        self.sent = True
        self.last_activity = self._loop.time()
        transport.write(data)

    def pause_reading(self) -> None:
        """The client cannot take more: stop reading the upstream (and its timeout with it)."""
        if not self.reading_paused:
            self.reading_paused = True
            self.last_activity = self._loop.time()  # from now on the client's clock runs
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.last_activity = self._loop.time()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def detach(self) -> None:
        """The cycle is over; the pool decides what happens to the connection next."""
        self.user = None
        if self.reading_paused:
            self.resume_reading()

    @property
    def reusable(self) -> bool:
        return not self.closed and not self.tunnel and self.parser.done and self.parser.keep_alive

    def close(self) -> None:
        self.closed = True
        self.user = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        transport = self.transport
        self.close()
        if transport is not None:
            transport.abort()

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tune_write_buffer(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        user = self.user
        if user is None:
            # Bytes while idle: the server answered nothing we asked; never reuse this one.
            self.pool.discard(self)
            self.abort()
            return
        try:
            self.parser.feed(data)
            user.feed_done()
        except ResponseError as exc:
            self._fail(UpstreamError(str(exc), 502, request_sent=True))
        except Exception:
            self._bug(user)

    def eof_received(self) -> bool:
        user = self.user
        if user is None:
            self.pool.discard(self)
            return False
        try:
            self.parser.feed_eof()
        except ResponseError as exc:
            self._fail(UpstreamError(str(exc), 502, request_sent=self.sent))
        except Exception:
            self._bug(user)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        user = self.user
        if user is None:
            if not was_closed:
                self.pool.discard(self)
            return
        try:
            if self.tunnel or self.parser.done:
                user.upstream_failed(UpstreamError("upstream closed", 502, request_sent=True))
                return
            reason = f"upstream connection lost: {exc}" if exc else "upstream closed the connection"
            self._fail(UpstreamError(reason, 502, request_sent=self.sent))
        except Exception:
            self._bug(user)

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_write_resumed()

    # --- internals ------------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        user = self.user
        if user is None:
            self.pool.discard(self)
            self.abort()
            return
        if upstream_log.isEnabledFor(10):
            upstream_log.debug("%s: %s", self.slot.server.label, error)
        self.close()
        user.upstream_failed(error)

    def _bug(self, user: UpstreamUser) -> None:
        # A bug, not an upstream failure: the client connection logs it and closes.
        self.abort()
        user.internal_error()

    def _check_read_timeout(self) -> None:
        self._timer = None
        user = self.user
        if user is None or self.closed or self.tunnel:
            return
        now = self._loop.time()
        deadline = self.last_activity + self._read_timeout
        if deadline > now:
            self._timer = self._loop.call_at(deadline, self._check_read_timeout)
            return
        if self.reading_paused:
            # Paused because the client took no byte for that long: the client's fault.
            try:
                user.client_stalled()
            except Exception:
                self._bug(user)
            return
        message = f"no response from {self.slot.server.label} within {self._read_timeout:g}s"
        try:
            self._fail(UpstreamError(message, 504, request_sent=True))
        except Exception:
            self._bug(user)
