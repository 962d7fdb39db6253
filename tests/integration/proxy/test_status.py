"""`tlsproxy status`, asked of real `tlsproxy run` and `reverse-proxy` processes through their
control socket: exit 3 (one line) when no proxy runs, before and after one did; the proxy's
listeners, sites, certificates and upstreams when one runs without supervised workers; exit 4
when something holds the socket but does not answer."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

from tests.integration.harness import ProxyProcess, free_port, tlsproxy, write_config
from tests.integration.proxy.conftest import MakeProxy


def config_text(data: Path, upstream: str) -> str:
    return f"""
[server]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
data_dir = "{data}"

[[site]]
hosts = ["localhost", "app.test"]
upstream = "app"
hsts = "max-age=300"

[upstream.app]
servers = ["{upstream}"]
"""


def test_no_proxy_exits_3_then_a_running_one_is_shown(make_proxy: MakeProxy, tmp_path: Path):
    data = tmp_path / "data"
    upstream = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "cfg", config_text(data, upstream))
    before = tlsproxy("status", "-c", str(config))
    assert before.returncode == 3, before
    assert before.stdout == f"tlsproxy: no proxy is running on data_dir {data}\n"
    assert before.stderr == ""

    proxy = make_proxy(config_text(data, upstream))
    result = tlsproxy("status", "-c", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"tlsproxy pid {proxy.pid}, up " in out
    assert f"https://127.0.0.1:{proxy.port}" in out and f"http://127.0.0.1:{proxy.http_port}" in out
    site = next(line for line in out.splitlines() if line.startswith("  localhost, app.test"))
    assert "tls internal, certificate until " in site and "tlsproxy local intermediate" in site
    assert "hsts 'max-age=300'" in site
    assert f"  app: {upstream} (up)" in out
    assert out.endswith("no supervised workers\n")
    # --data-dir asks the same proxy without its config (the first line has the uptime)
    by_dir = tlsproxy("status", "--data-dir", str(data))
    assert by_dir.returncode == 0
    assert by_dir.stdout.splitlines()[1:] == out.splitlines()[1:]

    proxy.signal(signal.SIGTERM)
    assert proxy.proc is not None and proxy.proc.wait(15) == 0
    after = tlsproxy("status", "-c", str(config))
    assert after.returncode == 3 and len(after.stdout.splitlines()) == 1


def test_a_reverse_proxy_is_found_by_its_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    proxy = ProxyProcess(
        tmp_path / "rp",
        log_level="info",
        command=["reverse-proxy", "--from", f"app.test:{port}", "--to", ":9", "--data-dir",
                 str(data)],
    )  # fmt: skip
    try:
        proxy.start()
        result = tlsproxy("status", "--data-dir", str(data))
        assert result.returncode == 0, result.stderr
        assert "config (no config file: reverse-proxy)" in result.stdout
        assert f"listening: https://0.0.0.0:{port}" in result.stdout
        assert "  app.test -> app: tls internal, certificate until " in result.stdout
    finally:
        proxy.stop()


def test_a_socket_that_does_not_answer_exits_4(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(data / "control.sock"))
    listener.listen()

    def close_each() -> None:
        try:
            conn, _ = listener.accept()
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    try:
        result = tlsproxy("status", "--data-dir", str(data))
    finally:
        listener.close()
        thread.join(5)
    assert result.returncode == 4
    assert result.stderr.startswith("tlsproxy: error: ") and len(result.stderr.splitlines()) == 1


def test_status_needs_a_config_or_a_data_dir() -> None:
    result = tlsproxy("status")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
