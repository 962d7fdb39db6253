"""The floor of tlsproxy's architecture, for `bench/run.py --floor`: uvloop with Python's ssl
terminating TLS on one certificate, relaying each request's bytes to a pooled upstream
connection and the response's bytes back, with as little Python per request as a relay can
have. No SNI callback, no HTTP parsing beyond finding where a response ends, no headers added,
no limits, no timeouts, no logs: not a proxy anyone should run, only a measure of what the
event loop, the TLS layer and the interpreter cost before tlsproxy's own work.

It serves the bench's three workloads against the bench's upstream (small responses and 1 MiB
responses with Content-Length, no request bodies) and nothing else.

    python bench/floor.py --cert CHAIN --key KEY --port PORT --upstream HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl

import uvloop

_CLOSE = b"\r\nConnection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class Upstream(asyncio.Protocol):
    """One pooled connection to the upstream; serves one client request at a time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None
        self.remaining = -1  # body bytes still to come; -1 while the head is incomplete
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        if self.remaining < 0:
            data = self.head + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.head = data
                return
            self.head = b""
            head, body = data[: end + 2], data[end + 4 :]
            match = _LENGTH.search(head)
            self.remaining = int(match.group(1)) if match else 0
            head = head.replace(_KEEP_ALIVE, b"")
            if client.closing:
                head = head.replace(b"\r\n", _CLOSE, 1)
            data = head + b"\r\n" + body
            self.remaining -= len(body)
        else:
            self.remaining -= len(data)
        client.transport.write(data)
        if self.remaining <= 0:
            self.remaining = -1
            self.client = None
            client.done()
            self.relay.pool.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.relay.pool:
            self.relay.pool.remove(self)
        if self.client is not None:
            self.client.transport.abort()


class Client(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: Upstream | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if b"Connection: close\r\n" in data:
            self.closing = True
            data = data.replace(b"Connection: close\r\n", b"")
        elif b" HTTP/1.0\r\n" in data:
            # openssl s_time (the resumption workloads): HTTP/1.0 without Host, read to the
            # end of the connection. The upstream gets HTTP/1.1, as tlsproxy sends it, so
            # that its connection stays pooled.
            self.closing = True
            data = data.replace(b" HTTP/1.0\r\n", b" HTTP/1.1\r\nHost: floor\r\n", 1)
        pool = self.relay.pool
        if pool:
            self.attach(pool.pop(), data)
        else:
            asyncio.get_running_loop().create_task(self.connect(data))

    async def connect(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: Upstream(self.relay), self.relay.host, self.relay.port
        )
        self.attach(upstream, data)

    def attach(self, upstream: Upstream, data: bytes) -> None:
        self.upstream = upstream
        upstream.client = self
        upstream.transport.write(data)  # type: ignore[union-attr]

    def done(self) -> None:
        self.upstream = None
        if self.closing:
            self.transport.close()

    # Backpressure for the 1 MiB responses: a slow client pauses its upstream's reads.
    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.pool: list[Upstream] = []


async def serve(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    host, port = args.upstream.rsplit(":", 1)
    relay = Relay(host, int(port))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(relay), "127.0.0.1", args.port, ssl=context, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
