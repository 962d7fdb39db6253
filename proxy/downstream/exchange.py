"""One request and its response: the client's h11-validated request goes to an upstream
connection, the upstream's response comes back, both bodies streamed, never buffered whole.

Callbacks, not a task: the client connection calls `on_request_data`/`on_request_end`, the
upstream response parser calls `on_head`/`on_body`/`on_end`, and each pushes bytes straight to
the other transport. A task exists only while a new upstream connection is being opened.

The exchange decides what happens to a request (routing, rewriting, the pool, retries,
limits, upgrades); its client side (`ClientSide` in client_side.py) decides how the response
goes on the wire. Today that is the HTTP/1.1 connection (connection.py), which parses the
request with h11, frames the response (chunked, close-delimited for HTTP/1.0) and runs the
keep-alive cycle; an HTTP/2 stream is meant to be the second one, with nothing here copied.

Trailers are dropped in both directions. A response cut short by the upstream makes the client
side end it as incomplete (an HTTP/1.1 connection closes without the final chunk), so no
truncated body looks complete.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING

from proxy.downstream.forwarding import (
    request_head,
    switch_accepted,
    upgrade_offer,
)
from proxy.downstream.responses import split_target
from proxy.downstream.routing import client_auth_allows
from proxy.errors import UpstreamError
from proxy.metrics import BATCH, NO_SITE
from proxy.trace import REFUSALS, UPSTREAM_ANSWERS, refusal_reason

if TYPE_CHECKING:
    from proxy.config import Site
    from proxy.downstream.client_side import ClientSide
    from proxy.downstream.request_head import RequestHead
    from proxy.trace import RequestTrace
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import ServerSlot, UpstreamPool

_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"
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
        "client",
        "connecting",
        "content_length",
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
        "resp_started",
        "retried",
        "site",
        "slot",
        "started",
        "status",
        "target",
        "trace",
        "tunnel",
        "up",
    )

    def __init__(self, client: ClientSide, request: RequestHead, started: float) -> None:
        self.client = client
        self.method = request.method
        self.target = request.target
        self.started = started
        self.host: bytes | None = None
        self.site = NO_SITE  # the name of the site that took the request, for the metrics
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
        # The client's wish to keep its connection (HTTP/1.x); its client side may overrule it.
        self.keep_alive = not self.http10
        self.expect_continue = False
        self.status = 0
        self.resp_started = False
        self.bytes_out = 0  # bytes its client side put on the wire for the response
        self.finished = False
        self.retried = False
        self.connecting = False
        self.offer: bytes | None = None  # the protocols an upgrade request offers upstream
        self.tunnel = False  # a 101 was relayed: bytes now pass unparsed
        self.hsts: bytes | None = None  # the site's Strict-Transport-Security line, if any
        self.trace: RequestTrace | None = None  # `run --trace`: set by the client side

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
        client = self.client
        state = client.state
        if self.host is None:
            # Only HTTP/1.0 may omit Host (h11 requires it in 1.1). As nginx does, the name the
            # client gave the TLS layer stands in, else the default site's; the upstream gets
            # it as Host, which its HTTP/1.1 request needs.
            self.host = _stand_in_host(client.sni, state.router.default)
            if self.host is not None:
                fields = [*fields, (b"host", self.host)]
        site, status = state.router.route(client.sni, self.host)
        if site is None:
            self._reply_error(status)
            return
        self.hsts = site.hsts_header
        self.site = site.name
        client_auth = site.client_auth
        if client_auth is not None and not client_auth_allows(site, client.client_auth):
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
            client_ip=client.client_ip,
            host=self.host or b"",
            trusted=state.trusted,
            upgrade=self.offer,
            client_cert=client.client_cert if client_auth is not None else None,
        )
        if self.trace is not None:
            self._trace_forwarding(site.name)
        self._acquire(None)

    def on_request_data(self, data: bytes) -> None:
        size = len(data)
        self.body_in += size
        if self.body_in > self.client.state.limits.max_body_bytes:
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
        if self.trace is not None:
            self.trace.upstream(pool, slot, conn is not None, _now())
        if conn is not None:
            self._attach(conn)
            return
        # Until connected, the client's body waits in the kernel, not in our memory.
        self.connecting = True
        self.client.pause_reading()
        task = asyncio.get_running_loop().create_task(pool.connect(slot))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self.connecting = False
        if task.cancelled():
            error: BaseException | None = UpstreamError("connect cancelled", 502)
        else:
            error = task.exception()
        if self.trace is not None:
            self.trace.connect_done(error, _now())
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
            self.client.internal_error()

    def _attach(self, conn: UpstreamConnection) -> None:
        self.up = conn
        conn.begin(self, head_request=self.method == b"HEAD")
        client = self.client
        client.resume_reading()
        if client.write_paused:
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
            self.bytes_out += self.client.send_continue()

    def on_head(
        self, status: int, phrase: bytes, headers: list[tuple[bytes, bytes]] | None
    ) -> None:
        self.status = status
        if self.trace is not None:
            self.trace.response_started(status, _now())
        slot = self.slot
        if slot is not None and slot.health.down_until:  # it answers: a passive mark is over
            self.pool.server_answered(slot)  # type: ignore[union-attr]
        if status == 101:
            self._start_tunnel(phrase, headers or [])
            return
        up = self.up
        assert up is not None
        self.resp_started = True
        self.client.send_head(self, status, phrase, headers, up.parser)

    def on_body(self, data: bytes) -> None:
        if self.tunnel:
            self.client.tunnel_io()
        self.bytes_out += self.client.send_body(data)

    def on_end(self) -> None:
        self.bytes_out += self.client.send_end()
        up = self.up
        request_complete = self.req_done and not self.pending and not self.connecting
        self._give_back(up, reusable=request_complete)
        self._finish(request_complete)

    def feed_done(self) -> None:
        """The upstream's bytes of this read are parsed: a head still waiting goes out now."""
        self.bytes_out += self.client.flush_head()

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
        if self.trace is not None:
            self.trace.tunnel(self.offer)
        self.resp_started = True
        self.bytes_out += self.client.send_switch(phrase, headers)
        early = self.client.start_tunnel(self)
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
        self.client.pause_reading()

    def upstream_write_resumed(self) -> None:
        self.client.resume_reading()

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
            self.client.log_upstream_failure(self, error)
            self._finish(False, abort=True)
            return
        self._report_failure(error, up)
        retry = self._may_retry(error, up)
        if self.trace is not None:
            self.trace.upstream_failed(error, retry)
        if retry:
            failed_slot = self.slot if not error.request_sent else None
            pool = self.pool
            if pool is not None and self.slot is not None:
                pool.count(pool.retries, self.slot.server)
            self._give_back(up, reusable=False)
            self.retried = True
            self.head_sent = False
            self._acquire(failed_slot)
            if self.up is not None:
                self.flush()
            return
        self.client.log_upstream_failure(self, error)
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
        self.client.log_upstream_failure(
            self, UpstreamError("the client stopped reading the response", 502)
        )
        self._give_back(self.up, reusable=False)
        self._finish(False, abort=True)
        self.client.abort()  # a graceful close would wait for it to read

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
        self.client.internal_error()

    def _body_too_large(self) -> None:
        self.pending.clear()
        if self.resp_started:
            self._give_back(self.up, reusable=False)
            self._finish(False, abort=True)
        else:
            self._reply_error(413)

    def refuse(self, status: int) -> None:
        """Answer a request its client side refused before routing (an HTTP/2 header block
        that makes no HTTP/1.1 request): the error, and the access log line."""
        self._reply_error(status)

    def _reply_error(self, status: int, *, retry_after: int | None = None) -> None:
        """Answer with a canned error and close the client connection after it."""
        self.status = status
        if self.trace is not None:
            self._trace_error(status)
        if self.up is not None or self.slot is not None:
            self._give_back(self.up, reusable=False)
        self.resp_started = True
        # The site's own errors (502, 504) carry its HSTS policy too.
        self.bytes_out += self.client.send_error(
            status, head=self.method == b"HEAD", retry_after=retry_after, hsts=self.hsts
        )
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

    # --- the end -------------------------------------------------------------------------

    def _finish(self, complete: bool, *, abort: bool = False, notify: bool = True) -> None:
        """`complete`: the request was read and the response sent in full, so the client side
        may go on (an HTTP/1.1 connection to its next request, if the client wants that)."""
        if self.finished:
            return
        self.finished = True
        if self.trace is not None:
            self.trace.finished(self.status, self.body_in, self.bytes_out, _now())
        client = self.client
        state = client.state
        if state.access_log.enabled:
            client.log_access(self)
        metrics = state.metrics
        if metrics is not None:
            # Metrics.request_done, without the call (proxy/metrics.py BATCH says why). The
            # loop's clock (started) is both loops' CLOCK_MONOTONIC, uvloop's read at the
            # start of the iteration: never ahead of this.
            done = metrics.done
            done.append(
                (
                    self.site,
                    self.method,
                    self.status,
                    self.body_in,
                    self.bytes_out,
                    monotonic() - self.started,
                )
            )
            if len(done) >= BATCH:
                metrics.tally()
        if notify:
            client.exchange_done(self, complete, abort=abort)

    # --- `run --trace` (only for traced connections) ------------------------------------

    def _trace_forwarding(self, site: str) -> None:
        trace = self.trace
        assert trace is not None
        client = self.client
        trace.routed(client.sni, self.host, site)
        trace.forwarded(self.head, trusted=client.state.trusted.contains(client.client_ip))

    def _trace_error(self, status: int) -> None:
        trace = self.trace
        assert trace is not None
        client = self.client
        if self.pool is None:  # refused by routing or before it
            why = refusal_reason(status, client.sni, self.host, client.state.router)
            trace.refused(client.sni, self.host, status, why)
        else:
            why = UPSTREAM_ANSWERS.get(status) or REFUSALS.get(status, "answered by the proxy")
            trace.say(f"7. Forwarding: answered {status}: {why}")


def _now() -> float:
    # Not the loop's clock: uvloop's counts milliseconds, too coarse for a trace's phases.
    return monotonic()
