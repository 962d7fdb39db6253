"""The access log on the proxy's stdout: one line per request, readable by default, JSON on
request; each names the status and the upstream."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

from tests.integration.harness import AppProcess, basic_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy


def lines_with(proxy: Proxy, token: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in proxy.access_log().splitlines() if token in line]
        if found or time.monotonic() > deadline:
            time.sleep(0.2)  # a second line for the same request would show up by now
            return [line for line in proxy.access_log().splitlines() if token in line]
        time.sleep(0.05)


def misdirected(proxy: Proxy, token: str) -> int:
    with proxy.conn("localhost") as conn:
        conn.send(f"GET /x?t={token} HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n".encode())
        return conn.response().status


def test_text_access_log_one_line_per_request(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    token = uuid.uuid4().hex
    with proxy.client() as client:
        assert client.get(proxy.url(f"/healthz?t={token}")).status_code == 200
        assert client.post(proxy.url(f"/echo?t={token}x"), content=b"a" * 1000).content == (
            b"a" * 1000
        )
    (line,) = lines_with(proxy, f't={token}"')  # the GET only
    assert f'"GET /healthz?t={token} HTTP/1.1"' in line or f'"GET /healthz?t={token}"' in line
    assert " 200 " in line
    assert f"upstream={example_app.server}" in line
    assert "sni=localhost" in line
    assert "127.0.0.1" in line
    (post,) = lines_with(proxy, f"t={token}x")
    assert " 200 " in post and "POST" in post
    bytes_in = re.search(r"\bin=(\d+)", post)
    assert bytes_in is not None and int(bytes_in[1]) >= 1000, post

    status = misdirected(proxy, token + "m")
    (error_line,) = lines_with(proxy, token + "m")
    assert f" {status} " in error_line


def test_json_access_log(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(example_app.server, extra_server='access_log = "json"'))
    token = uuid.uuid4().hex
    with proxy.client() as client:
        assert client.get(proxy.url(f"/bytes/5000?t={token}")).status_code == 200
        assert client.post(proxy.url(f"/echo?t={token}p"), content=b"b" * 1000).status_code == 200
    lines_with(proxy, token + "p")
    records = [json.loads(line) for line in proxy.access_log().splitlines() if line.strip()]
    (get,) = [r for r in records if r["target"] == f"/bytes/5000?t={token}"]
    assert get["status"] == 200
    assert get["method"] == "GET"
    assert get["upstream"] == example_app.server
    assert get["sni"] == "localhost"
    assert get["host"].startswith("localhost")
    assert get["client"].startswith("127.0.0.1")
    assert get["bytes_out"] >= 5000
    assert isinstance(get["duration_ms"], int | float)
    assert isinstance(get["time"], int | float)
    (post,) = [r for r in records if r["target"] == f"/echo?t={token}p"]
    assert post["method"] == "POST"
    assert post["bytes_in"] >= 1000
    assert post["bytes_out"] >= 1000


def test_requests_the_proxy_refuses_are_logged_too(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server, limits='max_header_bytes = "4KiB"'))
    token = uuid.uuid4().hex
    refusals = {
        400: f"GET /fold?t={token} HTTP/1.1\r\nHost: app.test\r\nX-A: b\r\n c\r\n\r\n",
        431: f"GET /big?t={token} HTTP/1.1\r\nHost: app.test\r\nX-Big: {'a' * 8000}\r\n\r\n",
    }
    for status, head in refusals.items():
        with proxy.conn("app.test") as conn:
            conn.send(head.encode())
            assert conn.response().status == status
    for status in refusals:
        assert any(f" {status} " in line for line in lines_with(proxy, token)), status


def test_a_stdout_nobody_reads_never_stalls_clients(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    """stdout a pipe that fills up (journald stuck, a log shipper gone): the lines wait or are
    dropped, the requests are served as before, and SIGTERM still stops the proxy."""
    proxy = make_proxy(basic_config(example_app.server), start=False)
    r, w = os.pipe()  # 64 KiB of pipe: about 500 access lines
    try:
        proxy.stdout = w
        proxy.start()
        with proxy.client(timeout=10) as client:
            for _ in range(1000):
                assert client.get(proxy.url("/healthz")).status_code == 200
        proxy.signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
    finally:
        os.close(r)
        os.close(w)
