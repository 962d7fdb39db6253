"""The response path, fuzzed: broken apps behind a real tlsproxy.

A scripted upstream answers each request with generated and mutated bytes (malformed status
lines and heads, Content-Length with Transfer-Encoding, conflicting lengths, bad chunking, 1xx
responses, 101s, bodies on 204/304/HEAD, bytes after the end, a close mid-body, a hang), sent
in one write or in pieces, and sometimes closes or hangs after them.

THE PROPERTY: the client gets a 502/504, or a connection that ends without a complete message;
or, when it gets a complete message with another status, the upstream's bytes, read by the
independent strict parser (strict.py), are a valid response with the same status and the same
body: never a truncated or re-framed response that looks complete. And the next response on the
same client connection never holds bytes of the previous upstream response.

CI runs a fixed seed and count; TLSPROXY_FUZZ_SECONDS=N and TLSPROXY_FUZZ_SEED=S as for the
request fuzzer.
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest

from tests.integration.harness import running
from tests.integration.hostile.fuzz_rounds import LONG_SECONDS, rounds
from tests.integration.hostile.strict import Ambiguous, parse_response
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, TcpServer, proxy_config

CI_SEED = 4122026
CI_INPUTS = 400
_CASE = re.compile(rb"^[A-Z]+ /case/(\d+) ")


@dataclass
class Script:
    chunks: list[bytes]  # sent with a short pause between them
    then: str  # "keep" | "close" | "hang"


class ScriptedUpstream(TcpServer):
    """Answers a request for /case/N with script N (after reading its head), and remembers
    the bytes it sent for it."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[int, Script] = {}
        self.lock = threading.Lock()

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        pending = b""
        while data := self.recv(conn, buf):
            pending += data
            while b"\r\n\r\n" in pending:
                head, _, pending = pending.partition(b"\r\n\r\n")
                match = _CASE.match(head)
                script = self.scripts.get(int(match.group(1))) if match else None
                if script is None:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                for chunk in script.chunks:
                    conn.sendall(chunk)
                    if len(script.chunks) > 1:
                        time.sleep(0.002)
                if script.then == "close":
                    return
                if script.then == "hang":
                    while self.recv(conn, buf):
                        pass
                    return


# --- the corpus ------------------------------------------------------------------------------


def _chunked(rng: random.Random, body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(body):
        size = rng.randint(1, len(body) - pos)
        out += rng.choice([b"%x", b"%X", b"%x;e=1"]) % size + b"\r\n" + body[pos : pos + size]
        out += b"\r\n"
        pos += size
    return bytes(out) + rng.choice([b"0\r\n\r\n"] * 5 + [b"0\r\nX-T: 1\r\n\r\n"])


STATUS_LINES = [
    *[b"HTTP/1.1 200 OK"] * 10,
    b"HTTP/1.1 201 Created",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.1 500 Oops",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 99 Low",
    b"HTTP/1.1 2000 OK",
    b"HTTP/2 200 OK",
    b"HTTP/1.1  200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1 200 O\x00K",
]
INFORMATIONAL = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
]
EXTRA_FIELDS = [
    b"Content-Type: text/plain\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: close\r\n",
    b"Keep-Alive: timeout=5\r\n",
    b"Upgrade: websocket\r\n",
    b"Trailer: X-T\r\n",
    b"Bad Name: x\r\n",
    b"X-Fold: a\r\n b\r\n",
    b"X-Bare: lf\n",
    b"X-Nul: a\x00b\r\n",
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n",
    b"X-Big: " + b"h" * 5000 + b"\r\n",
]


