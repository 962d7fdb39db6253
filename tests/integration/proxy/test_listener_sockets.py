"""The accept loop on a real loopback socket, under uvloop and under asyncio: accepted TLS
connections are non-blocking with TCP_NODELAY (set by the loops' transports, not by us), the
protocol is made with the client's address from accept(), and the registry counts our protocol,
then forgets it when the connection closes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.config import Address
from proxy.listeners import ConnectionRegistry, HttpsListener, bind_socket
from proxy.tls import CertificateSelector
from tests.unit.certs.factory import make_ca, make_leaf, write_pair


class Recorded(asyncio.Protocol):
    def __init__(self, registry: ConnectionRegistry, made: asyncio.Future) -> None:
        self.registry = registry
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)


async def _scenario(cert_file: Path, key_file: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    registry = ConnectionRegistry()
    made: asyncio.Future = loop.create_future()
    created: list[Recorded] = []
    client_ips: list[str] = []

    def factory(client_ip: str) -> Recorded:
        client_ips.append(client_ip)
        created.append(Recorded(registry, made))
        return created[-1]

    sock = bind_socket(Address("127.0.0.1", 0))
    listener = HttpsListener(sock, context, factory, registry, lambda: 5.0, lambda: 10)
    listener.start()
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", sock.getsockname()[1], ssl=client_context
        )
        transport = await asyncio.wait_for(made, 5)
        for _ in range(100):  # the registry learns of it when the handshake task resumes
            if registry.protocols:
                break
            await asyncio.sleep(0.01)
        raw = transport.get_extra_info("socket")
        facts = {
            "nodelay": raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
            "nonblocking": bool(fcntl.fcntl(raw.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),
            "registered": registry.protocols == set(created),
            "client_ips": client_ips,
        }
        writer.close()
        for _ in range(100):
            if registry.count == 0:
                break
            await asyncio.sleep(0.01)
        facts["forgotten"] = registry.count == 0
        return facts
    finally:
        listener.stop_accepting()


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_accepted_connections(
    tmp_path: Path, run: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]]
) -> None:
    ca = make_ca()
    now = datetime.now(UTC)
    cert, key = make_leaf(
        ca, ["localhost"], not_before=now - timedelta(hours=1), not_after=now + timedelta(days=1)
    )
    cert_file, key_file = write_pair(tmp_path, [cert], key)
    assert run(_scenario(cert_file, key_file)) == {
        "nodelay": True,
        "nonblocking": True,
        "registered": True,
        "client_ips": ["127.0.0.1"],
        "forgotten": True,
    }


class NoCertificates:
    def lookup_exact_or_wildcard(self, server_name: str) -> None:
        return None

    def lookup(self, server_name: str | None) -> None:
        return None


async def _refused(server_name: str | None) -> str:
    """What a Python TLS client reads when the listener has no certificate for its name."""
    registry = ConnectionRegistry()
    selector = CertificateSelector(NoCertificates())
    sock = bind_socket(Address("127.0.0.1", 0))
    listener = HttpsListener(
        sock, selector.context, lambda _ip: asyncio.Protocol(), registry, lambda: 5.0, lambda: 10
    )
    listener.start()
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    try:
        await asyncio.open_connection(
            "127.0.0.1", sock.getsockname()[1], ssl=client_context, server_hostname=server_name
        )
    except ssl.SSLError as exc:
        return exc.reason or ""
    finally:
        listener.stop_accepting()
    return "handshake succeeded"


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("server_name", ["unknown.test", ""])
def test_refused_name_gets_the_alert(run, server_name: str) -> None:
    # "" sends no SNI at all.
    assert run(_refused(server_name or None)) == "TLSV1_UNRECOGNIZED_NAME"
