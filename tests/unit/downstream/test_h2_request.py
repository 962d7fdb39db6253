"""HTTP/2 header blocks as the HTTP/1.1 request the upstream gets (h2_request.py)."""

from __future__ import annotations

import pytest

from proxy.downstream.h2_connection import FloodGuard
from proxy.downstream.h2_request import (
    H2RequestError,
    MalformedRequest,
    header_list_size,
    request_from_h2,
)

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1")]


def convert(extra, *, end_stream=True, authority=b"app.test", limit=65536, base=BASE):
    headers = [*base, (b":authority", authority), *extra]
    return request_from_h2(headers, end_stream=end_stream, max_header_bytes=limit)


def test_authority_becomes_the_first_field_as_host() -> None:
    request = convert([(b"accept", b"*/*"), (b"host", b"app.test")])
    assert (request.method, request.target, request.http_version) == (b"GET", b"/a?b=1", b"1.1")
    assert request.fields == [(b"host", b"app.test"), (b"accept", b"*/*")]


def test_host_alone_is_kept_when_there_is_no_authority() -> None:
    headers = [*BASE, (b"host", b"app.test")]
    request = request_from_h2(headers, end_stream=True, max_header_bytes=65536)
    assert request.fields == [(b"host", b"app.test")]


def test_a_body_without_length_goes_upstream_chunked() -> None:
    assert (b"transfer-encoding", b"chunked") in convert([], end_stream=False).fields
    with_length = convert([(b"content-length", b"5")], end_stream=False).fields
    assert (b"transfer-encoding", b"chunked") not in with_length
    assert (b"transfer-encoding", b"chunked") not in convert([], end_stream=True).fields


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(b"x", b"a\x01b")], "a control byte in a value"),
        ([(b"content-length", b"1, 2")], "two lengths in one field"),
        ([(b"content-length", b"1"), (b"content-length", b"2")], "two lengths"),
        ([(b"content-length", b"-1")], "a length that is no number"),
        ([(b"content-length", b"+5")], "a sign Python's int() would take"),
        ([(b"content-length", b"5_0")], "an underscore Python's int() would take"),
    ],
)
def test_what_h11_refuses_is_a_400(headers, why) -> None:
    with pytest.raises(H2RequestError) as caught:
        convert(headers)
    assert caught.value.status == 400, why


@pytest.mark.parametrize("path", [b"/a b", b"a", b"http://other.test/", b"*", b""], ids=repr)
def test_a_path_that_is_no_origin_form_target_is_a_400(path: bytes) -> None:
    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path)]
    with pytest.raises(H2RequestError) as caught:
        convert([], base=base)
    assert caught.value.status == 400


def test_options_star_is_allowed() -> None:
    base = [(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":path", b"*")]
    assert convert([], base=base).target == b"*"


def test_a_method_that_is_no_token_is_a_400() -> None:
    base = [(b":method", b"G T"), (b":scheme", b"https"), (b":path", b"/")]
    with pytest.raises(H2RequestError):
        convert([], base=base)


def test_connect_keeps_its_authority_for_the_exchanges_405() -> None:
    base = [(b":method", b"CONNECT")]
    request = convert([], base=base, authority=b"example.test:443")
    assert (request.method, request.target) == (b"CONNECT", b"example.test:443")


def test_a_header_list_over_the_limit_is_a_431() -> None:
    extra = [(b"x-big", b"v" * 200)]
    size = header_list_size([*BASE, (b":authority", b"app.test"), *extra])
    assert convert(extra, limit=size).fields  # exactly the limit is fine
    with pytest.raises(H2RequestError) as caught:
        convert(extra, limit=size - 1)
    assert caught.value.status == 431


