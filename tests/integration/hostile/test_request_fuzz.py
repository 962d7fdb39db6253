"""Differential fuzzing of the request path: generated and mutated requests through a real
`tlsproxy run` to a recording upstream, each read again by an independent strict parser.

THE PROPERTY, for every input (the bytes one client connection sends, then its half-close):
either the proxy refuses a request (4xx/5xx of its own) and the app sees nothing of it or of what
follows, or the app receives requests that the strict parser (tests/integration/hostile/strict.py,
not h11) reads exactly as h11 read the client's: same method, origin-form target and body, in
order, no more of them than h11 accepted, and not one byte left over on the upstream connection.
Anything else is an "ambiguous forward". A crash is the proxy dying or logging a traceback.

CI runs a fixed seed and count. TLSPROXY_FUZZ_SECONDS=N runs new seeds for N seconds;
TLSPROXY_FUZZ_SEED=S replays one seed (the seed of a failure is in its message).
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest

from tests.integration.harness import running
from tests.integration.hostile.fuzz_rounds import LONG_SECONDS, rounds
from tests.integration.hostile.strict import Ambiguous, parse_requests
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import HalfClosingClient, Proxy, TcpServer, proxy_config

CI_SEED = 20261204
CI_INPUTS = 1500

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingUpstream(TcpServer):
    """Records every byte; answers each request it can frame leniently (by a Content-Length or
    a last chunk) with 200, so that what arrived is recorded whatever it is."""

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        pending = b""
        while data := self.recv(conn, buf):
            pending += data
            while True:
                head_end = pending.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                lines = pending[:head_end].lower().split(b"\r\n")
                rest = pending[head_end + 4 :]
                if any(line.startswith(b"transfer-encoding:") for line in lines):
                    end = rest.find(b"0\r\n\r\n")
                    if end < 0:
                        break
                    pending = rest[end + 5 :]
                else:
                    length = 0
                    for line in lines:
                        if line.startswith(b"content-length:"):
                            value = line.split(b":", 1)[1].strip()
                            length = int(value) if value.isdigit() else 0
                    if len(rest) < length:
                        break
                    pending = rest[length:]
                conn.sendall(OK)


# --- the corpus and the mutator ------------------------------------------------------------------

HOST = b"Host: localhost\r\n"
TRICKY = [
    b"\x00", b"\r", b"\n", b"\x7f", b"\x0b", b"\t", b" ", b":", b",", b";", b"\xff", b"\r\n",
    b"\r\n\r\n", b"0\r\n\r\n", b"\r\n ", b"\n\n",
]  # fmt: skip
FRAMINGS = [
    b"Content-Length: %d\r\n",
    b"content-length: %d\r\n",
    b"Content-Length:  %d \r\n",
    b"Content-Length: +%d\r\n",
    b"Content-Length: 0x%x\r\n",
    b"Content-Length: %d\r\nContent-Length: %d\r\n",
    b"Content-Length: %d, %d\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: Chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n",
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Transfer-Encoding: identity, chunked\r\n",
    b"Transfer-Encoding:\tchunked\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding:\r\n chunked\r\n",
    b"X: y\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 99999999999999999999\r\n",
]
EXTRAS = [
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n",
    b"Connection: content-length\r\n",
    b"Connection: transfer-encoding, host\r\n",
    b"Expect: 100-continue\r\n",
    b"TE: trailers\r\n",
    b"Proxy: http://evil\r\n",
    b"X-Forwarded-For: 1.2.3.4\r\n",
    b"X-Folded: a\r\n b\r\n",
    b"Bad Name: x\r\n",
    b"X-Ctl: a\x01b\r\n",
    b"X-Long: " + b"a" * 3000 + b"\r\n",
]
TARGETS = [
    b"/fz",
    b"http://localhost/fz",
    b"https://localhost:443/fz",
    b"http://other.test/fz",
    b"//fz",
    b"/fz?a=b#frag",
    b"*",
    b"localhost:443",
    b"/f z",
    b"/fz%00",
]
VERSIONS = [b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.10"]
METHODS = [b"GET"] * 4 + [b"POST"] * 4 + [b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT"]


def _chunked(rng: random.Random, body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(body):
        size = rng.randint(1, max(1, len(body) - pos))
        form = rng.choice([b"%x", b"%X", b"%04x", b"%x;ext=1", b"%x ;x", b"%x\n"])
        out += (form % size) + b"\r\n" + body[pos : pos + size] + b"\r\n"
        pos += size
    out += rng.choice([b"0\r\n\r\n"] * 6 + [b"0\r\nX-Trailer: t\r\n\r\n", b"00\r\n\r\n", b"0\r\n"])
    return bytes(out)


def generate_request(rng: random.Random, tag: bytes) -> bytes:
    method = rng.choice(METHODS)
    target = rng.choice(TARGETS).replace(b"fz", b"fz/" + tag)
    version = rng.choice(VERSIONS)
    body = bytes(rng.choice(b"abcxyz\r\n0") for _ in range(rng.choice([0, 0, 1, 5, 40, 300])))
    head = [b"%s %s %s\r\n" % (method, target, version)]
    if rng.random() < 0.95:
        head.append(HOST)
    framing = rng.choice(FRAMINGS) if (body or rng.random() < 0.3) else b""
    if framing.count(b"%"):
        framing = (
            framing
            % tuple(len(body) + rng.choice([0, 0, 0, 1, -1]) for _ in range(2))[
                : framing.count(b"%")
            ]
        )
    head.append(framing)
    for _ in range(rng.choice([0, 0, 1, 2])):
        head.append(rng.choice(EXTRAS))
    rng.shuffle(head[1:])
    encoded = _chunked(rng, body) if b"chunked" in framing.lower() else body
    return b"".join(head) + b"\r\n" + encoded


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip a byte
            data = data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
        elif op == 1:  # insert a tricky byte
            data = data[:pos] + rng.choice(TRICKY) + data[pos:]
        elif op == 2 and data:  # duplicate a slice
            end = min(len(data), pos + rng.randint(1, 40))
            data = data[:end] + data[pos:end] + data[end:]
        elif op == 3:  # truncate
            data = data[: max(1, pos)]
        elif op == 4:  # delete a slice
            data = data[:pos] + data[pos + rng.randint(1, 8) :]
        else:  # swap CRLF for LF once
            data = data.replace(b"\r\n", b"\n", 1) if rng.random() < 0.5 else data
    return data


def generate_input(rng: random.Random, serial: int) -> bytes:
    requests = [
        generate_request(rng, b"%d/%d" % (serial, k)) for k in range(rng.choice([1, 1, 1, 2, 3, 5]))
    ]
    data = b"".join(requests)
    if rng.random() < 0.4:
        data = mutate(rng, data)
    return data


# --- the reference: what h11 reads -----------------------------------------------------------


def h11_requests(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(method, target, body) of each request h11 accepts, in order, until it refuses one.
    Each request is read by a fresh h11 connection: h11 would stop after an HTTP/1.0 request,
    and the proxy serves HTTP/1.0 keep-alive when the client asks for it, as nginx does."""
    out: list[tuple[bytes, bytes, bytes]] = []
    while data:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        conn.receive_data(b"")
        current: list = []
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    return out
                if isinstance(event, h11.Request):
                    current = [event.method, event.target, bytearray()]
                elif isinstance(event, h11.Data):
                    current[2] += event.data
                elif isinstance(event, h11.EndOfMessage):
                    out.append((current[0], current[1], bytes(current[2])))
                    data = conn.trailing_data[0]
                    break
        except h11.ProtocolError:
            return out
    return out


