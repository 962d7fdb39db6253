"""One HTTP/2 client connection (ALPN h2): h2's state machine over the TLS transport, each stream
an `H2Stream` that is the exchange's client side, so every request becomes one HTTP/1.1 request
to the site's upstream exactly as over HTTP/1.1 (exchange.py: routing, rewriting, pools, retries,
limits). h2 (python-hyper) does the framing, HPACK and the flow-control windows; this module
decides what to read, what to send and when to give up.

Flow control is backpressure, per stream:
- request bodies: the client's window for a stream is reopened (WINDOW_UPDATE) only for bytes
  the upstream took; while the upstream is connecting or its write buffer is full, the stream's
  bytes stay unacknowledged and the client can send no more than its window (64 KiB a stream,
  1 MiB the connection);
- responses: bytes beyond the client's window wait in the stream's queue; past `_QUEUE_HIGH`
  the stream's upstream connection stops being read, and only that one: a client that reads one
  stream slowly does not slow its others;
- while the client does not read at all (the TLS write buffer over its high-water mark),
  nothing more is read from it either: a client cannot make us buffer PING or SETTINGS replies.

Defences (RFC 9113 and the HTTP/2 attacks of recent years). Each ends the connection with a
GOAWAY carrying the code below, and costs the other connections nothing more than its frames:

    more than 100 streams open at once      PROTOCOL_ERROR (h2's SETTINGS_MAX_CONCURRENT_STREAMS)
    malformed header block                  PROTOCOL_ERROR (h2_request.py's checks)
    header block over 2 x max_header_bytes  ENHANCE_YOUR_CALM (HPACK bomb, CONTINUATION flood)
    over 64 CONTINUATION frames             PROTOCOL_ERROR (h2)
    streams reset while in flight, SETTINGS, PING, PRIORITY or empty DATA frames over their rate
    (FloodGuard: rapid reset, CVE-2023-44487; floods, CVE-2019-9512/9515/9518) ENHANCE_YOUR_CALM
    a response waiting on a closed window for upstream_read_timeout (zero-window stall; nginx's
    send_timeout)                           ENHANCE_YOUR_CALM
    no stream for idle_timeout (header_read_timeout before the first)        NO_ERROR

A header list over max_header_bytes (but not a bomb) is a 431 on its stream; a request h11's
grammar refuses is a 400 (h2_request.py). A stream answered before its whole request body (413)
reads and drops the rest, up to 1 MiB or body_read_timeout, then RST_STREAM NO_ERROR. SIGTERM
sends GOAWAY with the last stream taken, lets those streams finish, then closes.

HTTP/2 has no 101: WebSocket clients open an HTTP/1.1 connection (no RFC 8441 extended CONNECT,
so SETTINGS_ENABLE_CONNECT_PROTOCOL is not sent and a CONNECT stream gets 405).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.downstream.client_side import client_identity, emit_access, log_upstream_failure
from proxy.downstream.exchange import Exchange
from proxy.downstream.flow import PEER_BUSY, ReadGate, tune_write_buffer
from proxy.downstream.forwarding import response_headers
from proxy.downstream.h2_hpack import RepeatingDecoder, StaticEncoder
from proxy.downstream.h2_request import H2RequestError, MalformedRequest, request_from_h2
from proxy.downstream.responses import error_body
from proxy.errors import UpstreamError
from proxy.logs import log
from proxy.tls import DirectSSLObject
from proxy.trace import ConnectionTrace

if TYPE_CHECKING:
    from certs.models import ClientAuthSpec
    from proxy.state import ProxyState
    from proxy.upstream.response_parser import ResponseParser

MAX_CONCURRENT_STREAMS = 100
STREAM_WINDOW = 65535  # RFC 9113's initial window: what one stream's request may have in flight
CONNECTION_WINDOW = 1024 * 1024  # ... and all of a connection's together
_QUEUE_HIGH = 256 * 1024  # response bytes waiting for a stream's window: stop its upstream
_QUEUE_LOW = 64 * 1024
_DISCARD_LIMIT = 1024 * 1024  # request body read and dropped after an early response
# FloodGuard's limits: how many of each in one second.
RESETS_PER_SECOND = 100
SETTINGS_PER_SECOND = 100
PINGS_PER_SECOND = 100
PRIORITIES_PER_SECOND = 1000
EMPTY_FRAMES_PER_SECOND = 100  # DATA frames with no byte that do not end the stream
# h2 parses all it is given before it returns events: what a read brings is fed in slices, so a
# flood of tiny frames is stopped after one slice, not after the whole read.
_FEED_SLICE = 16 * 1024
_STATUS = [b"%d" % n for n in range(1000)]  # the upstream parser takes 100 to 999
_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")


class FloodGuard:
    """Counts what a client may send now and then but not in a flood, per one-second window
    (sans-I/O: the caller passes the time). `spend` says False once a kind is over its limit."""

    __slots__ = ("_counts", "_limits", "_window")

    def __init__(self, limits: dict[str, int]) -> None:
        self._limits = limits
        self._counts = dict.fromkeys(limits, 0)
        self._window = -1.0

    def spend(self, kind: str, now: float) -> bool:
        if now - self._window >= 1.0:
            self._window = now
            for name in self._counts:
                self._counts[name] = 0
        count = self._counts[kind] + 1
        self._counts[kind] = count
        return count <= self._limits[kind]


def _h2_settings(max_header_list: int) -> dict[int, int]:
    codes = h2.settings.SettingCodes
    return {
        codes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        codes.MAX_HEADER_LIST_SIZE: max_header_list,
    }


def response_fields(
    parser: ResponseParser, headers: list[tuple[bytes, bytes]] | None
) -> list[tuple[bytes, bytes]]:
    """The upstream response's fields for an HTTP/2 client: hop-by-hop fields out (as for
    HTTP/1.1), names lowercase (HTTP/2 requires it; the raw head keeps the app's case)."""
    if headers is not None:
        return response_headers(headers)
    raw = parser.raw_head
    fields = []
    for line in raw[raw.find(b"\r\n") + 2 :].split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.lower(), value.strip(b" \t")))
    return fields


