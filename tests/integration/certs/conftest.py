"""A real TLS server on 127.0.0.1 whose sni_callback reads a CertificateCache, and a client."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from cryptography import x509

from certs.cache import CertificateCache


@dataclass
class EchoServer:
    port: int
    cache: CertificateCache  # replace it (as a SIGHUP reload does) by assigning here

    def current(self) -> CertificateCache:
        return self.cache


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[Callable[[CertificateCache], asyncio.Future]]:
    servers: list[asyncio.base_events.Server] = []

    async def start(cache: CertificateCache) -> EchoServer:
        state = EchoServer(0, cache)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

        def sni(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext):
            installed = state.cache.lookup(server_name)
            if installed is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = installed.context
            return None

        ctx.sni_callback = sni
        server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    leaf: x509.Certificate

    async def echo(self, data: bytes = b"ping\n") -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readline(), 5)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def client_context(*roots_pem: bytes, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata="".join(r.decode() for r in roots_pem))
    ctx.check_hostname = check_hostname
    return ctx


async def connect(port: int, server_name: str | None, ctx: ssl.SSLContext) -> Client:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name), 5
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return Client(reader, writer, x509.load_der_x509_certificate(der))
