"""What a client sees when the upstream fails: refused (502), silent (504), unreachable in time
(connect timeout), or dead in the middle of a response (an incomplete message, never a complete
one). Each failure mode is a site of its own on one proxy."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.harness import free_port, running
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, RawUpstream, proxy_config

SITES = ("down", "hang", "cut", "backlog")


@pytest.fixture(scope="module")
def hanging() -> Iterator[RawUpstream]:
    with running(RawUpstream("hang")) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def cutting() -> Iterator[RawUpstream]:
    with running(RawUpstream("truncate", announced=1_000_000, sent=10_000)) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def full_backlog() -> Iterator[int]:
    """A listener that never accepts, its accept queue full: new SYNs are dropped, so a connect
    to it hangs until the connecting side gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(sock)
    time.sleep(0.2)
    yield port
    for sock in fillers:
        sock.close()
    listener.close()


@pytest.fixture(scope="module")
def proxy(
    make_module_proxy: MakeProxy, hanging: RawUpstream, cutting: RawUpstream, full_backlog: int
) -> Proxy:
    servers = {
        "down": f"127.0.0.1:{free_port()}",  # nothing listens there
        "hang": hanging.server,
        "cut": cutting.server,
        "backlog": f"127.0.0.1:{full_backlog}",
    }
    return make_module_proxy(
        proxy_config(
            [([f"{name}.test"], name) for name in SITES],
            servers,
            limits='upstream_read_timeout = "1s"\nupstream_connect_timeout = "1s"',
        )
    )


def request(proxy: Proxy, name: str, path: str = "/") -> httpx.Response:
    with proxy.client() as client:
        return client.get(
            f"https://127.0.0.1:{proxy.port}{path}",
            headers={"Host": f"{name}.test"},
            extensions={"sni_hostname": f"{name}.test"},
        )


def test_upstream_refusing_connections_gives_502(proxy: Proxy) -> None:
    response = request(proxy, "down")
    assert response.status_code == 502
    # The proxy is still fine afterwards.
    assert request(proxy, "down").status_code == 502


def test_upstream_that_never_answers_gives_504_after_the_read_timeout(
    proxy: Proxy, hanging: RawUpstream
) -> None:
    start = time.monotonic()
    response = request(proxy, "hang", "/never")
    elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert 0.8 <= elapsed < 3.5, elapsed
    assert b"GET /never HTTP/1.1" in hanging.data  # it did reach the upstream


def test_upstream_connect_timeout(proxy: Proxy) -> None:
    start = time.monotonic()
    response = request(proxy, "backlog")
    elapsed = time.monotonic() - start
    assert response.status_code in (502, 504)
    assert 0.8 <= elapsed < 3.5, elapsed


def test_upstream_dying_mid_response_is_not_a_complete_message(proxy: Proxy) -> None:
    received = 0
    with proxy.client() as client:
        with (
            pytest.raises(httpx.RemoteProtocolError),
            client.stream(
                "GET",
                f"https://127.0.0.1:{proxy.port}/big",
                headers={"Host": "cut.test"},
                extensions={"sni_hostname": "cut.test"},
            ) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
        assert received < 1_000_000
        # A new request (new connection or not) is still served.
        assert request(proxy, "down").status_code == 502
