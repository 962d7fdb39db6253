"""The pytest plugin as a user meets it: a test file of their own, in a directory of their own,
run by pytest in a subprocess; installing tlsproxy is all it takes to have the fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_TESTS = """
import socket

import pytest

state = {"requests": 0}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    state["requests"] += 1
    body = f"{scope['scheme']} {scope['client'][0]}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_app_behind_tls(tlsproxy):
    p = tlsproxy(app=app, hosts=["api.test"])
    assert p.client().get(p.url("api.test", "/")).text == "https 127.0.0.1"
    assert state["requests"] == 1


def test_every_proxy_shares_the_session_ca(tlsproxy, tlsproxy_ca):
    first, second = tlsproxy(app=app), tlsproxy(app=app, hosts=["other.test"])
    context = tlsproxy_ca.ssl_context()
    for p, name in ((first, "localhost"), (second, "other.test")):
        with socket.create_connection(("127.0.0.1", p.port)) as raw:
            context.wrap_socket(raw, server_hostname=name).close()


@pytest.mark.xfail(strict=True, reason="shows the proxy's log on failure")
def test_a_failure_shows_the_log(tlsproxy):
    p = tlsproxy(app=app)
    assert p.client().get(p.url(path="/")).status_code == 500
"""


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_fixtures_come_with_the_installed_package(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    done = run_pytest(tmp_path, "-rxX", "-v", "test_user.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed, 1 xfailed" in done.stdout, done.stdout
    # What a failed test's teardown printed: the proxy's own log, where pytest shows it.
    plain = run_pytest(tmp_path, "--runxfail", "-k", "failure", "test_user.py")
    assert plain.returncode == 1
    assert "--- tlsproxy log" in plain.stdout and "listening https://" in plain.stdout


def test_pytest_fixtures_lists_them_with_their_help(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, "--fixtures")
    assert "tlsproxy_ca [session scope]" in done.stdout, done.stdout
    assert "proxy/testing/pytest_plugin.py" in done.stdout
    assert "A factory taking TLSProxy's arguments" in done.stdout


def test_the_example_test_file_passes_as_a_user_runs_it(tmp_path: Path) -> None:
    """examples/test_with_tlsproxy.py, copied out of the repository and run there: the README
    points people at it, so it must keep passing."""
    example = Path(__file__).resolve().parents[3] / "examples" / "test_with_tlsproxy.py"
    (tmp_path / example.name).write_text(example.read_text())
    done = run_pytest(tmp_path, "-q", example.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 passed" in done.stdout, done.stdout
