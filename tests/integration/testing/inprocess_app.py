"""A plain ASGI app whose state a test can read: it records every request it answers."""

from __future__ import annotations

from typing import Any

seen: list[dict[str, Any]] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to start; uvicorn goes on without it
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    seen.append(
        {"scheme": scope["scheme"], "client": scope["client"], "path": scope["path"], **headers}
    )
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"hello {scope['path']}".encode()})
