"""Every [limits] key enforced by the running proxy, and requests with ambiguous framing
refused before they reach the upstream (a hand-written upstream records every byte it gets)."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import AppProcess, running
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    Proxy,
    RawUpstream,
    TlsConn,
    parse_responses,
    proxy_config,
    wait_tcp_closed,
)

LIMITS = """
handshake_timeout = "1s"
header_read_timeout = "1s"
idle_timeout = "2s"
max_header_bytes = "4KiB"
max_body_bytes = "1KiB"
"""


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    with running(RawUpstream("ok")) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(
    make_module_proxy: MakeProxy,
    example_app: AppProcess,
    sink_app: AppProcess,
    raw_upstream: RawUpstream,
) -> Proxy:
    return make_module_proxy(
        proxy_config(
            [(["app.test"], "app"), (["sink.test"], "sink"), (["raw.test"], "raw")],
            {"app": example_app.server, "sink": sink_app.server, "raw": raw_upstream.server},
            default_site="app.test",
            limits=LIMITS,
        )
    )


def sink_count(proxy: Proxy) -> int:
    with proxy.conn("sink.test") as conn:
        conn.send(b"GET /count HTTP/1.1\r\nHost: sink.test\r\n\r\n")
        return json.loads(conn.response().body)["requests"]


# --- timeouts -----------------------------------------------------------------------------------


def test_slowloris_is_cut_off_by_header_read_timeout(proxy: Proxy) -> None:
    head = b"GET / HTTP/1.1\r\nHost: app.test\r\n" + b"X-Slow: " + b"a" * 100
    with proxy.conn("app.test") as conn:
        start = time.monotonic()
        received = b""
        closed_after = None
        for byte in head:
            try:
                conn.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - start
                break
            readable, _, _ = select.select([conn.sock], [], [], 0.3)
            if readable:
                waited, received = conn.wait_closed(2.0)
                assert waited is not None, "the proxy answered but kept the connection open"
                closed_after = time.monotonic() - start
                break
            if time.monotonic() - start > 6:
                break
    assert closed_after is not None, "a header byte every 0.3 s kept the connection open"
    assert 0.7 <= closed_after <= 3.0, closed_after
    if received:  # a 408 is optional, but if the proxy answers it must be a valid 408
        assert parse_responses(received, [b"GET"])[0].status == 408


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(proxy: Proxy) -> None:
    with proxy.conn("app.test") as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert conn.response().body == b"ok"
        waited, data = conn.wait_closed(6.0)
    assert waited is not None, "an idle keep-alive connection stayed open"
    # idle_timeout is 2 s (header_read_timeout, 1 s, must not be what closes an idle connection).
    assert 1.6 <= waited <= 3.5, waited
    assert data == b""


def test_keep_alive_connection_in_use_is_not_closed(proxy: Proxy) -> None:
    """Requests 0.5 s apart for 3 s: neither idle_timeout (2 s) nor header_read_timeout (1 s)
    counts the time spent serving earlier requests."""
    with proxy.conn("app.test") as conn:
        for _ in range(6):
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
            assert conn.response().body == b"ok"
            time.sleep(0.5)


def test_tcp_client_that_never_handshakes_is_closed_after_handshake_timeout(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        waited = wait_tcp_closed(sock, 5.0)
    assert waited is not None, "a silent TCP client was kept forever"
    assert 0.7 <= waited <= 3.0, waited


# --- sizes --------------------------------------------------------------------------------------


def test_header_section_over_max_header_bytes_gets_431(proxy: Proxy) -> None:
    with proxy.conn("app.test") as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        assert conn.response().status == 200  # under the limit: fine
    with proxy.conn("app.test") as conn:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        assert conn.response().status == 431


def test_body_over_max_body_bytes_gets_413_and_never_reaches_the_app(proxy: Proxy) -> None:
    with proxy.conn("sink.test") as conn:
        conn.send(
            b"POST /sink HTTP/1.1\r\nHost: sink.test\r\nContent-Length: 512\r\n\r\n" + b"a" * 512
        )
        assert json.loads(conn.response().body)["bytes"] == 512
    before = sink_count(proxy)
    with proxy.conn("sink.test") as conn:
        conn.send(
            b"POST /sink HTTP/1.1\r\nHost: sink.test\r\nContent-Length: 2048\r\n\r\n" + b"a" * 2048
        )
        assert conn.response().status == 413
    # The count request itself is the only one the app saw in between.
    assert sink_count(proxy) == before + 1


def test_chunked_body_over_max_body_bytes_gets_413(proxy: Proxy) -> None:
    body = b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    with proxy.conn("sink.test") as conn:
        conn.send(
            b"POST /sink HTTP/1.1\r\nHost: sink.test\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        )
        response = conn.response()
        assert response.status == 413
        waited, _ = conn.wait_closed(3.0)
        assert waited is not None  # the rest of the body was not read: the connection is done


# --- ambiguous framing --------------------------------------------------------------------------

AMBIGUOUS = {
    "content-length-and-chunked": (
        b"POST /smuggle HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: raw.test\r\n\r\n"
    ),
    "two-content-lengths": (
        b"POST /smuggle HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 5\r\n"
        b"Content-Length: 40\r\n\r\nhello"
    ),
    "obs-fold": b"GET /smuggle HTTP/1.1\r\nHost: raw.test\r\nX-A: b\r\n c\r\n\r\n",
    "space-before-colon": b"GET /smuggle HTTP/1.1\r\nHost: raw.test\r\nX-A : b\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(AMBIGUOUS.values()), ids=list(AMBIGUOUS))
def test_ambiguous_request_gets_400_close_and_never_reaches_the_upstream(
    proxy: Proxy, raw_upstream: RawUpstream, raw: bytes
) -> None:
    # Sanity first: an ordinary request does reach this upstream.
    with proxy.conn("raw.test") as conn:
        conn.send(b"GET /sanity HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        assert conn.response().body == b"ok"
    assert b"GET /sanity HTTP/1.1" in raw_upstream.data
    mark = len(raw_upstream.data)
    with proxy.conn("raw.test") as conn:
        conn.send(raw)
        assert conn.response().status == 400
        waited, _ = conn.wait_closed(3.0)
        assert waited is not None, "the connection stayed open after a framing error"
    time.sleep(0.3)
    assert b"smuggle" not in raw_upstream.data[mark:]


def test_bad_chunk_size_gets_400_and_the_body_never_reaches_the_upstream(
    proxy: Proxy, raw_upstream: RawUpstream
) -> None:
    mark = len(raw_upstream.data)
    with proxy.conn("raw.test") as conn:
        conn.send(
            b"POST /badchunk HTTP/1.1\r\nHost: raw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n"
        )
        assert conn.response().status == 400
        waited, _ = conn.wait_closed(3.0)
        assert waited is not None
    time.sleep(0.3)
    assert b"hello" not in raw_upstream.data[mark:]


# --- max_connections ----------------------------------------------------------------------------


def test_connections_beyond_max_connections_are_closed_at_once(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(
        proxy_config(
            [(["app.test"], "app")], {"app": example_app.server}, limits="max_connections = 5"
        )
    )
    conns: list[TlsConn] = []
    try:
        for _ in range(5):
            conn = proxy.conn("app.test")
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
            assert conn.response().body == b"ok"
            conns.append(conn)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sixth:
            waited = wait_tcp_closed(sixth, 3.0)
        assert waited is not None and waited < 0.5, waited
        # The process stays responsive on the connections it has.
        conns[0].send(b"GET /pid HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert conns[0].response().body.isdigit()
        # A freed slot is usable again.
        conns.pop().close()
        deadline = time.monotonic() + 3
        while True:
            try:
                with proxy.conn("app.test") as conn:
                    conn.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
                    assert conn.response().body == b"ok"
                break
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        for conn in conns:
            conn.close()
