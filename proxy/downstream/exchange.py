"""One request and its response: the client's h11-validated request goes to an upstream
connection, the upstream's response comes back, both bodies streamed, never buffered whole.

Callbacks, not a task: the client connection calls `on_request_data`/`on_request_end`, the
upstream response parser calls `on_head`/`on_body`/`on_end`, and each pushes bytes straight to
the other transport. A task exists only while a new upstream connection is being opened.

h11 on the client side parses the request; the response bytes are written here, and the
keep-alive cycle is the client connection's (see connection.py).

Framing to the client: a Content-Length response passes through as is; a chunked or
close-delimited one is re-chunked (HTTP/1.1 client) or sent close-delimited (HTTP/1.0).
Trailers are dropped in both directions. A response cut short by the upstream makes the client
connection close without the final chunk, so no truncated body looks complete.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from proxy.downstream.flow import PEER_BUSY
from proxy.downstream.forwarding import (
    request_head,
    response_headers,
    switch_accepted,
    upgrade_offer,
)
from proxy.downstream.responses import error_response, reason, split_target
from proxy.downstream.routing import client_auth_allows
from proxy.errors import UpstreamError
from proxy.upstream.response_parser import CHUNKED, UNTIL_CLOSE

if TYPE_CHECKING:
    from proxy.config import Site
    from proxy.downstream.connection import DownstreamProtocol
    from proxy.downstream.request_head import RequestHead
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import ServerSlot, UpstreamPool

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"
# A Strict-Transport-Security line of a raw head (every field line follows a CRLF).
_STS_LINE = re.compile(rb"\r\nstrict-transport-security:[^\r]*", re.IGNORECASE)
_COALESCE = 64 * 1024  # below this, head and body go out as one bytes object
_CLIENT_CLOSED = 499  # access-log status when the client went away first (nginx's)

# The request headers the data path itself needs (forwarding.request_head handles the rest).
_HOST = 1
_LENGTH = 2
_CODING = 3
_CONNECTION = 4
_EXPECT = 5
_UPGRADE = 6
_REQUEST_FIELDS = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
}
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


def _stand_in_host(sni: str | None, default: Site | None) -> bytes | None:
    if sni:
        return sni.encode("ascii", "replace")
    if default is not None:
        for host in default.hosts:
            if not host.startswith("*."):
                return host.encode("ascii", "replace")
    return None


def _has_token(value: bytes, token: bytes) -> bool:
    return any(item.strip().lower() == token for item in value.split(b","))


class Exchange:
    __slots__ = (
        "body_in",
        "body_sent",
        "bytes_out",
        "connecting",
        "content_length",
        "down",
        "expect_continue",
        "finished",
        "has_body",
        "head",
        "head_sent",
        "host",
        "hsts",
        "http10",
        "keep_alive",
        "label",
        "method",
        "offer",
        "pending",
        "pool",
        "req_chunked",
        "req_done",
        "resp_chunked",
        "resp_head",
        "resp_started",
        "retried",
        "slot",
        "started",
        "status",
        "target",
        "tunnel",
        "up",
    )

    def __init__(self, down: DownstreamProtocol, request: RequestHead, started: float) -> None:
        self.down = down
        self.method = request.method
        self.target = request.target
        self.started = started
        self.host: bytes | None = None
        self.pool: UpstreamPool | None = None
        self.slot: ServerSlot | None = None
        self.label = "-"  # the upstream server, for the access log
        self.up: UpstreamConnection | None = None
        self.head = b""
        self.head_sent = False
        self.pending: list[bytes] = []  # request body bytes (framed) not yet written upstream
        self.req_chunked = False
        self.has_body = False  # will h11 deliver body events for this request
        self.content_length = 0
        self.req_done = False
        self.body_in = 0
        self.body_sent = False
        self.http10 = request.http_version != b"1.1"
        self.keep_alive = not self.http10
        self.expect_continue = False
        self.status = 0
        self.resp_head: bytes | None = None  # response head waiting to go out with body bytes
        self.resp_started = False
        self.resp_chunked = False
        self.bytes_out = 0
        self.finished = False
        self.retried = False
        self.connecting = False
        self.offer: bytes | None = None  # the protocols an upgrade request offers upstream
        self.tunnel = False  # a 101 was relayed: bytes now pass unparsed
        self.hsts: bytes | None = None  # the site's Strict-Transport-Security line, if any

    # --- the request ----------------------------------------------------------------------

    def start(self, request: RequestHead) -> None:
        """Route the request and send it upstream (or answer it with a canned error)."""
        length = None
        upgrades: list[bytes] | None = None
        connection: list[bytes] | None = None
        closing = False
        fields = request.fields
        for name, value in fields:
            kind = _REQUEST_FIELDS.get(name)
            if kind is None:
                continue
            if kind == _HOST:
                self.host = value
            elif kind == _LENGTH:
                length = int(value)  # h11 validated it
            elif kind == _CODING:
                self.req_chunked = True  # h11 accepts no coding but chunked
            elif kind == _CONNECTION:
                if connection is None:
                    connection = [value]
                else:
                    connection.append(value)
                if _has_token(value, b"close"):
                    self.keep_alive = False
                    closing = True
                elif self.http10 and not closing and _has_token(value, b"keep-alive"):
                    # HTTP/1.0 keep-alive (ab -k, old clients): asked for, never assumed.
                    self.keep_alive = True
            elif kind == _EXPECT:
                self.expect_continue = value.lower() == b"100-continue"
            elif upgrades is None:
                upgrades = [value]
            else:
                upgrades.append(value)
        self.has_body = self.req_chunked or bool(length)
        self.content_length = length or 0
        target = request.target
        if target[:1] != b"/" and target != b"*" and request.method != b"CONNECT":
            # absolute-form (RFC 9112 3.2.2): its authority replaces Host (RFC 9110 7.2), and
            # the upstream gets the origin-form a server expects from a gateway
            split = split_target(target)
            if split is None:
                self._reply_error(400)
                return
            authority, target = split
            if authority:
                had_host = self.host is not None
                self.host = authority
                if had_host:
                    fields = [(n, authority if n == b"host" else v) for n, v in fields]
                else:  # HTTP/1.0 may omit Host; the upstream's HTTP/1.1 request needs one
                    fields = [*fields, (b"host", authority)]
        down = self.down
        state = down.state
        if self.host is None:
            # Only HTTP/1.0 may omit Host (h11 requires it in 1.1). As nginx does, the name the
            # client gave the TLS layer stands in, else the default site's; the upstream gets
            # it as Host, which its HTTP/1.1 request needs.
            self.host = _stand_in_host(down.sni, state.router.default)
            if self.host is not None:
                fields = [*fields, (b"host", self.host)]
        site, status = state.router.route(down.sni, self.host)
        if site is None:
            self._reply_error(status)
            return
        hsts = site.hsts_header
        if hsts is not None:
            self.hsts = hsts
        client_auth = site.client_auth
        if client_auth is not None and not client_auth_allows(site, down.client_auth):
            self._reply_error(421)
            return
        if length is not None and self.req_chunked:
            # RFC 9112 6.1: a request smuggling signature. h11 would use the chunked framing
            # but the upstream might not; nobody downstream of us gets to choose.
            self._reply_error(400)
            return
        if request.method == b"CONNECT":
            self._reply_error(405)
            return
        if length is not None and length > state.limits.max_body_bytes:
            self._reply_error(413)
            return
        pool = state.pools.get(site.upstream)
        if pool is None:
            self._reply_error(502)
            return
        self.pool = pool
        if upgrades is not None:  # an upgrade only if Connection says so; it happens on a 101
            self.offer = upgrade_offer(upgrades, connection or (), http10=self.http10)
        self.head = request_head(
            request.method,
            target,
            fields,
            client_ip=down.client_ip,
            host=self.host or b"",
            trusted=state.trusted,
            upgrade=self.offer,
            client_cert=down.client_cert if client_auth is not None else None,
        )
        self._acquire(None)

    def on_request_data(self, data: bytes) -> None:
        size = len(data)
        self.body_in += size
        if self.body_in > self.down.state.limits.max_body_bytes:
            self._body_too_large()
            return
        if self.req_chunked:
            self.pending += (b"%x\r\n" % size, data, _CRLF)
        else:
            self.pending.append(data)

    def on_request_end(self) -> None:
        self.req_done = True
        if self.req_chunked:
            self.pending.append(_LAST_CHUNK)  # trailers, if any, are dropped

    def flush(self) -> None:
        """Write what is waiting for the upstream: the head, then body bytes, in one write."""
        up = self.up
        if up is None or self.connecting:
            return
        pending = self.pending
        if not self.head_sent:
            self.head_sent = True
            if not pending:
                up.write(self.head)
                return
            pending.insert(0, self.head)
        elif not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.body_sent = True
        up.write(data)

    # --- choosing and opening the upstream connection -------------------------------------

    def _acquire(self, avoid: ServerSlot | None) -> None:
        pool = self.pool
        assert pool is not None
        slot, conn = pool.acquire(avoid)
        if slot is None:
            self._reply_error(503, retry_after=pool.retry_after())
            return
        self.slot = slot
        self.label = slot.server.label
        if conn is not None:
            self._attach(conn)
            return
        # Until connected, the client's body waits in the kernel, not in our memory.
        self.connecting = True
        self.down.gate.pause(PEER_BUSY)
        task = asyncio.get_running_loop().create_task(pool.connect(slot))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self.connecting = False
        if task.cancelled():
            error: BaseException | None = UpstreamError("connect cancelled", 502)
        else:
            error = task.exception()
        if self.finished:  # the client left meanwhile
            if error is None:
                self._give_back(task.result(), reusable=False)
            return
        try:
            if error is not None:
                if not isinstance(error, UpstreamError):
                    error = UpstreamError(f"cannot connect: {error}", 502)
                self.upstream_failed(error)
                return
            self._attach(task.result())
            self.flush()
        except Exception:
            self.down.internal_error()

    def _attach(self, conn: UpstreamConnection) -> None:
        self.up = conn
        conn.begin(self, head_request=self.method == b"HEAD")
        down = self.down
        if down.gate.reasons:
            down.gate.resume(PEER_BUSY)
        if down.write_paused:
            conn.pause_reading()

    def _give_back(self, conn: UpstreamConnection | None, *, reusable: bool) -> None:
        """Return the upstream connection (and the server's request count) to the pool."""
        self.up = None
        slot = self.slot
        if slot is None:
            if conn is not None:
                conn.close()
            return
        self.slot = None
        assert self.pool is not None
        self.pool.release(slot, conn, reusable=reusable)

    # --- the response (called by the upstream's parser) -----------------------------------

    def on_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        # 100 Continue goes to a client that asked for it; other 1xx are dropped.
        if status == 100 and self.expect_continue and not self.resp_started:
            self.expect_continue = False
            self._write(_CONTINUE)

    def on_head(
        self, status: int, phrase: bytes, headers: list[tuple[bytes, bytes]] | None
    ) -> None:
        self.status = status
        slot = self.slot
        if slot is not None and slot.health.down_until:  # it answers: a passive mark is over
            self.pool.server_answered(slot)  # type: ignore[union-attr]
        if status == 101:
            self._start_tunnel(phrase, headers or [])
            return
        up = self.up
        assert up is not None
        hsts = self.hsts
        if headers is None:  # nothing to rewrite: the upstream's own bytes go on
            if hsts is None:
                parts = [up.parser.raw_head]
            else:  # the site's policy replaces the app's (one header, the configured one)
                parts = [_STS_LINE.sub(b"", up.parser.raw_head), hsts]
        else:
            parts = [b"HTTP/1.1 %d %s\r\n" % (status, phrase or reason(status))]
            fields = response_headers(headers)
            if hsts is not None:
                fields = [f for f in fields if f[0] != b"strict-transport-security"]
            for name, value in fields:
                parts += (name, b": ", value, _CRLF)
            if hsts is not None:
                parts.append(hsts)
        body = up.parser.body
        if body == CHUNKED or body == UNTIL_CLOSE:
            if self.http10:
                self.keep_alive = False  # an HTTP/1.0 client reads until we close
            else:
                parts.append(b"transfer-encoding: chunked\r\n")
                self.resp_chunked = True
        if self.keep_alive and self.down.draining:
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.http10:
            parts.append(b"connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        parts.append(_CRLF)
        self.resp_head = b"".join(parts)
        self.resp_started = True

    def on_body(self, data: bytes) -> None:
        if self.tunnel:
            self.down.tunnel_io()
            self._write(data)
            return
        head = self.resp_head
        if self.resp_chunked:
            size = b"%x\r\n" % len(data)
            if head is not None:
                self.resp_head = None
                self._write_parts((head, size, data, _CRLF))
            else:
                self._write_parts((size, data, _CRLF))
        elif head is not None:
            self.resp_head = None
            self._write_parts((head, data))
        else:
            self._write(data)

    def on_end(self) -> None:
        head = self.resp_head
        self.resp_head = None
        if self.resp_chunked:
            self._write(_LAST_CHUNK if head is None else head + _LAST_CHUNK)
        elif head is not None:
            self._write(head)
        up = self.up
        request_complete = self.req_done and not self.pending and not self.connecting
        self._give_back(up, reusable=request_complete)
        self._finish(self.keep_alive and request_complete)

    def feed_done(self) -> None:
        """The upstream's bytes of this read are parsed: a head still waiting goes out now."""
        head = self.resp_head
        if head is not None:
            self.resp_head = None
            self._write(head)

    # --- upgrades -------------------------------------------------------------------------

    def _start_tunnel(self, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        up = self.up
        assert up is not None
        if not self.req_done or not switch_accepted(self.offer, headers):
            # A 101 to a request that was no upgrade, or to a protocol the client did not
            # offer: relaying it would turn the rest of the connection into unparsed bytes.
            self.upstream_failed(
                UpstreamError("unexpected 101 from upstream", 502, request_sent=True)
            )
            return
        self.tunnel = True
        up.tunnel = True
        parts = [b"HTTP/1.1 101 ", phrase or b"Switching Protocols", _CRLF]
        for name, value in response_headers(headers, upgrade=True):
            parts += (name, b": ", value, _CRLF)
        parts.append(_CRLF)
        self.resp_started = True
        self._write(b"".join(parts))
        early = self.down.start_tunnel(self)
        if early:
            up.write(early)

    def tunnel_from_client(self, data: bytes) -> None:
        self.body_in += len(data)
        up = self.up
        if up is not None:
            up.write(data)

    def client_eof(self) -> None:
        """The client finished sending in a tunnel: the upstream side closes after its data."""
        up = self.up
        if up is not None and up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()
        elif up is not None:
            self._end_tunnel()

    def _end_tunnel(self) -> None:
        self._give_back(self.up, reusable=False)  # a tunnel is never reused
        self._finish(False)

    # --- flow control ---------------------------------------------------------------------

    def upstream_write_paused(self) -> None:
        self.down.gate.pause(PEER_BUSY)

    def upstream_write_resumed(self) -> None:
        self.down.gate.resume(PEER_BUSY)

    def client_write_paused(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def client_write_resumed(self) -> None:
        if self.up is not None:
            self.up.resume_reading()

    # --- failures -------------------------------------------------------------------------

    def upstream_failed(self, error: UpstreamError) -> None:
        if self.finished:
            return
        up = self.up
        if self.tunnel and self.resp_started:
            self._end_tunnel()
            return
        if self.resp_started:
            # Part of the response is out: close without the final chunk (or short of the
            # Content-Length), so the client sees an incomplete message, never a complete one.
            self._give_back(up, reusable=False)
            self.down.log_upstream_failure(self, error)
            self._finish(False, abort=True)
            return
        self._report_failure(error, up)
        if self._may_retry(error, up):
            failed_slot = self.slot if not error.request_sent else None
            self._give_back(up, reusable=False)
            self.retried = True
            self.head_sent = False
            self._acquire(failed_slot)
            if self.up is not None:
                self.flush()
            return
        self.down.log_upstream_failure(self, error)
        self._reply_error(error.status)

    def _report_failure(self, error: UpstreamError, up: UpstreamConnection | None) -> None:
        """Tell the pool which server failed before answering (passive health). A reset on a
        reused pooled connection is the app closing an idle keep-alive, not a server down."""
        if self.slot is not None and self.pool is not None:
            if up is None or up.requests <= 1:
                self.pool.server_failed(self.slot, error)

    def _may_retry(self, error: UpstreamError, up: UpstreamConnection | None) -> bool:
        if self.retried or self.body_sent or error.status != 502:
            return False
        pool = self.pool
        if pool is None:
            return False
        if not error.request_sent:
            # A refused connect: worth it only on another server. The failed one may already
            # be gone from the pool (a supervisor saw its worker die), so count the others.
            failed = self.slot
            return any(slot is not failed for slot in pool.slots)
        # No response byte came (a pooled connection the app closed just as we wrote, or a
        # worker that died with our request): the head may have reached the app, so only an
        # idempotent method is replayed, and only if the config allows it.
        return (
            up is not None
            and up.parser.received == 0
            and pool.config.retry_idempotent
            and self.method in _IDEMPOTENT
        )

    def client_stalled(self) -> None:
        """The client read nothing of the response for upstream_read_timeout: give up on it
        (like nginx's send_timeout), so it cannot hold an upstream connection forever."""
        if self.finished:
            return
        self.down.log_upstream_failure(
            self, UpstreamError("the client stopped reading the response", 502)
        )
        self._give_back(self.up, reusable=False)
        self._finish(False, abort=True)
        self.down.transport.abort()  # a graceful close would wait for it to read

    def client_failed(self, status: int) -> None:
        """The client broke the protocol in the middle of its body (h11 raised)."""
        if self.finished:
            return
        self.pending.clear()
        if status and not self.resp_started:
            self._reply_error(status)
        else:
            self._give_back(self.up, reusable=False)
            self._finish(False, abort=True)

    def internal_error(self) -> None:
        self.down.internal_error()

    def _body_too_large(self) -> None:
        self.pending.clear()
        if self.resp_started:
            self._give_back(self.up, reusable=False)
            self._finish(False, abort=True)
        else:
            self._reply_error(413)

    def _reply_error(self, status: int, *, retry_after: int | None = None) -> None:
        """Answer with a canned error and close the client connection after it."""
        self.status = status
        if self.up is not None or self.slot is not None:
            self._give_back(self.up, reusable=False)
        self.resp_started = True
        head = self.method == b"HEAD"
        data = error_response(status, close=True, head=head, retry_after=retry_after)
        if self.hsts is not None:  # the site's own errors (502, 504) carry its policy too
            end = data.index(_CRLF) + 2
            data = data[:end] + self.hsts + data[end:]
        self._write(data)
        self._finish(False)

    def client_lost(self) -> None:
        """The client connection is gone: drop the upstream side too."""
        if self.finished:
            return
        up = self.up
        self._give_back(up, reusable=False)
        if up is not None:
            up.abort()
        if not self.status or not self.resp_started:
            self.status = _CLIENT_CLOSED
        self._finish(False, notify=False)

    # --- output ---------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.down.transport
        if transport.is_closing():  # the client left; uvloop raises on a closed transport
            return
        self.bytes_out += len(data)
        transport.write(data)

    def _write_parts(self, parts: tuple[bytes, ...]) -> None:
        transport = self.down.transport
        if transport.is_closing():
            return
        size = 0
        for part in parts:
            size += len(part)
        self.bytes_out += size
        if size <= _COALESCE:
            transport.write(b"".join(parts))
        else:
            transport.writelines(parts)

    def _finish(self, keep_alive: bool, *, abort: bool = False, notify: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        down = self.down
        if down.state.access_log.enabled:
            down.log_access(self)
        if notify:
            down.exchange_done(self, keep_alive, abort=abort)
