"""A test-only upstream for the answers without a body (plain ASGI on uvicorn).

GET/HEAD /page         200 with a 1000-byte body (uvicorn sends no body to HEAD, keeps its length)
GET      /status/204   204, no body
GET      /status/304   304 with the ETag, no body, when If-None-Match matches; else 200 with it
anything else          404
"""

from __future__ import annotations

PAGE = b"p" * 1000
ETAG = b'"v1"'


async def _lifespan(receive, send) -> None:  # type: ignore[no-untyped-def]
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(send, status: int, headers: list, body: bytes = b"") -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if path == "/page" and method in ("GET", "HEAD"):
        length = str(len(PAGE)).encode()
        await _answer(
            send, 200, [(b"content-type", b"text/plain"), (b"content-length", length)], PAGE
        )
    elif path == "/status/204":
        await _answer(send, 204, [(b"x-status", b"204")])
    elif path == "/status/304":
        if dict(scope["headers"]).get(b"if-none-match") == ETAG:
            await _answer(send, 304, [(b"etag", ETAG)])
        else:
            await _answer(send, 200, [(b"etag", ETAG), (b"content-length", b"5")], b"fresh")
    else:
        await _answer(send, 404, [(b"content-length", b"9")], b"not found")
