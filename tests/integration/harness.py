"""Real processes for integration tests: `tlsproxy run` and a uvicorn app, on 127.0.0.1.

Every process started here is stopped by the fixture that started it (SIGTERM, then SIGKILL),
ports are chosen by the kernel (port 0) or, for programs that need a number before they start,
by free_port(), and files live in the test's tmp_path.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.testing.process import terminate

REPO = Path(__file__).resolve().parents[2]
LISTEN_LINE = re.compile(r"listening (https|http)://(\S+)")


_handed_out: set[int] = set()
_ports = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a process that binds it later (Pebble's httpPort, an
    upstream's address). Taken below the kernel's ephemeral range and never twice per session:
    outgoing connections get their local port from that range, and one of them (any test's
    client, a pool, Pebble) could otherwise take this port before its owner binds it; a CI run
    lost a test to exactly that."""
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(500):
        port = _ports.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # a crowded range: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def wait_for_unix(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(path))
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on unix:{path} after {timeout} s")


stop_process = terminate  # SIGTERM, then SIGKILL: what the testing API does too


def tlsproxy(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the CLI to completion (check, ca, certs)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
    )


class ProxyProcess:
    """`tlsproxy run -c CONFIG` in the background, with its log in a file. With `command`
    (say ["reverse-proxy", "--from", ...]), that command instead; `config_file` then only
    names the log files."""

    def __init__(
        self,
        config_file: Path,
        *,
        loop: str = "uvloop",
        log_level: str = "debug",
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.config_file = config_file
        self.command = command or ["run", "-c", str(config_file)]
        self.env = env
        self.dir = config_file.parent
        self.log_file = self.dir / f"{config_file.stem}.log"
        self.out_file = self.dir / f"{config_file.stem}.access.log"
        self.loop = loop
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.stdout: int | None = None  # a descriptor for the access log instead of the file
        self.https: list[tuple[str, int]] = []
        self.http: list[tuple[str, int]] = []

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self._log = open(self.log_file, "ab")
        self._out = open(self.out_file, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                *self.command,
                "--loop",
                self.loop,
                "--log-level",
                self.log_level,
            ],
            stdout=self._out if self.stdout is None else self.stdout,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, **self.env} if self.env else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tlsproxy exited with {self.proc.returncode} at start-up:\n{self.log()}"
                )
            self._parse_listeners()
            if self.https:
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"tlsproxy did not start listening in {timeout} s:\n{self.log()}")

    def _parse_listeners(self) -> None:
        self.https, self.http = [], []
        for kind, where in LISTEN_LINE.findall(self.log()):
            host, _, port = where.rpartition(":")
            (self.https if kind == "https" else self.http).append((host.strip("[]"), int(port)))

    @property
    def port(self) -> int:
        return self.https[0][1]

    @property
    def http_port(self) -> int:
        return self.http[0][1]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> str:
        try:
            return self.out_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.log(), start)
            if match:
                return match
            time.sleep(0.05)
        raise TimeoutError(f"log never matched {pattern!r}:\n{self.log()[-4000:]}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 15.0) -> int | None:
        code = stop_process(self.proc, timeout) if self.proc else None
        for f in (getattr(self, "_log", None), getattr(self, "_out", None)):
            if f:
                f.close()
        return code


def write_config(directory: Path, text: str, name: str = "tlsproxy.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def basic_config(
    upstream: str,
    *,
    hosts: tuple[str, ...] = ("localhost", "app.test"),
    http: bool = False,
    extra_server: str = "",
    limits: str = "",
    extra: str = "",
) -> str:
    """A one-site config on free ports; `upstream` is a `servers` entry ("127.0.0.1:PORT")."""
    http_line = 'http = ["127.0.0.1:0"]' if http else "http = []"
    host_list = ", ".join(f'"{h}"' for h in hosts)
    return f"""
[server]
https = ["127.0.0.1:0"]
{http_line}
data_dir = "data"
default_site = "{hosts[0]}"
shutdown_grace = "5s"
{extra_server}

[limits]
{limits}

[[site]]
hosts = [{host_list}]
tls = "internal"
upstream = "app"

[upstream.app]
servers = ["{upstream}"]
{extra}
"""


class AppProcess:
    """A real uvicorn serving an ASGI app (examples/app.py by default) on a free port or socket."""

    def __init__(
        self,
        tmp: Path,
        app: str = "examples.app:app",
        *,
        uds: bool = False,
        workers: int = 1,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.app = app
        self.uds_path = tmp / f"app-{os.getpid()}-{id(self)}.sock" if uds else None
        self.port = None if uds else free_port()
        self.workers = workers
        self.extra_args = extra_args
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def server(self) -> str:
        return f"unix:{self.uds_path}" if self.uds_path else f"127.0.0.1:{self.port}"

    def start(self) -> AppProcess:
        where = ["--uds", str(self.uds_path)] if self.uds_path else ["--port", str(self.port)]
        self.log_file = self.tmp / f"uvicorn-{id(self)}.log"
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                self.app,
                "--host",
                "127.0.0.1",
                *where,
                "--workers",
                str(self.workers),
                "--log-level",
                "warning",
                "--proxy-headers",
                "--forwarded-allow-ips",
                "*",
                *self.extra_args,
            ],
            stdout=self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, **self.env} if self.env else None,
        )
        if self.uds_path:
            wait_for_unix(self.uds_path)
        else:
            assert self.port is not None
            wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
            self._log.close()


@contextmanager
def running(process):  # type: ignore[no-untyped-def]
    process.start()
    try:
        yield process
    finally:
        process.stop()


def local_ca(proxy_dir: Path, config_file: Path) -> Path:
    """The local CA's root as a file, for curl --cacert and httpx verify=."""
    result = tlsproxy("ca", "-c", str(config_file))
    assert result.returncode == 0, result.stderr
    path = proxy_dir / "root.pem"
    path.write_text(result.stdout)
    return path


def iter_lines(text: str) -> Iterator[str]:
    yield from text.splitlines()
