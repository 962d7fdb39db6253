"""What the client gets when something goes wrong, and what the upstream never gets."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import pytest

from proxy.downstream.exchange import Exchange
from tests.integration.datapath.conftest import raw_exchange, read_request

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def serve_ok(reader, writer, upstream):
    """A keep-alive upstream that answers every request head with 200 "ok"."""
    while True:
        await read_request(reader, upstream)
        writer.write(OK)
        await writer.drain()


def status_of(data: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d\d\d) ", data)
    assert match, data[:200]
    return int(match.group(1))


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Content-Length with Transfer-Encoding: the classic smuggling ambiguity
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\nHost: app.test\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1, 2\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GARBAGE\r\n\r\n",
    ],
    ids=["cl-and-te", "bad-chunk-size", "obs-fold", "bare-lf", "two-lengths", "no-host", "junk"],
)
async def test_ambiguous_or_malformed_requests_get_400_and_never_reach_the_upstream(
    start_proxy, raw_upstream, request_bytes
):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address])
    data = await raw_exchange(proxy.port, request_bytes)
    assert status_of(data) == 400
    assert b"connection: close" in data.lower()
    assert not any(b"POST" in r or b"X-A" in r for r in upstream.received)
    # the bad-chunk request's head may reach the upstream only before h11 sees the chunk;
    # the smuggling forms never do
    if b"Content-Length: 3" in request_bytes or b"folded" in request_bytes:
        assert upstream.connections == 0


async def test_bad_chunk_size_mid_body_aborts_the_upstream_request(start_proxy, raw_upstream):
    async def wait_for_body(reader, writer, upstream):
        await read_request(reader, upstream)
        body = b""
        while not body.endswith(b"0\r\n\r\n"):
            chunk = await reader.read(65536)
            if not chunk:
                upstream.received.append(b"EOF after " + body)
                return
            body += chunk
        writer.write(OK)

    upstream = await raw_upstream(wait_for_body)
    proxy = await start_proxy([upstream.address])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"5\r\nhello\r\n")
    await asyncio.sleep(0.2)
    writer.write(b"zz\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status_of(data) == 400
    await asyncio.sleep(0.2)
    # the upstream saw the valid part and then the connection end, never a complete request
    assert upstream.received[-1] == b"EOF after 5\r\nhello\r\n"


async def test_header_section_too_large_gets_431(start_proxy, raw_upstream):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address], limits={"max_header_bytes": "4KiB"})
    big = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    assert status_of(await raw_exchange(proxy.port, big)) == 431
    small = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    assert status_of(await raw_exchange(proxy.port, small)) == 200
    assert upstream.connections == 1


async def test_body_over_the_limit_by_content_length_gets_413_without_the_upstream(
    start_proxy, raw_upstream
):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address], limits={"max_body_bytes": 1000})
    data = await raw_exchange(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001,
    )
    assert status_of(data) == 413
    assert upstream.connections == 0


async def test_chunked_body_over_the_limit_gets_413_midway(start_proxy, raw_upstream):
    async def read_forever(reader, writer, upstream):
        await read_request(reader, upstream)
        while await reader.read(65536):
            pass

    upstream = await raw_upstream(read_forever)
    proxy = await start_proxy([upstream.address], limits={"max_body_bytes": 100_000})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(40):
            writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.005)
    except ConnectionError:
        pass
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status_of(data) == 413
    assert upstream.connections == 1


async def test_upstream_refused_gets_502(start_proxy):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        proxy = await start_proxy([f"127.0.0.1:{port}"])
        data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 502
    assert b"connection: close" in data.lower()


async def test_unix_socket_missing_gets_502(start_proxy, tmp_path):
    proxy = await start_proxy([f"unix:{tmp_path / 'nothing.sock'}"])
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 502


async def test_upstream_connect_timeout_gets_504(start_proxy):
    # A listener whose accept queue is full: the kernel drops further SYNs, connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                try:
                    filler.connect(address)
                except BlockingIOError:
                    pass
                fillers.append(filler)
            proxy = await start_proxy(
                [f"127.0.0.1:{address[1]}"], limits={"upstream_connect_timeout": "300ms"}
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            assert status_of(data) == 504
            assert loop.time() - started < 3
        finally:
            for filler in fillers:
                filler.close()


async def test_upstream_read_timeout_gets_504(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server], limits={"upstream_read_timeout": "300ms"})
    data = await raw_exchange(proxy.port, b"GET /sleep/3 HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 504
    fast = await raw_exchange(
        proxy.port, b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    assert status_of(fast) == 200


async def test_upstream_dying_mid_chunked_response_never_completes_it(start_proxy, raw_upstream):
    async def die_midway(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    upstream = await raw_upstream(die_midway)
    proxy = await start_proxy([upstream.address])
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 200
    assert data.endswith(b"5\r\nhello\r\n")  # what arrived, then the close: no final chunk


async def test_upstream_dying_mid_fixed_response_closes_short(start_proxy, raw_upstream):
    async def die_midway(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    upstream = await raw_upstream(die_midway)
    proxy = await start_proxy([upstream.address])
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length: 100" in head.lower()
    assert body == b"x" * 10


async def test_real_app_process_dying_midway(start_proxy, tmp_path):
    from tests.integration.datapath.conftest import APP
    from tests.integration.harness import AppProcess, running

    with running(AppProcess(tmp_path, APP)) as app:
        proxy = await start_proxy([app.server])
        data = await raw_exchange(proxy.port, b"GET /die-midway HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 200
    assert not data.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\ncontent-length: 0\r\n\r\n",
        b"NONSENSE\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n",
    ],
    ids=["cl-and-te", "obs-fold", "junk", "too-large"],
)
async def test_malformed_upstream_response_gets_502(start_proxy, raw_upstream, response):
    async def answer(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(1)

    upstream = await raw_upstream(answer)
    proxy = await start_proxy([upstream.address], limits={"max_header_bytes": "4KiB"})
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 502


async def test_stale_pooled_connection_is_retried_once(start_proxy, raw_upstream):
    """The upstream drops a kept-alive connection just as the next request arrives."""

    async def answer_once_then_drop(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(OK)
        await writer.drain()
        await read_request(reader, upstream)
        writer.transport.abort()  # no response byte: the request may be replayed

    upstream = await raw_upstream(answer_once_then_drop)
    proxy = await start_proxy([upstream.address])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert status_of(head) == 200
            assert await reader.readexactly(2) == b"ok"
    finally:
        writer.close()
    assert upstream.connections == 2


async def test_post_with_body_sent_is_not_retried(start_proxy, raw_upstream):
    async def answer_once_then_drop(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(OK)
        await writer.drain()
        await read_request(reader, upstream)
        await reader.readexactly(5)
        writer.transport.abort()

    upstream = await raw_upstream(answer_once_then_drop)
    proxy = await start_proxy([upstream.address])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        writer.write(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello")
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert status_of(data) == 502
    assert upstream.connections == 1


async def test_idle_pooled_connection_closed_by_the_server_leaves_the_pool(
    start_proxy, raw_upstream
):
    async def answer_then_close(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.1)  # keep-alive said nothing: the server closes while idle

    upstream = await raw_upstream(answer_then_close)
    proxy = await start_proxy([upstream.address])
    request = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    assert status_of(await raw_exchange(proxy.port, request)) == 200
    await asyncio.sleep(0.3)
    assert proxy.pool.idle_count == 0
    assert status_of(await raw_exchange(proxy.port, request)) == 200
    assert upstream.connections == 2


async def test_idle_pooled_connections_expire(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server], keepalive_timeout="300ms")
    request = b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    assert status_of(await raw_exchange(proxy.port, request)) == 200
    assert proxy.pool.idle_count == 1
    await asyncio.sleep(0.6)
    assert proxy.pool.idle_count == 0


async def test_at_most_max_idle_connections_are_kept(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server], max_idle_connections=2)
    request = b"GET /sleep/0.2 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    results = await asyncio.gather(*(raw_exchange(proxy.port, request) for _ in range(5)))
    assert all(status_of(r) == 200 for r in results)
    assert proxy.pool.idle_count == 2


async def test_slowloris_head_gets_408(start_proxy, raw_upstream):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy(
        [upstream.address], limits={"header_read_timeout": "500ms", "idle_timeout": "10s"}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        # the head trickles in, each piece well within any per-read timeout, then stalls
        for piece in (b"GET / HTTP/1.1\r\n", b"Host: app.test\r\n", b"X-Slow: 1\r\n"):
            writer.write(piece)
            await asyncio.sleep(0.1)
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert status_of(data) == 408
    assert 0.4 < loop.time() - started < 2.5
    assert upstream.connections == 0


async def test_idle_keep_alive_connection_is_closed(start_proxy, raw_upstream):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address], limits={"idle_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    loop = asyncio.get_running_loop()
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed silently
        assert 0.2 < loop.time() - started < 2
    finally:
        writer.close()


async def test_silent_new_connection_is_closed_after_the_header_timeout(start_proxy, raw_upstream):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address], limits={"header_read_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_a_bug_in_one_connection_is_logged_and_closes_only_that_one(
    start_proxy, raw_upstream, monkeypatch, caplog
):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address])
    original = Exchange.on_head

    def broken_on_head(self, status, phrase, headers):
        if self.target == b"/boom":
            raise RuntimeError("injected bug")
        original(self, status, phrase, headers)

    monkeypatch.setattr(Exchange, "on_head", broken_on_head)
    with caplog.at_level(logging.ERROR, logger="tlsproxy"):
        data = await raw_exchange(proxy.port, b"GET /boom HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert data == b""
    assert "injected bug" in caplog.text and "Traceback" in caplog.text
    ok = await raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    assert status_of(ok) == 200


async def test_access_log_line_per_request(start_proxy, raw_upstream, caplog):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address], access_log="text")
    with caplog.at_level(logging.INFO, logger="tlsproxy.access"):
        await raw_exchange(
            proxy.port,
            b"POST /x?y=1 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n"
            b"Connection: close\r\n\r\nabc",
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "tlsproxy.access"]
    assert len(lines) == 1
    line = lines[0]
    assert '"POST /x?y=1" 200' in line and "127.0.0.1" in line and "host=app.test" in line
    assert "in=3" in line and f"upstream={upstream.address}" in line


async def test_refused_requests_are_logged_too(start_proxy, raw_upstream, caplog):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address], access_log="text")
    with caplog.at_level(logging.INFO, logger="tlsproxy.access"):
        await raw_exchange(
            proxy.port, b"GET /fold HTTP/1.1\r\nHost: app.test\r\nX: a\r\n b\r\n\r\n"
        )
        await raw_exchange(proxy.port, b"BAD REQUEST LINE HERE\r\n\r\n")
    lines = [r.getMessage() for r in caplog.records if r.name == "tlsproxy.access"]
    assert len(lines) == 2
    assert '"GET /fold" 400' in lines[0] and "host=app.test" in lines[0]
    assert " 400 " in lines[1]


async def test_refused_server_is_retried_on_another(start_proxy, raw_upstream):
    upstream = await raw_upstream(serve_ok)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        refused = f"127.0.0.1:{sock.getsockname()[1]}"
        proxy = await start_proxy([refused, upstream.address])
        for _ in range(4):  # least-connections rotates over both servers
            request = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
            assert status_of(await raw_exchange(proxy.port, request)) == 200


async def test_request_trailers_are_dropped(start_proxy, raw_upstream):
    async def record_body(reader, writer, upstream):
        await read_request(reader, upstream)
        body = b""
        while not body.endswith(b"0\r\n\r\n"):
            body += await reader.read(65536)
        upstream.received.append(body)
        writer.write(OK)
        await writer.drain()

    upstream = await raw_upstream(record_body)
    proxy = await start_proxy([upstream.address])
    data = await raw_exchange(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: secret\r\n\r\n",
    )
    assert status_of(data) == 200
    assert upstream.received[-1] == b"5\r\nhello\r\n0\r\n\r\n"


async def test_app_refusing_an_expected_body_closes_the_connection(start_proxy, raw_upstream):
    """Expect: 100-continue answered with a final status: the client may skip its body, so the
    connection cannot carry another request."""

    async def refuse(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    upstream = await raw_upstream(refuse)
    proxy = await start_proxy([upstream.address])
    data = await raw_exchange(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    assert status_of(data) == 401
    assert b"100 Continue" not in data


async def test_non_idempotent_request_on_a_stale_connection_is_not_replayed(
    start_proxy, raw_upstream
):
    async def answer_once_then_drop(reader, writer, upstream):
        await read_request(reader, upstream)
        writer.write(OK)
        await writer.drain()
        await read_request(reader, upstream)
        writer.transport.abort()

    upstream = await raw_upstream(answer_once_then_drop)
    proxy = await start_proxy([upstream.address])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        writer.write(b"POST / HTTP/1.1\r\nHost: app.test\r\n\r\n")  # no body, but not idempotent
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert status_of(data) == 502
    assert upstream.connections == 1


async def test_no_server_to_offer_gets_503(start_proxy, raw_upstream):
    upstream = await raw_upstream(serve_ok)
    proxy = await start_proxy([upstream.address])
    proxy.pool.set_servers([])  # e.g. every supervised worker is restarting
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert status_of(data) == 503
    assert upstream.connections == 0
