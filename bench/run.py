#!/usr/bin/env python3
"""tlsproxy against nginx (one worker) as TLS terminators in front of the same fast upstream.

    python bench/run.py [--quick] [--duration 10] [--connections 50] [--profile]

Pinning on a 2-core machine: the terminator under test (nginx with ONE worker, or tlsproxy) runs
alone on core 0; the load side (wrk, the nginx upstream, this script) shares core 1. Never both
terminators at once. Each workload is measured as wrk sees it (requests/s, p99) and per
core-second of the terminator's own CPU (utime + stime from /proc/PID/stat of its processes),
because wrk shares its core with the upstream and may saturate before the terminator does.
HTTP/2 (issue 12) is driven by h2load the same way: many streams per connection, and one request
per new connection.
The end-to-end row puts examples/app.py (uvicorn, 2 workers) behind each terminator with
nothing pinned: the number a user of a 2-core machine feels.

Standard library only (plus nginx, wrk, h2load, openssl, redis-server and taskset as commands).
Everything listens on 127.0.0.1, lives in a temporary directory, runs for a bounded time, and
every process started here is stopped on exit, Ctrl-C or error. Results: a markdown table on
stdout, JSON in bench/results/ (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
HOST = "127.0.0.1"
SERVER_NAME = "localhost"
TERMINATOR_CPU = 0
LOAD_CPU = 1
SMALL_BODY = '{"message":"hello"}'
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_PROXY_CMD = "{python} -m proxy run -c {config}"
TERMINATORS = ("nginx", "tlsproxy")
# What --workloads can pick: the measured workloads, in the order they run, and "memory" (idle
# RSS and the idle-connection row, first round). --h2 picks the HTTP/2 rows and the HTTP/1.1
# rows they are compared with.
WORKLOADS = ("keepalive", "handshake", "bulk", "resume13", "resume12", "h2streams", "h2conn")
H2_WORKLOADS = ("keepalive", "h2streams", "h2conn")

# Targets from issues 2 and 11, as ratios tlsproxy / nginx(1 worker) unless absolute. The
# handshake and resumption targets are ratios to the floor (issue 11), in floor_markdown().
TARGETS = {
    "keepalive.per_core_second": (">=", 0.45),
    "bulk.per_core_second": (">=", 1.00),
    "e2e.rps": (">=", 0.85),
    "e2e.p99": ("<=", 1.30),
}
TARGET_HANDSHAKE_OF_FLOOR = 0.93
TARGET_RESUME_OF_FLOOR = 0.90
# Issue 11: keep-alive with the access log on, per core-second, over the same with it off.
TARGET_ACCESS_LOG_ON_OFF = 0.85
# Issue 12: tlsproxy's HTTP/2 requests per core-second with many streams per connection, over its
# own HTTP/1.1 keep-alive figure in the same run.
TARGET_H2_OF_KEEPALIVE = 0.60
# Issue 13: keep-alive with `[server] admin` on (metrics counted), over the same with it off,
# as the median of adjacent off/on pairs.
TARGET_METRICS_ON_OFF = 0.97
# Issue 16: keep-alive and full handshakes with `[storage] backend = "redis"`, over the same with
# "file", side by side; the workloads of that comparison, and their names in its lines.
TARGET_STORAGE_REDIS_FILE = 0.97
STORAGE_WORKLOADS = ("keepalive", "handshake")
SIDE_BY_SIDE_TITLES = {"keepalive": "keep-alive", "handshake": "full handshakes"}
# The access log formats each terminator writes in the "keepalive_log_*" runs.
ACCESS_LOGS = {"nginx": ("combined",), "tlsproxy": ("text", "json")}
TARGET_IDLE_RSS_MIB = 40.0
TARGET_PER_CONNECTION_KIB = 64.0


class BenchError(Exception):
    """A setup step failed; the message says which and where its log is."""


# --- processes ---------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if this script dies, even from SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    """Every process this script starts, each in its own process group, stopped in reverse."""

    def __init__(self, logdir: Path, pin: bool) -> None:
        self.logdir = logdir
        self.pin = pin
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], cpus: Sequence[int] | None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        argv = list(argv)
        if cpus is not None and self.pin:
            # taskset execs the command: the pid we get is the command's own.
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.running.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Whatever is left of its group (nginx or uvicorn workers of a leader that died first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = _read_stat(int(entry.name))
        except OSError:
            continue
        children.setdefault(stat[0], []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _read_stat(pid: int) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            ticks += _read_stat(pid)[1]
    return ticks / CLK_TCK


def core_busy_seconds() -> dict[int, float]:
    """Per core: seconds not idle (user, system, irq, softirq, steal) from /proc/stat."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(v) for v in values[:8]]
                busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return busy


def memory_kib(pids: Sequence[int]) -> dict[str, int]:
    """VmRSS and VmHWM summed over the processes (nginx: master + worker)."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0])
    return {"rss_kib": total["VmRSS"], "hwm_kib": total["VmHWM"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- clients -----------------------------------------------------------------------------------


def _client_context() -> ssl.SSLContext:
    # A benchmark client: the chain is checked once by the probe, not per connection.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Probe:
    status: int
    body: bytes
    cert_der: bytes | None = None
    version: str | None = None
    cipher: str | None = None


def http_get(port: int, path: str = "/", tls: bool = True, timeout: float = 3.0) -> Probe:
    request = f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((HOST, port), timeout=timeout) as raw:
        sock: Any = raw
        probe = Probe(0, b"")
        if tls:
            sock = _client_context().wrap_socket(raw, server_hostname=SERVER_NAME)
            probe.cert_der = sock.getpeercert(binary_form=True)
            probe.version = sock.version()
            probe.cipher = (sock.cipher() or ("?",))[0]
        sock.sendall(request.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, probe.body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    probe.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return probe


def wait_ready(
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    what: str,
    procs: Processes,
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{procs.log_tail(what)}")
        try:
            if check():
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise BenchError(f"{what} not ready after {timeout:.0f}s ({last}):\n{procs.log_tail(what)}")


async def _hold_idle_connections(
    port: int, count: int, measure: Callable[[], dict[str, int]]
) -> tuple[int, dict[str, int]]:
    """Open `count` TLS connections, one request each, keep them idle, measure, drop them."""
    ctx = _client_context()
    gate = asyncio.Semaphore(50)  # below the listen backlog: no SYN retransmit stalls
    # The writers, not just their transports: a StreamWriter closes its transport when collected.
    writers: list[asyncio.StreamWriter] = []
    request = f"GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\n\r\n".encode()

    async def one() -> bool:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=SERVER_NAME), 15
            )
            writers.append(writer)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), 15)
            return head.startswith(b"HTTP/1.1 200")

    try:
        outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        await asyncio.sleep(1.0)  # let the terminator free its handshake state
        still_open = sum(not w.transport.is_closing() for w in writers)
        measured = measure()
        ok = sum(o is True for o in outcomes)
        return min(ok, still_open), measured
    finally:
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(0.2)


# --- certificates ------------------------------------------------------------------------------

_KEY_OIDS = {
    # DER of the OIDs (tag, length, value) as they appear in a certificate's SubjectPublicKeyInfo.
    "ec": bytes.fromhex("06072a8648ce3d0201"),
    "rsa": bytes.fromhex("06092a864886f70d010101"),
    "ed25519": bytes.fromhex("06032b6570"),
}
_CURVE_OIDS = {
    "P-256": bytes.fromhex("06082a8648ce3d030107"),
    "P-384": bytes.fromhex("06052b81040022"),
}


def key_kind(cert_der: bytes) -> str:
    """The leaf's key type ("ec:P-256", "rsa", ...): handshake cost depends on it."""
    for kind, oid in _KEY_OIDS.items():
        if oid in cert_der:
            if kind == "ec":
                curve = next((c for c, o in _CURVE_OIDS.items() if o in cert_der), "P-256")
                return f"ec:{curve}"
            return kind
    return "ec:P-256"


def _newkey_args(kind: str) -> list[str]:
    if kind.startswith("ec:"):
        return ["-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{kind[3:]}"]
    if kind == "rsa":
        return ["-newkey", "rsa:2048"]
    return ["-newkey", kind]


def served_chain_length(port: int) -> int:
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{HOST}:{port}",
            "-servername",
            SERVER_NAME,
            "-showcerts",
        ],
        input=b"",
        capture_output=True,
        timeout=10,
        check=False,
    ).stdout
    return max(out.count(b"-----BEGIN CERTIFICATE-----"), 1)


