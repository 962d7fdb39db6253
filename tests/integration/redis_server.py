"""A real redis-server for tests: on a free 127.0.0.1 port, its files in a temp dir, nothing
saved to disk (`--save ''`), a password (`requirepass`) so that AUTH is exercised too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.integration.harness import free_port, stop_process, wait_for_port

PASSWORD = "s3cret-for-tests"


class RedisServer:
    def __init__(
        self, directory: Path, password: str | None = PASSWORD, tls: tuple[Path, Path] | None = None
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is missing: scripts/test.sh installs it")
        self.directory = directory
        self.password = password
        self.tls = tls  # (certificate chain, key): TLS only, for rediss:// URLs
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port after stop())."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        if self.tls:
            cert, key = self.tls
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            args += ["--tls-auth-clients", "no"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def cli(self, *args: str) -> str:
        """redis-cli against this server (REDISCLI_AUTH keeps the password off argv)."""
        env = {"REDISCLI_AUTH": self.password} if self.password else {}
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning", *args],
            capture_output=True,
            text=True,
            errors="replace",  # values may be binary (encrypted keys)
            check=True,
            timeout=10,
            env=env,
        ).stdout
