"""A pool of keep-alive connections to the servers of one upstream.

The decisions are a pure step, `_assign` (like httpcore's `_assign_requests_to_connections`):
it picks the server, takes an idle connection if a fresh one is there, and returns the
expired ones for the shell to close. The shell does the I/O: connecting, closing, timers.

Rules:
- Server choice is one small method, `choose_server` (least outstanding requests, ties broken
  by rotation), so a balancer can replace it.
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
from collections.abc import Sequence

from proxy.config import Limits, UpstreamConfig, UpstreamServer
from proxy.errors import UpstreamError
from proxy.upstream.connection import UpstreamConnection


class ServerSlot:
    """The pool's view of one server: its idle connections and the requests it is serving."""

    __slots__ = ("active", "idle", "outstanding", "server")

    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.idle: list[UpstreamConnection] = []  # oldest first; taken from the end
        self.outstanding = 0
        self.active = True  # False once removed by set_servers: finish, then close


class UpstreamPool:
    def __init__(self, config: UpstreamConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self.name = config.name
        self.slots: list[ServerSlot] = []
        self._rotation = 0
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None
        self.set_servers(config.servers)

    # --- servers --------------------------------------------------------------------------

    def set_servers(self, servers: Sequence[UpstreamServer]) -> None:
        """Replace the server list; connections to removed servers close when idle."""
        current = {slot.server: slot for slot in self.slots}
        slots = []
        for server in servers:
            slot = current.pop(server, None) or ServerSlot(server)
            slot.active = True
            slots.append(slot)
        for slot in current.values():
            slot.active = False
            self._close_all(slot.idle)
        self.slots = slots

    def choose_server(self) -> ServerSlot | None:
        """The server for the next request: the one with the fewest requests in flight."""
        slots = self.slots
        count = len(slots)
        if count == 1:
            return slots[0]
        if count == 0:
            return None
        start = self._rotation = (self._rotation + 1) % count
        best = slots[start]
        for i in range(1, count):
            slot = slots[(start + i) % count]
            if slot.outstanding < best.outstanding:
                best = slot
        return best

    # --- acquire / release ----------------------------------------------------------------

    def _assign(
        self, now: float, avoid: ServerSlot | None = None
    ) -> tuple[ServerSlot | None, UpstreamConnection | None, list[UpstreamConnection]]:
        """Pure step: (server, idle connection or None to connect, expired ones to close)."""
        slot = self.choose_server()
        if slot is not None and slot is avoid and len(self.slots) > 1:
            slot = self.choose_server()
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
        slot, conn, expired = self._assign(asyncio.get_running_loop().time(), avoid)
        if expired:
            self._close_all(expired)
        if slot is not None:
            slot.outstanding += 1
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
            raise UpstreamError(
                f"connecting to {server.label} took longer than {timeout:g}s", 504
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {server.label}: {exc.strerror or exc}", 502
            ) from None
        return conn

    def release(
        self, slot: ServerSlot, conn: UpstreamConnection | None, *, reusable: bool = False
    ) -> None:
        """The request on `slot` is over; keep `conn` for the next one if it can carry it."""
        slot.outstanding -= 1
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
        """A request to `slot` failed before any response byte (refused, reset, timed out).

        The hook for passive health checks: nothing happens here yet.
        """

    def retry_after(self) -> int | None:
        """Seconds a client should wait when no server can take a request (503), if known."""
        return None

    def outstanding(self, server: UpstreamServer) -> int:
        """Requests in flight to `server` (0 for a server this pool does not know)."""
        for slot in self.slots:
            if slot.server == server:
                return slot.outstanding
        return 0

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
