#!/usr/bin/env python3
"""Connections refused while tlsproxy restarts under load: without and with socket activation.

    python bench/restarts.py [--restarts 20] [--clients 4] [--rate 20] [--json FILE]

A steady load of new HTTPS connections (client threads, each opening --rate connections a second:
connect, TLS handshake, GET /, read the answer, close) runs while the proxy is restarted
--restarts times, in two modes:

- plain: a restart is SIGTERM to the proxy, wait for it to exit, then a new `tlsproxy run` that
  binds the port itself. This is `systemctl restart tlsproxy` with tlsproxy.service alone.
- socket: this script binds and listens once and holds the socket for the whole run, as
  systemd does for tlsproxy.socket; each new proxy gets it as systemd passes it (on fd 3, with
  LISTEN_FDS=1 and LISTEN_PID=its pid, set by a launcher that then execs the proxy). The socket
  stays open across restarts, so new connections wait in its queue instead of being refused.
  (systemd-socket-activate would not do: it exits with its child and the socket with it.)

Each connection ends as ok (a 200), refused (ECONNREFUSED), or failed (anything else: a reset, a
timeout, a TLS error, another status). Figures per mode: attempts, ok, refused, failed, the
restarts' downtime (SIGTERM to the new proxy's READY=1) and the slowest connection.

Standard library only. Loopback only, a temporary directory, bounded (--max-seconds), and it
stops every process it started, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVER_NAME = "localhost"
MODES = ("plain", "socket")
TITLES = {
    "plain": "plain: the proxy binds the port at each start",
    "socket": "socket held across restarts (tlsproxy.socket)",
}

# Runs between fork and exec of each proxy in socket mode: what systemd does for a .socket unit.
LAUNCH = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class Notifications:
    """A NOTIFY_SOCKET in the abstract namespace, to hear each proxy's READY=1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"tlsproxy-bench-restarts-{os.getpid()}-{secrets.token_hex(4)}"
        self.sock.bind("\0" + name)
        self.address = "@" + name

    def wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tlsproxy exited with {proc.returncode} at start-up")
            readable, _, _ = select.select([self.sock], [], [], 0.05)
            if readable and "READY=1" in self.sock.recv(4096).decode(errors="replace").split():
                return
        raise RuntimeError(f"tlsproxy was not ready within {timeout:g} s")


