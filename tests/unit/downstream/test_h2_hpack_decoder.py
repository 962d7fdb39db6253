"""RepeatingDecoder answers exactly what hpack's Decoder answers, block after block, while the
blocks of repeated requests come from memory; it never remembers a block that changes the
dynamic table, and forgets what it remembered when the table changes."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, HPACKDecodingError

from proxy.downstream.h2_hpack import _DECODED_MAX, RepeatingDecoder, _only_indexed

REQUEST = [
    (b":method", b"GET"),
    (b":path", b"/api/items"),
    (b":scheme", b"https"),
    (b":authority", b"app.test"),
    (b"user-agent", b"poller/1.0"),
]


def both(blocks: list[bytes]) -> tuple[list, list]:
    plain, repeating = Decoder(), RepeatingDecoder()
    return (
        [list(plain.decode(b, raw=True)) for b in blocks],
        [list(repeating.decode(b, raw=True)) for b in blocks],
    )


def test_a_repeated_request_is_decoded_from_memory_after_its_first_two() -> None:
    encoder = Encoder()
    blocks = [encoder.encode(REQUEST) for _ in range(5)]
    assert not _only_indexed(blocks[0])  # literals with indexing: the table grows
    assert blocks[1] == blocks[2] == blocks[4] and _only_indexed(blocks[1])
    decoder = RepeatingDecoder()
    first = list(decoder.decode(blocks[0], raw=True))
    assert list(decoder.decode(blocks[1], raw=True)) == first
    hits = 0
    original = Decoder.decode

    def counting(self: Decoder, data: bytes, raw: bool = False) -> list:
        nonlocal hits
        hits += 1
        return original(self, data, raw)

    Decoder.decode = counting  # type: ignore[method-assign]
    try:
        for block in blocks[2:]:
            assert list(decoder.decode(block, raw=True)) == first
    finally:
        Decoder.decode = original  # type: ignore[method-assign]
    assert hits == 0


def test_a_table_change_makes_the_same_bytes_mean_other_fields() -> None:
    """Index 62 is the newest dynamic entry: after another literal with indexing, the same
    one-byte block names another field."""
    encoder, decoder = Encoder(), RepeatingDecoder()
    decoder.decode(encoder.encode([(b"x-a", b"1")]), raw=True)
    assert decoder.decode(b"\xbe", raw=True) == [(b"x-a", b"1")]
    decoder.decode(encoder.encode([(b"x-b", b"2")]), raw=True)
    assert decoder.decode(b"\xbe", raw=True) == [(b"x-b", b"2")]
    assert decoder.decode(b"\xbf", raw=True) == [(b"x-a", b"1")]


def test_a_table_size_update_evicts_and_is_seen() -> None:
    decoder = RepeatingDecoder()
    decoder.decode(Encoder().encode([(b"x-a", b"1")]), raw=True)
    assert decoder.decode(b"\xbe", raw=True) == [(b"x-a", b"1")]
    with pytest.raises(HPACKDecodingError):
        decoder.decode(b"\x20\xbe", raw=True)  # size 0 empties the table: index 62 is gone


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_decodes_as_hpack_does(seed: int) -> None:
    rng = random.Random(seed)
    encoder = Encoder()
    encoder.header_table_size = rng.choice([0, 64, 256, 4096])
    names = [b"x-%d" % i for i in range(6)] + [b"accept", b"cookie"]
    blocks = []
    for _ in range(300):
        fields = [(b":method", b"GET"), (b":path", rng.choice([b"/", b"/a", b"/b"]))]
        fields += [(rng.choice(names), b"v%d" % rng.randrange(4)) for _ in range(rng.randrange(4))]
        blocks.append(encoder.encode(fields))
    plain, repeating = both(blocks)
    assert repeating == plain


def test_memory_is_bounded() -> None:
    encoder, decoder = Encoder(), RepeatingDecoder()
    fields = [(b"x-%d" % i, b"v") for i in range(100)]
    decoder.decode(encoder.encode(fields), raw=True)
    for i in range(100):
        decoder.decode(bytes([0x80 | (62 + i % 60)]), raw=True)
    assert len(decoder._decoded) <= _DECODED_MAX
    assert all(len(block) <= 256 for block in decoder._decoded)


def test_only_indexed_reads_multi_byte_indexes() -> None:
    assert _only_indexed(b"\x82\x87")
    assert _only_indexed(b"\xff\x81\x01\x82")  # index 127 + 129 in two continuation bytes
    assert not _only_indexed(b"\x82\x40\x01a\x01b")  # a literal with indexing
    assert not _only_indexed(b"\x20\x82")  # a table size update
    assert not _only_indexed(b"\x82\x00\x01a\x01b")  # a literal without indexing
