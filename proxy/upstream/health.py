"""Server health: pure per-server state, an HTTP probe, and the loop that probes on an interval.

`ServerHealth` combines two signals (time always passed in as `now`):
- passive: a request that could not connect or was reset calls `record_failure(now)`, and the
  server is skipped for `fail_timeout` seconds (one failure is enough: the request that saw it
  is retried elsewhere only if none of its bytes were sent, so the next ones should not try);
- active: each probe result feeds `probe_result(ok, now)`; `unhealthy_threshold` failures in a
  row take the server down, `healthy_threshold` passes in a row bring it back.
A server is up when neither signal holds it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import h11

from proxy.config import UpstreamConfig, UpstreamServer

log = logging.getLogger("tlsproxy.upstream")


@dataclass
class ServerHealth:
    fail_timeout: float = 10.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    active_up: bool = True  # what the probes say (True until they say otherwise)
    down_until: float = 0.0  # passive: skipped until then
    passes: int = 0  # consecutive probe passes
    fails: int = 0  # consecutive probe failures

    @classmethod
    def from_config(cls, config: UpstreamConfig, *, initially_up: bool = True) -> ServerHealth:
        return cls(
            fail_timeout=config.fail_timeout,
            healthy_threshold=config.healthy_threshold,
            unhealthy_threshold=config.unhealthy_threshold,
            active_up=initially_up,
        )

    def is_up(self, now: float) -> bool:
        return self.active_up and now >= self.down_until

    def record_failure(self, now: float) -> None:
        """A connect failure or reset seen by a real request."""
        self.down_until = now + self.fail_timeout

    def record_success(self, now: float) -> None:
        """A real request got a response: whatever passive mark there was is over."""
        self.down_until = 0.0

    def probe_result(self, ok: bool, now: float) -> bool:
        """Feed one active probe; return True when this changed `active_up`."""
        if ok:
            self.passes += 1
            self.fails = 0
            if not self.active_up and self.passes >= self.healthy_threshold:
                self.active_up = True
                self.down_until = 0.0
                return True
        else:
            self.fails += 1
            self.passes = 0
            if self.active_up and self.fails >= self.unhealthy_threshold:
                self.active_up = False
                return True
        return False

    def up_again_in(self, now: float, interval: float) -> float:
        """Earliest time from `now` this server could be up again (0 if it is up): the rest
        of a passive cool-down, or the probes still needed to pass."""
        wait = max(0.0, self.down_until - now)
        if not self.active_up:
            wait = max(wait, interval * max(1, self.healthy_threshold - self.passes))
        return wait


def retry_after(healths: Iterable[ServerHealth], now: float, interval: float) -> int:
    """Seconds for a 503's Retry-After when every server is down: when the first could be back,
    rounded up, at least 1."""
    soonest = min((h.up_again_in(now, interval) for h in healths), default=interval)
    return max(1, int(soonest + 0.999))


async def open_stream(
    server: UpstreamServer,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if server.path is not None:
        return await asyncio.open_unix_connection(server.path)
    return await asyncio.open_connection(server.host, server.port)


async def can_connect(server: UpstreamServer, timeout: float) -> bool:  # noqa: ASYNC109
    """True if a connection to the server is accepted (readiness when no health path is set)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await open_stream(server)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def probe(server: UpstreamServer, path: str, timeout: float) -> bool:  # noqa: ASYNC109
    """One `GET path` over a fresh connection; a 2xx or 3xx status within `timeout` passes."""
    return await probe_failure(server, path, timeout) is None


async def probe_failure(
    server: UpstreamServer,
    path: str,
    timeout: float,  # noqa: ASYNC109
) -> str | None:
    """`probe`, saying why it failed: None when it passed, else a few words ("status 500",
    "no answer within 2s", "connection refused") for the line of a server going down."""
    host = "localhost" if server.path is not None else server.label
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", host),
            ("User-Agent", "tlsproxy-health"),
            ("Connection", "close"),
        ],
    )
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_stream(server)
            conn = h11.Connection(h11.CLIENT)
            writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(event, h11.Response):
                    if 200 <= event.status_code < 400:
                        return None
                    return f"status {event.status_code}"
                if isinstance(event, h11.ConnectionClosed):
                    return "closed without a response"
                # InformationalResponse (100, 103): keep reading for the final one
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    except h11.ProtocolError as exc:
        return f"invalid response ({exc})"
    finally:
        if writer is not None:
            writer.close()


HealthMap = Mapping[UpstreamServer, ServerHealth]


class HealthChecker:
    """Probes every server in `health` each `config.health_interval` and feeds the results
    into its ServerHealth. `health` (a mapping, or a function returning one, e.g. built from
    the pool's current servers) is read afresh each round, so the owner may add and remove
    servers while this runs. `on_change(server, up)` is called on each transition."""

    def __init__(
        self,
        config: UpstreamConfig,
        health: HealthMap | Callable[[], HealthMap],
        *,
        on_change: Callable[[UpstreamServer, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.health is None:
            raise ValueError(f"upstream {config.name!r} has no health path to probe")
        self.config = config
        self.path: str = config.health
        self.health = health
        self.on_change = on_change
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"health:{self.config.name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check_once(self) -> None:
        """One round: every server probed concurrently, results applied at one `now`."""
        health = self.health() if callable(self.health) else self.health
        servers = list(health)
        if not servers:
            return
        timeout = self.config.health_timeout
        results = await asyncio.gather(*(probe_failure(s, self.path, timeout) for s in servers))
        now = self.clock()
        for server, failure in zip(servers, results, strict=True):
            state = health.get(server)
            if state is None:  # removed while we probed
                continue
            # Only transitions are logged: a line per probe, every health_interval for every
            # server, would bury everything else in a VPS's journal.
            if state.probe_result(failure is None, now):
                if state.active_up:
                    log.info(
                        "upstream %s: %s is up again (%d health checks of %s passed)",
                        self.config.name,
                        server,
                        state.passes,
                        self.path,
                    )
                else:
                    log.warning(
                        "upstream %s: %s is down: %d health checks of %s failed (last: %s)",
                        self.config.name,
                        server,
                        state.fails,
                        self.path,
                        failure,
                    )
                if self.on_change is not None:
                    self.on_change(server, state.active_up)

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug here must not end health checking for good
                log.exception("upstream %s: health check round failed", self.config.name)
            await asyncio.sleep(self.config.health_interval)
