"""The plain-http listener protocol on a real socket, under asyncio and uvloop.

Every test runs a real server on 127.0.0.1 (port 0) and talks to it with httpx or a raw socket;
each scenario is bounded by asyncio.timeout so a hang fails instead of blocking the suite.
"""

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine

import h11
import httpx
import pytest
import uvloop

from proxy.config import Limits
from proxy.downstream.redirect import RedirectProtocol
from proxy.logs import AccessLog

HTTPS_PORT = 8443
TOKENS = {"tok_en-1": "tok_en-1.thumbprint"}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request) -> Callable[[Coroutine], object]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coro: Coroutine) -> object:
        async def bounded():
            async with asyncio.timeout(20):
                return await coro

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    return run


@contextlib.asynccontextmanager
async def serve(responder=TOKENS.get, store=None, **limits) -> AsyncIterator[int]:
    settings = Limits(
        **{"header_read_timeout": 5.0, "idle_timeout": 5.0, "max_header_bytes": 8192, **limits}
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RedirectProtocol(HTTPS_PORT, responder, settings, acme_store=store),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def talk(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send the parts (pausing between them), then read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await reader.read()
    finally:
        writer.close()


def responses(raw: bytes, methods: list[bytes]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Parse consecutive responses with an h11 CLIENT: each must be valid HTTP/1.1."""
    out = []
    client = h11.Connection(h11.CLIENT)
    client.receive_data(raw)
    for method in methods:
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        response = client.next_event()
        assert isinstance(response, h11.Response), response
        body = b""
        while not isinstance(event := client.next_event(), h11.EndOfMessage):
            body += event.data
        out.append((response.status_code, dict(response.headers), body))
        if client.our_state is h11.MUST_CLOSE:
            break
        client.start_next_cycle()
    return out


def test_httpx_gets_a_308_to_https(run):
    async def scenario():
        async with serve() as port, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{port}/some/path?q=1&r=%20"
            r = await client.get(url, headers={"Host": "App.Test:8080"})
            assert r.status_code == 308
            assert r.headers["location"] == "https://app.test:8443/some/path?q=1&r=%20"
            assert r.content == b""
            r = await client.post(url, content=b"data", headers={"Host": "app.test"})
            assert r.status_code == 308  # the method is kept by a 308, so POST is redirected too
            r = await client.head(f"http://127.0.0.1:{port}/")
            assert r.status_code == 308
            assert r.headers["location"] == "https://127.0.0.1:8443/"

    run(scenario())


def test_acme_challenge_tokens(run):
    async def scenario():
        async with serve() as port, httpx.AsyncClient() as client:
            base = f"http://127.0.0.1:{port}/.well-known/acme-challenge/"
            r = await client.get(base + "tok_en-1")
            assert (r.status_code, r.text) == (200, "tok_en-1.thumbprint")
            assert r.headers["content-type"].startswith("text/plain")
            r = await client.head(base + "tok_en-1")
            assert (r.status_code, r.content) == (200, b"")
            assert r.headers["content-length"] == str(len("tok_en-1.thumbprint"))
            for missing in ("unknown", "", "tok_en-1/x", "tok%2Fen"):
                assert (await client.get(base + missing)).status_code == 404, missing
            # Only GET and HEAD are challenge requests; anything else is redirected.
            assert (await client.post(base + "tok_en-1")).status_code == 308

    run(scenario())


def test_acme_without_responder_is_404(run):
    async def scenario():
        async with serve(responder=None) as port, httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/.well-known/acme-challenge/tok_en-1")
            assert r.status_code == 404

    run(scenario())


def test_failing_responder_gets_500_and_the_listener_lives_on(run):
    def broken(token: str) -> str | None:
        raise RuntimeError("store unavailable")

    async def scenario():
        async with serve(responder=broken) as port, httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/.well-known/acme-challenge/abc")
            assert r.status_code == 500
            assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 308

    run(scenario())


def test_a_token_published_elsewhere_is_asked_of_the_shared_store_in_order(run):
    """Several instances: a token this one has not heard of yet is looked up in the shared
    store (slowly here), and pipelined answers behind it wait for it, in order."""
    asked = []

    async def store(token: str) -> str | None:
        asked.append(token)
        await asyncio.sleep(0.2)
        if token == "broken":
            raise RuntimeError("store unavailable")
        return {"elsewhere": "elsewhere.thumbprint"}.get(token)

    async def scenario():
        async with serve(store=store) as port:
            raw = await talk(
                port,
                b"GET /.well-known/acme-challenge/elsewhere HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"GET /.well-known/acme-challenge/tok_en-1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"HEAD /.well-known/acme-challenge/nowhere HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"GET /.well-known/acme-challenge/broken HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"GET /5 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            )
            got = responses(raw, [b"GET", b"GET", b"HEAD", b"GET", b"GET"])
            assert [status for status, _, _ in got] == [200, 200, 404, 500, 308]
            assert got[0][2] == b"elsewhere.thumbprint"
            assert got[1][2] == b"tok_en-1.thumbprint"  # known here: the store is not asked
            assert asked == ["elsewhere", "nowhere", "broken"]

    run(scenario())


def test_keep_alive_and_pipelining_answer_in_order(run):
    async def scenario():
        async with serve() as port:
            raw = await talk(
                port,
                b"GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"HEAD /.well-known/acme-challenge/tok_en-1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"GET /4 HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
            )
            got = responses(raw, [b"GET", b"HEAD", b"GET", b"GET"])
            assert [status for status, _, _ in got] == [308, 200, 404, 308]
            assert got[0][1][b"location"] == b"https://a.test:8443/1"
            assert got[1][2] == b""
            assert got[3][1][b"location"] == b"https://b.test:8443/4"
            assert got[3][1][b"connection"] == b"close"

    run(scenario())


def test_byte_at_a_time_request(run):
    async def scenario():
        async with serve() as port:
            request = b"GET /slow HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            raw = await talk(port, *(request[i : i + 1] for i in range(len(request))), pause=0.001)
            [(status, headers, _)] = responses(raw, [b"GET"])
            assert status == 308
            assert headers[b"location"] == b"https://a.test:8443/slow"

    run(scenario())


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0 may omit Host, but we cannot redirect without one
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",  # obs-fold, h11 unfolds
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_and_close(run, request_bytes):
    async def scenario():
        async with serve() as port:
            raw = await talk(port, request_bytes + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            [(status, headers, _)] = responses(raw, [b"GET"])
            assert status == 400
            assert headers[b"connection"] == b"close"

    run(scenario())


def test_header_section_over_the_limit_is_431(run):
    async def scenario():
        async with serve(max_header_bytes=1024) as port:
            raw = await talk(
                port, b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: 0123456789\r\n" * 100
            )
            [(status, headers, _)] = responses(raw, [b"GET"])
            assert status == 431
            assert headers[b"connection"] == b"close"
            # just under the limit is fine
            ok = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + b"X: y\r\n" * 100 + b"\r\n"
            assert responses(await talk(port, ok), [b"GET"])[0][0] == 308

    run(scenario())


def test_a_request_body_is_read_before_the_answer_and_the_connection_stays(run):
    async def scenario():
        async with serve() as port:
            raw = await talk(
                port,
                b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                b"PUT /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
                b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            answers = responses(raw, [b"POST", b"PUT", b"GET"])
            assert [(status, headers[b"location"]) for status, headers, _ in answers] == [
                (308, b"https://a:8443/form"),
                (308, b"https://a:8443/chunked"),
                (308, b"https://a:8443/next"),
            ]
            assert b"connection" not in answers[0][1]  # the body was read: no need to close

    run(scenario())


def test_a_body_over_max_body_bytes_is_413_without_reading_it(run):
    async def scenario():
        async with serve(max_body_bytes=1000) as port:
            raw = await talk(
                port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n" + b"x" * 10
            )
            [(status, headers, _)] = responses(raw, [b"POST"])
            assert (status, headers[b"connection"]) == (413, b"close")
            # chunked: counted as it arrives
            body = b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
            raw = await talk(
                port,
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
            )
            [(status, _, _)] = responses(raw, [b"POST"])
            assert status == 413

    run(scenario())


def test_a_body_that_stalls_gets_408(run):
    async def scenario():
        async with serve(body_read_timeout=0.5) as port:
            start = asyncio.get_running_loop().time()
            raw = await talk(port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            elapsed = asyncio.get_running_loop().time() - start
            [(status, _, _)] = responses(raw, [b"POST"])
            assert status == 408
            assert 0.4 < elapsed < 3, elapsed

    run(scenario())


def test_a_body_that_keeps_coming_is_waited_for(run):
    async def scenario():
        async with serve(body_read_timeout=0.5) as port:
            parts = [
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
            ]
            parts += [b"a", b"b", b"c", b"d"]
            raw = await talk(port, *parts, pause=0.3)  # 1.2 s in all, 0.3 s between reads
            [(status, _, _)] = responses(raw, [b"POST"])
            assert status == 308

    run(scenario())


def test_http10_gets_its_answer_and_the_connection_closes(run):
    async def scenario():
        async with serve() as port:
            raw = await talk(port, b"GET /old HTTP/1.0\r\nHost: a.test\r\n\r\n")
            [(status, headers, _)] = responses(raw, [b"GET"])
            assert (status, headers[b"location"]) == (308, b"https://a.test:8443/old")

    run(scenario())


def test_slow_header_gets_408(run):
    async def scenario():
        async with serve(header_read_timeout=0.3) as port:
            loop = asyncio.get_running_loop()
            started = loop.time()
            raw = await talk(port, b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
            assert 0.25 <= loop.time() - started < 5
            [(status, headers, _)] = responses(raw, [b"GET"])
            assert (status, headers[b"connection"]) == (408, b"close")

    run(scenario())


def test_slowloris_trickle_does_not_extend_the_deadline(run):
    async def scenario():
        async with serve(header_read_timeout=0.5, idle_timeout=5) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            loop = asyncio.get_running_loop()
            started = loop.time()
            writer.write(b"GET / HTTP/1.1\r\n")
            answer = asyncio.create_task(reader.read(100))
            while not answer.done() and loop.time() - started < 5:
                writer.write(b"X: y\r\n")  # a header line every 50 ms, forever
                await asyncio.sleep(0.05)
            raw = await answer
            writer.close()
            assert loop.time() - started < 2
            assert raw.startswith(b"HTTP/1.1 408 ")

    run(scenario())


def test_silent_connection_is_closed_without_an_answer(run):
    async def scenario():
        async with serve(header_read_timeout=0.2) as port:
            assert await talk(port) == b""

    run(scenario())


def test_idle_keep_alive_connection_is_closed(run):
    async def scenario():
        async with serve(idle_timeout=0.3, header_read_timeout=5) as port:
            loop = asyncio.get_running_loop()
            started = loop.time()
            raw = await talk(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert 0.25 <= loop.time() - started < 4
            [(status, _, _)] = responses(raw, [b"GET"])
            assert status == 308  # one answer, then a silent close

    run(scenario())


def test_idle_timer_restarts_for_each_request(run):
    async def scenario():
        async with serve(idle_timeout=0.4, header_read_timeout=5) as port:
            one = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
            # 4 requests 0.2 s apart: 0.8 s in total, longer than the idle timeout
            raw = await talk(port, one, one, one, one, pause=0.2)
            assert [s for s, _, _ in responses(raw, [b"GET"] * 4)] == [308] * 4

    run(scenario())


@pytest.mark.parametrize("half_close", [False, True])
def test_client_that_does_not_read_is_paused_then_fully_answered(run, half_close):
    pauses = []

    class Counting(RedirectProtocol):
        def connection_made(self, transport) -> None:
            # Small kernel buffers on both ends, so a few hundred KB fill them.
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            super().connection_made(transport)

        def pause_writing(self) -> None:
            pauses.append(1)
            super().pause_writing()

    async def scenario():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Counting(HTTPS_PORT, None, Limits()), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up early
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        count = 10_000  # ~600 KB of answers: more than the socket buffers hold
        payload = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count))
        if half_close:  # the requests end with the client's FIN instead of Connection: close
            writer.write(payload)
            writer.write_eof()
        else:
            writer.write(payload + b"GET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.3)  # nobody reads: the server's write buffer fills up
        raw = await reader.read()
        writer.close()
        server.close()
        assert pauses, "the scenario did not make the server pause"
        assert raw.count(b"HTTP/1.1 308 Permanent Redirect\r\n") == count + (not half_close)
        assert raw.find(b"https://a:8443/1234\r\n") < raw.find(b"https://a:8443/1235\r\n")
        last = b"https://a:8443/%d\r\n" % (count - 1)
        assert raw.find(last) > raw.find(b"https://a:8443/9990\r\n") > 0
        # the first few parse as valid HTTP/1.1 one after another
        assert [s for s, _, _ in responses(raw[:2000], [b"GET"] * 5)] == [308] * 5

    run(scenario())


def test_bare_lf_in_a_pipelined_request_is_400_after_the_good_ones(run):
    async def scenario():
        async with serve() as port:
            raw = await talk(
                port,
                b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET /3 HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            )
            got = responses(raw, [b"GET"] * 3)
            assert [status for status, _, _ in got] == [308, 308, 400]

    run(scenario())


def test_unsupported_transfer_coding_is_501(run):
    async def scenario():
        async with serve() as port:
            raw = await talk(port, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
            [(status, headers, _)] = responses(raw, [b"POST"])
            assert (status, headers[b"connection"]) == (501, b"close")

    run(scenario())


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_line_per_request(run, fmt):
    logger = logging.getLogger("tlsproxy.access")
    handler = _Lines()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    async def scenario():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: RedirectProtocol(HTTPS_PORT, TOKENS.get, Limits(), AccessLog(fmt)),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        await talk(
            port,
            b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"GET /.well-known/acme-challenge/tok_en-1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"GET /y HTTP/1.1\r\nHost: bad host\r\n\r\n",
        )
        server.close()

    try:
        run(scenario())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(handler.lines) == 3
    if fmt == "json":
        records = [json.loads(line) for line in handler.lines]
        assert [(r["target"], r["status"]) for r in records] == [
            ("/x", 308),
            ("/.well-known/acme-challenge/tok_en-1", 200),
            ("/y", 400),
        ]
        assert records[0]["client"] == "127.0.0.1"
        assert records[0]["host"] == "a.test"
    else:
        assert '"GET /x" 308' in handler.lines[0]
        assert '"GET /.well-known/acme-challenge/tok_en-1" 200' in handler.lines[1]
        assert '"GET /y" 400' in handler.lines[2]


def test_access_log_off_writes_nothing(run):
    logger = logging.getLogger("tlsproxy.access")
    handler = _Lines()
    logger.addHandler(handler)

    async def scenario():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: RedirectProtocol(HTTPS_PORT, None, Limits(), AccessLog("off")), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        raw = await talk(port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 308 ")
        server.close()

    try:
        run(scenario())
    finally:
        logger.removeHandler(handler)
    assert handler.lines == []
