"""The upstream response parser, fed whole and byte at a time (like h11's tests/test_io.py)."""

from __future__ import annotations

import pytest

from proxy.upstream.response_parser import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    SWITCHED,
    UNTIL_CLOSE,
    ResponseError,
    ResponseParser,
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_informational(self, status, headers):
        self.events.append(("info", status, headers))

    def on_head(self, status, reason, headers):
        self.events.append(("head", status, reason, headers))

    def on_body(self, data):
        assert data, "empty body callbacks are wasted work"
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + bytes(data))
        else:
            self.events.append(("body", bytes(data)))

    def on_end(self):
        self.events.append(("end",))


def parse(data: bytes, *, head_request=False, eof=False, split=None, max_header_bytes=65536):
    """Feed `data` whole (split=None) or in pieces of `split` bytes; return (events, parser)."""
    rec = Recorder()
    parser = ResponseParser(max_header_bytes)
    parser.start(rec, head_request=head_request)
    step = split or len(data) or 1
    for i in range(0, len(data), step):
        parser.feed(data[i : i + step])
    if eof:
        parser.feed_eof()
    return rec.events, parser


SPLITS = [None, 1, 2, 7]


@pytest.mark.parametrize("split", SPLITS)
def test_content_length(split):
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  b \r\n\r\nhello"
    events, parser = parse(raw, split=split)
    # no hop-by-hop field: no list is built, the head can go on verbatim
    assert events == [("head", 200, b"OK", None), ("body", b"hello"), ("end",)]
    assert parser.raw_head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  b \r\n"
    assert parser.body == LENGTH and parser.content_length == 5
    assert parser.keep_alive and parser.done


@pytest.mark.parametrize("split", SPLITS)
def test_chunked_with_extensions_and_trailers_dropped(split):
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    events, parser = parse(raw, split=split)
    assert events == [
        ("head", 200, b"OK", [(b"transfer-encoding", b"chunked")]),
        ("body", b"hello" + b"x" * 26),
        ("end",),
    ]
    assert parser.body == CHUNKED and parser.keep_alive


@pytest.mark.parametrize("split", SPLITS)
def test_close_delimited(split):
    raw = b"HTTP/1.1 200 OK\r\n\r\nuntil close"
    events, parser = parse(raw, split=split, eof=True)
    assert events[-2:] == [("body", b"until close"), ("end",)]
    assert parser.body == UNTIL_CLOSE and not parser.keep_alive


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("raw", "head_request"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", True),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    ],
)
def test_no_body(raw, head_request, split):
    events, parser = parse(raw, head_request=head_request, split=split)
    assert [e[0] for e in events] == ["head", "end"]
    assert parser.body == NO_BODY and parser.done


@pytest.mark.parametrize("split", SPLITS)
def test_100_continue_then_final(split):
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    events, _ = parse(raw, split=split)
    assert events == [
        ("info", 100, []),
        ("head", 201, b"Created", None),
        ("body", b"ok"),
        ("end",),
    ]


@pytest.mark.parametrize("split", SPLITS)
def test_101_switches_and_passes_the_rest(split):
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
    events, parser = parse(raw, split=split, eof=True)
    assert events == [
        ("head", 101, b"Switching Protocols", [(b"upgrade", b"websocket")]),
        ("body", b"\x81\x02hi"),
    ]
    assert parser.body == SWITCHED and parser.switched


@pytest.mark.parametrize(
    "field",
    [b"Connection: x-a", b"Connection: keep-alive, upgrade", b"Proxy-X: 1", b"Upgrade: h2c"],
)
def test_hop_by_hop_fields_give_the_field_list(field):
    raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + field + b"\r\ncontent-length: 0\r\n\r\n"
    events, _ = parse(raw)
    name, _, value = field.partition(b": ")
    assert events[0][3] == [(b"x-a", b"1"), (name.lower(), value), (b"content-length", b"0")]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("fields", "keep_alive"),
    [
        ([b"Connection: keep-alive"], True),
        ([b"connection:Keep-Alive", b"Keep-Alive: timeout=5, max=100"], True),
        ([b"Keep-Alive: timeout=5"], True),
        ([b"Connection: close"], False),
        ([b"Connection: keep-alive", b"Connection: close"], False),
        ([b"CONNECTION: Keep-Alive , close"], False),
    ],
)
def test_connection_fields_are_cut_from_the_verbatim_head(split, fields, keep_alive):
    # The common "Connection: keep-alive" of nginx or gunicorn costs no field list: the lines
    # are cut out of the upstream's own bytes, wherever they are in the head.
    lines = [b"X-A: 1", fields[0], b"Content-Length: 2", *fields[1:], b"X-B: 2"]
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\nhi"
    events, parser = parse(raw, split=split)
    assert events == [("head", 200, b"OK", None), ("body", b"hi"), ("end",)]
    assert parser.raw_head == b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nX-B: 2\r\n"
    assert parser.keep_alive is keep_alive


def test_connection_field_last_and_first():
    events, parser = parse(b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n", split=None)
    assert events[0] == ("head", 204, b"No Content", None)
    assert parser.raw_head == b"HTTP/1.1 204 No Content\r\n"


def test_http10_head_is_never_passed_on_verbatim():
    events, _ = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert events[0][3] == [(b"content-length", b"0")]


def test_keep_alive_rules():
    assert not parse(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"
    )[1].keep_alive
    assert not parse(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")[1].keep_alive


def test_parser_is_reusable_for_the_next_response():
    rec = Recorder()
    parser = ResponseParser()
    for body in (b"one", b"three"):
        parser.start(rec)
        parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    assert [e for e in rec.events if e[0] == "body"] == [("body", b"one"), ("body", b"three")]


def test_status_without_reason():
    events, _ = parse(b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n")
    assert events[0][:3] == ("head", 200, b"")


@pytest.mark.parametrize("split", [None, 1])
@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\ncontent-length: 0\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",  # bare LF
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\ncontent-length: 0\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : x\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/2 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nabc",  # more than announced
        b"HTTP/1.1 204 No Content\r\n\r\nextra",
    ],
)
def test_malformed_responses_are_refused(raw, split):
    with pytest.raises(ResponseError):
        parse(raw, split=split)


@pytest.mark.parametrize("split", [None, 1])
def test_head_larger_than_the_limit(split):
    raw = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000 + b"\r\ncontent-length: 0\r\n\r\n"
    with pytest.raises(ResponseError, match="larger"):
        parse(raw, split=split, max_header_bytes=1024)
    assert parse(raw, split=split, max_header_bytes=4096)[1].done


def test_endless_head_is_refused_before_it_completes():
    parser = ResponseParser(1024)
    parser.start(Recorder())
    with pytest.raises(ResponseError):
        for _ in range(200):
            parser.feed(b"X-Header: " + b"v" * 20 + b"\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
)
def test_eof_before_the_end_is_an_error(raw):
    with pytest.raises(ResponseError):
        parse(raw, eof=True)


def test_received_counts_bytes_for_retry_decisions():
    parser = ResponseParser()
    parser.start(Recorder())
    assert parser.received == 0
    parser.feed(b"HTTP/1.1 2")
    assert parser.received == 10
