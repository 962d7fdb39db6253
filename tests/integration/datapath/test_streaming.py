"""Large bodies stream through in bounded memory, a slow reader pauses the other side, and an
upgraded connection becomes a byte tunnel (WebSocket echo)."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
import websockets

from tests.integration.datapath.conftest import HOST

MiB = 1024 * 1024
BIG = 100 * MiB
# The proxy's write buffers pause the other side at 256 KiB; one read (up to 256 KiB with
# uvloop) may land on top of that before the pause takes effect.
BUFFER_BOUND = 1 * MiB


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class BufferWatch:
    """Samples the proxy's write buffers (client and upstream side) while a transfer runs."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.client_max = 0
        self.upstream_max = 0
        self.upstream_paused = False
        self.client_paused = False
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            for protocol in list(self.proxy.connections):
                if protocol.transport is None or protocol.transport.is_closing():
                    continue
                self.client_max = max(self.client_max, protocol.transport.get_write_buffer_size())
                self.client_paused |= protocol.gate.paused
                exchange = protocol.exchange or protocol.tunnel
                up = exchange.up if exchange is not None else None
                if up is not None and up.transport is not None and not up.transport.is_closing():
                    self.upstream_max = max(self.upstream_max, up.transport.get_write_buffer_size())
                    self.upstream_paused |= up.reading_paused
            await asyncio.sleep(0.002)

    def __enter__(self) -> BufferWatch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()


def pattern_hash(size: int) -> str:
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    for offset in range(0, size, len(block)):
        digest.update(block[: min(len(block), size - offset)])
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["fixed", "chunked"])
async def test_100_mib_download_in_bounded_memory(start_proxy, app_tcp, kind):
    proxy = await start_proxy([app_tcp.server])
    before = rss()
    digest = hashlib.sha256()
    size = 0
    async with httpx.AsyncClient(base_url=proxy.url, headers={"host": HOST}, timeout=60) as c:
        with BufferWatch(proxy) as watch:
            async with c.stream("GET", f"/{kind}/{BIG}") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    size += len(chunk)
    assert size == BIG
    assert digest.hexdigest() == pattern_hash(BIG)
    assert watch.client_max <= BUFFER_BOUND
    assert rss() - before < 50 * MiB


@pytest.mark.parametrize("kind", ["fixed", "chunked"])
async def test_100_mib_upload_in_bounded_memory(start_proxy, app_unix, kind):
    proxy = await start_proxy([app_unix.server])
    block = bytes(range(256)) * 1024  # 256 KiB

    async def body():
        for _ in range(BIG // len(block)):
            yield block

    expected = hashlib.sha256()
    for _ in range(BIG // len(block)):
        expected.update(block)
    content = body()
    headers = {"host": HOST}
    if kind == "fixed":
        headers["content-length"] = str(BIG)
    before = rss()
    async with httpx.AsyncClient(base_url=proxy.url, headers=headers, timeout=60) as c:
        with BufferWatch(proxy) as watch:
            response = await c.post("/digest", content=content)
    assert response.json() == {"size": BIG, "sha256": expected.hexdigest()}
    assert watch.upstream_max <= BUFFER_BOUND
    assert rss() - before < 50 * MiB


async def test_slow_client_pauses_the_upstream(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    size = 16 * MiB
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=64 * 1024)
    received = 0
    try:
        writer.write(b"GET /fixed/%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % size)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        with BufferWatch(proxy) as watch:
            async with asyncio.timeout(60):
                while received < size:
                    chunk = await reader.read(64 * 1024)
                    assert chunk
                    received += len(chunk)
                    await asyncio.sleep(0.001)  # a reader slower than the app
    finally:
        writer.close()
    assert received == size
    assert watch.upstream_paused  # the proxy stopped reading the app
    assert watch.client_max <= BUFFER_BOUND  # instead of growing its buffer


async def test_slow_upstream_pauses_the_client(start_proxy, raw_upstream):
    """The app reads the body slowly: the proxy stops reading the client."""
    done = asyncio.Event()

    async def slow_reader(reader, writer, upstream):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while length:
            chunk = await reader.read(16 * 1024)
            length -= len(chunk)
            await asyncio.sleep(0.002)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        done.set()

    upstream = await raw_upstream(slow_reader)
    proxy = await start_proxy([upstream.address])
    size = 8 * MiB
    block = b"x" * (256 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        with BufferWatch(proxy) as watch:
            writer.write(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"ok"), 60)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert watch.client_paused  # reading from the client stopped while the app caught up
    assert watch.upstream_max <= BUFFER_BOUND


async def test_websocket_echo_through_the_tunnel(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/ws", max_size=None) as ws:
        for message in ("hello", "world" * 1000):
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 5) == message
        await ws.send(b"\x00\x01binary")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01binary"
        big = bytes(range(256)) * 8192  # 2 MiB frame: backpressure inside the tunnel
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 10) == big
    await asyncio.sleep(0.2)
    assert not proxy.connections  # both sides closed when the client closed


async def test_upgrade_refused_by_the_app_is_a_normal_response(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for _ in range(2):  # the connection stays usable
            writer.write(
                b"GET /hello HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\n"
                b"Upgrade: something\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(5) == b"hello"
    finally:
        writer.close()


async def test_client_that_stops_reading_is_dropped(start_proxy, app_tcp):
    """A client that takes no byte for upstream_read_timeout cannot hold the upstream forever."""
    proxy = await start_proxy([app_tcp.server], limits={"upstream_read_timeout": "500ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=64 * 1024)
    loop = asyncio.get_running_loop()
    try:
        writer.write(b"GET /fixed/%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % (64 * MiB))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        started = loop.time()
        for _ in range(200):  # the proxy side goes away while we read nothing
            if not proxy.connections:
                break
            await asyncio.sleep(0.05)
        assert not proxy.connections
        assert loop.time() - started < 5
    finally:
        writer.close()
