"""Pure: the server name of a TLS ClientHello, read from the bytes peeked before the handshake,
and what else it offers (ALPN protocols, TLS versions, key share groups) for `--trace`.

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
_ALPN = 16
_SUPPORTED_VERSIONS = 43
_KEY_SHARE = 51
_MAX_RECORD = 16384 + 2048  # TLSCiphertext's limit; a plaintext record is smaller still
# RFC 8446 caps a ClientHello only by its 24-bit length; nothing honest comes near this.
MAX_CLIENT_HELLO = 64 * 1024


@dataclass(frozen=True, slots=True)
class HelloVerdict:
    state: Literal["incomplete", "hello", "invalid"]
    server_name: str | None = None  # with "hello": the host_name asked for, None without SNI
    # With "hello", what the client offers, in its order (empty when the extension is absent
    # or unreadable: these only describe, they never make a hello INVALID).
    alpn: tuple[str, ...] = ()  # ALPN protocol names ("h2", "http/1.1")
    versions: tuple[int, ...] = ()  # supported_versions (0x0304 is TLS 1.3); legacy if absent
    key_shares: tuple[int, ...] = ()  # the named groups of its key shares (0x001d is x25519)


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
    legacy_version = reader.int(2)
    reader.skip(32)  # random
    reader.skip(reader.int(1))  # legacy_session_id
    reader.skip(reader.int(2))  # cipher_suites
    reader.skip(reader.int(1))  # legacy_compression_methods
    if reader.failed:
        return INVALID
    if reader.left == 0:
        # no extensions at all (TLS 1.2 allows it): no SNI
        return HelloVerdict("hello", versions=(legacy_version,))
    extensions = _Reader(reader.take(reader.int(2)))
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    key_shares: tuple[int, ...] = ()
    while not reader.failed and not extensions.failed and extensions.left:
        kind = extensions.int(2)
        value = extensions.take(extensions.int(2))
        if extensions.failed:
            break
        if kind == _SERVER_NAME:
            server_name = _host_name(value)
            if server_name is None:
                return INVALID  # a server_name extension without a readable host_name
        elif kind == _ALPN:
            alpn = _alpn(value)
        elif kind == _SUPPORTED_VERSIONS:
            versions = _numbers(value, 1)
        elif kind == _KEY_SHARE:
            key_shares = _key_share_groups(value)
    if (reader.failed or extensions.failed) and server_name is None:
        return INVALID
    # Past a readable SNI, the rest describes only: what was read of it is kept.
    return HelloVerdict(
        "hello",
        server_name,
        alpn=alpn,
        versions=versions or (legacy_version,),
        key_shares=key_shares,
    )


def _host_name(value: memoryview) -> str | None:
    names = _Reader(value)
    entries = _Reader(names.take(names.int(2)))
    while not names.failed and not entries.failed and entries.left:
        name_type = entries.int(1)
        name = entries.take(entries.int(2))
        if name_type == _HOST_NAME and not entries.failed:
            if not name or not bytes(name).isascii():
                # OpenSSL (and CPython's decoding of it) refuses this handshake anyway.
                return None
            return bytes(name).decode("ascii")
    return None


def _alpn(value: memoryview) -> tuple[str, ...]:
    outer = _Reader(value)
    entries = _Reader(outer.take(outer.int(2)))
    names = []
    while not outer.failed and not entries.failed and entries.left:
        name = entries.take(entries.int(1))
        if not entries.failed:
            names.append(bytes(name).decode("latin-1"))
    return tuple(names)


def _numbers(value: memoryview, length_size: int) -> tuple[int, ...]:
    """A list of 16-bit numbers behind a `length_size`-byte length (supported_versions)."""
    outer = _Reader(value)
    items = _Reader(outer.take(outer.int(length_size)))
    numbers = []
    while not outer.failed and not items.failed and items.left >= 2:
        numbers.append(items.int(2))
    return tuple(numbers)


def _key_share_groups(value: memoryview) -> tuple[int, ...]:
    outer = _Reader(value)
    shares = _Reader(outer.take(outer.int(2)))
    groups = []
    while not outer.failed and not shares.failed and shares.left:
        group = shares.int(2)
        shares.skip(shares.int(2))  # the public key itself
        if not shares.failed:
            groups.append(group)
    return tuple(groups)


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