def make_chain(directory: Path, kind: str, chain_length: int) -> tuple[Path, Path]:
    """A root, an intermediate when `chain_length` > 1, and a leaf for localhost; nginx serves
    the leaf and the intermediate, like tlsproxy's local CA does."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, capture_output=True, check=True)

    def issue(name: str, subject: str, issuer: str, extensions: str) -> None:
        openssl(
            "req",
            "-new",
            *_newkey_args(kind),
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
        )
        (directory / f"{name}.ext").write_text(extensions)
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{issuer}.pem",
            "-CAkey",
            f"{issuer}.key",
            "-set_serial",
            str(int.from_bytes(os.urandom(8), "big")),
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
        )

    openssl(
        "req",
        "-x509",
        "-new",
        *_newkey_args(kind),
        "-nodes",
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-subj",
        "/CN=bench root",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    issuer = "root"
    if chain_length > 1:
        issue(
            "intermediate",
            "/CN=bench intermediate",
            "root",
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        issuer = "intermediate"
    issue(
        "leaf",
        f"/CN={SERVER_NAME}",
        issuer,
        f"subjectAltName=DNS:{SERVER_NAME},IP:{HOST}\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n",
    )
    chain = directory / "chain.pem"
    parts = [directory / "leaf.pem"] + (
        [directory / "intermediate.pem"] if chain_length > 1 else []
    )
    chain.write_bytes(b"".join(p.read_bytes() for p in parts))
    return chain, directory / "leaf.key"


# --- wrk ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    path: str
    connections: int
    headers: tuple[str, ...] = ()
    resume_tls: str | None = None  # "1.3" or "1.2": bench/resume.py instead of wrk
    # HTTP/2 with h2load instead of wrk: this many concurrent streams per connection, or 0 for
    # one request per new connection (issue 12).
    h2_streams: int | None = None


def run_load(
    port: int, workload: Workload, duration: float, cpus: Sequence[int] | None, pin: bool
) -> dict[str, Any]:
    if workload.resume_tls is not None:
        return run_resume(port, workload, duration, cpus, pin)
    if workload.h2_streams is not None:
        return run_h2load(port, workload, duration, cpus, pin)
    return run_wrk(port, workload, duration, cpus, pin)


# bench/resume.py's client, set from --resume-client.
RESUME_CLIENT = ["openssl"]


def run_resume(
    port: int, workload: Workload, duration: float, cpus: Sequence[int] | None, pin: bool
) -> dict[str, Any]:
    """bench/resume.py: each new connection resumes the session of the one before."""
    argv = [
        sys.executable, str(BENCH / "resume.py"), "--port", str(port), "--server-name",
        SERVER_NAME, "--path", workload.path, "--tls", str(workload.resume_tls),
        "--duration", f"{max(duration, 1):.0f}", "--procs", str(workload.connections),
        "--client", RESUME_CLIENT[0],
    ]  # fmt: skip
    if cpus is not None and pin:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    return _load_result(
        subprocess.run(argv, capture_output=True, timeout=duration + 90, check=False), "resume"
    )


def _load_result(done: subprocess.CompletedProcess[bytes], what: str) -> dict[str, Any]:
    out = done.stdout.decode(errors="replace")
    line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"{what} failed ({done.returncode}): {out}{done.stderr.decode()}")
    return _result(json.loads(line.removeprefix("BENCH_JSON ")))


def _result(raw: dict[str, Any]) -> dict[str, Any]:
    """A load client's figures (wrk's report.lua line, or the same shape) as the bench's:
    durations and latencies in microseconds in, seconds and milliseconds out."""
    seconds = raw.get("seconds") or raw["duration_us"] / 1e6
    result = {
        "requests": raw["requests"],
        "seconds": seconds,
        "bytes": raw["bytes"],
        "errors": {k: v for k, v in raw["errors"].items() if v},
        "rps": raw["requests"] / seconds,
        "mib_per_s": raw["bytes"] / MIB / seconds,
        "latency_ms": {k: v / 1000 for k, v in raw["latency_us"].items()},
    }
    if "resumed" in raw:
        result["resumed"] = raw["resumed"]
    return result


def run_wrk(
    port: int, workload: Workload, duration: float, cpus: Sequence[int] | None, pin: bool
) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{workload.connections}",
        f"-d{max(duration, 1):.0f}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(BENCH / "report.lua"),
        "-H",
        f"Host: {SERVER_NAME}",
    ]
    for header in workload.headers:
        argv += ["-H", header]
    argv.append(f"https://{HOST}:{port}{workload.path}")
    if cpus is not None and pin:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    done = subprocess.run(argv, capture_output=True, timeout=duration + 60, check=False)
    return _load_result(done, "wrk")


# The many-streams workload runs h2load count-based, one invocation after another, each sized to
# last about this long at the rate seen so far (see run_h2load).
H2LOAD_RUN_S = 2.0
# h2load's summary lines; each must be there (one pattern, one line each).
_H2LOAD_SUMMARY = re.compile(
    r"^TLS Protocol: (?P<tls_version>\S+)$.*"
    r"^Application protocol: (?P<alpn>\S+)$.*"
    r"^requests: \d+ total, \d+ started, \d+ done, (?P<succeeded>\d+) succeeded, "
    r"(?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout$.*"
    r"^status codes: \d+ 2xx, \d+ 3xx, (?P<c4xx>\d+) 4xx, (?P<c5xx>\d+) 5xx$.*"
    r"^traffic: \S+ \((?P<bytes>\d+)\) total",
    re.M | re.S,
)


def _h2load_once(argv: list[str], timeout: float) -> dict[str, Any]:
    """One h2load run's counts, from its summary. A run that did not negotiate h2 is an error:
    h2load would fall back to HTTP/1.1 and measure that."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"h2load still running after {timeout:.0f} s: {shlex.join(argv)}") from exc
    out = done.stdout.decode(errors="replace")
    found = _H2LOAD_SUMMARY.search(out)
    if done.returncode != 0 or found is None or found["alpn"] != "h2":
        raise BenchError(
            f"h2load failed ({done.returncode}; expected ALPN h2): {out[-1500:]}"
            f"{done.stderr.decode(errors='replace')[-500:]}"
        )
    counts: dict[str, Any] = {
        k: int(v) for k, v in found.groupdict().items() if k not in ("alpn", "tls_version")
    }
    counts["status"] = counts.pop("c4xx") + counts.pop("c5xx")
    return {**counts, "alpn": found["alpn"], "tls_version": found["tls_version"]}


def _percentiles(values: list[int]) -> dict[str, float]:
    """wrk's latency figures (mean, p50, p90, p99, max) of a list of microseconds."""
    if not values:
        return {}
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(int(len(values) * q), len(values) - 1)]

    mean = sum(values) / len(values)
    return {"mean": mean, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": values[-1]}


def run_h2load(
    port: int, workload: Workload, duration: float, cpus: Sequence[int] | None, pin: bool
) -> dict[str, Any]:
    """HTTP/2 load: h2load runs back to back until `duration` is spent, each count-based (-n),
    so every stream it starts is finished and a failure is a real one (h2load's timed mode
    counts the streams it abandons at the end as failed).

    Many streams (h2_streams > 0): `connections` connections with that many streams in flight
    each; each run re-opens its connections, sized to last about H2LOAD_RUN_S at the rate seen
    so far, so the handshakes are a few per thousands of requests. One request per connection
    (h2_streams == 0): each run is `-c N -n N`, N new connections at once, each a TLS handshake,
    the h2 preface and SETTINGS exchange, one request, and the close."""
    streams = workload.h2_streams or 1
    in_flight = workload.connections * streams
    requests = in_flight if workload.h2_streams == 0 else in_flight * 20
    base = [
        "h2load", "-t1", f"-c{workload.connections}", f"-m{streams}",
        "--npn-list", "h2", "--connect-to", f"{HOST}:{port}",
        "-N", "10s",  # like wrk's --timeout
        *(arg for header in workload.headers for arg in ("-H", header)),
    ]  # fmt: skip
    if cpus is not None and pin:
        base = ["taskset", "-c", ",".join(map(str, cpus)), *base]
    url = f"https://{SERVER_NAME}:{port}{workload.path}"
    totals: Counter[str] = Counter()
    latencies_us: list[int] = []
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tlsproxy-bench-h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        started = time.monotonic()
        deadline = started + max(duration, 1.0)
        while True:
            ran = time.monotonic()
            counts = _h2load_once(
                [*base, f"-n{requests}", "--log-file", str(log), url], H2LOAD_RUN_S * 2 + 60
            )
            seen = {"alpn": counts.pop("alpn"), "tls_version": counts.pop("tls_version")}
            totals.update(counts)
            totals["runs"] += 1
            # Per request: start (us since the epoch), status (-1: failed), microseconds to
            # the end of the response.
            for line in log.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) >= 3 and fields[1] != "-1":
                    latencies_us.append(int(fields[2]))
            now = time.monotonic()
            if now >= deadline:
                break
            if workload.h2_streams:
                rate = counts["succeeded"] / max(now - ran, 1e-3)
                requests = max(in_flight * 4, int(rate * min(deadline - now, H2LOAD_RUN_S)))
    result = _result(
        {
            "seconds": time.monotonic() - started,
            "requests": totals["succeeded"],
            "bytes": totals["bytes"],
            "errors": {k: totals[k] for k in ("failed", "errored", "timeout", "status")},
            "latency_us": _percentiles(latencies_us),
        }
    )
    return {**result, **seen, "h2load_runs": totals["runs"]}


