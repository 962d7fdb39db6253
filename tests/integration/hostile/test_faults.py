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
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.harness import REPO, AppProcess, ProxyProcess, tlsproxy
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy

MIB = 1024 * 1024
SINK_APP = "tests.integration.proxy.apps.sink:app"


def worker_command(app: str) -> str:
    return (
        f"{sys.executable} -m uvicorn {app} --app-dir {REPO} --uds {{socket}} "
        "--no-access-log --log-level warning"
    )


def workers_config(
    *, grace: str = "5s", limits: str = "", server: str = "", stop_timeout: str = "3s"
) -> str:
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
stop_timeout = "{stop_timeout}"

[upstream.sink]
command = "{worker_command(SINK_APP)}"
workers = 1
health = "/count"
stop_timeout = "{stop_timeout}"
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
    ended: float = 0.0  # time.monotonic() when it completed or ended


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
    outcome.ended = time.monotonic()
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
    """The worker pids `tlsproxy status` prints (asked of the running proxy)."""
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
    signals = 22
    with Load(proxy, seconds=60) as load:
        time.sleep(1.0)
        for n in range(1, signals + 1):
            # One reload in the middle sees a broken config: logged, the running one stays.
            text = "[server]\nno_such_key = 1\n" if n == 11 else storm_config(example_app, n)
            proxy.config_file.write_text(text)
            proxy.signal(signal.SIGHUP)
            if n == 11:  # reloads queue up: keep the broken file until one has read it
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


# --- SIGTERM with slow requests in flight -------------------------------------------------------


