"""`tlsproxy --version` (INTERFACE.md): the installed distribution's version, exit 0."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from proxy.cli import main


def test_version_prints_the_distribution_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"tlsproxy {version('tlsproxy')}"
