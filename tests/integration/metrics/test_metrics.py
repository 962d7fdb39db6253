"""GET /metrics of a real `tlsproxy run` with `[server] admin`, read with prometheus_client's
text parser after real traffic: httpx over HTTP/1.1, curl over HTTP/2, openssl s_client for
resumed and refused handshakes, an upstream server stopped and started, a supervised worker
killed. Values are compared before and after (counters belong to the process) or polled until
they change (the proxy counts a request when it ends, a worker restart when it is seen).
The names, types and labels are the spec's (spec.py)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import AppProcess, free_port, running, tlsproxy, write_config
from tests.integration.metrics.spec import (
    DURATION_BUCKETS,
    HANDSHAKE_FAILURE_REASONS,
    METRICS,
)
from tests.integration.metrics.support import (
    CONTENT_TYPE,
    FAST_HEALTH,
    WORKER_COMMAND,
    Scrape,
    admin_json,
    admin_request,
    check_against_spec,
    config,
    eventually,
    get_as,
    scrape,
    start,
    start_before,
)
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, proc_status_kib, s_client, served_certificate

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("openssl") is None,
    reason="needs curl and openssl (scripts/test.sh installs them)",
)


def curl(proxy: Proxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(proxy.ca), "-o", "/dev/null", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def raw_tls(proxy: Proxy, request: bytes, sni: str = "localhost") -> bytes:
    """`request` as bytes on a TLS connection (no ALPN), and all the proxy answered."""
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
        proxy.context().wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def test_requests_are_counted_by_site_and_code_over_http1_and_h2(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy, admin = start_before(make_proxy, example_app)
    before = scrape(admin)
    body = b"x" * 1000
    with proxy.client() as client:
        for _ in range(3):
            assert client.get(proxy.url("/")).status_code == 200
        assert client.get(proxy.url("/nope")).status_code == 404  # the app's 404
        assert client.post(proxy.url("/echo"), content=body).status_code == 200
        # While this keep-alive connection is open, it is counted as open.
        assert scrape(admin).get("tlsproxy_connections_open", protocol="http/1.1") >= 1
        # SNI localhost, Host of another site: 421, which no site took
        assert client.get(proxy.url("/"), headers={"Host": "other.test"}).status_code == 421
    h2 = curl(proxy, "--http2", "-w", "%{http_version} %{http_code}", proxy.url("/"))
    assert h2.stdout == "2 200", h2.stdout + h2.stderr
    # No Host: 400 before routing (a raw TLS connection without ALPN).
    assert raw_tls(proxy, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")

    expected = {("localhost", "200"): 5, ("localhost", "404"): 1, ("-", "421"): 1, ("-", "400"): 1}

    def counted() -> Scrape:
        return scrape(admin)

    def all_counted(page: Scrape) -> bool:
        return all(
            delta(before, page, "tlsproxy_requests_total", site=site, code=code) == n
            for (site, code), n in expected.items()
        )

    after = eventually(counted, all_counted, 5, f"requests_total deltas {expected}")
    assert delta(before, after, "tlsproxy_requests_total", site="other.test", code="200") == 0
    assert (
        delta(before, after, "tlsproxy_requests_by_method_total", site="localhost", method="GET")
        == 5
    )
    assert (
        delta(before, after, "tlsproxy_requests_by_method_total", site="localhost", method="POST")
        == 1
    )

    # The histogram: one observation per request of the site, buckets cumulative, as the spec.
    name = "tlsproxy_request_duration_seconds"
    count = delta(before, after, name + "_count", site="localhost")
    assert count == 6
    buckets = sorted(
        (
            (labels["le"], v)
            for labels, v in after.series(name + "_bucket")
            if labels["site"] == "localhost"
        ),
        key=lambda item: float(item[0]),
    )
    assert [le for le, _ in buckets] == DURATION_BUCKETS
    values = [v for _, v in buckets]
    assert values == sorted(values) and values[-1] == after.get(name + "_count", site="localhost")
    assert 0 < after.get(name + "_sum", site="localhost") < 30
    # "-" requests are timed too
    assert delta(before, after, name + "_count", site="-") == 2

    # Bytes: the request body exactly; responses at least their bodies.
    assert delta(before, after, "tlsproxy_request_bytes_total", site="localhost") == len(body)
    assert delta(before, after, "tlsproxy_response_bytes_total", site="localhost") > len(body)
    assert delta(before, after, "tlsproxy_response_bytes_total", site="-") > 0

    # Handshakes: httpx offered http/1.1 only, curl h2, the raw socket no ALPN.
    for alpn in ("http/1.1", "h2", "none"):
        assert (
            delta(
                before,
                after,
                "tlsproxy_handshakes_total",
                version="TLSv1.3",
                alpn=alpn,
                resumed="false",
            )
            >= 1
        ), alpn
    closed = eventually(
        counted,
        lambda p: (
            p.get("tlsproxy_connections_open", protocol="http/1.1") == 0
            and p.get("tlsproxy_connections_open", protocol="h2") == 0
        ),
        5,
        "connections_open back to 0 once the clients closed",
    )
    assert closed.get("tlsproxy_handshakes_in_progress") == 0


def test_handshakes_resumed_and_refused_are_counted(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    proxy, admin = start_before(make_proxy, example_app)
    before = scrape(admin)
    assert {
        labels["reason"] for labels, _ in before.series("tlsproxy_handshake_failures_total")
    } == set(HANDSHAKE_FAILURE_REASONS)
    session = tmp_path / "session.pem"
    # TLS 1.2: the session ticket comes with the handshake, so s_client can save it.
    common = ("-servername", "app.test", "-tls1_2", "-alpn", "http/1.1")
    first = s_client(proxy.port, *common, "-sess_out", str(session))
    assert first.returncode == 0 and "New, TLSv1.2" in first.stdout, first.stdout + first.stderr
    second = s_client(proxy.port, *common, "-sess_in", str(session))
    assert second.returncode == 0 and "Reused, TLSv1.2" in second.stdout, second.stdout
    # A name no site has, and no default site; then a client older than TLS 1.2 (SECLEVEL=0 so
    # that the proxy refuses it, not this machine's OpenSSL policy).
    assert s_client(proxy.port, "-servername", "unknown.test").returncode != 0
    old = s_client(
        proxy.port, "-servername", "app.test", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"
    )
    assert old.returncode != 0
    # Plain HTTP to the HTTPS port.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        plain.recv(65536)

    failures = "tlsproxy_handshake_failures_total"
    expected = {"no_certificate": 1, "protocol_version": 1, "plain_http": 1}

    def counted(page: Scrape) -> dict[str, float]:
        return {r: delta(before, page, failures, reason=r) for r in HANDSHAKE_FAILURE_REASONS}

    after = eventually(
        lambda: counted(scrape(admin)),
        lambda got: all(got[r] >= 1 for r in expected),
        5,
        f"failures counted: {expected}",
    )
    assert after == {r: expected.get(r, 0) for r in HANDSHAKE_FAILURE_REASONS}
    page = scrape(admin)
    handshakes = "tlsproxy_handshakes_total"
    tls12 = {"version": "TLSv1.2", "alpn": "http/1.1"}
    assert delta(before, page, handshakes, resumed="false", **tls12) == 1
    assert delta(before, page, handshakes, resumed="true", **tls12) == 1


def test_a_handshake_timeout_is_counted_as_timeout(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy, admin = start_before(
        make_proxy,
        example_app,
        upstreams='[limits]\nhandshake_timeout = "1s"\n',
    )
    failures = "tlsproxy_handshake_failures_total"
    before = scrape(admin)
    # A client that connects and never says hello.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as silent:
        assert silent.recv(65536) == b""  # closed by the proxy after handshake_timeout

    def counted() -> dict[str, float]:
        page = scrape(admin)
        return {r: delta(before, page, failures, reason=r) for r in HANDSHAKE_FAILURE_REASONS}

    got = eventually(counted, lambda c: sum(c.values()) >= 1, 5, "one failure counted")
    assert got == {r: float(r == "timeout") for r in HANDSHAKE_FAILURE_REASONS}


def test_certificate_gauges_are_those_of_the_served_certificates(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy, admin = start_before(make_proxy, example_app)
    page = scrape(admin)
    now = time.time()
    for host in ("localhost", "app.test", "other.test"):
        served = served_certificate(proxy.port, "-servername", host)
        assert served is not None, host
        not_after = served.not_valid_after_utc.timestamp()
        assert page.value("tlsproxy_certificate_not_after_seconds", host=host) == not_after
        renewal = page.value("tlsproxy_certificate_next_renewal_seconds", host=host)
        assert renewal is not None and now < renewal < not_after, host
        assert page.value("tlsproxy_certificate_renewal_failures_total", host=host) == 0
        issued = page.value("tlsproxy_certificate_last_renewal_success_seconds", host=host)
        assert issued is not None and now - 120 < issued <= now + 1, host
    hosts = {labels["host"] for labels, _ in page.series("tlsproxy_certificate_not_after_seconds")}
    assert hosts == {"localhost", "app.test", "other.test"}


def test_upstream_metrics_follow_health_checks_and_failures(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "app").mkdir()
    with running(AppProcess(tmp_path / "app")) as app:
        live = app.server
        proxy, admin = start(
            make_proxy,
            f'servers = ["{live}"]\n{FAST_HEALTH}',
            upstreams=f'[upstream.pair]\nservers = ["{dead}", "{live}"]\nbalance = "round_robin"\n'
            + '[[site]]\nhosts = ["pair.test"]\nupstream = "pair"\n',
        )
        up = "tlsproxy_upstream_up"
        eventually(
            lambda: scrape(admin),
            lambda p: p.value(up, upstream="app", server=live) == 1,
            10,
            "app up",
        )

        # Retries: round robin sends some requests to the dead server first; each is sent again
        # to the live one, and counted against the dead one.
        before = scrape(admin)
        with proxy.client() as client:
            for _ in range(4):
                assert get_as(client, proxy, "pair.test") == 200
        after = scrape(admin)

        def pair(name: str, server: str) -> float:
            return delta(
                before, after, f"tlsproxy_upstream_{name}_total", upstream="pair", server=server
            )

        assert pair("connect_failures", dead) >= 1 and pair("retries", dead) >= 1
        assert pair("connect_failures", live) == 0 and pair("retries", live) == 0
        assert after.value(up, upstream="pair", server=dead) == 0  # passive health took it out

        # In flight: a slow request is at the server while it runs.
        with proxy.client() as client:
            slow = threading.Thread(target=client.get, args=(proxy.url("/slow/2"),))
            slow.start()
            try:
                eventually(
                    lambda: scrape(admin),
                    lambda p: (
                        p.value("tlsproxy_upstream_in_flight", upstream="app", server=live) == 1
                    ),
                    5,
                    "one request in flight",
                )
            finally:
                slow.join()
        assert scrape(admin).value("tlsproxy_upstream_in_flight", upstream="app", server=live) == 0

        app.stop()
        eventually(
            lambda: scrape(admin),
            lambda p: p.value(up, upstream="app", server=live) == 0,
            10,
            "app down",
        )
        app.start()
        eventually(
            lambda: scrape(admin),
            lambda p: p.value(up, upstream="app", server=live) == 1,
            10,
            "app up again",
        )


def test_worker_metrics_and_a_killed_worker(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy, admin = start(
        make_proxy,
        f'command = "{WORKER_COMMAND}"\nworkers = 1\nhealth = "/healthz"\n',
        upstreams=f'[upstream.api]\nservers = ["{example_app.server}"]\n'
        + '[[site]]\nhosts = ["api.test"]\nupstream = "api"\n',
    )
    worker = {"upstream": "app", "worker": "app-1"}
    page = eventually(
        lambda: scrape(admin),
        lambda p: (
            p.value("tlsproxy_worker_up", **worker) == 1
            and (p.value("tlsproxy_worker_rss_bytes", **worker) or 0) > 0
        ),
        30,
        "worker app-1 up with its RSS",
    )
    assert page.value("tlsproxy_worker_restarts_total", **worker) == 0
    with proxy.client() as client:
        pid = int(client.get(proxy.url("/pid")).text)
        for _ in range(3):
            assert client.get(proxy.url("/")).status_code == 200
        assert get_as(client, proxy, "api.test") == 200
    page = eventually(
        lambda: scrape(admin),
        lambda p: p.get("tlsproxy_worker_requests_total", **worker) >= 4,
        5,
        "4 requests to the worker",
    )
    rss = page.get("tlsproxy_worker_rss_bytes", **worker)
    assert 10 * 2**20 < rss < 2**30  # a uvicorn process: tens of MiB

    # The whole page, with every kind of series present, is the spec's.
    seen = check_against_spec(page)
    assert seen == set(METRICS), sorted(set(METRICS) - seen)

    os.kill(pid, signal.SIGKILL)
    page = eventually(
        lambda: scrape(admin),
        lambda p: (
            p.value("tlsproxy_worker_restarts_total", **worker) == 1
            and p.value("tlsproxy_worker_up", **worker) == 1
        ),
        30,
        "the killed worker counted as a restart and replaced",
    )
    statuses = admin_json(admin, "/status")["workers"]
    (status,) = [w for w in statuses if w["worker"] == "app-1"]
    assert status["pid"] != pid and status["restarts"] == 1
    # requests count the current pid's only
    assert page.get("tlsproxy_worker_requests_total", **worker) < 4


def test_admin_endpoints(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy, admin = start_before(make_proxy, example_app)
    status, headers, body = admin_request(admin, "/")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert all(path in body for path in (b"/metrics", b"/status", b"/certs"))

    document = admin_json(admin, "/status")
    assert document["pid"] == proxy.pid
    certs = admin_json(admin, "/certs")["certificates"]
    assert sorted(tuple(c["hosts"]) for c in certs) == [("localhost", "app.test"), ("other.test",)]

    status, headers, body = admin_request(admin, "/metrics", "HEAD")
    assert status == 200 and headers["content-type"] == CONTENT_TYPE and body == b""
    assert admin_request(admin, "/nope")[0] == 404
    assert admin_request(admin, "/metrics", "POST")[0] == 405
    assert admin_request(admin, "/status", "DELETE")[0] == 405

    # Keep-alive: Prometheus scrapes on one connection.
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200 and b"tlsproxy_build_info" in response.read()
    finally:
        conn.close()


def test_a_non_loopback_admin_address_needs_admin_allow_remote(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    port = free_port()
    text = config(f"0.0.0.0:{port}", f'servers = ["{example_app.server}"]')
    path = write_config(tmp_path / "refused", text)
    for command in ("check", "run"):
        result = tlsproxy(command, "-c", str(path), timeout=30)
        assert result.returncode == 2, (command, result)
        assert "server.admin" in result.stderr, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    allowed = config(
        f"0.0.0.0:{port}", f'servers = ["{example_app.server}"]', server="admin_allow_remote = true"
    )
    make_proxy(allowed)
    assert scrape(port).value("tlsproxy_build_info", version=_version()) == 1


def _version() -> str:
    from proxy import __version__

    return __version__


def _proc_start_time(pid: int) -> float:
    """The process's start (Unix time) as the kernel has it: boot time plus its start ticks."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_process_metrics_reloads_and_methods(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy, admin = start_before(make_proxy, example_app)
    page = scrape(admin)
    started = _proc_start_time(proxy.pid)
    assert abs(page.get("process_start_time_seconds") - started) < 0.1
    assert started - 1 <= page.get("tlsproxy_start_time_seconds") <= time.time()
    rss_kib = proc_status_kib(proxy.pid, "VmRSS")
    assert 0.5 < page.get("process_resident_memory_bytes") / (rss_kib * 1024) < 2
    assert abs(page.get("process_open_fds") - len(os.listdir(f"/proc/{proxy.pid}/fd"))) <= 5
    limits = Path(f"/proc/{proxy.pid}/limits").read_text()
    soft = re.search(r"Max open files\s+(\d+)", limits)
    assert soft is not None and page.get("process_max_fds") == int(soft.group(1))
    assert page.get("process_cpu_seconds_total") > 0

    with proxy.client() as client:
        assert client.request("PROPFIND", proxy.url("/")).status_code == 405  # the app's
        assert client.get(proxy.url("/")).status_code == 200
    methods = "tlsproxy_requests_by_method_total"
    after = eventually(
        lambda: scrape(admin),
        lambda p: p.get(methods, site="localhost", method="OTHER") == 1,
        5,
        "PROPFIND counted as OTHER",
    )
    assert after.value(methods, site="localhost", method="PROPFIND") is None
    assert after.get("tlsproxy_requests_total", site="localhost", code="405") == 1

    # Reloads by result; the request counts survive them.
    good = proxy.config_file.read_text()
    proxy.config_file.write_text(good + "\n[bogus]\nkey = 1\n")
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("reload failed", start=mark)
    proxy.config_file.write_text(good)
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded .*: 2 site", start=mark)
    page = scrape(admin)
    assert page.get("tlsproxy_config_reloads_total", result="failure") == 1
    assert page.get("tlsproxy_config_reloads_total", result="success") == 1
    assert page.get("tlsproxy_requests_total", site="localhost", code="200") == 1


def test_connections_refused_at_max_connections(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy, admin = start_before(
        make_proxy,
        example_app,
        upstreams="[limits]\nmax_connections = 2\n",
    )
    before = scrape(admin)
    with proxy.conn("localhost") as first, proxy.conn("localhost") as second:
        for conn in (first, second):
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert conn.response().status == 200
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as third:
            assert third.recv(1) == b""  # closed at accept
        after = eventually(
            lambda: scrape(admin),
            lambda p: delta(before, p, "tlsproxy_connections_refused_total") == 1,
            5,
            "one connection refused",
        )
        # without ALPN a connection speaks HTTP/1.1
        assert after.get("tlsproxy_connections_open", protocol="http/1.1") == 2
        assert (
            delta(
                before,
                after,
                "tlsproxy_handshakes_total",
                version="TLSv1.3",
                alpn="none",
                resumed="false",
            )
            == 2
        )
