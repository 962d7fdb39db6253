"""`[server] admin` as the CLI and a SIGHUP meet it, with real `tlsproxy run` processes:
`tlsproxy status` and `tlsproxy certs` read the running proxy's /status and /certs (shown by
taking the control socket away), a unix-socket endpoint is 0600, and a reload moves the
endpoint, or turns it off, without a restart."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import stat
import time
from pathlib import Path

from tests.integration.harness import free_port, tlsproxy, write_config
from tests.integration.proxy.conftest import MakeProxy


def config_text(data: Path, admin: str | None) -> str:
    line = f'admin = "{admin}"' if admin else ""
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "{data}"
{line}

[[site]]
hosts = ["localhost", "app.test"]
upstream = "app"

[upstream.app]
servers = ["127.0.0.1:{free_port()}"]
"""


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_status_and_certs_ask_the_admin_endpoint(make_proxy: MakeProxy, tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    text = config_text(data, f"127.0.0.1:{port}")
    proxy = make_proxy(text)
    config = write_config(tmp_path / "cli", text)
    through_control = tlsproxy("status", "-c", str(config))
    assert through_control.returncode == 0, through_control.stderr
    stored = tlsproxy("certs", "-c", str(config))
    # Without its control socket the proxy can only be asked through the admin endpoint.
    (data / "control.sock").unlink()
    assert tlsproxy("status", "--data-dir", str(data)).returncode == 3
    status = tlsproxy("status", "-c", str(config))
    assert status.returncode == 0, status.stderr
    assert f"tlsproxy pid {proxy.pid}, up " in status.stdout
    assert status.stdout.splitlines()[1:] == through_control.stdout.splitlines()[1:]
    certs = tlsproxy("certs", "-c", str(config))
    assert certs.returncode == 0, certs.stderr
    assert certs.stdout.startswith("localhost,app.test  source=internal  issuer=CN=tlsproxy local")
    assert certs.stdout == stored.stdout  # the same line, whichever way it was found
    code, body = get(port, "/certs")
    assert code == 200 and b'"hosts": ["localhost", "app.test"]' in body

    proxy.signal(signal.SIGTERM)
    assert proxy.proc is not None and proxy.proc.wait(15) == 0
    assert refused(port)
    after = tlsproxy("status", "-c", str(config))
    assert after.returncode == 3, after
    assert tlsproxy("certs", "-c", str(config)).stdout == stored.stdout  # read from data_dir


def test_a_unix_socket_endpoint_is_the_users_alone(make_proxy: MakeProxy, tmp_path: Path) -> None:
    data = tmp_path / "data"
    sock_path = tmp_path / "admin.sock"
    proxy = make_proxy(config_text(data, f"unix:{sock_path}"))
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\ntlsproxy_build_info{version=" in reply
    proxy.stop()
    assert not sock_path.exists()  # a clean stop leaves no socket behind


def test_a_reload_moves_the_endpoint_and_turns_it_off(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first, second = free_port(), free_port()
    proxy = make_proxy(config_text(data, f"127.0.0.1:{first}"))
    assert get(first, "/metrics")[0] == 200

    proxy.config_file.write_text(config_text(data, f"127.0.0.1:{second}"))
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded .*: 1 site", start=mark)
    assert refused(first)
    code, body = get(second, "/metrics")
    # the counters belong to the process: the reload is counted on the new address
    assert code == 200 and b'tlsproxy_config_reloads_total{result="success"} 1' in body

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        busy = taken.getsockname()[1]
        proxy.config_file.write_text(config_text(data, f"127.0.0.1:{busy}"))
        mark = len(proxy.log())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"the admin endpoint stays where it was", start=mark)
        assert get(second, "/metrics")[0] == 200  # a bad address loses nothing
    finally:
        taken.close()

    proxy.config_file.write_text(config_text(data, None))
    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"admin endpoint off", start=mark)
    time.sleep(0.1)
    assert refused(second)
