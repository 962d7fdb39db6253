"""`tlsproxy reverse-proxy --from HOST[:PORT] --to ADDR`, the real process: curl over real TLS
trusting the local CA it made, a real uvicorn app behind it, the ports it binds (and the ones it
does not), and bad arguments refused with one line and exit 2 before anything starts."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import AppProcess, ProxyProcess, free_port, tlsproxy

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")

StartReverseProxy = Callable[..., ProxyProcess]


@pytest.fixture
def reverse_proxy(tmp_path: Path) -> Iterator[StartReverseProxy]:
    """reverse_proxy(*flags, env={...}) -> a started `tlsproxy reverse-proxy FLAGS` process,
    stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ProxyProcess:
        names = tmp_path / f"reverse-proxy{len(started)}"
        proxy = ProxyProcess(names, log_level="info", command=["reverse-proxy", *flags], env=env)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def get(url: str, host: str, port: int, ca: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return curl("--cacert", str(ca), "--resolve", f"{host}:{port}:127.0.0.1", *extra, url)


def test_a_test_name_gets_the_local_ca_and_reaches_the_app(
    reverse_proxy: StartReverseProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    port = free_port()
    data = tmp_path / "data"
    proxy = reverse_proxy(
        "--from", f"app.test:{port}", "--to", example_app.server, "--data-dir", str(data)
    )
    root = data / "ca" / "root.pem"
    assert f"clients trust {root}" in proxy.log()
    result = get(f"https://app.test:{port}/", "app.test", port, root)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["forwarding"]["x-forwarded-proto"] == "https"
    assert body["forwarding"]["host"] == f"app.test:{port}"
    # An explicit port binds that port only: https, and no plain-HTTP listener.
    assert ("0.0.0.0", port) in proxy.https and proxy.http == []
    assert {p for _, p in proxy.https} == {port}  # [::] too where there is IPv6
    if ("::", port) in proxy.https:  # and IPv6 clients reach it
        v6 = curl("--cacert", str(root), "--resolve", f"app.test:{port}:[::1]",
                  f"https://app.test:{port}/pid")  # fmt: skip
        assert v6.returncode == 0 and v6.stdout.isdigit(), v6.stderr
    # The same proxy `run` starts: SIGHUP reloads (certificates; the flags stay), SIGTERM
    # drains and exits 0.
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded reverse-proxy's flags: 1 site\(s\)")
    again = get(f"https://app.test:{port}/pid", "app.test", port, root)
    assert again.returncode == 0 and again.stdout.isdigit(), again.stderr
    proxy.signal(signal.SIGTERM)
    assert proxy.proc is not None and proxy.proc.wait(15) == 0


def test_a_localhost_name_listens_on_loopback_only_and_to_accepts_port_and_unix(
    reverse_proxy: StartReverseProxy, example_app: AppProcess, uds_app: AppProcess, tmp_path: Path
) -> None:
    # No --data-dir: $XDG_DATA_HOME/tlsproxy holds the local CA.
    xdg = tmp_path / "xdg"
    port = free_port()
    assert example_app.port is not None
    proxy = reverse_proxy(
        "--from",
        f"app.localhost:{port}",
        "--to",
        f":{example_app.port}",
        env={"XDG_DATA_HOME": str(xdg)},
    )
    root = xdg / "tlsproxy" / "ca" / "root.pem"
    assert {h for h, _ in proxy.https} <= {"127.0.0.1", "::1"}  # loopback only
    assert ("127.0.0.1", port) in proxy.https
    result = get(f"https://app.localhost:{port}/pid", "app.localhost", port, root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.isdigit()

    port2 = free_port()
    reverse_proxy(
        "--from",
        f"https://app.test:{port2}",
        "--to",
        uds_app.server,
        "--data-dir",
        str(xdg / "tlsproxy"),
    )
    result = get(f"https://app.test:{port2}/healthz", "app.test", port2, root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok"


def test_an_ip_address_is_served_without_sni(
    reverse_proxy: StartReverseProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    """Clients send no SNI to an IP literal: the one site answers anyway, and its certificate
    from the local CA names the address (an IP SAN), so curl verifies it."""
    port = free_port()
    data = tmp_path / "data"
    reverse_proxy(
        "--from", f"127.0.0.1:{port}", "--to", example_app.server, "--data-dir", str(data)
    )
    result = curl("--cacert", str(data / "ca" / "root.pem"), f"https://127.0.0.1:{port}/pid")
    assert result.returncode == 0, result.stderr
    assert result.stdout.isdigit()


def test_http_port_adds_the_redirect_port(
    reverse_proxy: StartReverseProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    port, plain = free_port(), free_port()
    proxy = reverse_proxy(
        "--from",
        f"app.test:{port}",
        "--to",
        example_app.server,
        "--http-port",
        str(plain),
        "--data-dir",
        str(tmp_path / "data"),
        "--access-log",
        "off",
    )
    assert ("0.0.0.0", plain) in proxy.http and {p for _, p in proxy.http} == {plain}
    result = curl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: app.test",
        f"http://127.0.0.1:{plain}/a?b=1",
    )
    assert result.stdout == f"308 https://app.test:{port}/a?b=1"
    ok = get(f"https://app.test:{port}/pid", "app.test", port, tmp_path / "data/ca/root.pem")
    assert ok.returncode == 0, ok.stderr
    assert proxy.access_log() == ""  # --access-log off


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--to", ":8000"], "--from"),
        (["--from", "app.test:8443"], "--to"),
        (["--from", "app.test:70000", "--to", ":8000"], "--from"),
        (["--from", "bad name:8443", "--to", ":8000"], "--from"),
        (["--from", "http://app.test:8443", "--to", ":8000"], "--from"),
        (["--from", "*.example.com", "--to", ":8000"], "--from"),
        (["--from", "app.test:8443", "--to", "nowhere"], "--to"),
        (["--from", "app.test:8443", "--to", ":8000", "--http-port", "x"], "--http-port"),
        (["--from", "app.test:8443", "--to", ":8000", "--email", "a@b.test"], "--email"),
        (["--from", "app.example.com:8443", "--to", ":8000"], "--http-port 80"),
        (
            ["--from", "app.example.com", "--to", ":8000", "--staging", "--directory", "https://x"],
            "--staging",
        ),
        (["--from", "app.test:8443", "--to", ":8000", "--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(flags: list[str], named: str, tmp_path: Path) -> None:
    result = tlsproxy("reverse-proxy", *flags, "--data-dir", str(tmp_path / "data"), timeout=30)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsproxy: error: "), result.stderr
    assert named in lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_unusable_files_exit_2_naming_the_flag(tmp_path: Path) -> None:
    """Checked at start-up like a config's files: one error line (after the line saying which
    CA signs the name), exit 2, nothing bound."""
    (tmp_path / "file").write_text("")
    cases = [
        (["--from", "app.test:8443", "--data-dir", str(tmp_path / "file" / "data")], "--data-dir"),
        (
            ["--from", "app.example.com:8443", "--http-port", "8080", "--data-dir",
             str(tmp_path / "d"), "--ca-bundle", str(tmp_path / "missing.pem")],
            "--ca-bundle",
        ),
    ]  # fmt: skip
    for flags, named in cases:
        result = tlsproxy("reverse-proxy", *flags, "--to", ":8000", timeout=30)
        assert result.returncode == 2, result
        last = result.stderr.splitlines()[-1]
        assert last.startswith(f"tlsproxy: error: {named}: "), result.stderr
        assert "Traceback" not in result.stderr


def test_a_taken_port_exits_1(example_app: AppProcess, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = tlsproxy(
            "reverse-proxy",
            "--from",
            f"app.test:{port}",
            "--to",
            example_app.server,
            "--data-dir",
            str(tmp_path / "data"),
        )
    assert result.returncode == 1
    assert str(port) in result.stderr.splitlines()[-1]


def test_help_explains_the_command() -> None:
    result = tlsproxy("reverse-proxy", "--help")
    assert result.returncode == 0
    for words in ("--from HOST[:PORT]", "--to ADDR", "local CA", "--staging", "443 and 80"):
        assert words in result.stdout
    assert "reverse-proxy" in tlsproxy("--help").stdout
