"""HTTP/2 to clients through `tlsproxy run`, with real clients: curl --http2, nghttp
(nghttp2-client) and httpx with http2=True, in front of real uvicorn apps (and, where an app
must misbehave on purpose, a hand-written HTTP/1.1 upstream).

Every response an HTTP/2 test looks at is checked to have come over HTTP/2 (curl's
%{http_version}, httpx's http_version; nghttp speaks nothing else), so that none of these tests
passes on a proxy that answers in HTTP/1.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame
from websockets.asyncio.client import connect as ws_connect

from tests.integration.harness import AppProcess, basic_config, free_port, running
from tests.integration.hostile.h2_client import RawH2, request_headers
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, TcpServer, proxy_config

STATUSES_APP = "tests.integration.proxy.apps.statuses:app"
MIB = 1024 * 1024

# --- upstreams ----------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the hand-written upstream received it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


TRAILER_BODY = b"".join(b"part %d;" % i for i in range(2000))


class H11Upstream(TcpServer):
    """An HTTP/1.1 upstream parsed with h11, for what uvicorn will not do on demand.

    /die        reads the request and closes the connection without a word (the proxy: 502)
    /trailers   answers chunked with a trailer field after the last chunk
    anything    200 "ok <target>", and the request is recorded in `seen`
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        h = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = self.recv(conn, buf)
                if not data:
                    return
                h.receive_data(data)
            elif isinstance(event, h11.Request):
                request, body = event, bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                self.seen.append(
                    Seen(
                        request.method,
                        request.target,
                        list(request.headers),
                        bytes(body),
                        list(event.headers),
                    )
                )
                if request.target.startswith(b"/die"):
                    return
                conn.sendall(self._answer(h, request.target))
                if h.our_state is not h11.DONE:
                    return
                h.start_next_cycle()
            else:  # ConnectionClosed, PAUSED
                return

    @staticmethod
    def _answer(h: h11.Connection, target: bytes) -> bytes:
        if target.startswith(b"/trailers"):
            head = h11.Response(
                status_code=200,
                headers=[("transfer-encoding", "chunked"), ("trailer", "x-checksum")],
            )
            checksum = hashlib.sha256(TRAILER_BODY).hexdigest()
            return (
                h.send(head)
                + h.send(h11.Data(data=TRAILER_BODY[:5000]))
                + h.send(h11.Data(data=TRAILER_BODY[5000:]))
                + h.send(h11.EndOfMessage(headers=[("x-checksum", checksum)]))
            )
        body = b"ok " + target
        head = h11.Response(status_code=200, headers=[("content-length", str(len(body)))])
        return h.send(head) + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())


@pytest.fixture(scope="module")
def h11_upstream() -> Iterator[H11Upstream]:
    with running(H11Upstream()) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def statuses_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    """apps/statuses.py on uvicorn: /page (GET, HEAD), /status/204, /status/304."""
    with running(AppProcess(tmp_path_factory.mktemp("statuses-app"), STATUSES_APP)) as app:
        yield app


# --- proxies ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(
    make_module_proxy: MakeProxy,
    example_app: AppProcess,
    sink_app: AppProcess,
    statuses_app: AppProcess,
    h11_upstream: H11Upstream,
) -> Proxy:
    """http2 at its default (on): example app on localhost and app.test, second.test (another
    site, same app), sink.test, codes.test (statuses app), raw.test (the h11 upstream)."""
    config = proxy_config(
        [
            (["localhost", "app.test"], "app"),
            (["second.test"], "app"),
            (["sink.test"], "sink"),
            (["codes.test"], "codes"),
            (["raw.test"], "raw"),
        ],
        {
            "app": example_app.server,
            "sink": sink_app.server,
            "codes": statuses_app.server,
            "raw": h11_upstream.server,
        },
        default_site="localhost",
        limits='max_body_bytes = "200MiB"',
    )
    return make_module_proxy(config)


STRICT_LIMITS = """
upstream_read_timeout = "1s"
max_body_bytes = "16KiB"
max_header_bytes = "4KiB"
"""


@pytest.fixture(scope="module")
def strict(
    make_module_proxy: MakeProxy,
    example_app: AppProcess,
    sink_app: AppProcess,
    h11_upstream: H11Upstream,
) -> Proxy:
    """Small limits for the error statuses, and the access log in JSON."""
    config = proxy_config(
        [
            (["localhost"], "app"),
            (["sink.test"], "sink"),
            (["raw.test"], "raw"),
            (["down.test"], "down"),
        ],
        {
            "app": example_app.server,
            "sink": sink_app.server,
            "raw": h11_upstream.server,
            "down": f"127.0.0.1:{free_port()}",  # nothing listens there
        },
        default_site="localhost",
        limits=STRICT_LIMITS,
        server='access_log = "json"',
    )
    return make_module_proxy(config)


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Curl:
    status: int
    version: str  # "2", "1.1", "1"
    body: bytes
    stderr: str


