"""The protocol of every plain `http` listener: a 308 to https, and the ACME http-01 responder.

h11 parses each request; the answers are the canned bytes of `responses`. A request body is
read (and dropped) before the answer, as a server must to keep the connection usable: at most
`max_body_bytes` of it (413 and close beyond), with no more than `body_read_timeout` between two
reads (408 and close). After each answer the h11 connection is replaced by a fresh one fed with
whatever the client already pipelined, which is all the keep-alive state this server needs.

Timers (one at a time): the request head must arrive within `header_read_timeout` (from the
connection start, or from its first byte on a kept-alive connection), and a kept-alive
connection may sit idle for `idle_timeout`. A head that times out after some bytes gets a 408;
a connection that never sent anything is closed silently (browsers pre-connect).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import h11

from proxy.downstream.forwarding import StrictHeadScanner
from proxy.downstream.responses import (
    error_response,
    https_location,
    plain_response,
    redirect_response,
)
from proxy.logs import AccessLog, log

ACME_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_STATUS_HINTS = frozenset((400, 413, 431, 501, 505))
_LINGER = 2.0


class RedirectLimits(Protocol):
    header_read_timeout: float
    idle_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    body_read_timeout: float


AcmeResponder = Callable[[str], "str | None"]
# Several instances: asks the shared store for a token this instance has not heard of yet.
AcmeStore = Callable[[str], Awaitable["str | None"]]


class RedirectProtocol(asyncio.Protocol):
    def __init__(
        self,
        https_port: int,
        acme_responder: AcmeResponder | None,
        limits: RedirectLimits,
        access_log: AccessLog | None = None,
        acme_store: AcmeStore | None = None,
    ) -> None:
        self._https_port = https_port
        self._acme = acme_responder
        self._acme_store = acme_store
        # A challenge request waiting for the shared store's answer: nothing else is read or
        # answered meanwhile, so that pipelined answers keep their order.
        self._deferred = False
        self._store_task: asyncio.Task[None] | None = None
        self._limits = limits
        self._access = access_log if access_log is not None and access_log.enabled else None
        self._client = "-"
        self._started = 0.0  # loop time of the current request's first byte (for the access log)
        self._transport: asyncio.Transport | None = None
        self._conn = self._new_conn()
        self._strict = StrictHeadScanner()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_is_idle = False
        self._receiving = False  # some bytes of the current request head have arrived
        # A request whose body is being read (and dropped), with the answer it will get.
        self._request: tuple[h11.Request, bytes, bool] | None = None
        self._body_bytes = 0
        self._paused = False  # the transport's write buffer is full: stop answering
        self._closing = False

    def _new_conn(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes)

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check here.
        self._transport = transport  # type: ignore[assignment]
        if self._access is not None:
            peer = transport.get_extra_info("peername")
            self._client = str(peer[0]) if isinstance(peer, tuple) else "-"
            self._started = asyncio.get_running_loop().time()
        self._arm(self._limits.header_read_timeout, self._on_header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            if self._strict.feed(data):
                self._finish(error_response(400, close=True), close=True)
                return
            self._conn.receive_data(data)
            if not self._receiving:
                self._receiving = True
                if self._access is not None:
                    self._started = asyncio.get_running_loop().time()
                if self._timer is not None and self._timer_is_idle:
                    self._arm(self._limits.header_read_timeout, self._on_header_timeout)
            elif self._request is not None:  # a body arrives: the time between reads restarts
                self._arm(self._limits.body_read_timeout, self._on_body_timeout)
            self._process()
        except Exception:
            log.exception("http listener: unexpected error, closing the connection")
            self._abort()

    def eof_received(self) -> bool:
        if self._closing:
            return False
        try:
            self._conn.receive_data(b"")
            self._process()
        except Exception:
            log.exception("http listener: unexpected error, closing the connection")
            self._abort()
            return False
        # While writing is paused, pipelined requests still wait in h11's buffer: stay
        # half-open, resume_writing answers them and closes on h11's ConnectionClosed.
        return self._paused and not self._closing

    def pause_writing(self) -> None:
        # The client pipelines faster than it reads answers: stop reading until it catches up.
        self._paused = True
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is None or self._closing or self._deferred:
            return
        self._transport.resume_reading()
        try:
            self._process()
        except Exception:
            log.exception("http listener: unexpected error, closing the connection")
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self._transport = None

    # --- request handling -------------------------------------------------------------------

    def _process(self) -> None:
        while not self._closing and not self._paused and not self._deferred:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _STATUS_HINTS else 400
                self._finish(error_response(status, close=True), close=True)
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self._body_bytes = 0
                response, close = self._response(event)
                refused = response is not None and response.startswith(
                    (b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")
                )
                if self._conn.their_state is h11.SEND_BODY and not refused:
                    self._request = (event, response, close)
                    self._arm(self._limits.body_read_timeout, self._on_body_timeout)
                elif response is None:
                    self._ask_store(event, close, next_cycle=False)
                else:
                    self._answer(event, response, close)
            elif isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                if self._body_bytes > self._limits.max_body_bytes:
                    self._finish(error_response(413, close=True), close=True)
                    return
            elif isinstance(event, h11.EndOfMessage):
                waiting, self._request = self._request, None
                if waiting is not None and waiting[1] is None:
                    self._ask_store(waiting[0], waiting[2], next_cycle=True)
                    return
                if waiting is not None:
                    self._answer(*waiting)
                    if self._closing:
                        return
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._finish(b"", close=True)
                return

    def _ask_store(self, request: h11.Request, close: bool, *, next_cycle: bool) -> None:
        """Answer a challenge this instance has no token for once the shared store has said
        whether another instance published it (the CA may validate before the change
        notification has brought it here)."""
        self._deferred = True
        self._cancel_timer()  # the store answers within a bound of its own
        if self._transport is not None:
            self._transport.pause_reading()
        # Held here: the loop keeps only a weak reference to a task.
        self._store_task = asyncio.get_running_loop().create_task(
            self._answer_from_store(request, close, next_cycle)
        )

    async def _answer_from_store(self, request: h11.Request, close: bool, next_cycle: bool) -> None:
        head = request.method == b"HEAD"
        assert self._acme_store is not None
        token = request.target[len(ACME_PREFIX) :].decode("ascii")
        try:
            key_authorization = await self._acme_store(token)
        except Exception:
            log.exception("http-01 responder failed for token %s", token)
            response = error_response(500, close=close, head=head)
        else:
            if key_authorization is None:
                response = error_response(404, close=close, head=head)
            else:
                body = key_authorization.encode("ascii")
                response = plain_response(200, body, close=close, head=head)
        self._deferred = False
        if self._closing or self._transport is None:
            return
        try:
            self._answer(request, response, close)
            if self._closing:
                return
            if next_cycle:
                self._next_cycle()
            if not self._paused and self._transport is not None:
                self._transport.resume_reading()
            self._process()
        except Exception:
            log.exception("http listener: unexpected error, closing the connection")
            self._abort()

    def _answer(self, request: h11.Request, response: bytes, close: bool) -> None:
        self._finish(response, close)
        if self._access is not None:
            host = next((v for n, v in request.headers if n == b"host"), None)
            self._access.emit(
                client=self._client,
                sni=None,
                host=host,
                method=request.method,
                target=request.target,
                status=int(response[9:12]),  # every canned answer starts "HTTP/1.1 NNN "
                bytes_in=self._body_bytes,
                bytes_out=len(response),
                upstream="-",
                duration=asyncio.get_running_loop().time() - self._started,
                protocol="http/1.0" if request.http_version == b"1.0" else "http/1.1",
            )

    def _response(self, request: h11.Request) -> tuple[bytes | None, bool]:
        """The answer to a request, and whether the connection closes after it. None: a
        challenge to ask the shared store about (_ask_store)."""
        close = request.http_version != b"1.1"
        length: bytes | None = None
        chunked = False
        host: bytes | None = None
        for name, value in request.headers:
            if name == b"host":
                host = value
            elif name == b"connection":
                close = close or b"close" in value.lower()
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        head = request.method == b"HEAD"
        if chunked and length is not None:  # ambiguous framing: a smuggling attempt
            return error_response(400, close=True, head=head), True
        if length is not None and int(length) > self._limits.max_body_bytes:
            return error_response(413, close=True, head=head), True
        if (head or request.method == b"GET") and request.target.startswith(ACME_PREFIX):
            return self._challenge(request.target, head, close), close
        location = https_location(host, request.target, self._https_port)
        if location is None:
            return error_response(400, close=True, head=head), True
        return redirect_response(location, close=close), close

    def _challenge(self, target: bytes, head: bool, close: bool) -> bytes | None:
        token = target[len(ACME_PREFIX) :]
        if self._acme is None or not token or not _TOKEN_CHARS.issuperset(token):
            return error_response(404, close=close, head=head)
        try:
            key_authorization = self._acme(token.decode("ascii"))
        except Exception:
            log.exception("http-01 responder failed for token %s", token.decode("ascii"))
            return error_response(500, close=close, head=head)
        if key_authorization is None:
            if self._acme_store is not None:
                return None
            return error_response(404, close=close, head=head)
        return plain_response(200, key_authorization.encode("ascii"), close=close, head=head)

    def _finish(self, response: bytes, close: bool) -> None:
        """Write one answer; on `close`, end the connection after it: our FIN goes at once,
        and what the client still sends (a body we refused) is read and dropped until it
        closes too, for _LINGER at most, so that no reset destroys the answer."""
        transport = self._transport
        if transport is None:
            return
        if response:
            transport.write(response)
        if close:
            self._closing = True
            self._cancel_timer()
            if self._paused:
                transport.resume_reading()
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER, transport.close)

    def _next_cycle(self) -> None:
        """The request was answered: start afresh on what the client already pipelined."""
        data, closed = self._conn.trailing_data
        self._conn = self._new_conn()
        self._strict.reset()
        if self._strict.feed(data):
            self._finish(error_response(400, close=True), close=True)
            return
        if data:
            self._conn.receive_data(data)
        if closed:
            self._conn.receive_data(b"")
        self._receiving = bool(data)
        if data:
            if self._access is not None:
                self._started = asyncio.get_running_loop().time()
            self._arm(self._limits.header_read_timeout, self._on_header_timeout)
        else:
            self._arm(self._limits.idle_timeout, self._on_idle_timeout, idle=True)

    # --- timers -----------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None], *, idle: bool = False) -> None:
        self._cancel_timer()
        self._timer_is_idle = idle
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_header_timeout(self) -> None:
        self._timer = None
        if self._closing or self._transport is None:
            return
        if self._receiving and not self._paused:
            self._finish(error_response(408, close=True), close=True)
        else:
            self._abort()

    def _on_body_timeout(self) -> None:
        self._timer = None
        if self._closing or self._transport is None:
            return
        self._finish(error_response(408, close=True), close=True)

    def _on_idle_timeout(self) -> None:
        self._timer = None
        if self._closing or self._transport is None:
            return
        if self._paused:  # a client that does not read would hold a graceful close open
            self._abort()
        else:
            self._finish(b"", close=True)

    def _abort(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()
