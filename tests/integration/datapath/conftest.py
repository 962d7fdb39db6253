"""Fixtures for the data-path tests: a real uvicorn app in a subprocess, and the proxy's data
path (ProxyState + DownstreamProtocol) served in the test's own event loop on plain TCP, so a
test can look inside it (pools, transports, buffers) while real clients talk to it.

The loop is uvloop, as in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from proxy.config import parse_config
from proxy.downstream.connection import DownstreamProtocol
from proxy.logs import AccessLog
from proxy.state import ProxyState
from tests.integration.harness import AppProcess, running

APP = "tests.integration.datapath.app:app"
HOST = "app.test"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """The proxy runs on uvloop by default and on asyncio's own loop with `--loop asyncio`:
    every test runs on both (their transports differ in flow control and error reporting)."""
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="module")
def app_tcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    with running(AppProcess(tmp_path_factory.mktemp("dp-app"), APP)) as app:
        yield app


@pytest.fixture(scope="module")
def app_unix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    with running(AppProcess(tmp_path_factory.mktemp("dp-app-unix"), APP, uds=True)) as app:
        yield app


@dataclass
class Proxy:
    state: ProxyState
    server: asyncio.base_events.Server
    connections: set[DownstreamProtocol] = field(default_factory=set)
    closed: list[DownstreamProtocol] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pool(self):
        return self.state.pools["app"]


def proxy_config(servers: list[str], limits: dict | None = None, **upstream: object) -> dict:
    return {
        "server": {"https": ["127.0.0.1:0"], "http": []},
        "limits": limits or {},
        "site": [{"hosts": [HOST, "other.test", "127.0.0.1"], "upstream": "app"}],
        "upstream": {"app": {"servers": servers, **upstream}},
    }


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator:
    """start_proxy(servers, limits=None, access_log="off", **upstream) -> Proxy on 127.0.0.1."""
    started: list[Proxy] = []

    async def start(
        servers: list[str], limits: dict | None = None, access_log: str = "off", **upstream
    ) -> Proxy:
        config = parse_config(proxy_config(servers, limits, **upstream), tmp_path)
        state = ProxyState.build(config, AccessLog(access_log))  # type: ignore[arg-type]
        connections: set[DownstreamProtocol] = set()
        closed: list[DownstreamProtocol] = []

        def on_close(protocol: DownstreamProtocol) -> None:
            connections.discard(protocol)
            closed.append(protocol)

        def factory() -> DownstreamProtocol:
            protocol = DownstreamProtocol(state, on_close)
            connections.add(protocol)
            return protocol

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        proxy = Proxy(state, server, connections, closed)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.server.close()
        for protocol in list(proxy.connections):
            protocol.transport.abort()
    await asyncio.sleep(0.05)  # connection_lost runs on the next loop iterations
    for proxy in started:
        # every request given back to the pool, whatever path it took
        for pool in proxy.state.pools.values():
            assert [slot.outstanding for slot in pool.slots] == [0] * len(pool.slots)
        await proxy.state.close()


async def raw_exchange(
    port: int, data: bytes, *, read_until_close: bool = True, wait: float = 10.0
) -> bytes:
    """Send raw bytes, return everything the proxy sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(wait):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        return b"".join(chunks)
    finally:
        writer.close()


@dataclass
class RawUpstream:
    """An in-process upstream that speaks raw bytes, for behaviour uvicorn would not show."""

    server: asyncio.base_events.Server
    received: list[bytes] = field(default_factory=list)
    connections: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def raw_upstream() -> AsyncIterator:
    """raw_upstream(handler) where `await handler(reader, writer, upstream)` serves a connection."""
    started: list[RawUpstream] = []
    tasks: set[asyncio.Task] = set()

    async def start(handler) -> RawUpstream:
        upstream: RawUpstream

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            upstream.connections += 1
            tasks.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await handler(reader, writer, upstream)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        upstream = RawUpstream(server)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.server.close()
    for task in tasks:
        task.cancel()


async def read_request(reader: asyncio.StreamReader, upstream: RawUpstream) -> bytes:
    """One request head (bodies are not used by the raw tests), recorded in `upstream`."""
    head = await reader.readuntil(b"\r\n\r\n")
    upstream.received.append(head)
    return head
