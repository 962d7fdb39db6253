"""The distribution as users get it: `python -m build` makes a wheel and an sdist that
`twine check` accepts, `pipx install` of the wheel gives a working `tlsproxy`, and the `app`
extra serves the README's WebSocket example through the proxy.

Real tools throughout: build (isolated, as PyPI's uploaders run it), twine, pipx installed by
pip into a venv of its own with PIPX_HOME and PIPX_BIN_DIR in a temporary directory, the
pipx-installed `tlsproxy run` with its own supervised uvicorn, and the websockets client CLI."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxy
from proxy.testing.process import terminate
from tests.integration.harness import LISTEN_LINE, REPO

VERSION = proxy.__version__
# Installs reach the package index (or pip's cache): bounded, but not by the default 300 s.
BUILD_TIMEOUT = 240
pytestmark = pytest.mark.timeout(600)


def run(argv: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], BUILD_TIMEOUT)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_twine_check_accepts_both(dist: dict[str, Path]) -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "twine",
            "check",
            "--strict",
            str(dist["wheel"]),
            str(dist["sdist"]),
        ],
        60,
    )
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_wheel_has_the_packages_the_config_and_the_one_version(
    dist: dict[str, Path],
) -> None:
    assert dist["wheel"].name == f"tlsproxy-{VERSION}-py3-none-any.whl"
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    for module in (
        "proxy/__init__.py",
        "proxy/cli.py",
        "proxy/workers/supervisor.py",
        "proxy/testing/pytest_plugin.py",
        "certs/__init__.py",
        "certs/crypto_worker.py",
        "certs/issuers/local_ca.py",
    ):
        assert module in names, module
    # Installed as <prefix>/share/tlsproxy/conf.example.toml (README, "Install").
    data = f"tlsproxy-{VERSION}.data/data/share/tlsproxy/conf.example.toml"
    assert data in names
    assert zipfile.ZipFile(dist["wheel"]).read(data) == (REPO / "conf.example.toml").read_bytes()
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    metadata = zipfile.ZipFile(dist["wheel"]).read(f"tlsproxy-{VERSION}.dist-info/METADATA")
    text = metadata.decode()
    assert f"\nVersion: {VERSION}\n" in text
    assert re.search(r"Requires-Dist: websockets.*extra == \"app\"", text), text
    entry_points = zipfile.ZipFile(dist["wheel"]).read(
        f"tlsproxy-{VERSION}.dist-info/entry_points.txt"
    )
    assert b"tlsproxy = proxy.cli:main" in entry_points


def test_the_sdist_keeps_the_repository_layout(dist: dict[str, Path]) -> None:
    """INTERFACE.md: packages proxy/ and certs/ at the root, conf.example.toml beside them."""
    top = f"tlsproxy-{VERSION}"
    names = set(tarfile.open(dist["sdist"]).getnames())
    for path in (
        "pyproject.toml",
        "README.md",
        "conf.example.toml",
        "proxy/cli.py",
        "certs/manager.py",
        "examples/app.py",
        "deploy/tlsproxy.service",
    ):
        assert f"{top}/{path}" in names, path


@pytest.fixture(scope="module")
def pipx_install(tmp_path_factory: pytest.TempPathFactory, dist: dict[str, Path]) -> Path:
    """`pipx install 'WHEEL[app]'` with pipx's home and bin directory in a temporary directory;
    returns that bin directory."""
    base = tmp_path_factory.mktemp("pipx")
    venv = base / "pipx-venv"
    run([sys.executable, "-m", "venv", str(venv)], 120)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "pipx"], BUILD_TIMEOUT)
    env = {
        **os.environ,
        "PIPX_HOME": str(base / "home"),
        "PIPX_BIN_DIR": str(base / "bin"),
        "PIPX_MAN_DIR": str(base / "man"),
    }
    env.pop("VIRTUAL_ENV", None)
    run(
        [str(venv / "bin" / "pipx"), "install", f"{dist['wheel']}[app]"],
        BUILD_TIMEOUT,
        env=env,
    )
    return base / "bin"


def test_pipx_install_gives_a_working_tlsproxy(pipx_install: Path) -> None:
    result = run([str(pipx_install / "tlsproxy"), "--version"], 60, cwd="/")
    assert result.stdout.strip() == f"tlsproxy {VERSION}"
    help_text = run([str(pipx_install / "tlsproxy"), "--help"], 60, cwd="/").stdout
    assert "check" in help_text and "run" in help_text


def _installed_example_config(pipx_install: Path) -> Path:
    home = pipx_install.parent / "home"
    found = list(home.glob("venvs/tlsproxy/share/tlsproxy/conf.example.toml"))
    assert found, "conf.example.toml is not where README says an install puts it"
    return found[0]


@pytest.fixture
def app_extra_proxy(pipx_install: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The installed conf.example.toml, on ports the kernel picks, run by the pipx-installed
    tlsproxy: its supervised uvicorn comes from the [app] extra (the pipx venv's bin), not
    from the test's own environment."""
    text = _installed_example_config(pipx_install).read_text()
    text = text.replace('"127.0.0.1:8443"', '"127.0.0.1:0"', 1)
    text = text.replace('"127.0.0.1:8080"', '"127.0.0.1:0"', 1)
    config = tmp_path / "conf.toml"
    config.write_text(text)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "app.py").write_text((REPO / "examples" / "app.py").read_text())
    log = tmp_path / "proxy.log"
    # Only a plain PATH: nothing of the test's venv may leak into the workers.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(pipx_install / "tlsproxy"), "run", "-c", str(config)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            for kind, where in LISTEN_LINE.findall(log.read_text()):
                if kind == "https":
                    port = int(where.rpartition(":")[2])
            time.sleep(0.1)
        root = tmp_path / "root.pem"
        ca = run([str(pipx_install / "tlsproxy"), "ca", "-c", str(config)], 60, cwd=tmp_path)
        root.write_text(ca.stdout)
        yield port, root
    finally:
        terminate(proc, 15)


def test_the_app_extra_serves_the_readme_websocket_example(
    app_extra_proxy: tuple[int, Path],
) -> None:
    """README, "Two commands": `SSL_CERT_FILE=root.pem python -m websockets wss://...:8443/ws`,
    a line typed, the same line back. Without a WebSocket library beside uvicorn the upgrade
    would get 404 and the client would fail to connect."""
    port, root = app_extra_proxy
    readme = (REPO / "README.md").read_text()
    assert "SSL_CERT_FILE=root.pem .venv/bin/python -m websockets wss://localhost:8443/ws" in (
        readme
    )
    client = subprocess.Popen(
        [sys.executable, "-m", "websockets", f"wss://localhost:{port}/ws"],
        env={**os.environ, "SSL_CERT_FILE": str(root)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"hello over tls\n")
        client.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 20
        fd = client.stdout.fileno()
        while b"< hello over tls" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, seen
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"the client ended: {seen!r}"
                seen += chunk
        assert f"Connected to wss://localhost:{port}/ws".encode() in seen
        client.stdin.close()
        assert client.wait(10) == 0
    finally:
        terminate(client, 5)
