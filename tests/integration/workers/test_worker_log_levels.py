"""A real uvicorn worker's warnings, errors and tracebacks keep their level in the proxy's log;
its successful health probes are DEBUG, so that the INFO log shows changes, not probes."""

from __future__ import annotations

import logging

from tests.integration.workers.conftest import APP_COMMAND, upstream, wait_for


async def test_worker_lines_keep_their_level(supervise, worker_log) -> None:
    logging.getLogger("tlsproxy.workers").setLevel(logging.DEBUG)  # worker_log restores it
    command = APP_COMMAND.replace("--no-access-log --log-level warning", "--log-level info")
    sup, pool = supervise(upstream(workers=1, command=command))
    await sup.start()
    (server,) = pool.servers
    pid = sup.snapshot()[0].pid
    tag = f"app-1[{pid}]: "

    await pool.get_from(server, "/say?level=warning&text=disk+nearly+full")
    r = await pool.get_from(server, "/boom")
    assert r.status_code == 500

    def by_text() -> dict[str, int]:
        return {r.getMessage().removeprefix(tag): r.levelno for r in worker_log}

    await wait_for(lambda: "ValueError: boom from pidapp" in by_text(), 10, "the traceback")
    seen = by_text()
    assert seen["Application startup complete."] == logging.INFO
    assert seen["disk nearly full"] == logging.WARNING
    assert seen["Exception in ASGI application"] == logging.ERROR
    assert seen["Traceback (most recent call last):"] == logging.ERROR
    assert seen["ValueError: boom from pidapp"] == logging.ERROR
    # The readiness probe's access line: DEBUG. A request's own line: INFO.
    probes = [lvl for text, lvl in seen.items() if '"GET /healthz HTTP/1.1" 200' in text]
    assert probes and set(probes) == {logging.DEBUG}
    assert any('"GET /boom HTTP/1.1" 500' in t and lvl == logging.INFO for t, lvl in seen.items())
    # No line still carries uvicorn's own level prefix.
    assert not [t for t in seen if t.startswith(("INFO:", "WARNING:", "ERROR:"))]