def slow_clients(
    proxy: Proxy, seconds: float, count: int
) -> tuple[list[Outcome], list[threading.Thread]]:
    """`count` clients, each on its own connection, waiting for GET /slow/SECONDS."""
    outcomes: list[Outcome] = []
    ready = threading.Barrier(count + 1, timeout=30)

    def one() -> None:
        with proxy.conn("localhost", timeout=seconds + 30) as conn:
            conn.send(f"GET /slow/{seconds:g} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            ready.wait()
            outcomes.append(read_outcome(conn.sock, timeout=seconds + 30))

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    time.sleep(1.0)  # the requests reach the app and wait in its sleep
    return outcomes, threads


def refused(port: int) -> bool:
    """Whether a TCP connect to the port is refused (nothing listens any more). A reset is
    not counted: the listener was closing just then; the next try says."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def wait_for_status_pids(proxy: ProxyProcess, want: int) -> set[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError):
            pids = status_pids(proxy)
            if len(pids) == want:
                return pids
        time.sleep(0.2)
    raise AssertionError(f"`tlsproxy status` never showed {want} workers up")


def test_sigterm_lets_slow_requests_finish(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(workers_config(grace="15s"))
    assert proxy.proc is not None
    outcomes, threads = slow_clients(proxy, 4, count=3)
    proxy.signal(signal.SIGTERM)
    sent = time.monotonic()
    refused_at = None
    while time.monotonic() - sent < 3:
        if refused(proxy.port):
            refused_at = time.monotonic() - sent
            break
        time.sleep(0.05)
    returncode = proxy.proc.wait(30)
    exited = time.monotonic() - sent
    for thread in threads:
        thread.join(10)
    print(
        f"\n[fault] SIGTERM, 3 x /slow/4 in flight, grace 15 s: new connections refused after "
        f"{refused_at} s, {[o.status for o in outcomes]} at "
        f"{[round(o.ended - sent, 2) for o in outcomes]} s, exit {returncode} after "
        f"{exited:.2f} s"
    )
    assert refused_at is not None, "new connections were still accepted 3 s after SIGTERM"
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert outcome.complete and outcome.status == 200, outcome
        assert b'"slept":4' in outcome.body
        assert refused_at < outcome.ended - sent  # refused while requests were in flight
    assert returncode == 0, proxy.log()[-3000:]
    assert exited < 15, "the proxy waited out the grace although every request was done"
    log = proxy.log()
    assert "draining" in log and "shutdown_grace over" not in log
    assert "Traceback" not in log


def test_sigterm_cuts_requests_slower_than_the_grace(make_proxy: MakeProxy) -> None:
    # A worker still busy with a cut request is killed stop_timeout after its SIGTERM.
    proxy = make_proxy(workers_config(grace="2s", stop_timeout="1s"))
    assert proxy.proc is not None
    workers = wait_for_status_pids(proxy, 2)
    assert workers == uvicorn_children(proxy.pid)
    outcomes, threads = slow_clients(proxy, 60, count=3)
    proxy.signal(signal.SIGTERM)
    sent = time.monotonic()
    returncode = proxy.proc.wait(30)
    exited = time.monotonic() - sent
    for thread in threads:
        thread.join(10)
    print(
        f"\n[fault] SIGTERM, 3 x /slow/60 in flight, grace 2 s: clients got "
        f"{[(o.status, o.ended_by) for o in outcomes]} after "
        f"{[round(o.ended - sent, 2) for o in outcomes]} s; exit {returncode} after "
        f"{exited:.2f} s"
    )
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert outcome.status is None and not outcome.complete, outcome
        assert 1.5 < outcome.ended - sent < 12, "not cut at the grace"
    assert returncode == 0, proxy.log()[-3000:]
    assert "shutdown_grace over: closing 3 connection(s)" in proxy.log()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in workers), "orphan workers"


# --- kill -9 of the proxy while it writes certificates ------------------------------------------

CERT_SITES = 3


def certs_config(app: AppProcess, variant: int) -> str:
    """Three local-CA sites whose second name changes with `variant` (so a SIGHUP that brings a
    new variant issues three new leaves), and leaves that live 10 s (renewed every ~7 s)."""
    sites = "".join(
        f'[[site]]\nhosts = ["s{i}.test", "v{variant}.s{i}.test"]\ntls = "internal"\n'
        f'upstream = "app"\n\n'
        for i in range(CERT_SITES)
    )
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "s0.test"
shutdown_grace = "2s"
access_log = "off"

{sites}
[upstream.app]
servers = ["{app.server}"]

[local_ca]
leaf_lifetime = "10s"
"""


def crypto_workers(pid: int) -> set[int]:
    """The proxy's `python -m certs.crypto_worker` children (they write data_dir)."""
    found = set()
    for child in children(pid):
        with contextlib.suppress(FileNotFoundError):
            if b"certs.crypto_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
    return found


def spawn_proxy(config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(config), "--log-level", "info"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )


def data_files(data_dir: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file where certificates are written, temporary ones included."""
    found = {}
    for directory in [data_dir / "ca", *(data_dir / "certificates").glob("*")]:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    found[entry.path] = (stat.st_mtime_ns, stat.st_size)
    return found


def temp_files(files: dict[str, tuple[int, int]]) -> set[str]:
    """The temporary files of atomic writes (storage.write_atomic: `.NAME.*.tmp`)."""
    return {path for path in files if path.endswith(".tmp")}


def kill_when_issuing(
    proc: subprocess.Popen[bytes], data_dir: Path, rng: random.Random, nth: int, at_write: bool
) -> tuple[bool, bool]:
    """SIGKILL the proxy a random moment after its `nth` crypto worker started, or (with
    `at_write`) the moment anything changes where certificates are written (a temporary file
    appears, a file is replaced or grows), killing that crypto worker too: a crash of
    everything, as a power cut would be. Gives up waiting after 4 s. Returns (a crypto worker
    was running, a write of this round was under way) at the kill."""
    left_before = temp_files(data_files(data_dir))  # from earlier rounds' kills
    seen: set[int] = set()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= crypto_workers(proc.pid)
        if len(seen) >= nth:
            break
        time.sleep(0.005)
    if at_write:
        # Busy-wait (bounded): a write lasts about as long as its fsync, a few milliseconds.
        files = data_files(data_dir)
        while time.monotonic() < deadline and proc.poll() is None:
            if data_files(data_dir) != files:
                break
    else:
        time.sleep(rng.uniform(0, 0.25))
    writers = crypto_workers(proc.pid)
    proc.kill()
    if at_write:
        for pid in writers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    writing = bool(temp_files(data_files(data_dir)) - left_before)
    proc.wait(10)
    # A crypto worker left alone finishes its one job and exits; wait for that (bounded).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(pid_alive(p) for p in writers):
        time.sleep(0.05)
    for pid in writers:  # still there after 20 s: not ours to leave running
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return bool(writers), writing


def check_data_dir(data_dir: Path) -> tuple[int, list[Path]]:
    """Every PEM and key file parses, and every stored pair (current and previous) belongs
    together. Returns the number of files checked and the temporary files left behind."""
    checked = 0
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        if path.suffix == ".key" or path.name.startswith("key."):  # root.key, key.prev.pem
            serialization.load_pem_private_key(data, password=None)
            checked += 1
        elif path.suffix == ".pem":
            assert x509.load_pem_x509_certificates(data), f"{path}: no certificate"
            checked += 1
    for directory in (data_dir / "certificates").iterdir():
        for cert_name, key_name in (("cert.pem", "key.pem"), ("cert.prev.pem", "key.prev.pem")):
            cert_file, key_file = directory / cert_name, directory / key_name
            if not cert_file.exists() and not key_file.exists():
                continue
            leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            assert leaf.public_key() == key.public_key(), (
                f"{directory}: {key_name} is not the key of {cert_name}"
            )
    leftovers = [p for p in data_dir.rglob(".*.tmp")]
    return checked, leftovers


def test_kill_9_while_writing_certificates(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(certs_config(example_app, 0), start=False)
    config, log_file = proxy.config_file, proxy.dir / "killed.log"
    data_dir = config.parent / "data"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rounds = 6
    hits = writes = 0
    for n in range(rounds):
        at_write = n % 2 == 0
        proc = spawn_proxy(config, log_file)
        try:
            if n > 0:  # the first start creates the CA and three leaves: kill inside those
                deadline = time.monotonic() + 30
                while "listening https://" not in log_file.read_text().split("--- round")[-1]:
                    assert proc.poll() is None, log_file.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the proxy did not start after a kill"
                    time.sleep(0.05)
                config.write_text(certs_config(example_app, n))
                proc.send_signal(signal.SIGHUP)
            # A start's or reload's first crypto worker validates; the second issues and writes
            # every leaf that is due (one child for all of them, certs.manager).
            nth = rng.randint(1, 2) if n == 0 else 2
            hit, writing = kill_when_issuing(proc, data_dir, rng, nth, at_write)
            hits += hit
            writes += writing
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            with open(log_file, "a") as log:
                log.write(f"\n--- round {n} killed\n")
    checked, leftovers = check_data_dir(data_dir)
    print(
        f"\n[fault] kill -9 while writing certificates (seed {seed}): {rounds} kills, {hits} "
        f"with a crypto worker running, {writes} during an atomic write; {checked} PEM/key "
        f"files parse, {len(leftovers)} temporary files left behind"
    )
    assert hits >= rounds // 2, "the kills missed the crypto workers"
    assert writes >= 1, "no kill landed during an atomic write"
    # The restart serves: every site's chain verifies against the local CA's root.
    proxy.start()
    for i in range(CERT_SITES):
        for host in (f"s{i}.test", f"v{rounds - 1}.s{i}.test"):
            with proxy.conn(host) as conn:
                conn.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                assert conn.response().status == 200
    checked_after, leftovers_after = check_data_dir(data_dir)
    assert checked_after >= checked
    # What the killed writes left (they may hold private keys) is gone after the restart. A
    # temporary file seen now may be a renewal in progress (12 s leaves): it is renamed within
    # moments, while its writer lives.
    time.sleep(0.5)
    stale = [
        path
        for path in leftovers_after
        if path.exists() and not Path(f"/proc/{path.name.split('.')[-3]}").exists()
    ]
    assert stale == []


# --- a data_dir on a full filesystem ------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the test (needs root), unmounted after it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write one file until the filesystem says ENOSPC (it is a small tmpfs: bounded)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(100_000):
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler
    raise AssertionError("the tmpfs never filled up")


def served_leaf(proxy: Proxy, host: str = "localhost") -> x509.Certificate:
    """The leaf a new handshake gets (its chain verified against the local CA); the request
    on that connection must be answered too."""
    with proxy.conn(host) as conn:
        der = conn.sock.getpeercert(binary_form=True)
        conn.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert conn.response().status == 200
    assert der is not None
    return x509.load_der_x509_certificate(der)


def leaf_serial(proxy: Proxy, host: str = "localhost") -> int:
    return served_leaf(proxy, host).serial_number


def wait_until_due(leaf: x509.Certificate, slack: float = 0.3) -> None:
    """Sleep until a third of the leaf's lifetime is left (due by any reader's arithmetic,
    whatever the jitter of the background renewal)."""
    before, after = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    due = after - (after - before) / 3 + slack
    time.sleep(max(0.0, due - time.time()))
    assert time.time() < after - 1, "the leaf expired before the test got to it"


def certs_line(proxy: Proxy) -> str:
    result = tlsproxy("certs", "-c", str(proxy.config_file))
    assert result.returncode == 0, result.stderr
    return result.stdout


def short_leaf_config(app: AppProcess, lifetime: str) -> str:
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "localhost"
access_log = "off"

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"

[upstream.app]
servers = ["{app.server}"]

[local_ca]
leaf_lifetime = "{lifetime}"
"""


def test_full_data_dir_when_a_renewal_is_due(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    """The renewal fails (logged), the old leaf keeps serving, also across a SIGHUP while the
    disk is still full; once there is space, a reload issues a new leaf."""
    # Leaves of 12 s are due about 8 s after they are issued, and valid 4 s more.
    proxy = make_proxy(short_leaf_config(example_app, "12s"), start=False)
    with small_tmpfs(proxy.dir / "data", "1m") as data_dir:
        try:
            proxy.start()
            first = served_leaf(proxy)
            filler = fill(data_dir)
            failure = proxy.wait_for_log(r"certificate for localhost not renewed.*", timeout=30)
            print(f"\n[fault] full data_dir: {failure.group(0)}")
            assert "No space left on device" in failure.group(0)
            assert leaf_serial(proxy) == first.serial_number
            # A reload while it is still full cannot issue either; the old leaf stays.
            wait_until_due(first)
            mark = len(proxy.log())
            proxy.signal(signal.SIGHUP)
            reload = proxy.wait_for_log(r"(reload failed|reloaded ).*", timeout=20, start=mark)
            print(f"[fault] full data_dir, SIGHUP: {reload.group(0)}")
            assert leaf_serial(proxy) == first.serial_number
            # Space again: the next reload issues a new leaf, and new handshakes get it.
            filler.unlink()
            mark = len(proxy.log())
            proxy.signal(signal.SIGHUP)
            proxy.wait_for_log("reloaded ", timeout=20, start=mark)
            assert leaf_serial(proxy) != first.serial_number
            assert "Traceback" not in proxy.log()
        finally:
            proxy.stop()


def test_full_data_dir_error_shows_in_tlsproxy_certs(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(short_leaf_config(example_app, "10s"), start=False)
    with small_tmpfs(proxy.dir / "data", "1m") as data_dir:
        try:
            proxy.start()
            fill(data_dir)
            proxy.wait_for_log(r"certificate for localhost not renewed", timeout=30)
            status = certs_line(proxy)
            print(f"\n[fault] full data_dir, tlsproxy certs: {status.strip()}")
            assert "last_error=-" not in status, "the renewal error is not shown"
        finally:
            proxy.stop()


def test_restart_with_a_full_data_dir_serves_the_stored_leaf(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    """A proxy restarted while data_dir is full and its leaf is due (still valid): the leaf
    cannot be renewed, but the one stored can be served until it can."""
    proxy = make_proxy(short_leaf_config(example_app, "10s"), start=False)
    with small_tmpfs(proxy.dir / "data", "1m") as data_dir:
        try:
            proxy.start()
            first = served_leaf(proxy)
            assert proxy.stop() == 0
            fill(data_dir)
            wait_until_due(first)
            # start() reads "listening" from the log: the first run's log goes aside.
            proxy.log_file.rename(proxy.dir / "first-run.log")
            try:
                proxy.start()
            except RuntimeError as exc:  # exited at start-up
                raise AssertionError(f"no restart, full data_dir:\n{str(exc)[-2000:]}") from None
            assert leaf_serial(proxy) == first.serial_number
        finally:
            proxy.stop()
