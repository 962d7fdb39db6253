"""What the server's lifecycle relies on: shutdown() drains, idle, on_close, pools handed over
across a reload."""

from __future__ import annotations

import asyncio

from proxy.config import parse_config
from proxy.logs import AccessLog
from proxy.state import ProxyState
from tests.integration.datapath.conftest import proxy_config


async def test_shutdown_closes_an_idle_connection_at_once(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"hello"), 5)
        (protocol,) = proxy.connections
        assert protocol.idle
        protocol.shutdown()
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    await asyncio.sleep(0.05)
    assert proxy.closed == [protocol]  # on_close ran, once


async def test_shutdown_lets_the_request_in_flight_finish(start_proxy, app_tcp):
    proxy = await start_proxy([app_tcp.server])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /sleep/0.5 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        await asyncio.sleep(0.2)
        (protocol,) = proxy.connections
        assert not protocol.idle
        protocol.shutdown()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower()  # no keep-alive after a drain started
    assert body == b"slept"


async def test_pools_are_handed_over_on_reload(tmp_path, app_tcp):
    config = parse_config(proxy_config([app_tcp.server]), tmp_path)
    first = ProxyState.build(config, AccessLog("off"))
    second = ProxyState.build(config, AccessLog("off"), pools=first.pools)
    assert second.pools["app"] is first.pools["app"]
    third = ProxyState.build(config, AccessLog("off"))
    assert third.pools["app"] is not first.pools["app"]
    await first.close()
    await third.close()
