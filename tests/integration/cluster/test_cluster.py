"""Several instances, one Redis: one order per name at Pebble while three instances start
together on an empty store, the same certificate served by all three, a renewal on one reaching
the others, the lock holder killed mid-issuance, Redis stopped and started under load, and one
local CA for all. Real redis-server, Pebble, BIND 9, HAProxy and tlsproxy processes
(conftest.py)."""

from __future__ import annotations

import re
import signal
import ssl
import threading
import time
from datetime import datetime

import redis
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.harness import tlsproxy
from tests.integration.redis_server import PASSWORD

from .conftest import (
    HOSTS,
    Cluster,
    Env,
    Instance,
    fetch_leaf,
    from_pebble,
    https_get,
    serving_from_pebble,
    wait_until,
)

# The storage lock's expiry once its holder stops refreshing it (certs/storage/contract.py).
LOCK_TTL = 15.0


def served(instances: list[Instance], host: str) -> list[x509.Certificate]:
    return [fetch_leaf(i.port, host) for i in instances]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pebble_context(env: Env) -> ssl.SSLContext:
    """A client that verifies the served chain up to Pebble's root, and the host name."""
    return ssl.create_default_context(cadata=env.pebble.root_pem().decode())


def challenges_answered(instance: Instance) -> list[str]:
    """The HTTP-01 requests this instance answered (its access log), with their status."""
    return re.findall(r'"GET /\.well-known/acme-challenge/\S+" (\d+)', instance.proxy.access_log())


