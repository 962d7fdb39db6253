"""Signals to the running proxy: SIGHUP reloads without touching open connections (and survives
a broken config), SIGTERM drains in-flight requests, refuses new connections and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.integration.harness import AppProcess, basic_config, free_port
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    Proxy,
    issue,
    make_ca,
    proxy_config,
    served_certificate,
)

NEW_SITE = """
[[site]]
hosts = ["new.test"]
tls = "internal"
upstream = "app"
"""


class InFlight:
    """A request running in a thread; `result` is the httpx.Response or the exception."""

    def __init__(self, proxy: Proxy, path: str) -> None:
        self.result: httpx.Response | BaseException | None = None
        self.sent = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(proxy, path), daemon=True)
        self.thread.start()

    def _run(self, proxy: Proxy, path: str) -> None:
        try:
            with proxy.client() as client:
                client.get(proxy.url("/healthz"))  # connection and handshake done first
                self.sent.set()
                self.result = client.get(proxy.url(path))
        except BaseException as exc:
            self.result = exc
        finally:
            self.sent.set()

    def wait(self, timeout: float) -> httpx.Response | BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request never finished"
        return self.result


def start_slow(proxy: Proxy, seconds: float) -> InFlight:
    flight = InFlight(proxy, f"/slow/{seconds}")
    assert flight.sent.wait(10)
    time.sleep(0.5)  # the slow request is now at the app
    return flight


def served(proxy: Proxy, sni: str) -> int:
    with proxy.conn(sni) as conn:
        conn.send(f"GET /healthz HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
        return conn.response().status


def test_sighup_reload_keeps_the_request_in_flight_and_serves_a_new_site(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    with pytest.raises(OSError):  # not a site yet: no certificate, the handshake fails
        served(proxy, "new.test")
    flight = start_slow(proxy, 3)
    proxy.config_file.write_text(basic_config(example_app.server, extra=NEW_SITE))
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded", start=mark)
    assert served(proxy, "new.test") == 200  # verified against the local CA, so a real cert
    assert served(proxy, "app.test") == 200
    response = flight.wait(10)
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200
    assert json.loads(response.text)["slept"] == 3


def test_sighup_with_a_broken_config_keeps_the_old_one(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    for broken in (
        "[server\nthis is not TOML",
        basic_config(example_app.server, limits='idle_timeout = "soon"'),
    ):
        proxy.config_file.write_text(broken)
        mark = len(proxy.log())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"reload failed", start=mark)
        assert proxy.proc.poll() is None
        assert served(proxy, "app.test") == 200
    assert "idle_timeout" in proxy.log()[mark:]


def test_open_connections_keep_the_config_they_started_with(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    with proxy.conn("app.test") as old:
        old.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert old.response().status == 200
        # The new config sends app.test to an upstream that is down.
        proxy.config_file.write_text(basic_config(f"127.0.0.1:{free_port()}"))
        mark = len(proxy.log())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"reloaded", start=mark)
        assert served(proxy, "app.test") == 502  # a new connection: the new config
        old.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert old.response().status == 200  # the open one: untouched


def test_sigterm_drains_in_flight_requests_then_exits_0(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    idle = proxy.conn("app.test")
    idle.send(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert idle.response().status == 200
    flight = start_slow(proxy, 2)
    signalled = time.monotonic()
    proxy.signal(signal.SIGTERM)
    proxy.wait_for_log(r"draining")
    # No new connections once the signal is handled.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    # An idle keep-alive connection is closed at once, not kept for the grace period.
    waited, _ = idle.wait_closed(1.5)
    idle.close()
    assert waited is not None, "an idle connection was kept open during the drain"
    response = flight.wait(10)
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200
    assert json.loads(response.text)["slept"] == 2
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - signalled < 6
    assert "Traceback" not in proxy.log()


def test_sigterm_does_not_wait_for_idle_clients_that_never_read(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    """A pooled client connection (httpx, urllib3) reads nothing between requests, so it never
    answers the close_notify the drain sends: the drain must not wait the grace out for it."""
    proxy = make_proxy(basic_config(example_app.server))  # shutdown_grace = "5s"
    with proxy.client() as client:
        assert client.get(proxy.url("/healthz")).status_code == 200
        signalled = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0
        assert time.monotonic() - signalled < 3, "the drain waited for an idle connection"


def test_sigterm_cuts_requests_longer_than_shutdown_grace(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    config = basic_config(example_app.server).replace(
        'shutdown_grace = "5s"', 'shutdown_grace = "1s"'
    )
    proxy = make_proxy(config)
    flight = start_slow(proxy, 20)
    signalled = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - signalled < 4
    result = flight.wait(5)
    assert isinstance(result, httpx.HTTPError), result  # cut, never a complete response


def test_sigint_stops_like_sigterm(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(example_app.server))
    assert served(proxy, "app.test") == 200
    proxy.signal(signal.SIGINT)
    assert proxy.proc.wait(10) == 0
    assert "SIGINT: draining" in proxy.log()
    assert "Traceback" not in proxy.log()


def test_sighup_rereads_certificate_files(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    ca = make_ca()
    proxy = make_proxy(basic_config(example_app.server), start=False)
    certs = proxy.dir / "certs"
    first = issue(ca, ["files.test"])
    cert, key = first.write(certs, "files")
    tls = f'{{ cert = "{cert}", key = "{key}" }}'
    proxy.config_file.write_text(
        proxy_config(
            [(["localhost"], "app"), (["files.test"], "app", tls)], {"app": example_app.server}
        )
    )
    proxy.start()
    assert served_certificate(proxy.port, "-servername", "files.test").serial_number == (
        first.cert.serial_number
    )
    # Renewed files: new handshakes get the new certificate after SIGHUP.
    second = issue(ca, ["files.test"])
    second.write(certs, "files")
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded", start=mark)
    assert served_certificate(proxy.port, "-servername", "files.test").serial_number == (
        second.cert.serial_number
    )
    # An expired replacement is refused: the reload fails and the good certificate stays.
    issue(ca, ["files.test"], valid_from_days=-10, valid_until_days=-1).write(certs, "files")
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reload failed.*expired", start=mark)
    assert served_certificate(proxy.port, "-servername", "files.test").serial_number == (
        second.cert.serial_number
    )
