"""Requests through the data path: TCP and unix upstreams, keep-alive, framing in both
directions, HEAD, 204/304, pipelining, Expect: 100-continue, HTTP/1.0, forwarding headers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import httpx
import pytest

from tests.integration.datapath.conftest import HOST, raw_exchange


@pytest.fixture(params=["tcp", "unix"])
def app(request, app_tcp, app_unix):
    return app_tcp if request.param == "tcp" else app_unix


def client(proxy) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=proxy.url, headers={"host": HOST}, timeout=30)


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


async def test_get_over_keep_alive_on_both_sides(start_proxy, app):
    proxy = await start_proxy([app.server])
    async with client(proxy) as c:
        for _ in range(3):
            response = await c.get("/hello")
            assert response.status_code == 200
            assert response.text == "hello"
            assert "transfer-encoding" not in response.headers
    assert len(proxy.closed) + len(proxy.connections) == 1  # one client connection
    assert proxy.pool.idle_count == 1  # and one upstream connection, back in the pool


async def test_request_bodies_fixed_and_chunked(start_proxy, app):
    proxy = await start_proxy([app.server])
    body = pattern(300_000)

    async def pieces():
        for i in range(0, len(body), 70_000):
            yield body[i : i + 70_000]

    async with client(proxy) as c:
        fixed = await c.post("/digest", content=body)
        chunked = await c.post("/digest", content=pieces())
        empty = await c.post("/digest", content=b"")
    expected = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert fixed.json() == expected
    assert chunked.json() == expected
    assert empty.json()["size"] == 0


@pytest.mark.parametrize("kind", ["fixed", "chunked"])
async def test_response_bodies(start_proxy, app, kind):
    proxy = await start_proxy([app.server])
    async with client(proxy) as c:
        response = await c.get(f"/{kind}/1000000")
    assert response.content == pattern(1_000_000)
    if kind == "fixed":
        assert response.headers["content-length"] == "1000000"
    else:
        assert response.headers["transfer-encoding"] == "chunked"


async def test_echo_streams_both_ways_at_once(start_proxy, app):
    """The app answers while the body is still coming: both directions flow at the same time
    (a raw client that reads while it writes; httpx would write everything first)."""
    proxy = await start_proxy([app.server])
    body = pattern(4_000_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

    async def send():
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), 65536):
            writer.write(body[i : i + 65536])
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        received = bytearray()
        async with asyncio.timeout(20):
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                received += chunk[:-2]
        await sender
    finally:
        writer.close()
    assert received == body


async def test_head_204_304_have_no_body_and_keep_the_connection(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    async with client(proxy) as c:
        head = await c.head("/fixed/5000")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "5000"
        assert (await c.get("/status/204")).status_code == 204
        assert (await c.get("/status/304")).status_code == 304
        assert (await c.get("/hello")).text == "hello"
    assert len(proxy.closed) + len(proxy.connections) == 1


async def test_pipelined_requests_are_answered_in_order(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    requests = b"".join(
        b"GET %s HTTP/1.1\r\nHost: app.test\r\n\r\n" % path
        for path in (b"/sleep/0.2", b"/hello", b"/status/204")
    )
    requests += b"GET /pid HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    data = await raw_exchange(proxy.port, requests)
    statuses = re.findall(rb"HTTP/1\.1 \d\d\d [A-Za-z ]+", data)
    assert statuses == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 200 OK",
    ]
    assert data.index(b"slept") < data.index(b"hello")


async def test_expect_100_continue_is_relayed(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"POST /digest HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
        assert body == {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    finally:
        writer.close()


async def test_http10_client_gets_a_close_delimited_body(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    data = await raw_exchange(proxy.port, b"GET /chunked/1000 HTTP/1.0\r\nHost: app.test\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == pattern(1000)


async def test_http10_keep_alive_when_asked(start_proxy, app_tcp):
    # ApacheBench's -k and old clients: HTTP/1.0 with "Connection: keep-alive" keeps the
    # connection for a response of known length, and the response says so.
    proxy = await start_proxy([app_tcp.server])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for size in (100, 7):
            writer.write(
                b"GET /fixed/%d HTTP/1.0\r\nHost: app.test\r\nConnection: Keep-Alive\r\n\r\n" % size
            )
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).lower()
            assert head.startswith(b"http/1.1 200")
            assert b"connection: keep-alive\r\n" in head
            assert b"content-length: %d\r\n" % size in head
            assert await asyncio.wait_for(reader.readexactly(size), 5) == pattern(size)
        # A body of unknown length can only be delimited by closing, keep-alive or not.
        writer.write(
            b"GET /chunked/1000 HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n"
        )
        rest = await asyncio.wait_for(reader.read(), 5)
        head, _, body = rest.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        assert body == pattern(1000)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "connection",
    [b"", b"Connection: close\r\n", b"Connection: keep-alive, close\r\n",
     b"Connection: close\r\nConnection: keep-alive\r\n"],
)  # fmt: skip
async def test_http10_closes_unless_keep_alive_alone_is_asked(start_proxy, app_tcp, connection):
    proxy = await start_proxy([app_tcp.server])
    data = await raw_exchange(
        proxy.port, b"GET /fixed/10 HTTP/1.0\r\nHost: app.test\r\n" + connection + b"\r\n"
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert body == pattern(10)


async def test_error_reply_to_a_bodiless_request_closes_at_once(start_proxy, app_tcp):
    # Lingering (reading a body we will not use, so the kernel sends no reset) is for requests
    # that have one; a client reading to the end must not wait for it.
    proxy = await start_proxy([app_tcp.server])
    started = asyncio.get_running_loop().time()
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.0\r\nHost: nobody.test\r\n\r\n")
    elapsed = asyncio.get_running_loop().time() - started
    assert data.startswith(b"HTTP/1.1 404 ")
    assert elapsed < 1.5, elapsed  # the linger lasts 2 s


async def test_head_is_sent_before_a_late_body(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    async with client(proxy) as c, c.stream("GET", "/late-body") as response:
        # the head came without waiting for the body (which the app sends 0.5 s later)
        assert response.status_code == 200
        assert await response.aread() == b"late"


async def test_forwarding_headers_reach_the_app(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    async with client(proxy) as c:
        response = await c.get(
            "/headers",
            headers={
                "x-forwarded-for": "6.6.6.6",
                "connection": "keep-alive, x-secret",
                "x-secret": "s",
            },
        )
    seen = response.json()
    assert seen["host"] == HOST
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert "x-secret" not in seen


async def test_unknown_host_gets_404_and_the_upstream_is_not_contacted(start_proxy, raw_upstream):
    upstream = await raw_upstream(lambda r, w, u: asyncio.sleep(0))
    proxy = await start_proxy([upstream.address])
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 404 ")
    assert upstream.connections == 0


async def test_absolute_form_target_is_sent_in_origin_form(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    data = await raw_exchange(
        proxy.port,
        b"GET http://app.test/headers?x=1 HTTP/1.1\r\nHost: other.test\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    seen = json.loads(body)
    assert seen["host"] == HOST  # the authority replaced Host
    assert seen["x-forwarded-host"] == HOST
