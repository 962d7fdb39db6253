"""How a client connection ends when the client or the request misbehaves (issue 9's defects):

- an error reply that ends the connection is followed at once by close_notify, while what the
  client still sends is read and dropped, so the reply is not destroyed by a reset;
- plain HTTP sent to the TLS port gets a plain-text 400, logged once per client;
- a client that half-closes (close_notify, then FIN) after its request still gets the response;
- a request body that stalls is cut at body_read_timeout: 408, and the app sees an aborted
  request, never a complete one;
- an upgraded connection idle both ways for tunnel_idle_timeout is closed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
import websockets

from tests.integration.harness import AppProcess, running
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    HalfClosingClient,
    Proxy,
    TcpServer,
    parse_responses,
    proxy_config,
)

LIMITS = """
header_read_timeout = "3s"
idle_timeout = "5s"
max_body_bytes = "1MiB"
body_read_timeout = "1s"
tunnel_idle_timeout = "1s"
"""


class Recorder(TcpServer):
    """An upstream that reads request bytes and never answers (TcpServer notes what arrived on
    each connection and whether the proxy closed it)."""

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        while self.recv(conn, buf):
            pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    with running(Recorder()) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, example_app: AppProcess, recorder: Recorder) -> Proxy:
    return make_module_proxy(
        proxy_config(
            [(["localhost"], "app"), (["stall.test"], "recorder")],
            {"app": example_app.server, "recorder": recorder.server},
            default_site="localhost",
            limits=LIMITS,
        )
    )


# --- an error reply ends the connection at once ---------------------------------------------


def test_close_notify_follows_a_400_at_once(proxy: Proxy) -> None:
    with proxy.conn() as conn:
        conn.send(b"GARBAGE\r\n\r\n")
        took, data = conn.wait_closed(5)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert took is not None and took < 1.0, took  # it was 2 s: the whole linger


def test_a_413_reaches_a_client_still_sending_its_body_then_the_connection_ends(
    proxy: Proxy,
) -> None:
    """The client keeps sending a body the proxy refused (as curl does until it reads the
    answer): the proxy's close_notify comes at once, the rest is read and dropped, and the
    client reads the whole 413 instead of a reset. (One thread: an SSL socket must not be
    read and written from two at once.)"""
    with proxy.conn() as conn:
        conn.send(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50000000\r\n\r\n")
        conn.sock.settimeout(0.005)
        chunk = b"x" * 65536
        sent, data, ended = 0, b"", None
        start = time.monotonic()
        while time.monotonic() - start < 10 and ended is None:
            if sent < 8_000_000:
                try:
                    sent += conn.sock.send(chunk)
                except (TimeoutError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
                except OSError:
                    sent = 8_000_000  # the proxy is done reading: stop sending, keep reading
            try:
                got = conn.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except (ssl.SSLError, OSError):
                got = b""
            if got:
                data += got
            else:
                ended = time.monotonic() - start
    [response] = parse_responses(data, [b"POST"])
    assert response.status == 413
    assert ended is not None and ended < 5, ended


# --- plain HTTP on the TLS port ---------------------------------------------------------------


def plain_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_plain_http_to_the_tls_port_gets_a_plain_400_logged_once(proxy: Proxy) -> None:
    before = proxy.log().count("sent plain HTTP to the HTTPS port")
    for method in (b"GET", b"POST", b"HEAD"):
        data = plain_request(proxy.port, method + b" / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        [response] = parse_responses(data, [b"GET"])
        assert response.status == 400
        assert b"https://" in response.body
    # curl's view of it, too
    import subprocess

    out = subprocess.run(
        ["curl", "-s", "-i", f"http://127.0.0.1:{proxy.port}/"],
        capture_output=True,
        timeout=10,
        check=False,
    ).stdout
    assert out.startswith(b"HTTP/1.1 400 Bad Request")
    assert proxy.log().count("sent plain HTTP to the HTTPS port") - before <= 1
    assert "sent plain HTTP to the HTTPS port" in proxy.log()
    # and TLS clients are served as ever
    with proxy.client() as client:
        assert client.get(proxy.url("/")).status_code == 200


# --- a client that half-closes after its request ---------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("pause", [0.0, 0.1], ids=["same-read", "later"])
def test_a_client_that_half_closes_after_its_request_gets_the_response(
    proxy: Proxy, version: ssl.TLSVersion, pause: float
) -> None:
    client = HalfClosingClient(proxy, version)
    try:
        client.send(b"GET /slow/0.3 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        time.sleep(pause)  # 0: the close_notify comes with the request; 0.1: while it is served
        client.half_close()
        data = client.read_all()
    finally:
        client.close()
    [response] = parse_responses(data, [b"GET"])
    assert response.status == 200
    assert response.body  # the app's answer, whole (h11 checked its length)


@pytest.mark.parametrize("pause", [0.0, 0.1], ids=["same-read", "later"])
def test_pipelined_requests_then_a_half_close_are_all_answered(proxy: Proxy, pause: float) -> None:
    client = HalfClosingClient(proxy, ssl.TLSVersion.TLSv1_3)
    try:
        client.send(b"GET /slow/0.3 HTTP/1.1\r\nHost: localhost\r\n\r\n" * 2)
        time.sleep(pause)
        # 0.1: this one arrives while the first is served: the proxy stops reading, and the
        # close_notify and FIN that follow must wait unread until every response is out.
        client.send(b"GET /slow/0.1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        time.sleep(pause)
        client.half_close()
        data = client.read_all()
    finally:
        client.close()
    assert [r.status for r in parse_responses(data, [b"GET"] * 3)] == [200, 200, 200]


# --- a body that stalls ------------------------------------------------------------------------


def test_a_stalled_body_gets_408_and_the_app_sees_an_aborted_request(
    proxy: Proxy, recorder: Recorder
) -> None:
    seen = len(recorder.received)
    with proxy.conn("stall.test") as conn:
        conn.send(b"POST /upload HTTP/1.1\r\nHost: stall.test\r\nContent-Length: 100\r\n\r\n")
        conn.send(b"0123456789")
        start = time.monotonic()
        took, data = conn.wait_closed(8)
    [response] = parse_responses(data, [b"POST"])
    assert response.status == 408
    assert took is not None and 0.8 < took < 4, took
    # The app got the head and the ten bytes, then its connection closed short of the body.
    [received] = recorder.received[seen:]
    assert recorder.closed[seen].wait(3), "the upstream connection was left open"
    assert received.endswith(b"\r\n\r\n0123456789")
    assert time.monotonic() - start < 6


def test_a_slow_but_steady_body_is_not_cut(proxy: Proxy) -> None:
    """Each read comes within body_read_timeout (1 s) though the whole body takes longer."""
    with proxy.conn() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n")
        for byte in b"abcde":
            time.sleep(0.5)
            conn.send(bytes([byte]))
        response = conn.response(b"POST")
    assert response.status == 200
    assert b"abcde" in response.body


# --- idle tunnels ------------------------------------------------------------------------------


def test_an_idle_websocket_is_closed_after_tunnel_idle_timeout(proxy: Proxy) -> None:
    async def scenario() -> tuple[float, float]:
        url = f"wss://localhost:{proxy.port}/ws"
        async with websockets.connect(url, ssl=proxy.context(), ping_interval=None) as ws:
            # Busy for 2 s, a message every 0.4 s: longer than the idle limit, never idle.
            start = time.monotonic()
            while time.monotonic() - start < 2:
                await ws.send("ping")
                assert await ws.recv() == "ping"
                idle_from = time.monotonic()
                await asyncio.sleep(0.4)
            busy = time.monotonic() - start
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return busy, time.monotonic() - idle_from

    busy, idle = asyncio.run(scenario())
    assert busy >= 2
    assert 0.8 < idle < 4, idle


# --- the same under the standard library's event loop ------------------------------------------


def test_under_asyncio_half_close_works_and_errors_still_end_the_connection(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(
        proxy_config([(["localhost"], "app")], {"app": example_app.server}, limits=LIMITS),
        start=False,
    )
    proxy.loop = "asyncio"
    proxy.start()
    client = HalfClosingClient(proxy, ssl.TLSVersion.TLSv1_3)
    try:
        client.send(b"GET /slow/0.2 HTTP/1.1\r\nHost: localhost\r\n\r\n" * 2)
        client.half_close()
        data = client.read_all()
    finally:
        client.close()
    assert [r.status for r in parse_responses(data, [b"GET"] * 2)] == [200, 200]
    # asyncio's TLS layer resets on data after its close_notify: it comes after the linger.
    with proxy.conn() as conn:
        conn.send(b"GARBAGE\r\n\r\n")
        took, data = conn.wait_closed(5)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert took is not None and took < 4, took
    assert "Traceback" not in proxy.log()
