"""The status file the running proxy keeps for `tlsproxy status`, from a live supervisor."""

from __future__ import annotations

from pathlib import Path

from proxy.workers.status import StatusWriter, format_status, read_status

from .conftest import upstream


async def test_status_file_follows_the_workers(supervise, tmp_path: Path) -> None:
    sup, pool = supervise(upstream(workers=2))
    await sup.start()
    await pool.request("/")
    path = tmp_path / "data" / "status.json"
    writer = StatusWriter(path, sup.snapshot, interval=3600)
    await writer.write_now()
    _, workers = read_status(path)
    assert [(w.worker, w.state) for w in workers] == [("app-1", "up"), ("app-2", "up")]
    assert {w.pid for w in workers} == {w.pid for w in sup.snapshot()}
    assert sum(w.requests for w in workers) == 1
    text = format_status(path)
    assert "not running" not in text  # this process wrote it and runs
    for w in workers:
        assert f"{w.pid}" in text and w.listen in text

    await sup.stop()
    await writer.stop()  # the last snapshot shows the stopped slots
    _, workers = read_status(path)
    assert [(w.worker, w.state, w.pid) for w in workers] == [
        ("app-1", "stopped", None),
        ("app-2", "stopped", None),
    ]