def curl(
    proxy: Proxy, path: str, *args: str, host: str = "localhost", http: str = "--http2"
) -> Curl:
    """curl to https://HOST:PORT/PATH, HOST resolved to 127.0.0.1 (so SNI and :authority are
    HOST), trusting the proxy's local CA."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            http,
            "--cacert",
            str(proxy.ca),
            "--resolve",
            f"{host}:{proxy.port}:127.0.0.1",
            "--max-time",
            "60",
            "-w",
            "\n%{http_code} %{http_version}",
            *args,
            f"https://{host}:{proxy.port}{path}",
        ],
        capture_output=True,
        timeout=90,
    )
    body, _, trailer = result.stdout.rpartition(b"\n")
    status, _, version = trailer.decode().partition(" ")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return Curl(int(status), version, body, result.stderr.decode(errors="replace"))


def curl_together(
    proxy: Proxy, transfers: dict[str, list[str]], host: str = "localhost", stdin: bytes = b""
) -> dict[str, tuple[int, str, int]]:
    """One curl run of several transfers at once (-Z): over h2 curl waits for its first
    connection and multiplexes the others on it. `transfers` maps a tag to a transfer's path
    (first) and options; the result maps it to (status, HTTP version, connections it opened)."""
    common = ["--http2", "--cacert", str(proxy.ca), "--resolve", f"{host}:{proxy.port}:127.0.0.1"]
    common += ["-o", os.devnull, "-w", "%{http_code} %{http_version} %{num_connects} %{url}\\n"]
    command = ["curl", "-sS", "-Z", "--max-time", "30"]
    for tag, (path, *options) in transfers.items():
        sep = "&" if "?" in path else "?"
        command += [*common, *options, f"https://{host}:{proxy.port}{path}{sep}t={tag}", "--next"]
    result = subprocess.run(command[:-1], input=stdin, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = {}
    for line in result.stdout.decode().splitlines():
        status, version, connects, url = line.split()
        out[url.rpartition("t=")[2]] = (int(status), version, int(connects))
    return out


def nghttp(
    proxy: Proxy, paths: str | list[str], *args: str, host: str = "localhost"
) -> subprocess.CompletedProcess[bytes]:
    """nghttp (HTTP/2 only) to PATHS on one connection. nghttp cannot resolve a name to another
    address: a HOST other than localhost is reached at 127.0.0.1 with HOST as :authority, which
    nghttp also sends as SNI."""
    where = "localhost" if host == "localhost" else "127.0.0.1"
    authority = () if host == "localhost" else (f"--header=:authority: {host}",)
    urls = [
        f"https://{where}:{proxy.port}{p}" for p in ([paths] if isinstance(paths, str) else paths)
    ]
    return subprocess.run(
        ["nghttp", "--timeout=60", *authority, *args, *urls],
        capture_output=True,
        timeout=90,
    )


def verbose_statuses(output: bytes) -> list[int]:
    """The :status of every HEADERS frame nghttp -v printed (interim ones included)."""
    return [int(s) for s in re.findall(rb":status: (\d{3})", output)]


def at(host: str, proxy: Proxy, path: str, headers: Any = None, **kwargs: Any) -> dict[str, Any]:
    """httpx request arguments for HOST without DNS: to 127.0.0.1, with HOST as SNI and as
    :authority (httpx makes the Host field the :authority)."""
    fields = httpx.Headers(headers)
    fields.setdefault("host", host)  # a Host given in `headers` is the :authority instead
    return {
        "url": f"https://127.0.0.1:{proxy.port}{path}",
        "headers": fields,
        "extensions": {"sni_hostname": host},
        **kwargs,
    }


def h2_async(proxy: Proxy) -> httpx.AsyncClient:
    return httpx.AsyncClient(http2=True, verify=proxy.context(), timeout=30)


def h2(response: httpx.Response) -> httpx.Response:
    assert response.http_version == "HTTP/2", response.http_version
    return response


def handshakes(proxy: Proxy, mark: int) -> list[str]:
    """The debug handshake lines logged since `mark` (an offset in the proxy's log)."""
    return re.findall(r"handshake 127\.0\.0\.1:\d+ sni=.*", proxy.log()[mark:])


def seen_headers(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the example app received, as name -> every value in order."""
    assert response.status_code == 200, response
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name, []).append(value)
    return seen


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def distinct_blocks(total: int, block: int = 256 * 1024) -> Iterator[bytes]:
    """`total` bytes in blocks that all differ: a dropped, doubled or reordered block shows."""
    seed = os.urandom(block)
    for n in range(0, total, block):
        yield (n.to_bytes(8, "big") + seed[8:])[: total - n]


def raw_h2(proxy: Proxy) -> RawH2:
    """The hostile tests' frame-by-frame client, for what client libraries hide: the GOAWAY
    itself, RST_STREAM codes, a request sent after the server's GOAWAY went out. (h2's own
    client state machine takes no frame after a GOAWAY, so it cannot even read the responses
    a graceful GOAWAY promises.)"""
    return RawH2(proxy.port, proxy.ca)


def on_stream(raw: RawH2, kind: type, stream_id: int) -> list[Any]:
    return [f for f in raw.frames if isinstance(f, kind) and f.stream_id == stream_id]


def ended(raw: RawH2, stream_id: int) -> bool:
    frames = on_stream(raw, HeadersFrame, stream_id) + on_stream(raw, DataFrame, stream_id)
    return any("END_STREAM" in f.flags for f in frames)


def statuses(raw: RawH2, stream_id: int) -> list[int]:
    """The :status of each header block the server sent on the stream."""
    blocks = [raw.blocks[i] for i, f in enumerate(raw.frames) if i in raw.blocks]
    ids = [f.stream_id for i, f in enumerate(raw.frames) if i in raw.blocks]
    return [int(dict(b)[b":status"]) for b, s in zip(blocks, ids, strict=True) if s == stream_id]


def body_of(raw: RawH2, stream_id: int) -> bytes:
    return b"".join(f.data for f in on_stream(raw, DataFrame, stream_id))


def post_head(raw: RawH2, path: str, length: int) -> int:
    """A POST's HEADERS with a content-length and no END_STREAM: its DATA is the test's."""
    stream = raw.new_stream()
    extra = [(b"content-length", str(length).encode())]
    raw.send(
        raw.headers_frame(
            stream, request_headers(path, method="POST", extra=extra), end_stream=False
        )
    )
    return stream


# --- negotiation --------------------------------------------------------------------------------


ALPN_ARGS = ("-servername", "localhost", "-alpn", "h2,http/1.1")


def alpn_of(proxy: Proxy) -> str:
    """What `openssl s_client -alpn h2,http/1.1` was given (bytes: over h2 the server's SETTINGS
    frame follows the handshake on its output)."""
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", *ALPN_ARGS],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=15,
    )
    match = re.search(rb"ALPN protocol: (\S+)", result.stdout)
    return match[1].decode() if match else "none"


def test_alpn_picks_h2_for_curl_nghttp_and_httpx(proxy: Proxy) -> None:
    mark = len(proxy.log())
    by_curl = curl(proxy, "/healthz")
    assert (by_curl.status, by_curl.version, by_curl.body) == (200, "2", b"ok")
    by_nghttp = nghttp(proxy, "/healthz")
    assert by_nghttp.returncode == 0, by_nghttp.stderr
    assert by_nghttp.stdout == b"ok"
    with proxy.client(http2=True) as client:
        assert h2(client.get(proxy.url("/healthz"))).text == "ok"
    assert alpn_of(proxy) == "h2"
    # The debug handshake line names the protocol chosen.
    lines = handshakes(proxy, mark)
    assert len(lines) >= 4 and all("alpn=h2" in line for line in lines), lines


def test_http2_false_gives_http11_to_the_same_clients(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server, extra_server="http2 = false"))
    by_curl = curl(proxy, "/healthz")
    assert (by_curl.status, by_curl.version, by_curl.body) == (200, "1.1", b"ok")
    # nghttp speaks only h2: it gives up once the handshake chose something else.
    by_nghttp = nghttp(proxy, "/healthz")
    assert b"HTTP/2 protocol was not selected" in by_nghttp.stderr, by_nghttp
    assert by_nghttp.stdout == b""
    with proxy.client(http2=True) as client:
        response = client.get(proxy.url("/healthz"))
        assert (response.http_version, response.text) == ("HTTP/1.1", "ok")
    assert alpn_of(proxy) == "http/1.1"
    assert "alpn=h2" not in proxy.log()


def test_sighup_flipping_http2_applies_to_new_connections(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    off = basic_config(example_app.server, extra_server="http2 = false")
    on = basic_config(example_app.server, extra_server="http2 = true")
    proxy = make_proxy(off)

    def reload(text: str) -> None:
        proxy.config_file.write_text(text)
        mark = len(proxy.log())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"reloaded", start=mark)

    with proxy.client(http2=True) as before, proxy.client(http2=True) as after:
        assert before.get(proxy.url("/healthz")).http_version == "HTTP/1.1"
        reload(on)
        assert curl(proxy, "/healthz").version == "2"
        assert alpn_of(proxy) == "h2"
        assert h2(after.get(proxy.url("/healthz"))).text == "ok"
        # The connection opened before the reload keeps the protocol it chose.
        assert before.get(proxy.url("/healthz")).http_version == "HTTP/1.1"
        reload(off)
        assert curl(proxy, "/healthz").version == "1.1"
        assert alpn_of(proxy) == "http/1.1"
        assert h2(after.get(proxy.url("/pid"))).text.isdigit()


# --- bodies -------------------------------------------------------------------------------------


def test_get_and_post_with_a_body(proxy: Proxy, tmp_path: Path) -> None:
    body = os.urandom(300_000)
    upload = tmp_path / "body"
    upload.write_bytes(body)
    with proxy.client(http2=True) as client:
        index = h2(client.get(proxy.url("/")))
        assert index.json()["message"] == "Hello from behind tlsproxy"
        echoed = h2(client.post(proxy.url("/echo"), content=body))
        assert (echoed.status_code, echoed.content) == (200, body)
    by_curl = curl(proxy, "/echo", "--data-binary", f"@{upload}")
    assert (by_curl.status, by_curl.version) == (200, "2")
    assert by_curl.body == body
    by_nghttp = nghttp(proxy, "/echo", f"--data={upload}")
    assert by_nghttp.returncode == 0, by_nghttp.stderr
    assert by_nghttp.stdout == body


def test_large_upload_is_streamed_to_the_app(proxy: Proxy, tmp_path: Path) -> None:
    total = 8 * MIB
    blocks = list(distinct_blocks(total))
    expected = {"bytes": total, "sha256": sha256(b"".join(blocks))}
    upload = tmp_path / "upload"
    upload.write_bytes(b"".join(blocks))
    # curl sends a content-length; the app gets every byte in order.
    by_curl = curl(proxy, "/sink", "--data-binary", f"@{upload}", host="sink.test")
    assert (by_curl.status, by_curl.version) == (200, "2")
    assert json.loads(by_curl.body) == expected
    # httpx streams from a generator, in DATA frames as the window opens.
    with proxy.client(http2=True) as client:
        response = h2(client.post(**at("sink.test", proxy, "/sink", content=iter(blocks))))
    assert response.json() == expected


def test_large_download(proxy: Proxy, tmp_path: Path) -> None:
    total = 16 * MIB
    out = tmp_path / "download"
    by_curl = curl(proxy, f"/bytes/{total}?chunk=1048576", "-o", str(out))
    assert (by_curl.status, by_curl.version) == (200, "2")
    data = out.read_bytes()
    assert len(data) == total and data == b"x" * total
    count = 0
    with (
        proxy.client(http2=True) as client,
        client.stream("GET", proxy.url(f"/bytes/{total}?chunked=1")) as response,
    ):
        h2(response)
        for chunk in response.iter_raw(MIB):
            assert chunk.count(b"x") == len(chunk)
            count += len(chunk)
    assert count == total
    # Random bytes both ways through /echo: content, not only length.
    blob = os.urandom(4 * MIB)
    (tmp_path / "blob").write_bytes(blob)
    by_nghttp = nghttp(proxy, "/echo", f"--data={tmp_path / 'blob'}")
    assert by_nghttp.returncode == 0, by_nghttp.stderr
    assert sha256(by_nghttp.stdout) == sha256(blob)


def test_a_slow_reader_with_a_large_window_holds_the_app_back_not_the_proxys_memory(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    """curl opens a 32 MiB window per stream; reading at 16 MB/s it takes bytes more slowly than
    the app makes them. The window lets the proxy send, yet the TLS write buffer over its
    high-water mark must pause the app's connection, as over HTTP/1.1 (+1.5 MiB there)."""
    proxy = make_proxy(basic_config(example_app.server))
    assert curl(proxy, "/healthz").version == "2"  # certificates, pools, imports: warm
    time.sleep(0.2)
    before = proxy.vm_hwm_kib()
    total = 16 * MIB
    slow = curl(proxy, f"/bytes/{total}?chunk=1048576", "--limit-rate", "16M", "-o", os.devnull)
    assert (slow.status, slow.version) == (200, "2")
    grown = proxy.vm_hwm_kib() - before
    assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB for a {total // MIB} MiB download"


def test_body_without_content_length_reaches_the_app_complete(
    proxy: Proxy, h11_upstream: H11Upstream, tmp_path: Path
) -> None:
    body = b"".join(distinct_blocks(3 * MIB))
    upload = tmp_path / "upload"
    upload.write_bytes(body)
    by_nghttp = nghttp(proxy, "/sink", f"--data={upload}", "--no-content-length", host="sink.test")
    assert by_nghttp.returncode == 0, by_nghttp.stderr
    assert json.loads(by_nghttp.stdout) == {"bytes": len(body), "sha256": sha256(body)}
    # Upstream it went chunked (HTTP/1.1 has no other way to frame a body of unknown length).
    token = uuid.uuid4().hex
    with proxy.client(http2=True) as client:
        chunks = (body[i : i + 100_000] for i in range(0, 1_000_000, 100_000))
        response = h2(client.post(**at("raw.test", proxy, f"/record?t={token}", content=chunks)))
    assert response.status_code == 200
    (seen,) = [s for s in h11_upstream.seen if token.encode() in s.target]
    assert seen.header(b"transfer-encoding") == [b"chunked"]
    assert seen.header(b"content-length") == []
    assert seen.body == body[:1_000_000]


# --- many streams -------------------------------------------------------------------------------


async def test_browser_like_page_load_over_one_connection(proxy: Proxy) -> None:
    async with h2_async(proxy) as client:
        h2(await client.get(proxy.url("/healthz")))  # the page itself; the connection is up
        mark = len(proxy.log())
        sizes = [97 * i for i in range(60)]
        start = time.monotonic()
        assets = await asyncio.gather(
            *(client.get(proxy.url(f"/bytes/{n}?chunk=1000")) for n in sizes),
            *(client.post(proxy.url("/echo"), content=b"e%d" % i) for i in range(20)),
            *(client.get(proxy.url("/slow/0.5")) for _ in range(10)),
        )
        elapsed = time.monotonic() - start
    assert all(r.http_version == "HTTP/2" and r.status_code == 200 for r in assets)
    assert [r.content for r in assets[:60]] == [b"x" * n for n in sizes]
    assert [r.content for r in assets[60:80]] == [b"e%d" % i for i in range(20)]
    # Ten half-second answers side by side, not one after another.
    assert elapsed < 3.5, elapsed
    assert handshakes(proxy, mark) == []  # all 90 on the connection of the page


def test_no_reset_after_a_request_whose_body_arrived_whole(proxy: Proxy) -> None:
    """httpx (httpcore) sends a body's last DATA frame and its END_STREAM apart. A response that
    is complete before the END_STREAM arrives is not "before the whole request was read" when
    every byte of the Content-Length came: a RST_STREAM then (even NO_ERROR) makes h2 raise
    StreamClosedError in httpx when it sends its END_STREAM, and the request fails."""
    with raw_h2(proxy) as raw:
        stream = post_head(raw, "/echo", 2)
        raw.send(DataFrame(stream, b"ab"))
        raw.poll_until(lambda: ended(raw, stream), timeout=10)
        assert (statuses(raw, stream), body_of(raw, stream)) == ([200], b"ab")
        raw.poll_until(lambda: bool(on_stream(raw, RstStreamFrame, stream)), timeout=0.5)
        raw.send(DataFrame(stream, b"", flags=["END_STREAM"]))  # what httpx does next
        raw.poll_until(lambda: False, timeout=0.3)
        assert [f.error_code for f in on_stream(raw, RstStreamFrame, stream)] == []
        assert raw.goaway is None


def test_nghttp_many_uris_on_one_connection(proxy: Proxy) -> None:
    mark = len(proxy.log())
    paths = [f"/bytes/{100 + i}" for i in range(50)]
    result = nghttp(proxy, paths, "--stat", "--null-out")
    assert result.returncode == 0, result.stderr
    # --stat: one row per request ending in "STATUS SIZE PATH".
    rows = re.findall(rb"\s(\d{3})\s+(\d+)\s+(/bytes/\d+)\s*$", result.stdout, re.M)
    assert sorted((int(s), int(z), p.decode()) for s, z, p in rows) == sorted(
        (200, 100 + i, f"/bytes/{100 + i}") for i in range(50)
    ), result.stdout
    assert len(handshakes(proxy, mark)) == 1


# --- headers and routing ------------------------------------------------------------------------

SPOOFED = {
    "x-forwarded-for": "6.6.6.6",
    "x-forwarded-proto": "http",
    "x-forwarded-host": "evil.test",
    "forwarded": "for=6.6.6.6;proto=http",
    "x-kept": "yes",
}


def test_forwarding_headers_reach_the_app_as_over_http11(proxy: Proxy) -> None:
    def forwarding(http2: bool) -> tuple[dict[str, Any], dict[str, list[str]]]:
        with proxy.client(http2=http2) as client:
            response = client.get(**at("app.test", proxy, "/", SPOOFED))
        assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        return response.json(), seen_headers(response)

    (over_h2, h2_headers), (over_h1, _) = forwarding(True), forwarding(False)
    assert over_h2["forwarding"] == over_h1["forwarding"]
    assert over_h2["scheme"] == "https"
    assert h2_headers["host"] == ["app.test"]
    assert h2_headers["x-forwarded-for"] == ["127.0.0.1"]
    assert h2_headers["x-forwarded-proto"] == ["https"]
    assert h2_headers["x-forwarded-host"] == ["app.test"]
    (forwarded,) = h2_headers["forwarded"]
    assert forwarded.replace('"', "") == "for=127.0.0.1;proto=https;host=app.test"
    assert h2_headers["x-kept"] == ["yes"]
    # No pseudo-header leaks to the app as a field.
    assert not [name for name in h2_headers if name.startswith(":")]


def test_authority_is_the_host_and_another_sites_gets_421(proxy: Proxy) -> None:
    with proxy.client(http2=True) as client:
        own = h2(client.get(**at("app.test", proxy, "/")))
        assert seen_headers(own)["host"] == ["app.test"]
        # Same connection (SNI app.test), :authority of another site: misdirected.
        other = h2(client.get(**at("app.test", proxy, "/", {"host": "second.test"})))
        assert other.status_code == 421
        again = h2(client.get(**at("app.test", proxy, "/healthz")))
        assert (again.status_code, again.text) == (200, "ok")
    with proxy.client(http2=True) as client:
        assert h2(client.get(**at("second.test", proxy, "/healthz"))).status_code == 200
    # curl sends a Host field of its own as the :authority.
    by_curl = curl(proxy, "/healthz", "-H", "Host: second.test")
    assert (by_curl.status, by_curl.version) == (421, "2")
    # nghttp sends its :authority as SNI too, so it gets the other site's certificate.
    by_nghttp = nghttp(proxy, "/healthz", "-v", host="second.test")
    assert verbose_statuses(by_nghttp.stdout) == [200], by_nghttp.stdout[-3000:]


def test_split_cookie_fields_arrive_joined(proxy: Proxy) -> None:
    with proxy.client(http2=True) as client:
        headers = [("cookie", "a=1"), ("cookie", "b=2")]
        response = h2(client.get(**at("app.test", proxy, "/", headers)))
    assert seen_headers(response)["cookie"] == ["a=1; b=2"]
    by_nghttp = nghttp(proxy, "/", "--header=cookie: a=1", "--header=cookie: b=2; c=3")
    assert by_nghttp.returncode == 0, by_nghttp.stderr
    seen = [v for k, v in json.loads(by_nghttp.stdout)["headers"] if k == "cookie"]
    assert seen == ["a=1; b=2; c=3"]


# --- responses without a body, 100-continue, trailers -------------------------------------------


def test_head_has_the_length_and_no_body(proxy: Proxy) -> None:
    by_curl = curl(proxy, "/page", "-I", host="codes.test")
    assert (by_curl.status, by_curl.version) == (200, "2")
    assert re.search(rb"(?im)^content-length: 1000\r?$", by_curl.body), by_curl.body
    with proxy.client(http2=True) as client:
        head = h2(client.head(**at("codes.test", proxy, "/page")))
        assert (head.status_code, head.headers["content-length"], head.content) == (
            200,
            "1000",
            b"",
        )
        # The connection is in step: the next stream gets its own answer.
        page = h2(client.get(**at("codes.test", proxy, "/page")))
        assert page.content == b"p" * 1000


def test_204_and_304_have_no_body(proxy: Proxy) -> None:
    with proxy.client(http2=True) as client:
        empty = h2(client.get(**at("codes.test", proxy, "/status/204")))
        assert (empty.status_code, empty.headers["x-status"], empty.content) == (204, "204", b"")
        fresh = h2(client.get(**at("codes.test", proxy, "/status/304")))
        assert (fresh.status_code, fresh.content) == (200, b"fresh")
        headers = {"if-none-match": fresh.headers["etag"]}
        cached = h2(client.get(**at("codes.test", proxy, "/status/304", headers)))
        assert (cached.status_code, cached.headers["etag"], cached.content) == (304, '"v1"', b"")
    # On the wire: the HEADERS frame ends the stream, no DATA frame follows.
    verbose = nghttp(
        proxy,
        ["/status/204", "/status/304"],
        "-v",
        '--header=if-none-match: "v1"',
        host="codes.test",
    )
    assert verbose.returncode == 0, verbose.stderr
    streams = {
        int(s): int(code)
        for s, code in re.findall(rb"recv \(stream_id=(\d+)\) :status: (\d+)", verbose.stdout)
    }
    assert sorted(streams.values()) == [204, 304], verbose.stdout
    frames = re.findall(
        rb"recv (\w+) frame <length=\d+, flags=0x([0-9a-f]+), stream_id=(\d+)>", verbose.stdout
    )
    for stream_id in streams:
        on_stream = [(kind, int(flags, 16)) for kind, flags, s in frames if int(s) == stream_id]
        assert on_stream and all(kind == b"HEADERS" for kind, _ in on_stream), on_stream
        assert on_stream[-1][1] & 0x1  # END_STREAM


def test_expect_100_continue(proxy: Proxy, tmp_path: Path) -> None:
    upload = tmp_path / "body"
    upload.write_bytes(b"c" * 50_000)
    by_curl = curl(
        proxy,
        "/sink",
        "-v",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{upload}",
        host="sink.test",
    )
    assert (by_curl.status, by_curl.version) == (200, "2")
    assert json.loads(by_curl.body)["bytes"] == 50_000
    assert "< HTTP/2 100" in by_curl.stderr, by_curl.stderr
    by_nghttp = nghttp(
        proxy, "/sink", "-v", "--expect-continue", f"--data={upload}", host="sink.test"
    )
    assert by_nghttp.returncode == 0, by_nghttp.stderr
    assert verbose_statuses(by_nghttp.stdout) == [100, 200]
    assert b'"bytes": 50000' in by_nghttp.stdout


def test_trailers_are_dropped_and_the_body_is_intact(
    proxy: Proxy, h11_upstream: H11Upstream, tmp_path: Path
) -> None:
    # From the app: the body arrives whole, the trailer field does not.
    verbose = nghttp(proxy, "/trailers", "-v", host="raw.test")
    assert verbose.returncode == 0, verbose.stderr
    assert b"x-checksum" not in verbose.stdout.lower()
    assert verbose_statuses(verbose.stdout) == [200]
    body = nghttp(proxy, "/trailers", host="raw.test")
    assert body.stdout == TRAILER_BODY
    with proxy.client(http2=True) as client:
        response = h2(client.get(**at("raw.test", proxy, "/trailers")))
        assert response.content == TRAILER_BODY
    # From the client: the body reaches the app, the trailer field does not.
    upload = tmp_path / "body"
    upload.write_bytes(b"t" * 70_000)
    token = uuid.uuid4().hex
    sent = nghttp(
        proxy,
        f"/record?t={token}",
        f"--data={upload}",
        "--trailer=x-client-trailer: 1",
        host="raw.test",
    )
    assert sent.returncode == 0, sent.stderr
    (seen,) = [s for s in h11_upstream.seen if token.encode() in s.target]
    assert seen.body == b"t" * 70_000
    assert seen.trailers == []
    assert b"x-client-trailer" not in h11_upstream.data


# --- errors, each on its own stream -------------------------------------------------------------


async def one_connection(proxy: Proxy, *requests: dict[str, Any]) -> list[httpx.Response]:
    """The requests at once on one fresh HTTP/2 connection, then one more on it."""
    mark = len(proxy.log())
    async with h2_async(proxy) as client:
        responses = await asyncio.gather(*(client.request(**r) for r in requests))
        responses.append(await client.request(**requests[-1]))  # the connection goes on
    assert len(handshakes(proxy, mark)) == 1
    return [h2(r) for r in responses]


async def test_502_on_its_stream_while_another_succeeds(strict: Proxy) -> None:
    down = curl(strict, "/healthz", host="down.test")
    assert (down.status, down.version) == (502, "2")
    died, ok, again = await one_connection(
        strict,
        at("raw.test", strict, "/die", method="GET"),
        at("raw.test", strict, "/fine", method="GET"),
    )
    assert died.status_code == 502
    assert (ok.status_code, ok.content) == (200, b"ok /fine")
    assert (again.status_code, again.content) == (200, b"ok /fine")


async def test_504_on_its_stream_while_another_succeeds(strict: Proxy) -> None:
    start = time.monotonic()
    slow, ok, again = await one_connection(
        strict,
        {"method": "GET", "url": strict.url("/slow/3")},
        {"method": "GET", "url": strict.url("/healthz")},
    )
    assert slow.status_code == 504
    assert time.monotonic() - start < 2.8  # upstream_read_timeout is 1 s, not the app's 3 s
    assert (ok.status_code, ok.text, again.text) == (200, "ok", "ok")


def test_413_on_its_stream_while_another_succeeds(strict: Proxy, tmp_path: Path) -> None:
    """curl, a client that sends a whole small body at once, must see the 413 as over
    HTTP/1.1. A RST_STREAM NO_ERROR after an early response (RFC 9113 8.1 allows it) costs
    exactly that: curl 7.88 (Debian 12) then fails about one such upload in seven with "(92)
    Stream error in the HTTP/2 framing layer" and no status (against a bare h2 server too,
    0 of 40 without the RST_STREAM); httpx raises StreamClosedError. Three rounds, so that a
    one-in-seven failure rarely slips through."""
    big = tmp_path / "big"
    big.write_bytes(b"b" * 32 * 1024)  # max_body_bytes 16 KiB; under one stream window
    for _ in range(3):
        results = curl_together(
            strict,
            {
                "sized": ["/sink", "--data-binary", f"@{big}"],
                "unsized": ["/sink", "-T", "-", "-X", "POST"],  # from stdin: no content-length
                "ok": ["/sink", "--data-binary", "small"],
                "count": ["/count"],
            },
            host="sink.test",
            stdin=b"u" * 32 * 1024,
        )
        assert {tag: status for tag, (status, _, _) in results.items()} == {
            "sized": 413,
            "unsized": 413,
            "ok": 200,
            "count": 200,
        }
        assert {version for _, version, _ in results.values()} == {"2"}
        assert sum(connects for _, _, connects in results.values()) == 1  # one connection


def test_an_upload_stopped_short_after_its_413_fails_no_other_stream(strict: Proxy) -> None:
    """curl, once it has the whole 413, ends its upload with END_STREAM short of the
    Content-Length it announced. The body is dropped anyway: that must not be the connection
    error h2 makes of a length mismatch (it failed curl's other transfers, one run in three)."""
    with raw_h2(strict) as raw:
        stream = post_head(raw, "/echo", 32 * 1024)  # over max_body_bytes: 413 at once
        raw.poll_until(lambda: ended(raw, stream), timeout=5)
        assert statuses(raw, stream) == [413]
        raw.send(DataFrame(stream, b"", flags=["END_STREAM"]))  # 0 of 32 KiB: stopped short
        other = raw.new_stream()
        raw.send(raw.headers_frame(other, request_headers("/healthz"), end_stream=True))
        raw.poll_until(lambda: ended(raw, other), timeout=5)
        assert statuses(raw, other) == [200]
        assert raw.goaway is None


def test_frames_in_flight_after_a_413_are_ignored(strict: Proxy) -> None:
    """The 413 comes before the body: the proxy may end the stream with RST_STREAM NO_ERROR, but
    the DATA frames the client had already sent must then be ignored (RFC 9113 5.1, "closed":
    an endpoint MUST ignore frames it receives on closed streams after it sent RST_STREAM), not
    answered with RST_STREAM STREAM_CLOSED (h2's habit for frames on a stream it reset)."""
    with raw_h2(strict) as raw:
        stream = post_head(raw, "/echo", 32 * 1024)  # max_body_bytes is 16 KiB
        raw.send(DataFrame(stream, b"b" * 16384))  # curl sends it all at once, the window allowing
        raw.poll_until(lambda: ended(raw, stream), timeout=5)
        assert statuses(raw, stream) == [413]
        raw.poll_until(lambda: False, timeout=0.2)
        raw.send(DataFrame(stream, b"b" * 16384, flags=["END_STREAM"]))  # crossed the 413
        raw.poll_until(lambda: False, timeout=0.3)
        codes = [f.error_code for f in on_stream(raw, RstStreamFrame, stream)]
        assert codes in ([], [0]), codes  # nothing, or one NO_ERROR
        follow = raw.request("/healthz")  # the connection goes on
        raw.poll_until(lambda: ended(raw, follow), timeout=5)
        assert body_of(raw, follow) == b"ok"


async def test_431_on_its_stream_while_another_succeeds(strict: Proxy) -> None:
    # max_header_bytes 4 KiB: 6 KB is over it, and under twice it (which ends the connection).
    big = {"x-big": "a" * 6000}
    fits, huge, ok, again = await one_connection(
        strict,
        {"method": "GET", "url": strict.url("/healthz"), "headers": {"x-big": "a" * 2000}},
        {"method": "GET", "url": strict.url("/healthz"), "headers": big},
        {"method": "GET", "url": strict.url("/healthz")},
    )
    assert fits.status_code == 200
    assert huge.status_code == 431
    assert (ok.text, again.text) == ("ok", "ok")


# --- WebSocket, access log, SIGTERM -------------------------------------------------------------


async def test_websocket_works_beside_h2(proxy: Proxy) -> None:
    # The server's SETTINGS do not offer extended CONNECT (RFC 8441): h2 clients (browsers)
    # open an HTTP/1.1 connection for a WebSocket.
    settings = nghttp(proxy, "/healthz", "-v")
    assert b"SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100" in settings.stdout, settings.stdout
    assert b"ENABLE_CONNECT_PROTOCOL(0x08):1" not in settings.stdout
    for alpn in (None, ["http/1.1"]):
        context = proxy.context()
        if alpn:
            context.set_alpn_protocols(alpn)
        uri = f"wss://app.test:{proxy.port}/ws"
        async with ws_connect(uri, ssl=context, host="127.0.0.1", port=proxy.port) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blob = os.urandom(100_000)
            await ws.send(blob)
            assert await ws.recv() == blob
    # h2 on the same proxy meanwhile.
    assert curl(proxy, "/healthz").version == "2"


def access_lines(proxy: Proxy, token: str, count: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in proxy.access_log().splitlines() if token in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_access_log_names_the_protocol(proxy: Proxy, strict: Proxy) -> None:
    token = uuid.uuid4().hex
    for http, tag in (("--http2", "a"), ("--http1.1", "b"), ("--http1.0", "c")):
        curl(proxy, f"/healthz?t={token}{tag}", http=http)
    (h2_line,) = access_lines(proxy, f"t={token}a", 1)
    (h11_line,) = access_lines(proxy, f"t={token}b", 1)
    (h10_line,) = access_lines(proxy, f"t={token}c", 1)
    assert h2_line.endswith(" proto=h2"), h2_line
    assert h11_line.endswith(" proto=http/1.1"), h11_line
    assert h10_line.endswith(" proto=http/1.0"), h10_line
    assert " 200 " in h2_line
    # JSON: a "protocol" member; errors over h2 are logged too.
    curl(strict, f"/healthz?t={token}d")
    curl(strict, f"/healthz?t={token}e", http="--http1.1")
    curl(strict, f"/healthz?t={token}f", "-H", "x-big: " + "a" * 6000)
    records = [json.loads(line) for line in access_lines(strict, token, 3)]
    protocols = {r["target"][-1]: (r["protocol"], r["status"]) for r in records}
    assert protocols == {"d": ("h2", 200), "e": ("http/1.1", 200), "f": ("h2", 431)}


def test_sigterm_sends_goaway_and_lets_the_open_stream_finish(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))  # shutdown_grace = "5s"
    token = uuid.uuid4().hex
    # nghttp, a real client, with a slow request in flight.
    watcher = subprocess.Popen(
        ["nghttp", "-v", "--timeout=20", f"https://localhost:{proxy.port}/slow/2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with raw_h2(proxy) as raw:
        slow = raw.request("/slow/2")
        time.sleep(0.7)  # both slow requests are at the app
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_log(r"draining")
        time.sleep(0.2)
        # A new stream after the GOAWAY went out (this client has not read it yet).
        late = raw.request(f"/healthz?t={token}")
        raw.poll_until(lambda: ended(raw, slow), timeout=10)
        finished = time.monotonic() - signalled
        goaways = [
            (f.error_code, f.last_stream_id) for f in raw.frames if isinstance(f, GoAwayFrame)
        ]
        assert goaways[:1] == [(0, slow)], goaways  # NO_ERROR, the last stream taken
        assert ended(raw, slow), raw.describe()
        assert statuses(raw, slow) == [200]
        assert json.loads(body_of(raw, slow))["slept"] == 2
        assert finished < 5, finished  # within shutdown_grace
        # Then the connection closes and the process exits; the late stream got no answer.
        assert raw.wait_closed(5)
        assert statuses(raw, late) == []
    out, _ = watcher.communicate(timeout=15)
    assert watcher.returncode == 0, out[-3000:]
    assert re.search(rb"recv GOAWAY frame .*\n.*error_code=NO_ERROR", out), out[-3000:]
    assert b'"slept":2' in out
    assert proxy.proc.wait(10) == 0
    assert token not in proxy.access_log()
    assert "Traceback" not in proxy.log()
    # A second GOAWAY may follow the first, never naming a higher stream (RFC 9113 6.8): the
    # late stream was refused, not taken.
    goaways = [(f.error_code, f.last_stream_id) for f in raw.frames if isinstance(f, GoAwayFrame)]
    assert all(goaway == (0, slow) for goaway in goaways), goaways