def origin_form(target: bytes) -> bytes:
    if target[:1] == b"/":
        return target
    if b"://" in target:
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        return rest[slash:] if slash >= 0 else b"/"
    return target


# --- one input through the proxy ---------------------------------------------------------------


@dataclass
class Stats:
    inputs: int = 0
    forwarded: int = 0
    refused: int = 0
    aborted: int = 0
    ambiguous: list[str] = field(default_factory=list)


def client_statuses(data: bytes) -> list[int]:
    """The status of each complete response the client got; -1 for anything else than a
    connection that ends between two responses (a partial or invalid response)."""
    statuses = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    in_response = False
    try:
        while True:
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    statuses.append(event.status_code)
                    in_response = True
                elif isinstance(event, h11.EndOfMessage):
                    in_response = False
                    break
                elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    return statuses
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return statuses
            conn.start_next_cycle()
    except h11.ProtocolError:
        if in_response or conn.trailing_data[0]:
            statuses.append(-1)
        return statuses


def send_input(proxy: Proxy, data: bytes, rng: random.Random) -> bytes:
    client = HalfClosingClient(proxy)
    try:
        client.sock.settimeout(5)
        if rng.random() < 0.3 and len(data) > 1:
            cut = rng.randrange(1, len(data))
            client.send(data[:cut])
            time.sleep(0.002)
            client.send(data[cut:])
        else:
            client.send(data)
        client.half_close()
        return client.read_all()
    except (OSError, ssl.SSLError):
        return b""
    finally:
        client.close()


