"""A tiny FastAPI app for the supervisor tests: it reports its pid, can grow its memory, be
slow, and crash at start when told to (an env var naming a file that exists)."""

import os
import sys

# Checked before importing FastAPI so that a crash loop in the tests is quick.
_crash_if = os.environ.get("PIDAPP_CRASH_IF")
if _crash_if and os.path.exists(_crash_if):
    print(f"pidapp: {_crash_if} exists, refusing to start", flush=True)
    sys.exit(3)

import asyncio  # noqa: E402
from pathlib import Path  # noqa: E402

from fastapi import FastAPI, Request  # noqa: E402

_marker = os.environ.get("PIDAPP_PRESTART_MARKER")
# What the prestart steps had written when this worker started (None: nothing to look at).
PRESTART_SEEN = Path(_marker).read_text() if _marker and os.path.exists(_marker) else None

app = FastAPI()
_hoard: list[bytearray] = []


@app.get("/")
async def root() -> dict:
    return {"pid": os.getpid()}


_sick_if = os.environ.get("PIDAPP_SICK_IF")


@app.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]  # sync: FastAPI runs it in a thread
    # Answers 503 while the file named by PIDAPP_SICK_IF exists: alive, but failing its checks.
    if _sick_if and os.path.exists(_sick_if):
        from fastapi.responses import JSONResponse

        return JSONResponse({"ok": False}, status_code=503)
    return {"ok": True}


@app.get("/prestart")
async def prestart() -> dict:
    return {"seen": PRESTART_SEEN}


@app.get("/client")
async def client(request: Request) -> dict:
    return {"client": request.client and request.client.host, "scheme": request.url.scheme}


@app.get("/alloc")
async def alloc(mb: int) -> dict:
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page so it counts in RSS
        block[i] = 1
    _hoard.append(block)
    return {"pid": os.getpid(), "held_mb": sum(len(b) for b in _hoard) // (1024 * 1024)}


@app.get("/slow")
async def slow(s: float = 0.3) -> dict:
    await asyncio.sleep(s)
    return {"pid": os.getpid()}


@app.get("/say")
async def say(level: str, text: str) -> dict:
    # Through uvicorn's own logger: printed as uvicorn prints its warnings ("WARNING:  text").
    import logging

    logging.getLogger("uvicorn.error").log(logging.getLevelName(level.upper()), text)
    return {"pid": os.getpid()}


@app.get("/boom")
async def boom() -> dict:
    raise ValueError("boom from pidapp")  # uvicorn: "ERROR:    Exception in ASGI application"
