"""The admin endpoint (`[server] admin`): GET /metrics for Prometheus, /status and /certs as
JSON for `tlsproxy status` and `tlsproxy certs`.

Plain HTTP/1.1 over h11, on loopback or a unix socket (0600), with no authentication: what it
shows (sites, upstream addresses, certificate dates) is for the machine's operator, which is
why config.py refuses a non-loopback address unless `admin_allow_remote` says otherwise. Pages
are made only when asked for; a scrape every few seconds costs the proxy nothing in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11

from proxy.config import AdminAddress
from proxy.errors import StartupError
from proxy.logs import log

# A page: (content type, body).
Page = tuple[str, bytes]
Handler = Callable[[], Awaitable[Page]]

MAX_HEAD = 16 * 1024  # a scraper's request is a few hundred bytes
READ_TIMEOUT = 30.0  # an idle keep-alive connection (Prometheus keeps one per target)
# Scrapers and the CLI need a few; with admin_allow_remote, others could open many more.
MAX_CONNECTIONS = 32
INDEX = (
    b"tlsproxy admin endpoint\n"
    b"  /metrics  Prometheus text format\n"
    b"  /status   what `tlsproxy status` shows, as JSON\n"
    b"  /certs    what `tlsproxy certs` shows, as JSON\n"
)


class AdminServer:
    """Serves `pages` (path -> handler) on one address; start() binds, stop() closes."""

    def __init__(self, pages: dict[str, Handler]) -> None:
        self.pages = pages
        self.address: AdminAddress | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, address: AdminAddress) -> None:
        try:
            if address.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address.path)  # left by a proxy that was killed
                old_umask = os.umask(0o177)  # born 0600: no window for other users
                try:
                    self._server = await asyncio.start_unix_server(self._serve, address.path)
                finally:
                    os.umask(old_umask)
            else:
                self._server = await asyncio.start_server(
                    self._serve, address.host, address.port, reuse_address=True
                )
        except OSError as exc:
            raise StartupError(
                f"server.admin: cannot listen on {address.label}: {exc.strerror or exc}"
            ) from None
        self.address = address
        log.info("admin endpoint on %s (GET /metrics, /status, /certs)", self.label())

    def label(self) -> str:
        """Where it listens, with the port the kernel chose for port 0."""
        if self._server is None or self.address is None:
            return "-"
        if self.address.path is not None:
            return self.address.label
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.address is not None and self.address.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.address.path)
        self.address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._conversation(reader, writer)
        except (OSError, TimeoutError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass  # the scraper went away, stalled, or spoke no HTTP: nothing to tell it
        finally:
            self._connections.discard(task)
            writer.close()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                status, content_type, body = await self._answer(event)
                head = event.method == b"HEAD"
                headers = [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ]
                if status == 405:
                    headers.append((b"allow", b"GET, HEAD"))
                response = h11.Response(
                    status_code=status, headers=headers, reason=HTTPStatus(status).phrase
                )
                writer.write(conn.send(response))
                writer.write(conn.send(h11.Data(data=b"" if head else body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:  # the client said Connection: close
                    return
                continue
            if isinstance(event, h11.EndOfMessage | h11.Data):
                continue
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                continue
            return  # ConnectionClosed, or a state h11 will not go on from

    async def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
        if path == "/":
            return 200, "text/plain; charset=utf-8", INDEX
        handler = self.pages.get(path)
        if handler is None:
            return 404, "text/plain; charset=utf-8", b"not found; see /\n"
        try:
            content_type, body = await handler()
        except Exception:
            log.exception("admin endpoint: %s failed", path)
            return 500, "text/plain; charset=utf-8", b"internal error; see the proxy's log\n"
        return 200, content_type, body


# --- the other side: `tlsproxy status` and `tlsproxy certs` asking a running proxy ------------


class AdminUnreachable(Exception):
    """Nothing answers on the admin address (no proxy running there, or not yet)."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch_json(address: AdminAddress, path: str, timeout: float = 10.0) -> Any:
    """GET `path` from the admin endpoint at `address` (blocking; for the CLI). Raises
    AdminUnreachable when nothing listens there, OSError/ValueError for other failures."""
    if address.path is not None:
        conn: http.client.HTTPConnection = _UnixHTTPConnection(address.path, timeout)
    else:
        assert address.host is not None
        conn = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        try:
            conn.request("GET", path)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise AdminUnreachable(f"nothing answers on {address.label}") from exc
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise ValueError(f"{address.label}{path} answered {response.status}")
        return json.loads(body)
    finally:
        conn.close()
