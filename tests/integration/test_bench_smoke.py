"""bench/run.py in its quick mode: nginx and tlsproxy both serve every workload without errors.

Not a performance test (1 s per workload on a busy machine says nothing about speed); it keeps
the benchmark runnable and catches a proxy that fails under wrk's concurrency, with keep-alive,
with one request per connection, with 1 MiB bodies, with many idle TLS connections, and in
front of the example app on 2 uvicorn workers; and keeps the floor (bench/floor.py) serving the
same workloads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IDLE_CONNECTIONS = 50
RESUME_CLIENTS = 6  # bench/run.py's default --resume-clients

missing = [c for c in ("nginx", "wrk", "openssl") if shutil.which(c) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"the benchmark needs {', '.join(missing)} (apt-get install nginx wrk)"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--floor",
            "--idle-connections",
            str(IDLE_CONNECTIONS),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| metric | nginx, 1 worker | tlsproxy |" in done.stdout
    assert "| per core-second | nginx | floor | tlsproxy |" in done.stdout
    return json.loads(out.read_text())


@pytest.mark.parametrize("terminator", ["nginx", "tlsproxy"])
@pytest.mark.parametrize(
    "workload", ["keepalive", "handshake", "bulk", "resume13", "resume12", "e2e"]
)
def test_every_workload_runs_without_errors(report: dict, terminator: str, workload: str) -> None:
    result = report["results"][terminator][workload]
    assert result["requests"] > 0
    assert result["errors"] == {}
    assert result["terminator_cpu_s"] > 0
    if workload == "bulk":
        assert result["bytes"] >= result["requests"] * 1024 * 1024


@pytest.mark.parametrize("workload", ["keepalive", "handshake", "bulk", "resume13", "resume12"])
def test_the_floor_serves_every_workload_without_errors(report: dict, workload: str) -> None:
    result = report["floor"][workload]
    assert result["requests"] > 0
    assert result["errors"] == {}
    if workload == "bulk":
        assert result["bytes"] >= result["requests"] * 1024 * 1024


@pytest.mark.parametrize("terminator", ["nginx", "tlsproxy"])
def test_memory_is_measured_with_idle_connections(report: dict, terminator: str) -> None:
    memory = report["results"][terminator]["memory"]
    assert memory["idle_connections"] == IDLE_CONNECTIONS
    assert memory["idle_kib"] > 0
    assert memory["peak_kib"] >= memory["idle_kib"]


def test_both_terminators_serve_the_same_kind_of_chain(report: dict) -> None:
    tls = report["tls"]
    assert tls["nginx"]["key"] == tls["tlsproxy"]["key"]
    assert tls["nginx"]["chain"] == tls["tlsproxy"]["chain"]
    assert tls["nginx"]["version"] == tls["tlsproxy"]["version"] == "TLSv1.3"


def test_the_table_compares_every_target(report: dict) -> None:
    rows = {row["metric"]: row for row in report["table"]}
    assert len(rows) == 19
    for row in rows.values():
        assert row["nginx"] is not None and row["tlsproxy"] is not None, row
    assert sum(1 for row in rows.values() if row["target"]) == 6


@pytest.mark.parametrize("terminator", ["nginx", "tlsproxy", "floor"])
@pytest.mark.parametrize("workload", ["resume13", "resume12"])
def test_resumption_resumes(report: dict, terminator: str, workload: str) -> None:
    """Every connection but each client process's first resumes the session before it."""
    results = report["floor"] if terminator == "floor" else report["results"][terminator]
    result = results[workload]
    assert result["resumed"] >= result["requests"] - RESUME_CLIENTS > 0


@pytest.mark.parametrize(
    ("terminator", "fmt"), [("nginx", "combined"), ("tlsproxy", "text"), ("tlsproxy", "json")]
)
def test_keepalive_runs_with_the_access_log_on(report: dict, terminator: str, fmt: str) -> None:
    result = report["results"][terminator][f"keepalive_log_{fmt}"]
    assert result["requests"] > 0
    assert result["errors"] == {}
