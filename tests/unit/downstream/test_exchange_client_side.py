"""The exchange talks to its client only through ClientSide (client_side.py): a recording
client side, with no HTTP/1.1 framing of its own, sees each response as calls: what a second
client protocol (an HTTP/2 stream) would have to implement. The upstream is a real
UpstreamConnection and response parser over an in-memory transport; no sockets."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.downstream.exchange import Exchange
from proxy.downstream.request_head import RequestHead
from proxy.logs import AccessLog
from proxy.state import ProxyState
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.response_parser import CHUNKED, LENGTH, NO_BODY

CONFIG = """
[server]
https = ["127.0.0.1:8443"]
http = []
data_dir = "data"
[[site]]
hosts = ["app.test"]
tls = "internal"
upstream = "app"
[[site]]
hosts = ["strict.test"]
tls = "internal"
upstream = "app"
hsts = "max-age=60"
[upstream.app]
servers = ["127.0.0.1:9"]
"""


class Wire:
    """An in-memory transport: what the upstream connection writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 65536)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class RecordingClient:
    """A ClientSide that writes nothing: it records what the exchange asks of it."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.sni: str | None = "app.test"
        self.client_ip = "192.0.2.7"
        self.client_auth = None
        self.client_cert = None
        self.draining = False
        self.write_paused = False
        self.calls: list[tuple[Any, ...]] = []

    def send_continue(self) -> int:
        self.calls.append(("continue",))
        return 25

    def send_head(self, exchange, status, phrase, headers, parser) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("head", status, parser.body, exchange.hsts))

    def send_body(self, data: bytes) -> int:
        self.calls.append(("body", data))
        return len(data)

    def send_end(self) -> int:
        self.calls.append(("end",))
        return 0

    def flush_head(self) -> int:
        return 0

    def send_error(self, status: int, *, head: bool, retry_after: int | None, hsts: Any) -> int:
        self.calls.append(("error", status, hsts))
        return 100

    def send_switch(self, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        self.calls.append(("switch",))
        return 0

    def pause_reading(self) -> None:
        self.calls.append(("pause",))

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        self.calls.append(("abort",))

    def exchange_done(self, exchange: Exchange, complete: bool, *, abort: bool = False) -> None:
        self.calls.append(("done", complete, abort))

    def start_tunnel(self, exchange: Exchange) -> bytes:
        return b""

    def tunnel_io(self) -> None:
        pass

    def internal_error(self) -> None:
        raise AssertionError("internal error")

    def log_access(self, exchange: Exchange) -> None:
        pass

    def log_upstream_failure(self, exchange: Exchange, error: object) -> None:
        self.calls.append(("upstream failure", str(error)))


def setup(host: bytes = b"app.test") -> tuple[RecordingClient, UpstreamConnection, Wire, Exchange]:
    config = parse_config(tomllib.loads(CONFIG), Path("/nonexistent"))
    state = ProxyState.build(config, AccessLog("off"))
    pool = state.pools["app"]
    slot = pool.slots[0]
    up = UpstreamConnection(pool, slot)
    wire = Wire()
    up.connection_made(wire)  # type: ignore[arg-type]
    slot.idle.append(up)  # a pooled connection: the exchange takes it at once
    client = RecordingClient(state)
    client.sni = host.decode()
    request = RequestHead(b"GET", b"/x", b"1.1", [(b"host", host)])
    exchange = Exchange(client, request, 0.0)  # type: ignore[arg-type]
    exchange.start(request)
    exchange.on_request_end()
    exchange.flush()
    return client, up, wire, exchange


async def test_a_length_response_is_a_head_its_body_and_an_end() -> None:
    client, up, wire, exchange = setup()
    assert wire.written[0].startswith(b"GET /x HTTP/1.1\r\nhost: app.test\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert client.calls == [
        ("head", 200, LENGTH, None),
        ("body", b"hello"),
        ("end",),
        ("done", True, False),
    ]
    assert exchange.bytes_out == 5  # as the client side counted it


async def test_a_chunked_response_reaches_the_client_side_unframed() -> None:
    # The chunk framing is the HTTP/1.1 client side's business, not the exchange's.
    client, up, _, _ = setup()
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert client.calls == [
        ("head", 200, CHUNKED, None),
        ("body", b"abc"),
        ("end",),
        ("done", True, False),
    ]


async def test_a_response_cut_short_is_an_abort() -> None:
    client, up, _, _ = setup()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
    up.connection_lost(None)
    assert client.calls[:2] == [("head", 200, LENGTH, None), ("body", b"hal")]
    assert client.calls[-1] == ("done", False, True)
    assert ("end",) not in client.calls


async def test_an_upstream_that_answers_nothing_is_a_502_with_the_sites_policy() -> None:
    client, up, _, _ = setup(b"strict.test")
    up.data_received(b"not http\r\n\r\n")
    assert ("error", 502, b"strict-transport-security: max-age=60\r\n") in client.calls
    assert client.calls[-1] == ("done", False, False)


@pytest.mark.parametrize("host", [b"app.test", b"strict.test"])
async def test_the_head_carries_the_sites_hsts_for_the_client_side(host: bytes) -> None:
    client, up, _, _ = setup(host)
    up.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert client.calls[0][:3] == ("head", 204, NO_BODY), client.calls
    hsts = client.calls[0][3]
    assert (hsts is not None) == (host == b"strict.test")
