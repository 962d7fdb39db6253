"""The HTTP health probe and the HealthChecker loop against a real worker and a dead socket."""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from pathlib import Path

from proxy.config import UpstreamServer
from proxy.upstream.health import HealthChecker, ServerHealth, can_connect, probe

from .conftest import upstream


async def test_probe_pass_and_fail(supervise) -> None:
    sup, pool = supervise(upstream(workers=1))
    await sup.start()
    (worker,) = pool.servers
    assert await probe(worker, "/healthz", 2.0)
    assert not await probe(worker, "/no-such-path", 2.0)  # 404
    assert await can_connect(worker, 1.0)
    with tempfile.TemporaryDirectory() as d:
        dead = UpstreamServer(path=str(Path(d) / "nobody.sock"))
        assert not await probe(dead, "/healthz", 1.0)
        assert not await can_connect(dead, 1.0)


async def test_probe_times_out_on_a_server_that_never_answers() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never responds
    try:
        server = UpstreamServer(host="127.0.0.1", port=silent.getsockname()[1])
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await probe(server, "/healthz", 0.3)
        assert 0.25 < loop.time() - started < 2
    finally:
        silent.close()


async def test_checker_marks_the_dead_server_down_and_keeps_the_live_one(supervise) -> None:
    sup, pool = supervise(upstream(workers=1))
    await sup.start()
    (live,) = pool.servers
    with tempfile.TemporaryDirectory() as d:
        dead = UpstreamServer(path=str(Path(d) / "nobody.sock"))
        config = upstream(health_interval=0.05, unhealthy_threshold=3, healthy_threshold=2)
        health = {s: ServerHealth.from_config(config) for s in (live, dead)}
        changes: list[tuple[UpstreamServer, bool]] = []
        checker = HealthChecker(
            config, lambda: health, on_change=lambda s, up: changes.append((s, up))
        )
        await checker.check_once()
        assert health[dead].is_up(0.0)  # one failure is below the threshold
        # a plain mapping works as well as a function returning one
        await HealthChecker(config, health).check_once()
        assert health[dead].fails == 2
        checker.start()
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.05)
        await checker.stop()
        assert changes == [(dead, False)]
        assert not health[dead].is_up(0.0)
        assert health[live].is_up(0.0) and health[live].passes >= 2


async def test_the_checker_logs_changes_with_the_reason_not_every_probe(
    supervise, tmp_path: Path
) -> None:
    sick = tmp_path / "sick"
    sup, pool = supervise(upstream(workers=1, env=(("PIDAPP_SICK_IF", str(sick)),)))
    await sup.start()
    (live,) = pool.servers
    with tempfile.TemporaryDirectory() as d:
        dead = UpstreamServer(path=str(Path(d) / "nobody.sock"))
        config = upstream(health_interval=0.05, unhealthy_threshold=2, healthy_threshold=2)
        health = {s: ServerHealth.from_config(config) for s in (live, dead)}
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = records.append  # type: ignore[method-assign]
        logger = logging.getLogger("tlsproxy.upstream")
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.DEBUG)
        try:
            checker = HealthChecker(config, health)
            for _ in range(6):
                await checker.check_once()
            sick.touch()
            for _ in range(6):
                await checker.check_once()
            sick.unlink()
            for _ in range(6):
                await checker.check_once()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
    lines = [(r.levelno, r.getMessage()) for r in records]
    # 18 rounds of 2 servers, 3 changes: one line each, nothing per probe.
    assert lines == [
        (
            logging.WARNING,
            f"upstream app: {dead} is down: 2 health checks of /healthz failed "
            "(last: no such file or directory)",
        ),
        (
            logging.WARNING,
            f"upstream app: {live} is down: 2 health checks of /healthz failed (last: status 503)",
        ),
        (logging.INFO, f"upstream app: {live} is up again (2 health checks of /healthz passed)"),
    ], lines
