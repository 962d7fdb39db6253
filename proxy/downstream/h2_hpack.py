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
