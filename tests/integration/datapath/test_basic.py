"""GET/POST through the data path: TCP and unix upstreams, keep-alive, framing, HEAD, 204/304."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.datapath.conftest import HOST


@pytest.fixture(params=["tcp", "unix"])
def app(request, app_tcp, app_unix):
    return app_tcp if request.param == "tcp" else app_unix


async def test_get_through_the_proxy(start_proxy, app):
    proxy = await start_proxy([app.server])
    async with httpx.AsyncClient(base_url=proxy.url, headers={"host": HOST}) as client:
        for _ in range(3):
            response = await client.get("/hello")
            assert response.status_code == 200
            assert response.text == "hello"
    # three requests over one client connection and one pooled upstream connection
    assert len(proxy.closed) + len(proxy.connections) == 1
    assert proxy.pool.idle_count == 1
