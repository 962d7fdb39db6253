"""The control socket: how `tlsproxy certs renew` (and proxy.testing) ask a running proxy for
something.

A unix stream socket, `control.sock` in data_dir, mode 0600: only the user the proxy runs as
(and root) can connect, so it needs no authentication of its own. Each connection carries one
request and one reply, each a line of JSON:
    request  {"op": "renew", "host": "app.test"}
    reply    {"ok": {...}}  or  {"error": "one line a person can read"}
A command finds no proxy running when nothing listens there (the file is missing, or connecting
is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from proxy.config import MAX_SOCKET_PATH
from proxy.logs import log

CONTROL_SOCKET = "control.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """A request the proxy refused, or no proxy to ask; the text is for the user."""


class NoProxy(ControlError):
    """Nothing listens on the control socket: no proxy runs on this data_dir."""


def control_path(data_dir: Path) -> Path:
    return Path(data_dir) / CONTROL_SOCKET


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for `path` that fits in sun_path: itself, or the same file through an open
    descriptor of its directory (Linux resolves /proc/self/fd/N like a directory), for a
    data_dir deeper than MAX_SOCKET_PATH allows."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    """Serves the control socket of one proxy; `handlers` maps an op to its coroutine."""

    def __init__(self, data_dir: Path, handlers: dict[str, Handler]) -> None:
        self.path = control_path(data_dir)
        self.handlers = handlers
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> bool:
        """Listen, unless another proxy on the same data_dir already does (it keeps it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if await asyncio.to_thread(_answers, self.path):
                log.info("%s belongs to another running proxy: not taking it over", self.path)
                return False
            with _reachable(self.path) as name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)  # left by a proxy that was killed
                old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
                try:
                    self._server = await asyncio.start_unix_server(
                        self._serve, path=name, limit=MAX_REQUEST
                    )
                finally:
                    os.umask(old_umask)
        except OSError as exc:
            log.warning(
                "no control socket at %s (%s): `tlsproxy certs renew` will not reach this proxy",
                self.path,
                exc.strerror or exc,
            )
            return False
        return True

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
        with contextlib.suppress(OSError), _reachable(self.path) as name:
            os.unlink(name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            reply = await self._handle(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # the asker went away, was too slow or sent too much: nothing to tell it
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request["op"]
            handler = self.handlers[op]
        except (ValueError, KeyError, TypeError):
            return {"error": f"not a request this proxy knows: {line[:200]!r}"}
        try:
            return {"ok": await handler(request)}
        except ControlError as exc:
            return {"error": str(exc)}
        except Exception as exc:
            log.exception("control request %r failed", op)
            return {"error": f"{type(exc).__name__}: {exc}"}


def _answers(path: Path) -> bool:
    try:
        with _reachable(path) as name, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1.0)
            sock.connect(name)
            return True
    except OSError:
        return False


def ask(data_dir: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Blocking: send one request to the proxy running on `data_dir` and return its "ok"
    part. ControlError when no proxy answers or the proxy refused."""
    path = control_path(data_dir)
    try:
        with _reachable(path) as name, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(name)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoProxy(f"no running proxy answers on {path}") from None
    except TimeoutError:
        raise ControlError(f"the proxy gave no answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the proxy at {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the proxy at {path} closed without an answer") from None
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply.get("ok", {})
