"""Supervised app workers: prestart steps, N workers on unix sockets or ports, health-gated into
the upstream, restarted with back-off, recycled on memory or request count, replaced one at a
time on a rolling restart, stopped with the proxy.

How a worker runs
- The command is split like a shell would (shlex) and exec'd directly, no shell in between, so
  the pid we watch is the app's own. `{socket}` becomes a fresh unix socket path under run_dir,
  `{port}` a free port on 127.0.0.1. Each start gets a new socket path, so an old worker that
  is still draining and its replacement never share one.
- Each worker is its own process group: the terminal's Ctrl-C reaches only the proxy, which
  then drains before it stops the workers, and signals reach whatever the worker forked.
- Workers get no capability from the proxy: ambient capabilities are cleared before exec.
- Workers die with the proxy: PR_SET_PDEATHSIG(SIGKILL) is set in the child before exec. The
  kernel sends it when the *thread* that forked the child exits, so spawning happens on the
  event loop's thread, which must be the main thread (asyncio.run / uvloop.run do that).
  Grandchildren a worker forks itself are not covered (run the app in one process: the proxy is
  the process manager).
- Exit is watched with a pidfd on the event loop (no SIGCHLD handler, no watcher thread, works
  on uvloop and asyncio alike); output (stdout and stderr together) is read without blocking
  and logged line by line to `tlsproxy.workers` as ``app-1[PID]: line``.

States of a slot's worker: starting -> up -> (draining -> stopping) | exited; a slot with no
worker is backoff (waiting to restart) or crashloop (left down until the next rolling restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import MAX_SOCKET_PATH, UpstreamConfig, UpstreamServer
from proxy.errors import StartupError
from proxy.upstream.health import can_connect, probe
from proxy.workers.memory import cpu_count, plan_workers, read_mem_available, read_rss_tree
from proxy.workers.output import OutputLevels
from proxy.workers.restart_policy import RestartPolicy, RestartSettings
from proxy.workers.status import WorkerInfo

log = logging.getLogger("tlsproxy.workers")

_PR_SET_PDEATHSIG = 1
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# Loaded once here, before any fork: the child must not have to dlopen anything.
_libc = ctypes.CDLL(None, use_errno=True)
_TAIL_LINES = 30
# One counter for the whole process: two supervisors of the same upstream (a reload that builds
# a new one while the old one drains) never pick the same socket path.
_socket_numbers = itertools.count(1)


class PrestartError(StartupError):
    """A prestart step failed: the command, its exit status and the end of its output."""

    def __init__(self, upstream: str, step: int, command: str, returncode: int, output: list[str]):
        self.command = command
        self.returncode = returncode
        self.output = output
        shown = "\n".join(f"  | {line}" for line in output) if output else "  (no output)"
        super().__init__(
            f"upstream {upstream}: prestart step {step} failed with {describe_exit(returncode)}: "
            f"{command}\n{shown}"
        )


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class LineSplitter:
    """Bytes from a pipe -> complete text lines. A line longer than `max_line` is cut into
    pieces rather than buffered without bound (a worker printing a huge blob without newline)."""

    def __init__(self, max_line: int = 16384) -> None:
        self.max_line = max_line
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        buffer = self._buffer + data
        parts = buffer.split(b"\n")
        self._buffer = parts.pop()
        while len(self._buffer) > self.max_line:
            parts.append(self._buffer[: self.max_line])
            self._buffer = self._buffer[self.max_line :]
        return [_text(p) for p in parts]

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer, b""
        return [_text(rest)] if rest else []


def _text(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


def _line_logger(
    tag: str, levels: OutputLevels, pid: list[int] | None = None
) -> Callable[[str], None]:
    """Logs each output line of a child at the level it was printed at, as ``tag[PID]: text``
    (``tag: text`` without a pid, for prestart steps)."""

    def on_line(line: str) -> None:
        level, text = levels.level(line)
        if log.isEnabledFor(level):
            if pid is None:
                log.log(level, "%s: %s", tag, text)
            else:
                log.log(level, "%s[%d]: %s", tag, pid[0] if pid else 0, text)

    return on_line


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The proxy may hold an ambient CAP_NET_BIND_SERVICE (systemd's AmbientCapabilities=,
        # to bind 443 unprivileged); ambient capabilities survive exec, and the app has no use
        # for it. Cleared, a worker of an unprivileged proxy starts with no capability at all.
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: the signal will never come
            os._exit(70)

    return setup


class ChildProcess:
    """A child started from the event loop: output lines go to `on_line`, `exited` resolves to
    the return code (negative: killed by that signal) once the process is reaped."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        cwd: Path | None,
        on_line: Callable[[str], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            close_fds=True,
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self.output_done: asyncio.Future[None] = self.loop.create_future()
        self._on_line = on_line
        self._lines = LineSplitter()
        assert self.popen.stdout is not None
        self._out_fd = self.popen.stdout.fileno()
        os.set_blocking(self._out_fd, False)
        self.loop.add_reader(self._out_fd, self._read_output)
        self._pidfd: int | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
            self.loop.add_reader(self._pidfd, self._check_exit)
        except (AttributeError, OSError):  # no pidfd (old kernel): poll instead
            self._poll_handle = self.loop.call_later(0.2, self._check_exit)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def _read_output(self) -> None:
        try:
            data = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        lines = self._lines.feed(data) if data else self._lines.flush()
        for line in lines:
            self.tail.append(line)
            try:
                self._on_line(line)
            except Exception:  # a logging problem must not stop reading (the child would block)
                log.exception("worker output handler failed")
        if not data:
            self.close_output()

    def close_output(self) -> None:
        if self.output_done.done():
            return
        self.loop.remove_reader(self._out_fd)
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        self.output_done.set_result(None)

    def _check_exit(self) -> None:
        returncode = self.popen.poll()
        if returncode is None:
            if self._poll_handle is not None:
                self._poll_handle = self.loop.call_later(0.2, self._check_exit)
            return
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if not self.exited.done():
            self.exited.set_result(returncode)

    def signal(self, sig: int) -> None:
        """Signal the child's process group (it and whatever it forked); never a reaped pid."""
        if not self.running:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # it left our group for another session: the pid still works
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def wait(self, output_grace: float = 1.0) -> int:
        """The return code, once the output has been read to its end too (bounded: a
        grandchild holding the pipe open must not hang us)."""
        returncode = await asyncio.shield(self.exited)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.output_done), output_grace)
        return returncode

    async def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the return code."""
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except TimeoutError:
                log.warning("pid %d did not stop %.1fs after SIGTERM: SIGKILL", self.pid, grace)
                self.signal(signal.SIGKILL)
        return await self.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


@dataclass(eq=False)
class _Worker:
    slot: _Slot
    tag: str
    server: UpstreamServer
    proc: ChildProcess
    limit: int | None  # max_requests with this worker's jitter
    state: str = "starting"
    requests: int = 0
    rss: int | None = None
    recycling: bool = False
    no_recycle_before: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(eq=False)
class _Slot:
    index: int
    tag: str
    policy: RestartPolicy
    worker: _Worker | None = None
    state: str = "starting"  # used while worker is None: starting | backoff | crashloop
    restarts: int = 0
    delay: float = 0.0  # the back-off before the next start
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None
    swapped: asyncio.Future[None] | None = None


def socket_path(run_dir: Path, upstream: str, number: int, pid: int | None = None) -> Path:
    # The pid keeps two proxies that share a directory (a RuntimeDirectory inherited by a
    # second proxy) from taking each other's paths.
    return run_dir / f"{upstream}-{os.getpid() if pid is None else pid}-{number}.sock"


def worker_environment(config: UpstreamConfig, tag: str | None) -> dict[str, str]:
    """The environment of a worker (`tag`) or a prestart step (None): the proxy's own, plus
    the upstream's `env`, plus the proxy's interpreter's bin directory last on PATH."""
    env = dict(os.environ)
    # systemd's notify socket is the proxy's: a worker that speaks sd_notify (gunicorn says
    # READY=1) must not tell the service manager that the service is ready or stopping.
    env.pop("NOTIFY_SOCKET", None)
    env.update(config.env)
    env.setdefault("PYTHONUNBUFFERED", "1")  # output reaches the log line by line
    # `.venv/bin/tlsproxy run` without an activated venv must still find the uvicorn (or
    # alembic) installed beside it: the interpreter's bin directory goes last on PATH.
    bin_dir = os.path.dirname(sys.executable)
    path = env.get("PATH", os.defpath)
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = f"{path}{os.pathsep}{bin_dir}" if path else bin_dir
    if tag is not None:
        env["TLSPROXY_WORKER"] = tag
    return env


