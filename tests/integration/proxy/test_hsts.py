"""`[[site]] hsts`: Strict-Transport-Security on the site's HTTPS responses, seen by curl over
real TLS: exactly one header, the configured one, whether the app sent its own or not, on the
fast path (the app's head passed on as is) and the rebuilt one (hop-by-hop fields, HTTP/1.0),
on the proxy's own 502; never on the plain-HTTP redirect port (RFC 6797 7.2); and a site
without it is left as the app made it."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from tests.integration.harness import free_port, tlsproxy, write_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, TcpServer

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")

POLICY = "max-age=300; includeSubDomains"

RESPONSES = {
    # no hop-by-hop field: the proxy passes the app's head bytes on
    b"/plain": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/own": b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\nX-App: 1\r\n"
    b"Content-Length: 2\r\n\r\nok",
    # Connection naming a field: the head is rebuilt field by field
    b"/hop": b"HTTP/1.1 200 OK\r\nConnection: x-drop\r\nX-Drop: 1\r\n"
    b"strict-transport-security: max-age=1\r\nContent-Length: 2\r\n\r\nok",
    b"/http10": b"HTTP/1.0 200 OK\r\nStrict-Transport-Security: max-age=1\r\n"
    b"Content-Length: 2\r\n\r\nok",
}


class Canned(TcpServer):
    """Answers each request with the response its path names (one request per connection)."""

    def serve(self, conn: socket.socket, buf: bytearray) -> None:
        while b"\r\n\r\n" not in buf:
            if not self.recv(conn, buf):
                return
        path = bytes(buf).split(b" ", 2)[1]
        conn.sendall(RESPONSES[path])


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy) -> Proxy:
    app = Canned().start()
    config = f"""
[server]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
data_dir = "data"

[[site]]
hosts = ["hsts.test"]
upstream = "app"
hsts = "{POLICY}"

[[site]]
hosts = ["down.test"]
upstream = "down"
hsts = "{POLICY}"

[[site]]
hosts = ["plain.test"]
upstream = "app"

[upstream.app]
servers = ["{app.server}"]
retry_idempotent = false

[upstream.down]
servers = ["127.0.0.1:{free_port()}"]
"""
    return make_module_proxy(config)


def head(
    proxy: Proxy, host: str, path: str, *, https: bool = True, version: str = "--http1.1"
) -> list[str]:
    """The response head's lines, as curl received them (`version`: --http1.1 or --http2)."""
    port = proxy.port if https else proxy.http_port
    scheme = "https" if https else "http"
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--max-time", "10", "--include", version,
            "--cacert", str(proxy.ca),
            "--resolve", f"{host}:{port}:127.0.0.1",
            f"{scheme}://{host}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n\n", 1)[0].splitlines()  # text mode: CRLF read as LF


def sts(lines: list[str]) -> list[str]:
    return [
        line.split(":", 1)[1].strip()
        for line in lines
        if line.lower().startswith("strict-transport-security:")
    ]


STATUS_LINE = {"--http1.1": "HTTP/1.1", "--http2": "HTTP/2"}


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
@pytest.mark.parametrize("path", ["/plain", "/own", "/hop", "/http10"])
def test_the_configured_header_and_only_it(proxy: Proxy, path: str, version: str) -> None:
    lines = head(proxy, "hsts.test", path, version=version)
    assert lines[0].startswith(f"{STATUS_LINE[version]} 200")
    assert sts(lines) == [POLICY]
    if path == "/own":
        # the other fields are untouched (HTTP/2 names are lowercase)
        assert "x-app: 1" in [line.lower() for line in lines]
    if path == "/hop":
        assert not any(line.lower().startswith("x-drop") for line in lines)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_the_proxys_own_error_carries_it(proxy: Proxy, version: str) -> None:
    lines = head(proxy, "down.test", "/", version=version)
    assert lines[0].startswith(f"{STATUS_LINE[version]} 502")
    assert sts(lines) == [POLICY]


def test_never_on_the_plain_http_port(proxy: Proxy) -> None:
    lines = head(proxy, "hsts.test", "/plain", https=False)
    assert lines[0].startswith("HTTP/1.1 308")
    assert sts(lines) == []


def test_a_site_without_it_keeps_what_the_app_sent(proxy: Proxy) -> None:
    assert sts(head(proxy, "plain.test", "/plain")) == []
    assert sts(head(proxy, "plain.test", "/own")) == ["max-age=1"]
    assert sts(head(proxy, "plain.test", "/hop")) == ["max-age=1"]


def test_check_shows_it(proxy: Proxy) -> None:
    result = tlsproxy("check", "-c", str(proxy.config_file))
    assert result.returncode == 0, result.stderr
    assert f"site hsts.test: tls=internal hsts='{POLICY}' -> upstream app" in result.stdout
    assert "site plain.test: tls=internal -> upstream app" in result.stdout


@pytest.mark.parametrize(
    "value",
    ['"includeSubDomains"', '"max-age=abc"', '"max-age=1; includeSubdomain"', "300", '""'],
)
def test_a_bad_value_exits_2_naming_the_key(tmp_path, value: str) -> None:
    config = write_config(
        tmp_path,
        f"""
[[site]]
hosts = ["a.test"]
upstream = "app"

[[site]]
hosts = ["b.test"]
upstream = "app"
hsts = {value}

[upstream.app]
servers = ["127.0.0.1:9"]
""",
    )
    for command in ("check", "run"):
        result = tlsproxy(command, "-c", str(config))
        assert result.returncode == 2
        assert result.stderr.startswith("tlsproxy: error: site[1].hsts: "), result.stderr
        assert len(result.stderr.splitlines()) == 1
