"""Issue 4 end to end: `tlsproxy run` starts and supervises real uvicorn workers (the pidapp of
tests/integration/workers), and clients reach them over TLS through the proxy."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import ProxyProcess, local_ca, tlsproxy, write_config
from tests.integration.workers.conftest import pid_gone

APP_DIR = Path(__file__).parent / "workers"
COMMAND = (
    f"{sys.executable} -m uvicorn pidapp:app --app-dir {APP_DIR} --uds {{socket}} "
    "--no-access-log --log-level warning"
)


def workers_config(workers: int = 2, extra: str = "") -> str:
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "localhost"
shutdown_grace = "5s"
access_log = "off"

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"

[upstream.app]
command = "{COMMAND}"
workers = {workers}
health = "/healthz"
stop_timeout = "3s"
{extra}
"""


@pytest.fixture
def start_proxy(tmp_path: Path):
    started: list[ProxyProcess] = []

    def start(text: str, log_level: str = "info") -> tuple[ProxyProcess, httpx.Client]:
        config = write_config(tmp_path, text)
        proxy = ProxyProcess(config, log_level=log_level).start(timeout=60)
        started.append(proxy)
        proxy.ca = ssl.create_default_context(cafile=str(local_ca(tmp_path, config)))
        return proxy, httpx.Client(verify=proxy.ca, timeout=10)

    yield start
    for proxy in started:
        proxy.stop()


def worker_pids(proxy: ProxyProcess) -> set[int]:
    """The proxy's live uvicorn children: not the short-lived children that do its
    certificate work (one may still be running, or be a zombie, just after start)."""
    out = subprocess.run(
        ["ps", "--ppid", str(proxy.pid), "-o", "pid=,stat=,args="],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    pids = set()
    for line in out.splitlines():
        pid, stat, args = line.split(None, 2)
        if "uvicorn" in args and not stat.startswith("Z"):
            pids.add(int(pid))
    return pids


def test_requests_spread_over_the_workers(start_proxy) -> None:
    proxy, client = start_proxy(workers_config(workers=3))
    pids = Counter(client.get(proxy.url("/")).json()["pid"] for _ in range(30))
    assert len(pids) == 3, pids
    assert set(pids) == worker_pids(proxy)


def test_a_killed_worker_comes_back_and_no_request_fails(start_proxy) -> None:
    proxy, client = start_proxy(workers_config(workers=2))
    before = worker_pids(proxy)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    failures: list[int] = []
    seen: set[int] = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            response = client.get(proxy.url("/"))
        except httpx.HTTPError as exc:
            raise AssertionError(f"{exc!r}; proxy log:\n{proxy.log()[-4000:]}") from exc
        if response.status_code != 200:
            failures.append(response.status_code)
        else:
            seen.add(response.json()["pid"])
        now = worker_pids(proxy)
        if len(now) == 2 and victim not in now and len(seen - before) >= 1:
            break
        time.sleep(0.05)
    assert not failures, f"statuses {failures}; proxy log:\n{proxy.log()[-3000:]}"
    assert victim not in worker_pids(proxy) and len(worker_pids(proxy)) == 2
    proxy.wait_for_log(r"app-\d: .*(exited|killed|signal)", timeout=5)


def test_prestart_runs_once_before_the_first_worker(start_proxy, tmp_path: Path) -> None:
    marker = tmp_path / "migrated.txt"
    steps = f'prestart = ["echo step1 >> {marker}", "echo step2 >> {marker}"]\n'
    env = f'env = {{ PIDAPP_PRESTART_MARKER = "{marker}" }}\n'
    proxy, client = start_proxy(workers_config(workers=2, extra=steps + env))
    assert marker.read_text() == "step1\nstep2\n"
    seen = {client.get(proxy.url("/prestart")).json()["seen"] for _ in range(10)}
    assert seen == {"step1\nstep2\n"}  # every worker started after both steps


def test_a_failing_prestart_exits_2_with_its_output(tmp_path: Path) -> None:
    steps = 'prestart = ["echo migrating; echo no such table >&2; exit 3"]\n'
    config = write_config(tmp_path, workers_config(extra=steps))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2, result.stderr
    assert "prestart step 1 failed" in result.stderr
    assert "no such table" in result.stderr
    assert "exit status 3" in result.stderr
    assert "tlsproxy: error: upstream app: prestart step 1 failed" in result.stderr


def test_sighup_rolling_restart_under_load_has_no_errors(start_proxy) -> None:
    proxy, _ = start_proxy(workers_config(workers=2))
    before = worker_pids(proxy)
    errors: list[str] = []
    served = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(verify=proxy.ca, timeout=10) as c:
            deadline = time.monotonic() + 40
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    r = c.get(proxy.url("/"))
                    if r.status_code == 200:
                        served[r.json()["pid"]] += 1
                    else:
                        errors.append(f"status {r.status_code}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"rolling restart done", timeout=40)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    after = worker_pids(proxy)
    assert not errors, errors[:5]
    assert len(after) == 2 and not (after & before)
    assert set(served) & after  # the new workers took traffic


def test_sigkill_of_the_proxy_leaves_no_worker(start_proxy) -> None:
    proxy, _ = start_proxy(workers_config(workers=2))
    pids = worker_pids(proxy)
    assert len(pids) == 2
    proxy.signal(signal.SIGKILL)
    proxy.proc.wait(5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(pid_gone(p) for p in pids):
        time.sleep(0.05)
    assert all(pid_gone(p) for p in pids)


def test_status_shows_each_worker(start_proxy, tmp_path: Path) -> None:
    proxy, client = start_proxy(workers_config(workers=2))
    for _ in range(4):
        client.get(proxy.url("/"))
    result = tlsproxy("status", "-c", str(tmp_path / "tlsproxy.toml"))
    assert result.returncode == 0, result.stderr
    for pid in worker_pids(proxy):
        assert str(pid) in result.stdout
    assert "up" in result.stdout
