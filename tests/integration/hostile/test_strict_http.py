"""The request fuzzer's referee (strict_http.py), without I/O: what it reads, what it refuses,
and how it reports a stream that ends inside a request. Also the fuzzer's own pieces that need
no proxy: the h11 reference, origin-form, the corpus's markers and the upstream's framing."""

from __future__ import annotations

import pytest

from tests.integration.hostile.recording_upstream import lenient_frame
from tests.integration.hostile.request_corpus import MARKER, PLACEHOLDER, make_input, markers
from tests.integration.hostile.strict_http import StrictError, parse_requests
from tests.integration.hostile.test_fuzz_requests import h11_reference, origin_form

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def one(data: bytes):  # type: ignore[no-untyped-def]
    stream = parse_requests(data)
    assert stream.partial is None and stream.leftover == b""
    assert len(stream.requests) == 1
    return stream.requests[0]


# --- what it reads -------------------------------------------------------------------------------


def test_reads_a_pipelined_stream_with_every_framing() -> None:
    data = (
        GET
        + b"POST /b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        + b"PUT /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: Chunked\r\n\r\n"
        + b'3;name=value\r\nabc\r\n2 ; q="a;b"\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n'
        + b"OPTIONS * HTTP/1.0\r\n\r\n"
    )
    stream = parse_requests(data)
    assert stream.partial is None and stream.leftover == b""
    got = [(r.method, r.target, r.version, r.body, r.framing) for r in stream.requests]
    assert got == [
        (b"GET", b"/a", b"1.1", b"", "none"),
        (b"POST", b"/b?q=1", b"1.1", b"hello", "length"),
        (b"PUT", b"/c", b"1.1", b"abcde", "chunked"),
        (b"OPTIONS", b"*", b"1.0", b"", "none"),
    ]
    assert [r.start for r in stream.requests] == [
        0,
        len(GET),
        *[r.start for r in stream.requests][2:],
    ]
    assert stream.requests[-1].end == len(data)


def test_field_values_lose_their_surrounding_whitespace_and_names_their_case() -> None:
    request = one(b"GET / HTTP/1.1\r\nHost:x\r\nX-A: \t a b\t \r\nX-Empty:\r\n\r\n")
    assert request.fields == ((b"host", b"x"), (b"x-a", b"a b"), (b"x-empty", b""))


def test_a_stream_that_ends_inside_a_request_is_a_partial_not_an_error() -> None:
    body = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    stream = parse_requests(GET + body + b"abc")
    assert len(stream.requests) == 1
    assert stream.partial is not None and stream.partial.head is not None
    assert stream.partial.head.target == b"/p" and stream.partial.body == b"abc"
    assert stream.partial.start == len(GET) and stream.leftover == body + b"abc"

    chunked = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
    partial = parse_requests(chunked).partial
    assert partial is not None and partial.body == b"ab"

    for cut in range(1, len(GET)):  # every prefix of a head is a valid beginning
        partial = parse_requests(GET[:cut]).partial
        assert partial is not None and partial.head is None, cut


# --- what it refuses -----------------------------------------------------------------------------

