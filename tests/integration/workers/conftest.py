"""Helpers for the supervisor tests: the test app's command, a log capture, and MiniPool, a
stand-in for the proxy's upstream pool (it takes on_change, balances with the real Balancer,
counts outstanding requests and, like the proxy, retries only requests that never connected)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import UpstreamConfig, UpstreamServer
from proxy.upstream.balancer import make
from proxy.workers.supervisor import WorkerSupervisor

HERE = Path(__file__).parent
APP_COMMAND = (
    f"{sys.executable} -m uvicorn pidapp:app --app-dir {HERE} --uds {{socket}} "
    "--no-access-log --log-level warning"
)


def upstream(**kw: Any) -> UpstreamConfig:
    settings: dict[str, Any] = {
        "name": "app",
        "command": APP_COMMAND,
        "workers": 2,
        "health": "/healthz",
        "health_timeout": 1.0,
        "stop_timeout": 5.0,
    }
    settings.update(kw)
    return UpstreamConfig(**settings)


def pid_gone(pid: int) -> bool:
    """True when the pid no longer runs (gone, or a zombie waiting for its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class MiniPool:
    supervisor: WorkerSupervisor | None = None
    servers: tuple[UpstreamServer, ...] = ()
    changes: list[tuple[UpstreamServer, ...]] = field(default_factory=list)
    inflight: Counter[UpstreamServer] = field(default_factory=Counter)
    failures: list[tuple[UpstreamServer, str]] = field(default_factory=list)
    pids: Counter[int] = field(default_factory=Counter)
    refused: int = 0  # connect failures that were retried elsewhere
    balancer: Any = field(default_factory=lambda: make("least_conn"))

    def on_change(self, servers: Sequence[UpstreamServer]) -> None:
        self.servers = tuple(servers)
        self.changes.append(self.servers)

    def outstanding(self, server: UpstreamServer) -> int:
        return self.inflight[server]

    async def get_from(
        self, server: UpstreamServer, path: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        # One connection per request: keep-alive reuse is the real pool's business (it must
        # expire idle connections before uvicorn's 5 s), not what these tests are about.
        limits = httpx.Limits(max_keepalive_connections=0)
        if server.path is not None:
            transport = httpx.AsyncHTTPTransport(uds=server.path, limits=limits)
            base = "http://worker"
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits)
            base = f"http://{server.host}:{server.port}"
        async with httpx.AsyncClient(transport=transport, base_url=base, timeout=10.0) as c:
            return await c.get(path, headers=headers)

    async def request(self, path: str = "/") -> dict[str, Any] | None:
        """One request through the balancer; a connect failure is retried on another server
        (no byte was sent), any other failure is recorded."""
        for _ in range(5):
            server = self.balancer.choose(self.servers, self.outstanding)
            if server is None:
                await asyncio.sleep(0.05)
                continue
            self.inflight[server] += 1
            if self.supervisor is not None:
                self.supervisor.note_request(server)
            try:
                response = await self.get_from(server, path)
                response.raise_for_status()
            except httpx.ConnectError:
                self.refused += 1
                continue
            except httpx.HTTPError as exc:
                self.failures.append((server, f"{type(exc).__name__}: {exc}"))
                return None
            finally:
                self.inflight[server] -= 1
            body = response.json()
            self.pids[body["pid"]] += 1
            return body
        self.failures.append((UpstreamServer(), f"no server took {path}"))
        return None


class LoadLoop:
    """`concurrency` tasks sending requests back to back until stopped."""

    def __init__(self, pool: MiniPool, concurrency: int = 3, paths: Sequence[str] = ("/",)):
        self.pool = pool
        self.paths = paths
        self.count = 0
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(concurrency)]

    async def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            await self.pool.request(self.paths[n % len(self.paths)])
            self.count += 1
            n += 1

    async def stop(self) -> int:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)
        return self.count


@pytest.fixture
def worker_log() -> AsyncIterator[list[logging.LogRecord]]:
    """Records of tlsproxy.workers (captured here: the proxy's logging set-up may stop
    propagation to the root logger that caplog watches)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tlsproxy.workers")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records  # type: ignore[misc]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
async def supervise(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., tuple[WorkerSupervisor, MiniPool]]]:
    """Make supervisors (with a MiniPool each) that are stopped at the end of the test."""
    made: list[WorkerSupervisor] = []
    # Not under tmp_path: a unix socket path must fit in 107 bytes, and pytest's are long.
    run_dir = Path(tempfile.mkdtemp(prefix="tlsw-"))

    def factory(
        config: UpstreamConfig | None = None, **kw: Any
    ) -> tuple[WorkerSupervisor, MiniPool]:
        pool = MiniPool()
        kw.setdefault("memory_interval", 0.2)
        kw.setdefault("outstanding", pool.outstanding)
        sup = WorkerSupervisor(config or upstream(), run_dir, pool.on_change, **kw)
        pool.supervisor = sup
        made.append(sup)
        return sup, pool

    yield factory
    for sup in made:
        pids = [w.pid for w in sup.snapshot() if w.pid]
        await sup.stop()
        assert all(pid_gone(p) for p in pids), "stop() left a worker running"
    shutil.rmtree(run_dir, ignore_errors=True)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The proxy runs on uvloop by default: supervise workers on it here too (its subprocess
    and reader machinery differs from asyncio's)."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
