"""The example upstream: a small FastAPI app to put behind tlsproxy.

Run it from the repository root with ``uvicorn examples.app:app`` or from anywhere with
``uvicorn app:app --app-dir examples``. Behind the proxy, start it with
``--proxy-headers --forwarded-allow-ips 127.0.0.1`` so that ``request.client`` and the URL scheme
are the ones the proxy saw, not the proxy's own loopback connection.

Endpoints (each one is used by the tests or the benchmark):
  GET  /              greeting, pid, the forwarding headers and the client the app saw
  GET  /pid           the worker's pid as text (which worker answered)
  GET  /healthz       "ok" (the supervisor's health probe)
  POST /echo          streams the request body back as it arrives
  GET  /bytes/{n}     n bytes in chunks (?chunk=65536; ?chunked=1 drops Content-Length)
  GET  /slow/{s}      answers after s seconds (upstream timeouts, drain on SIGTERM)
  GET  /alloc/{mib}   keeps mib MiB allocated in this worker (memory recycling); 0 frees it
  WS   /ws            echoes every text or binary message
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

app = FastAPI(title="tlsproxy example app")

_FORWARDING_HEADERS = (
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
)
_MIB = 1024 * 1024
_MAX_CHUNK = 4 * _MIB

# Held at module level so the memory stays allocated (and resident) between requests.
_ballast: list[bytes] = []


@app.get("/")
async def index(request: Request) -> dict[str, object]:
    client = request.client
    return {
        "message": "Hello from behind tlsproxy",
        "pid": os.getpid(),
        "scheme": request.url.scheme,
        "client": f"{client.host}:{client.port}" if client else None,
        "forwarding": {name: request.headers.get(name) for name in _FORWARDING_HEADERS},
        # Raw pairs, not a dict: a repeated header is worth seeing as it arrived.
        "headers": [[name, value] for name, value in request.headers.items()],
    }


@app.get("/pid", response_class=PlainTextResponse)
async def pid() -> str:
    return str(os.getpid())


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    return "ok"


class _EchoResponse(Response):
    """Streams the request body back chunk by chunk as it arrives.

    Not a StreamingResponse over request.stream(): on ASGI servers before spec 2.4 that one
    listens for a disconnect with the same receive() and would swallow the body.
    """

    def __init__(self, headers: dict[str, str], media_type: str) -> None:
        super().__init__(headers=headers, media_type=media_type)
        if "content-length" not in headers:
            # init_headers() added "Content-Length: 0" for the empty body given to __init__;
            # without it the server frames the echo as chunked.
            self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
            body = message.get("body", b"")
            await send({"type": "http.response.body", "body": body, "more_body": more})


@app.post("/echo")
async def echo(request: Request) -> Response:
    headers = {}
    length = request.headers.get("content-length")
    if length is not None:
        headers["content-length"] = length
    media_type = request.headers.get("content-type", "application/octet-stream")
    return _EchoResponse(headers, media_type)


async def _chunks(total: int, chunk: int) -> AsyncIterator[bytes]:
    block = b"x" * min(chunk, total)
    left = total
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        left -= len(piece)
        yield piece


@app.get("/bytes/{n}")
async def bytes_(n: int, chunk: int = 65536, chunked: bool = False) -> StreamingResponse:
    n = max(n, 0)
    chunk = min(max(chunk, 1), _MAX_CHUNK)
    headers = {} if chunked else {"content-length": str(n)}
    return StreamingResponse(
        _chunks(n, chunk), media_type="application/octet-stream", headers=headers
    )


@app.get("/slow/{seconds}")
async def slow(seconds: float) -> dict[str, object]:
    await asyncio.sleep(max(seconds, 0.0))
    return {"slept": seconds, "pid": os.getpid()}


@app.get("/alloc/{mib}")
async def alloc(mib: int) -> dict[str, object]:
    """Replace the ballast with `mib` MiB; a non-zero fill makes every page resident."""
    _ballast.clear()
    if mib > 0:
        _ballast.append(b"\xa5" * (mib * _MIB))
    return {"allocated_mib": max(mib, 0), "pid": os.getpid()}


@app.websocket("/ws")
async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return