def is_uvicorn(argv: Sequence[str]) -> bool:
    if not argv:
        return False
    if os.path.basename(argv[0]) == "uvicorn":
        return True
    return os.path.basename(argv[0]).startswith("python") and any(
        a == "-m" and b == "uvicorn" for a, b in itertools.pairwise(argv)
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerSupervisor:
    """Runs one upstream's workers. `on_change(servers)` gets the servers that may take
    traffic (ready workers, in slot order) each time that set changes.

    Optional: `outstanding(server)` (the pool's count of requests in flight to a server) lets a
    retired worker be stopped as soon as its last request is done, instead of after a fixed
    `drain_delay`; `cwd` is where workers and prestart steps run (the config file's directory).
    """

    def __init__(
        self,
        config: UpstreamConfig,
        run_dir: Path,
        on_change: Callable[[Sequence[UpstreamServer]], None],
        *,
        cwd: Path | None = None,
        outstanding: Callable[[UpstreamServer], int] | None = None,
        start_timeout: float = 60.0,
        memory_interval: float = 5.0,
        summary_interval: float = 300.0,
        drain_delay: float = 1.0,
        restart: RestartSettings | None = None,
        cpus: int | None = None,
    ) -> None:
        if config.command is None:
            raise ValueError(f"upstream {config.name!r} has no command to supervise")
        self.config = config
        self.name = config.name
        self.run_dir = run_dir
        self.on_change = on_change
        self.cwd = cwd
        self.outstanding = outstanding
        self.start_timeout = start_timeout
        self.memory_interval = memory_interval
        self.summary_interval = summary_interval
        self.drain_delay = drain_delay
        self.restart_settings = restart or RestartSettings()
        self.cpus = cpus or cpu_count()
        self._argv = shlex.split(config.command)
        self._slots: list[_Slot] = []
        self._by_server: dict[UpstreamServer, _Worker] = {}  # every live worker
        self._published: tuple[UpstreamServer, ...] = ()
        self._tasks: set[asyncio.Task[object]] = set()
        self._replace_lock = asyncio.Lock()
        self._rolling = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._prestart_proc: ChildProcess | None = None
        self._stopping = False

    # --- public -------------------------------------------------------------------------------

    @property
    def servers(self) -> tuple[UpstreamServer, ...]:
        """The servers last passed to on_change."""
        return self._published

    async def start(self) -> None:
        """Prestart steps, then the first worker (its failure is a StartupError with its output),
        then the memory rule, then the rest; returns when every slot is up or given up."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)  # only the proxy's user may connect to worker sockets
        await self._prestart()
        first = self._new_slot()
        try:
            worker = self._spawn(first)
        except OSError as exc:
            raise StartupError(
                f"upstream {self.name}: cannot run the worker command "
                f"{self.config.command!r}: {exc.strerror or exc}"
            ) from None
        if not await self._wait_ready(worker):
            why = self._why_not_ready(worker)
            tail = list(worker.proc.tail)
            worker.proc.kill()
            await worker.proc.wait()
            self._forget(worker)
            shown = "\n".join(f"  | {line}" for line in tail) if tail else "  (no output)"
            raise StartupError(
                f"upstream {self.name}: the first worker did not become ready ({why}): "
                f"{self.config.command}\n{shown}"
            )
        self._go_up(first, worker)
        self._watch(first)
        plan = plan_workers(
            self.config.workers, self.cpus, read_rss_tree(worker.pid), read_mem_available()
        )
        if plan.message:
            log.warning("upstream %s: %s", self.name, plan.message)
        rest = [self._new_slot() for _ in range(plan.count - 1)]
        await asyncio.gather(*(self._bring_up(slot) for slot in rest))
        up = sum(1 for s in self._slots if s.worker is not None)
        log.info("upstream %s: %d of %d workers up", self.name, up, len(self._slots))
        self._monitor = self._task(self._monitor_loop(), "monitor")

    async def rolling_restart(self, config: UpstreamConfig | None = None) -> None:
        """The deploy step (SIGHUP): run the prestart steps again (new code may bring new
        migrations; if one fails, the rollout is cancelled and the old workers keep serving),
        then replace each worker in turn: the new one is ready before the old one is taken out
        of the upstream, drained and stopped. A replacement that fails to become ready stops the
        rollout. Crash-looped slots get a fresh start.

        `config`: the re-read upstream config (same name); new workers use its command, env and
        limits, and a changed `workers` number grows or shrinks the set afterwards."""
        async with self._rolling:  # a second SIGHUP meanwhile runs a full round after this one
            if config is not None:
                if config.command is None:
                    raise ValueError(f"upstream {config.name!r} has no command to supervise")
                self.config = config
                self._argv = shlex.split(config.command)
            try:
                await self._prestart()
            except PrestartError as exc:
                log.error("upstream %s: rolling restart cancelled: %s", self.name, exc)
                return
            await self._rolling_restart()
            await self._resize()

    async def _bring_up(self, slot: _Slot) -> None:
        if await self._start_in_slot(slot):
            self._watch(slot)

    async def _rolling_restart(self) -> None:
        log.info("upstream %s: rolling restart of %d workers", self.name, len(self._slots))
        for slot in list(self._slots):
            if self._stopping:
                return
            if slot.worker is None and slot.state == "crashloop":
                slot.policy.reset()
                await self._bring_up(slot)
                continue
            if slot.worker is None or slot.lock.locked():
                continue  # restarting right now: it comes up with the new code anyway
            if not await self._replace(slot, "rolling restart"):
                if not self._stopping:
                    log.error("upstream %s: rolling restart stopped at %s", self.name, slot.tag)
                return
        log.info("upstream %s: rolling restart done", self.name)

    async def _resize(self) -> None:
        """Match the slot count to a changed fixed `workers` ("auto" keeps what start chose)."""
        want = self.config.workers
        if not isinstance(want, int) or self._stopping:
            return
        if want != len(self._slots):
            log.info("upstream %s: %d workers -> %d", self.name, len(self._slots), want)
        if len(self._slots) < want:
            more = [self._new_slot() for _ in range(want - len(self._slots))]
            await asyncio.gather(*(self._bring_up(slot) for slot in more))
        while len(self._slots) > want and not self._stopping:
            slot = self._slots.pop()
            if slot.watcher is not None:
                slot.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.watcher
            slot.worker = None
            self._publish()
            # the slot's worker, and one its watcher may have been starting
            leaving = [w for w in self._by_server.values() if w.slot is slot]
            await asyncio.gather(*(self._retire(w) for w in leaving))

    async def stop(self) -> None:
        """Take every worker out of the upstream, SIGTERM them all, SIGKILL those still running
        after config.stop_timeout."""
        if self._stopping:
            return
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._prestart_proc is not None:
            self._prestart_proc.kill()
            await self._prestart_proc.wait()
        self._publish()
        workers = list(self._by_server.values())
        for w in workers:
            w.state = "stopping"
        await asyncio.gather(*(w.proc.stop(self.config.stop_timeout) for w in workers))
        for w in workers:
            self._forget(w)
            w.proc.close_output()
        for slot in self._slots:
            slot.worker = None
            slot.state = "stopped"
        log.info("upstream %s: %d workers stopped", self.name, len(workers))

    def note_request(self, server: UpstreamServer) -> None:
        """Count one request sent to `server`; at its max_requests the worker is recycled."""
        w = self._by_server.get(server)
        if w is None:
            return
        w.requests += 1
        if w.limit is not None and w.requests >= w.limit:
            self._recycle(w, f"{w.requests} requests served (max_requests)")

    def recycle(self, server: UpstreamServer, reason: str) -> bool:
        """Replace the worker behind `server` gracefully (e.g. the HealthChecker found it hung:
        a new one is started and made ready first). False if no such live worker."""
        w = self._by_server.get(server)
        if w is None:
            return False
        self._recycle(w, reason)
        return True

    def snapshot(self) -> list[WorkerInfo]:
        now = time.monotonic()
        infos: list[WorkerInfo] = []
        listed: set[int] = set()
        for slot in self._slots:
            w = slot.worker
            if w is None:
                infos.append(
                    WorkerInfo(self.name, slot.tag, None, slot.state, 0.0, 0, None, "-",
                               slot.restarts)
                )  # fmt: skip
                continue
            infos.append(self._info(w, now))
            listed.add(id(w))
        for w in self._by_server.values():  # draining ones and replacements being started
            if id(w) not in listed:
                infos.append(self._info(w, now))
        return infos

    # --- prestart -----------------------------------------------------------------------------

    async def _prestart(self) -> None:
        steps = self.config.prestart
        for number, command in enumerate(steps, 1):
            log.info("upstream %s: prestart %d/%d: %s", self.name, number, len(steps), command)
            tag = f"{self.name} prestart[{number}]"
            proc = ChildProcess(
                ["/bin/sh", "-c", command],
                env=self._env(None),
                cwd=self.cwd,
                on_line=_line_logger(tag, OutputLevels()),
            )
            self._prestart_proc = proc
            try:
                returncode = await proc.wait()
            except asyncio.CancelledError:
                proc.kill()
                raise
            finally:
                self._prestart_proc = None
            if returncode != 0:
                raise PrestartError(self.name, number, command, returncode, list(proc.tail))
            took = time.monotonic() - proc.started
            log.info("upstream %s: prestart %d done in %.1fs", self.name, number, took)

    # --- spawning and readiness ---------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        index = len(self._slots)
        slot = _Slot(index, f"{self.name}-{index + 1}", RestartPolicy(self.restart_settings))
        self._slots.append(slot)
        return slot

    def _env(self, tag: str | None) -> dict[str, str]:
        return worker_environment(self.config, tag)

    def _listen_address(self) -> tuple[UpstreamServer, dict[str, str]]:
        values: dict[str, str] = {}
        server: UpstreamServer | None = None
        if "{socket}" in self.config.command:  # type: ignore[operator]
            path = socket_path(self.run_dir, self.name, next(_socket_numbers))
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise StartupError(
                    f"upstream {self.name}: worker socket path {path} is longer than "
                    f"{MAX_SOCKET_PATH} bytes; use a shorter data_dir (or, under systemd, "
                    "RuntimeDirectory=, which puts the sockets in /run)"
                )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            values["{socket}"] = str(path)
            server = UpstreamServer(path=str(path))
        if "{port}" in self.config.command:  # type: ignore[operator]
            used = {s.port for s in self._by_server}
            port = _free_port()
            while port in used:
                port = _free_port()
            values["{port}"] = str(port)
            server = server or UpstreamServer(host="127.0.0.1", port=port)
        assert server is not None  # config guarantees one placeholder
        return server, values

    def _spawn(self, slot: _Slot) -> _Worker:
        """Start a worker for `slot` (not yet serving). OSError if it cannot be exec'd."""
        server, values = self._listen_address()
        argv = list(self._argv)
        for placeholder, value in values.items():
            argv = [a.replace(placeholder, value) for a in argv]
        if server.is_unix and is_uvicorn(argv):
            if not any(a.startswith("--forwarded-allow-ips") for a in argv):
                # uvicorn sees no client address on a unix socket, so a list of IPs or the path
                # never matches: "*" is the only value that trusts the proxy's X-Forwarded-*.
                # The worker listens on nothing but this socket (in a 0700 directory), so "*"
                # trusts exactly the proxy.
                argv += ["--forwarded-allow-ips", "*"]
        holder: list[int] = []
        tag = slot.tag
        write = _line_logger(tag, OutputLevels(self.config.health), holder)
        proc = ChildProcess(argv, env=self._env(tag), cwd=self.cwd, on_line=write)
        holder.append(proc.pid)
        limit = None
        if self.config.max_requests:
            limit = self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
        worker = _Worker(slot, tag, server, proc, limit)
        self._by_server[server] = worker
        log.info("%s: started pid %d on %s: %s", tag, proc.pid, server, shlex.join(argv))
        return worker

    async def _wait_ready(self, w: _Worker) -> bool:
        """Poll until the worker answers (health path if set, else a connect), it exits, or
        start_timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        health = self.config.health
        while w.proc.running:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            timeout = min(self.config.health_timeout, remaining)
            if health is not None:
                ok = await probe(w.server, health, timeout)
            else:
                ok = await can_connect(w.server, timeout)
            if ok and w.proc.running:
                took = time.monotonic() - w.proc.started
                log.info("%s: pid %d ready in %.1fs", w.tag, w.pid, took)
                return True
            await asyncio.wait([w.proc.exited], timeout=0.1)
        return False

    def _why_not_ready(self, w: _Worker) -> str:
        if w.proc.exited.done():
            return f"it exited with {describe_exit(w.proc.exited.result())}"
        what = f"{self.config.health} did not answer 2xx/3xx" if self.config.health else "no"
        return f"{what} connection within {self.start_timeout:.0f}s"

    async def _start_in_slot(self, slot: _Slot) -> bool:
        """Start workers in `slot` until one is ready (True) or the slot crash-loops (False)."""
        while not self._stopping:
            slot.state = "starting"
            started = time.monotonic()
            why: str
            try:
                worker = self._spawn(slot)
            except OSError as exc:
                why = f"cannot run it: {exc}"
            else:
                if await self._wait_ready(worker):
                    self._go_up(slot, worker)
                    return True
                why = self._why_not_ready(worker)
                worker.proc.kill()
                await worker.proc.wait()
                self._forget(worker)
            if not self._schedule_restart(slot, started, f"did not become ready ({why})"):
                return False
            await asyncio.sleep(slot.delay)
        return False

    def _schedule_restart(self, slot: _Slot, started: float, what: str) -> bool:
        """Apply the restart policy after a failure; False when the slot is given up."""
        slot.restarts += 1
        delay = slot.policy.on_exit(time.monotonic(), started)
        if delay is None:
            slot.state = "crashloop"
            log.error(
                "%s: crash loop: %s, %d times in a row; leaving it down (the other workers keep "
                "serving; a rolling restart (SIGHUP) tries again)",
                slot.tag,
                what,
                slot.policy.quick_exits,
            )
            return False
        slot.state = "backoff"
        slot.delay = delay
        log.warning("%s: %s; restarting in %.1fs", slot.tag, what, delay)
        return True

    def _go_up(self, slot: _Slot, w: _Worker) -> None:
        w.state = "up"
        slot.worker = w
        slot.state = "up"
        self._publish()

    # --- watching, replacing, retiring --------------------------------------------------------

    def _watch(self, slot: _Slot) -> None:
        if slot.watcher is None or slot.watcher.done():
            slot.watcher = self._task(self._watch_slot(slot), f"watch {slot.tag}")

    async def _watch_slot(self, slot: _Slot) -> None:
        """Wait for the slot's worker to exit on its own; restart it with back-off."""
        while not self._stopping:
            w = slot.worker
            if w is None:
                return
            slot.swapped = asyncio.get_running_loop().create_future()
            await asyncio.wait([w.proc.exited, slot.swapped], return_when=asyncio.FIRST_COMPLETED)
            if w is not slot.worker or not w.proc.exited.done() or self._stopping:
                continue  # replaced on purpose: watch the new one
            returncode = w.proc.exited.result()
            uptime = time.monotonic() - w.proc.started
            w.state = "exited"
            slot.worker = None
            self._forget(w)
            self._publish()
            what = f"pid {w.pid} exited with {describe_exit(returncode)} after {uptime:.1f}s"
            async with slot.lock:
                if slot.worker is not None:  # a replacement started meanwhile took the slot
                    log.warning("%s: %s while being replaced", slot.tag, what)
                    continue
                if not self._schedule_restart(slot, w.proc.started, what):
                    return
                await asyncio.sleep(slot.delay)
                if not await self._start_in_slot(slot):
                    return

    def _recycle(self, w: _Worker, reason: str) -> None:
        if w.recycling or w.state != "up" or self._stopping:
            return
        if time.monotonic() < w.no_recycle_before:
            return
        w.recycling = True
        self._task(self._replace(w.slot, reason), f"recycle {w.tag}")

    async def _replace(self, slot: _Slot, reason: str) -> bool:
        """Start a new worker in `slot`; once it is ready, swap it in and retire the old one.
        One replacement at a time in the whole upstream (memory stays at N+1 workers)."""
        async with self._replace_lock:
            async with slot.lock:
                old = slot.worker
                if old is None or old.state != "up" or self._stopping:
                    return False
                log.info("%s: replacing pid %d: %s", slot.tag, old.pid, reason)
                try:
                    new = self._spawn(slot)
                except OSError as exc:
                    log.error("%s: cannot start a replacement: %s", slot.tag, exc)
                    self._recycle_failed(old)
                    return False
                if not await self._wait_ready(new):
                    if self._stopping:
                        return False
                    log.error(
                        "%s: replacement pid %d did not become ready (%s); pid %d keeps serving",
                        slot.tag,
                        new.pid,
                        self._why_not_ready(new),
                        old.pid,
                    )
                    new.proc.kill()
                    await new.proc.wait()
                    self._forget(new)
                    self._recycle_failed(old)
                    return False
                old.state = "draining"
                self._go_up(slot, new)
                if slot.swapped is not None and not slot.swapped.done():
                    slot.swapped.set_result(None)
            await self._retire(old)
            return True

    def _recycle_failed(self, old: _Worker) -> None:
        old.recycling = False
        old.no_recycle_before = time.monotonic() + 30.0

    async def _retire(self, w: _Worker) -> None:
        """Drain a worker already taken out of on_change, then stop it."""
        w.state = "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout
        if self.outstanding is not None:
            while self.outstanding(w.server) > 0 and w.proc.running and loop.time() < deadline:
                await asyncio.wait([w.proc.exited], timeout=0.05)
        else:
            await asyncio.wait([w.proc.exited], timeout=self.drain_delay)
        w.state = "stopping"
        returncode = await w.proc.stop(self.config.stop_timeout)
        log.info(
            "%s: pid %d stopped (%s) after %d requests",
            w.tag,
            w.pid,
            describe_exit(returncode),
            w.requests,
        )
        self._forget(w)

    def _forget(self, w: _Worker) -> None:
        if self._by_server.get(w.server) is w:
            del self._by_server[w.server]
        # The output pipe is left to reach its EOF: the last lines (a traceback) come after
        # the exit is seen.
        if w.server.path is not None and not w.proc.running:
            with contextlib.suppress(OSError):
                os.unlink(w.server.path)

    def _publish(self) -> None:
        servers = () if self._stopping else tuple(
            s.worker.server for s in self._slots if s.worker is not None and s.worker.state == "up"
        )  # fmt: skip
        if servers == self._published:
            return
        self._published = servers
        try:
            self.on_change(servers)
        except Exception:
            log.exception("upstream %s: on_change callback failed", self.name)

    # --- background ---------------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        """RSS of each worker every memory_interval (recycling those over max_memory), and a
        summary line every summary_interval."""
        next_summary = time.monotonic() + self.summary_interval
        limit = self.config.max_memory
        while True:
            await asyncio.sleep(self.memory_interval)
            for slot in self._slots:
                w = slot.worker
                if w is None or w.state != "up":
                    continue
                w.rss = read_rss_tree(w.pid)
                if limit is not None and w.rss is not None and w.rss > limit:
                    self._recycle(
                        w, f"RSS {w.rss / 2**20:.0f} MiB > max_memory {limit / 2**20:.0f} MiB"
                    )
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + self.summary_interval
                self.log_summary()

    def log_summary(self) -> None:
        parts = []
        for info in self.snapshot():
            rss = "-" if info.rss is None else f"{info.rss / 2**20:.0f}MiB"
            parts.append(
                f"{info.worker} pid={info.pid or '-'} {info.state} up={info.uptime:.0f}s "
                f"requests={info.requests} rss={rss}"
            )
        log.info("upstream %s workers: %s", self.name, "; ".join(parts))

    def _task(self, coro: object, name: str) -> asyncio.Task[object]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name} {name}")  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "upstream %s: %s failed", self.name, task.get_name(), exc_info=task.exception()
            )

    def _info(self, w: _Worker, now: float) -> WorkerInfo:
        running = w.proc.running
        rss = read_rss_tree(w.pid) if running else None
        if rss is not None:
            w.rss = rss
        return WorkerInfo(
            upstream=self.name,
            worker=w.tag,
            pid=w.pid,
            state=w.state,
            uptime=now - w.proc.started,
            requests=w.requests,
            rss=rss,
            listen=w.server.label,
            restarts=w.slot.restarts,
        )
