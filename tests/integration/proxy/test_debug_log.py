"""`--log-level debug` says why a connection got the default site's certificate, and which
connections closed before sending a request (peer, how long they were open); at info, neither
line is written."""

from __future__ import annotations

import re
import socket
import ssl
import time

from tests.integration.harness import AppProcess, basic_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import s_client


def test_default_site_fallback_and_closed_before_a_request_at_debug(
    make_proxy: MakeProxy, example_app: AppProcess
) -> None:
    proxy = make_proxy(basic_config(example_app.server))

    assert s_client(proxy.port, "-noservername").returncode == 0
    proxy.wait_for_log(
        r"127\.0\.0\.1:\d+: served the default site's certificate \('localhost'\): "
        r"the client sent no SNI"
    )
    assert s_client(proxy.port, "-servername", "nobody.test").returncode == 0
    proxy.wait_for_log(
        r"served the default site's certificate \('localhost'\): SNI 'nobody\.test' is no "
        r"site's name"
    )
    # A client with its own name gets no such line.
    before = proxy.log().count("served the default site's certificate")
    assert s_client(proxy.port, "-servername", "app.test").returncode == 0
    # s_client's connections sent no request: each is said to have closed before one.
    closes = proxy.wait_for_log(
        r"127\.0\.0\.1:(\d+): connection closed before a request, open (\d+\.\d+)s, "
        r"sni=app\.test: the client closed it"
    )
    assert float(closes.group(2)) < 10
    assert proxy.log().count("served the default site's certificate") == before

    # Half a request head, then the client goes: the bytes are said too.
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        context = ssl.create_default_context(cafile=str(proxy.ca))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: local")
            time.sleep(0.3)
    proxy.wait_for_log(r"connection closed before a request \(27 bytes of a request head\)")

    # A connection with a request is not reported.
    time.sleep(0.3)
    reported = proxy.log().count("closed before a request")
    with proxy.client() as client:
        assert client.get(proxy.url("/healthz")).status_code == 200
    time.sleep(0.3)
    assert proxy.log().count("closed before a request") == reported


def test_nothing_of_it_at_info(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(basic_config(example_app.server), start=False)
    proxy.log_level = "info"
    proxy.start()
    assert s_client(proxy.port, "-noservername").returncode == 0
    with proxy.client() as client:  # a request after it: the log has caught up with s_client
        assert client.get(proxy.url("/healthz")).status_code == 200
    log = proxy.log()
    assert "default site's certificate" not in log
    assert not re.search("closed before a request", log)
