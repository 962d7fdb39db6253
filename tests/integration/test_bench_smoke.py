"""bench/run.py in its quick mode: nginx and tlsproxy both serve every workload without errors.

Not a performance test (1 s per workload on a busy machine says nothing about speed); it keeps
the benchmark runnable and catches a proxy that fails under wrk's concurrency, with keep-alive,
with one request per connection, with 1 MiB bodies, with many idle TLS connections, over HTTP/2
(many streams per connection, and one request per new connection, with h2load), and in front of
the example app on 2 uvicorn workers; and keeps the floor (bench/floor.py) serving the same
HTTP/1.1 workloads.
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
NEW_CONNECTIONS = 50  # bench/run.py's default --connections: h2load -c 50 -n 50 in h2conn
H2_TABLE = "| HTTP/2, requests per core-second | nginx | tlsproxy | tlsproxy / nginx |"

missing = [c for c in ("nginx", "wrk", "openssl", "h2load", "redis-server") if not shutil.which(c)]
pytestmark = pytest.mark.skipif(
    bool(missing),
    reason=f"the benchmark needs {', '.join(missing)} (apt-get install nginx wrk nghttp2-client"
    " redis-server)",
)


def run_bench(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """bench/run.py, bounded: it stops by itself; the timeout only catches a hang."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    done = run_bench(out, "--floor", "--idle-connections", str(IDLE_CONNECTIONS))
    assert "| metric | nginx, 1 worker | tlsproxy |" in done.stdout
    assert "| per core-second | nginx | floor | tlsproxy |" in done.stdout
    assert H2_TABLE in done.stdout
    return json.loads(out.read_text())


@pytest.mark.parametrize("terminator", ["nginx", "tlsproxy"])
@pytest.mark.parametrize(
    "workload",
    ["keepalive", "handshake", "bulk", "resume13", "resume12", "h2streams", "h2conn", "e2e"],
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
    assert len(rows) == 26
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


def test_keepalive_runs_with_the_metrics_off_and_on(report: dict) -> None:
    """Issue 13's side-by-side runs: the metrics were on in each process once (moved by
    SIGHUP), and the "on" side really counted (its scrape saw at least the requests its load
    made), so the ratio compares counting with not counting."""
    ab = report["results"]["tlsproxy"]["metrics_ab"]
    runs = ab["pairs"]
    assert [run["on_process"] for run in runs] == [0, 1]
    for run in runs:
        assert run["off"] > 0 and run["on"] > 0
        assert run["counted"] >= run["requests"] > 0
    assert min(r["ratio"] for r in runs) <= ab["ratio"] <= max(r["ratio"] for r in runs)


def test_the_storage_backends_run_side_by_side(report: dict) -> None:
    """Issue 16's side-by-side runs: for keep-alive and full handshakes, redis changed places
    with file (by a restart) each run, and both processes served requests without errors."""
    ab = report["results"]["tlsproxy"]["storage_ab"]
    assert set(ab) == {"keepalive", "handshake"}
    for workload in ab.values():
        runs = workload["pairs"]
        assert [run["redis_process"] for run in runs] == [0, 1]
        for run in runs:
            assert run["file"] > 0 and run["redis"] > 0  # requests per core-second of each
            assert run["requests"] > 0 and "errors" not in run
        ratios = [run["ratio"] for run in runs]
        assert min(ratios) <= workload["ratio"] <= max(ratios)


@pytest.mark.parametrize("terminator", ["nginx", "tlsproxy"])
def test_the_h2_workloads_speak_h2(report: dict, terminator: str) -> None:
    """h2load would fall back to HTTP/1.1 if the terminator did not pick h2: the rows must
    say h2 (run.py refuses anything else), over TLS 1.3 like the HTTP/1.1 rows."""
    for workload in ("h2streams", "h2conn"):
        result = report["results"][terminator][workload]
        assert result["alpn"] == "h2"
        assert result["tls_version"] == "TLSv1.3"
        assert result["per_core_second"] > 0
        assert result["latency_ms"]["p99"] > 0


@pytest.mark.parametrize("terminator", ["nginx", "tlsproxy"])
def test_h2conn_makes_one_request_per_connection(report: dict, terminator: str) -> None:
    result = report["results"][terminator]["h2conn"]
    assert result["requests"] == result["h2load_runs"] * NEW_CONNECTIONS


def test_the_floor_skips_the_h2_workloads(report: dict) -> None:
    """bench/floor.py offers only http/1.1: it has no HTTP/2 figure to compare."""
    assert "h2streams" not in report["floor"] and "h2conn" not in report["floor"]


def test_the_h2_table_compares_both_terminators_and_keepalive(report: dict) -> None:
    rows = {row["workload"]: row for row in report["h2"]}
    assert set(rows) == {"h2streams", "h2conn"}
    for row in rows.values():
        assert row["nginx"] > 0 and row["tlsproxy"] > 0
        assert row["ratio"] == pytest.approx(row["tlsproxy"] / row["nginx"])
    streams = rows["h2streams"]
    keepalive = report["results"]["tlsproxy"]["keepalive"]["per_core_second"]
    assert streams["tlsproxy_h2_over_keepalive"] == pytest.approx(streams["tlsproxy"] / keepalive)
    assert streams["nginx_h2_over_keepalive"] > 0
    assert streams["target"] == ">= 0.60"
    assert streams["met"] in (True, False)


def test_h2_runs_only_the_h2_rows_and_keepalive(tmp_path: Path) -> None:
    """--h2: the HTTP/2 workloads and the keep-alive one they are compared with, nothing else
    (no memory, access-log or end-to-end runs)."""
    out = tmp_path / "h2.json"
    done = run_bench(out, "--h2", "--only", "nginx", timeout=120)
    assert H2_TABLE in done.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"nginx"}
    assert set(results["nginx"]) == {"processes", "keepalive", "h2streams", "h2conn"}
    for workload in ("keepalive", "h2streams", "h2conn"):
        assert results["nginx"][workload]["requests"] > 0
        assert results["nginx"][workload]["errors"] == {}
