"""A pool of keep-alive connections to the servers of one upstream.

The decisions are a pure step, `_assign` (like httpcore's `_assign_requests_to_connections`):
it picks the server, takes an idle connection if a fresh one is there, and returns the
expired ones for the shell to close. The shell does the I/O: connecting, closing, timers.

Rules:
- Server choice is one small method, `choose_server`: the configured balancer
  (`least_conn` or `round_robin`) over the servers whose health says up.
- Passive health: a server that refused or reset a request before answering is skipped for
  `fail_timeout`. Such marks are a hint, not a verdict: with one server, or when every server
  carries one, the servers the active probes still call up are tried anyway (as nginx does),
  so a blip never turns into a 503 for the whole cool-down. Only servers the probes found
  down (or none at all) give 503, with a Retry-After.
- A server removed by `set_servers` (a worker being retired) stays counted until its last
  request ends, so its supervisor never stops it with a request in flight.
- An idle connection lives at most `keepalive_timeout` (default 4 s, under uvicorn's 5 s):
  reusing one just as the app closes it would reset a request.
- At most `max_idle_connections` idle connections per server; the most recently used one is
  taken first (it is the least likely to have been closed by the server).
- An idle connection the server closed (EOF) leaves the pool at once.

Hooks for health checks (issue 4): `set_servers` (workers come and go), `server_failed` (called
by the exchange when a server failed a request before answering), `retry_after` (for the 503
when no server can take a request), `outstanding(server)` (requests in flight, for draining).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from operator import attrgetter

from proxy.config import Limits, UpstreamConfig, UpstreamServer
from proxy.errors import UpstreamError
from proxy.upstream.balancer import make as make_balancer
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.health import ServerHealth
from proxy.upstream.health import retry_after as health_retry_after

_outstanding = attrgetter("outstanding")


class ServerSlot:
    """The pool's view of one server: its idle connections and the requests it is serving."""

    __slots__ = ("active", "health", "idle", "outstanding", "server")

    def __init__(self, server: UpstreamServer, health: ServerHealth) -> None:
        self.server = server
        self.health = health
        self.idle: list[UpstreamConnection] = []  # oldest first; taken from the end
        self.outstanding = 0
        self.active = True  # False once removed by set_servers: finish, then close


