"""Workers die with the proxy even when it is killed with SIGKILL (no chance to clean up)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .conftest import APP_COMMAND, pid_gone, wait_for

ROOT = Path(__file__).resolve().parents[3]


async def test_sigkill_of_the_parent_leaves_no_worker_alive() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="tlsw-"))
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parent / "supervise_child.py"),
        str(run_dir),
        APP_COMMAND,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    workers: list[int] = []
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        workers = json.loads(line)
        assert len(workers) == 2
        assert not any(pid_gone(p) for p in workers)
        parent.kill()  # SIGKILL: no handler, no finally, no atexit in the parent
        await parent.wait()
        await wait_for(lambda: all(pid_gone(p) for p in workers), 5, "the workers to die")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        for pid in workers:  # never leave one behind, even when the test fails
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)
