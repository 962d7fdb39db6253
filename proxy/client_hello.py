"""Pure: the server name of a TLS ClientHello, read from the bytes peeked before the handshake.

Why: whether a connection asks for a client certificate must be decided before OpenSSL reads
the ClientHello (the SNI callback is too late to change it, see proxy/tls.py), so the listener
peeks at the first bytes of a connection of a port with a client_auth site and parses just
enough of them here. Sans-I/O: bytes in, a verdict out; it never raises, whatever the bytes.

A ClientHello may span several records and arrive in several segments: the verdict is
INCOMPLETE until the whole handshake message is there. Anything that is not a TLS handshake
starting with a ClientHello is INVALID: the caller then lets OpenSSL say what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
_MAX_RECORD = 16384 + 2048  # TLSCiphertext's limit; a plaintext record is smaller still
# RFC 8446 caps a ClientHello only by its 24-bit length; nothing honest comes near this.
MAX_CLIENT_HELLO = 64 * 1024


@dataclass(frozen=True, slots=True)
class HelloVerdict:
    state: Literal["incomplete", "hello", "invalid"]
    server_name: str | None = None  # with "hello": the host_name asked for, None without SNI


INCOMPLETE = HelloVerdict("incomplete")
INVALID = HelloVerdict("invalid")


def parse_client_hello(data: bytes) -> HelloVerdict:
    """What the bytes a client sent first say: INCOMPLETE, INVALID, or a hello and its SNI."""
    try:
        return _parse(data)
    except (IndexError, ValueError, UnicodeDecodeError):  # pragma: no cover - a bug, not input
        return INVALID


def _parse(data: bytes) -> HelloVerdict:
    message = bytearray()
    pos = 0
    size = len(data)
    while True:
        if size - pos < 5:
            return _partial(message)
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            return INVALID
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            return INVALID
        fragment = data[pos + 5 : pos + 5 + length]
        message += fragment
        if len(fragment) < length:
            return _partial(message)
        pos += 5 + length
        verdict = _hello(message)
        if verdict is not INCOMPLETE:
            return verdict


def _partial(message: bytearray) -> HelloVerdict:
    # What arrived so far may already be wrong (not a ClientHello, too long): say so at once.
    verdict = _hello(message)
    return INCOMPLETE if verdict.state == "hello" else verdict


def _hello(message: bytearray) -> HelloVerdict:
    if len(message) < 4:
        return INVALID if message and message[0] != _CLIENT_HELLO else INCOMPLETE
    if message[0] != _CLIENT_HELLO:
        return INVALID
    length = int.from_bytes(message[1:4], "big")
    if length > MAX_CLIENT_HELLO:
        return INVALID
    if len(message) < 4 + length:
        return INCOMPLETE
    return _server_name(memoryview(message)[4 : 4 + length])


def _server_name(body: memoryview) -> HelloVerdict:
    reader = _Reader(body)
    reader.skip(2 + 32)  # legacy_version, random
    reader.skip(reader.int(1))  # legacy_session_id
    reader.skip(reader.int(2))  # cipher_suites
    reader.skip(reader.int(1))  # legacy_compression_methods
    if reader.failed:
        return INVALID
    if reader.left == 0:
        return HelloVerdict("hello")  # no extensions at all (TLS 1.2 allows it): no SNI
    extensions = _Reader(reader.take(reader.int(2)))
    while not reader.failed and not extensions.failed and extensions.left:
        kind = extensions.int(2)
        value = extensions.take(extensions.int(2))
        if kind != _SERVER_NAME or extensions.failed:
            continue
        names = _Reader(value)
        entries = _Reader(names.take(names.int(2)))
        while not names.failed and not entries.failed and entries.left:
            name_type = entries.int(1)
            name = entries.take(entries.int(2))
            if name_type == _HOST_NAME and not entries.failed:
                if not name or not bytes(name).isascii():
                    # OpenSSL (and CPython's decoding of it) refuses this handshake anyway.
                    return INVALID
                return HelloVerdict("hello", bytes(name).decode("ascii"))
        return INVALID  # a server_name extension without a readable host_name
    if reader.failed or extensions.failed:
        return INVALID
    return HelloVerdict("hello")


class _Reader:
    """Big-endian fields off a buffer; reading past its end sets `failed`, never raises."""

    __slots__ = ("buf", "failed", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.failed = False

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> memoryview:
        if self.failed or n > self.left:
            self.failed = True
            return memoryview(b"")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def skip(self, n: int) -> None:
        self.take(n)

    def int(self, n: int) -> int:
        chunk = self.take(n)
        return int.from_bytes(chunk, "big") if not self.failed else 0
