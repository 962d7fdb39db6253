"""What `tlsproxy status` shows of a live supervisor's workers (its snapshot, as the running
proxy sends it over the control socket)."""

from __future__ import annotations

from dataclasses import asdict

from proxy.workers.status import WorkerInfo, format_workers

from .conftest import upstream


async def test_the_table_follows_the_workers(supervise) -> None:
    sup, pool = supervise(upstream(workers=2))
    await sup.start()
    await pool.request("/")
    workers = [WorkerInfo(**asdict(w)) for w in sup.snapshot()]  # through JSON's shape
    assert [(w.worker, w.state) for w in workers] == [("app-1", "up"), ("app-2", "up")]
    assert sum(w.requests for w in workers) == 1
    text = format_workers(workers)
    for w in workers:
        assert f"{w.pid}" in text and w.listen in text

    await sup.stop()
    assert [(w.worker, w.state, w.pid) for w in sup.snapshot()] == [
        ("app-1", "stopped", None),
        ("app-2", "stopped", None),
    ]