def renew(instance: Instance, host: str) -> None:
    result = tlsproxy("certs", "renew", host, "-c", str(instance.config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_three_instances_starting_together_order_once_per_name_and_serve_one_certificate(
    env: Env, cluster: Cluster
) -> None:
    # Pebble's log says "Added order" once per new-order request it accepts: one per name in
    # all, each name validated once, and each name has a certificate.
    orders = cluster.extra["orders_after_start"] - cluster.orders_before
    print(f"\norders at Pebble for {len(HOSTS)} names, three instances starting together: {orders}")
    assert orders == len(HOSTS)
    assert cluster.extra["validations"] == dict.fromkeys(HOSTS, 1)
    ctx = pebble_context(env)
    for host in HOSTS:
        leaves = served(cluster.instances, host)
        assert all(from_pebble(leaf) for leaf in leaves)
        assert len({der(leaf) for leaf in leaves}) == 1, f"{host}: not one certificate"
        for instance in cluster.instances:  # the full chain up to Pebble's root, for this name
            assert https_get(instance.port, host, ctx).startswith(b"HTTP/1.1 200")
    issued = {
        (i.name, h)
        for i in cluster.instances
        for h in HOSTS
        if re.search(rf"certificate for {re.escape(h)} issued", i.proxy.log())
    }
    assert len(issued) == len(HOSTS), issued  # one issuer per name, the others loaded it
    # Pebble validates each challenge from several perspectives, each through the balancer:
    # the requests landed on more than one instance, and each answered them, whoever ordered.
    answered = {i.name: challenges_answered(i) for i in cluster.instances}
    assert sum(1 for codes in answered.values() if codes) >= 2, answered
    assert all(code == "200" for codes in answered.values() for code in codes), answered


def installed_at(instance: Instance, host: str, serial: int) -> datetime:
    """When the instance's log says it started serving `serial` for `host`."""
    match = re.search(
        rf"^(\S+ \S+) INFO .*serving certificate {serial:x} for {re.escape(host)} ",
        instance.proxy.log(),
        re.M,
    )
    assert match, f"{instance.name} never logged serving {serial:x} for {host}"
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_a_renewal_on_one_instance_reaches_the_other_two_within_10s(
    env: Env, cluster: Cluster
) -> None:
    host = "a.test"
    old = {leaf.serial_number for leaf in served(cluster.instances, host)}
    assert len(old) == 1
    orders = env.pebble.orders()
    seen: dict[str, tuple[float, int]] = {}
    errors: list[str] = []

    def watch(instance: Instance) -> None:
        """Handshake after handshake until the instance serves a new leaf: when, and which."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                serial = fetch_leaf(instance.port, host).serial_number
            except (OSError, ssl.SSLError) as e:
                errors.append(f"{instance.name}: {e!r}")
                return
            if serial not in old:
                seen[instance.name] = (time.monotonic(), serial)
                return
            time.sleep(0.002)

    watchers = [threading.Thread(target=watch, args=(i,)) for i in cluster.instances]
    for thread in watchers:
        thread.start()
    renew(cluster.instances[0], host)
    for thread in watchers:
        thread.join()
    assert not errors, errors
    assert len(seen) == 3, f"not renewed everywhere after 60 s: {seen}"
    serials = {serial for _, serial in seen.values()}
    assert len(serials) == 1, "not one certificate"
    (serial,) = serials
    times = [t for t, _ in seen.values()]
    took = max(times) - min(times)
    # The same from the instances' own logs: when each started serving the new serial.
    logged = sorted(installed_at(i, host, serial) for i in cluster.instances)
    in_logs = (logged[-1] - logged[0]).total_seconds()
    print(
        f"\npropagation of a renewal, first instance serving it -> all three: "
        f"{took * 1000:.0f} ms over TLS, {in_logs * 1000:.0f} ms in the instances' logs"
    )
    assert took < 10.0 and in_logs < 10.0
    assert env.pebble.orders() - orders == 1


def test_the_lock_holder_killed_mid_issuance_another_takes_over_after_the_expiry(
    env: Env,
) -> None:
    host = "k.test"
    prefix = "kill"
    orders = env.pebble.orders()
    client = redis.Redis.from_url(env.redis.url)
    lock_key = f"{prefix}:lock:{host}"
    killed: dict[str, object] = {}
    stop = threading.Event()

    def kill_the_holder(instances: list[Instance]) -> None:
        """As soon as an instance holds the name's lock and its order exists at Pebble: SIGKILL
        to the pid the lock's value names ("<pid> on <host> <token>"), if it is one of ours."""
        while not stop.wait(0.005):
            value = client.get(lock_key)
            if value is None or env.pebble.orders() == orders:
                continue
            pid = int(value.split(b" ", 1)[0])
            holder = next((i for i in instances if i.proxy.proc and i.pid == pid), None)
            if holder is None:  # said by the test's thread, below
                killed["error"] = f"the lock names {value!r}: none of the instances' pids"
                return
            holder.proxy.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            killed.update(instance=holder, at=time.monotonic(), value=value)
            return

    cluster = env.prepare_cluster(prefix, (host,))
    watcher = threading.Thread(target=kill_the_holder, args=(cluster.instances,))
    watcher.start()
    try:
        env.start_instances(cluster)
        watcher.join(30)
    finally:
        stop.set()
        watcher.join()
        client.close()
    try:
        assert killed, "no instance took the lock and ordered within 30 s"
        assert "error" not in killed, killed["error"]
        holder = killed["instance"]
        assert isinstance(holder, Instance) and holder.proxy.proc is not None
        assert holder.proxy.proc.wait(5) == -signal.SIGKILL
        assert f"certificate for {host} issued" not in holder.proxy.log(), (
            "the holder finished before it was killed: not a kill mid-issuance"
        )
        survivors = cluster.alive()
        assert len(survivors) == 2
        serving_from_pebble(survivors, (host,), LOCK_TTL + 30)
        took = time.monotonic() - float(killed["at"])  # type: ignore[arg-type]
        print(f"\nholder killed -> both others serve a certificate: {took:.1f} s")
        # Nobody took the name while the dead holder's lock lived: refreshed every ttl/3, it had
        # at least 2/3 of its ttl left when the holder died.
        assert took >= LOCK_TTL * 2 / 3 - 0.5, took
        leaves = served(survivors, host)
        assert len({der(leaf) for leaf in leaves}) == 1
        issued = [i.name for i in survivors if f"certificate for {host} issued" in i.proxy.log()]
        assert len(issued) == 1, issued
        # Two orders at most: the killed holder's own (created at Pebble before the kill, which
        # is when the watcher fires, and never finished) and the one of the instance that took
        # the name over once the lock expired.
        total = env.pebble.orders() - orders
        print(f"orders at Pebble for {host}: {total}")
        assert 1 <= total <= 2
    finally:
        env.stop_cluster(cluster)


def test_redis_stopped_and_started_under_load_no_request_fails_and_renewal_resumes(
    env: Env, cluster: Cluster
) -> None:
    ctx = pebble_context(env)
    failures: list[str] = []
    done = [0] * len(cluster.instances)
    stop = threading.Event()

    def load(n: int, instance: Instance) -> None:
        # A new connection per request, so a handshake too; bounded: one every 40 ms or so.
        k = 0
        while not stop.wait(0.04):
            host = HOSTS[k % len(HOSTS)]
            k += 1
            try:
                status = https_get(instance.port, host, ctx)
                if not status.startswith(b"HTTP/1.1 200"):
                    failures.append(f"{instance.name} {host}: {status!r}")
            except (OSError, ssl.SSLError) as e:
                failures.append(f"{instance.name} {host}: {e!r}")
            done[n] += 1

    clients = [threading.Thread(target=load, args=(n, i)) for n, i in enumerate(cluster.instances)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.5)
        env.redis.cli("SAVE")  # a Redis restarted keeps its data (RDB or AOF in production)
        env.redis.stop()
        time.sleep(2.0)
        certs = tlsproxy("certs", "-c", str(cluster.instances[1].config))
        assert certs.returncode == 0, certs.stderr  # cmd_certs: 0, the error is on the lines
        lines = certs.stdout.splitlines()
        assert len(lines) == len(HOSTS), certs.stdout
        for line in lines:
            assert re.search(r"last_error=.*redis storage redis://:\*\*\*@127\.0\.0\.1:", line), (
                certs.stdout
            )
        assert PASSWORD not in certs.stdout + certs.stderr
        print(f"\n`tlsproxy certs` while Redis is down:\n{certs.stdout}", end="")
        time.sleep(2.0)
        env.redis.start()
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    print(f"requests across the Redis stop/start: {sum(done)} ({done}), failed: {len(failures)}")
    assert not failures, failures[:5]
    # Bounded, not a stress test: a few hundred in all, on each instance before, during and
    # after the outage.
    assert sum(done) >= 200 and min(done) >= 30, done
    # Back without a restart: a renewal is ordered (HTTP-01 through the balancer, tokens through
    # Redis again) and reaches every instance.
    host = "b.test"
    old = {leaf.serial_number for leaf in served(cluster.instances, host)}
    renew(cluster.instances[2], host)
    wait_until(
        lambda: all(leaf.serial_number not in old for leaf in served(cluster.instances, host)),
        30,
        f"every instance to serve a renewed {host}",
    )
    assert len({der(leaf) for leaf in served(cluster.instances, host)}) == 1
    assert all(i.alive() for i in cluster.instances)


def test_three_instances_on_an_empty_redis_create_one_local_ca(env: Env) -> None:
    host = "app.internal"
    cluster = env.start_cluster("localca", (host,), tls="internal")
    try:
        roots = []
        for instance in cluster.instances:
            result = tlsproxy("ca", "-c", str(instance.config))
            assert result.returncode == 0, result.stderr
            roots.append(result.stdout)
        assert len(set(roots)) == 1, "not one root"
        root = x509.load_pem_x509_certificate(roots[0].encode())
        ctx = ssl.create_default_context(cadata=roots[0])
        leaves = []
        for instance in cluster.instances:
            # Verified against that root, for this name: the chain each serves leads there.
            assert https_get(instance.port, host, ctx).startswith(b"HTTP/1.1 200")
            leaves.append(fetch_leaf(instance.port, host))
        assert len({der(leaf) for leaf in leaves}) == 1
        assert leaves[0].issuer != root.subject  # an intermediate between, as served
        logs = "".join(i.proxy.log() for i in cluster.instances)
        assert logs.count("created local CA root") == 1, logs[-3000:]
    finally:
        env.stop_cluster(cluster)
