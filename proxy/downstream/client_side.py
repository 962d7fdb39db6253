"""What an exchange needs from the client's side of its request, whatever the protocol.

exchange.py decides what happens to a request: its site, its rewriting, the upstream pool,
retries, limits, upgrades. The client side decides how that reaches the client: today an
HTTP/1.1 connection (connection.py: the status line, chunked framing, `Connection: close`,
the keep-alive cycle); an HTTP/2 stream is to be the second implementation, with the exchange
unchanged (as httpcore's http11/http2 connections share one pool interface, and hypercorn's
h11 and h2 protocols feed one stream class).

Each `send_*` returns the number of bytes it put on the wire (0 when the client is gone), for
the access log's byte count.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from proxy.logs import upstream_log
from proxy.tls import client_cert_header

if TYPE_CHECKING:
    from certs.models import ClientAuthSpec
    from proxy.downstream.exchange import Exchange
    from proxy.errors import UpstreamError
    from proxy.state import ProxyState
    from proxy.upstream.response_parser import ResponseParser


class ClientSide(Protocol):
    state: ProxyState  # the config's routing, limits, pools and access log, as of the request
    sni: str | None
    client_ip: str
    # A client_auth site's handshake: (site name, its client_auth), and the RFC 9440 header
    # lines of the client's certificate (b"" for none).
    client_auth: tuple[str, ClientAuthSpec] | None
    client_cert: bytes | None
    draining: bool  # the proxy is stopping: no new request after this one
    write_paused: bool  # the client is not taking what is written: pause the upstream's reads

    # --- the response -------------------------------------------------------------------------
    def send_continue(self) -> int:
        """A 100 Continue, to a client that asked for one."""
        ...

    def send_head(
        self,
        exchange: Exchange,
        status: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]] | None,
        parser: ResponseParser,
    ) -> None:
        """The response head: `headers` are the upstream's fields (lowercased names) to be
        rewritten for the client, or None when the upstream's own head (`parser.raw_head`,
        hop-by-hop fields already cut out) can go as it is. `parser.body` says how the body
        is framed upstream; `exchange.hsts` is the site's Strict-Transport-Security line,
        which replaces the app's. It may wait to go out with the first body bytes."""
        ...

    def send_body(self, data: bytes) -> int: ...

    def send_end(self) -> int:
        """The response is complete."""
        ...

    def flush_head(self) -> int:
        """Send a head still waiting for body bytes: none came in this read."""
        ...

    def send_error(
        self, status: int, *, head: bool, retry_after: int | None, hsts: bytes | None
    ) -> int:
        """A canned error response made by the proxy (with the site's Strict-Transport-
        Security line, if it has one); the client side ends after it."""
        ...

    def send_switch(self, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """The upstream's 101 Switching Protocols; bytes then pass both ways unparsed."""
        ...

    # --- flow and lifecycle ---------------------------------------------------------------------
    def pause_reading(self) -> None:
        """Stop taking request bytes: the upstream cannot take them yet (or is not there)."""
        ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None:
        """End the client's side at once, without a graceful close."""
        ...

    def exchange_done(self, exchange: Exchange, complete: bool, *, abort: bool = False) -> None:
        """The exchange is over: `complete` if request and response went through in full,
        `abort` if the response was cut short and must look incomplete to the client."""
        ...

    def start_tunnel(self, exchange: Exchange) -> bytes:
        """After a 101: returns the bytes the client already sent past its request."""
        ...

    def tunnel_io(self) -> None: ...

    def internal_error(self) -> None: ...

    def log_access(self, exchange: Exchange) -> None: ...

    def log_upstream_failure(self, exchange: Exchange, error: UpstreamError) -> None: ...


class ClientIdentity(Protocol):
    sni: str | None
    client_ip: str
    client_auth: tuple[str, ClientAuthSpec] | None
    client_cert: bytes | None


def client_identity(connection: ClientIdentity, transport: asyncio.BaseTransport) -> Any:
    """Fill in what a new client connection knows of its client (SNI, the client_auth
    site's verified certificate, the address if accept() did not give it); returns the
    transport's SSLObject, None without TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        connection.sni = getattr(ssl_object, "tlsproxy_sni", None)
        installed = getattr(ssl_object, "tlsproxy_cert", None)
        if installed is not None and installed.client_auth is not None:
            # Once per connection: requests of other sites never pay for it.
            connection.client_auth = (installed.spec_name, installed.client_auth)
            connection.client_cert = client_cert_header(ssl_object)
    if not connection.client_ip:
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            connection.client_ip = peer[0]
    return ssl_object


# --- what both client sides log the same way -------------------------------------------------


def emit_access(
    state: ProxyState,
    client_ip: str,
    sni: str | None,
    exchange: Exchange,
    protocol: str,
    now: float,
) -> None:
    """The access log line of a finished exchange; `protocol` as ALPN names it."""
    state.access_log.emit(
        client=client_ip,
        sni=sni,
        host=exchange.host,
        method=exchange.method,
        target=exchange.target,
        status=exchange.status,
        bytes_in=exchange.body_in,
        bytes_out=exchange.bytes_out,
        upstream=exchange.label,
        duration=now - exchange.started,
        protocol=protocol,
    )


def log_upstream_failure(client_ip: str, exchange: Exchange, error: UpstreamError) -> None:
    if upstream_log.isEnabledFor(logging.WARNING):
        upstream_log.warning(
            "%s %s for %s: %s",
            exchange.method.decode("latin-1"),
            exchange.target.decode("latin-1"),
            client_ip,
            error,
        )
