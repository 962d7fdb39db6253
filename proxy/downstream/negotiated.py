"""The protocol a TLS connection speaks, chosen once its handshake is done: what ALPN agreed.

The listener needs a protocol object before the handshake, and ALPN is known only after it:
this one stands in until `connection_made`, then hands the transport to an HTTP/2 connection
(ALPN "h2") or an HTTP/1.1 one (ALPN "http/1.1", none at all, or no TLS), and is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from proxy.downstream.connection import DownstreamProtocol
from proxy.downstream.h2_connection import H2Protocol
from proxy.state import ProxyState
from proxy.trace import ConnectionTrace

ClientConnection = DownstreamProtocol | H2Protocol


class NegotiatedProtocol(asyncio.Protocol):
    __slots__ = ("client_ip", "on_close", "state", "trace")

    def __init__(
        self,
        state: ProxyState,
        on_close: Callable[[ClientConnection], None],
        client_ip: str = "",
    ) -> None:
        self.state = state
        self.on_close = on_close
        self.client_ip = client_ip
        self.trace: ConnectionTrace | None = None  # `run --trace`: this connection's

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        protocol: ClientConnection
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            protocol = H2Protocol(self.state, self.on_close, self.client_ip)
        else:
            protocol = DownstreamProtocol(self.state, self.on_close, self.client_ip)
        trace = self.trace
        if trace is not None:
            # Steps 3 and 4, before the first request can be read.
            trace.handshake_done(ssl_object, time.monotonic())
            protocol.trace = trace
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
