"""Resources under hostile load (issue 9, "Resources"): max_connections reached and recovered
from, 1,000 pipelined requests in one write, 10,000 tiny headers, thousands of idle TLS
connections, and running out of file descriptors (EMFILE).

The proxy's RSS and open fds are read from /proc before and after each load and printed
(`pytest -s` shows them). Growth is bounded after a warm-up: the first run of a load pays for
what stays allocated (buffers, the allocator's high-water mark, pooled upstream connections), so
the bound applies to the runs after it, where only a leak would keep growing.
"""

from __future__ import annotations

import re
import resource
import select
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import running
from tests.integration.hostile import procstats
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    Proxy,
    TcpServer,
    TlsConn,
    parse_responses,
    wait_tcp_closed,
)

IDLE_CONNECTIONS = 2000
TINY_HEADERS = 10_000
MiB = 1024  # procstats counts KiB


# --- an upstream that says what it got ----------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


class CountingUpstream(TcpServer):
    """Answers every request, keep-alive, with the body "<target> <n>": n is how many header
    lines were exactly `a: b`. So a response says which request it answers, and how many of
    the tiny headers arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[bytes] = []

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        pending = b""
        while data := self.recv(conn, buf):
            pending += data
            while b"\r\n\r\n" in pending:
                head, _, rest = pending.partition(b"\r\n\r\n")
                match = _CONTENT_LENGTH.search(head)
                length = int(match.group(1)) if match else 0
                if len(rest) < length:
                    break
                pending = rest[length:]
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1]
                self.targets.append(target)
                body = b"%s %d" % (target, sum(1 for line in lines[1:] if line == b"a: b"))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def resources_config(upstream: TcpServer, limits: str) -> str:
    # keepalive_timeout short: pooled upstream connections, which count as fds, are gone
    # soon after a load, so the fd count can come back to its baseline.
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "localhost"

[limits]
{limits}

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "counting"

[upstream.counting]
servers = ["{upstream.server}"]
keepalive_timeout = "1s"
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with running(CountingUpstream()) as server:
        yield server


@pytest.fixture(scope="module")
def nofile() -> Iterator[int]:
    """Enough file descriptors for this process (the client side of the idle connections)
    and for the proxies it starts, which inherit the limit; the old limit is put back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS * 2 + 1000
    if soft < wanted:
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
        except (ValueError, OSError):  # not root: as far as the hard limit goes
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: CountingUpstream, nofile: int) -> Proxy:
    limits = (
        'header_read_timeout = "2s"\nidle_timeout = "2s"\n'
        f'max_header_bytes = "128KiB"\nmax_connections = {IDLE_CONNECTIONS + 500}\n'
    )
    return make_module_proxy(resources_config(upstream, limits))


def assert_quiet(proxy: Proxy) -> None:
    log = proxy.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy died"