REFUSED = {
    "bare LF": b"GET / HTTP/1.1\nHost: x\r\n\r\n",
    "bare LF at the end": b"GET / HTTP/1.1\r\nHost: x\n\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "tab fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n",
    "empty line first": b"\r\n" + GET,
    "space before colon": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
    "tab before colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A\t: 0\r\n\r\n",
    "no colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A\r\n\r\n",
    "name not a token": b"GET / HTTP/1.1\r\nHost: x\r\nX(A): 0\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "DEL in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
    "VT in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: \x0bb\r\n\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in the target": b"GET /a\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "two spaces": b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/0.9 line": b"GET /\r\n\r\n",
    "HTTP/2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
    "lowercase version": b"GET / http/1.1\r\nHost: x\r\n\r\n",
    "no Host in 1.1": b"GET / HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "CL and TE": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two CLs": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
    "CL list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na",
    "CL +": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
    "CL hex": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x1\r\n\r\na",
    "CL empty": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
    "CL huge": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999999999999999\r\n\r\n",
    "TE list": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE twice": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE xchunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE identity": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
    "TE in 1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk size 0x": CHUNKED + b"0x1\r\na\r\n0\r\n\r\n",
    "chunk size sign": CHUNKED + b"+1\r\na\r\n0\r\n\r\n",
    "chunk size overlong": CHUNKED + b"00000000000000001\r\na\r\n0\r\n\r\n",
    "chunk size bare LF": CHUNKED + b"1\na\r\n0\r\n\r\n",
    "chunk without CRLF": CHUNKED + b"1\r\nab\r\n0\r\n\r\n",
    "chunk ext NUL": CHUNKED + b"1;a\x00\r\na\r\n0\r\n\r\n",
    "chunk ext no name": CHUNKED + b"1;\r\na\r\n0\r\n\r\n",
    "trailer space before colon": CHUNKED + b"0\r\nX-T : 1\r\n\r\n",
    "garbage after a request": GET + b"\x16\x03\x01\x00",
    "h2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED.keys())
def test_refuses_what_parsers_read_differently(data: bytes) -> None:
    with pytest.raises(StrictError):
        parse_requests(data)


def test_refuses_a_bad_beginning_even_before_the_request_is_whole() -> None:
    for data in (b"GET /a\x00", b"G\tET", b"GET / HTTP/1.1\r\nX-A : ", b"GET / HTTP/1.1\r\n b"):
        with pytest.raises(StrictError):
            parse_requests(data)
    with pytest.raises(StrictError) as caught:
        parse_requests(GET + GET.replace(b"\r\nHost", b"\nHost"))
    assert caught.value.offset >= len(GET)  # the offset points into the second request


# --- the fuzzer's other pieces -------------------------------------------------------------------


def test_h11_reference_reads_on_after_an_http10_keep_alive_and_stops_after_close() -> None:
    keep = b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET
    assert [r.target for r in h11_reference(keep, False).complete] == [b"/1", b"/a"]
    close = b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET
    ref = h11_reference(close, False)
    assert [r.target for r in ref.complete] == [b"/1"] and ref.end == "close"
    upgrade = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n" + GET
    assert [r.target for r in h11_reference(upgrade, False).complete] == [b"/u", b"/a"]
    partial = h11_reference(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab", False)
    assert partial.requests[0].body == b"ab" and not partial.requests[0].complete


def test_origin_form() -> None:
    assert origin_form(b"/a?b") == b"/a?b"
    assert origin_form(b"*") == b"*"
    assert origin_form(b"http://h/a?b") == b"/a?b"
    assert origin_form(b"HTTPS://h:1") == b"/"
    assert origin_form(b"http://h?q/x") == b"/?q/x"  # the authority ends at "?"
    assert origin_form(b"http://h#/x") is None  # an absolute-URI has no fragment
    assert origin_form(b"h:443") is None
    assert origin_form(b"ftp://h/a") is None


def test_corpus_is_seeded_and_every_marker_names_its_input() -> None:
    first = [
        make_input(7, i, 100 + i, max_header_bytes=4096, max_body_bytes=1024) for i in range(300)
    ]
    again = [
        make_input(7, i, 100 + i, max_header_bytes=4096, max_body_bytes=1024) for i in range(300)
    ]
    assert [f.data for f in first] == [f.data for f in again]
    assert len({f.data for f in first}) > 250
    for fuzz in first:
        assert PLACEHOLDER not in fuzz.data
        assert b"".join(fuzz.writes) == fuzz.data
        assert markers(fuzz.data) <= {fuzz.number}, fuzz.describe()
    with_marker = sum(bool(MARKER.search(f.data)) for f in first)
    assert with_marker > 280


def test_lenient_framing_of_the_recording_upstream() -> None:
    assert lenient_frame(GET + b"rest") == len(GET)
    assert lenient_frame(b"GET / HTTP/1.1\nHost: x\n\nrest") == 24
    post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    assert lenient_frame(post[:-1]) is None and lenient_frame(post + b"x") == len(post)
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    chunked += b"3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    assert lenient_frame(chunked[:-2]) is None and lenient_frame(chunked + b"x") == len(chunked)
    # A size past any index (a naive relay forwards one) leaves the request incomplete, no error.
    huge = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nab"
    assert lenient_frame(huge) is None
