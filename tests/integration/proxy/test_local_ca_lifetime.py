"""`[local_ca] leaf_lifetime` in a running proxy: short leaves are renewed in the background and
new handshakes get the new one while an open connection keeps its own; a SIGHUP that shortens
the lifetime replaces a longer-lived leaf at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import timedelta

from cryptography import x509

from tests.integration.harness import AppProcess
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import proxy_config, served_certificate

# Short enough to see a renewal within a test (it comes when a third of the lifetime is left),
# long enough that issuing one (a child process, ~0.2 s) is a small part of it.
SHORT = 15.0


def config(upstream: str, lifetime: str | None) -> str:
    text = proxy_config([(["localhost"], "app")], {"app": upstream}, default_site="localhost")
    return text + (f'\n[local_ca]\nleaf_lifetime = "{lifetime}"\n' if lifetime else "")


def lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def wait_for_leaf(
    port: int, accept: Callable[[x509.Certificate], bool], timeout: float
) -> x509.Certificate:
    deadline = time.monotonic() + timeout
    while True:
        cert = served_certificate(port, "-servername", "localhost")
        if cert is not None and accept(cert):
            return cert
        if time.monotonic() > deadline:
            raise AssertionError(f"no such leaf within {timeout} s (last: {cert})")
        time.sleep(0.5)


def test_a_short_lived_leaf_is_renewed_while_connections_stay_open(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(config(example_app.server, f"{SHORT:g}s"))
    first = served_certificate(proxy.port, "-servername", "localhost")
    assert first is not None
    # The configured lifetime, plus the backdating every leaf gets (a tenth of it at most).
    assert timedelta(seconds=SHORT) <= lifetime(first) <= timedelta(seconds=SHORT * 1.1 + 1)
    with proxy.conn("localhost") as open_conn:
        open_conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert open_conn.response().status == 200
        renewed = wait_for_leaf(
            proxy.port, lambda c: c.serial_number != first.serial_number, SHORT * 1.5
        )
        assert lifetime(renewed) <= timedelta(seconds=SHORT * 1.1 + 1)
        # The connection made with the first leaf goes on (until its client closes it).
        open_conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert open_conn.response().status == 200
        peer = open_conn.sock.getpeercert(binary_form=True)
        assert peer is not None
        assert x509.load_der_x509_certificate(peer).serial_number == first.serial_number
    with proxy.client() as client:  # the new leaf chains to the same root
        assert client.get(proxy.url()).status_code == 200


def test_sighup_with_a_shorter_lifetime_replaces_a_longer_lived_leaf(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(config(example_app.server, None))
    first = served_certificate(proxy.port, "-servername", "localhost")
    assert first is not None and lifetime(first) >= timedelta(days=7)
    proxy.config_file.write_text(config(example_app.server, "1h"))
    proxy.signal(signal.SIGHUP)
    shorter = wait_for_leaf(proxy.port, lambda c: lifetime(c) < timedelta(days=1), 20)
    assert timedelta(hours=1) <= lifetime(shorter) <= timedelta(hours=1, minutes=1)
    with proxy.client() as client:
        assert client.get(proxy.url()).status_code == 200
