"""The HTTP health probe and the HealthChecker loop against a real worker and a dead socket."""

from __future__ import annotations

import asyncio
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
