"""`tlsproxy check` catches what `run` would trip on when it starts workers: a program that is
not there, an app that does not import (checked in a child process, in the workers' directory
with their environment), a unix socket path over the kernel's 107 bytes. Exit 2, one line
naming the key (and the module)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from proxy.config import UpstreamConfig
from proxy.errors import ConfigError
from proxy.workers.preflight import check_command
from tests.integration.harness import tlsproxy, write_config

APP = "async def app(scope, receive, send):\n    pass\n"


def config_text(command: str, *, data_dir: str = "data", env: str = "") -> str:
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "{data_dir}"

[[site]]
hosts = ["localhost"]
upstream = "app"

[upstream.app]
command = "{command}"
{env}
"""


def check(directory: Path, text: str) -> tuple[int, list[str], str]:
    config = write_config(directory, text)
    result = tlsproxy("check", "-c", str(config), timeout=90)
    return result.returncode, result.stderr.strip().splitlines(), result.stdout


def one_line(code: int, lines: list[str], *needles: str) -> str:
    assert code == 2, lines
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An app's directory: goodapp.py imports, its config goes beside it."""
    (tmp_path / "goodapp.py").write_text(APP)
    (tmp_path / "needsenv.py").write_text("import os\nSETTING = os.environ['APP_SETTING']\n" + APP)
    (tmp_path / "broken.py").write_text("import fastapi_is_not_installed_here\n" + APP)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.py").write_text(APP)
    return tmp_path


@pytest.mark.parametrize(
    "command",
    [
        "uvicorn goodapp:app --uds {socket}",
        f"{sys.executable} -m uvicorn goodapp:app --uds {{socket}}",
        "uvicorn inner:app --app-dir sub --uds {socket}",
    ],
)
def test_an_app_that_imports_passes(project: Path, command: str) -> None:
    code, lines, out = check(project, config_text(command))
    assert code == 0, lines
    assert "upstream.app.command: uvicorn app " in out and "imports" in out, out


def test_a_missing_program(project: Path) -> None:
    code, lines, _ = check(project, config_text("no-such-server goodapp:app --uds {socket}"))
    one_line(code, lines, "upstream.app.command", "'no-such-server' not found")
    code, lines, _ = check(project, config_text("./bin/serve --uds {socket}"))
    one_line(code, lines, "upstream.app.command", "./bin/serve not found", str(project))


def test_a_module_that_is_not_there(project: Path) -> None:
    code, lines, _ = check(project, config_text("uvicorn missingmod:app --uds {socket}"))
    one_line(
        code,
        lines,
        "upstream.app.command",
        "'missingmod:app' does not import",
        "module 'missingmod'",
        "ModuleNotFoundError: No module named 'missingmod'",
    )


def test_a_module_whose_own_import_fails(project: Path) -> None:
    code, lines, _ = check(project, config_text("uvicorn broken:app --uds {socket}"))
    one_line(code, lines, "upstream.app.command", "module 'broken'", "fastapi_is_not_installed")


def test_an_attribute_that_is_not_there(project: Path) -> None:
    code, lines, _ = check(project, config_text("uvicorn goodapp:application --uds {socket}"))
    one_line(code, lines, "upstream.app.command", "has no attribute 'application'")


def test_the_import_runs_with_the_workers_environment(project: Path) -> None:
    code, lines, _ = check(project, config_text("uvicorn needsenv:app --uds {socket}"))
    one_line(code, lines, "upstream.app.command", "KeyError: 'APP_SETTING'")
    env = 'env = { APP_SETTING = "from-the-config" }'
    code, lines, _ = check(project, config_text("uvicorn needsenv:app --uds {socket}", env=env))
    assert code == 0, lines


def test_an_import_that_hangs_is_cut_off(project: Path) -> None:
    (project / "slow.py").write_text("import time\ntime.sleep(30)\n" + APP)
    upstream = UpstreamConfig(name="app", command="uvicorn slow:app --uds {socket}")
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_command(upstream, "upstream.app.command", project, timeout=1.0)
    assert time.monotonic() - started < 10
    assert caught.value.key == "upstream.app.command"
    assert "importing module 'slow' took over 1s" in str(caught.value)


def test_unix_socket_paths_over_107_bytes(project: Path) -> None:
    deep = project / ("d" * 60) / ("e" * 60)
    code, lines, _ = check(
        project, config_text("uvicorn goodapp:app --uds {socket}", data_dir=str(deep))
    )
    one_line(
        code, lines, "server.data_dir", "upstream.app.command", "over the kernel's limit of 107"
    )
    long_socket = "/tmp/" + "s" * 110 + ".sock"
    text = config_text("x {socket}").replace(
        'command = "x {socket}"', f'servers = ["unix:{long_socket}"]'
    )
    code, lines, _ = check(project, text)
    one_line(code, lines, "upstream.app.servers[0]", "over the kernel's limit of 107")
