"""Three `tlsproxy run` instances sharing one real redis-server (`[storage] backend = "redis"`),
with Pebble (ACME) and BIND 9 from tests/integration/acme, and HAProxy in TCP mode in front of
their plain-HTTP listeners: Pebble's `httpPort` is HAProxy's port, so an HTTP-01 validation
lands on whichever instance HAProxy picks, not on the one that ordered.

One redis-server, Pebble, named, HAProxy and upstream app per module (they hold nothing a test
depends on, apart from Pebble's order count, which tests read as a difference). Each cluster of
instances has its own key prefix in Redis, so each starts on an empty store. Every process is
stopped at teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.acme.conftest import (
    Components,
    make_pebble_tls,
    skip_without_components,
    start_components,
)
from tests.integration.acme.helpers import pebble_validations
from tests.integration.harness import (
    AppProcess,
    ProxyProcess,
    free_port,
    stop_process,
    wait_for_port,
    write_config,
)
from tests.integration.metrics.spec import require
from tests.integration.redis_server import RedisServer

# Pebble sleeps a random 0 or 1 s before each validation (PEBBLE_VA_NOSLEEP off, at most
# SLEEPTIME - 1 s): an issuance then lasts long enough for the kill test to catch its holder
# with an order created, and the module stays well within its time budget.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "2"}


# -- HAProxy -------------------------------------------------------------------------------


class Balancer:
    """HAProxy (Debian's package) in TCP mode on one port, round robin over the instances'
    plain-HTTP listeners, as an L4 balancer in front of a cluster forwards port 80. A refused
    connection is retried on the next instance (`option redispatch 1`), so that an instance
    not listening yet, or killed, never fails a validation; 10 retries, because the CA sends
    three requests at once and round robin hands each the next server: with three retries,
    one of them could try only the two instances not listening yet (seen: Pebble's "EOF").
    No health checks: HAProxy starts before the instances, and a check marks an instance up
    only some time after it listens, while the first instance to start orders at once; until
    then HAProxy would have "no server available" for the CA's validation (seen in CI: one
    extra order)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.backends: list[int] = []

    def point_at(self, ports: list[int]) -> None:
        """(Re)start on the same port, forwarding to these backends."""
        self.stop()
        self.backends = list(ports)
        self.directory.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"    server i{n} 127.0.0.1:{port}" for n, port in enumerate(ports))
        config = self.directory / "haproxy.cfg"
        config.write_text(
            f"""global
    maxconn 2000

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 10
    option redispatch 1

frontend http80
    bind 127.0.0.1:{self.port}
    default_backend instances

backend instances
    balance roundrobin
{servers}
"""
        )
        check = subprocess.run(
            [self.binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=10
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with (self.directory / "haproxy.log").open("ab") as log:
            # -db: foreground, no daemon; -Ws would want a master socket, not needed here.
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 5)
            self.process = None


# -- the instances ------------------------------------------------------------------------


@dataclass
class Instance:
    name: str
    config: Path
    http_port: int
    proxy: ProxyProcess

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def pid(self) -> int:
        return self.proxy.pid

    def alive(self) -> bool:
        return self.proxy.proc is not None and self.proxy.proc.poll() is None


@dataclass
class Cluster:
    prefix: str
    instances: list[Instance]
    hosts: tuple[str, ...]
    orders_before: int  # Pebble's order count just before the instances started
    extra: dict[str, object] = field(default_factory=dict)

    def alive(self) -> list[Instance]:
        return [i for i in self.instances if i.alive()]


@dataclass
class Env:
    """The module's shared parts."""

    root: Path
    redis: RedisServer
    pebble: Components
    balancer: Balancer
    app: AppProcess
    started: list[Instance] = field(default_factory=list)

    def config(
        self, directory: Path, http_port: int, prefix: str, hosts: tuple[str, ...], tls: str
    ) -> Path:
        sites = "\n".join(
            f'[[site]]\nhosts = ["{h}"]\ntls = "{tls}"\nupstream = "app"\n' for h in hosts
        )
        acme = (
            f"""
[acme]
directory = "{self.pebble.directory}"
ca_bundle = "{self.pebble.tls.ca}"
email = "ops@example.test"
"""
            if tls == "acme"
            else ""
        )
        return write_config(
            directory,
            f"""
[server]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:{http_port}"]
data_dir = "{directory / "data"}"
default_site = "{hosts[0]}"
shutdown_grace = "1s"

{sites}
[upstream.app]
servers = ["{self.app.server}"]
{acme}
[storage]
backend = "redis"
url = "{self.redis.url}"
{"" if prefix == "tlsproxy" else f'prefix = "{prefix}"'}
""",
        )

    def prepare_cluster(
        self, prefix: str, hosts: tuple[str, ...], tls: str = "acme", count: int = 3
    ) -> Cluster:
        """`count` instances' configs on the key prefix `prefix`, the balancer's port 80 pointed
        at their plain-HTTP listeners; not started."""
        instances = []
        for n in range(count):
            name = f"{prefix}-{'abc'[n]}"
            http_port = free_port()
            config = self.config(self.root / name, http_port, prefix, hosts, tls)
            proxy = ProxyProcess(config, log_level="info")
            instances.append(Instance(name, config, http_port, proxy))
        self.started.extend(instances)
        self.balancer.point_at([i.http_port for i in instances])
        return Cluster(prefix, instances, hosts, self.pebble.orders())

    def start_instances(self, cluster: Cluster) -> None:
        """Start them all at the same moment, as a cluster's instances come up together."""
        errors: list[BaseException] = []

        def start(instance: Instance) -> None:
            try:
                instance.proxy.start(timeout=30)
            except BaseException as e:  # reported below, from the test's thread
                # Only a test sends SIGKILL: one that kills an instance early says so itself.
                if instance.proxy.proc is None or instance.proxy.proc.poll() != -signal.SIGKILL:
                    errors.append(e)

        threads = [threading.Thread(target=start, args=(i,)) for i in cluster.instances]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def start_cluster(
        self, prefix: str, hosts: tuple[str, ...], tls: str = "acme", count: int = 3
    ) -> Cluster:
        """prepare_cluster, then start_instances."""
        cluster = self.prepare_cluster(prefix, hosts, tls, count)
        self.start_instances(cluster)
        return cluster

    def stop_cluster(self, cluster: Cluster) -> None:
        for instance in cluster.instances:
            instance.proxy.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    skip_without_components()
    require("redis-server", "redis-server")
    haproxy = require("haproxy", "haproxy")
    root = tmp_path_factory.mktemp("cluster")
    components: list[Components] = []
    redis = RedisServer(root / "redis")
    balancer = Balancer(haproxy, root / "haproxy")
    app = AppProcess(root)
    env: Env | None = None
    try:
        redis.start()
        app.start()
        pebble = start_components(
            root / "components",
            make_pebble_tls(root / "pebble-tls"),
            components,
            pebble_env=PEBBLE_ENV,
            http_port=balancer.port,
        )
        env = Env(root, redis, pebble, balancer, app)
        yield env
    finally:
        if env is not None:
            for instance in env.started:
                instance.proxy.stop()
        balancer.stop()
        for c in components:
            c.stop()
        app.stop()
        redis.stop()


# -- TLS from the outside --------------------------------------------------------------------


def fetch_leaf(port: int, name: str, timeout: float = 5.0) -> x509.Certificate:
    """The leaf an instance serves for SNI `name` (not verified: the caller says what it
    expects of it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def from_pebble(cert: x509.Certificate) -> bool:
    return "Pebble" in cert.issuer.rfc4514_string()


def wait_until(
    predicate: Callable[[], object], limit: float, what: str, every: float = 0.05
) -> object:
    deadline = time.monotonic() + limit
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, ssl.SSLError) as e:
            last_error, value = e, None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(
        f"timed out after {limit}s waiting for {what} (last error: {last_error!r})"
    )


def serving_from_pebble(instances: list[Instance], hosts: tuple[str, ...], limit: float) -> None:
    """Wait until every instance serves a Pebble-issued leaf for every host."""
    deadline = time.monotonic() + limit
    for host in hosts:
        for instance in instances:
            try:
                wait_until(
                    lambda port=instance.port, host=host: from_pebble(fetch_leaf(port, host)),
                    max(0.1, deadline - time.monotonic()),
                    f"{instance.name} to serve an ACME certificate for {host}",
                )
            except AssertionError as e:
                raise AssertionError(f"{e}\n{instance.proxy.log()[-3000:]}") from None


def https_get(port: int, host: str, ctx: ssl.SSLContext, timeout: float = 5.0) -> bytes:
    """One request on a new connection (so a new handshake too); the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[0]


# -- the module's cluster -------------------------------------------------------------------

HOSTS = ("a.test", "b.test", "c.test")


@pytest.fixture(scope="module")
def _cluster(env: Env) -> Iterator[Cluster]:
    cluster = env.start_cluster("tlsproxy", HOSTS)  # the default prefix: no `prefix` key
    serving_from_pebble(cluster.instances, HOSTS, 60)
    cluster.extra["orders_after_start"] = env.pebble.orders()
    cluster.extra["validations"] = {h: pebble_validations(env.pebble.pebble_log, h) for h in HOSTS}
    yield cluster
    env.stop_cluster(cluster)


@pytest.fixture
def cluster(env: Env, _cluster: Cluster) -> Cluster:
    """The module's three instances for a.test, b.test and c.test (one site each, so one
    order each), all serving their ACME certificates; the balancer's port 80 in front of them
    (another test may have pointed it elsewhere)."""
    ports = [i.http_port for i in _cluster.instances]
    if env.balancer.backends != ports:
        env.balancer.point_at(ports)
    return _cluster
