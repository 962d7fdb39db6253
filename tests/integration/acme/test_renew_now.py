"""`tlsproxy certs renew HOST` for tls = "acme" sites, against real Pebble and named: the command
returns 0 once the running proxy has taken the request, the proxy orders at once (HTTP-01 on
its own listener, DNS-01 through named) and serves the new certificate from the next handshake;
an order that cannot succeed shows its error in `tlsproxy certs` while the old certificate
keeps being served, and a renew after the cause is fixed succeeds."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.integration.harness import tlsproxy
from tests.integration.proxy.support import served_certificate

from .helpers import wait_for
from .test_run import _certs_lines, _config, _site

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _serial(port: int, name: str) -> int | None:
    """The serial `openssl s_client` is served for `name`, None if the handshake failed."""
    cert = served_certificate(port, "-servername", name)
    return None if cert is None else cert.serial_number


async def _new_serial(port: int, name: str, old: int, limit: float = 20.0) -> int:
    async def changed() -> int:
        while True:
            serial = await asyncio.to_thread(_serial, port, name)
            if serial is not None and serial != old:
                return serial
            await asyncio.sleep(0.2)

    return await asyncio.wait_for(changed(), limit)


def _renew(config, host: str):
    return tlsproxy("certs", "renew", host, "-c", str(config), timeout=30)


async def test_renew_orders_at_once_by_http01_and_dns01(components, proxies, tmp_path):
    c = components()
    config = _config(c, tmp_path / "p", _site("app.test") + "\n" + _site("*.api.test"))
    proxy = proxies(config)
    proxy.wait_for_log(r"certificate for app\.test issued", 20)
    proxy.wait_for_log(r"certificate for \*\.api\.test issued", 20)

    for host, name, challenge in (
        ("app.test", "app.test", "http-01"),
        ("x.api.test", "*.api.test", "dns-01"),
    ):
        before = _serial(proxy.port, host)
        assert before is not None
        orders = proxy.log().count(f"ordering a certificate for {name} ")
        done = _renew(config, host)
        assert done.returncode == 0, done.stderr
        assert f"renewal of {host} (site {name}) requested from {c.directory}" in done.stdout
        after = await _new_serial(proxy.port, host, before)
        assert after != before
        log = proxy.log()
        assert log.count(f"ordering a certificate for {name} ") == orders + 1
        assert "renewal requested (tlsproxy certs renew)" in log
        line = _certs_lines(config)[name]
        assert "Pebble Intermediate" in line and "last_error=-" in line, (challenge, line)
    # Nothing more is ordered once the requests are served: the schedule is back to normal.
    assert proxy.log().count("ordering a certificate for") == 4


async def test_failed_renew_shows_the_error_keeps_serving_and_succeeds_once_fixed(
    components, proxies, tmp_path
):
    c = components()
    config = _config(c, tmp_path / "p", _site("app.test"))
    proxy = proxies(config)
    proxy.wait_for_log(r"certificate for app\.test issued", 20)
    before = _serial(proxy.port, "app.test")
    assert before is not None

    # Pebble resolves names only through this named: without it the challenge cannot succeed,
    # as when the name's DNS record points elsewhere.
    assert c.named is not None
    c.named.terminate()
    c.named.wait(10)
    c.named = None
    done = _renew(config, "app.test")
    assert done.returncode == 0, done.stderr
    proxy.wait_for_log(r"ACME order for app\.test failed", 30)

    def failed_line() -> str | None:
        line = _certs_lines(config)["app.test"]
        return line if "last_error=-" not in line else None

    line = await wait_for(failed_line, 10, "the error in `tlsproxy certs`")
    assert "still serving serial" in proxy.log()
    assert "app.test" in line and "Pebble Intermediate" in line, line
    assert _serial(proxy.port, "app.test") == before

    c.start_named()
    done = _renew(config, "app.test")
    assert done.returncode == 0, done.stderr
    after = await _new_serial(proxy.port, "app.test", before)
    assert after != before
    assert "last_error=-" in _certs_lines(config)["app.test"]


def test_renew_of_an_unknown_host_is_exit_1(components, proxies, tmp_path):
    c = components()
    config = _config(c, tmp_path / "p", _site("app.test"))
    proxies(config)
    done = _renew(config, "nowhere.test")
    assert done.returncode == 1
    assert "nowhere.test is not a host of any [[site]]" in done.stderr
