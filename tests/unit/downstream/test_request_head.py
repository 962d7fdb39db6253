"""read_request_head against h11's own reader: the same heads accepted with the same fields, the
same heads refused with the same status hint."""

from __future__ import annotations

import pytest
from h11._readers import maybe_read_from_IDLE_client
from h11._receivebuffer import ReceiveBuffer
from h11._util import LocalProtocolError

from proxy.downstream.request_head import read_request_head

ACCEPTED = [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nhost: a.test:8443\r\nUser-Agent: x\r\nAccept: */*\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
    b"GET http://a.test/x HTTP/1.1\r\nHost: b\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",  # no Host needed in HTTP/1.0
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Tab: \tv\t\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF: h11 accepts it (the proxy refuses it elsewhere)
]

REFUSED = [
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",  # 501
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n",
    b"GET / HTTP/1.1\r\nHost a\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/x\r\nHost: a\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\n\r\n",
    b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
]


def _buffer(data: bytes) -> ReceiveBuffer:
    buf = ReceiveBuffer()
    buf += data
    return buf


@pytest.mark.parametrize("raw", ACCEPTED)
def test_accepts_what_h11_accepts_with_the_same_fields(raw):
    ours_buf, h11_buf = _buffer(raw), _buffer(raw)
    ours, theirs = read_request_head(ours_buf), maybe_read_from_IDLE_client(h11_buf)
    assert theirs is not None and ours is not None
    assert (ours.method, ours.target, ours.http_version) == (
        theirs.method,
        theirs.target,
        theirs.http_version,
    )
    assert ours.fields == list(theirs.headers)
    assert all(type(v) is bytes for pair in ours.fields for v in pair)
    assert bytes(ours_buf) == bytes(h11_buf)  # the body stays in the buffer, as with h11


@pytest.mark.parametrize("raw", REFUSED)
def test_refuses_what_h11_refuses_with_the_same_hint(raw):
    with pytest.raises(LocalProtocolError) as theirs:
        maybe_read_from_IDLE_client(_buffer(raw))
    with pytest.raises(LocalProtocolError) as ours:
        read_request_head(_buffer(raw))
    assert ours.value.error_status_hint == theirs.value.error_status_hint
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cut", [0, 1, 5, 16, 30])
def test_incomplete_head_waits(cut):
    raw = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    buf = _buffer(raw[:cut])
    assert read_request_head(buf) is None
    buf += raw[cut:]
    head = read_request_head(buf)
    assert head is not None and head.fields == [(b"host", b"localhost")]


@pytest.mark.parametrize("version", [b"0.9", b"2.0", b"1.2", b"3.1"])
def test_versions_other_than_1_0_and_1_1_are_505(version: bytes) -> None:
    buf = ReceiveBuffer()
    buf += b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n"
    with pytest.raises(LocalProtocolError) as raised:
        read_request_head(buf)
    assert raised.value.error_status_hint == 505