def check_one(
    proxy: Proxy, upstream: RecordingUpstream, data: bytes, rng: random.Random, stats: Stats
) -> None:
    before = [len(b) for b in upstream.received]
    answer = send_input(proxy, data, rng)
    time.sleep(0.002)
    delta = [
        bytes(buf[before[i] if i < len(before) else 0 :]) for i, buf in enumerate(upstream.received)
    ]
    forwarded = []
    for index, stream in enumerate(delta):
        if not stream:
            continue
        try:
            requests, rest = parse_requests(stream)
        except Ambiguous as exc:
            stats.ambiguous.append(f"{data!r}: strict parser refused what the app got: {exc}")
            return
        # An incomplete request at the end is an aborted one only if the proxy closed that
        # connection after it (the app then sees a disconnect, never a complete request).
        if rest and not upstream.closed[index].wait(3):
            stats.ambiguous.append(f"{data!r}: leftover bytes at the app: {rest!r}")
            return
        stats.aborted += bool(rest)
        forwarded += requests
    expected = h11_requests(data)
    statuses = client_statuses(answer)
    stats.inputs += 1
    stats.forwarded += len(forwarded)
    stats.refused += sum(1 for s in statuses if s >= 400)
    if len(forwarded) > len(expected):
        stats.ambiguous.append(
            f"{data!r}: the app got {len(forwarded)} requests, h11 read {len(expected)}"
        )
        return
    for got, (method, target, body) in zip(forwarded, expected, strict=False):
        if (got.start[0], got.start[1], got.body) != (method, origin_form(target), body):
            stats.ambiguous.append(
                f"{data!r}: the app got {got.start[:2]} {got.body!r}, "
                f"h11 read {(method, target)} {body!r}"
            )
            return
    # Every forwarded request was answered with the app's 200, in order, before any refusal.
    if statuses[: len(forwarded)] != [200] * len(forwarded) or any(
        s != 200 and s < 400 for s in statuses
    ):
        stats.ambiguous.append(
            f"{data!r}: client got {statuses} for {len(forwarded)} forwarded requests"
        )


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with running(RecordingUpstream()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: RecordingUpstream) -> Proxy:
    limits = 'header_read_timeout = "2s"\nidle_timeout = "2s"\nbody_read_timeout = "2s"\n'
    limits += 'max_header_bytes = "8KiB"\nmax_body_bytes = "256"\nupstream_read_timeout = "2s"\n'
    return make_module_proxy(
        proxy_config(
            [(["localhost"], "app")],
            {"app": upstream.server},
            default_site="localhost",
            limits=limits,
        )
    )


@pytest.mark.timeout(LONG_SECONDS + 300)  # the long mode runs past pytest's usual 300 s
def test_request_path_differential_fuzz(proxy: Proxy, upstream: RecordingUpstream) -> None:
    stats = Stats()
    started = time.monotonic()
    for seed, count, seconds in rounds(CI_SEED, CI_INPUTS):
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        for serial in range(count):
            if time.monotonic() > deadline:
                break
            data = generate_input(rng, serial)
            check_one(proxy, upstream, data, rng, stats)
            assert not stats.ambiguous, f"seed {seed}, input {serial}: {stats.ambiguous[0]}"
            assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy died"
        log = proxy.log()
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    # The proxy still serves an ordinary request, and every upstream stream parses whole.
    with proxy.client() as client:
        assert client.get(proxy.url("/after")).status_code == 200
    for stream, closed in zip(upstream.received, upstream.closed, strict=True):
        _, rest = parse_requests(bytes(stream))
        assert rest == b"" or closed.is_set()
    elapsed = time.monotonic() - started
    print(
        f"\nrequest fuzz: {stats.inputs} inputs, {stats.forwarded} requests forwarded, "
        f"{stats.refused} refused, {stats.aborted} aborted upstream, 0 ambiguous forwards, "
        f"0 crashes, {elapsed:.1f} s"
    )
    if not LONG_SECONDS:  # CI's round (or a replayed seed) must not end early unnoticed
        assert stats.inputs == CI_INPUTS, f"{stats.inputs} of {CI_INPUTS} inputs ran"
    assert stats.inputs > 0 and stats.forwarded > 0
    assert stats.refused > 0  # the corpus does reach the refusals
