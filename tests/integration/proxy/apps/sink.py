"""A test-only upstream (plain ASGI, no framework cost on 100 MiB bodies).

POST /sink     reads the whole request body and answers {"bytes": n, "sha256": hex}
GET  /count    how many HTTP requests this worker has seen (before this one)
anything else  404
"""

from __future__ import annotations

import hashlib
import json

_seen = {"requests": 0}


async def _lifespan(receive, send) -> None:  # type: ignore[no-untyped-def]
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(send, status: int, payload: dict) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    before = _seen["requests"]
    _seen["requests"] += 1
    if scope["path"] == "/sink" and scope["method"] == "POST":
        digest = hashlib.sha256()
        count = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            count += len(chunk)
            digest.update(chunk)
            more = message.get("more_body", False)
        await _answer(send, 200, {"bytes": count, "sha256": digest.hexdigest()})
    elif scope["path"] == "/count":
        await _answer(send, 200, {"requests": before})
    else:
        await _answer(send, 404, {"error": "not found"})
