"""One client connection: h11 SERVER over the (TLS) transport, keep-alive, pipelining, timeouts.

h11 parses every byte the client sends; anything it refuses (bad chunk sizes, invalid
headers ...) gets 400 and the connection closes before the upstream sees a byte of that
request. What h11 tolerates and a proxy must not (Content-Length with Transfer-Encoding, bare
LF, obs-fold, a complete head over max_header_bytes) is refused here too: 400 or 431.

h11 at the parser level: its request-head parsing (request_head.py) and its Content-Length/
chunked body readers over its receive buffer (the very code h11.Connection runs), while this
class runs the request/response cycle (keep-alive: HTTP/1.1 without "Connection: close", the
request read completely, the response complete). Measured here, h11.Connection's state
machine around the readers cost as much as the parsing itself on this, the hottest path of
the program. The readers live in h11's private modules: h11 is pinned to a minor version for
that reason.

Requests on one connection are served one at a time, in order: bytes that arrive after a
request was read completely (a pipelined request) stay in the receive buffer and reading
stops; when the response is done those bytes start the next request before waiting for more.

Timers: one per connection with a deadline that is only moved, not re-created, per request:
- before the first byte of a request: `idle_timeout` (or `header_read_timeout` for the first
  request of a connection): the connection closes silently;
- from the first byte of a request until its head is complete: `header_read_timeout`
  (slowloris): 408 and close;
- while an exchange is in flight the upstream's timers apply instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
from h11._readers import ChunkedReader, ContentLengthReader
from h11._receivebuffer import ReceiveBuffer

from proxy.downstream.client_side import client_identity, emit_access, log_upstream_failure
from proxy.downstream.exchange import Exchange
from proxy.downstream.flow import (
    PEER_BUSY,
    PIPELINE,
    ReadGate,
    discards_after_close_notify,
    tune_write_buffer,
)
from proxy.downstream.forwarding import response_headers
from proxy.downstream.request_head import CONTROL_BYTES, RequestHead, read_request_head
from proxy.downstream.responses import error_response, reason
from proxy.errors import UpstreamError
from proxy.logs import log
from proxy.metrics import NO_SITE
from proxy.state import ProxyState
from proxy.tls import DirectSSLObject
from proxy.trace import ConnectionTrace
from proxy.upstream.response_parser import CHUNKED, UNTIL_CLOSE

if TYPE_CHECKING:
    from certs.models import ClientAuthSpec
    from proxy.upstream.response_parser import ResponseParser

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"
_COALESCE = 64 * 1024  # below this, head and body go out as one bytes object
# A Strict-Transport-Security line of a raw head (every field line follows a CRLF).
_STS_LINE = re.compile(rb"\r\nstrict-transport-security:[^\r]*", re.IGNORECASE)

# Where the connection is between requests.
_IDLE = 0  # waiting for the first byte of the next request
_HEAD = 1  # part of a request head arrived
_BUSY = 2  # an exchange is in flight
_CLOSING = 3

# After an error reply to a request whose body we will not read: how long to keep reading (and
# dropping) what the client still sends, so that the kernel does not answer it with a reset that
# destroys the reply. Over TLS on uvloop the TLS layer does this itself until the client closes,
# for at most its ssl_shutdown_timeout (30 s, as nginx's lingering_time).
_LINGER = 2.0
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head


def head_problem(raw: bytes, max_bytes: int) -> int:
    """0 if the request head at the start of `raw` is clean, else the status to answer.

    h11 is lenient where a proxy must not be: it accepts bare LF line ends, control bytes in
    field values, and unfolds obs-fold (the upstream would see a different message than a
    strict peer would), and it checks the head size only while the head is incomplete, so one
    large read slips through.
    """
    match = _HEAD_END.search(raw)
    end = match.end() if match is not None else len(raw)
    if end > max_bytes:
        return 431
    if raw.count(b"\n", 0, end) != raw.count(b"\r\n", 0, end):
        return 400  # a bare LF
    if raw.find(b"\n ", 0, end) >= 0 or raw.find(b"\n\t", 0, end) >= 0:
        return 400  # obs-fold
    if CONTROL_BYTES.search(raw, 0, end) is not None:
        return 400
    return 0


class DownstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_buf",
        "_client_eof",
        "_closed",
        "_deadline",
        "_head_chunks",
        "_loop",
        "_on_close",
        "_opened",
        "_pipelined",
        "_processing",
        "_request_done",
        "_resp_chunked",
        "_resp_head",
        "_ssl",
        "_timer",
        "_timer_at",
        "_tls",
        "_wait",
        "client_auth",
        "client_cert",
        "client_ip",
        "draining",
        "exchange",
        "gate",
        "last_tunnel_io",
        "limits",
        "sni",
        "state",
        "trace",
        "transport",
        "tunnel",
        "write_paused",
    )

    def __init__(
        self,
        state: ProxyState,
        on_close: Callable[[DownstreamProtocol], None],
        client_ip: str = "",
    ) -> None:
        self.state = state
        self.limits = state.limits
        self._on_close: Callable[[DownstreamProtocol], None] | None = on_close
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._buf = ReceiveBuffer()  # bytes from the client not parsed yet
        self._body: ContentLengthReader | ChunkedReader | None = None  # reading a request body
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.exchange: Exchange | None = None
        self.tunnel: Exchange | None = None
        self.sni: str | None = None
        # A client_auth site's handshake: (site name, its client_auth), and the RFC 9440
        # header lines of the certificate the client presented (b"" for none).
        self.client_auth: tuple[str, ClientAuthSpec] | None = None
        self.client_cert: bytes | None = None
        self.client_ip = client_ip  # from accept(); else read from the transport
        self.draining = False
        self.write_paused = False
        self._closed = False
        self._pipelined = False  # reading paused: a pipelined request waits for its turn
        self.last_tunnel_io = 0.0  # loop time of the last byte either way through a tunnel
        self._request_done = False  # the current request was read completely
        self._client_eof = False
        self._tls = False
        self._ssl: DirectSSLObject | None = None  # told of the client's close_notify
        self._processing = False
        self._wait = _IDLE
        self._head_chunks: list[bytes] = []  # the raw bytes of the head being received
        self._resp_head: bytes | None = None  # a response head waiting to go with body bytes
        self._resp_chunked = False  # the response being sent is re-chunked
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        # At debug only: (when the connection opened, its peer) until its first request, for
        # the line about connections that close without one.
        self._opened: tuple[float, str] | None = None
        self.trace: ConnectionTrace | None = None  # `run --trace`: set by the listener

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        ssl_object = client_identity(self, transport)
        if ssl_object is not None:
            self._tls = True
            if isinstance(ssl_object, DirectSSLObject):
                self._ssl = ssl_object
                ssl_object.on_close_notify = self._on_close_notify
        self.gate = ReadGate(transport, tls=self._tls)
        tune_write_buffer(transport)  # type: ignore[arg-type]
        if log.isEnabledFor(logging.DEBUG):
            peer = transport.get_extra_info("peername")
            who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
            self._opened = (self._loop.time(), who)
        self._set_deadline(self._loop.time() + self.limits.header_read_timeout)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel_io()
            tunnel.tunnel_from_client(data)
            return
        wait = self._wait
        if wait == _CLOSING:
            return  # lingering after an error reply: drop the rest of the body
        if wait == _BUSY and self._request_done:
            # The next (pipelined) request: it waits in the buffer for its turn.
            self._buf += data
            if not self._pipelined:
                self._pipelined = True
                self.gate.pause(PIPELINE)
            return
        try:
            if wait == _IDLE:
                self._wait = _HEAD
                self._deadline = self._loop.time() + self.limits.header_read_timeout
            if wait != _BUSY:
                self._head_chunks.append(data)
            elif self._body is not None:
                self._deadline = self._loop.time() + self.limits.body_read_timeout
            self._buf += data
            self._process()
        except Exception:
            self.internal_error()

    def eof_received(self) -> bool | None:
        # Over TCP, the client's FIN. Over TLS, only a close_notify read while we close (any
        # other reaches _on_close_notify instead); the TLS transport closes whatever we return.
        keep_open = self._client_ended()
        return keep_open and not self._tls

    def _on_close_notify(self) -> None:
        """The client half-closed over TLS. Called from inside the TLS layer's read, before the
        data decrypted with the close_notify reaches data_received: the FIN that follows must
        stay unread (a TLS layer shuts down on it), and the rest waits for that data."""
        self._client_eof = True
        self.gate.hold_socket()
        self._loop.call_soon(self._client_ended)

    def _client_ended(self) -> bool:
        """The client will send nothing more. True: the connection stays open for what is
        still to be sent (the responses to requests it sent in full, a tunnel's other way)."""
        self._client_eof = True
        try:
            if self.tunnel is not None:
                self.tunnel.client_eof()
                return True
            if self._wait == _CLOSING or self._closed:
                return False
            if self.exchange is None:
                self._close()
                return False
            if self._request_done:
                return True  # its response, and those of requests already here, still go out
            if self._body is not None:
                self._body.read_eof()  # raises: the body is incomplete
            self._close()
            return False
        except h11.ProtocolError as exc:
            self._reject(exc.error_status_hint)
            return False
        except Exception:
            self.internal_error()
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.trace is not None:
            self.trace.closed(not self.trace.proxy_closed, exc)
        if self._opened is not None:
            self._log_no_request(self._opened, exc)
        if self._ssl is not None:
            self._ssl.on_close_notify = None
        self._wait = _CLOSING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._drop_exchange()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close(self)

    def _log_no_request(self, opened: tuple[float, str], exc: Exception | None) -> None:
        """Debug: a connection that ended before a whole request head (a port scanner, a
        browser's speculative connection, a health check that only opens TLS, a slowloris)."""
        since, who = opened
        if self._client_eof or exc is not None:
            how = "the client closed it" + (f" ({exc})" if exc is not None else "")
        else:
            how = "closed by the proxy (header_read_timeout, a refused request or a shutdown)"
        partial = sum(len(c) for c in self._head_chunks)
        log.debug(
            "%s: connection closed before a request%s, open %.3fs, sni=%s: %s",
            who,
            f" ({partial} bytes of a request head)" if partial else "",
            self._loop.time() - since,
            self.sni or "-",
            how,
        )

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.tunnel or self.exchange
        if exchange is not None:
            exchange.client_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.tunnel or self.exchange
        if exchange is not None:
            exchange.client_write_resumed()

    # --- the server's controls ------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful drain: an idle connection closes now, a busy one after its response."""
        self.draining = True
        if self.exchange is None and self.tunnel is None and not self._closed:
            self._close()

    @property
    def idle(self) -> bool:
        return self.exchange is None and self.tunnel is None

    @property
    def owes_client(self) -> bool:
        """Whether a drain must wait for this connection: a request in progress, or bytes
        still to write. One that is only waiting for the client to answer our close_notify
        does not count: an idle pooled client connection (httpx, urllib3) reads nothing until
        its next request, so it may never answer."""
        if self._wait != _CLOSING:
            return True
        transport = self.transport
        return transport is not None and transport.get_write_buffer_size() > 0

    # --- requests -------------------------------------------------------------------------

    def _process(self) -> None:
        """Parse what the buffer holds: a request head, then its body, handed to the exchange."""
        if self._processing:
            return  # called again from inside the loop (an exchange ended): the loop goes on
        self._processing = True
        buf = self._buf
        try:
            while self._wait != _CLOSING:
                body = self._body
                if body is None:
                    if self._wait == _BUSY:
                        break  # the request is read; what follows waits for the response
                    request = read_request_head(buf)
                    if request is None:
                        if len(buf) > self.limits.max_header_bytes:
                            self._reject(431)
                        break
                    exchange = self._begin(request)
                    if exchange is None:
                        break
                    if not exchange.has_body:
                        self._end_of_request(exchange)
                        break
                    self._body = (
                        ChunkedReader()
                        if exchange.req_chunked
                        else ContentLengthReader(exchange.content_length)
                    )
                    self._set_deadline(self._loop.time() + self.limits.body_read_timeout)
                    continue
                event = body(buf)
                if event is None:
                    break
                if type(event) is h11.Data:
                    self.exchange.on_request_data(event.data)  # type: ignore[union-attr]
                else:  # EndOfMessage (trailers, if any, are dropped)
                    self._body = None
                    self._end_of_request(self.exchange)  # type: ignore[arg-type]
                    break
        except h11.ProtocolError as exc:
            self._reject(exc.error_status_hint)
        finally:
            self._processing = False
        exchange = self.exchange
        if exchange is not None:
            if exchange.pending or not exchange.head_sent:
                exchange.flush()
        elif self._wait == _HEAD:
            self._set_deadline(self._deadline)  # a partial head: make sure its timer runs

    def _begin(self, request: RequestHead) -> Exchange | None:
        chunks = self._head_chunks
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        problem = head_problem(raw, self.limits.max_header_bytes)
        if problem:
            self._reject(problem, request)
            return None
        self._wait = _BUSY
        self._request_done = False
        self._opened = None  # it had a request: not worth the closing line
        started = self._loop.time() if self.state.timed else 0.0
        exchange = self.exchange = Exchange(self, request, started)
        if self.trace is not None:
            self._trace_request(exchange, request)
        exchange.start(request)
        return exchange if self.exchange is exchange else None

    def _trace_request(self, exchange: Exchange, request: RequestHead) -> None:
        assert self.trace is not None
        # The trace's clock is time.monotonic() (uvloop's counts milliseconds).
        now = time.monotonic()
        trace = exchange.trace = self.trace.request(str(self.trace.requests + 1), now)
        # The head's first byte set the deadline header_read_timeout ahead of it (and nothing
        # moves it until the head is complete): that is when the head started.
        since = self._loop.time() - (self._deadline - self.limits.header_read_timeout)
        first_byte = now - since
        version = request.http_version.decode("latin-1")
        line = (
            f"{request.method.decode('latin-1')} {request.target.decode('latin-1')} HTTP/{version}"
        )
        trace.head(line, request.fields, f"HTTP/{version} request head as h11 read it", first_byte)

    def _end_of_request(self, exchange: Exchange) -> None:
        self._request_done = True
        exchange.on_request_end()

    def _release(self) -> None:
        """Read again after a pipelined request waited for the response before it."""
        if self._pipelined:
            self._pipelined = False
            self.gate.resume(PIPELINE)

    def exchange_done(self, exchange: Exchange, complete: bool, *, abort: bool = False) -> None:
        """The response is complete (or failed): next request, or close."""
        self._resp_head = None
        self._resp_chunked = False
        if self.exchange is exchange:
            self.exchange = None
        if self._closed:
            return
        if abort:
            # The response was cut short: end without close_notify, so that a client reading
            # to the end of the connection (HTTP/1.0, close-delimited) sees a truncation, not
            # a complete body.
            self._wait = _CLOSING
            self.transport.abort()
            return
        if self.gate.reasons & PEER_BUSY:
            self.gate.resume(PEER_BUSY)
        # A request without a body is complete with its head, even when it was answered (an
        # error) before the head was handed on: nothing more will come to linger for.
        request_done = self._request_done or not exchange.has_body
        ended = self._client_eof and not self._buf  # requests it sent before its EOF go on
        if not (complete and exchange.keep_alive) or self.draining or ended or not request_done:
            self._close(linger=not request_done)
            return
        self._release()
        if not self._buf:
            self._wait = _IDLE
            self._set_deadline(self._loop.time() + self.limits.idle_timeout)
            return
        # A pipelined request is already here: it starts now, with its own head timeout.
        self._wait = _HEAD
        self._deadline = self._loop.time() + self.limits.header_read_timeout
        self._head_chunks.append(bytes(self._buf))
        self._process()
        if self._client_eof and self.exchange is None and self._wait != _CLOSING:
            self._close()  # what is left is not a whole request, and nothing more comes

    def start_tunnel(self, exchange: Exchange) -> bytes:
        """After a 101: bytes go both ways unparsed. Returns what the client sent early."""
        self.exchange = None
        self.tunnel = exchange
        early = bytes(self._buf)
        self._buf = ReceiveBuffer()
        self.last_tunnel_io = self._loop.time()
        self._set_deadline(self.last_tunnel_io + self.limits.tunnel_idle_timeout)
        self._release()
        return early

    def tunnel_io(self) -> None:
        """A byte went through the tunnel, either way: its idle timer starts again."""
        self.last_tunnel_io = self._loop.time()

    # --- the response, framed as HTTP/1.1 (the exchange's ClientSide) ------------------------

    def send_continue(self) -> int:
        return self._write(_CONTINUE)

    def send_head(
        self,
        exchange: Exchange,
        status: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]] | None,
        parser: ResponseParser,
    ) -> None:
        hsts = exchange.hsts
        if headers is None:  # nothing to rewrite: the upstream's own bytes go on
            if hsts is None:
                parts = [parser.raw_head]
            else:  # the site's policy replaces the app's (one header, the configured one)
                parts = [_STS_LINE.sub(b"", parser.raw_head), hsts]
        else:
            parts = [b"HTTP/1.1 %d %s\r\n" % (status, phrase or reason(status))]
            fields = response_headers(headers)
            if hsts is not None:
                fields = [f for f in fields if f[0] != b"strict-transport-security"]
            for name, value in fields:
                parts += (name, b": ", value, _CRLF)
            if hsts is not None:
                parts.append(hsts)
        body = parser.body
        if body == CHUNKED or body == UNTIL_CLOSE:
            if exchange.http10:
                exchange.keep_alive = False  # an HTTP/1.0 client reads until we close
            else:
                parts.append(b"transfer-encoding: chunked\r\n")
                self._resp_chunked = True
        if exchange.keep_alive and self.draining:
            exchange.keep_alive = False
        if not exchange.keep_alive:
            parts.append(b"connection: close\r\n")
        elif exchange.http10:
            parts.append(b"connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        parts.append(_CRLF)
        # It waits for the first body bytes, to go out in the same TLS record.
        self._resp_head = b"".join(parts)

    def send_body(self, data: bytes) -> int:
        head = self._resp_head
        if self._resp_chunked:
            size = b"%x\r\n" % len(data)
            if head is not None:
                self._resp_head = None
                return self._write_parts((head, size, data, _CRLF))
            return self._write_parts((size, data, _CRLF))
        if head is not None:
            self._resp_head = None
            return self._write_parts((head, data))
        return self._write(data)

    def send_end(self) -> int:
        head = self._resp_head
        self._resp_head = None
        if self._resp_chunked:
            return self._write(_LAST_CHUNK if head is None else head + _LAST_CHUNK)
        if head is not None:
            return self._write(head)
        return 0

    def flush_head(self) -> int:
        head = self._resp_head
        if head is None:
            return 0
        self._resp_head = None
        return self._write(head)

    def send_error(
        self, status: int, *, head: bool, retry_after: int | None, hsts: bytes | None
    ) -> int:
        self._resp_head = None
        return self._write(
            error_response(status, close=True, head=head, retry_after=retry_after, hsts=hsts)
        )

    def send_switch(self, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        parts = [b"HTTP/1.1 101 ", phrase or b"Switching Protocols", _CRLF]
        for name, value in response_headers(headers, upgrade=True):
            parts += (name, b": ", value, _CRLF)
        parts.append(_CRLF)
        return self._write(b"".join(parts))

    def pause_reading(self) -> None:
        self.gate.pause(PEER_BUSY)

    def resume_reading(self) -> None:
        if self.gate.reasons & PEER_BUSY:
            self.gate.resume(PEER_BUSY)

    def abort(self) -> None:
        self.transport.abort()

    def _write(self, data: bytes) -> int:
        transport = self.transport
        if transport.is_closing():  # the client left; uvloop raises on a closed transport
            return 0
        transport.write(data)
        return len(data)

    def _write_parts(self, parts: tuple[bytes, ...]) -> int:
        transport = self.transport
        if transport.is_closing():
            return 0
        size = 0
        for part in parts:
            size += len(part)
        if size <= _COALESCE:
            transport.write(b"".join(parts))
        else:
            transport.writelines(parts)
        return size

    # --- errors and closing ---------------------------------------------------------------

    def _reject(self, status: int, request: RequestHead | None = None) -> None:
        """The request is refused while its head or body is parsed (400, 431, 501)."""
        if status not in (400, 431, 501, 505):
            status = 400
        exchange = self.exchange
        if exchange is not None and not exchange.resp_started:
            exchange.client_failed(status)
            return
        if exchange is not None:
            exchange.client_failed(0)
            return
        self._refuse(status, request)

    def _refuse(
        self, status: int, request: RequestHead | None = None, *, linger: bool = True
    ) -> None:
        """Answer a request that never became an exchange, log it, close."""
        response = error_response(status, close=True)
        self.transport.write(response)
        if self.state.access_log.enabled:
            self._log_refusal(status, len(response), request)
        if self.state.metrics is not None:
            method = request.method if request is not None else b"-"
            self.state.metrics.request_done(NO_SITE, method, status, 0, len(response), 0.0)
        self._close(linger=linger)

    def _log_refusal(self, status: int, size: int, request: RequestHead | None) -> None:
        """An access log line for a request that never became an exchange."""
        if request is not None:
            method, target = request.method, request.target
            host = next((v for n, v in request.fields if n == b"host"), None)
        else:  # best effort: the request line, if it is there
            first = b"".join(self._head_chunks)[:8192].split(b"\r\n", 1)[0].split(b" ")
            method, target = (first[0], first[1]) if len(first) == 3 else (b"-", b"-")
            host = None
        self._head_chunks.clear()
        self.state.access_log.emit(
            client=self.client_ip,
            sni=self.sni,
            host=host,
            method=method,
            target=target,
            status=status,
            bytes_in=0,
            bytes_out=size,
            upstream="-",
            duration=0.0,
            protocol="http/1.0"
            if request is not None and request.http_version == b"1.0"
            else "http/1.1",
        )

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
        elif self._timer_at > deadline:
            timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        wait = self._wait
        if wait == _CLOSING or self._closed:
            return
        if wait == _BUSY:
            if self.tunnel is not None:
                self._deadline = self.last_tunnel_io + self.limits.tunnel_idle_timeout
            elif self._body is None:
                return  # the request is read: the upstream's timers apply
            elif self.gate.reasons:
                # Not reading: the upstream is slow to take the body, not the client to send it.
                self._deadline = self._loop.time() + self.limits.body_read_timeout
        deadline = self._deadline
        if self._loop.time() < deadline:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        if wait == _BUSY:
            self._busy_timeout()
        elif wait == _HEAD:
            self._refuse(408, linger=False)  # a client this slow gets no more time
        else:
            self._close()

    def _close(self, *, linger: bool = False) -> None:
        """Close after what is buffered has been written. With `linger`, the client may still
        be sending a body we will not read: our side ends at once (TLS close_notify, or FIN),
        and what the client still sends is read and dropped for a while, so the kernel does
        not answer it with a reset that destroys our response (nginx's lingering close)."""
        self._wait = _CLOSING
        if self.trace is not None and not self._client_eof:
            self.trace.proxy_closed = True  # the client's close_notify may answer ours
        transport = self.transport
        if transport.is_closing():
            return
        if self._ssl is not None:
            self._ssl.on_close_notify = None  # the TLS layer's own shutdown reads it now
        self._pipelined = False
        self.gate.open()
        if not linger:
            transport.close()
            return
        if not self._tls:
            transport.write_eof()
            self._loop.call_later(_LINGER, transport.close)
        elif discards_after_close_notify(transport):
            transport.close()  # the TLS layer reads into the void until the client closes
        else:
            # asyncio's TLS layer would reset the connection on the first record after our
            # close_notify: the close_notify waits for the linger instead.
            self._loop.call_later(_LINGER, transport.close)

    def _busy_timeout(self) -> None:
        """A tunnel idle for tunnel_idle_timeout, or a request body that stalled for
        body_read_timeout (nginx's client_body_timeout): 408 if no response started, and the
        upstream connection is closed short of the body's end, so the app sees an aborted
        request, never a complete one."""
        if self.tunnel is not None:
            log.debug(
                "closing a tunnel from %s idle for %gs (tunnel_idle_timeout)",
                self.client_ip,
                self.limits.tunnel_idle_timeout,
            )
            self._drop_exchange()
            self._close()
            return
        exchange = self.exchange
        self._body = None
        if exchange is not None:
            exchange.client_failed(408)

    def internal_error(self) -> None:
        """A bug surfaced in this connection: log it, close this connection only."""
        log.exception("unexpected error in a client connection from %s", self.client_ip)
        self._drop_exchange()
        self._wait = _CLOSING
        self.transport.abort()

    def _drop_exchange(self) -> None:
        """The client side is gone or broken: let the exchange release its upstream."""
        exchange = self.tunnel or self.exchange
        self.tunnel = self.exchange = None
        if exchange is not None:
            try:
                exchange.client_lost()
            except Exception:
                log.exception("error while releasing the upstream of a client connection")

    # --- logging --------------------------------------------------------------------------

    def log_access(self, exchange: Exchange) -> None:
        protocol = "http/1.0" if exchange.http10 else "http/1.1"
        emit_access(self.state, self.client_ip, self.sni, exchange, protocol, self._loop.time())

    def log_upstream_failure(self, exchange: Exchange, error: UpstreamError) -> None:
        log_upstream_failure(self.client_ip, exchange, error)
