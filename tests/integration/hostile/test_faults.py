"""Faults (issue 9): the app's worker killed mid-request and mid-body, SIGHUP storms under load,
SIGTERM with slow requests in flight, kill -9 of the proxy while it writes certificates, and a
data_dir on a full filesystem when a renewal is due.

Everything is real: `tlsproxy run` processes supervising real uvicorn workers (examples/app.py
and the sink app), TLS clients on 127.0.0.1, signals sent to real pids. What a client may see
when the app dies under it: a complete, correct response (the proxy replayed an idempotent
request elsewhere), an error status (502, or 503 while no worker is up), or a connection that
ends without a complete message. Never a message that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.harness import REPO, AppProcess, ProxyProcess, tlsproxy
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, TlsConn

MIB = 1024 * 1024
SINK_APP = "tests.integration.proxy.apps.sink:app"


def worker_command(app: str) -> str:
    return (
        f"{sys.executable} -m uvicorn {app} --app-dir {REPO} --uds {{socket}} "
        "--no-access-log --log-level warning"
    )


def workers_config(*, grace: str = "5s", limits: str = "", server: str = "") -> str:
    """Two sites, each on one supervised worker: localhost -> examples/app.py, sink.test ->
    the sink app (reads a whole body before it answers)."""
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "localhost"
shutdown_grace = "{grace}"
{server}

[limits]
{limits}

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"

[[site]]
hosts = ["sink.test"]
tls = "internal"
upstream = "sink"

[upstream.app]
command = "{worker_command("examples.app:app")}"
workers = 1
health = "/healthz"
stop_timeout = "3s"

[upstream.sink]
command = "{worker_command(SINK_APP)}"
workers = 1
health = "/count"
stop_timeout = "3s"
"""


# --- reading what the client got ----------------------------------------------------------------


@dataclass
class Outcome:
    """What one request got: the status (None if no response head came), the body bytes that
    came, and whether the message was complete by its own framing."""

    status: int | None
    body: bytes = b""
    complete: bool = False
    ended_by: str = ""
    received: int = 0  # body bytes, kept or not
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def read_outcome(
    sock: ssl.SSLSocket,
    method: bytes = b"GET",
    *,
    keep_body: bool = True,
    on_body: Callable[[int], None] | None = None,
    timeout: float = 30.0,
) -> Outcome:
    """Read one response with an h11 client until it is complete or the connection ends.

    `on_body(total)` is called after each body piece (the tests kill a worker from it)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    outcome = Outcome(None)
    body = bytearray()
    total = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:  # e.g. closed short of the body
            outcome.ended_by = f"h11: {exc}"
            break
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(256 * 1024)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError) as exc:
                outcome.ended_by = f"{type(exc).__name__}: {exc}"
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            outcome.status = event.status_code
            outcome.headers = list(event.headers)
        elif isinstance(event, h11.Data):
            total += len(event.data)
            if keep_body:
                body += event.data
            if on_body is not None:
                on_body(total)
        elif isinstance(event, h11.EndOfMessage):
            outcome.complete = True
            break
        elif isinstance(event, h11.ConnectionClosed):
            outcome.ended_by = outcome.ended_by or "closed"
            break
    else:
        raise AssertionError(f"the response neither completed nor ended in {timeout} s")
    outcome.body = bytes(body)
    outcome.received = total
    outcome.ended_by = outcome.ended_by or ("complete" if outcome.complete else "?")
    return outcome


# --- the proxy's workers ------------------------------------------------------------------------

_READY = re.compile(r"(app|sink)-1: pid (\d+) ready")


def worker_pid(proxy: ProxyProcess, upstream: str, *, after: int | None = None) -> int:
    """The pid of the upstream's worker that became ready last (from the proxy's log), waiting
    up to 30 s for one other than `after` (a killed worker's replacement)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [int(p) for name, p in _READY.findall(proxy.log()) if name == upstream]
        if pids and pids[-1] != after and pid_alive(pids[-1]):
            return pids[-1]
        time.sleep(0.05)
    raise AssertionError(f"no ready {upstream} worker (other than {after}):\n{proxy.log()[-3000:]}")


def pid_alive(pid: int) -> bool:
    """Running (a zombie no longer counts: its parent just has not reaped it yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def children(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc (every thread's list)."""
    out: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out.update(int(p) for p in text.split())
    return out


def uvicorn_children(pid: int) -> set[int]:
    found = set()
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError):
            if b"uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
    return found


