"""A proxy-like parent for the no-orphans test: supervises two workers, prints their pids as
one JSON line, then waits to be killed."""

import asyncio
import json
import sys
from pathlib import Path

from proxy.config import UpstreamConfig
from proxy.workers.supervisor import WorkerSupervisor


async def main(run_dir: Path, command: str) -> None:
    config = UpstreamConfig(name="app", command=command, workers=2, health="/healthz")
    supervisor = WorkerSupervisor(config, run_dir, lambda servers: None)
    await supervisor.start()
    print(json.dumps([w.pid for w in supervisor.snapshot()]), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
