"""The ClientHello peek parser: real hellos from Python's ssl, split and cut every way."""

from __future__ import annotations

import random
import ssl

import pytest

from proxy.client_hello import INCOMPLETE, INVALID, HelloVerdict, parse_client_hello


def client_hello(server_name: str | None, *, tls12_only: bool = False) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(record: bytes, size: int) -> bytes:
    """The same handshake message in records of at most `size` bytes (legal, RFC 8446 5.1)."""
    message = record[5:]
    out = b""
    for i in range(0, len(message), size):
        piece = message[i : i + size]
        out += bytes((22, 3, 1)) + len(piece).to_bytes(2, "big") + piece
    return out


@pytest.mark.parametrize("name", ["api.test", "a.b.example.test", "x" * 63 + ".test"])
def test_the_server_name_of_a_real_hello(name: str) -> None:
    assert parse_client_hello(client_hello(name)) == HelloVerdict("hello", name)
    assert parse_client_hello(client_hello(name, tls12_only=True)) == HelloVerdict("hello", name)


def test_a_hello_without_sni() -> None:
    assert parse_client_hello(client_hello(None)) == HelloVerdict("hello", None)


def test_bytes_after_the_hello_change_nothing() -> None:
    hello = client_hello("api.test")
    assert parse_client_hello(hello + b"\x14\x03\x03\x00\x01\x01") == HelloVerdict(
        "hello", "api.test"
    )


@pytest.mark.parametrize("size", [1, 7, 100, 512])
def test_a_hello_over_several_records(size: int) -> None:
    hello = refragment(client_hello("api.test"), size)
    assert parse_client_hello(hello) == HelloVerdict("hello", "api.test")


def test_every_truncation_is_incomplete() -> None:
    for hello in (client_hello("api.test"), refragment(client_hello("api.test"), 50)):
        for cut in range(len(hello)):
            assert parse_client_hello(hello[:cut]) is INCOMPLETE, cut


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x17\x03\x03\x00\x05hello",  # application data first
        b"\x16\x02\x00\x00\x05\x01\x00\x00\x01\x00",  # not version 3.x
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\xff\xff" + b"\x01" * 10,  # a record longer than TLS allows
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a ClientHello longer than we accept
        b"\x80\x2e\x01\x03\x01",  # an SSLv2-style hello
    ],
)
def test_what_is_no_client_hello_is_invalid(data: bytes) -> None:
    assert parse_client_hello(data) is INVALID


def test_a_server_name_extension_without_a_host_name_is_invalid() -> None:
    hello = bytearray(client_hello("api.test"))
    at = bytes(hello).find(b"api.test")
    hello[at - 3] = 7  # the entry's name_type: not host_name
    assert parse_client_hello(bytes(hello)) is INVALID


def test_a_non_ascii_server_name_is_invalid() -> None:
    hello = bytearray(client_hello("api.test"))
    at = bytes(hello).find(b"api.test")
    hello[at] = 0xE9
    assert parse_client_hello(bytes(hello)) is INVALID


def test_fuzz_garbage_and_mutations_never_raise() -> None:
    rng = random.Random(1234)
    seeds = [client_hello("api.test"), client_hello(None), refragment(client_hello("b.test"), 9)]
    for _ in range(3000):
        seed = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            seed[rng.randrange(len(seed))] = rng.randrange(256)
        cut = rng.randint(0, len(seed))
        verdict = parse_client_hello(bytes(seed[:cut]))
        assert verdict.state in ("incomplete", "hello", "invalid")
        if verdict.server_name is not None:
            assert verdict.server_name.isascii()
    for _ in range(3000):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        if rng.random() < 0.5:  # past the first checks more often
            garbage = b"\x16\x03\x01" + garbage
        assert parse_client_hello(garbage).state in ("incomplete", "hello", "invalid")
