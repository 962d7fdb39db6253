"""The TLS layer against odd and hostile clients: real `openssl s_client` and raw sockets
against a real proxy. What each case does is what the README documents."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import AppProcess
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, proxy_config


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, example_app: AppProcess) -> Iterator[Proxy]:
    proxy = make_module_proxy(
        proxy_config(
            [(["localhost"], "app"), (["xn--bcher-kva.test"], "app")],
            {"app": example_app.server},
            default_site="localhost",
            limits='handshake_timeout = "1s"\n',
        )
    )
    yield proxy
    log = proxy.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def s_client(proxy: Proxy, *args: str, stdin: bytes = b"", timeout: float = 10) -> str:
    result = subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}"),
            *("-CAfile", str(proxy.ca), *args),
        ],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return (result.stdout + result.stderr).decode(errors="replace")


def served(proxy: Proxy) -> None:
    """The proxy still answers an ordinary client."""
    with proxy.client() as client:
        assert client.get(proxy.url("/healthz")).text == "ok"


def subject(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith("subject="):
            return line.split("=", 1)[1].replace(" ", "")
    return None


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused(proxy: Proxy, version: str) -> None:
    # SECLEVEL=0 so that the client would offer them: the refusal is the proxy's.
    out = s_client(proxy, version, "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost")
    assert "Cipher is (NONE)" in out
    assert subject(out) is None
    served(proxy)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_tls_1_2_and_1_3_are_served(proxy: Proxy, version: str) -> None:
    out = s_client(proxy, version, "-servername", "localhost")
    assert "Verify return code: 0 (ok)" in out
    assert subject(out) == "CN=localhost"


def test_client_initiated_renegotiation_is_refused(proxy: Proxy) -> None:
    out = s_client(proxy, "-tls1_2", "-servername", "localhost", stdin=b"R\n", timeout=15)
    assert "RENEGOTIATING" in out  # the client asked
    assert "no renegotiation" in out  # and the proxy's alert said no
    served(proxy)


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("localhost.", "CN=localhost"),  # a trailing dot is the same name
        ("LOCALHOST", "CN=localhost"),  # names are case-insensitive
        ("xn--bcher-kva.test", "CN=xn--bcher-kva.test"),  # punycode is just a name
        ("127.0.0.1", "CN=localhost"),  # an IP literal (RFC 6066 forbids it): default site
        ("a" * 64 + ".test", "CN=localhost"),  # an over-long label: an unknown name
        (("a" * 60 + ".") * 4 + "abc", "CN=localhost"),  # a 247-byte name: unknown too
        (None, "CN=localhost"),  # no SNI at all: the default site
    ],
)
def test_sni_oddities(proxy: Proxy, sni: str | None, expected: str) -> None:
    args = ["-servername", sni] if sni is not None else ["-noservername"]
    assert subject(s_client(proxy, *args)) == expected


def test_a_handshake_that_never_completes_is_cut_at_handshake_timeout(proxy: Proxy) -> None:
    client_hello_start = bytes.fromhex("160301020001")  # a record and a ClientHello, cut short
    for first in (b"", client_hello_start):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(first)
            start = time.monotonic()
            try:
                data = sock.recv(100)
            except ConnectionResetError:
                data = b""
            assert data == b""
            assert time.monotonic() - start < 3.5  # handshake_timeout is 1 s
    served(proxy)


def test_garbage_instead_of_a_client_hello_does_no_harm(proxy: Proxy) -> None:
    garbage = [
        os.urandom(200),
        b"\x16\x03\x01\xff\xff" + os.urandom(100),  # a record that announces 64 KiB
        bytes.fromhex("8080010301005700000020") + os.urandom(50),  # an SSLv2-style hello
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert before anything
        b"\x17\x03\x03\x00\x10" + os.urandom(16),  # application data before a handshake
        b"\x00" * 1000,
    ]
    for _ in range(10):
        for data in garbage:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                try:
                    sock.sendall(data)
                    while sock.recv(4096):
                        pass
                except OSError:
                    pass
    served(proxy)
    assert proxy.proc is not None and proxy.proc.poll() is None
