"""The upstream app for the data-path tests (run by uvicorn in a subprocess)."""

from __future__ import annotations

import asyncio
import hashlib
import os

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from examples.app import ws_echo as example_ws_echo

api = FastAPI()
CHUNK = 64 * 1024


async def app(scope, receive, send) -> None:
    """The FastAPI app, except /echo: a raw ASGI echo (Starlette's StreamingResponse listens
    for disconnects with its own receive() calls, which would steal request body messages)."""
    if scope["type"] == "http" and scope["path"] == "/echo":
        await echo(receive, send)
    else:
        await api(scope, receive, send)


async def echo(receive, send) -> None:
    """Streams the request body back as it arrives (chunked)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        if message.get("body"):
            await send({"type": "http.response.body", "body": message["body"], "more_body": True})
        if not message.get("more_body"):
            break
    await send({"type": "http.response.body", "body": b""})


@api.get("/hello")
async def hello() -> Response:
    return Response(b"hello", media_type="text/plain")


@api.get("/pid")
async def pid() -> Response:
    return Response(str(os.getpid()).encode(), media_type="text/plain")


@api.api_route("/headers", methods=["GET", "POST"])
async def headers(request: Request) -> JSONResponse:
    return JSONResponse({k: v for k, v in request.headers.items()})


@api.post("/digest")
async def digest(request: Request) -> JSONResponse:
    """Reads the body as a stream (never whole) and reports its size and sha256."""
    h = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        h.update(chunk)
        size += len(chunk)
    return JSONResponse({"size": size, "sha256": h.hexdigest()})


def _pattern(size: int):
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    while sent < size:
        piece = block[: min(CHUNK, size - sent)]
        sent += len(piece)
        yield piece


@api.get("/chunked/{size}")
async def chunked(size: int) -> StreamingResponse:
    return StreamingResponse(_pattern(size), media_type="application/octet-stream")


@api.api_route("/fixed/{size}", methods=["GET", "HEAD"])
async def fixed(size: int) -> StreamingResponse:
    return StreamingResponse(
        _pattern(size),
        media_type="application/octet-stream",
        headers={"content-length": str(size)},
    )


@api.get("/status/{code}")
async def status(code: int) -> Response:
    return Response(status_code=code)


@api.get("/sleep/{seconds}")
async def sleep(seconds: float) -> Response:
    await asyncio.sleep(seconds)
    return Response(b"slept", media_type="text/plain")


@api.get("/late-body")
async def late_body() -> StreamingResponse:
    """The head goes out at once, the body a moment later (the proxy must not hold the head)."""

    async def body():
        yield b""
        await asyncio.sleep(0.5)
        yield b"late"

    return StreamingResponse(body(), media_type="text/plain")


@api.get("/die-midway")
async def die_midway() -> StreamingResponse:
    """Sends part of a chunked body, then kills the process: a response cut short."""

    async def body():
        yield b"x" * 1000
        await asyncio.sleep(0.2)
        os._exit(1)

    return StreamingResponse(body(), media_type="text/plain")


# The same echo the example app serves (one implementation for the tests and the README).
api.add_api_websocket_route("/ws", example_ws_echo)