def measure(
    pids: Sequence[int],
    port: int,
    workload: Workload,
    duration: float,
    cpus: Sequence[int] | None,
    pin: bool,
) -> dict[str, Any]:
    before, cores_before = cpu_seconds(pids), core_busy_seconds()
    result = run_load(port, workload, duration, cpus, pin)
    cpu = cpu_seconds(pids) - before
    cores = core_busy_seconds()
    result["terminator_cpu_s"] = cpu
    result["terminator_cores_busy"] = cpu / result["seconds"]
    # How busy each core was, whoever used it: core 0 well above the terminator's own share
    # means something else ran there (or softirq work); core 1 near 1.00 means the load side
    # (wrk + upstream) was the limit.
    result["core_busy"] = {
        str(n): (cores[n] - cores_before.get(n, 0.0)) / result["seconds"] for n in sorted(cores)
    }
    # The unit the issue's targets are stated in: work per second of the terminator's CPU.
    work = result["bytes"] / MIB if workload.name == "bulk" else result["requests"]
    result["per_core_second"] = work / cpu if cpu > 0 else None
    return result


def _nginx_http2() -> dict[str, str]:
    """nginx-tls.conf's HTTP/2 switch for the installed nginx: `http2 on;` from 1.25.1, the
    listen parameter (deprecated there) before."""
    done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr + done.stdout)
    version = tuple(map(int, found.groups())) if found else (0, 0, 0)
    if version >= (1, 25, 1):
        return {"LISTEN_HTTP2": "", "HTTP2_ON": "http2 on;"}
    return {"LISTEN_HTTP2": " http2", "HTTP2_ON": ""}