@dataclass
class Load:
    """The client threads and what their connections came to."""

    port: int
    ca_file: Path
    clients: int
    rate: float
    timeout: float
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    slowest: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, args=(context,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _client(self, context: ssl.SSLContext) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            outcome, error = self._one(context)
            took = time.monotonic() - started
            with self._lock:
                self.outcomes[outcome] += 1
                if error:
                    self.errors[error] += 1
                self.slowest = max(self.slowest, took)
            # A steady arrival rate: a connection that waited does not bring a burst after it.
            next_at = max(next_at + period, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def _one(self, context: ssl.SSLContext) -> tuple[str, str]:
        request = f"GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n".encode()
        try:
            with socket.create_connection((HOST, self.port), timeout=self.timeout) as raw:
                with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
                    tls.sendall(request)
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
        except ConnectionRefusedError:
            return "refused", ""
        except ssl.SSLError as exc:  # its errno is OpenSSL's, not the system's
            return "failed", f"TLS: {exc.reason or type(exc).__name__}"
        except OSError as exc:
            return "failed", errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        status = answer.split(b"\r\n", 1)[0]
        if status.startswith(b"HTTP/1.1 200"):
            return "ok", ""
        return "failed", status.decode(errors="replace") or "closed before an answer"


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.processes: list[subprocess.Popen] = []
        self.notify = Notifications()
        self.deadline = time.monotonic() + args.max_seconds

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"not done within --max-seconds {self.args.max_seconds:g}")
        return left

    def spawn(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=self.tmp, **kw
            )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with contextlib.suppress(ValueError):
            self.processes.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.processes):
            self.stop(proc, 5)
        self.notify.sock.close()

    def upstream(self) -> int:
        """A plain HTTP server for the proxy to forward to: a small file on /."""
        root = self.tmp / "www"
        root.mkdir()
        (root / "index.html").write_text("hello\n")
        port = free_port()
        argv = [sys.executable, "-m", "http.server", "--bind", HOST, str(port), "-d", str(root)]
        proc = self.spawn(argv, self.tmp / "upstream.log")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
                return port
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the upstream (python -m http.server) did not start")
            time.sleep(0.05)

    def config(self, mode: str, port: int, upstream: int) -> Path:
        config = self.tmp / f"{mode}.toml"
        config.write_text(
            f"""
[server]
https = ["{HOST}:{port}"]
http = []
data_dir = "{self.tmp / "data"}"
default_site = "{SERVER_NAME}"
shutdown_grace = "10s"
access_log = "off"
log_level = "warning"

[[site]]
hosts = ["{SERVER_NAME}"]
tls = "internal"
upstream = "app"

[upstream.app]
servers = ["{HOST}:{upstream}"]
"""
        )
        return config

    def start_proxy(self, mode: str, config: Path, held: socket.socket | None) -> subprocess.Popen:
        proxy = [self.args.python, "-m", "proxy", "run", "-c", str(config)]
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.address}
        if held is None:
            proc = self.spawn(proxy, self.tmp / f"{mode}.log", env=env)
        else:
            argv = [self.args.python, "-c", LAUNCH, str(held.fileno()), *proxy]
            proc = self.spawn(argv, self.tmp / f"{mode}.log", env=env, pass_fds=(held.fileno(),))
        self.notify.wait_ready(proc, min(60.0, self.left()))
        return proc

    def run_mode(self, mode: str, upstream: int) -> dict:
        held = None
        if mode == "socket":
            held = socket.socket()
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind((HOST, 0))
            held.listen(4096)  # a .socket unit's Backlog= (the kernel caps it at somaxconn)
            port = held.getsockname()[1]
        else:
            port = free_port()
        config = self.config(mode, port, upstream)
        ca_file = self.tmp / "ca.pem"
        if not ca_file.exists():
            ca = [self.args.python, "-m", "proxy", "ca", "-c", str(config)]
            ca_file.write_bytes(subprocess.run(ca, check=True, capture_output=True).stdout)
        proc = self.start_proxy(mode, config, held)
        load = Load(port, ca_file, self.args.clients, self.args.rate, self.args.client_timeout)
        downtimes = []
        try:
            load.start()
            time.sleep(self.args.interval)
            for _ in range(self.args.restarts):
                began = time.monotonic()
                self.stop(proc, min(30.0, self.left()))
                proc = self.start_proxy(mode, config, held)
                downtimes.append(time.monotonic() - began)
                time.sleep(self.args.interval)
        finally:
            load.stop()
            self.stop(proc)
            if held is not None:
                held.close()
        return {
            "mode": mode,
            "restarts": len(downtimes),
            "attempts": sum(load.outcomes.values()),
            "ok": load.outcomes["ok"],
            "refused": load.outcomes["refused"],
            "failed": load.outcomes["failed"],
            "errors": dict(load.errors),
            "downtime_median_s": round(statistics.median(downtimes), 3) if downtimes else None,
            "downtime_max_s": round(max(downtimes), 3) if downtimes else None,
            "slowest_connection_s": round(load.slowest, 3),
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.restarts} restarts under a steady load of new HTTPS connections "
        f"({args.clients} clients x {args.rate:g}/s, loopback)",
        "",
        "| mode | attempts | ok | refused | failed | downtime per restart (median, max) "
        "| slowest connection |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))
        lines.append(
            f"| {TITLES[r['mode']]} | {r['attempts']} | {r['ok']} | {r['refused']} "
            f"| {r['failed']}{f' ({errors})' if errors else ''} "
            f"| {r['downtime_median_s']} s, {r['downtime_max_s']} s "
            f"| {r['slowest_connection_s']} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=20, help="restarts per mode (20)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (4)")
    parser.add_argument("--rate", type=float, default=20, help="connections/s per client (20)")
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds of load between restarts (0.5)"
    )
    parser.add_argument(
        "--client-timeout", type=float, default=30, help="one connection's timeout, s (30)"
    )
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--python", default=sys.executable, help="runs tlsproxy (this one)")
    parser.add_argument("--max-seconds", type=float, default=600, help="the whole run's bound")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tlsproxy-restarts-"))
    bench = Bench(args, tmp)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    results = []
    try:
        upstream = bench.upstream()
        for mode in MODES if args.mode == "both" else (args.mode,):
            results.append(bench.run_mode(mode, upstream))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"restarts: error: {exc} (logs in {tmp})", file=sys.stderr)
        args.keep_temp = True
        return 1
    finally:
        bench.stop_all()
        if not args.keep_temp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
