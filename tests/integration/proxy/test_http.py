"""HTTP/1.1 through the real proxy to the real example app: routing by Host, the headers the app
receives, pipelining, WebSocket, and the plain-http listener's redirect."""

from __future__ import annotations

import json
import re
import socket
import ssl

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.integration.harness import AppProcess, basic_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    Proxy,
    Response,
    parse_responses,
    proxy_config,
    wait_tcp_closed,
)

SECOND_SITE = """
[[site]]
hosts = ["second.test"]
tls = "internal"
upstream = "app"
"""
SINK_SITE = """
[[site]]
hosts = ["sink.test"]
tls = "internal"
upstream = "sink"

[upstream.sink]
servers = ["{server}"]
"""


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, example_app: AppProcess, sink_app: AppProcess) -> Proxy:
    extra = SECOND_SITE + SINK_SITE.format(server=sink_app.server)
    return make_module_proxy(basic_config(example_app.server, http=True, extra=extra))


@pytest.fixture(scope="module")
def trusting_proxy(make_module_proxy: MakeProxy, example_app: AppProcess) -> Proxy:
    return make_module_proxy(
        basic_config(example_app.server, extra_server='trusted_proxies = ["127.0.0.1"]')
    )


def get(proxy: Proxy, sni: str | None, head: bytes) -> Response:
    with proxy.conn(sni) as conn:
        conn.send(head)
        return conn.response()


def seen_headers(response: Response) -> dict[str, list[str]]:
    """The headers the example app received, as name -> every value in order."""
    assert response.status == 200, response
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(response.body)["headers"]:
        seen.setdefault(name, []).append(value)
    return seen


