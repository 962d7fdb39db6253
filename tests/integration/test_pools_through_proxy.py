"""Issue 4, upstream pools of plain servers, through `tlsproxy run` with real uvicorn apps:
balancing, a server down (passive health), all servers down (active health: 503 with
Retry-After), health thresholds taking a server out and back, and max_requests recycling of
supervised workers without a failed request."""

from __future__ import annotations

import ssl
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import (
    AppProcess,
    ProxyProcess,
    free_port,
    local_ca,
    write_config,
)

APP_DIR = Path(__file__).parent / "workers"


def pool_config(servers: list[str], extra: str = "") -> str:
    listed = ", ".join(f'"{s}"' for s in servers)
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "localhost"
shutdown_grace = "2s"
access_log = "off"

[limits]
upstream_connect_timeout = "1s"

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"

[upstream.app]
servers = [{listed}]
{extra}
"""


@pytest.fixture
def apps(tmp_path: Path):
    started: list[AppProcess] = []

    def start(n: int) -> list[AppProcess]:
        for _ in range(n):
            started.append(AppProcess(tmp_path).start())
        return started[-n:]

    yield start
    for app in started:
        app.stop()


@pytest.fixture
def proxy_for(tmp_path: Path):
    started: list[ProxyProcess] = []

    def start(text: str) -> tuple[ProxyProcess, httpx.Client]:
        config = write_config(tmp_path, text)
        proxy = ProxyProcess(config, log_level="info").start(timeout=60)
        started.append(proxy)
        verify = ssl.create_default_context(cafile=str(local_ca(tmp_path, config)))
        return proxy, httpx.Client(verify=verify, timeout=10)

    yield start
    for proxy in started:
        proxy.stop()


def pids(client: httpx.Client, proxy: ProxyProcess, n: int) -> Counter:
    return Counter(client.get(proxy.url("/")).json()["pid"] for _ in range(n))


def test_round_robin_spreads_evenly(apps, proxy_for) -> None:
    a, b = apps(2)
    proxy, client = proxy_for(pool_config([a.server, b.server], 'balance = "round_robin"'))
    counts = pids(client, proxy, 20)
    assert sorted(counts.values()) == [10, 10], counts


def test_least_conn_uses_every_server(apps, proxy_for) -> None:
    a, b = apps(2)
    proxy, client = proxy_for(pool_config([a.server, b.server]))
    assert len(pids(client, proxy, 20)) == 2


def test_a_dead_server_is_skipped_and_no_request_fails(apps, proxy_for) -> None:
    (a,) = apps(1)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    proxy, client = proxy_for(pool_config([dead, a.server], 'fail_timeout = "30s"'))
    statuses = Counter(client.get(proxy.url("/")).status_code for _ in range(20))
    # A refused connect is retried on the other server (no byte of the request was sent),
    # and the refusing server is then skipped for fail_timeout.
    assert statuses == Counter({200: 20})


def test_all_servers_down_gives_503_with_retry_after(apps, proxy_for) -> None:
    a, b = apps(2)
    extra = 'health = "/healthz"\nhealth_interval = "200ms"\nunhealthy_threshold = 2'
    proxy, client = proxy_for(pool_config([a.server, b.server], extra))
    assert client.get(proxy.url("/")).status_code == 200
    a.stop()
    b.stop()
    deadline = time.monotonic() + 10
    response = client.get(proxy.url("/pid"))
    while response.status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
        response = client.get(proxy.url("/pid"))
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1


def test_health_thresholds_take_a_server_out_and_bring_it_back(
    apps, proxy_for, tmp_path: Path
) -> None:
    """A server whose health endpoint fails (but which still accepts connections) is taken out
    after `unhealthy_threshold` probes and back after `healthy_threshold` passes."""
    flag = tmp_path / "sick"
    sick = AppProcess(
        tmp_path,
        "pidapp:app",
        extra_args=("--app-dir", str(APP_DIR)),
        env={"PIDAPP_SICK_IF": str(flag)},
    )
    (healthy,) = apps(1)
    sick.start()
    try:
        extra = (
            'health = "/healthz"\nhealth_interval = "200ms"\n'
            "unhealthy_threshold = 2\nhealthy_threshold = 2"
        )
        proxy, client = proxy_for(pool_config([healthy.server, sick.server], extra))
        sick_pid = httpx.get(f"http://{sick.server}/").json()["pid"]
        assert sick_pid in pids(client, proxy, 10)
        flag.touch()
        proxy.wait_for_log(r"is down|fails|taken out|down:", timeout=10)
        time.sleep(0.3)
        assert sick_pid not in pids(client, proxy, 10)
        flag.unlink()
        proxy.wait_for_log(r"up again|passes", timeout=10)
        time.sleep(0.3)
        assert sick_pid in pids(client, proxy, 10)
    finally:
        sick.stop()


def test_max_requests_recycles_workers_without_a_failed_request(proxy_for) -> None:
    command = (
        f"{sys.executable} -m uvicorn pidapp:app --app-dir {APP_DIR} --uds {{socket}} "
        "--no-access-log --log-level warning"
    )
    text = pool_config(["127.0.0.1:1"]).replace(
        'servers = ["127.0.0.1:1"]',
        f'command = "{command}"\nworkers = 2\nhealth = "/healthz"\nmax_requests = 10',
    )
    proxy, client = proxy_for(text)
    seen: Counter = Counter()
    failures = 0
    deadline = time.monotonic() + 30
    # A worker past max_requests keeps serving until its replacement is ready: pace the
    # requests so that replacements come up while they run.
    while len(seen) < 4 and time.monotonic() < deadline:
        response = client.get(proxy.url("/"))
        if response.status_code == 200:
            seen[response.json()["pid"]] += 1
        else:
            failures += 1
        time.sleep(0.02)
    assert failures == 0
    assert len(seen) >= 4, seen  # both first workers were replaced, and their successors served


def test_max_memory_recycles_a_grown_worker_without_a_failed_request(proxy_for) -> None:
    command = (
        f"{sys.executable} -m uvicorn pidapp:app --app-dir {APP_DIR} --uds {{socket}} "
        "--no-access-log --log-level warning"
    )
    text = pool_config(["127.0.0.1:1"]).replace(
        'servers = ["127.0.0.1:1"]',
        f'command = "{command}"\nworkers = 1\nhealth = "/healthz"\nmax_memory = "150MiB"',
    )
    proxy, client = proxy_for(text)
    first = client.get(proxy.url("/")).json()["pid"]
    assert client.get(proxy.url("/alloc?mb=160")).json()["pid"] == first  # RSS now > 150 MiB
    failures, pids = 0, set()
    deadline = time.monotonic() + 30  # the supervisor reads RSS every 5 s
    while time.monotonic() < deadline:
        response = client.get(proxy.url("/"))
        if response.status_code != 200:
            failures += 1
        else:
            pids.add(response.json()["pid"])
        if pids - {first}:
            break
        time.sleep(0.05)
    assert failures == 0
    assert pids - {first}, "the grown worker was never replaced"
    proxy.wait_for_log(r"max_memory", timeout=5)
