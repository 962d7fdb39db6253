"""How long proxy.testing.TLSProxy takes from `TLSProxy(...)` to the first answered request.

    python bench/testing_startup.py [--runs N]

Three ways of giving the app (an existing upstream, an ASGI object served in this process, an
import string served by one supervised uvicorn worker), each with the session's shared CA (the
`tlsproxy_ca` fixture) and with a CA of its own. Prints the median and the spread of N runs.
The upstream for the first case is a tiny asyncio HTTP server in a thread here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.testing import CertificateAuthority, TLSProxy

APP_MODULE = Path(tempfile.mkdtemp(prefix="tlsproxy-bench-app-"))
(APP_MODULE / "bench_startup_app.py").write_text(
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
)
sys.path.insert(0, str(APP_MODULE))
from bench_startup_app import app  # noqa: E402


def plain_upstream() -> str:
    """A keep-alive HTTP/1.1 server answering 'ok' to everything, in a daemon thread."""
    ready = threading.Event()
    address: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()  # the proxy closed its pooled connection

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        ready.set()
        await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
    ready.wait()
    return address[0]


def first_answer(**kwargs: object) -> float:
    started = time.perf_counter()
    with TLSProxy(hosts=["api.test"], **kwargs) as p:  # type: ignore[arg-type]
        with p.client() as client:
            assert client.get(p.url("api.test")).status_code == 200
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    ca = CertificateAuthority(tempfile.mkdtemp(prefix="tlsproxy-bench-ca-"))
    cases = {
        "upstream=": {"upstream": plain_upstream()},
        "app=<ASGI object>": {"app": app},
        "app='module:app' (1 worker)": {"app": "bench_startup_app:app"},
    }
    first_answer(**cases["upstream="])  # warm: imports, page cache
    print(f"time from TLSProxy(...) to the first answered request, {args.runs} runs each")
    for name, kwargs in cases.items():
        for label, extra in (("shared CA", {"ca": ca}), ("own CA", {})):
            times = sorted(first_answer(**kwargs, **extra) for _ in range(args.runs))
            print(
                f"  {name:30} {label:9}  median {statistics.median(times) * 1000:5.0f} ms"
                f"  (min {times[0] * 1000:.0f}, max {times[-1] * 1000:.0f})"
            )


if __name__ == "__main__":
    main()
