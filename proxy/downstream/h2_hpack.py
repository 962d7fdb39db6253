"""HPACK for the responses this proxy sends (RFC 7541), without the dynamic table: every field is
a static-table index, or a literal "without indexing" whose name is a static-table index where
one fits. What such a field encodes to depends on nothing else, so it is cached. nginx encodes
its responses the same way. hpack's Encoder, which h2 uses by default, keeps a dynamic table and
spent about a tenth of the HTTP/2 path's time on it; a table costs the client memory, and a
response head here is a few small fields.

The header block of the first response, and of the first after the client changed
SETTINGS_HEADER_TABLE_SIZE, starts with a dynamic table size update to 0 (RFC 7541 4.2, 6.3):
the table this encoder uses is empty, whatever size the client allows.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import Decoder
from hpack.table import HeaderTable

_STATIC = HeaderTable.STATIC_TABLE
_FULL = {pair: i + 1 for i, pair in reversed(list(enumerate(_STATIC)))}
_NAMES = {name: i + 1 for i, (name, _) in reversed(list(enumerate(_STATIC)))}
_CACHE_MAX = 4096


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` in a prefix of `prefix_bits`, OR-ed into `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """RFC 7541 5.2, without Huffman coding."""
    return _integer(len(data), 7, 0x00) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    index = _FULL.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)  # 6.1: indexed
    index = _NAMES.get(name)
    if index is not None:
        return _integer(index, 4, 0x00) + _string(value)  # 6.2.2, indexed name
    return b"\x00" + _string(name) + _string(value)  # 6.2.2, new name


class StaticEncoder:
    """Drop-in for hpack.Encoder as h2 uses it: `encode(headers)` and `header_table_size`."""

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._size_update = True  # tell the client, once, that the table is empty

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._size_update = True  # the client's limit changed: say again that ours is 0

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        cache = self._cache
        parts = [b"\x20"] if self._size_update else []  # 6.3: size update to 0
        self._size_update = False
        for field in headers:
            encoded = cache.get(field)  # type: ignore[call-overload]
            if encoded is None:
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                encoded = cache[field] = encode_field(field[0], field[1])  # type: ignore[index]
            parts.append(encoded)
        return b"".join(parts)


# --- decoding: what clients send ------------------------------------------------------------

# A client that repeats a request (a poller, an API client, h2load) sends the same header block
# bytes each time once its fields are in the dynamic table: indexed fields only, which change
# nothing. hpack decodes each one again (a function call and a debug log call per field, about
# a fifth of h2's work per request), so such blocks are remembered, per connection, until the
# dynamic table changes. Bounded: a connection keeps at most _DECODED_MAX blocks of at most
# _DECODED_BLOCK_MAX bytes.
_DECODED_MAX = 32
_DECODED_BLOCK_MAX = 256


class _CountedTable(HeaderTable):
    """hpack's table, counting its changes: an entry added (and what that evicts), or a new
    size. A remembered block's fields are the same while the count is."""

    generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @HeaderTable.maxsize.setter  # type: ignore[attr-defined,untyped-decorator]
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


def _only_indexed(block: bytes) -> bool:
    """Whether every field of `block` is an indexed field (RFC 7541 6.1), which reads the
    tables and changes neither."""
    i, end = 0, len(block)
    while i < end:
        first = block[i]
        if not first & 0x80:
            return False
        i += 1
        if first & 0x7F == 0x7F:  # the index goes on in continuation bytes
            while i < end and block[i] & 0x80:
                i += 1
            i += 1
    return True


class RepeatingDecoder(Decoder):
    """hpack's Decoder, answering a block of indexed fields it has just decoded from memory."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _CountedTable()
        self.max_allowed_table_size = self.header_table.maxsize
        self._decoded: dict[bytes, tuple[int, bool, int, tuple]] = {}

    def decode(self, data: bytes, raw: bool = False) -> list:  # type: ignore[override]
        key = data if type(data) is bytes else None
        if key is not None:
            known = self._decoded.get(key)
            if known is not None and known[0] == self.header_table.generation:
                if known[1] == raw and known[2] == self.max_header_list_size:
                    return list(known[3])
        headers = list(super().decode(data, raw))
        if key is not None and len(key) <= _DECODED_BLOCK_MAX and _only_indexed(key):
            if len(self._decoded) >= _DECODED_MAX:
                self._decoded.clear()
            generation = self.header_table.generation
            self._decoded[key] = (generation, raw, self.max_header_list_size, tuple(headers))
        return headers