class UpstreamPool:
    def __init__(self, config: UpstreamConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self.name = config.name
        self.slots: list[ServerSlot] = []
        self.balancer = make_balancer(config.balance)
        # Servers removed while requests were in flight on them, until those requests end.
        self._retired: dict[UpstreamServer, ServerSlot] = {}
        # Called with the server each request goes to (supervised workers count requests).
        self.on_acquire: Callable[[UpstreamServer], None] | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None
        # For the metrics, by server: kept across set_servers (a restarted worker's socket is
        # the same server), lost with the pool when its upstream's config changes.
        self.connect_failures: dict[UpstreamServer, int] = {}
        self.retries: dict[UpstreamServer, int] = {}
        self.set_servers(config.servers)

    # --- servers --------------------------------------------------------------------------

    def set_servers(self, servers: Sequence[UpstreamServer]) -> None:
        """Replace the server list; connections to removed servers close when idle."""
        current = {slot.server: slot for slot in self.slots}
        slots = []
        for server in servers:
            slot = current.pop(server, None) or self._retired.pop(server, None)
            if slot is None:
                slot = ServerSlot(server, ServerHealth.from_config(self.config))
            slot.active = True
            slots.append(slot)
        for slot in current.values():
            slot.active = False
            self._close_all(slot.idle)
            if slot.outstanding:
                self._retired[slot.server] = slot
        self.slots = slots

    def choose_server(self, avoid: ServerSlot | None = None) -> ServerSlot | None:
        """The server for the next request, or None when no server may take one (503)."""
        slots = self.slots
        if len(slots) == 1:  # the common case, kept cheap: one attribute read
            slot = slots[0]
            return slot if slot.health.active_up else None
        now = time.monotonic()
        candidates = [s for s in slots if s is not avoid and s.health.is_up(now)]
        if not candidates:
            # Passive marks alone never refuse a request: try what the probes call up.
            candidates = [s for s in slots if s is not avoid and s.health.active_up]
            if not candidates and avoid is not None and avoid.health.active_up:
                candidates = [avoid]
        return self.balancer.choose(candidates, _outstanding)

    # --- acquire / release ----------------------------------------------------------------

    def _assign(
        self, now: float, avoid: ServerSlot | None = None
    ) -> tuple[ServerSlot | None, UpstreamConnection | None, list[UpstreamConnection]]:
        """Pure step: (server, idle connection or None to connect, expired ones to close)."""
        slot = self.choose_server(avoid)
        if slot is None:
            return None, None, []
        idle = slot.idle
        expired: list[UpstreamConnection] = []
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.last_activity < self.config.keepalive_timeout:
                return slot, conn, expired
            # The newest is too old, so all older ones are too.
            expired.append(conn)
            expired.extend(idle)
            idle.clear()
        return slot, None, expired

    def acquire(
        self, avoid: ServerSlot | None = None
    ) -> tuple[ServerSlot | None, UpstreamConnection | None]:
        """A server for a new request and, when one is fresh, an idle connection to it.

        With no connection the caller must `await connect(slot)`. The slot counts the request
        as outstanding until `release`. `avoid`: a server that just failed this request.
        """
        loop = self._loop
        if loop is None:  # looked up once: get_running_loop costs a getpid() call on 3.11
            loop = self._loop = asyncio.get_running_loop()
        slot, conn, expired = self._assign(loop.time(), avoid)
        if expired:
            self._close_all(expired)
        if slot is not None:
            slot.outstanding += 1
            if self.on_acquire is not None:
                self.on_acquire(slot.server)
        return slot, conn

    async def connect(self, slot: ServerSlot) -> UpstreamConnection:
        """A new connection to `slot`'s server; UpstreamError 502 (refused) or 504 (timeout)."""
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, slot)
        server = slot.server
        timeout = self.limits.upstream_connect_timeout
        try:
            async with asyncio.timeout(timeout):
                if server.path is not None:
                    await loop.create_unix_connection(lambda: conn, server.path)
                else:
                    await loop.create_connection(lambda: conn, server.host, server.port)
        except TimeoutError:
            self.count(self.connect_failures, server)
            raise UpstreamError(
                f"connecting to {server.label} took longer than {timeout:g}s", 504
            ) from None
        except OSError as exc:
            self.count(self.connect_failures, server)
            raise UpstreamError(
                f"cannot connect to {server.label}: {exc.strerror or exc}", 502
            ) from None
        return conn

    def release(
        self, slot: ServerSlot, conn: UpstreamConnection | None, *, reusable: bool = False
    ) -> None:
        """The request on `slot` is over; keep `conn` for the next one if it can carry it."""
        slot.outstanding -= 1
        if not slot.active and slot.outstanding == 0:
            self._retired.pop(slot.server, None)
        if conn is None:
            return
        conn.detach()
        if (
            reusable
            and conn.reusable
            and slot.active
            and not self._closed
            and len(slot.idle) < self.config.max_idle_connections
        ):
            slot.idle.append(conn)
            if self._sweep is None:
                self._schedule_sweep(conn.last_activity + self.config.keepalive_timeout)
        else:
            conn.close()

    def discard(self, conn: UpstreamConnection) -> None:
        """An idle connection was closed by its server: forget it."""
        idle = conn.slot.idle
        if conn in idle:
            idle.remove(conn)
        conn.closed = True

    def server_failed(self, slot: ServerSlot, error: UpstreamError) -> None:
        """A request to `slot` failed before any response byte. A refusal or reset (502)
        marks the server down for fail_timeout; a slow answer (504) says nothing of that."""
        if error.status == 502:
            slot.health.record_failure(time.monotonic())

    def server_answered(self, slot: ServerSlot) -> None:
        """A response head came back: a passive mark on that server is over."""
        if slot.health.down_until:
            slot.health.record_success(time.monotonic())

    def retry_after(self) -> int | None:
        """Seconds a client should wait when no server can take a request (503)."""
        return health_retry_after(
            [slot.health for slot in self.slots], time.monotonic(), self.config.health_interval
        )

    @staticmethod
    def count(counters: dict[UpstreamServer, int], server: UpstreamServer) -> None:
        counters[server] = counters.get(server, 0) + 1

    def health_map(self) -> dict[UpstreamServer, ServerHealth]:
        """Each current server's health, for the active probes."""
        return {slot.server: slot.health for slot in self.slots}

    def outstanding(self, server: UpstreamServer) -> int:
        """Requests in flight to `server`, removed servers included (0 if unknown)."""
        for slot in self.slots:
            if slot.server == server:
                return slot.outstanding
        retired = self._retired.get(server)
        return retired.outstanding if retired is not None else 0

    @property
    def idle_count(self) -> int:
        return sum(len(slot.idle) for slot in self.slots)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for slot in self.slots:
            self._close_all(slot.idle)

    # --- idle expiry ----------------------------------------------------------------------

    def _schedule_sweep(self, when: float) -> None:
        self._sweep = asyncio.get_running_loop().call_at(when, self._expire_idle)

    def _expire_idle(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        keepalive = self.config.keepalive_timeout
        next_due: float | None = None
        for slot in self.slots:
            idle = slot.idle
            fresh = 0
            while fresh < len(idle) and now - idle[fresh].last_activity >= keepalive:
                fresh += 1
            if fresh:
                expired = idle[:fresh]
                del idle[:fresh]
                self._close_all(expired)
            if idle:
                due = idle[0].last_activity + keepalive
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None and not self._closed:
            self._schedule_sweep(next_due)

    @staticmethod
    def _close_all(conns: list[UpstreamConnection]) -> None:
        for conn in list(conns):
            conn.close()
        conns.clear()
