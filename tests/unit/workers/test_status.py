import json
import os
from pathlib import Path

import pytest

from proxy.workers.status import (
    WorkerInfo,
    format_status,
    read_status,
    write_status,
)

WORKERS = [
    WorkerInfo("app", "app-1", 4242, "up", 125.0, 17, 52 * 1024 * 1024, "unix:/run/a.sock", 0),
    WorkerInfo("app", "app-2", None, "crashloop", 0.0, 0, None, "-", 5),
]


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "data" / "status.json"
    write_status(path, WORKERS)
    header, workers = read_status(path)
    assert workers == WORKERS
    assert header["pid"] == os.getpid()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".status.")]


def test_format_shows_each_worker(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, WORKERS)
    written = json.loads(path.read_text())["written"]
    text = format_status(path, now=written + 3)
    lines = text.splitlines()
    assert lines[0] == f"tlsproxy pid {os.getpid()}, status written 3s ago"
    assert lines[1].split() == ["WORKER", "PID", "STATE", "UPTIME", "REQUESTS", "RSS",
                                "RESTARTS", "LISTEN"]  # fmt: skip
    assert lines[2].split() == ["app-1", "4242", "up", "2m05s", "17", "52.0MiB", "0",
                                "unix:/run/a.sock"]  # fmt: skip
    assert lines[3].split() == ["app-2", "-", "crashloop", "-", "0", "-", "5", "-"]


def test_format_says_when_the_writer_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"version": 1, "pid": 2**22 + 7, "written": 1000.0, "workers": []}))
    text = format_status(path, now=1000.0 + 7200)
    assert "2h00m ago" in text
    assert "not running" in text
    assert "no supervised workers" in text


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        format_status(tmp_path / "nope.json")
