"""100 MiB each way through the proxy: every byte arrives, and the proxy does not buffer it
(its peak RSS, VmHWM, grows by far less than the body)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from tests.integration.harness import AppProcess
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, proxy_config

MIB = 1024 * 1024
TOTAL = 100 * MIB
BOUND_KIB = 50 * 1024  # the proxy's peak RSS may grow by this much, not by 100 MiB


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, example_app: AppProcess, sink_app: AppProcess) -> Proxy:
    config = proxy_config(
        [(["localhost"], "app"), (["sink.test"], "sink")],
        {"app": example_app.server, "sink": sink_app.server},
        default_site="localhost",
        limits='max_body_bytes = "200MiB"',
    )
    proxy = make_module_proxy(config)
    with proxy.client() as client:  # warm up: certificates, pools, lazy imports
        assert client.get(proxy.url("/bytes/1000000")).status_code == 200
    return proxy


class Upload:
    """A 100 MiB body made of distinct blocks, hashed as it is produced."""

    def __init__(self, total: int = TOTAL, block: int = MIB) -> None:
        self.total = total
        self.block = block
        self.digest = hashlib.sha256()
        self.seed = os.urandom(block)

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        n = 0
        while sent < self.total:
            # Each block differs, so a dropped, repeated or reordered block changes the hash.
            piece = n.to_bytes(8, "big") + self.seed[8 : self.block]
            piece = piece[: self.total - sent]
            self.digest.update(piece)
            sent += len(piece)
            n += 1
            yield piece


def test_100_mib_upload_chunked_is_streamed(proxy: Proxy) -> None:
    before = proxy.vm_hwm_kib()
    body = Upload()
    with proxy.client() as client:
        response = _post_to_sink(client, proxy, body)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["bytes"] == TOTAL
    assert got["sha256"] == body.digest.hexdigest()
    assert proxy.vm_hwm_kib() - before < BOUND_KIB


def test_100_mib_upload_with_content_length_is_streamed(proxy: Proxy) -> None:
    before = proxy.vm_hwm_kib()
    body = Upload()
    with proxy.client() as client:
        response = _post_to_sink(client, proxy, body, headers={"Content-Length": str(TOTAL)})
    assert response.status_code == 200, response.text
    assert response.json() == {"bytes": TOTAL, "sha256": body.digest.hexdigest()}
    assert proxy.vm_hwm_kib() - before < BOUND_KIB


def _post_to_sink(client, proxy: Proxy, body: Upload, headers: dict | None = None):  # type: ignore[no-untyped-def]
    # sink.test does not resolve: connect to 127.0.0.1, send its name as SNI and Host.
    return client.post(
        f"https://127.0.0.1:{proxy.port}/sink",
        content=iter(body),
        headers={"Host": "sink.test", **(headers or {})},
        extensions={"sni_hostname": "sink.test"},
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_100_mib_download_is_streamed(proxy: Proxy, chunked: bool) -> None:
    before = proxy.vm_hwm_kib()
    digest = hashlib.sha256()
    count = 0
    query = "?chunk=1048576" + ("&chunked=1" if chunked else "")
    with (
        proxy.client() as client,
        client.stream("GET", proxy.url(f"/bytes/{TOTAL}{query}")) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_raw(1024 * 1024):
            count += len(chunk)
            digest.update(chunk)
    expected = hashlib.sha256()
    block = b"x" * MIB
    for _ in range(TOTAL // MIB):
        expected.update(block)
    assert count == TOTAL
    assert digest.hexdigest() == expected.hexdigest()
    assert proxy.vm_hwm_kib() - before < BOUND_KIB