def status_pids(proxy: ProxyProcess) -> set[int]:
    """The worker pids `tlsproxy status` prints (the status file is rewritten every 2 s)."""
    result = tlsproxy("status", "-c", str(proxy.config_file))
    assert result.returncode == 0, result.stderr
    return {int(p) for p in re.findall(r"^\S+\s+(\d+)\s+up\b", result.stdout, re.M)}


def get_ok(proxy: Proxy, path: str, host: str = "localhost", timeout: float = 30) -> Outcome:
    """GET through the proxy (TLS to 127.0.0.1 with SNI `host`) until it answers 200: the
    upstream's worker may be restarting."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with proxy.conn(host) as conn:
                conn.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                outcome = read_outcome(conn.sock)
        except (ssl.SSLError, OSError) as exc:
            last = exc
        else:
            if outcome.complete and outcome.status == 200:
                return outcome
            last = outcome
        time.sleep(0.1)
    raise AssertionError(f"GET {path} never answered 200 (last: {last})")


def observed(what: str, outcome: Outcome) -> None:
    """One line for `pytest -s` and the issue's closing note: what the client saw."""
    print(
        f"\n[fault] {what}: status={outcome.status} complete={outcome.complete} "
        f"body={outcome.received} ended_by={outcome.ended_by}"
    )


def assert_honest(outcome: Outcome, complete_body: Callable[[bytes], bool] | None = None) -> None:
    """A killed app may cost the client its response, never its trust in one: either an error
    status, or a connection that ends short of the message, or (a replay) the whole right one."""
    if outcome.complete:
        assert outcome.status is not None
        if outcome.status in (502, 503, 504):
            return
        assert outcome.status == 200, outcome
        assert complete_body is not None and complete_body(outcome.body), (
            f"a complete-looking {outcome.status} with a wrong body "
            f"({outcome.received} bytes): {outcome.body[:200]!r}"
        )
    # else: the connection ended without a complete message: honest.


# --- the app's worker killed --------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers_proxy(make_module_proxy: MakeProxy) -> Proxy:
    return make_module_proxy(workers_config())


def kill_and_recover(proxy: Proxy, upstream: str, victim: int, path: str, host: str) -> None:
    """After the test killed `victim`: a new worker comes up and the next request succeeds."""
    replacement = worker_pid(proxy, upstream, after=victim)
    assert replacement != victim and not pid_alive(victim)
    get_ok(proxy, path, host)
    proxy.wait_for_log(rf"{upstream}-1: pid {victim} exited with signal SIGKILL", timeout=5)


