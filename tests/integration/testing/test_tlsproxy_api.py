"""proxy.testing.TLSProxy against real processes and real clients (httpx, curl, Python ssl)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.errors import ConfigError
from proxy.testing import CertificateAuthority, StartError, TLSProxy
from tests.integration.harness import AppProcess
from tests.integration.testing import inprocess_app


def test_an_existing_upstream_behind_tls(example_app: AppProcess) -> None:
    with TLSProxy(upstream=example_app.server, hosts=["api.test"]) as p:
        with p.client() as client:
            response = client.get(p.url("api.test", "/"))
        assert response.status_code == 200
        seen = response.json()
        # The app sees https, the client's address and the name the client asked for.
        assert seen["scheme"] == "https"
        assert seen["client"].startswith("127.0.0.1")
        assert seen["forwarding"]["host"] == f"api.test:{p.port}"
        assert "sni=api.test" in p.logs()  # the debug handshake line


def test_curl_and_python_ssl_trust_the_ca_file(example_app: AppProcess) -> None:
    with TLSProxy(upstream=example_app.server, hosts=["api.test"]) as p:
        curl = subprocess.run(
            ["curl", "-sS", "--cacert", str(p.ca_file), "--resolve",
             f"api.test:{p.port}:127.0.0.1", p.url("api.test", "/healthz")],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert (curl.returncode, curl.stdout) == (0, "ok"), curl.stderr
        with socket.create_connection(("127.0.0.1", p.port)) as raw:
            with p.ssl_context().wrap_socket(raw, server_hostname="api.test") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # And nothing else trusts it.
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", p.port)) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname="api.test")


def test_an_asgi_object_served_in_the_test_process() -> None:
    inprocess_app.seen.clear()
    with TLSProxy(app=inprocess_app.app, hosts=["api.test"]) as p:
        with p.client() as client:
            assert client.get(p.url("api.test", "/first")).text == "hello /first"
    # The test reads the app's own state: it ran here, behind the real proxy.
    (request,) = inprocess_app.seen
    assert request["scheme"] == "https"
    assert request["path"] == "/first"
    assert request["x-forwarded-proto"] == "https"
    assert request["client"][0] == "127.0.0.1"


def test_an_import_string_served_by_supervised_workers() -> None:
    app = "tests.integration.testing.inprocess_app:app"
    with TLSProxy(app=app, hosts=["api.test"], workers=2) as p:
        with p.client() as client:
            assert client.get(p.url("api.test", "/w")).text == "hello /w"
        assert p.logs().count("ready in") == 2  # two workers, started by the proxy


async def test_async_with_and_async_client(example_app: AppProcess) -> None:
    async with TLSProxy(upstream=example_app.server, hosts=["a.test", "b.test"]) as p:
        async with p.async_client() as client:
            answers = await asyncio.gather(
                client.get(p.url("a.test", "/healthz")), client.get(p.url("b.test", "/healthz"))
            )
        assert [r.status_code for r in answers] == [200, 200]


def test_names_of_one_client_keep_their_own_connections(example_app: AppProcess) -> None:
    """One client, two sites on one port: each name has its own connection, SNI and
    certificate (the Host of one on the other's connection would be a 421)."""
    config = {"site": [{"hosts": ["other.test"], "upstream": "app"}]}
    with TLSProxy(upstream=example_app.server, hosts=["api.test"], config=config) as p:
        with p.client() as client:
            for host in ("api.test", "other.test", "api.test", "other.test"):
                response = client.get(p.url(host, "/"))
                assert response.status_code == 200, response.text
                assert response.json()["forwarding"]["host"] == f"{host}:{p.port}"


def test_config_merges_limits_and_is_validated_like_check(example_app: AppProcess) -> None:
    with TLSProxy(upstream=example_app.server, config={"limits": {"max_body_bytes": "1KiB"}}) as p:
        with p.client() as client:
            assert client.post(p.url(path="/echo"), content=b"x" * 2048).status_code == 413
    with pytest.raises(ConfigError) as caught:
        TLSProxy(upstream=example_app.server, config={"limits": {"idle_timeuot": "1s"}}).start()
    assert caught.value.key == "limits.idle_timeuot"


def test_reload_rewrites_the_config_and_waits_for_the_proxy(example_app: AppProcess) -> None:
    with TLSProxy(upstream=example_app.server, hosts=["api.test"]) as p:
        with p.client() as client:
            assert client.get(p.url("api.test", "/healthz")).status_code == 200
        p.reload(config={"site": [{"hosts": ["new.test"], "upstream": "app"}]})
        with p.client() as client:
            assert client.get(p.url("new.test", "/healthz")).status_code == 200
        with pytest.raises(ConfigError) as caught:
            p.reload(config={"upstream": {"app": {"servers": ["not an address"]}}})
        assert caught.value.key == "upstream.app.servers[0]"
        # The proxy's own refusal (here: the file broken behind the API's back) is raised too.
        p.config_file.write_text(p.config_file.read_text() + "\n[nonsense]\n")
        with pytest.raises(RuntimeError, match=r"reload failed.*nonsense"):
            p.reload()
        with p.client() as client:  # the previous config still serves
            assert client.get(p.url("new.test", "/healthz")).status_code == 200


def test_renew_serves_a_fresh_leaf(example_app: AppProcess) -> None:
    with TLSProxy(upstream=example_app.server, hosts=["api.test"]) as p:
        before = served_serial(p, "api.test")
        renewed = p.renew("api.test")
        assert int(renewed["serial"], 16) == served_serial(p, "api.test") != before


def served_serial(p: TLSProxy, host: str) -> int:
    from cryptography import x509

    with socket.create_connection(("127.0.0.1", p.port)) as raw:
        with p.ssl_context().wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_shared_ca_is_one_trust_anchor(tmp_path, example_app: AppProcess) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    with TLSProxy(upstream=example_app.server, ca=ca) as one:
        with TLSProxy(upstream=example_app.server, ca=ca) as two:
            context = ca.ssl_context()
            for p in (one, two):
                with socket.create_connection(("127.0.0.1", p.port)) as raw:
                    context.wrap_socket(raw, server_hostname="localhost").close()
            assert one.ca_file.read_bytes() == ca.ca_file.read_bytes()


def test_stop_leaves_nothing_behind(example_app: AppProcess) -> None:
    p = TLSProxy(app="tests.integration.testing.inprocess_app:app")
    with pytest.raises(KeyError), p:  # a test that fails inside the block
        proxy_pid = p._proc.pid  # type: ignore[union-attr]
        worker_pids = [int(line.split("started pid ")[1].split()[0])
                       for line in p.logs().splitlines() if "started pid" in line]  # fmt: skip
        directory = p.directory
        raise KeyError("the test failed")
    assert worker_pids
    for pid in [proxy_pid, *worker_pids]:
        assert ended(pid), f"process {pid} outlived the proxy's stop"
    assert directory is not None and not directory.exists()
    with socket.socket() as probe:  # the port is free again
        assert probe.connect_ex(("127.0.0.1", p.port)) != 0


def ended(pid: int, timeout: float = 5.0) -> bool:
    """Whether `pid` exits within `timeout`. A zombie counts as ended: an orphan waits there
    until this container's PID 1 reaps it, which may take a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_the_proxy_dies_with_the_test_process(tmp_path, example_app: AppProcess) -> None:
    script = (
        "import sys, time\n"
        "from proxy.testing import TLSProxy\n"
        f"p = TLSProxy(upstream={example_app.server!r}, directory={str(tmp_path)!r}).start()\n"
        "print(p._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    test_process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        proxy_pid = int(test_process.stdout.readline())  # type: ignore[union-attr]
        test_process.send_signal(signal.SIGKILL)  # no cleanup code runs
        test_process.wait(10)
        if not ended(proxy_pid):
            os.kill(proxy_pid, signal.SIGKILL)
            pytest.fail("the proxy outlived the test process that started it")
    finally:
        test_process.kill()


def test_an_app_that_cannot_start_is_a_start_error_with_the_log() -> None:
    with pytest.raises(StartError) as caught:
        TLSProxy(app="no_such_module_anywhere:app", start_timeout=30).start()
    assert "no_such_module_anywhere" in str(caught.value)


def test_client_passes_other_arguments_to_httpx(example_app: AppProcess) -> None:
    with TLSProxy(upstream=example_app.server, hosts=["api.test"]) as p:
        with p.client(base_url=p.url("api.test"), headers={"x-test": "1"}) as client:
            assert isinstance(client, httpx.Client)
            response = client.get("/")
        assert ["x-test", "1"] in response.json()["headers"]
