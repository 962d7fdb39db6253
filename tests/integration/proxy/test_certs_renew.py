"""`tlsproxy certs renew HOST`: the running proxy issues a fresh certificate now and serves it
from the next handshake on; unknown hosts and a proxy that is not running are exit 1."""

from __future__ import annotations

from tests.integration.harness import AppProcess, basic_config, tlsproxy
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import served_certificate


def test_renew_serves_a_new_leaf_at_once(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    before = served_certificate(proxy.port, "-servername", "app.test")
    assert before is not None
    done = tlsproxy("certs", "renew", "app.test", "-c", str(proxy.config_file))
    assert done.returncode == 0, done.stderr
    after = served_certificate(proxy.port, "-servername", "app.test")
    assert after is not None and after.serial_number != before.serial_number
    assert f"serial {after.serial_number:x}" in done.stdout
    assert "issued certificate for localhost" in proxy.log()


def test_renew_refuses_an_unknown_host(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    done = tlsproxy("certs", "renew", "nowhere.test", "-c", str(proxy.config_file))
    assert done.returncode == 1
    assert "nowhere.test is not a host of any [[site]]" in done.stderr


def test_renew_without_a_running_proxy_is_exit_1(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server), start=False)
    done = tlsproxy("certs", "renew", "app.test", "-c", str(proxy.config_file))
    assert done.returncode == 1
    assert "no running proxy answers" in done.stderr