def test_worker_killed_mid_request(workers_proxy: Proxy) -> None:
    proxy = workers_proxy
    victim = worker_pid(proxy, "app")
    with proxy.conn("localhost", timeout=30) as conn:
        conn.send(b"GET /slow/20 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        # The request waits in the app's asyncio.sleep; 1 s is ample for it to get there.
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        outcome = read_outcome(conn.sock)
        took = time.monotonic() - started
    observed(f"worker killed mid-request (answer after {took:.2f} s)", outcome)
    # No byte of the response had come: the proxy may replay a GET (a new worker answers all
    # of it) or answer an error; the client never waits for the 20 s it asked for.
    assert_honest(outcome, lambda body: b'"slept":20' in body)
    assert outcome.complete and outcome.status in (200, 502, 503), outcome
    assert took < 19, f"the client waited {took:.1f} s for a dead worker"
    kill_and_recover(proxy, "app", victim, "/", "localhost")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_worker_killed_mid_download(workers_proxy: Proxy, chunked: bool) -> None:
    proxy = workers_proxy
    victim = worker_pid(proxy, "app")
    size = 64 * MIB  # far more than the socket buffers between the app and the client
    query = "?chunked=1" if chunked else ""
    killed: list[int] = []

    def kill_after_first_mib(total: int) -> None:
        if not killed and total >= MIB:
            os.kill(victim, signal.SIGKILL)
            killed.append(total)

    with proxy.conn("localhost", timeout=30) as conn:
        conn.send(f"GET /bytes/{size}{query} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        outcome = read_outcome(conn.sock, keep_body=False, on_body=kill_after_first_mib)
    observed(f"worker killed mid-download ({'chunked' if chunked else 'length'})", outcome)
    assert killed, "the worker was never killed"
    assert outcome.status == 200
    assert not outcome.complete, f"a truncated body was framed as complete: {outcome.ended_by}"
    assert MIB <= outcome.received < size
    kill_and_recover(proxy, "app", victim, "/bytes/1000", "localhost")


def test_worker_killed_mid_upload_while_it_echoes(workers_proxy: Proxy) -> None:
    """The app (POST /echo) answers while the body still comes: the response has started when
    its worker dies, so the client's message must end incomplete."""
    proxy = workers_proxy
    victim = worker_pid(proxy, "app")
    size = 64 * MIB
    piece = bytes(range(256)) * 256  # 64 KiB
    with proxy.conn("localhost", timeout=30) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        sent = 0
        for _ in range(16):  # 1 MiB, then the echo must be flowing back
            conn.send(piece)
            sent += len(piece)
        killed: list[int] = []

        def kill_once(total: int) -> None:
            if not killed and total >= 256 * 1024:
                os.kill(victim, signal.SIGKILL)
                killed.append(total)

        # The client goes on sending (from this thread, between reads) until it cannot.
        conn.sock.settimeout(5)
        outcome = read_outcome(conn.sock, keep_body=True, on_body=kill_once)
    observed("worker killed mid-upload, echo started", outcome)
    assert killed, "the echo never started"
    assert outcome.status == 200 and not outcome.complete, outcome.ended_by
    assert outcome.received < size
    # What did come is the prefix of what was sent, byte for byte.
    assert outcome.body == (piece * (len(outcome.body) // len(piece) + 1))[: len(outcome.body)]
    kill_and_recover(proxy, "app", victim, "/", "localhost")


def test_worker_killed_mid_upload_before_it_answers(workers_proxy: Proxy) -> None:
    """The sink reads the whole body before it answers: its worker dies with no response byte
    out, and a POST is never replayed, so the client gets an error (502), not a 200."""
    proxy = workers_proxy
    victim = worker_pid(proxy, "sink")
    size = 64 * MIB
    piece = b"u" * 65536
    with proxy.conn("sink.test", timeout=30) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: sink.test\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0
        error: OSError | None = None
        try:
            while sent < size:
                conn.send(piece)
                sent += len(piece)
                if sent == 4 * MIB:
                    os.kill(victim, signal.SIGKILL)
        except (ssl.SSLError, OSError) as exc:  # the proxy may stop reading and close
            error = exc
        outcome = read_outcome(conn.sock)
    observed(f"worker killed mid-upload before answering (send error: {error})", outcome)
    assert sent >= 4 * MIB, f"the upload failed before the kill: {error}"
    # Not the sink's {"bytes": N}: there is no complete 200 for a body the app never got.
    assert outcome.status != 200 or not outcome.complete, outcome
    if outcome.status is not None:
        assert outcome.status in (502, 503), outcome
    kill_and_recover(proxy, "sink", victim, "/count", "sink.test")


# --- SIGHUP storm under load --------------------------------------------------------------------


def storm_config(app: AppProcess, variant: int) -> str:
    """The workers config plus a site on an existing server (direct.test). Variants differ in
    what a reload rebuilds: the access log format, a limit, and the direct upstream's pool
    settings (a changed upstream gets a new pool, the old one is retired)."""
    access = "text" if variant % 2 == 0 else "json"
    return (
        workers_config(
            server=f'access_log = "{access}"',
            limits=f'idle_timeout = "{30 + variant % 3}s"',
        )
        + f"""
[[site]]
hosts = ["direct.test"]
tls = "internal"
upstream = "direct"

[upstream.direct]
servers = ["{app.server}"]
keepalive_timeout = "{2 + variant % 2}s"
"""
    )


class Load:
    """A few client threads that check every answer; bounded by `stop` and a deadline."""

    def __init__(self, proxy: Proxy, seconds: float) -> None:
        self.proxy = proxy
        self.deadline = time.monotonic() + seconds
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.served: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        for target in (self._keepalive_get, self._keepalive_echo, self._slow, self._new_conns):
            thread = threading.Thread(target=self._run, args=(target,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def _going(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def _run(self, target: Callable[[], None]) -> None:
        while self._going():
            try:
                target()
            except Exception as exc:  # each kind below checks its own answers
                with self._lock:
                    self.errors.append(f"{target.__name__}: {type(exc).__name__}: {exc}")
                time.sleep(0.05)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.served[kind] += 1

    def _keepalive_get(self) -> None:
        with self.proxy.client() as client:
            while self._going():
                response = client.get(self.proxy.url("/"))
                assert response.status_code == 200, response.status_code
                assert response.json()["message"] == "Hello from behind tlsproxy"
                self._count("keepalive GET /")

    def _keepalive_echo(self) -> None:
        body = random.Random(9).randbytes(100_000)
        with self.proxy.client() as client:
            while self._going():
                response = client.post(self.proxy.url("/echo"), content=body)
                assert response.status_code == 200, response.status_code
                assert response.content == body, f"echo of {len(response.content)} bytes"
                self._count("keepalive POST /echo")

    def _slow(self) -> None:
        with self.proxy.client() as client:
            while self._going():
                response = client.get(self.proxy.url("/slow/0.3"))
                assert response.status_code == 200, response.status_code
                assert response.json()["slept"] == 0.3
                self._count("GET /slow/0.3")

    def _new_conns(self) -> None:
        while self._going():
            with self.proxy.conn("direct.test") as conn:
                conn.send(
                    b"GET /bytes/20000 HTTP/1.1\r\nHost: direct.test\r\nConnection: close\r\n\r\n"
                )
                response = conn.response()
            assert response.status == 200, response.status
            assert response.body == b"x" * 20000, len(response.body)
            self._count("new connection GET /bytes")


def test_sighup_storm_under_load(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(storm_config(example_app, 0))
    fds_before = len(os.listdir(f"/proc/{proxy.pid}/fd"))
    signals = 25
    with Load(proxy, seconds=60) as load:
        time.sleep(1.0)
        for n in range(1, signals + 1):
            # One reload in the middle sees a broken config: logged, the running one stays.
            text = "[server]\nno_such_key = 1\n" if n == 12 else storm_config(example_app, n)
            proxy.config_file.write_text(text)
            proxy.signal(signal.SIGHUP)
            if n == 12:  # reloads queue up: keep the broken file until one has read it
                proxy.wait_for_log("reload failed", timeout=20)
            time.sleep(0.2)
        # Every SIGHUP is a reload (serialised) and, with workers, a rolling restart (folded
        # into one more pass while one runs): wait until all of them are through.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            log = proxy.log()
            handled = log.count("reloaded ") + log.count("reload failed")
            if handled >= signals and not worker_rollout_running(log):
                break
            time.sleep(0.2)
        served_during = sum(load.served.values())
        time.sleep(1.0)  # and the proxy still serves afterwards
    log = proxy.log()
    print(f"\n[fault] SIGHUP storm: {dict(load.served)}; errors {len(load.errors)}")
    assert not load.errors, load.errors[:10]
    assert load.served["keepalive GET /"] and load.served["new connection GET /bytes"]
    assert sum(load.served.values()) > served_during > 0
    # Reloads run one at a time and each reads the file when its turn comes, so the queued
    # ones that ran while the broken file was there all failed; every SIGHUP was handled.
    failed, reloaded = log.count("reload failed"), log.count("reloaded ")
    print(f"[fault] SIGHUP storm: {reloaded} reloads, {failed} refused (the broken file)")
    assert failed >= 1 and failed + reloaded == signals, (failed, reloaded)
    assert log.rfind("reloaded ") > log.rfind("reload failed")
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]
    assert proxy.proc is not None and proxy.proc.poll() is None
    # The rolling restarts left one worker per upstream, no orphan of the replaced ones.
    assert len(uvicorn_children(proxy.pid)) == 2, uvicorn_children(proxy.pid)
    fds_after = len(os.listdir(f"/proc/{proxy.pid}/fd"))
    print(f"[fault] SIGHUP storm: proxy fds {fds_before} before, {fds_after} after")


def worker_rollout_running(log: str) -> bool:
    """Whether the last rolling restart the log mentions for any upstream is not done yet."""
    for upstream in ("app", "sink"):
        started = log.rfind(f"upstream {upstream}: rolling restart of")
        done = log.rfind(f"upstream {upstream}: rolling restart done")
        if started > done:
            return True
    return False
