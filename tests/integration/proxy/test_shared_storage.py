"""Two `tlsproxy run` instances, each with its own data_dir, on one real redis-server
(`[storage] backend = "redis"`), with the local CA: one root and one leaf for both, a renewal
on one served by the other within seconds, and Redis going away under load costing no request.
The same with ACME, Pebble and a balancer in front is tests/integration/cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import AppProcess, running, tlsproxy
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, proxy_config, served_certificate
from tests.integration.redis_server import PASSWORD, RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(RedisServer(tmp_path / "redis")) as server:
        yield server


def shared_config(upstream: str, url: str) -> str:
    text = proxy_config([(["localhost"], "app")], {"app": upstream}, default_site="localhost")
    return text + f'\n[storage]\nbackend = "redis"\nurl = "{url}"\n'


def two_instances(make_proxy: MakeProxy, app: AppProcess, url: str) -> tuple[Proxy, Proxy]:
    """Both started at once on the same store, as a cluster's instances come up together."""
    first = make_proxy(shared_config(app.server, url), start=False)
    second = make_proxy(shared_config(app.server, url), start=False)
    starting = [threading.Thread(target=p.start) for p in (first, second)]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    assert first.proc is not None and second.proc is not None
    return first, second


def serial(proxy: Proxy) -> int:
    cert = served_certificate(proxy.port, "-servername", "localhost")
    assert cert is not None
    return cert.serial_number


def wait_for_serial(proxy: Proxy, wanted: int, timeout: float) -> float:
    """Seconds until `proxy` serves the leaf `wanted`."""
    started = time.monotonic()
    while serial(proxy) != wanted:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still not serving {wanted:x} after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started


def renew(proxy: Proxy) -> int:
    result = tlsproxy("certs", "renew", "localhost", "-c", str(proxy.config_file))
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split("serial ", 1)[1].split(",", 1)[0], 16)


def test_two_instances_share_one_local_ca_and_a_renewal_reaches_the_other(
    make_proxy: MakeProxy, example_app: AppProcess, redis_server: RedisServer
) -> None:
    first, second = two_instances(make_proxy, example_app, redis_server.url)
    assert first.ca.read_bytes() == second.ca.read_bytes()  # one root, made once
    assert serial(first) == serial(second)  # one leaf, issued once
    logs = first.log() + second.log()
    assert logs.count("created local CA root") == 1
    assert logs.count("issued certificate for localhost") == 1
    # Each instance's working copy holds what the TLS library reads.
    assert (second.dir / "data" / "certificates" / "localhost" / "cert.pem").is_file()

    renewed = renew(first)
    assert serial(first) == renewed
    took = wait_for_serial(second, renewed, timeout=10.0)
    print(f"\npropagation of a renewal to the other instance: {took * 1000:.0f} ms")
    assert "stored by another instance" in second.log()
    with second.client() as client:
        assert client.get(second.url()).status_code == 200


def test_redis_stopped_and_started_under_load_fails_no_request(
    make_proxy: MakeProxy, example_app: AppProcess, redis_server: RedisServer
) -> None:
    first, second = two_instances(make_proxy, example_app, redis_server.url)
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def load(proxy: Proxy) -> None:
        nonlocal done
        # A new connection each time: every request is also a handshake with the cached leaf.
        while not stop.is_set():
            try:
                with proxy.client() as client:
                    response = client.get(proxy.url("/"))
                if response.status_code != 200:
                    failures.append(f"{proxy.port}: {response.status_code}")
            except httpx.HTTPError as e:
                failures.append(f"{proxy.port}: {e!r}")
            done += 1

    clients = [threading.Thread(target=load, args=(p,)) for p in (first, second)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.0)
        redis_server.cli("SAVE")  # a Redis restarted keeps its data (RDB or AOF in production)
        redis_server.stop()
        time.sleep(2.0)
        certs = tlsproxy("certs", "-c", str(second.config_file))
        assert certs.returncode == 0
        assert "last_error=storage: redis storage redis://:***@127.0.0.1:" in certs.stdout
        assert PASSWORD not in certs.stdout + certs.stderr
        refused = tlsproxy("certs", "renew", "localhost", "-c", str(first.config_file))
        assert refused.returncode == 1 and "redis storage" in refused.stderr
        redis_server.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert not failures, failures[:5]
    assert done > 20
    # Back without a restart: a renewal works and reaches the other instance (whose change
    # notifications reconnected by themselves).
    renewed = renew(first)
    wait_for_serial(second, renewed, timeout=10.0)
    assert "reachable again" in first.log()
