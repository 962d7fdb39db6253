"""A bounded mixed-traffic generator for a running tlsproxy in front of examples/app.py, and a
/proc sampler for the proxy's memory and file descriptors (the soak run of issue 9).

`Mix` runs a few client threads until a deadline (and at most `max_ops` operations each). Each
operation is one kind of client, and checks what it got: keep-alive requests, new connections,
uploads (fixed length and chunked), downloads, WebSockets, and the error cases a public server
sees (garbage, an unknown Host, a Host of another site, an unknown SNI, an oversized head, and
clients that vanish in the middle of a body). A failed check is recorded with its kind, never
just counted; the soak test asserts there are none.

Traffic goes to 127.0.0.1 only; the TLS names are checked against the proxy's local CA.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import httpx
from websockets.asyncio.client import connect as ws_connect

KIB = 1024
MIB = 1024 * KIB


# --- sampling the proxy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the sampler started
    rss_kib: int
    fds: int


def sample(pid: int, since: float = 0.0) -> Sample:
    """The process's resident set (VmRSS) and its open file descriptors, now."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return Sample(time.monotonic() - since, rss, fds)


class Sampler:
    """Samples a pid every `interval` seconds in a thread, until stopped (or `max_samples`)."""

    def __init__(self, pid: int, interval: float = 1.0, max_samples: int = 100_000) -> None:
        self.pid = pid
        self.interval = interval
        self.max_samples = max_samples
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def start(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(10)
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self.max_samples:
            try:
                self.samples.append(sample(self.pid, self.started))
            except (FileNotFoundError, ProcessLookupError):
                return  # the process is gone: the test will say so
            self._stop.wait(self.interval)


def summary(samples: list[Sample], warmup_end: float) -> dict[str, float]:
    """Figures for the soak's report and assertions (RSS in MiB)."""
    warm = [s for s in samples if s.at <= warmup_end]
    after = [s for s in samples if s.at > warmup_end]
    if not warm or not after:
        raise ValueError(f"too few samples ({len(samples)}) around the warm-up end {warmup_end}")
    # A trend, not noise: a least-squares slope of RSS over the post-warm-up samples.
    n = len(after)
    mean_t = sum(s.at for s in after) / n
    mean_r = sum(s.rss_kib for s in after) / n
    var = sum((s.at - mean_t) ** 2 for s in after) or 1.0
    slope = sum((s.at - mean_t) * (s.rss_kib - mean_r) for s in after) / var
    return {
        "samples": len(samples),
        "rss_start_mib": samples[0].rss_kib / KIB,
        "rss_warmup_end_mib": warm[-1].rss_kib / KIB,
        "rss_warmup_max_mib": max(s.rss_kib for s in warm) / KIB,
        "rss_after_max_mib": max(s.rss_kib for s in after) / KIB,
        "rss_end_mib": samples[-1].rss_kib / KIB,
        "rss_slope_kib_per_min": slope * 60,
        "fds_start": samples[0].fds,
        "fds_warmup_max": max(s.fds for s in warm),
        "fds_after_max": max(s.fds for s in after),
        "fds_end": samples[-1].fds,
    }


# --- the traffic --------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """An operation got something other than what it must get."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Report:
    ops: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first failures, in full
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class Target:
    """Where the proxy listens and what it serves: `host` and `other_host` are two sites (the
    same app behind both); `ca` is the local CA root."""

    port: int
    ca: Path
    host: str = "localhost"
    other_host: str = "other.test"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class Mix:
    """Weighted random operations from `threads` threads until `seconds` have passed."""

    def __init__(self, target: Target, *, seconds: float, threads: int = 4, seed: int = 1) -> None:
        self.target = target
        self.seconds = seconds
        self.threads = threads
        self.seed = seed
        self.max_ops = 10_000_000  # per thread: the deadline ends it long before
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.kinds: list[tuple[str, int, Callable[[_Client], None]]] = [
            ("keepalive GET", 30, _Client.keepalive_get),
            ("new connection", 14, _Client.new_connection),
            ("upload", 10, _Client.upload),
            ("chunked upload", 4, _Client.chunked_upload),
            ("download", 5, _Client.download),
            ("websocket", 8, _Client.websocket),
            ("garbage -> 400", 4, _Client.garbage),
            ("unknown Host -> 404", 4, _Client.unknown_host),
            ("other site's Host -> 421", 3, _Client.misdirected),
            ("unknown SNI -> alert", 3, _Client.unknown_sni),
            ("oversized head -> 431", 2, _Client.oversized_head),
            ("abort mid-upload", 4, _Client.abort_upload),
            ("abort mid-download", 4, _Client.abort_download),
        ]

    def run(self) -> Report:
        deadline = time.monotonic() + self.seconds
        workers = [
            threading.Thread(target=self._worker, args=(n, deadline), daemon=True)
            for n in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            # An operation is bounded by its socket timeouts (30 s at most) beyond the deadline.
            worker.join(self.seconds + 120)
        self._stop.set()
        return self.report

    def _worker(self, number: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + number)
        client = _Client(self.target, rng, self)
        names = [k[0] for k in self.kinds]
        weights = [k[1] for k in self.kinds]
        operations = {k[0]: k[2] for k in self.kinds}
        try:
            for _ in range(self.max_ops):
                if time.monotonic() >= deadline or self._stop.is_set():
                    return
                name = rng.choices(names, weights)[0]
                try:
                    operations[name](client)
                except Exception as exc:
                    self._failed(name, exc)
                    client.reset()  # start the next operation on a fresh keep-alive client
                else:
                    with self._lock:
                        self.report.ops[name] += 1
        finally:
            client.close()

    def _failed(self, name: str, exc: BaseException) -> None:
        with self._lock:
            self.report.failures[name] += 1
            if len(self.report.examples) < 20:
                self.report.examples.append(f"{name}: {type(exc).__name__}: {exc}")

    def moved(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.report.bytes_up += up
            self.report.bytes_down += down


class _Client:
    """One thread's client state: a keep-alive httpx client, and the operations."""

    def __init__(self, target: Target, rng: random.Random, mix: Mix) -> None:
        self.target = target
        self.rng = rng
        self.mix = mix
        self.context = target.context()
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(verify=self.context, timeout=30)
        return self._http

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def url(self, path: str) -> str:
        return f"https://{self.target.host}:{self.target.port}{path}"

    def tls(self, sni: str | None = None, timeout: float = 30) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.target.port), timeout=timeout)
        try:
            return self.context.wrap_socket(raw, server_hostname=sni or self.target.host)
        except BaseException:
            raw.close()
            raise

    # --- well-behaved clients -----------------------------------------------------------------

    def keepalive_get(self) -> None:
        if self.rng.random() < 0.5:
            response = self.http.get(self.url("/"))
            check(response.status_code == 200, f"GET / -> {response.status_code}")
            check(response.json()["message"] == "Hello from behind tlsproxy", "GET / body")
            return
        n = self.rng.randrange(0, 256 * KIB)
        response = self.http.get(self.url(f"/bytes/{n}"))
        check(response.status_code == 200, f"GET /bytes/{n} -> {response.status_code}")
        check(response.content == b"x" * n, f"GET /bytes/{n}: {len(response.content)} bytes")
        self.mix.moved(down=n)

    def new_connection(self) -> None:
        """A fresh TLS connection for one request that asks to close; the answer is parsed
        strictly (h11) and the proxy must then close the connection."""
        n = self.rng.randrange(0, 64 * KIB)
        chunked = self.rng.random() < 0.5
        query = "?chunked=1" if chunked else ""
        with self.tls() as sock:
            sock.sendall(
                f"GET /bytes/{n}{query} HTTP/1.1\r\nHost: {self.target.host}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            status, body, closed = read_response(sock)
        check(status == 200, f"new connection GET /bytes/{n}: {status}")
        check(body == b"x" * n, f"new connection GET /bytes/{n}: {len(body)} bytes")
        check(closed, "the proxy kept a Connection: close connection open")
        self.mix.moved(down=n)

    def upload(self) -> None:
        size = self.rng.randrange(1, 2 * MIB)
        body = self.rng.randbytes(size)
        response = self.http.post(self.url("/echo"), content=body)
        check(response.status_code == 200, f"POST /echo ({size}) -> {response.status_code}")
        check(response.content == body, f"POST /echo ({size}): echo differs")
        self.mix.moved(up=size, down=size)

    def chunked_upload(self) -> None:
        pieces = [self.rng.randbytes(self.rng.randrange(1, 64 * KIB)) for _ in range(8)]
        body = b"".join(pieces)
        # A generator has no length: httpx sends Transfer-Encoding: chunked.
        response = self.http.post(self.url("/echo"), content=iter(pieces))
        check(response.status_code == 200, f"chunked POST /echo -> {response.status_code}")
        check(response.content == body, "chunked POST /echo: echo differs")
        self.mix.moved(up=len(body), down=len(body))

    def download(self) -> None:
        size = self.rng.choice([4, 8, 16]) * MIB
        got = 0
        with self.http.stream("GET", self.url(f"/bytes/{size}")) as response:
            check(response.status_code == 200, f"GET /bytes/{size} -> {response.status_code}")
            for piece in response.iter_bytes():
                check(piece == b"x" * len(piece), f"GET /bytes/{size}: a byte not x")
                got += len(piece)
        check(got == size, f"GET /bytes/{size}: {got} bytes")
        self.mix.moved(down=size)

    def websocket(self) -> None:
        # The asyncio client, on a loop of this thread's own: the sync client reads from a
        # thread of its own while the caller writes, and an SSL socket is not thread-safe
        # (tried: one handshake in a few hundred was lost, with or without the proxy).
        asyncio.run(self._websocket())

    async def _websocket(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.target.port), timeout=30)
        sock.setblocking(False)
        async with ws_connect(
            f"wss://{self.target.host}:{self.target.port}/ws",
            sock=sock,
            ssl=self.context,
            server_hostname=self.target.host,
            open_timeout=30,
            close_timeout=10,
            max_size=4 * MIB,
            ping_interval=None,
        ) as ws:
            for _ in range(self.rng.randrange(1, 8)):
                if self.rng.random() < 0.5:
                    text = "".join(self.rng.choices("abcdé€😀", k=self.rng.randrange(0, 2000)))
                    await ws.send(text)
                    echo = await asyncio.wait_for(ws.recv(), 30)
                    check(echo == text, "websocket text echo differs")
                else:
                    data = self.rng.randbytes(self.rng.randrange(0, 256 * KIB))
                    await ws.send(data)
                    echo = await asyncio.wait_for(ws.recv(), 30)
                    check(echo == data, "websocket binary echo differs")
                    self.mix.moved(up=len(data), down=len(data))

    # --- the error cases ----------------------------------------------------------------------

    def _expect_error(self, request: bytes, status: int) -> None:
        """The error status, and the connection closed after it (an error that ends the
        connection, or a request that said Connection: close)."""
        with self.tls() as sock:
            sock.sendall(request)
            got, _, closed = read_response(sock)
        check(got == status, f"expected {status}, got {got}")
        check(closed, f"the connection stayed open after {status}")

    def garbage(self) -> None:
        self._expect_error(b"GARBAGE\r\n\r\n", 400)

    def unknown_host(self) -> None:
        request = b"GET / HTTP/1.1\r\nHost: nowhere.invalid\r\nConnection: close\r\n\r\n"
        self._expect_error(request, 404)

    def misdirected(self) -> None:
        host = self.target.other_host.encode()
        request = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        self._expect_error(request, 421)

    def oversized_head(self) -> None:
        filler = b"X-Filler: " + b"f" * 8000 + b"\r\n"
        request = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + filler * 10 + b"\r\n"
        self._expect_error(request, 431)

    def unknown_sni(self) -> None:
        try:
            with self.tls(sni="nowhere.invalid") as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: nowhere.invalid\r\n\r\n")
        except ssl.SSLError as exc:
            check("UNRECOGNIZED_NAME" in str(exc).upper(), f"unknown SNI: {exc}")
            return
        raise CheckFailed("a handshake for an unknown name succeeded")

    def abort_upload(self) -> None:
        """A client that announces a body, sends part of it and vanishes (no close_notify)."""
        size = self.rng.randrange(256 * KIB, 4 * MIB)
        sent = self.rng.randrange(0, size // 2)
        sock = self.tls()
        try:
            sock.sendall(
                b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % size
            )
            sock.sendall(self.rng.randbytes(sent))
        finally:
            _vanish(sock)
        self.mix.moved(up=sent)

    def abort_download(self) -> None:
        """A client that reads the start of a large response and vanishes."""
        sock = self.tls()
        try:
            sock.sendall(b"GET /bytes/33554432 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            want = self.rng.randrange(1, 512 * KIB)
            got = 0
            while got < want:
                data = sock.recv(65536)
                if not data:
                    raise CheckFailed("the download ended before the client aborted it")
                got += len(data)
        finally:
            _vanish(sock)
        self.mix.moved(down=got)


def _vanish(sock: ssl.SSLSocket) -> None:
    """Close the TCP connection at once, without close_notify, with a reset (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def read_response(sock: ssl.SSLSocket, timeout: float = 30) -> tuple[int | None, bytes, bool]:
    """(status, body, whether the proxy closed the connection within 5 s of the response) for
    one response, parsed by h11 (a malformed or truncated message raises)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    sock.settimeout(timeout)
    status: int | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(_recv(sock))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            raise CheckFailed("the connection closed before a response")
    sock.settimeout(5)
    try:
        closed = sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        closed = True
    except TimeoutError:
        closed = False
    return status, bytes(body), closed


def _recv(sock: ssl.SSLSocket) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""
    except TimeoutError:
        raise CheckFailed("no answer (timeout)") from None
