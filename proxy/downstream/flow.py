"""Flow control between two transports: reading from one side pauses while the other cannot
take more.

asyncio tells a protocol `pause_writing()` when its transport's write buffer passes the high
water mark and `resume_writing()` when it drained below the low one. The proxy answers by
pausing *reading* on the other transport, so a slow reader on either side stops the fast side
instead of growing a buffer. Reading can be paused for several reasons at once (the peer is
slow, a pipelined request waits for its turn, the upstream is still connecting); a `ReadGate`
reads again only when the last reason is gone.

Between a request read in full and the end of its response, a client connection is *held*:
its next bytes wait in the kernel. They may be a pipelined request (served after this one), or
the client's half-close: a TLS close_notify or a FIN. asyncio's and uvloop's TLS transports shut
the whole connection down on either, dropping the response still to come, so neither may be
read before the response is out. Pausing the TLS transport's reading only stops decryption; a
read-buffer high-water mark of one byte makes the TLS layer stop reading the socket as soon as
anything arrives, and the FIN that follows a close_notify stays unread too.
"""

from __future__ import annotations

import asyncio

# Reasons to stop reading, as bits.
PEER_BUSY = 1  # the transport we forward to is over its high water mark, or not there yet
HOLD = 2  # the request is read: the client's next bytes wait until its response is out

# Large writes are normal on this path (bodies): a larger buffer means fewer pause/resume
# flips per megabyte while still bounding memory per connection.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class ReadGate:
    """Pauses and resumes reading on one transport; `reasons` holds the bits currently set."""

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            transport = self.transport
            if not transport.is_closing():
                transport.pause_reading()  # type: ignore[attr-defined]
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                transport = self.transport
                if not transport.is_closing():
                    transport.resume_reading()  # type: ignore[attr-defined]

    @property
    def paused(self) -> bool:
        return bool(self.reasons)


def tune_write_buffer(transport: asyncio.WriteTransport) -> None:
    """Give a transport this path's water marks (bounded memory, few flips)."""
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)


def hold_tls_reads(transport: asyncio.BaseTransport) -> None:
    """With reading paused, let the TLS layer stop reading the socket once a byte arrives."""
    transport.set_read_buffer_limits(1, 0)  # type: ignore[attr-defined]


def release_tls_reads(transport: asyncio.BaseTransport) -> None:
    transport.set_read_buffer_limits()  # type: ignore[attr-defined]  # the loop's defaults


def discards_after_close_notify(transport: asyncio.BaseTransport) -> bool:
    """Does this TLS transport, once close() has sent close_notify, keep reading and dropping
    what the client still sends until the client closes (or ssl_shutdown_timeout)? uvloop's
    does; asyncio's fails on the first application record that follows and resets the
    connection, which can destroy the response the client has not read yet."""
    return type(transport).__module__.startswith("uvloop")
