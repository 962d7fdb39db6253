"""README's "Several instances" example, as written: its two config files (ports moved to free
ones, the app's address to a real app's) and its commands, two `tlsproxy run` on one real
redis-server (its password from TLSPROXY_STORAGE_URL, as the README says): one root from
either `tlsproxy ca`, and curl trusting it gets a 200 from both, over one leaf."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.harness import REPO, AppProcess, ProxyProcess, free_port, running
from tests.integration.redis_server import RedisServer

from .conftest import fetch_leaf


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def block_after(text: str, label: str, lang: str) -> str:
    """The first ```lang block after the line `label`."""
    start = text.index(f"\n{label}\n")
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match, f"no ```{lang} block after {label!r}"
    return match.group(1)


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("curl") is None,
    reason="needs redis-server and curl",
)
def test_the_readme_two_instance_example_serves_one_certificate_from_one_root(
    tmp_path: Path,
) -> None:
    text = section((REPO / "README.md").read_text(), "Several instances")
    configs = {name: block_after(text, f"`{name}`:", "toml") for name in ("a.toml", "b.toml")}
    commands = block_after(text, "`b.toml`:", "sh")
    with running(RedisServer(tmp_path / "redis")) as redis, running(AppProcess(tmp_path)) as app:
        ports = {old: str(free_port()) for old in ("8443", "8444", "8080", "8081")}
        for name, config in configs.items():
            assert 'url = "redis://127.0.0.1:6379/0"' in config
            assert '"127.0.0.1:8000"' in config
            config = config.replace('"127.0.0.1:8000"', f'"{app.server}"')
            for old, new in ports.items():
                config = config.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            (tmp_path / name).write_text(config)
        assert "export TLSPROXY_STORAGE_URL='redis://:change-me@127.0.0.1:6379/0'" in commands
        env = {"TLSPROXY_STORAGE_URL": redis.url}  # the README's URL, this Redis's password
        proxies = [ProxyProcess(tmp_path / name, log_level="info", env=env) for name in configs]
        starting = [threading.Thread(target=p.start) for p in proxies]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        try:
            assert all(p.proc is not None and p.proc.poll() is None for p in proxies)
            bindir = str(Path(sys.executable).parent)
            run = []
            for line in commands.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith((".venv/bin/tlsproxy ca", "curl ")):
                    for old, new in ports.items():
                        line = line.replace(f":{old}/", f":{new}/")
                    run.append(line.replace(".venv/bin/", bindir + "/"))
            assert len(run) == 3, run  # tlsproxy ca, then curl to each instance
            environ = {"PATH": f"{bindir}:/usr/bin:/bin", "TLSPROXY_STORAGE_URL": redis.url}
            for line in run:
                result = subprocess.run(
                    line,
                    shell=True,
                    cwd=tmp_path,
                    env=environ,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert result.returncode == 0, f"{line}: {result.stderr}"
                if line.startswith("curl"):
                    assert result.stdout, line
            other = subprocess.run(
                [f"{bindir}/tlsproxy", "ca", "-c", "b.toml"],
                cwd=tmp_path,
                env=environ,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert other.stdout == (tmp_path / "root.pem").read_text()
            leaves = {fetch_leaf(p.port, "localhost").serial_number for p in proxies}
            assert len(leaves) == 1
        finally:
            for p in proxies:
                p.stop()