# --- the bench ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.pin = procs.pin
        self.terminator_cpus = [TERMINATOR_CPU] if self.pin else None
        self.load_cpus = [LOAD_CPU] if self.pin else None
        self.upstream_port = free_port()
        self.app_port = free_port()
        self.port = free_port()
        self.chain = self.key = Path()
        self.tls_info: dict[str, Any] = {}
        self.workloads = (
            Workload("keepalive", "keep-alive, small response", "/", args.connections),
            Workload(
                "handshake",
                "one request per new TLS connection",
                "/",
                args.connections,
                ("Connection: close",),
            ),
            Workload("bulk", "1 MiB responses", "/1m", args.bulk_connections),
            Workload(
                "resume13",
                "TLS 1.3 resumption (tickets), one request per connection",
                "/",
                args.resume_clients,
                resume_tls="1.3",
            ),
            Workload(
                "resume12",
                "TLS 1.2 resumption (session tickets), one request per connection",
                "/",
                args.resume_clients,
                resume_tls="1.2",
            ),
            Workload(
                "h2streams",
                f"HTTP/2, {args.h2_connections} connections x {args.h2_streams} streams",
                "/",
                args.h2_connections,
                h2_streams=args.h2_streams,
            ),
            Workload(
                "h2conn",
                "HTTP/2, one request per new TLS connection",
                "/",
                args.connections,
                h2_streams=0,
            ),
        )
        (tmp / "tmp").mkdir()
        (tmp / "www").mkdir()
        (tmp / "www" / "1m").write_bytes(os.urandom(MIB))

    # configs

    def _nginx_conf(self, template: str, name: str, **values: object) -> Path:
        text = (BENCH / template).read_text()
        values = {
            "USER": "user root;" if os.geteuid() == 0 else "",
            "DIR": self.tmp,
            "SMALL_BODY": SMALL_BODY + "\\n",
            **values,
        }
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        path = self.tmp / name
        path.write_text(text)
        return path

    def _tlsproxy_conf(
        self,
        upstream_port: int,
        name: str,
        access_log: str = "off",
        admin: int | None = None,
        port: int | None = None,
        storage: str = "",
        data_dir: Path | None = None,
    ) -> Path:
        """`storage`: the body of a [storage] table ("": none, files in data_dir)."""
        path = self.tmp / name
        admin_line = f'admin = "{HOST}:{admin}"' if admin is not None else ""
        storage_table = f"\n[storage]\n{storage}\n" if storage else ""
        path.write_text(
            f"""[server]
https = ["{HOST}:{self.port if port is None else port}"]
http = []
{admin_line}
data_dir = "{data_dir or self.tmp / "tlsproxy-data"}"
default_site = "{SERVER_NAME}"
access_log = "{access_log}"
log_level = "warning"
shutdown_grace = "2s"

[[site]]
hosts = ["{SERVER_NAME}"]
tls = "internal"
upstream = "app"

[upstream.app]
servers = ["{HOST}:{upstream_port}"]
{storage_table}"""
        )
        return path

    # processes

    def start_upstream(self) -> None:
        conf = self._nginx_conf("nginx-upstream.conf", "upstream.conf", PORT=self.upstream_port)
        proc = self.procs.start("upstream", self._nginx_argv(conf), self.load_cpus)

        def ready() -> bool:
            return http_get(self.upstream_port, tls=False).status == 200

        wait_ready(ready, proc, "upstream", self.procs)

    def _nginx_argv(self, conf: Path) -> list[str]:
        return [
            "nginx",
            "-p",
            str(self.tmp),
            "-e",
            str(self.tmp / f"{conf.stem}-early.log"),
            "-c",
            str(conf),
        ]

    def start_app(self) -> None:
        argv = [
            self.args.python,
            "-m",
            "uvicorn",
            "examples.app:app",
            "--host",
            HOST,
            "--port",
            str(self.app_port),
            "--workers",
            "2",
            "--proxy-headers",
            "--forwarded-allow-ips",
            HOST,
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        proc = self.procs.start("app", argv, [TERMINATOR_CPU, LOAD_CPU], cwd=REPO)

        def ready() -> bool:
            return http_get(self.app_port, "/healthz", tls=False).status == 200

        wait_ready(ready, proc, "app", self.procs, timeout=60)

    def start_terminator(
        self,
        which: str,
        upstream_port: int,
        cpus: Sequence[int] | None,
        access_log: str = "off",
        admin: int | None = None,
        name: str | None = None,
        port: int | None = None,
        storage: str = "",
        data_dir: Path | None = None,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """`access_log`: "off", or the format to log in (nginx: "combined", unbuffered, to a
        file; tlsproxy: "text" or "json", to its stdout, a file here too). `admin`: tlsproxy's
        admin port (metrics on), None for off. `name`: its config file's, `port` its own
        (default self.port), when two run. `storage`, `data_dir`: tlsproxy's (_tlsproxy_conf).
        `wait`: return once it serves (else call wait_terminator)."""
        port = self.port if port is None else port
        if which == "floor":
            argv = [
                self.args.python, str(BENCH / "floor.py"), "--cert", str(self.chain),
                "--key", str(self.key), "--port", str(port),
                "--upstream", f"{HOST}:{upstream_port}",
            ]  # fmt: skip
        elif which == "nginx":
            conf = self._nginx_conf(
                "nginx-tls.conf",
                "tls.conf",
                PORT=port,
                UPSTREAM_PORT=upstream_port,
                CHAIN=self.chain,
                KEY=self.key,
                **_nginx_http2(),
                ACCESS_LOG="access_log off;"
                if access_log == "off"
                else f"access_log {self.tmp / 'logs' / 'nginx-access.log'} {access_log};",
            )
            argv = self._nginx_argv(conf)
        else:
            conf = self._tlsproxy_conf(
                upstream_port,
                f"{name or f'tlsproxy-{upstream_port}'}.toml",
                access_log=access_log,
                admin=admin,
                port=port,
                storage=storage,
                data_dir=data_dir,
            )
            argv = shlex.split(
                self.args.proxy_cmd.format(
                    python=self.args.python,
                    config=conf,
                    port=port,
                    dir=self.tmp,
                    upstream=f"{HOST}:{upstream_port}",
                    chain=self.chain,
                    key=self.key,
                )
            )
        proc = self.procs.start(which, argv, cpus, cwd=REPO)
        if wait:
            self.wait_terminator(proc, which, port)
        return proc

    def wait_terminator(self, proc: subprocess.Popen[bytes], which: str, port: int) -> None:
        def ready() -> bool:
            return http_get(port).status == 200

        wait_ready(ready, proc, which, self.procs, timeout=60)

    # phases

    def prepare_certificates(self) -> None:
        """nginx gets a chain like the one tlsproxy serves (key type and length)."""
        kind, length = "ec:P-256", 2
        if "tlsproxy" in self.args.only:
            proc = self.start_terminator("tlsproxy", self.upstream_port, self.terminator_cpus)
            try:
                probe = http_get(self.port)
                assert probe.cert_der is not None
                kind, length = key_kind(probe.cert_der), served_chain_length(self.port)
                self.tls_info["tlsproxy"] = {
                    "key": kind,
                    "chain": length,
                    "version": probe.version,
                    "cipher": probe.cipher,
                }
            finally:
                self.procs.stop(proc)
        self.chain, self.key = make_chain(self.tmp / "certs", kind, length)
        self.tls_info["nginx"] = {"key": kind, "chain": length}

    def micro(self, which: str, first: bool) -> dict[str, Any]:
        proc = self.start_terminator(which, self.upstream_port, self.terminator_cpus)
        try:
            pids = process_tree(proc.pid)
            probe = http_get(self.port)
            self.tls_info.setdefault(which, {}).update(version=probe.version, cipher=probe.cipher)
            result: dict[str, Any] = {"processes": len(pids)}
            memory = first and "memory" in self.args.workloads
            if memory:
                result["memory"] = self.idle_memory(pids)
            for workload in self.workloads:
                if workload.name not in self.args.workloads:
                    continue
                if which == "floor" and workload.h2_streams is not None:
                    continue  # the floor offers only http/1.1
                if self.args.warmup > 0:
                    run_load(self.port, workload, self.args.warmup, self.load_cpus, self.pin)
                result[workload.name] = measure(
                    pids, self.port, workload, self.args.duration, self.load_cpus, self.pin
                )
                self._say(f"  {which} {workload.name}: {_brief(result[workload.name])}")
            if memory:
                result["memory"]["peak_kib"] = memory_kib(pids)["hwm_kib"]
            if which == "tlsproxy" and first and self.args.profile:
                result["profile"] = self.profile(proc.pid)
            if first and self.args.perf:
                result["perf"] = self.perf(pids)
        finally:
            self.procs.stop(proc)
        for fmt in ACCESS_LOGS.get(which, ()) if self.args.access_log else ():
            result[f"keepalive_log_{fmt}"] = self.keepalive_logged(which, fmt)
        if (
            which == "tlsproxy"
            and first
            and self.args.metrics_pairs > 0
            and "keepalive" in self.args.workloads
        ):
            result["metrics_ab"] = self.metrics_pairs()
        if which == "tlsproxy" and first and storage_pairs_wanted(self.args):
            result["storage_ab"] = self.storage_pairs()
        return result

    def side_by_side(
        self,
        workloads: Sequence[Workload],
        runs: int,
        roles: tuple[str, str],
        arrange: Callable[[int, list[subprocess.Popen[bytes]]], None],
        ports: Sequence[int],
        count: Callable[[int], int] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Two tlsproxy processes side by side, one in each of `roles` (the reference, then the
        one measured against it): both on the terminator's cores, each loaded by its own load
        client at the same time with half the workload's connections, each measured in requests
        per second of its own CPU. Run at once, the two share whatever the machine does
        meanwhile (its throughput drifts by more than the 3% looked for between runs minutes
        apart). Two identical processes still differ by 1 to 3% here (an off/off trial), so
        the roles change sides each run, and the result per workload is the geometric mean of
        the runs (an even number): each process's own bias counts once for and once against.

        `arrange(b, procs)` leaves in `procs` the two processes, ready, serving `ports` in
        order, with roles[1] in process b (it starts them, or moves the roles between the
        running ones); whatever `procs` holds at the end is stopped. `count(b)`, when given,
        is read before and after each measured load and the difference kept as "counted"."""
        half = [dataclasses.replace(w, connections=max(1, w.connections // 2)) for w in workloads]
        pairs: dict[str, list[dict[str, Any]]] = {w.name: [] for w in workloads}
        procs: list[subprocess.Popen[bytes]] = []
        reference, measured = roles
        try:
            for n in range(max(2, runs + runs % 2)):
                b = n % 2
                arrange(b, procs)
                pids = [process_tree(proc.pid) for proc in procs]
                for workload in half:
                    if self.args.warmup > 0:
                        self._load_both(ports, workload, self.args.warmup)
                    counted_before = count(b) if count else 0
                    before = [cpu_seconds(p) for p in pids]
                    results = self._load_both(ports, workload, self.args.duration)
                    rates = []
                    for i, result in enumerate(results):
                        cpu = cpu_seconds(pids[i]) - before[i]
                        rates.append(result["requests"] / cpu if cpu > 0 else None)
                    run: dict[str, Any] = {
                        f"{measured}_process": b,
                        reference: rates[1 - b],
                        measured: rates[b],
                        "requests": results[b]["requests"],
                    }
                    if count:
                        run["counted"] = count(b) - counted_before
                    errors = {roles[i == b]: r["errors"] for i, r in enumerate(results)}
                    if any(errors.values()):
                        run["errors"] = errors
                    a_rate, b_rate = run[reference], run[measured]
                    run["ratio"] = b_rate / a_rate if a_rate and b_rate else None
                    self._say(
                        f"  tlsproxy {SIDE_BY_SIDE_TITLES[workload.name]} side by side, "
                        f"{measured} in process {b}, run {n + 1}: {reference} "
                        f"{_per_second(a_rate)} / {measured} {_per_second(b_rate)} per core-second"
                    )
                    pairs[workload.name].append(run)
        finally:
            for proc in procs:
                self.procs.stop(proc)
        return {
            name: {"pairs": done, "ratio": _geometric_mean(done)} for name, done in pairs.items()
        }

    def metrics_pairs(self) -> dict[str, Any]:
        """Keep-alive side by side (side_by_side), one process with its metrics on ([server]
        admin), one without (issue 13: on / off >= 0.97); the metrics change sides by SIGHUP.
        After each run, one scrape checks that the "on" proxy counted its requests."""
        keepalive = next(w for w in self.workloads if w.name == "keepalive")
        ports = (free_port(), free_port())
        admins = (free_port(), free_port())

        def arrange(on: int, procs: list[subprocess.Popen[bytes]]) -> None:
            for i, port in enumerate(ports[len(procs) :], len(procs)):
                procs.append(
                    self.start_terminator(
                        "tlsproxy",
                        self.upstream_port,
                        self.terminator_cpus,
                        name=f"metrics{i}",
                        port=port,
                    )
                )
            self._metrics_on(procs, ports, admins, on)

        return self.side_by_side(
            [keepalive],
            self.args.metrics_pairs,
            ("off", "on"),
            arrange,
            ports,
            count=lambda on: counted_requests(admins[on]),
        )["keepalive"]

    def _metrics_on(
        self,
        procs: Sequence[subprocess.Popen[bytes]],
        ports: Sequence[int],
        admins: Sequence[int],
        on: int,
    ) -> None:
        """Metrics on in process `on` only (a SIGHUP to each), once both have reloaded."""
        for i, proc in enumerate(procs):
            self._tlsproxy_conf(
                self.upstream_port,
                f"metrics{i}.toml",
                admin=admins[i] if i == on else None,
                port=ports[i],
            )
            proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = []
            for i in range(len(procs)):
                try:
                    counted_requests(admins[i])
                    states.append(True)
                except OSError:
                    states.append(False)
            if states == [i == on for i in range(len(procs))]:
                return
            time.sleep(0.05)
        raise BenchError(f"the metrics did not move to process {on} within 20 s")

    def storage_pairs(self) -> dict[str, Any]:
        """Keep-alive and full handshakes side by side (side_by_side), one process with
        `[storage] backend = "file"`, one with "redis" on a redis-server started here (issue 16:
        redis / file >= 0.97, nothing on the hot path). A [storage] change needs a restart, so
        both processes restart each run with their backends swapped. Redis is seeded once from
        the file data_dir (`tlsproxy storage copy`), so that both serve the same certificate;
        each run checks that they do. The redis process keeps its working copy in a data_dir of
        its own."""
        workloads = [w for w in self.workloads if w.name in STORAGE_WORKLOADS]
        workloads = [w for w in workloads if w.name in self.args.workloads]
        ports = (free_port(), free_port())
        redis_port = free_port()
        redis_dir = self.tmp / "redis"
        redis_dir.mkdir(exist_ok=True)
        redis = self.procs.start(
            "redis",
            ["redis-server", "--port", str(redis_port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(redis_dir)],
            self.load_cpus,
        )  # fmt: skip
        try:
            wait_ready(lambda: redis_ping(redis_port), redis, "redis", self.procs)
            backends = {
                "file": ('backend = "file"', self.tmp / "tlsproxy-data"),
                "redis": (
                    f'backend = "redis"\nurl = "redis://{HOST}:{redis_port}/0"',
                    self.tmp / "tlsproxy-data-redis",
                ),
            }
            configs = [
                self._tlsproxy_conf(
                    self.upstream_port, f"storage-{backend}.toml", storage=storage, data_dir=data
                )
                for backend, (storage, data) in backends.items()
            ]
            copy = subprocess.run(
                [self.args.python, "-m", "proxy", "storage", "copy", "-c", str(configs[0]),
                 "--to-config", str(configs[1])],
                cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if copy.returncode != 0:
                raise BenchError(f"tlsproxy storage copy failed: {copy.stdout}{copy.stderr}")

            def arrange(on_redis: int, procs: list[subprocess.Popen[bytes]]) -> None:
                for proc in procs:
                    self.procs.stop(proc)
                procs.clear()

                # Both start at once, then are waited for: a restart is most of a quick run's
                # time. From this thread: PR_SET_PDEATHSIG (_die_with_parent) kills a child when
                # the thread that started it ends.
                for i, port in enumerate(ports):
                    storage, data = backends["redis" if i == on_redis else "file"]
                    procs.append(
                        self.start_terminator(
                            "tlsproxy",
                            self.upstream_port,
                            self.terminator_cpus,
                            name=f"storage{i}",
                            port=port,
                            storage=storage,
                            data_dir=data,
                            wait=False,
                        )
                    )
                for proc, port in zip(procs, ports, strict=True):
                    self.wait_terminator(proc, "tlsproxy", port)
                if len({http_get(port).cert_der for port in ports}) != 1:
                    raise BenchError("the file and the redis proxy serve different certificates")

            return self.side_by_side(
                workloads, self.args.storage_pairs, ("file", "redis"), arrange, ports
            )
        finally:
            self.procs.stop(redis)

    def _load_both(
        self, ports: Sequence[int], workload: Workload, duration: float
    ) -> list[dict[str, Any]]:
        """`workload` against each port at the same time, one load client each."""
        results: list[dict[str, Any]] = [{} for _ in ports]

        def one(i: int) -> None:
            results[i] = run_load(ports[i], workload, duration, self.load_cpus, self.pin)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ports))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def keepalive_logged(self, which: str, fmt: str) -> dict[str, Any]:
        """The keep-alive workload again, with the access log on (issue 11)."""
        proc = self.start_terminator(which, self.upstream_port, self.terminator_cpus, fmt)
        try:
            workload = next(w for w in self.workloads if w.name == "keepalive")
            if self.args.warmup > 0:
                run_load(self.port, workload, self.args.warmup, self.load_cpus, self.pin)
            result = measure(
                process_tree(proc.pid),
                self.port,
                workload,
                self.args.duration,
                self.load_cpus,
                self.pin,
            )
            self._say(f"  {which} keep-alive, access log {fmt}: {_brief(result)}")
            return result
        finally:
            self.procs.stop(proc)

    def idle_memory(self, pids: Sequence[int]) -> dict[str, Any]:
        idle = memory_kib(pids)["rss_kib"]
        count = self.args.idle_connections

        def rss() -> dict[str, int]:
            return memory_kib(pids)

        opened, loaded = asyncio.run(_hold_idle_connections(self.port, count, rss))
        delta = loaded["rss_kib"] - idle
        return {
            "idle_kib": idle,
            "idle_connections": opened,
            "with_connections_kib": loaded["rss_kib"],
            "per_connection_kib": delta / opened if opened else None,
        }

    def e2e(self, which: str) -> dict[str, Any]:
        both = [TERMINATOR_CPU, LOAD_CPU] if self.pin else None
        proc = self.start_terminator(which, self.app_port, both)
        try:
            workload = Workload("e2e", "example app", "/", self.args.connections)
            # Even in --quick: the app's first requests (both workers, new pooled connections)
            # are much slower than the rest and would decide a 1 s run.
            run_wrk(self.port, workload, max(self.args.warmup, 1.0), both, self.pin)
            result = measure(
                process_tree(proc.pid), self.port, workload, self.args.duration, both, self.pin
            )
            self._say(f"  {which} e2e: {_brief(result)}")
            return result
        finally:
            self.procs.stop(proc)

    def perf(self, pids: Sequence[int]) -> dict[str, Any]:
        """Where the terminator's CPU goes under load (--perf-workload), by library (the kernel,
        the Python interpreter, OpenSSL, uvloop, nginx) and by symbol, in microseconds per
        request."""
        if shutil.which("perf") is None:
            return {"error": "perf not installed"}
        data = self.tmp / f"perf-{pids[0]}.data"
        seconds = max(int(self.args.duration), 2)
        before = cpu_seconds(pids)
        recorder = subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", "999", "-o", str(data),
             "-p", ",".join(map(str, pids)), "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            workload = next(w for w in self.workloads if w.name == self.args.perf_workload)
            result = run_load(self.port, workload, seconds, self.load_cpus, self.pin)
            _, err = recorder.communicate(timeout=seconds + 30)
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.wait()
        cpu = cpu_seconds(pids) - before
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "-g", "none",
             "--stdio"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        shares = {}
        for line in report.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].endswith("%"):
                shares[parts[1]] = float(parts[0][:-1]) / 100
        if not shares:
            return {"error": f"perf recorded nothing: {err.decode(errors='replace')[-300:]}"}
        per_request_us = cpu / result["requests"] * 1e6 if result["requests"] else 0.0
        symbols = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "-g",
             "none", "--stdio"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        top = []
        for line in symbols.stdout.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0].endswith("%") and len(top) < 25:
                top.append(
                    (" ".join(parts[1].split()), float(parts[0][:-1]) / 100 * per_request_us)
                )
        return {
            "workload": self.args.perf_workload,
            "requests_per_s": result["rps"],
            "cpu_us_per_request": per_request_us,
            "us_per_request_by_dso": {k: v * per_request_us for k, v in shares.items()},
            "top_symbols_us": top,
        }

    def profile(self, pid: int) -> dict[str, Any]:
        """py-spy on the tlsproxy process under the keep-alive workload (a separate run)."""
        py_spy = shutil.which("py-spy") or str(Path(self.args.python).parent / "py-spy")
        if not Path(py_spy).exists():
            return {"error": "py-spy not found"}
        workload = next(w for w in self.workloads if w.name == self.args.profile_workload)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        out = self.args.out_dir / f"profile-{workload.name}-{stamp}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        seconds = max(int(self.args.duration), 2)
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                "raw",
                "--function",
                # --native shows the C frames (uvloop, OpenSSL, the kernel's share stays hidden)
                # but has to pause the process for each sample.
                *(["--native"] if self.args.profile_native else ["--nonblocking"]),
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            run_load(self.port, workload, seconds, self.load_cpus, self.pin)
            _, err = spy.communicate(timeout=seconds + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if not out.exists():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
        return {"file": str(out), "workload": workload.name, **top_costs(out.read_text())}

    @staticmethod
    def _say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def storage_pairs_wanted(args: argparse.Namespace) -> bool:
    return (
        args.storage_pairs > 0
        and "tlsproxy" in args.only
        and bool(set(STORAGE_WORKLOADS) & set(args.workloads))
    )


def redis_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def _geometric_mean(runs: Sequence[dict[str, Any]]) -> float | None:
    ratios = [r["ratio"] for r in runs if r["ratio"]]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None


def _per_second(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _brief(r: dict[str, Any]) -> str:
    errors = f" errors={r['errors']}" if r["errors"] else ""
    p99 = r["latency_ms"].get("p99")  # openssl s_time (the resumption client) gives none
    return (
        f"{r['rps']:.0f} req/s, {r['mib_per_s']:.1f} MiB/s,"
        f"{f' p99 {p99:.2f} ms,' if p99 is not None else ''}"
        f" terminator {r['terminator_cores_busy']:.2f} cores,"
        f" cores busy {' '.join(f'{v:.2f}' for v in r['core_busy'].values())}{errors}"
    )


def top_costs(collapsed: str, top: int = 10) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    rows = (
        [
            {"function": name, "self": n / total, "inclusive": inclusive[name] / total}
            for name, n in own.most_common(top)
        ]
        if total
        else []
    )
    return {"samples": total, "top_self": rows}


# --- summary -----------------------------------------------------------------------------------


def median_results(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload, the round with the median work per core-second (the unit of the targets,
    and the figure least moved by a busy load side); its other numbers stay consistent."""
    merged = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, dict) and "rps" in value:
            ordered = sorted((r[key] for r in rounds), key=lambda r: r["per_core_second"] or 0.0)
            merged[key] = {
                **ordered[len(ordered) // 2],
                "rounds_rps": [r[key]["rps"] for r in rounds],
                "rounds_per_core_second": [r[key]["per_core_second"] for r in rounds],
                # Core 0 time not spent by the terminator (other programs, softirq work):
                # a round where this is high was disturbed.
                "rounds_core0_other": [
                    r[key]["core_busy"].get(str(TERMINATOR_CPU), 0.0)
                    - r[key]["terminator_cores_busy"]
                    for r in rounds
                ],
            }
    return merged


def median_e2e(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The end-to-end run with the median requests/s (the whole machine is shared there, so
    single runs swing widely); every run's requests/s and p99 are kept beside it."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return {
        **ordered[len(ordered) // 2],
        "rounds_rps": [r["rps"] for r in runs],
        "rounds_p99_ms": [r["latency_ms"]["p99"] for r in runs],
    }


def spread(results: dict[str, Any]) -> list[str]:
    """One line per workload: work per core-second of every round, for both terminators."""
    lines = []
    for workload in (
        "keepalive",
        "handshake",
        "bulk",
        "resume13",
        "resume12",
        "h2streams",
        "h2conn",
        *(f"keepalive_log_{fmt}" for fmt in ("combined", "text", "json")),
    ):
        parts = []
        for which, result in results.items():
            per_round = result.get(workload, {}).get("rounds_per_core_second") or []
            if len(per_round) > 1:
                parts.append(f"{which} " + " / ".join(f"{v:,.0f}" for v in per_round if v))
        if parts:
            lines.append(f"- {workload}: " + "; ".join(parts))
    parts = []
    for which, result in results.items():
        e2e = result.get("e2e") or {}
        if len(e2e.get("rounds_rps") or []) > 1:
            runs = zip(e2e["rounds_rps"], e2e["rounds_p99_ms"], strict=True)
            parts.append(f"{which} " + " / ".join(f"{r:,.0f} (p99 {p:.1f})" for r, p in runs))
    if parts:
        lines.append("- e2e req/s (p99 ms): " + "; ".join(parts))
    return lines


def _get(results: dict[str, Any], which: str, *path: str) -> float | None:
    node: Any = results.get(which)
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparison as data: metric, both values, ratio, target and whether it is met."""
    spec = [
        ("keepalive", "rps", "keep-alive, small response: requests/s", "{:,.0f}"),
        ("keepalive", "latency_ms.p99", "keep-alive: p99 latency (ms)", "{:.2f}"),
        ("keepalive", "terminator_cores_busy", "keep-alive: terminator cores busy", "{:.2f}"),
        ("keepalive", "per_core_second", "keep-alive: requests per core-second", "{:,.0f}"),
        ("handshake", "rps", "new TLS connection per request: conn/s", "{:,.0f}"),
        ("handshake", "latency_ms.p99", "new connection: p99 latency (ms)", "{:.2f}"),
        ("handshake", "terminator_cores_busy", "new connection: terminator cores busy", "{:.2f}"),
        ("handshake", "per_core_second", "new connection: handshakes per core-second", "{:,.0f}"),
        ("bulk", "mib_per_s", "1 MiB responses: MiB/s", "{:,.0f}"),
        ("bulk", "terminator_cores_busy", "1 MiB responses: terminator cores busy", "{:.2f}"),
        ("bulk", "per_core_second", "1 MiB responses: MiB/s per core-second", "{:,.0f}"),
        ("resume13", "per_core_second", "TLS 1.3 resumed: handshakes per core-second", "{:,.0f}"),
        ("resume12", "per_core_second", "TLS 1.2 resumed: handshakes per core-second", "{:,.0f}"),
        ("h2streams", "rps", "HTTP/2, many streams per connection: requests/s", "{:,.0f}"),
        ("h2streams", "latency_ms.p99", "HTTP/2 many streams: p99 latency (ms)", "{:.2f}"),
        (
            "h2streams",
            "terminator_cores_busy",
            "HTTP/2 many streams: terminator cores busy",
            "{:.2f}",
        ),
        (
            "h2streams",
            "per_core_second",
            "HTTP/2 many streams: requests per core-second",
            "{:,.0f}",
        ),
        ("h2conn", "rps", "HTTP/2, one request per new TLS connection: conn/s", "{:,.0f}"),
        (
            "h2conn",
            "terminator_cores_busy",
            "HTTP/2 new connection: terminator cores busy",
            "{:.2f}",
        ),
        ("h2conn", "per_core_second", "HTTP/2 new connection: requests per core-second", "{:,.0f}"),
        ("memory", "idle_kib", "idle RSS (MiB)", "mib"),
        ("memory", "with_connections_kib", "RSS with the idle TLS connections (MiB)", "mib"),
        ("memory", "per_connection_kib", "RSS per idle TLS connection (KiB)", "{:.1f}"),
        ("memory", "peak_kib", "peak RSS, VmHWM (MiB)", "mib"),
        ("e2e", "rps", "end to end, example app, 2 uvicorn workers: req/s", "{:,.0f}"),
        ("e2e", "latency_ms.p99", "end to end: p99 latency (ms)", "{:.2f}"),
    ]
    out = []
    for section, field_path, title, fmt in spec:
        path = (section, *field_path.split("."))
        a, b = _get(results, "nginx", *path), _get(results, "tlsproxy", *path)
        if a is None and b is None:
            continue
        key = f"{section}.{field_path.split('.')[-1]}"
        target, met = TARGETS.get(key), None
        ratio = b / a if a and b is not None else None
        if target and ratio is not None:
            met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
        target_text = f"{target[0]} {target[1]:.2f}" if target else ""
        if field_path == "idle_kib" and b is not None:
            target_text, met = f"<= {TARGET_IDLE_RSS_MIB:.0f} MiB", b / 1024 <= TARGET_IDLE_RSS_MIB
        if field_path == "per_connection_kib" and b is not None:
            target_text = f"<= {TARGET_PER_CONNECTION_KIB:.0f} KiB"
            met = b <= TARGET_PER_CONNECTION_KIB
        out.append(
            {
                "metric": title,
                "nginx": a,
                "tlsproxy": b,
                "ratio": ratio,
                "target": target_text,
                "met": met,
                "format": fmt,
            }
        )
    return out


def floor_markdown(results: dict[str, Any], floor: dict[str, Any]) -> str:
    """Work per core-second of nginx, the floor and tlsproxy, and the two ratios that say how
    much of the gap to nginx is the architecture's and how much is tlsproxy's own work."""

    def show(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.2f}"

    lines = [
        "| per core-second | nginx | floor | tlsproxy | floor / nginx | tlsproxy / floor |",
        "|---|---|---|---|---|---|",
    ]
    targets = {"handshake": TARGET_HANDSHAKE_OF_FLOOR, "resume13": TARGET_RESUME_OF_FLOOR}
    targets["resume12"] = TARGET_RESUME_OF_FLOOR
    for workload, title in (
        ("keepalive", "keep-alive requests"),
        ("handshake", "new-connection requests"),
        ("bulk", "1 MiB responses: MiB"),
        ("resume13", "TLS 1.3 resumed handshakes"),
        ("resume12", "TLS 1.2 resumed handshakes"),
    ):
        n = _get(results, "nginx", workload, "per_core_second")
        f = _get({"floor": floor}, "floor", workload, "per_core_second")
        t = _get(results, "tlsproxy", workload, "per_core_second")
        mine = ratio(t, f)
        if workload in targets and t is not None and f:
            met = "met" if t / f >= targets[workload] else "NOT met"
            mine += f" (>= {targets[workload]:.2f}: {met})"
        lines.append(f"| {title} | {show(n)} | {show(f)} | {show(t)} | {ratio(f, n)} | {mine} |")
    return "\n".join(lines)


def h2_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12: each HTTP/2 workload per core-second, both terminators, tlsproxy / nginx; and
    for many streams, each terminator's figure over its own HTTP/1.1 keep-alive one of the same
    run (tlsproxy's: the target). The new-connection row has no HTTP/1.1 ratio: h2load cannot
    keep a terminator busy with new connections the way wrk does (see bench/README.md), and a
    busy terminator does more per core-second than an idle one."""
    out = []
    for h2, title in (
        ("h2streams", "many streams per connection"),
        ("h2conn", "one request per new TLS connection"),
    ):
        row: dict[str, Any] = {"metric": title, "workload": h2}
        for which in TERMINATORS:
            a = _get(results, which, h2, "per_core_second")
            b = _get(results, which, "keepalive", "per_core_second")
            row[which] = a
            if h2 == "h2streams":
                row[f"{which}_h2_over_keepalive"] = a / b if a is not None and b else None
        n, t = row["nginx"], row["tlsproxy"]
        row["ratio"] = t / n if t is not None and n else None
        if h2 == "h2streams":
            mine = row["tlsproxy_h2_over_keepalive"]
            row["target"] = f">= {TARGET_H2_OF_KEEPALIVE:.2f}"
            row["met"] = None if mine is None else mine >= TARGET_H2_OF_KEEPALIVE
        if n is not None or t is not None:
            out.append(row)
    return out


def h2_markdown(summary: list[dict[str, Any]]) -> str:
    def show(v: float | None, fmt: str = "{:,.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [
        "| HTTP/2, requests per core-second | nginx | tlsproxy | tlsproxy / nginx"
        " | nginx h2 / its keep-alive | tlsproxy h2 / its keep-alive | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        target = ""
        if "target" in row:
            mark = {True: " (met)", False: " (NOT met)", None: ""}[row["met"]]
            target = f"tlsproxy h2 / keep-alive {row['target']}{mark}"
        lines.append(
            f"| {row['metric']} | {show(row['nginx'])} | {show(row['tlsproxy'])}"
            f" | {show(row['ratio'], '{:.2f}')}"
            f" | {show(row.get('nginx_h2_over_keepalive'), '{:.2f}')}"
            f" | {show(row.get('tlsproxy_h2_over_keepalive'), '{:.2f}')} | {target} |"
        )
    return "\n".join(lines)


def counted_requests(admin_port: int) -> int:
    """tlsproxy_requests_total summed over its series, scraped from the admin endpoint."""
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tlsproxy_requests_total{")
        )
    )


def pairs_markdown(
    title: str,
    unit: str,
    roles: tuple[str, str],
    sections: Sequence[tuple[str, dict[str, Any]]],
    target: float,
) -> str:
    """A side-by-side comparison (Bench.side_by_side) as a table: each run's two rates and
    their ratio, then the geometric mean; `sections` are (row prefix, one workload's result)."""
    reference, measured = roles
    lines = [
        f"| {title} | {unit}, {reference} | {measured} | {measured} / {reference} |",
        "|---|---|---|---|",
    ]
    for prefix, ab in sections:
        for n, pair in enumerate(ab["pairs"], 1):
            ratio = f"{pair['ratio']:.3f}" if pair.get("ratio") else "-"
            lines.append(
                f"| {prefix}run {n} ({measured}: process {pair[f'{measured}_process']}) "
                f"| {_per_second(pair[reference])} | {_per_second(pair[measured])} | {ratio} |"
            )
        ratio = ab.get("ratio")
        if ratio is not None:
            met = "met" if ratio >= target else "NOT met"
            lines.append(
                f"| {prefix}geometric mean of the runs | | | **{ratio:.3f}** (target >= "
                f"{target}: {met}) |"
            )
    return "\n".join(lines)


def metrics_markdown(results: dict[str, Any]) -> str:
    """Issue 13: keep-alive per core-second with the metrics on, over off, pair by pair."""
    ab = results.get("tlsproxy", {}).get("metrics_ab")
    if not ab or not ab.get("pairs"):
        return ""
    return pairs_markdown(
        "metrics (`[server] admin`), side by side",
        "keep-alive per core-second",
        ("off", "on"),
        [("", ab)],
        TARGET_METRICS_ON_OFF,
    )


def storage_markdown(results: dict[str, Any]) -> str:
    """Issue 16: keep-alive and full handshakes per core-second with the redis storage
    backend, over the file backend, pair by pair."""
    ab = results.get("tlsproxy", {}).get("storage_ab") or {}
    sections = [
        (f"{SIDE_BY_SIDE_TITLES[name]}, ", ab[name])
        for name in STORAGE_WORKLOADS
        if ab.get(name, {}).get("pairs")
    ]
    if not sections:
        return ""
    return pairs_markdown(
        "storage (`[storage] backend`), side by side",
        "per core-second",
        ("file", "redis"),
        sections,
        TARGET_STORAGE_REDIS_FILE,
    )


def access_log_markdown(results: dict[str, Any]) -> str:
    """Keep-alive per core-second with each terminator's access log on, over the same with it
    off, in the same rounds (issue 11: tlsproxy's >= 0.85, text and json)."""
    lines = [
        "| access log | keep-alive per core-second, log off | log on | on / off | target |",
        "|---|---|---|---|---|",
    ]
    for which, formats in ACCESS_LOGS.items():
        off = _get(results, which, "keepalive", "per_core_second")
        for fmt in formats:
            on = _get(results, which, f"keepalive_log_{fmt}", "per_core_second")
            if on is None or not off:
                continue
            target = ""
            if which == "tlsproxy":
                met = "met" if on / off >= TARGET_ACCESS_LOG_ON_OFF else "NOT met"
                target = f">= {TARGET_ACCESS_LOG_ON_OFF:.2f} ({met})"
            lines.append(f"| {which}, {fmt} | {off:,.0f} | {on:,.0f} | {on / off:.2f} | {target} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown(table: list[dict[str, Any]]) -> str:
    def show(value: float | None, fmt: str) -> str:
        if value is None:
            return "-"
        return f"{value / 1024:.1f}" if fmt == "mib" else fmt.format(value)

    lines = [
        "| metric | nginx, 1 worker | tlsproxy | tlsproxy / nginx | target |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        mark = {True: " (met)", False: " (NOT met)", None: ""}[row["met"]]
        target = f"{row['target']}{mark}" if row["target"] else ""
        lines.append(
            f"| {row['metric']} | {show(row['nginx'], row['format'])} | "
            f"{show(row['tlsproxy'], row['format'])} | {ratio} | {target} |"
        )
    return "\n".join(lines)


def _versions(python: str) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        except OSError as exc:
            return str(exc)
        return (done.stdout or done.stderr).decode(errors="replace").strip().splitlines()[0]

    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
        "python": first_line([python, "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "commit": commit,
        "kernel": platform.release(),
    }


def _imports(python: str, module: str) -> bool:
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
    return done.returncode == 0


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round, 1 s per workload, no warm-up, 100 idle connections",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured workload")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (small bodies)")
    p.add_argument("--bulk-connections", type=int, default=10, help="wrk connections for 1 MiB")
    p.add_argument(
        "--resume-clients",
        type=int,
        default=6,
        help="client processes of the resumption workloads (bench/resume.py; default 6)",
    )
    p.add_argument(
        "--resume-client",
        choices=("openssl", "python"),
        default="openssl",
        help="the resumption workloads' client (bench/resume.py): openssl s_time (default; C,\n"
        "no SNI) or Python's ssl (with SNI, but too slow to keep the terminator busy)",
    )
    p.add_argument(
        "--h2-connections",
        type=int,
        default=2,
        help="h2load connections of the many-streams HTTP/2 workload (default 2)",
    )
    p.add_argument(
        "--h2-streams",
        type=int,
        default=25,
        help="concurrent streams per connection in that workload (default 25: 50 in flight,\n"
        "as many as the keep-alive workload's connections)",
    )
    p.add_argument(
        "--workloads",
        default=",".join((*WORKLOADS, "memory")),
        help="comma list of what to measure (default all): " + ", ".join(WORKLOADS) + ",\n"
        "memory (the RSS rows)",
    )
    p.add_argument(
        "--h2",
        action="store_true",
        help="only the HTTP/2 rows and the HTTP/1.1 rows they are compared with:\n"
        f"--workloads {','.join(H2_WORKLOADS)} --no-access-log --no-e2e",
    )
    p.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="skip the keep-alive runs with the access log on",
    )
    p.add_argument(
        "--metrics-pairs",
        type=int,
        default=4,
        help="keep-alive runs of two tlsproxy processes at once, metrics on in one of them\n"
        "([server] admin), swapped by SIGHUP each run; this many runs, made even (default 4;\n"
        "0 skips them)",
    )
    p.add_argument(
        "--storage-pairs",
        type=int,
        default=4,
        help="keep-alive and full-handshake runs of two tlsproxy processes at once, one with\n"
        '[storage] backend = "file", one with "redis" (a redis-server started here, seeded\n'
        "from the file data_dir), swapped by a restart each run; this many runs of each, made\n"
        "even (default 4; 0 skips them)",
    )
    p.add_argument(
        "--idle-connections",
        type=int,
        default=None,
        help="idle keep-alive TLS connections for the memory row (default 1000)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternate the terminators this many times (end to end too); report the median round"
        " (default 3)",
    )
    p.add_argument(
        "--only",
        default=",".join(TERMINATORS),
        help="comma list of terminators to run (nginx,tlsproxy)",
    )
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the example app row")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure bench/floor.py (uvloop + ssl relaying bytes, no HTTP work) in the\n"
        "same rounds: what this architecture costs before tlsproxy's own work",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also record a py-spy profile of tlsproxy under the keep-alive load",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="also a run under perf: CPU per request by library and top symbols, both terminators",
    )
    p.add_argument(
        "--perf-workload",
        choices=("keepalive", "handshake", "bulk", "h2streams", "h2conn"),
        default="keepalive",
        help="the workload --perf runs under (default keepalive)",
    )
    p.add_argument(
        "--profile-workload",
        choices=("keepalive", "handshake", "bulk", "h2streams", "h2conn"),
        default="keepalive",
        help="the workload --profile runs under (default keepalive)",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: include native frames (slower sampling, pauses the process)",
    )
    p.add_argument(
        "--proxy-cmd",
        default=DEFAULT_PROXY_CMD,
        help="command for the proxy under test; placeholders {python} {config} {port}"
        " {upstream} {chain} {key} {dir} (default: %(default)s)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for tlsproxy and uvicorn")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default bench/results/bench-TIME.json)",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    RESUME_CLIENT[0] = args.resume_client
    if args.quick:
        args.duration = min(args.duration, 1.0)
        args.idle_connections = args.idle_connections or 100
        args.warmup = 0.0 if args.warmup is None else args.warmup
        args.rounds = args.rounds or 1
        args.metrics_pairs = min(args.metrics_pairs, 2)
        args.storage_pairs = min(args.storage_pairs, 2)
    args.warmup = 2.0 if args.warmup is None else args.warmup
    args.idle_connections = args.idle_connections or 1000
    args.rounds = max(args.rounds or 3, 1)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    if args.h2:
        args.workloads, args.access_log, args.e2e = ",".join(H2_WORKLOADS), False, False
        args.metrics_pairs = args.storage_pairs = 0
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - {*WORKLOADS, "memory"}
    if unknown:
        p.error(f"--workloads: unknown workload(s) {', '.join(sorted(unknown))}")
    if args.h2_connections < 1 or args.h2_streams < 1:
        p.error("--h2-connections and --h2-streams must be at least 1")
    unknown = set(args.only) - set(TERMINATORS)
    if unknown:
        p.error(f"--only: unknown terminator(s) {', '.join(sorted(unknown))}")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    args.out = args.out or BENCH / "results" / f"bench-{stamp}.json"
    args.out_dir = args.out.parent
    return args


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
        )


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    needed = ["nginx", "wrk", "openssl"]
    if {"h2streams", "h2conn"} & set(args.workloads):
        needed.append("h2load")
    if storage_pairs_wanted(args):
        needed.append("redis-server")
    missing = [c for c in needed if shutil.which(c) is None]
    if missing:
        print(
            f"missing commands: {', '.join(missing)}"
            " (apt-get install -y nginx wrk openssl nghttp2-client redis-server;"
            " --storage-pairs 0 needs no redis-server)",
            file=sys.stderr,
        )
        return 2
    if storage_pairs_wanted(args) and not _imports(args.python, "redis"):
        print(
            f"{args.python} cannot import redis: pip install 'tlsproxy[redis]'"
            " (or --storage-pairs 0)",
            file=sys.stderr,
        )
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    pin = (
        len(cpus) >= 2 and {TERMINATOR_CPU, LOAD_CPU} <= set(cpus) and bool(shutil.which("taskset"))
    )
    if not pin:
        print(
            "warning: fewer than 2 usable cores or no taskset: nothing is pinned", file=sys.stderr
        )
    _raise_nofile()
    load_before = _loadavg()
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f}: the machine is not quiet", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs", pin)
    started = time.time()
    try:
        with _sigterm_as_exit():
            if pin:
                os.sched_setaffinity(0, {LOAD_CPU})  # this script and its clients: the load core
            bench = Bench(args, tmp, procs)
            bench.start_upstream()
            bench.prepare_certificates()
            micro_terminators = [*args.only, "floor"] if args.floor else args.only
            rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in micro_terminators}
            for n in range(args.rounds):
                order = micro_terminators if n % 2 == 0 else list(reversed(micro_terminators))
                for which in order:
                    Bench._say(f"round {n + 1}/{args.rounds}: {which}")
                    rounds[which].append(bench.micro(which, first=n == 0))
            results: dict[str, Any] = {t: median_results(r) for t, r in rounds.items()}
            floor = results.pop("floor", None)
            if args.e2e:
                bench.start_app()
                e2e: dict[str, list[dict[str, Any]]] = {t: [] for t in args.only}
                for n in range(args.rounds):
                    order = args.only if n % 2 == 0 else list(reversed(args.only))
                    for which in order:
                        e2e[which].append(bench.e2e(which))
                for which, runs in e2e.items():
                    results[which]["e2e"] = median_e2e(runs)
    except BenchError as exc:
        print(
            f"bench failed: {exc}\n(logs in {tmp / 'logs'}; rerun with --keep-temp to keep)",
            file=sys.stderr,
        )
        return 1
    finally:
        procs.stop_all()
        if not args.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            print(f"temp dir kept: {tmp}", file=sys.stderr)

    table = rows(results)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "bulk_connections": args.bulk_connections,
            "idle_connections": args.idle_connections,
            "rounds": args.rounds,
            "proxy_cmd": args.proxy_cmd,
            "pinned": pin,
            "terminator_cpu": TERMINATOR_CPU if pin else None,
            "load_cpu": LOAD_CPU if pin else None,
        },
        "machine": {
            "cpus": len(cpus),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            **_versions(args.python),
        },
        "tls": bench.tls_info,
        "results": results,
        "floor": floor,
        "table": [{k: v for k, v in row.items() if k != "format"} for row in table],
        "h2": h2_summary(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(markdown(table))
    errors = {
        f"{t}.{w}": r[w]["errors"]
        for t, r in results.items()
        for w in r
        if isinstance(r[w], dict) and r[w].get("errors")
    }
    if errors:
        print(f"\nthe load clients reported errors: {errors}")
    if report["h2"]:
        print("\nHTTP/2 (issue 12), beside HTTP/1.1 keep-alive of the same rounds:")
        print(h2_markdown(report["h2"]))
    logged = access_log_markdown(results)
    if logged:
        print("\nThe access log, on and off (same rounds):")
        print(logged)
    counted = metrics_markdown(results)
    if counted:
        print("\nThe metrics, off and on (two proxies loaded at once, sides swapped each run):")
        print(counted)
    stored = storage_markdown(results)
    if stored:
        print(
            "\nThe storage backends, file and redis (two proxies loaded at once, sides swapped"
            " by a restart each run):"
        )
        print(stored)
    resumed = {
        f"{t}.{w}": f"{r[w].get('resumed', 0)}/{r[w]['requests']}"
        for t, r in {**results, **({"floor": floor} if floor else {})}.items()
        for w in ("resume13", "resume12")
        if isinstance(r.get(w), dict)
    }
    if resumed:
        print(f"\nresumed / connections: {resumed}")
    if floor is not None:
        print(
            "\nThe floor (bench/floor.py: uvloop + ssl relaying bytes, no HTTP work), same rounds:"
        )
        print(floor_markdown(results, floor))
    measured = {**results, **({"floor": floor} if floor else {})}
    rounds_lines = spread(measured)
    if rounds_lines:
        print("\nPer core-second in each round (the table shows the median round):")
        print("\n".join(rounds_lines))
    print(f"\nTLS: {json.dumps(bench.tls_info)}")
    profile = results.get("tlsproxy", {}).get("profile")
    if profile and profile.get("top_self"):
        print(
            f"\ntlsproxy profile, {profile['workload']} ({profile['samples']} samples,"
            f" {profile['file']}):"
        )
        print("| self | inclusive | function |\n|---|---|---|")
        for row in profile["top_self"]:
            print(f"| {row['self']:.1%} | {row['inclusive']:.1%} | {row['function']} |")
    elif profile:
        print(f"\nprofile: {profile.get('error')}")
    perf = {t: r["perf"] for t, r in measured.items() if "perf" in r}
    if perf:
        workload = next(iter(perf.values())).get("workload", "keepalive")
        print(f"\nCPU per {workload} request by library (perf, microseconds):")
        for which, data in perf.items():
            if "error" in data:
                print(f"- {which}: {data['error']}")
                continue
            parts = sorted(data["us_per_request_by_dso"].items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{name} {us:.1f}" for name, us in parts if us >= 0.5)
            print(f"- {which}: {data['cpu_us_per_request']:.1f} us: {shown}")
            for name, us in data.get("top_symbols_us", [])[:15]:
                print(f"    {us:6.1f} us  {name}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