def get(conn: TlsConn, target: str) -> bytes:
    conn.send(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return conn.response().body


def warm(proxy: Proxy) -> None:
    with proxy.conn() as conn:
        for i in range(20):
            assert get(conn, f"/warm/{i}") == f"/warm/{i} 0".encode()


def settled(proxy: Proxy, upstream: TcpServer) -> procstats.Sample:
    """A sample once no client connection is open and the pool's idle upstream connections
    are gone too (keepalive_timeout 1 s): the fds the proxy holds when nothing happens."""
    pid = proxy.pid
    clients = procstats.wait_tcp_connections_at_most(pid, 0, 15, local_port=proxy.port)
    pooled = procstats.wait_tcp_connections_at_most(pid, 0, 5, remote_port=upstream.port)
    assert (clients, pooled) == (0, 0), f"{clients} client and {pooled} upstream connections left"
    return procstats.sample(pid)


# --- max_connections ----------------------------------------------------------------------------


@pytest.fixture
def own_proxy(make_proxy: MakeProxy, upstream: CountingUpstream) -> Proxy:
    """A proxy with max_connections = 20. handshake_timeout (2 s) is far above what "closed
    at once" allows, so a close that quick can only be the limit."""
    limits = (
        'max_connections = 20\nhandshake_timeout = "2s"\n'
        'header_read_timeout = "30s"\nidle_timeout = "30s"\n'
    )
    return make_proxy(resources_config(upstream, limits))


def refused_at_once(proxy: Proxy) -> bool:
    """A new TCP connection is closed by the proxy within 1 s, before any TLS."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        waited = wait_tcp_closed(sock, 1.0)
    return waited is not None


def connect_when_free(proxy: Proxy, timeout: float = 3.0) -> TlsConn:
    """A served TLS connection; retried for a while, since the proxy hears of the closes
    that freed its slots a moment after they happen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = proxy.conn()
            try:
                assert get(conn, "/again") == b"/again 0"
            except BaseException:
                conn.close()
                raise
            return conn
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_max_connections_reached_and_recovered_from(
    own_proxy: Proxy, upstream: CountingUpstream
) -> None:
    proxy = own_proxy
    warm(proxy)
    before = settled(proxy, upstream)
    conns: list[TlsConn] = []
    try:
        for i in range(20):
            conns.append(proxy.conn())
            assert get(conns[-1], f"/held/{i}") == f"/held/{i} 0".encode()
        held = procstats.sample(proxy.pid)
        assert refused_at_once(proxy), "the 21st connection was not closed at once"
        with pytest.raises((OSError, ssl.SSLError)):
            proxy.conn().close()  # and a TLS client is refused likewise
        assert get(conns[0], "/still") == b"/still 0"  # those it has are still served

        # Five close: five new ones are served, and the limit holds again after them.
        for conn in conns[:5]:
            conn.close()
        del conns[:5]
        for _ in range(5):
            conns.append(connect_when_free(proxy))
        assert refused_at_once(proxy), "slots were counted twice after the closes"

        # Handshakes in progress hold slots too: 20 silent clients fill the proxy until
        # handshake_timeout cuts them, then it serves again.
        for conn in conns:
            conn.close()
        conns.clear()
        procstats.wait_tcp_connections_at_most(proxy.pid, 0, 5, local_port=proxy.port)
        silent = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(20)]
        try:
            time.sleep(0.3)  # let the proxy accept them all
            assert refused_at_once(proxy), "handshakes in progress did not count"
            conns.append(connect_when_free(proxy, timeout=6))  # after handshake_timeout
        finally:
            for sock in silent:
                sock.close()
    finally:
        for conn in conns:
            conn.close()
    after = settled(proxy, upstream)
    procstats.change("20 connections held (max_connections = 20)", before, held)
    procstats.change("max_connections, after", before, after)
    assert after.fds <= before.fds
    assert after.rss_kib - before.rss_kib < 10 * MiB
    assert_quiet(proxy)


# --- pipelining ---------------------------------------------------------------------------------


