"""Flow control between two transports: reading from one side pauses while the other cannot
take more.

asyncio tells a protocol `pause_writing()` when its transport's write buffer passes the high
water mark and `resume_writing()` when it drained below the low one. The proxy answers by
pausing *reading* on the other transport, so a slow reader on either side stops the fast side
instead of growing a buffer. Reading can be paused for several reasons at once (the peer is
slow, a pipelined request waits for its turn, the upstream is still connecting); a `ReadGate`
reads again only when the last reason is gone.

A client's FIN must stay unread while responses are still to go out to it: asyncio's and
uvloop's TLS transports shut the whole connection down when they read one. It follows a
close_notify (the client half-closed), or requests the client sent before it. Pausing a TLS
transport's reading only stops decryption, so while reading is paused the gate also lowers the
TLS layer's read-buffer high-water mark to one byte: records that arrive stay undecrypted in its
incoming buffer, and it stops reading the socket, FIN included, until reading resumes and
those records were decrypted (a close_notify among them is then seen for what it is). After a
close_notify (tls.DirectSSLObject leaves a byte in that buffer) `hold_socket` keeps it so.
"""

from __future__ import annotations

import asyncio

# Reasons to stop reading, as bits.
PEER_BUSY = 1  # the transport we forward to is over its high water mark, or not there yet
PIPELINE = 2  # a pipelined request waits until the current response is done

# Large writes are normal on this path (bodies): a larger buffer means fewer pause/resume
# flips per megabyte while still bounding memory per connection.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class ReadGate:
    """Pauses and resumes reading on one transport; `reasons` holds the bits currently set."""

    __slots__ = ("_loop", "reasons", "socket_held", "tls", "transport")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        *,
        tls: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.transport = transport
        self.reasons = 0
        self.tls = tls
        self.socket_held = False
        self._loop = loop or (asyncio.get_running_loop() if tls else None)

    def pause(self, reason: int) -> None:
        if not self.reasons:
            transport = self.transport
            if not transport.is_closing():
                transport.pause_reading()  # type: ignore[attr-defined]
                if self.tls:
                    transport.set_read_buffer_limits(1, 0)  # type: ignore[attr-defined]
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                transport = self.transport
                if not transport.is_closing():
                    transport.resume_reading()  # type: ignore[attr-defined]
                    if self.tls:
                        # The TLS layer decrypts what waits (its read is scheduled by now); the
                        # socket is read again only after that.
                        self._loop.call_soon(self._read_the_socket)  # type: ignore[union-attr]

    def _read_the_socket(self) -> None:
        transport = self.transport
        if not self.reasons and not self.socket_held and not transport.is_closing():
            transport.set_read_buffer_limits()  # type: ignore[attr-defined]  # the defaults

    def open(self) -> None:
        """Read again at once, whatever the reasons were: the connection is closing, and its
        TLS layer's shutdown (or our linger) reads what still comes."""
        self.reasons = 0
        transport = self.transport
        if not transport.is_closing():
            if self.tls and not self.socket_held:
                transport.set_read_buffer_limits()  # type: ignore[attr-defined]
            transport.resume_reading()  # type: ignore[attr-defined]

    def hold_socket(self) -> None:
        """The client half-closed over TLS: its FIN stays unread from now on."""
        self.socket_held = True
        self.transport.set_read_buffer_limits(1, 0)  # type: ignore[attr-defined]

    @property
    def paused(self) -> bool:
        return bool(self.reasons)


def tune_write_buffer(transport: asyncio.WriteTransport) -> None:
    """Give a transport this path's water marks (bounded memory, few flips)."""
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)


def discards_after_close_notify(transport: asyncio.BaseTransport) -> bool:
    """Does this TLS transport, once close() has sent close_notify, keep reading and dropping
    what the client still sends until the client closes (or ssl_shutdown_timeout)? uvloop's
    does; asyncio's fails on the first application record that follows and resets the
    connection, which can destroy the response the client has not read yet."""
    return type(transport).__module__.startswith("uvloop")