@functools.lru_cache(maxsize=256)
def _hsts_field(line: bytes) -> tuple[bytes, bytes]:
    """A site's Strict-Transport-Security line ("name: value\\r\\n") as a field: once per
    configured line, not per response (a config has a few)."""
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


class H2Stream:
    """One request/response of an HTTP/2 connection: the `ClientSide` of its exchange."""

    __slots__ = (
        "blocked_since",
        "client_auth",
        "client_cert",
        "client_ip",
        "conn",
        "discarded",
        "discarding",
        "end_queued",
        "ended",
        "exchange",
        "head",
        "last_read",
        "out",
        "out_size",
        "read_paused",
        "request_done",
        "sni",
        "state",
        "stream_id",
        "unacked",
        "write_paused",
    )

    def __init__(self, conn: H2Protocol, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.state = conn.state
        self.sni = conn.sni
        self.client_ip = conn.client_ip
        self.client_auth = conn.client_auth
        self.client_cert = conn.client_cert
        self.exchange: Exchange | None = None
        self.head: list | None = None  # a response head waiting to go with the first body bytes
        self.out: collections.deque[bytes] = collections.deque()  # waiting for the window
        self.out_size = 0
        self.end_queued = False
        self.ended = False  # END_STREAM (or RST_STREAM) sent: nothing more goes out
        self.discarding = False  # answered before its whole body: the rest is read and dropped
        self.discarded = 0
        self.request_done = False
        self.read_paused = False
        self.unacked = 0  # request bytes received but not yet acknowledged (window held)
        self.write_paused = conn.write_blocked
        self.blocked_since = 0.0  # since when response bytes wait for the client's window
        self.last_read = 0.0

    @property
    def draining(self) -> bool:
        return self.conn.draining

    # --- the response (the exchange's ClientSide) ----------------------------------------

    def send_continue(self) -> int:
        if not self.ended:
            self.conn.h2.send_headers(self.stream_id, [(b":status", b"100")])
            self.conn.want_flush()
        return 0

    def send_head(
        self,
        exchange: Exchange,
        status: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]] | None,
        parser: ResponseParser,
    ) -> None:
        fields = response_fields(parser, headers)
        hsts = exchange.hsts
        if hsts is not None:  # the site's policy replaces the app's
            fields = [f for f in fields if f[0] != b"strict-transport-security"]
            fields.append(_hsts_field(hsts))
        fields.insert(0, (b":status", _STATUS[status]))
        self.head = fields  # waits for the first body bytes, to go out in the same write

    def _send_head(self, end: bool) -> int:
        head = self.head
        self.head = None
        if head is None or self.ended:
            return 0
        self.conn.h2.send_headers(self.stream_id, head, end_stream=end)
        if end:
            self._ended()
        self.conn.want_flush()
        return sum(len(n) + len(v) for n, v in head)

    def send_body(self, data: bytes) -> int:
        sent = self._send_head(False) if self.head is not None else 0
        if self.ended or not data:
            return sent
        self.out.append(data)
        self.out_size += len(data)
        if self.out_size > _QUEUE_LOW:
            self.conn.pump(self)
        # else it waits for the end of this read (flush_head) or the response's end: a small
        # response then goes as HEADERS and one DATA frame that ends the stream.
        return sent + len(data)

    def send_end(self) -> int:
        if self.head is not None and not self.out:
            return self._send_head(True)
        sent = self._send_head(False) if self.head is not None else 0
        self.end_queued = True
        self.conn.pump(self)
        return sent

    def flush_head(self) -> int:
        sent = self._send_head(False) if self.head is not None else 0
        if self.out:
            self.conn.pump(self)
        return sent

    def send_error(
        self, status: int, *, head: bool, retry_after: int | None, hsts: bytes | None
    ) -> int:
        self.head = None
        if self.ended:
            return 0
        text = error_body(status)
        body = b"" if head else text
        length = (b"content-length", b"%d" % len(text))
        fields = [(b":status", _STATUS[status]), _TEXT_PLAIN, length]
        if retry_after is not None:
            fields.append((b"retry-after", b"%d" % max(0, retry_after)))
        if hsts is not None:
            fields.append(_hsts_field(hsts))
        self.head = fields
        if not body:
            return self._send_head(True)
        return self.send_body(body) + self.send_end()

    def send_switch(self, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        # Unreachable: an HTTP/2 request is never an upgrade (h2 refuses Upgrade and
        # Connection), so the exchange answers any 101 with 502 before this.
        raise AssertionError("HTTP/2 has no 101")

    # --- flow and lifecycle -------------------------------------------------------------

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False
        if self.unacked:
            self.conn.acknowledge(self, self.unacked)
            self.unacked = 0

    def abort(self) -> None:
        # Only the exchange's client_stalled calls it: the client read nothing of a response
        # for upstream_read_timeout. As nginx's send_timeout, the connection goes.
        self.conn.give_up("a stream's response waited upstream_read_timeout for the client")

    def exchange_done(self, exchange: Exchange, complete: bool, *, abort: bool = False) -> None:
        if self.exchange is exchange:
            self.exchange = None
        if abort:
            self.reset(ErrorCodes.INTERNAL_ERROR)  # the response must look incomplete
        elif not self.request_done:
            # Answered before the whole request body came (a 413, an early error). RFC 9113
            # 8.1 allows RST_STREAM NO_ERROR after the response, but curl 7.88 and httpx then
            # report a stream error instead of the response: the rest is read and dropped, as
            # nginx's lingering close does, up to _DISCARD_LIMIT bytes or body_read_timeout.
            self.discarding = True
            self.conn.discard_from(self)
        self.conn.stream_finished(self)

    def start_tunnel(self, exchange: Exchange) -> bytes:
        raise AssertionError("HTTP/2 has no 101")

    def tunnel_io(self) -> None:
        raise AssertionError("HTTP/2 has no 101")

    def internal_error(self) -> None:
        log.exception("unexpected error in an HTTP/2 stream from %s", self.client_ip)
        exchange, self.exchange = self.exchange, None
        self.reset(ErrorCodes.INTERNAL_ERROR)
        if exchange is not None:
            exchange.client_lost()
        self.conn.stream_finished(self)

    def log_access(self, exchange: Exchange) -> None:
        emit_access(self.state, self.client_ip, self.sni, exchange, "h2", self.conn.now())

    def log_upstream_failure(self, exchange: Exchange, error: UpstreamError) -> None:
        log_upstream_failure(self.client_ip, exchange, error)

    # --- the connection's side -----------------------------------------------------------

    def _ended(self) -> None:
        self.ended = True
        self.out.clear()
        self.out_size = 0
        self.blocked_since = 0.0

    def reset(self, code: ErrorCodes) -> None:
        """RST_STREAM, unless the stream is over on both sides already."""
        conn = self.conn
        self.ended = True
        self.request_done = True  # nothing more is read of it
        self.out.clear()
        self.out_size = 0
        self.head = None
        self.blocked_since = 0.0
        try:
            conn.h2.reset_stream(self.stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass
        conn.want_flush()


class H2Protocol(asyncio.Protocol):
    """An HTTP/2 connection after ALPN chose h2 (see the module's docstring)."""

    def __init__(
        self,
        state: ProxyState,
        on_close: Callable[[H2Protocol], None],
        client_ip: str = "",
    ) -> None:
        self.state = state
        self.limits = state.limits
        self._on_close: Callable[[H2Protocol], None] | None = on_close
        self.client_ip = client_ip
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.sni: str | None = None
        self.client_auth: tuple[str, ClientAuthSpec] | None = None
        self.client_cert: bytes | None = None
        self.draining = False
        self.write_blocked = False  # the TLS write buffer is over its high-water mark
        self.streams: dict[int, H2Stream] = {}
        self.active = 0  # streams whose exchange is not over
        self.trace: ConnectionTrace | None = None  # `run --trace`: set by the listener
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # Checked in one pass by h2_request (h2's own checks walk the fields six times).
                validate_inbound_headers=False,
                normalize_inbound_headers=False,  # h2_request joins cookies itself
                # What goes out is built here from validated upstream fields.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.encoder = StaticEncoder()  # type: ignore[assignment]
        self.h2.decoder = RepeatingDecoder()
        self.gate: ReadGate = None  # type: ignore[assignment]
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._closed = False
        self._goaway_sent = False
        self._last_stream = 0  # after a graceful GOAWAY: streams above it are refused
        self._flush_scheduled = False
        self._unflushed = 0  # DATA bytes h2 holds that are not in the transport yet
        self._touched: list[H2Stream] = []
        self._guard = FloodGuard(
            {
                "reset": RESETS_PER_SECOND,
                "settings": SETTINGS_PER_SECOND,
                "ping": PINGS_PER_SECOND,
                "priority": PRIORITIES_PER_SECOND,
                "empty": EMPTY_FRAMES_PER_SECOND,
            }
        )
        self._requests = 0
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Twice the limit: the 431 answers a header list over max_header_bytes, the decoder
        # stops (GOAWAY) only where no honest client could be.
        self._hard_header_limit = 2 * self.limits.max_header_bytes

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        ssl_object = client_identity(self, transport)
        if isinstance(ssl_object, DirectSSLObject):
            ssl_object.on_close_notify = None  # a half-close ends an HTTP/2 connection
        self.gate = ReadGate(transport, tls=ssl_object is not None)
        tune_write_buffer(transport)  # type: ignore[arg-type]
        conn = self.h2
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values=_h2_settings(self._hard_header_limit)
        )
        conn.decoder.max_header_list_size = self._hard_header_limit
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._idle_since = self._loop.time()
        self._flush()
        self._arm(self._idle_since + self.limits.header_read_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if len(data) > _FEED_SLICE:
            view = memoryview(data)
            for start in range(0, len(data), _FEED_SLICE):
                self._receive(view[start : start + _FEED_SLICE])
                if self._closed:
                    return
            return
        self._receive(data)

    def _receive(self, data: bytes | memoryview) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            self._end(ErrorCodes.ENHANCE_YOUR_CALM, str(exc), queued=True)
            return
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued the GOAWAY with the error's code.
            self._end(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR), str(exc), queued=True)
            return
        except Exception:
            self.internal_error()
            return
        try:
            for event in events:
                self._on_event(event)
                if self._closed:
                    return
            self._check_header_block()
            touched = self._touched
            if touched:
                for stream in touched:
                    exchange = stream.exchange
                    if exchange is not None and (exchange.pending or not exchange.head_sent):
                        exchange.flush()
                touched.clear()
        except Exception:
            self.internal_error()
            return
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.trace is not None:
            # Ended by us (_end: GOAWAY, or a drain) unless the transport reports an error.
            self.trace.closed(not self._closed or exc is not None, exc)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        streams = list(self.streams.values())
        self.streams.clear()
        try:
            for stream in streams:
                exchange, stream.exchange = stream.exchange, None
                if exchange is not None:
                    try:
                        exchange.client_lost()
                    except Exception:
                        log.exception("error while releasing the upstream of an HTTP/2 stream")
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close(self)

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.gate.pause(PEER_BUSY)
        for stream in self.streams.values():
            self._update_write_paused(stream)

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.gate.resume(PEER_BUSY)
        for stream in list(self.streams.values()):
            self._update_write_paused(stream)

    def eof_received(self) -> bool | None:
        return False  # the client is done: close (streams still open are lost with it)

    # --- events -------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            self._on_data(event)  # type: ignore[arg-type]
        elif kind is h2.events.RequestReceived:
            self._on_request(event)  # type: ignore[arg-type]
        elif kind is h2.events.StreamEnded:
            stream = self.streams.get(event.stream_id)  # type: ignore[attr-defined]
            if stream is not None and not stream.request_done:
                stream.request_done = True
                if stream.exchange is not None:
                    stream.exchange.on_request_end()
                    self._touched.append(stream)
                else:
                    self._forget_if_over(stream)
        elif kind is h2.events.WindowUpdated:
            stream_id = event.stream_id  # type: ignore[attr-defined]
            if stream_id:
                stream = self.streams.get(stream_id)
                if stream is not None and stream.out:
                    self.pump(stream)
            else:
                self._pump_all()
        elif kind is h2.events.StreamReset:
            self._on_reset(event)  # type: ignore[arg-type]
        elif kind is h2.events.RemoteSettingsChanged:
            if not self._guard.spend("settings", self._loop.time()):
                self._end(ErrorCodes.ENHANCE_YOUR_CALM, "SETTINGS flood")
                return
            self._pump_all()  # a new initial window size changes every stream's window
        elif kind is h2.events.PingReceived:
            if not self._guard.spend("ping", self._loop.time()):
                self._end(ErrorCodes.ENHANCE_YOUR_CALM, "PING flood")
        elif kind is h2.events.PriorityUpdated:
            if not self._guard.spend("priority", self._loop.time()):
                self._end(ErrorCodes.ENHANCE_YOUR_CALM, "PRIORITY flood")
        elif kind is h2.events.ConnectionTerminated:
            # The client's GOAWAY: h2 lets nothing more be sent on this connection.
            self._end(None, "the client sent GOAWAY")
        # TrailersReceived (dropped, as over HTTP/1.1; StreamEnded follows), SettingsAcknowledged,
        # UnknownFrameReceived, ...: nothing to do.

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._goaway_sent and stream_id > self._last_stream:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        end_stream = event.stream_ended is not None
        stream.request_done = end_stream
        now = self._loop.time()
        stream.last_read = now
        self._requests += 1
        self.active += 1
        started = now if self.state.timed else 0.0
        try:
            request = request_from_h2(
                event.headers,  # type: ignore[arg-type]
                end_stream=end_stream,
                max_header_bytes=self.limits.max_header_bytes,
            )
        except MalformedRequest as exc:
            self._end(ErrorCodes.PROTOCOL_ERROR, f"stream {stream_id}: {exc}")
            return
        except H2RequestError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: HTTP/2 stream %d refused: %s", self.client_ip, stream_id, exc)
            self._refuse(stream, exc.status, event.headers, started)  # type: ignore[arg-type]
            return
        exchange = stream.exchange = Exchange(stream, request, started)
        if self.trace is not None:
            self._trace_request(exchange, stream_id, event.headers, time.monotonic())  # type: ignore[arg-type]
        exchange.start(request)
        if stream.exchange is exchange:
            if end_stream:
                exchange.on_request_end()
            else:
                self._arm(now + self.limits.body_read_timeout)
            self._touched.append(stream)

    def _trace_request(
        self, exchange: Exchange, stream_id: int, headers: list[tuple[bytes, bytes]], now: float
    ) -> None:
        assert self.trace is not None
        trace = exchange.trace = self.trace.request(f"s{stream_id}", now)
        method = next((v for n, v in headers if n == b":method"), b"-").decode("latin-1")
        path = next((v for n, v in headers if n == b":path"), b"-").decode("latin-1")
        trace.head(
            f"{method} {path} HTTP/2",
            headers,
            f"HTTP/2 stream {stream_id}, one HEADERS block as h2 decoded it",
        )

    def _refuse(
        self, stream: H2Stream, status: int, headers: list[tuple[bytes, bytes]], started: float
    ) -> None:
        """A request that became no exchange: its error, and its access log line."""
        method = next((v for n, v in headers if n == b":method"), b"-")
        target = next((v for n, v in headers if n == b":path"), b"-")
        exchange = stream.exchange = Exchange(stream, _Refused(method, target), started)
        exchange.host = next((v for n, v in headers if n == b":authority"), None)
        if self.trace is not None:
            self._trace_request(exchange, stream.stream_id, headers, time.monotonic())
        exchange.refuse(status)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        size = event.flow_controlled_length
        now = self._loop.time()
        if not size and event.stream_ended is None and not self._guard.spend("empty", now):
            self._end(ErrorCodes.ENHANCE_YOUR_CALM, "empty DATA frames in a flood")
            return
        stream = self.streams.get(event.stream_id)
        exchange = stream.exchange if stream is not None else None
        if exchange is None:
            # A stream answered already (or refused): its bytes are dropped, the window kept.
            if size:
                self.h2.acknowledge_received_data(size, event.stream_id)
            if stream is not None and stream.discarding and not stream.request_done:
                stream.discarded += size
                stream.last_read = now
                if stream.discarded > _DISCARD_LIMIT:
                    stream.reset(ErrorCodes.NO_ERROR)  # enough: the client is told to stop
                    self._forget_if_over(stream)
            return
        assert stream is not None
        stream.last_read = now
        data = event.data
        if data:
            exchange.on_request_data(data)
            self._touched.append(stream)
        if not size:
            return
        if stream.read_paused or stream.exchange is None:
            if stream.exchange is None:  # it ended on this data (413): nothing is held
                self.h2.acknowledge_received_data(size, stream.stream_id)
            else:
                stream.unacked += size
        else:
            self.h2.acknowledge_received_data(size, stream.stream_id)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        stream.ended = True
        stream.out.clear()
        exchange, stream.exchange = stream.exchange, None
        if exchange is not None:
            self.active -= 1
            exchange.client_lost()
            if not self._guard.spend("reset", self._loop.time()):
                self._end(ErrorCodes.ENHANCE_YOUR_CALM, "streams reset in a flood (rapid reset)")
                return
            self._idle_check()

    # --- what the streams call ----------------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        if not stream.ended or stream.stream_id in self.streams:
            try:
                self.h2.acknowledge_received_data(size, stream.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
            self.want_flush()

    def pump(self, stream: H2Stream) -> None:
        """Send what the stream's window allows of its queue, and its end when it is due."""
        conn = self.h2
        out = stream.out
        stream_id = stream.stream_id
        if stream.ended:
            return
        queued = stream.out_size
        while out:
            window = conn.local_flow_control_window(stream_id)
            if window <= 0:
                break
            chunk = out[0]
            size = min(window, conn.max_outbound_frame_size)
            if len(chunk) <= size:
                out.popleft()
                stream.out_size -= len(chunk)
                last = not out and stream.end_queued
                conn.send_data(stream_id, chunk, end_stream=last)
                if last:
                    stream._ended()
                    break
            else:
                conn.send_data(stream_id, chunk[:size])
                out[0] = chunk[size:]
                stream.out_size -= size
        else:
            if stream.end_queued and not stream.ended:
                conn.end_stream(stream_id)
                stream._ended()
        sent = queued - stream.out_size
        if stream.ended:
            self._forget_if_over(stream)
        elif out:
            # The stall clock runs from the last byte the client's window let through.
            if sent or not stream.blocked_since:
                stream.blocked_since = self._loop.time()
                self._arm(stream.blocked_since + self.limits.upstream_read_timeout)
        else:
            stream.blocked_since = 0.0
        self._update_write_paused(stream)
        self._unflushed += sent
        if self._unflushed > _QUEUE_LOW:
            # Much to send: into the transport now, so that a client that does not read
            # shows in its write buffer (pause_writing) before h2's grows.
            self._flush()
        else:
            self.want_flush()

    def _pump_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.out or (stream.end_queued and not stream.ended):
                self.pump(stream)

    def _update_write_paused(self, stream: H2Stream) -> None:
        size = stream.out_size
        paused = (
            self.write_blocked or size > _QUEUE_HIGH or (stream.write_paused and size > _QUEUE_LOW)
        )
        if paused != stream.write_paused:
            stream.write_paused = paused
            exchange = stream.exchange
            if exchange is not None:
                if paused:
                    exchange.client_write_paused()
                else:
                    exchange.client_write_resumed()

    def stream_finished(self, stream: H2Stream) -> None:
        """The stream's exchange is over (its response may still be queued)."""
        self.active -= 1
        self._forget_if_over(stream)
        self._idle_check()

    def _forget_if_over(self, stream: H2Stream) -> None:
        """Drop a stream whose exchange, response and request are all over."""
        if stream.ended and stream.exchange is None and stream.request_done:
            self.streams.pop(stream.stream_id, None)
            self._idle_check()

    def discard_from(self, stream: H2Stream) -> None:
        stream.last_read = self._loop.time()
        self._arm(stream.last_read + self.limits.body_read_timeout)
        # A client that got the whole response may stop its upload with END_STREAM short of
        # its Content-Length (curl does): h2 would call that a connection error and fail the
        # other streams with it. The body is dropped anyway: its length no longer matters.
        h2_stream = self.h2.streams.get(stream.stream_id)
        if h2_stream is not None:
            h2_stream._expected_content_length = None

    def _idle_check(self) -> None:
        if self.active == 0 and not self.streams:
            self._idle_since = self._loop.time()
            if self.draining or self._goaway_sent:
                self._end(ErrorCodes.NO_ERROR, None)
            else:
                self._arm(self._idle_since + self.limits.idle_timeout)

    def want_flush(self) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._unflushed = 0
        data = self.h2.data_to_send()
        if data and not self._closed and not self.transport.is_closing():
            self.transport.write(data)

    # --- limits -------------------------------------------------------------------------

    def _check_header_block(self) -> None:
        """A header block still arriving (HEADERS, then CONTINUATION frames) may not grow past
        the hard limit: h2 keeps its frames until the last one (CVE-2024-27316)."""
        pending = self.h2.incoming_buffer._headers_buffer
        if pending and sum(len(f.data) for f in pending) > self._hard_header_limit:
            self._end(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large (CONTINUATION flood)")

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        limits = self.limits
        upcoming: list[float] = []
        if not self.streams:
            wait = limits.idle_timeout if self._requests else limits.header_read_timeout
            deadline = self._idle_since + wait
            if now >= deadline:
                self._end(ErrorCodes.NO_ERROR, None)
                return
            upcoming.append(deadline)
        for stream in list(self.streams.values()):
            if stream.blocked_since:
                deadline = stream.blocked_since + limits.upstream_read_timeout
                if now >= deadline:
                    self.give_up("a response waited upstream_read_timeout for the client's window")
                    return
                upcoming.append(deadline)
            exchange = stream.exchange
            if exchange is None and stream.discarding and not stream.request_done:
                deadline = stream.last_read + limits.body_read_timeout
                if now >= deadline:
                    stream.reset(ErrorCodes.NO_ERROR)
                    self._forget_if_over(stream)
                    continue
                upcoming.append(deadline)
            if exchange is not None and not stream.request_done:
                if stream.read_paused:  # the upstream is slow to take the body, not the client
                    stream.last_read = now
                deadline = stream.last_read + limits.body_read_timeout
                if now >= deadline:
                    exchange.client_failed(408)
                    if not stream.ended and stream.exchange is None:
                        stream.reset(ErrorCodes.CANCEL)
                    continue
                upcoming.append(deadline)
        self._flush()
        if upcoming:
            self._arm(min(upcoming))

    def give_up(self, why: str) -> None:
        self._end(ErrorCodes.ENHANCE_YOUR_CALM, why)

    # --- the server's controls ----------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful drain: GOAWAY with the last stream taken; those finish, then we close."""
        self.draining = True
        if self._closed or self._goaway_sent:
            return
        self._goaway_sent = True
        self._last_stream = self.h2.highest_inbound_stream_id
        if self.active == 0 and not self.streams:
            self._end(ErrorCodes.NO_ERROR, None)
            return
        # Written by hand: h2's own GOAWAY would close its state machine to the streams that
        # are still to be answered.
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        frame.error_code = ErrorCodes.NO_ERROR
        if not self.transport.is_closing():
            self.transport.write(frame.serialize())

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.streams

    @property
    def owes_client(self) -> bool:
        if not self._closed and (self.active or self.streams):
            return True
        transport = self.transport
        return transport is not None and transport.get_write_buffer_size() > 0

    def _end(self, code: ErrorCodes | None, why: str | None, *, queued: bool = False) -> None:
        """End the connection: GOAWAY with `code` (None: none, the client's GOAWAY came; h2
        queued one already when `queued`), what is queued goes out, then close."""
        if self._closed:
            return
        if why is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: ending HTTP/2 connection (%s): %s",
                self.client_ip,
                code.name if isinstance(code, ErrorCodes) else code,
                why,
            )
        if code is not None and not queued:
            try:
                last = self._last_stream if self._goaway_sent else self.h2.highest_inbound_stream_id
                self.h2.close_connection(code, last_stream_id=last)
            except h2.exceptions.ProtocolError:
                pass  # a GOAWAY went out already
        self._flush()
        self._closed = True
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            exchange, stream.exchange = stream.exchange, None
            if exchange is not None:
                exchange.client_lost()
        self.active = 0
        self.gate.open()
        if self.write_blocked:
            # The client reads nothing: a graceful close would wait on it (and hold what is
            # buffered) until ssl_shutdown_timeout. It was sent the GOAWAY, if it ever reads.
            self.transport.abort()
        else:
            self.transport.close()

    def internal_error(self) -> None:
        log.exception("unexpected error in an HTTP/2 connection from %s", self.client_ip)
        self._end(ErrorCodes.INTERNAL_ERROR, None)


class _Refused:
    """The request-head fields an exchange reads, for a request refused before it was one."""

    __slots__ = ("fields", "http_version", "method", "target")

    def __init__(self, method: bytes, target: bytes) -> None:
        self.method = method
        self.target = target
        self.http_version = b"1.1"
        self.fields: list[tuple[bytes, bytes]] = []
