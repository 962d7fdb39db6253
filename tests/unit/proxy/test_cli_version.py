"""`tlsproxy --version` (INTERFACE.md): the one version, written in proxy/__init__.py, exit 0."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

import proxy
from proxy.cli import main

ROOT = Path(__file__).resolve().parents[3]


def test_version_prints_the_source_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"tlsproxy {proxy.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", proxy.__version__)


def test_the_version_is_written_once() -> None:
    """pyproject.toml takes it from proxy.__version__ instead of repeating it, so the built
    distribution and `--version` cannot disagree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "proxy.__version__"
    assert version("tlsproxy") == proxy.__version__  # the editable install agrees
