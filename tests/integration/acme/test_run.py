"""`tlsproxy run` with tls = "acme" against real Pebble and named: the proxy's own http
listener answers HTTP-01, DNS-01 goes through named, the proxy renews on its own without a
restart, and `tlsproxy certs` (another process) shows names, issuer, renewal and errors."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import free_port, tlsproxy, write_config

from .conftest import client_context, connect
from .helpers import verify_chain, wait_for


def _config(c, directory: Path, sites: str) -> Path:
    return write_config(
        directory,
        f"""
[server]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:{c.http_port}"]
data_dir = "{directory / "data"}"
shutdown_grace = "1s"

{sites}

[upstream.app]
servers = ["127.0.0.1:{free_port()}"]

[acme]
directory = "{c.directory}"
ca_bundle = "{c.tls.ca}"
email = "ops@example.test"

[acme.dns]
server = "127.0.0.1:{c.dns_port}"
tsig_key = "{c.tsig_key}"
propagation_timeout = "10s"
""",
    )


def _site(*hosts: str, challenge: str | None = None) -> str:
    names = ", ".join(f'"{h}"' for h in hosts)
    extra = f'challenge = "{challenge}"\n' if challenge else ""
    return f'[[site]]\nhosts = [{names}]\ntls = "acme"\nupstream = "app"\n{extra}'


def _certs_lines(config: Path) -> dict[str, str]:
    result = tlsproxy("certs", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_run_issues_by_http01_on_its_own_listener_and_dns01_then_serves(
    components, proxies, tmp_path
):
    c = components()
    config = _config(
        c, tmp_path / "p", _site("app.test", "www.app.test") + "\n" + _site("*.api.test")
    )
    proxy = proxies(config)
    proxy.wait_for_log(r"certificate for app\.test issued", 20)
    proxy.wait_for_log(r"certificate for \*\.api\.test issued", 20)
    root = tmp_path / "root.pem"
    root.write_bytes(c.root_pem())

    for name in ("app.test", "www.app.test", "x.api.test"):
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{proxy.port}",
                "-servername",
                name,
                "-verify_hostname",
                name,
                "-CAfile",
                str(root),
                "-verify_return_error",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Verify return code: 0 (ok)" in result.stdout

    lines = _certs_lines(config)
    assert "Pebble Intermediate" in lines["app.test,www.app.test"]
    assert "last_error=-" in lines["app.test,www.app.test"]
    assert "(1/3 of the lifetime left)" in lines["*.api.test"]


async def test_run_renews_without_restart_old_connection_keeps_working(
    components, proxies, tmp_path
):
    c = components(validity=15)  # due when 5 s are left: about 10 s after issuance
    proxy = proxies(_config(c, tmp_path / "p", _site("app.test")))
    pid = proxy.pid
    proxy.wait_for_log(r"certificate for app\.test issued", 20)
    ctx = client_context(c.root_pem())
    old = await connect(proxy.port, "app.test", ctx)
    first = old.leaf.serial_number

    async def new_serial() -> int:
        client = await connect(proxy.port, "app.test", ctx)
        await client.close()
        return client.leaf.serial_number

    serials: list[int] = []

    async def poll() -> None:
        while True:
            serials.append(await new_serial())
            if serials[-1] != first:
                return
            await asyncio.sleep(0.25)

    await asyncio.wait_for(poll(), 30)
    verify_chain(
        (tmp_path / "p/data/certificates/app.test/cert.pem").read_bytes(),
        c.root_pem(),
        ["app.test"],
    )
    # The connection opened before the renewal still carries traffic on its old certificate
    # (the upstream is down: the proxy answers it itself, 502, over that connection).
    old.writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    await old.writer.drain()
    status_line = await asyncio.wait_for(old.reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 502"), status_line
    await old.close()
    assert proxy.pid == pid and proxy.proc.poll() is None


async def test_run_failed_challenge_shows_in_tlsproxy_certs(components, proxies, tmp_path):
    c = components()
    # named refuses names outside "test.": Pebble cannot resolve it, the challenge fails.
    config = _config(c, tmp_path / "p", _site("app.test") + "\n" + _site("nowhere.example"))
    proxy = proxies(config)
    proxy.wait_for_log(r"certificate for app\.test issued", 20)
    proxy.wait_for_log(r"ACME order for nowhere\.example failed", 20)

    def failed_line() -> str | None:
        line = _certs_lines(config).get("nowhere.example", "")
        return line if "last_error=-" not in line else None

    line = await wait_for(failed_line, 10, "the error in `tlsproxy certs`")
    assert "urn:ietf:params:acme:error:dns" in line or "could not resolve" in line, line
    assert "retry after 1 failed attempt" in line
    # The other site is served all the while.
    client = await connect(proxy.port, "app.test", client_context(c.root_pem()))
    await client.close()
