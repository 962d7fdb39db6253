"""The ClientHello peek parser: real hellos from Python's ssl, split and cut every way."""

from __future__ import annotations

import random
import ssl
from pathlib import Path

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


def sni(verdict: HelloVerdict) -> tuple[str, str | None]:
    return verdict.state, verdict.server_name


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
    assert sni(parse_client_hello(client_hello(name))) == ("hello", name)
    assert sni(parse_client_hello(client_hello(name, tls12_only=True))) == ("hello", name)


def test_a_hello_without_sni() -> None:
    assert sni(parse_client_hello(client_hello(None))) == ("hello", None)


def test_bytes_after_the_hello_change_nothing() -> None:
    hello = client_hello("api.test")
    assert sni(parse_client_hello(hello + b"\x14\x03\x03\x00\x01\x01")) == ("hello", "api.test")


@pytest.mark.parametrize("size", [1, 7, 100, 512])
def test_a_hello_over_several_records(size: int) -> None:
    hello = refragment(client_hello("api.test"), size)
    assert sni(parse_client_hello(hello)) == ("hello", "api.test")


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


# --- what the hello offers (for --trace), from hellos captured off the wire ---------------------

DATA = Path(__file__).parent / "hellos"


def captured(name: str) -> bytes:
    """A ClientHello as a real client sent it (tests/unit/proxy/hellos/*.hex: captured by
    accepting curl's and openssl s_client's connections on a plain socket)."""
    return bytes.fromhex((DATA / f"{name}.hex").read_text())


def test_curl_http2_offers() -> None:
    # curl 7.88.1 (OpenSSL 3.0): `curl --http2 https://app.test:PORT/`
    verdict = parse_client_hello(captured("hello_curl_h2"))
    assert verdict.state == "hello"
    assert verdict.server_name == "app.test"
    assert verdict.alpn == ("h2", "http/1.1")
    assert verdict.versions == (0x0304, 0x0303, 0x0302, 0x0301)
    assert verdict.key_shares == (0x001D,)  # x25519


def test_openssl_tls12_offers() -> None:
    # `openssl s_client -tls1_2 -alpn http/1.1 -servername app.test`: no supported_versions,
    # so the legacy version says it; no key share (TLS 1.2 has none).
    verdict = parse_client_hello(captured("hello_openssl_tls12"))
    assert verdict.server_name == "app.test"
    assert verdict.alpn == ("http/1.1",)
    assert verdict.versions == (0x0303,)
    assert verdict.key_shares == ()


def test_python_ssl_offers_over_several_records() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    verdict = parse_client_hello(refragment(outgoing.read(), 37))
    assert verdict.alpn == ("h2", "http/1.1")
    assert 0x0304 in verdict.versions
    assert verdict.key_shares and verdict.key_shares[0] == 0x001D


def test_a_broken_alpn_extension_after_the_sni_only_loses_what_it_said() -> None:
    hello = bytearray(captured("hello_curl_h2"))
    at = bytes(hello).find(b"\x02h2\x08http/1.1")
    hello[at] = 0xFF  # the first protocol's length runs past the extension
    verdict = parse_client_hello(bytes(hello))
    assert verdict.state == "hello" and verdict.server_name == "app.test"
    assert verdict.alpn == ()