def pipeline(proxy: Proxy, count: int) -> None:
    """`count` requests in one write on one TLS connection, then one with Connection: close:
    every response must come back complete (h11 parses them) and in order."""
    requests = (
        b"".join(b"GET /p/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i for i in range(count))
        + b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    with proxy.conn(timeout=30) as conn:
        conn.send(requests)
        waited, data = conn.wait_closed(60)
    assert waited is not None, "the connection was not closed after Connection: close"
    responses = parse_responses(data, [b"GET"] * (count + 1))
    bodies = [r.body for r in responses]
    assert bodies == [b"/p/%d 0" % i for i in range(count)] + [b"/last 0"]
    assert all(r.status == 200 for r in responses)
    assert_quiet(proxy)


def test_1000_pipelined_requests_in_one_write(proxy: Proxy, upstream: CountingUpstream) -> None:
    warm(proxy)
    pipeline(proxy, 1000)  # the warm-up run
    before = settled(proxy, upstream)
    for _ in range(2):
        pipeline(proxy, 1000)
    after = settled(proxy, upstream)
    procstats.change("2 x 1,000 pipelined requests (after a warm-up run)", before, after)
    assert after.fds <= before.fds
    assert after.rss_kib - before.rss_kib < 8 * MiB


@pytest.mark.xfail(
    strict=True,
    reason="pipelined requests are buffered without bound: reading resumes after each response "
    "although the buffer still holds thousands of requests (reported to the lead)",
)
def test_a_pipelining_client_that_never_reads_is_pushed_back(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    """A client that writes pipelined requests as fast as it can and reads no response: the
    proxy must stop reading it (its writes block) long before it holds much of that in
    memory. What the kernel's socket buffers take is a few MiB here; 24 MB is far beyond."""
    bound = 24_000_000
    chunk = b"GET /flood HTTP/1.1\r\nHost: localhost\r\n\r\n" * 1000
    warm(proxy)
    before = settled(proxy, upstream)
    peak = before.rss_kib
    sent = 0
    blocked = False
    conn = proxy.conn()
    try:
        conn.sock.settimeout(1.0)
        deadline = time.monotonic() + 15
        while sent < bound and time.monotonic() < deadline:
            try:
                conn.sock.sendall(chunk)
            except (TimeoutError, ssl.SSLWantWriteError):
                blocked = True
                break
            sent += len(chunk)
            peak = max(peak, procstats.rss_kib(proxy.pid))
    finally:
        conn.close()
    after = settled(proxy, upstream)
    print(
        f"\n[resources] a pipelining client that never reads: {sent / 1e6:.1f} MB taken before "
        f"{'its writes blocked' if blocked else 'the test stopped'}; peak RSS "
        f"{peak / 1024:.1f} MiB"
    )
    procstats.change("pipelining client that never reads", before, after)
    assert_quiet(proxy)
    assert blocked and sent < bound, f"the proxy took {sent} bytes without pushing back"
    assert peak - before.rss_kib < 48 * MiB


# --- header counts ------------------------------------------------------------------------------


def tiny_headers(conn: TlsConn, count: int, target: bytes) -> tuple[int, bytes]:
    conn.send(b"GET %s HTTP/1.1\r\nHost: localhost\r\n" % target + b"a: b\r\n" * count + b"\r\n")
    response = conn.response()
    return response.status, response.body


def test_10000_tiny_headers_within_max_header_bytes(
    proxy: Proxy, upstream: CountingUpstream
) -> None:
    """10,000 `a: b` lines are 60,000 bytes, within max_header_bytes (128 KiB): every one
    reaches the app. 25,000 (150,000 bytes) are over it: 431, and the app sees nothing."""
    for _ in range(2):  # the allocator grows twice for heads this size, then no more
        with proxy.conn() as conn:
            assert tiny_headers(conn, TINY_HEADERS, b"/warm") == (200, b"/warm 10000")
    before = settled(proxy, upstream)
    for i in range(3):
        with proxy.conn() as conn:
            target = b"/tiny/%d" % i
            assert tiny_headers(conn, TINY_HEADERS, target) == (200, target + b" 10000")
    after = settled(proxy, upstream)
    procstats.change("3 x 10,000 tiny headers (after a warm-up)", before, after)
    assert after.fds <= before.fds
    assert after.rss_kib - before.rss_kib < 8 * MiB

    with proxy.conn() as conn:
        status, _ = tiny_headers(conn, 25_000, b"/over")
        assert status == 431
        waited, _ = conn.wait_closed(5)
        assert waited is not None, "the connection stayed open after the 431"
    time.sleep(0.2)
    assert b"/over" not in upstream.targets
    assert_quiet(proxy)


# --- idle TLS connections -----------------------------------------------------------------------


def open_idle(proxy: Proxy, count: int) -> list[tuple[ssl.SSLSocket, float]]:
    """`count` TLS connections, handshake done, nothing sent: (socket, when it was opened)."""
    context = proxy.context()
    conns = []
    try:
        for _ in range(count):
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            try:
                conns.append((context.wrap_socket(raw, server_hostname="localhost"), 0.0))
            except BaseException:
                raw.close()
                raise
            conns[-1] = (conns[-1][0], time.monotonic())
    except BaseException:
        for conn, _ in conns:
            conn.close()
        raise
    return conns


def wait_closed_by_proxy(conns: list[tuple[ssl.SSLSocket, float]], timeout: float) -> list[float]:
    """For each connection, seconds from its opening until the proxy closed it (inf if it did
    not within `timeout`)."""
    lifetimes = [float("inf")] * len(conns)
    by_fd = {}
    for index, (conn, _) in enumerate(conns):
        conn.setblocking(False)
        by_fd[conn.fileno()] = index
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            index = by_fd[fd]
            conn, opened = conns[index]
            try:
                if conn.recv(4096):
                    continue  # TLS 1.3 session tickets come first
            except ssl.SSLWantReadError:
                continue
            except OSError:
                pass
            lifetimes[index] = time.monotonic() - opened
            poller.unregister(fd)
            del by_fd[fd]
    return lifetimes


def idle_round(proxy: Proxy, count: int) -> tuple[procstats.Sample, list[float]]:
    conns = open_idle(proxy, count)
    try:
        time.sleep(0.3)
        held = procstats.sample(proxy.pid)
        # Nothing is asked on them: header_read_timeout (2 s) must close every one.
        lifetimes = wait_closed_by_proxy(conns, timeout=15)
    finally:
        for conn, _ in conns:
            conn.close()
    return held, lifetimes


# The idle test's figures (KiB), for the memory check after it: two rounds of connections are
# the costliest load here, so the check reads them instead of running its own.
IDLE_RSS: dict[str, int] = {}


def test_thousands_of_idle_tls_connections(
    proxy: Proxy, upstream: CountingUpstream, nofile: int
) -> None:
    """Two rounds of 2,000 TLS connections that complete their handshake and then send
    nothing: all are accepted, header_read_timeout (2 s) closes every one, no earlier, and
    the proxy's fds come back to what they were."""
    count = min(IDLE_CONNECTIONS, (nofile - 200) // 2)
    print(f"\n[resources] idle TLS connections: {count} (RLIMIT_NOFILE {nofile})")
    proxy_soft, _ = procstats.nofile_limit(proxy.pid)
    assert proxy_soft == -1 or proxy_soft > count + 100, "the proxy cannot hold them all"
    warm(proxy)
    baseline = settled(proxy, upstream)
    samples = [baseline]
    for round_ in ("first", "second"):
        held, lifetimes = idle_round(proxy, count)
        after = settled(proxy, upstream)
        procstats.change(f"{count} idle TLS connections held ({round_} round)", samples[-1], held)
        procstats.change(
            f"{count} idle TLS connections closed ({round_} round)", samples[-1], after
        )
        per_connection = (held.rss_kib - samples[-1].rss_kib) / count
        closed = sorted(lifetimes)
        print(
            f"[resources] RSS per idle TLS connection: {per_connection:.1f} KiB; closed after "
            f"{closed[0]:.1f} to {closed[-1]:.1f} s (header_read_timeout 2 s)"
        )
        assert held.fds >= samples[-1].fds + count  # every one accepted, none refused
        never = sum(seconds == float("inf") for seconds in closed)
        assert closed[-1] < 12, f"{never} of {count} were never closed"
        assert closed[0] > 1.5, "closed before header_read_timeout"
        assert after.fds <= baseline.fds
        samples.append(after)
    assert_quiet(proxy)
    IDLE_RSS.update(baseline=baseline.rss_kib, first=samples[1].rss_kib, second=samples[2].rss_kib)


@pytest.mark.xfail(
    strict=True,
    reason="under uvloop, each round of idle TLS connections leaves tens of MiB behind; a "
    "bare uvloop TLS server does the same, asyncio's loop does not (reported to the lead)",
)
def test_idle_tls_connections_leave_no_memory_behind_after_a_warm_up() -> None:
    assert IDLE_RSS, "test_thousands_of_idle_tls_connections did not run to its end"
    # The first round pays for what stays allocated; the second, as big, must not add to it.
    grown = IDLE_RSS["second"] - IDLE_RSS["first"]
    assert grown < 16 * MiB, f"the second round of idle connections left {grown} KiB behind"


# --- running out of file descriptors ------------------------------------------------------------


def test_running_out_of_file_descriptors_is_recovered_from(
    make_proxy: MakeProxy, upstream: CountingUpstream
) -> None:
    # handshake_timeout 5 s: the silent connections keep their fds while we look.
    proxy = make_proxy(resources_config(upstream, 'handshake_timeout = "5s"\n'))
    warm(proxy)
    keep = proxy.conn()  # opened before the shortage
    try:
        assert get(keep, "/before") == b"/before 0"
        before = procstats.sample(proxy.pid)
        _, hard = procstats.nofile_limit(proxy.pid)
        limit = 64
        subprocess.run(
            ["prlimit", f"--pid={proxy.pid}", f"--nofile={limit}:{hard if hard > 0 else limit}"],
            check=True,
            timeout=10,
        )
        assert procstats.nofile_limit(proxy.pid)[0] == limit
        mark = len(proxy.log())
        start = time.monotonic()
        flood = []
        try:
            for _ in range(2 * limit):  # twice what fits: accept() hits EMFILE
                flood.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
            proxy.wait_for_log(r"accept failed \(Too many open files\): pausing", start=mark)
            during = procstats.sample(proxy.pid)
            assert during.fds >= limit - 2  # it really ran out
            # An open connection gets an answer: the app's (a pooled upstream connection) or
            # an honest error when no fd is left to reach the app; never a hang.
            keep.send(b"GET /during HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = keep.response()
            assert answer.status in (200, 502, 503, 504), answer
            time.sleep(1.5)  # at least one more pause: the listener retries, it does not spin
            assert proxy.proc is not None and proxy.proc.poll() is None
        finally:
            for sock in flood:
                sock.close()
        conn = connect_when_free(proxy, timeout=10)  # served again once they are closed
        conn.close()
        elapsed = time.monotonic() - start
        pauses = len(re.findall(r"accept failed \(Too many open files\)", proxy.log()[mark:]))
        print(
            f"\n[resources] EMFILE: {pauses} pause lines in {elapsed:.1f} s; a request on an "
            f"open connection meanwhile got {answer.status}"
        )
        assert 1 <= pauses <= elapsed + 2  # one per second at most
    finally:
        keep.close()
    after = settled(proxy, upstream)
    procstats.change(f"EMFILE (RLIMIT_NOFILE {limit}, {2 * limit} connections)", before, during)
    procstats.change("EMFILE, after", before, after)
    assert after.fds <= before.fds
    assert_quiet(proxy)