def generate_response(rng: random.Random) -> bytes:
    body = bytes(rng.choice(b"abcdef\r\n0") for _ in range(rng.choice([0, 1, 10, 100, 3000])))
    framing = rng.choice(
        ["length"] * 4 + ["chunked"] * 4 + ["close"] * 2 + ["both", "two-lengths", "bad-te"]
    )
    fields = []
    if framing in ("length", "both"):
        fields.append(b"Content-Length: %d\r\n" % (len(body) + rng.choice([0, 0, 0, 3, -1])))
    if framing == "two-lengths":
        fields.append(b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body) + 1))
    if framing in ("chunked", "both"):
        fields.append(b"Transfer-Encoding: chunked\r\n")
    if framing == "bad-te":
        fields.append(
            rng.choice([b"Transfer-Encoding: gzip\r\n", b"Transfer-Encoding: xchunked\r\n"])
        )
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        fields.append(rng.choice(EXTRA_FIELDS))
    rng.shuffle(fields)
    encoded = _chunked(rng, body) if framing in ("chunked", "both") else body
    prefix = rng.choice(INFORMATIONAL) if rng.random() < 0.15 else b""
    data = prefix + rng.choice(STATUS_LINES) + b"\r\n" + b"".join(fields) + b"\r\n" + encoded
    if rng.random() < 0.1:
        data += rng.choice([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra", b"garbage"])
    return data


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.choice([1, 1, 2])):
        pos = rng.randrange(len(data) + 1)
        op = rng.randrange(4)
        if op == 0 and data:
            data = data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
        elif op == 1:
            data = data[:pos] + rng.choice([b"\r\n", b"\n", b"\x00", b" ", b"0", b";"]) + data[pos:]
        elif op == 2:
            data = data[: max(1, pos)]  # truncated
        else:
            data = data[:pos] + data[pos + rng.randint(1, 6) :]
    return data


def generate_script(rng: random.Random) -> Script:
    data = generate_response(rng)
    if rng.random() < 0.25:
        data = mutate(rng, data)
    if rng.random() < 0.3 and len(data) > 2:
        cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    else:
        chunks = [data]
    return Script(chunks, rng.choice(["keep"] * 6 + ["close"] * 3 + ["hang"]))


# --- the client side ---------------------------------------------------------------------------


@dataclass
class Stats:
    inputs: int = 0
    correct: int = 0
    gateway_errors: int = 0
    cut: int = 0
    violations: list[str] = field(default_factory=list)


def read_answer(sock: ssl.SSLSocket, method: bytes, deadline: float) -> tuple[str, object]:
    """("complete", h11 response and body) | ("cut", bytes) once the connection ends early."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    head = None
    body = bytearray()
    raw = bytearray()
    while time.monotonic() < deadline:
        try:
            event = conn.next_event()
        except h11.ProtocolError:
            return "cut", bytes(raw)
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                data = b""
            raw += data
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return "complete", (head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return "cut", bytes(raw)
    return "cut", bytes(raw)  # still open at the deadline: no complete message either


def check_one(
    proxy: Proxy, upstream: ScriptedUpstream, case: int, rng: random.Random, stats: Stats
) -> None:
    script = generate_script(rng)
    upstream.scripts[case] = script
    sent = b"".join(script.chunks)
    method = b"HEAD" if rng.random() < 0.1 else b"GET"
    stats.inputs += 1
    with proxy.conn(timeout=1) as conn:
        conn.send(b"%s /case/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % (method, case))
        kind, got = read_answer(conn.sock, method, time.monotonic() + 4)
        if kind == "cut":
            stats.cut += 1
            return
        response, body = got  # type: ignore[misc]
        if response.status_code in (502, 504):
            stats.gateway_errors += 1
        else:
            try:
                parsed = parse_response(sent, head_request=method == b"HEAD")
            except Ambiguous as exc:
                parsed = None
                reason = str(exc)
            else:
                reason = "incomplete"
            if parsed is None or (int(parsed[0].start[1]), parsed[0].body) != (
                response.status_code,
                body,
            ):
                stats.violations.append(
                    f"{method.decode()}: upstream sent {sent!r}; client got "
                    f"{response.status_code} {body[:200]!r}"
                    f" ({reason if parsed is None else 'status or body differ'})"
                )
                return
            stats.correct += 1
        # The connection, if kept, carries the next answer clean.
        if not response.headers or (b"connection", b"close") not in [
            (n, v.lower()) for n, v in response.headers
        ]:
            try:
                conn.send(b"GET /clean HTTP/1.1\r\nHost: localhost\r\n\r\n")
            except OSError:
                return
            kind, got = read_answer(conn.sock, b"GET", time.monotonic() + 4)
            if kind == "complete":
                after, after_body = got  # type: ignore[misc]
                # The app's clean answer, or an honest error if the app broke that connection
                # (a hang after a response, a close): never bytes of the previous response.
                if (after.status_code, after_body) != (200, b"ok") and after.status_code not in (
                    502,
                    504,
                ):
                    stats.violations.append(
                        f"upstream sent {sent!r}; the next answer was {after.status_code} "
                        f"{after_body[:200]!r}"
                    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with running(ScriptedUpstream()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: ScriptedUpstream) -> Proxy:
    # Short: a response cut short on a connection the app keeps open ends by this timeout.
    limits = 'upstream_read_timeout = "250ms"\nmax_header_bytes = "4KiB"\n'
    return make_module_proxy(
        proxy_config(
            [(["localhost"], "app")],
            {"app": upstream.server},
            default_site="localhost",
            limits=limits,
            server="",
        )
    )


@pytest.mark.timeout(LONG_SECONDS + 300)  # the long mode runs past pytest's usual 300 s
def test_response_path_fuzz(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    stats = Stats()
    started = time.monotonic()
    case = 0
    for seed, count, seconds in rounds(CI_SEED, CI_INPUTS):
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            case += 1
            check_one(proxy, upstream, case, rng, stats)
            assert not stats.violations, f"seed {seed}, case {case}: {stats.violations[0]}"
            assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy died"
        log = proxy.log()
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    with proxy.client() as client:
        assert client.get(proxy.url("/after")).text == "ok"
    print(
        f"\nresponse fuzz: {stats.inputs} inputs, {stats.correct} complete and correct, "
        f"{stats.gateway_errors} 502/504, {stats.cut} cut connections, 0 violations, "
        f"0 crashes, {time.monotonic() - started:.1f} s"
    )
    assert stats.correct and stats.gateway_errors and stats.cut  # every outcome is reached
