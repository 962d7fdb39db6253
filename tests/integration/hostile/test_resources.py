"""Resources under hostile load: many pipelined requests, huge numbers of tiny headers,
thousands of idle TLS connections, running out of file descriptors. The proxy's RSS and open
fds are read from /proc before and after, printed, and bounded. (max_connections reached and
recovered from is tests/integration/proxy/test_limits.py's.)"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import running
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, RawUpstream, parse_responses, proxy_config


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def report(what: str, proxy: Proxy, before: tuple[int, int]) -> tuple[int, int]:
    after = (rss_kib(proxy.pid), fds(proxy.pid))
    print(
        f"\n{what}: RSS {before[0] / 1024:.1f} -> {after[0] / 1024:.1f} MiB, "
        f"fds {before[1]} -> {after[1]}"
    )
    return after


def wait_for_fds(proxy: Proxy, at_most: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (count := fds(proxy.pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
    return count


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with running(RawUpstream("ok")) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: RawUpstream) -> Proxy:
    limits = 'header_read_timeout = "2s"\nidle_timeout = "2s"\nmax_header_bytes = "64KiB"\n'
    return make_module_proxy(
        proxy_config([(["localhost"], "raw")], {"raw": upstream.server}, limits=limits)
    )


def warm(proxy: Proxy) -> tuple[int, int]:
    with proxy.client() as client:
        for _ in range(20):
            assert client.get(proxy.url("/")).text == "ok"
    time.sleep(0.2)
    return rss_kib(proxy.pid), fds(proxy.pid)


def test_1000_pipelined_requests_in_one_write(proxy: Proxy) -> None:
    before = warm(proxy)
    with proxy.conn() as conn:
        conn.sock.settimeout(20)
        conn.send(b"GET /p HTTP/1.1\r\nHost: localhost\r\n\r\n" * 1000)
        conn.send(b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        _, data = conn.wait_closed(30)
    responses = parse_responses(data, [b"GET"] * 1001)
    assert [r.body for r in responses] == [b"ok"] * 1001
    after = report("1,000 pipelined requests", proxy, before)
    assert after[0] - before[0] < 20 * 1024  # KiB: reading is paused while they wait


def test_10000_tiny_headers_within_max_header_bytes(proxy: Proxy, upstream: RawUpstream) -> None:
    before = warm(proxy)
    seen = len(upstream.data)
    fields = b"a: b\r\n" * 10_000  # 60,000 bytes: under 64 KiB with the request line
    with proxy.conn() as conn:
        conn.send(b"GET /h HTTP/1.1\r\nHost: localhost\r\n" + fields + b"\r\n")
        assert conn.response().body == b"ok"
    assert upstream.data[seen:].count(b"\na: b\r") == 10_000  # every one went on
    with proxy.conn() as conn:
        conn.send(b"GET /h HTTP/1.1\r\nHost: localhost\r\n" + fields + fields[:12_000] + b"\r\n")
        assert conn.response().status == 431
    report("10,000 tiny headers", proxy, before)


def test_thousands_of_idle_tls_connections(proxy: Proxy) -> None:
    count = 2000
    before = warm(proxy)
    context = ssl.create_default_context(cafile=str(proxy.ca))
    conns = []
    try:
        for _ in range(count):
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            conns.append(context.wrap_socket(raw, server_hostname="localhost"))
        time.sleep(0.3)
        held = report(f"{count} idle TLS connections open", proxy, before)
        per_connection = (held[0] - before[0]) / count
        print(f"RSS per idle TLS connection: {per_connection:.1f} KiB")
        assert held[1] >= before[1] + count * 0.95  # all accepted
        assert per_connection < 64
        # Nothing was asked on them: header_read_timeout (2 s) closes every one.
        for conn in conns:
            conn.settimeout(10)
            try:
                assert conn.recv(1) == b""
            except (ConnectionResetError, ssl.SSLError):
                pass
    finally:
        for conn in conns:
            conn.close()
    after_fds = wait_for_fds(proxy, before[1] + 5, 10)
    report("after they were closed", proxy, before)
    assert after_fds <= before[1] + 5


def test_running_out_of_file_descriptors_is_recovered_from(
    make_proxy: MakeProxy, upstream: RawUpstream
) -> None:
    proxy = make_proxy(proxy_config([(["localhost"], "raw")], {"raw": upstream.server}))
    warm(proxy)
    limit = fds(proxy.pid) + 20
    subprocess.run(
        ["prlimit", f"--pid={proxy.pid}", f"--nofile={limit}:{limit}"], check=True, timeout=10
    )
    sockets = []
    try:
        for _ in range(40):  # twice what the proxy has left: accept() hits EMFILE
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sockets.append(sock)
        proxy.wait_for_log(r"accept failed \(Too many open files\): pausing", timeout=10)
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(1.5)  # the pause is 1 s
    with proxy.client() as client:
        assert client.get(proxy.url("/")).text == "ok"
    assert proxy.proc is not None and proxy.proc.poll() is None
    assert "Traceback" not in proxy.log()
