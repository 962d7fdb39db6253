"""bench/restarts.py with 2 restarts a mode: it runs, stops by itself, and sees what it is for.

Not a measurement (see bench/README.md for that): with the socket held across restarts no
connection may be refused, while the plain restarts (the control) must show refusals, or the
load would not be looking at the gap between two proxies at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_restarts_bench_refuses_nothing_with_the_socket_held(tmp_path: Path) -> None:
    out = tmp_path / "restarts.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "restarts.py"),
            "--restarts",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| socket held across restarts (tlsproxy.socket) |" in done.stdout
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"plain", "socket"}
    for result in results.values():
        assert result["restarts"] == 2
        assert result["ok"] > 0
    assert results["socket"]["refused"] == 0
    assert results["plain"]["refused"] > 0