def test_host_of_another_site_than_the_sni_is_misdirected(proxy: Proxy) -> None:
    assert get(proxy, "app.test", b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").status == 200
    # Port and case do not matter; the same SNI routes to the same site.
    host = b"APP.test:%d" % proxy.port
    assert get(proxy, "app.test", b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n").status == 200
    misdirected = get(proxy, "app.test", b"GET / HTTP/1.1\r\nHost: second.test\r\n\r\n")
    assert misdirected.status == 421
    assert get(proxy, "second.test", b"GET / HTTP/1.1\r\nHost: second.test\r\n\r\n").status == 200


def test_unknown_host(proxy: Proxy) -> None:
    # No SNI: the default site's certificate was served and the unknown Host goes to it.
    no_sni = get(proxy, None, b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n")
    assert seen_headers(no_sni)["host"] == ["unknown.test"]
    # With one of our names as SNI, an unknown Host also goes to the default site (it belongs
    # to no other site, so it is not misdirected).
    known_sni = get(proxy, "app.test", b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n")
    assert seen_headers(known_sni)["host"] == ["unknown.test"]
    # A request without a Host is malformed.
    assert get(proxy, "app.test", b"GET / HTTP/1.1\r\n\r\n").status == 400


def test_http10_without_host_goes_to_the_sni_site_or_the_default(proxy: Proxy) -> None:
    # HTTP/1.0 may omit Host: as in nginx, the SNI name stands in (else the default site),
    # and the app, spoken to in HTTP/1.1, gets it as its Host.
    with_sni = seen_headers(get(proxy, "second.test", b"GET / HTTP/1.0\r\n\r\n"))
    assert with_sni["host"] == ["second.test"]
    assert with_sni["x-forwarded-host"] == ["second.test"]
    without_sni = seen_headers(get(proxy, None, b"GET / HTTP/1.0\r\n\r\n"))
    assert without_sni["host"] == ["localhost"]  # the default site's first name


SPOOFED = (
    b"GET / HTTP/1.1\r\nHost: app.test\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: evil.test\r\nForwarded: for=6.6.6.6;proto=http\r\n"
    b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
    b"Proxy-Authorization: Basic eDp5\r\nX-Kept: yes\r\n\r\n"
)


def test_forwarding_headers_replace_what_an_untrusted_client_sent(proxy: Proxy) -> None:
    response = get(proxy, "app.test", SPOOFED)
    seen = seen_headers(response)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["app.test"]
    assert len(seen["forwarded"]) == 1
    forwarded = seen["forwarded"][0]
    assert "6.6.6.6" not in forwarded
    assert forwarded.replace('"', "") == "for=127.0.0.1;proto=https;host=app.test"
    # Hop-by-hop headers stop at the proxy; end-to-end ones pass.
    for name in ("x-hop", "keep-alive", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-kept"] == ["yes"]
    # uvicorn --proxy-headers believed us: the app sees the https scheme.
    assert json.loads(response.body)["scheme"] == "https"


def test_forwarding_headers_from_a_trusted_proxy_are_appended(trusting_proxy: Proxy) -> None:
    seen = seen_headers(get(trusting_proxy, "app.test", SPOOFED))
    assert seen["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    (forwarded,) = seen["forwarded"]
    first, ours = [part.strip() for part in forwarded.split(",")]
    assert first == "for=6.6.6.6;proto=http"
    assert ours.replace('"', "") == "for=127.0.0.1;proto=https;host=app.test"


def test_pipelined_requests_are_answered_in_order(proxy: Proxy) -> None:
    # The first one is slow: answering the second one first would be visible.
    with proxy.conn("app.test") as conn:
        conn.send(
            b"GET /slow/0.5 HTTP/1.1\r\nHost: app.test\r\n\r\n"
            b"GET /pid HTTP/1.1\r\nHost: app.test\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n"
        )
        first, second, third = conn.response(), conn.response(), conn.response()
    assert json.loads(first.body)["slept"] == 0.5
    assert second.body.isdigit()
    assert third.body == b"ok"


def test_keep_alive_serves_many_requests_on_one_connection(proxy: Proxy) -> None:
    mark = len(proxy.log())
    with proxy.client() as client:
        for _ in range(20):
            assert client.get(proxy.url("/healthz")).text == "ok"
        assert client.get(proxy.url("/pid")).status_code == 200
    # httpx reuses its connection unless the proxy closed it: one handshake for 21 requests.
    proxy.wait_for_log(r"handshake 127\.0\.0\.1:\d+ sni=localhost", start=mark)
    assert len(re.findall(r"handshake 127\.0\.0\.1:\d+ sni=", proxy.log()[mark:])) == 1


def test_request_and_response_bodies_stream_at_the_same_time(proxy: Proxy) -> None:
    """/echo answers while it is still reading the request body: both directions are open at
    once on the upstream connection."""
    with proxy.client(timeout=5) as client:
        for size in (1000,) * 10 + (300_000,) * 2:
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            response = client.post(proxy.url("/echo"), content=body)
            assert response.status_code == 200
            assert response.content == body


async def test_websocket_echo_through_the_proxy(proxy: Proxy) -> None:
    context = ssl.create_default_context(cafile=str(proxy.ca))
    uri = f"wss://app.test:{proxy.port}/ws"
    async with ws_connect(uri, ssl=context, host="127.0.0.1", port=proxy.port) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        blob = bytes(range(256)) * 1024
        await ws.send(blob)
        assert await ws.recv() == blob
        for i in range(50):
            await ws.send(f"n{i}")
        assert [await ws.recv() for _ in range(50)] == [f"n{i}" for i in range(50)]


def test_http_listener_redirects_to_https(proxy: Proxy) -> None:
    base = f"http://127.0.0.1:{proxy.http_port}"
    with httpx.Client(timeout=10) as client:
        response = client.get(f"{base}/some/path?q=1&r=2", headers={"Host": "app.test"})
        assert response.status_code == 308
        location = response.headers["location"]
        assert location == f"https://app.test:{proxy.port}/some/path?q=1&r=2"
        # The redirect lands on the proxy and gets the same page.
        with proxy.client() as tls:
            target = location.replace("app.test", "localhost")
            assert tls.get(target.replace("/some/path", "/healthz")).text == "ok"
        acme = client.get(f"{base}/.well-known/acme-challenge/x", headers={"Host": "app.test"})
        assert acme.status_code == 404


def test_head_response_has_no_body_and_keeps_the_connection_in_step(proxy: Proxy) -> None:
    with proxy.conn("app.test") as conn:
        # FastAPI answers HEAD on a GET route with 405: a head announcing a body it must not send.
        conn.send(b"HEAD /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
        head = conn.response(b"HEAD")
        assert int(head.header("content-length") or 0) > 0
        assert head.body == b""
        # The connection is still in step: the next answer is the next request's.
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert conn.response().body == b"ok"


def test_expect_100_continue(proxy: Proxy) -> None:
    # The sink app reads the body before answering, so uvicorn sends 100 Continue first.
    with proxy.conn("sink.test") as conn:
        conn.send(
            b"POST /sink HTTP/1.1\r\nHost: sink.test\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        conn.sock.settimeout(5)
        interim = conn.sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        conn.send(b"hello")
        rest = interim.partition(b"\r\n\r\n")[2]
        while b"}" not in rest:
            chunk = conn.sock.recv(65536)
            assert chunk, rest
            rest += chunk
        (final,) = parse_responses(rest, [b"POST"])
        assert final.status == 200
        assert json.loads(final.body)["bytes"] == 5


def test_the_standard_asyncio_loop_works_too(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server), start=False)
    proxy.loop = "asyncio"
    proxy.start()
    with proxy.client() as client:
        assert client.get(proxy.url("/healthz")).text == "ok"
        assert client.post(proxy.url("/echo"), content=b"z" * 100_000).content == b"z" * 100_000
    assert "Traceback" not in proxy.log()


def test_garbage_does_not_hurt_the_process(proxy: Proxy) -> None:
    # Not TLS at all.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert wait_tcp_closed(sock, 5.0) is not None
    # A TLS record header followed by junk.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x40" + bytes(range(64)))
        assert wait_tcp_closed(sock, 5.0) is not None
    # Not HTTP inside TLS.
    with proxy.conn("app.test") as conn:
        conn.send(b"\x00\x01\x02 hello there\r\n\r\n")
        assert conn.response().status == 400
    assert get(proxy, "app.test", b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n").body == b"ok"
    assert "Traceback" not in proxy.log()


def test_unix_socket_upstream(make_proxy: MakeProxy, uds_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(uds_app.server))
    with proxy.client() as client:
        assert client.get(proxy.url("/healthz")).text == "ok"
        body = client.get(proxy.url("/bytes/300000")).content
        assert body == b"x" * 300_000


def test_unknown_host_without_a_default_site_is_404(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(proxy_config([(["app.test"], "app")], {"app": example_app.server}))
    assert get(proxy, "app.test", b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n").status == 404
    assert get(proxy, "app.test", b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").status == 200


def test_http10_absolute_form_without_host_reaches_the_app_with_a_host(proxy: Proxy) -> None:
    """Found by the request fuzzer: the upstream's HTTP/1.1 request had no Host at all."""
    with proxy.conn() as conn:
        conn.send(b"GET https://localhost/ HTTP/1.0\r\n\r\n")
        response = conn.response()
    assert response.status == 200
    assert b'["host","localhost"]' in response.body