def test_flood_guard_counts_per_second_and_starts_over() -> None:
    guard = FloodGuard({"ping": 3, "reset": 1})
    assert all(guard.spend("ping", 10.0 + i / 10) for i in range(3))
    assert guard.spend("reset", 10.5)
    assert not guard.spend("ping", 10.6)  # the fourth within the second
    assert not guard.spend("reset", 10.7)
    assert guard.spend("ping", 11.1) and guard.spend("reset", 11.1)  # a new second


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([*BASE, (b":authority", b"a"), (b"X-Up", b"1")], "an uppercase name"),
        ([*BASE, (b":authority", b"a"), (b"x(y", b"1")], "a name that is no token"),
        ([*BASE, (b":authority", b"a"), (b"connection", b"close")], "connection-specific"),
        ([*BASE, (b":authority", b"a"), (b"keep-alive", b"5")], "connection-specific"),
        ([*BASE, (b":authority", b"a"), (b"transfer-encoding", b"chunked")], "smuggling"),
        ([*BASE, (b":authority", b"a"), (b"upgrade", b"websocket")], "connection-specific"),
        ([*BASE, (b":authority", b"a"), (b"te", b"gzip")], "TE other than trailers"),
        ([*BASE, (b":authority", b"a"), (b"x", b"a\r\nb: c")], "CR LF in a value"),
        ([*BASE, (b":authority", b"a"), (b"x", b" a")], "whitespace around a value"),
        ([*BASE, (b":authority", b"a"), (b"x", b"a\x00")], "NUL in a value"),
        ([*BASE, (b"x", b"1"), (b":authority", b"a")], "a pseudo-header after a field"),
        ([*BASE, (b":path", b"/b"), (b":authority", b"a")], "a repeated pseudo-header"),
        ([*BASE, (b":protocol", b"websocket")], "an unknown pseudo-header"),
        ([(b":scheme", b"https"), (b":path", b"/")], "no :method"),
        ([(b":method", b"GET"), (b":scheme", b"https")], "no :path"),
        ([(b":method", b"GET"), (b":path", b"/")], "no :scheme"),
        ([*BASE, (b":authority", b"a"), (b"host", b"b")], "Host disagrees with :authority"),
        ([*BASE, (b"host", b"a"), (b"host", b"a")], "two Host fields"),
    ],
)
def test_malformed_requests_end_the_connection(headers, why) -> None:
    with pytest.raises(MalformedRequest):
        request_from_h2(headers, end_stream=True, max_header_bytes=65536)


def test_te_trailers_and_a_repeated_equal_length_pass() -> None:
    request = convert([(b"te", b"trailers"), (b"content-length", b"3"), (b"content-length", b"3")])
    assert request.fields == [
        (b"host", b"app.test"),
        (b"te", b"trailers"),
        (b"content-length", b"3"),
    ]


def test_split_cookies_are_joined_in_the_first_ones_place() -> None:
    request = convert([(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")])
    assert request.fields == [(b"host", b"app.test"), (b"cookie", b"a=1; b=2"), (b"accept", b"*/*")]


def test_static_encoder_blocks_decode_with_hpack_and_use_no_table() -> None:
    from hpack import Decoder

    from proxy.downstream.h2_hpack import StaticEncoder

    encoder, decoder = StaticEncoder(), Decoder()
    heads = [
        [(b":status", b"200"), (b"content-type", b"text/html"), (b"x-" + b"n" * 300, b"v" * 200)],
        [(b":status", b"404"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
    ]
    first = encoder.encode(heads[0])
    assert first[:1] == b"\x20"  # a dynamic table size update to 0, once
    assert [tuple(f) for f in decoder.decode(first, raw=True)] == heads[0]
    for head in heads * 2:
        block = encoder.encode(head)
        assert block[:1] != b"\x20"
        assert [tuple(f) for f in decoder.decode(block, raw=True)] == head
    assert len(decoder.header_table.dynamic_entries) == 0  # nothing was ever indexed
    encoder.header_table_size = 100  # the client's SETTINGS_HEADER_TABLE_SIZE changed
    assert encoder.encode(heads[1])[:1] == b"\x20"
