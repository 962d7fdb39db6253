"""The supervisor with a real FastAPI app under uvicorn workers on unix sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from proxy.errors import StartupError
from proxy.workers.restart_policy import RestartSettings
from proxy.workers.supervisor import PrestartError

from .conftest import APP_COMMAND, LoadLoop, pid_gone, upstream, wait_for


def messages(records: list[logging.LogRecord], level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


async def test_each_worker_answers_with_its_own_pid(supervise, worker_log) -> None:
    sup, pool = supervise(upstream(workers=3, command=APP_COMMAND.replace("warning", "info")))
    await sup.start()
    assert len(pool.servers) == 3
    assert len(pool.changes) == 3  # each worker was added once it was ready
    snapshot = sup.snapshot()
    pids = {w.pid for w in snapshot}
    answered = {(await pool.get_from(s, "/")).json()["pid"] for s in pool.servers}
    assert answered == pids and len(pids) == 3

    # requests through the balancer reach every worker and are counted per worker
    for _ in range(9):
        await pool.request("/")
    assert set(pool.pids) == pids
    assert pool.failures == []
    snapshot = sup.snapshot()
    assert sum(w.requests for w in snapshot) == 9
    for w in snapshot:
        assert w.state == "up"
        assert w.rss is not None and w.rss > 10 * 2**20
        assert w.listen.startswith("unix:")

    # uvicorn on a unix socket trusts the proxy's forwarded headers (flag added for it)
    r = await pool.get_from(
        pool.servers[0],
        "/client",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"},
    )
    assert r.json() == {"client": "203.0.113.9", "scheme": "https"}

    # worker output lands in the log, tagged with the worker and its pid
    first = snapshot[0]
    lines = messages(worker_log)
    assert f"app-1[{first.pid}]: Application startup complete." in lines


async def test_killed_worker_comes_back_and_the_others_keep_serving(supervise, worker_log) -> None:
    sup, pool = supervise()
    await sup.start()
    victim = sup.snapshot()[0]
    victim_server = next(s for s in pool.servers if f"unix:{s.path}" == victim.listen)
    load = LoadLoop(pool, concurrency=3)
    await asyncio.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    await wait_for(lambda: victim_server not in pool.servers, 5, "the dead worker to leave")
    await wait_for(
        lambda: len(pool.servers) == 2 and victim.pid not in {w.pid for w in sup.snapshot()},
        15,
        "a new worker in its slot",
    )
    await asyncio.sleep(0.3)
    total = await load.stop()

    assert total > 20
    others = [f for f in pool.failures if f[0] != victim_server]
    assert others == [], "a request to a worker that was not killed failed"
    assert len(pool.failures) <= 3  # at most the requests in flight to the killed worker
    now = sup.snapshot()
    assert all(w.state == "up" for w in now)
    assert now[0].restarts == 1
    replacement = now[0].pid
    assert (await pool.get_from(pool.servers[0], "/")).json()["pid"] in {
        replacement,
        now[1].pid,
    }
    assert any(
        f"pid {victim.pid} exited with signal SIGKILL" in m and "restarting in" in m
        for m in messages(worker_log, logging.WARNING)
    )


async def test_prestart_runs_once_in_order_before_the_first_worker(
    supervise, tmp_path: Path
) -> None:
    marker = tmp_path / "prestart.txt"
    config = upstream(
        prestart=(f"echo one >> {marker}", f"echo two >> {marker}"),
        env=(("PIDAPP_PRESTART_MARKER", str(marker)),),
    )
    sup, pool = supervise(config)
    await sup.start()
    for server in pool.servers:  # what each worker found at its start
        assert (await pool.get_from(server, "/prestart")).json() == {"seen": "one\ntwo\n"}

    # a worker restart does not run the prestart steps again
    victim = sup.snapshot()[0].pid
    os.kill(victim, signal.SIGKILL)  # type: ignore[arg-type]
    await wait_for(
        lambda: len(pool.servers) == 2 and victim not in {w.pid for w in sup.snapshot()},
        15,
        "the killed worker to be replaced",
    )
    assert marker.read_text() == "one\ntwo\n"


async def test_failing_prestart_stops_startup_with_its_output(supervise, tmp_path: Path) -> None:
    never = tmp_path / "never"
    failing = "echo migrating; echo 'relation users does not exist' >&2; exit 7"
    config = upstream(prestart=("echo fine", failing, f"touch {never}"))
    sup, pool = supervise(config)
    with pytest.raises(StartupError) as caught:
        await sup.start()
    error = caught.value
    assert isinstance(error, PrestartError)
    assert error.returncode == 7
    assert error.command == failing
    assert error.output == ["migrating", "relation users does not exist"]
    text = str(error)
    assert "prestart step 2 failed with exit status 7" in text
    assert "relation users does not exist" in text
    assert not never.exists()  # later steps do not run
    assert pool.changes == [] and sup.snapshot() == []  # no worker was started


async def test_first_worker_that_cannot_start_is_a_startup_error(supervise, tmp_path: Path) -> None:
    crash = tmp_path / "crash"
    crash.touch()
    sup, pool = supervise(upstream(env=(("PIDAPP_CRASH_IF", str(crash)),)))
    with pytest.raises(StartupError) as caught:
        await sup.start()
    assert "exit status 3" in str(caught.value)
    assert "refusing to start" in str(caught.value)
    assert pool.changes == []


async def test_crash_loop_leaves_the_worker_down_and_the_others_serving(
    supervise, worker_log, tmp_path: Path
) -> None:
    crash = tmp_path / "crash"
    fast = RestartSettings(base=0.1, factor=2.0, cap=0.4, stable_after=30.0, max_quick_exits=3)
    sup, pool = supervise(upstream(env=(("PIDAPP_CRASH_IF", str(crash)),)), restart=fast)
    await sup.start()
    crash.touch()  # from now on a new worker exits at once
    victim = sup.snapshot()[0].pid
    survivor = sup.snapshot()[1].pid
    os.kill(victim, signal.SIGKILL)  # type: ignore[arg-type]
    await wait_for(lambda: sup.snapshot()[0].state == "crashloop", 20, "the crash loop verdict")

    errors = [m for m in messages(worker_log, logging.ERROR) if "crash loop" in m]
    assert len(errors) == 1, errors
    assert "app-1" in errors[0] and "exit status 3" in errors[0]
    assert len(pool.servers) == 1
    for _ in range(4):
        assert (await pool.request("/")) == {"pid": survivor}
    await asyncio.sleep(1.0)  # left down: no further attempts
    assert sup.snapshot()[0].state == "crashloop"
    # the kill was the first quick exit (it had run < stable_after), two crashes made three
    assert len([m for m in messages(worker_log) if "app-1: started pid" in m]) == 1 + 2

    # a deploy (rolling restart) with the problem fixed brings the slot back
    crash.unlink()
    await sup.rolling_restart()
    assert len(pool.servers) == 2
    assert all(w.state == "up" for w in sup.snapshot())


async def test_max_requests_recycles_without_a_failed_request(supervise, worker_log) -> None:
    sup, pool = supervise(upstream(workers=1, max_requests=5))
    await sup.start()
    first = sup.snapshot()[0].pid
    deadline = time.monotonic() + 20
    while len(pool.pids) < 3 and time.monotonic() < deadline:
        await pool.request("/")
        await asyncio.sleep(0.01)
    assert pool.failures == [] and pool.refused == 0
    assert len(pool.pids) >= 3, pool.pids
    assert all(n >= 5 for pid, n in pool.pids.items() if pid != sup.snapshot()[0].pid)
    await wait_for(lambda: pid_gone(first), 10, "the first worker to stop")
    assert any("5 requests served (max_requests)" in m for m in messages(worker_log))


async def test_max_memory_recycles_without_a_failed_request(supervise, worker_log) -> None:
    sup, pool = supervise(upstream(workers=1, max_memory=130 * 2**20))
    await sup.start()
    before = sup.snapshot()[0]
    assert before.rss is not None and before.rss < 130 * 2**20
    load = LoadLoop(pool, concurrency=2)
    grown = await pool.get_from(pool.servers[0], "/alloc?mb=120")
    assert grown.json()["pid"] == before.pid
    await wait_for(lambda: pid_gone(before.pid), 20, "the grown worker to be replaced")  # type: ignore[arg-type]
    await asyncio.sleep(0.3)
    await load.stop()
    assert pool.failures == [] and pool.refused == 0
    after = sup.snapshot()[0]
    assert after.pid != before.pid and after.state == "up"
    assert any("> max_memory 130 MiB" in m for m in messages(worker_log))


async def test_rolling_restart_replaces_every_pid_under_load(supervise) -> None:
    sup, pool = supervise(upstream(workers=2))
    await sup.start()
    old = {w.pid for w in sup.snapshot()}
    load = LoadLoop(pool, concurrency=4, paths=("/", "/slow?s=0.2"))
    await asyncio.sleep(0.3)
    await sup.rolling_restart()
    await asyncio.sleep(0.3)
    total = await load.stop()
    # planned replacements: not even a refused connect that a retry would have hidden
    assert pool.failures == [] and pool.refused == 0
    assert total > 20
    new = {w.pid for w in sup.snapshot()}
    assert len(new) == 2 and not (new & old)
    assert all(pid_gone(p) for p in old)  # type: ignore[arg-type]
    assert set(pool.pids) >= new  # the new workers took traffic
    assert len(pool.servers) == 2


async def test_stop_kills_a_worker_that_ignores_sigterm(supervise, worker_log) -> None:
    command = f"{APP_COMMAND.split()[0]} {Path(__file__).parent / 'stubborn.py'} {{port}}"
    config = upstream(workers=1, command=command, health=None, stop_timeout=0.5)
    sup, pool = supervise(config)
    await sup.start()  # ready = accepts a connection (no health path)
    (server,) = pool.servers
    assert server.host == "127.0.0.1" and server.port
    pid = sup.snapshot()[0].pid
    started = time.monotonic()
    await sup.stop()
    took = time.monotonic() - started
    assert 0.5 <= took < 3
    assert pid_gone(pid)  # type: ignore[arg-type]
    assert pool.servers == ()
    assert any("did not stop 0.5s after SIGTERM: SIGKILL" in m for m in messages(worker_log))


async def test_rolling_restart_runs_prestart_again_and_a_failure_cancels_it(
    supervise, worker_log, tmp_path: Path
) -> None:
    marker = tmp_path / "prestart.txt"
    env = (("PIDAPP_PRESTART_MARKER", str(marker)),)
    sup, pool = supervise(upstream(workers=1, prestart=(f"echo v1 >> {marker}",), env=env))
    await sup.start()
    first = sup.snapshot()[0].pid

    # a deploy with a migration that fails: nothing is replaced
    broken = upstream(workers=1, prestart=("echo cannot migrate; exit 4",), env=env)
    await sup.rolling_restart(broken)
    assert sup.snapshot()[0].pid == first
    cancelled = [m for m in messages(worker_log, logging.ERROR) if "cancelled" in m]
    assert len(cancelled) == 1 and "exit status 4" in cancelled[0]

    # the fixed deploy: its prestart runs once, before the new worker starts
    fixed = upstream(workers=1, prestart=(f"echo v2 >> {marker}",), env=env)
    await sup.rolling_restart(fixed)
    assert marker.read_text() == "v1\nv2\n"
    (server,) = pool.servers
    assert (await pool.get_from(server, "/prestart")).json() == {"seen": "v1\nv2\n"}
    assert sup.snapshot()[0].pid != first


async def test_rolling_restart_with_a_new_worker_count_grows_and_shrinks(supervise) -> None:
    sup, pool = supervise(upstream(workers=1))
    await sup.start()
    await sup.rolling_restart(upstream(workers=3))
    assert len(pool.servers) == 3
    assert [w.worker for w in sup.snapshot()] == ["app-1", "app-2", "app-3"]
    three = {w.pid for w in sup.snapshot()}
    await sup.rolling_restart(upstream(workers=1))
    assert len(pool.servers) == 1
    (only,) = sup.snapshot()
    assert only.worker == "app-1" and only.state == "up"
    assert all(pid_gone(p) for p in three)  # type: ignore[arg-type]
    for _ in range(3):
        assert (await pool.request("/")) == {"pid": only.pid}


async def test_a_command_that_cannot_run_is_a_startup_error(supervise) -> None:
    sup, pool = supervise(upstream(command="/nonexistent/uvicorn app:app --uds {socket}"))
    with pytest.raises(StartupError) as caught:
        await sup.start()
    assert "cannot run the worker command" in str(caught.value)
    assert "No such file or directory" in str(caught.value)
    assert pool.changes == []
