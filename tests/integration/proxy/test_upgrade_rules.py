"""Upgrade means something only when Connection says so (RFC 9110 7.8), and a 101 opens a tunnel
only for the protocol the client offered: the "h2c smuggling" class, end to end.

The upstream here answers 101 whenever the test tells it to, as a careless or hostile app would:
the proxy, not the app, must decide whether the connection becomes a tunnel.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import basic_config, running
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, TcpServer

H2C_101 = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
WS_101 = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ScriptedUpstream(TcpServer):
    """Answers the next request head it gets (on whichever pooled connection) with `first`,
    later heads with 200; records every byte it receives, per connection."""

    def __init__(self) -> None:
        super().__init__()
        self.first = OK

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        pending = b""
        while data := self.recv(conn, buf):
            pending += data
            while b"\r\n\r\n" in pending:
                pending = pending.split(b"\r\n\r\n", 1)[1]
                first, self.first = self.first, OK
                conn.sendall(first)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with running(ScriptedUpstream()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: ScriptedUpstream) -> Proxy:
    return make_module_proxy(basic_config(upstream.server))


@pytest.fixture(autouse=True)
def fresh(upstream: ScriptedUpstream) -> None:
    for buf in upstream.received:  # pooled connections carry on: forget what they had
        buf.clear()
    upstream.first = OK


def exchange(proxy: Proxy, first: bytes, second: bytes) -> bytes:
    """Send `first`, read its answer, send `second` on the same connection; all the client got."""
    with proxy.conn() as conn:
        conn.send(first)
        conn.sock.settimeout(2)
        got = conn.sock.recv(65536)
        try:
            conn.send(second)
        except OSError:
            return got
        _, rest = conn.wait_closed(2)
        return got + rest


H2C_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
)
SMUGGLED = b"GET /internal/admin HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_upgrade_without_connection_upgrade_is_not_an_upgrade(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    upstream.first = H2C_101  # the app would switch if asked
    got = exchange(proxy, H2C_REQUEST, SMUGGLED)
    head = upstream.data.split(b"\r\n\r\n")[0].lower()
    assert b"upgrade" not in head  # neither Upgrade nor "connection: upgrade"
    assert b"http2-settings" not in head
    # The app's 101 is refused, the connection ends: no tunnel carries the next request.
    assert got.startswith(b"HTTP/1.1 502 ")
    time.sleep(0.2)
    assert b"/internal/admin" not in upstream.data


def test_h2c_is_never_forwarded_even_with_connection_upgrade(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    upstream.first = H2C_101
    request = H2C_REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n")
    got = exchange(proxy, request, SMUGGLED)
    head = upstream.data.split(b"\r\n\r\n")[0].lower()
    assert b"upgrade" not in head and b"h2c" not in head
    assert got.startswith(b"HTTP/1.1 502 ")
    time.sleep(0.2)
    assert b"/internal/admin" not in upstream.data


def test_a_101_naming_a_protocol_the_client_did_not_offer_is_a_502(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    upstream.first = H2C_101
    request = (
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    got = exchange(proxy, request, SMUGGLED)
    head = upstream.data.split(b"\r\n\r\n")[0].lower()
    assert b"upgrade: websocket" in head and b"connection: upgrade" in head
    assert got.startswith(b"HTTP/1.1 502 ")
    time.sleep(0.2)
    assert b"/internal/admin" not in upstream.data


def test_a_101_to_a_request_that_asked_nothing_is_a_502(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    upstream.first = WS_101
    got = exchange(proxy, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", SMUGGLED)
    assert got.startswith(b"HTTP/1.1 502 ")
    time.sleep(0.2)
    assert b"/internal/admin" not in upstream.data


def test_an_upgrade_answered_without_101_keeps_http_framing(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    request = (
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    got = exchange(
        proxy, request, b"GET /next HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 2
    # The second request went up as a request of its own, rewritten by the proxy (so parsed).
    second = upstream.data.split(b"GET /next HTTP/1.1\r\n", 1)[1]
    assert b"x-forwarded-for: 127.0.0.1" in second.lower()


def test_the_offered_protocol_gets_its_tunnel(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    upstream.first = WS_101
    request = (
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n"
    )
    got = exchange(proxy, request, b"raw tunnel bytes")
    assert got.startswith(b"HTTP/1.1 101 ")
    deadline = time.monotonic() + 3
    while b"raw tunnel bytes" not in upstream.data and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.data.endswith(b"raw tunnel bytes")
