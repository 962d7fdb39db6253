"""Broken apps, one named case each (issue 9, "the response path"): what a client gets through a
real `tlsproxy run` when the app behind it answers with malformed, ambiguous, truncated, early,
late or surplus bytes.

The promise (proxy/upstream/response_parser.py, proxy/downstream/exchange.py): the client gets
the app's response as the strict reader (response_corpus.parse_response) reads it, or the
proxy's own 502/504, or a connection that ends without a complete message. Never a truncated or
re-framed response that looks complete, never bytes of one response in the next.

Each case is a script of the scripted upstream (/case/<id>), all on one proxy whose
upstream_read_timeout is 1 s, so hangs end quickly.
"""

from __future__ import annotations

import select
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import running
from tests.integration.hostile.response_corpus import (
    Outcome,
    client_socket,
    end_to_end,
    parse_response,
    read_response,
)
from tests.integration.hostile.scripted_upstream import (
    Close,
    Hang,
    ReadBody,
    Reset,
    Script,
    ScriptedUpstream,
    Send,
    Sleep,
    Step,
    clean_body,
)
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy, proxy_config

READ_TIMEOUT = 1.0
MAX_HEADER_BYTES = 16 * 1024
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with running(ScriptedUpstream()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: ScriptedUpstream) -> Proxy:
    limits = f'upstream_read_timeout = "{READ_TIMEOUT:g}s"\nmax_header_bytes = {MAX_HEADER_BYTES}\n'
    return make_module_proxy(
        proxy_config([(["localhost"], "app")], {"app": upstream.server}, limits=limits)
    )


@pytest.fixture(autouse=True)
def no_crash(proxy: Proxy) -> Iterator[None]:
    """Whatever the app did, the proxy lives on and logs no traceback."""
    start = len(proxy.log())
    yield
    assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy died"
    log = proxy.log()[start:]
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


class Client:
    """One TLS connection to the proxy, read with the strict reader."""

    def __init__(self, proxy: Proxy) -> None:
        self.sock = client_socket(proxy.port, proxy.context(), "localhost")
        self.buf = bytearray()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def ask(
        self,
        target: str,
        *,
        method: bytes = b"GET",
        version: bytes = b"1.1",
        headers: bytes = b"",
        upgrade: bool = False,
    ) -> Outcome:
        self.sock.sendall(
            b"%s %s HTTP/%s\r\nHost: localhost\r\n%s\r\n"
            % (method, target.encode(), version, headers)
        )
        return read_response(self.sock, self.buf, method=method, upgrade=upgrade)


def answer(
    proxy: Proxy,
    upstream: ScriptedUpstream,
    script: Script | list[Step],
    *,
    method: bytes = b"GET",
    version: bytes = b"1.1",
) -> tuple[Outcome, str]:
    """A new connection asks for the case; (what the client got, the case id)."""
    case = upstream.add(script)
    with Client(proxy) as client:
        return client.ask(f"/case/{case}", method=method, version=version), case


def assert_gateway(outcome: Outcome, status: int = 502, method: bytes = b"GET") -> None:
    assert outcome.gateway_error(method), outcome.describe()
    assert outcome.response is not None and outcome.response.status == status


def assert_no_complete_message(outcome: Outcome, method: bytes = b"GET") -> None:
    """A 502, or a connection that ended short of a complete message: never a whole message."""
    if outcome.kind == "cut":
        return
    assert_gateway(outcome, method=method)


def assert_relayed(outcome: Outcome, sent: bytes, method: bytes = b"GET") -> None:
    """The client got the app's response: the same status, body and end-to-end fields."""
    expected = parse_response(sent, method=method, closed=True)
    assert expected is not None
    assert outcome.kind == "complete", outcome.describe()
    got = outcome.response
    assert got is not None
    assert (got.status, got.body) == (expected.status, expected.body), outcome.describe()
    assert end_to_end(got.headers) == end_to_end(expected.headers), outcome.describe()


def assert_next_is_clean(proxy: Proxy, upstream: ScriptedUpstream, case: str) -> None:
    """Once the app sent all of `case`, the next request through the same pool gets its own
    answer: none of the bytes the app sent after its response."""
    assert upstream.wait_sent(case, 10)
    time.sleep(0.2)  # the proxy sees those bytes on its idle connection first
    for _ in range(3):  # every pooled connection, if there are several
        with Client(proxy) as client:
            outcome = client.ask("/next")
        assert outcome.response is not None and outcome.response.body == clean_body(b"/next"), (
            outcome.describe()
        )


# --- status lines -----------------------------------------------------------------------------

MALFORMED_STATUS_LINES = [
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 OK",
    b"HTTP/1.1  200 OK",
    b"HTTP/1.2 200 OK",
    b"HTTP/2 200 OK",
    b"http/1.1 200 OK",
    b"HTTP/1.1\t200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 O\x7fK",
    b" HTTP/1.1 200 OK",
    b"ICY 200 OK",
    b"garbage",
]


@pytest.mark.parametrize("line", MALFORMED_STATUS_LINES, ids=repr)
def test_malformed_status_line_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, line: bytes
) -> None:
    outcome, _ = answer(proxy, upstream, [Send(line + b"\r\nContent-Length: 5\r\n\r\nhello")])
    assert_gateway(outcome)


@pytest.mark.parametrize(
    "line", [b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.0 200 OK", b"HTTP/1.1 299 Custom"]
)
def test_unusual_but_unambiguous_status_line_passes(
    proxy: Proxy, upstream: ScriptedUpstream, line: bytes
) -> None:
    data = line + b"\r\nContent-Length: 5\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_relayed(outcome, data)


# --- heads ------------------------------------------------------------------------------------


def test_head_over_max_header_bytes_is_502(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    big = b"X-Big: " + b"h" * (MAX_HEADER_BYTES + 1000) + b"\r\n"
    outcome, _ = answer(proxy, upstream, [Send(b"HTTP/1.1 200 OK\r\n" + big + b"\r\n")])
    assert_gateway(outcome)


def test_many_fields_over_max_header_bytes_is_502(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADER_BYTES // 8))
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 5\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


def test_head_under_max_header_bytes_passes(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    big = b"X-Big: " + b"h" * (MAX_HEADER_BYTES - 1000) + b"\r\n"
    data = b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 5\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_relayed(outcome, data)


@pytest.mark.parametrize(
    "line",
    [
        b"Bad Name: x",
        b": no-name",
        b"X-No-Colon",
        b"X-Space : before-colon",
        b"X\x00Nul: x",
        b"Caf\xc3\xa9: x",
        b'X-Quote": x',
    ],
    ids=repr,
)
def test_bad_header_name_is_502(proxy: Proxy, upstream: ScriptedUpstream, line: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 5\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


@pytest.mark.parametrize("fold", [b"X-Fold: a\r\n b", b"X-Fold: a\r\n\tb", b"X-A:\r\n b"], ids=repr)
def test_obs_fold_is_502(proxy: Proxy, upstream: ScriptedUpstream, fold: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\n" + fold + b"\r\nContent-Length: 5\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX-A: b\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\nhello",
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
        b"HTTP/1.1 200 OK\r\nX-A: b\rContent-Length: 5\r\n\r\nhello",
    ],
    ids=["status-line", "field-line", "blank-line", "all-lf", "bare-cr"],
)
def test_bare_lf_or_cr_in_a_head_is_an_error(
    proxy: Proxy, upstream: ScriptedUpstream, data: bytes
) -> None:
    outcome, _ = answer(proxy, upstream, [Send(data)])
    # A head whose blank line is a bare LF never ends for the proxy, which looks for CRLFCRLF:
    # it waits for upstream_read_timeout and answers 504. Either way, the client gets no part
    # of it.
    assert outcome.gateway_error(), outcome.describe()


@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\x1b", b"\x7f"], ids=repr)
def test_control_byte_in_a_field_value_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, byte: bytes
) -> None:
    data = b"HTTP/1.1 200 OK\r\nX-V: a" + byte + b"b\r\nContent-Length: 5\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


# --- framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked_first", [False, True])
@pytest.mark.parametrize("chunked_body", [False, True])
def test_content_length_with_transfer_encoding_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, chunked_first: bool, chunked_body: bool
) -> None:
    fields = [b"Content-Length: 5", b"Transfer-Encoding: chunked"]
    if chunked_first:
        fields.reverse()
    body = b"5\r\nhello\r\n0\r\n\r\n" if chunked_body else b"hello"
    data = b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(fields) + b"\r\n\r\n" + body
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


@pytest.mark.parametrize(
    "fields",
    [b"Content-Length: 5\r\nContent-Length: 6", b"Content-Length: 5, 6", b"Content-Length: 6, 5"],
    ids=["two-fields", "list", "list-reversed"],
)
def test_two_different_content_lengths_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, fields: bytes
) -> None:
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n\r\nhello!"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


@pytest.mark.parametrize(
    "fields",
    [b"Content-Length: 5\r\nContent-Length: 5", b"Content-Length: 5, 5"],
    ids=["two-fields", "list"],
)
def test_identical_content_lengths_are_one_length(
    proxy: Proxy, upstream: ScriptedUpstream, fields: bytes
) -> None:
    # RFC 9110 8.6: a recipient may take a list of identical lengths as that one length.
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_relayed(outcome, data)


@pytest.mark.parametrize(
    "value", [b"+5", b"-5", b"0x5", b"5.0", b"5 5", b"", b"five", b"5,"], ids=repr
)
def test_invalid_content_length_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, value: bytes
) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


@pytest.mark.parametrize(
    "coding",
    [b"gzip", b"gzip, chunked", b"chunked, chunked", b"identity", b"xchunked", b"chunked;q=1"],
    ids=repr,
)
def test_transfer_coding_other_than_chunked_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, coding: bytes
) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    outcome, _ = answer(proxy, upstream, [Send(data), Close()])
    assert_gateway(outcome)


def test_chunked_in_an_http10_response_is_502(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    data = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    outcome, _ = answer(proxy, upstream, [Send(data), Close()])
    assert_gateway(outcome)


def test_valid_chunked_body_is_relayed(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    # The control for the cases below: extensions, upper-case hex, leading zeros, trailers.
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Case: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n00A\r\n, chunked!\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    )
    outcome, case = answer(proxy, upstream, [Send(data)])
    assert_relayed(outcome, data)
    assert_next_is_clean(proxy, upstream, case)


def test_response_one_byte_at_a_time(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    # Every state of the proxy's incremental parser sees a partial line: the status line, a
    # field, the blank line, a chunk size, chunk data, its CRLF, the last chunk, a trailer.
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Case: bytewise\r\n\r\n"
        b"5;e=1\r\nhello\r\n3\r\n, w\r\n0\r\nX-T: 1\r\n\r\n"
    )
    steps: list[Step] = []
    for i in range(len(data)):
        steps += [Send(data[i : i + 1]), Sleep(0.001)]
    outcome, case = answer(proxy, upstream, steps)
    assert_relayed(outcome, data)
    assert_next_is_clean(proxy, upstream, case)


def test_chunked_answer_to_head_has_no_body(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Case: head\r\n\r\n"
    outcome, case = answer(proxy, upstream, [Send(data)], method=b"HEAD")
    assert_relayed(outcome, data, b"HEAD")
    assert outcome.response is not None and not outcome.response.values(b"transfer-encoding")
    assert_next_is_clean(proxy, upstream, case)


# --- bad chunking -----------------------------------------------------------------------------

HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("size", [b"g", b"-5", b"0x5", b"+5", b"5 5", b""], ids=repr)
@pytest.mark.parametrize("apart", [False, True], ids=["one-write", "head-first"])
def test_bad_chunk_size(proxy: Proxy, upstream: ScriptedUpstream, size: bytes, apart: bool) -> None:
    body = size + b"\r\nhello\r\n0\r\n\r\n"
    steps: list[Step] = (
        [Send(HEAD_CHUNKED), Sleep(0.1), Send(body)] if apart else [Send(HEAD_CHUNKED + body)]
    )
    outcome, _ = answer(proxy, upstream, steps)
    assert_no_complete_message(outcome)


@pytest.mark.parametrize("after", [b"", b"\n", b"\r", b"XX"], ids=repr)
def test_chunk_data_without_crlf(proxy: Proxy, upstream: ScriptedUpstream, after: bytes) -> None:
    steps = [Send(HEAD_CHUNKED), Sleep(0.1), Send(b"5\r\nhello" + after + b"0\r\n\r\n")]
    outcome, _ = answer(proxy, upstream, steps)
    assert_no_complete_message(outcome)


@pytest.mark.parametrize("size", [b"1" + b"0" * 16, b"f" * 16, b"f" * 40], ids=len)
def test_overlong_chunk_size(proxy: Proxy, upstream: ScriptedUpstream, size: bytes) -> None:
    steps = [Send(HEAD_CHUNKED), Sleep(0.1), Send(size + b"\r\nhello\r\n0\r\n\r\n")]
    outcome, _ = answer(proxy, upstream, steps)
    assert_no_complete_message(outcome)


@pytest.mark.parametrize(
    "tail", [b"0\r\n", b"0\r\n\r", b"0", b"", b"0\r\nX-Trailer: 1\r\n"], ids=repr
)
@pytest.mark.parametrize("ending", [Close(), Reset(), Hang(5)], ids=repr)
def test_truncated_last_chunk(
    proxy: Proxy, upstream: ScriptedUpstream, tail: bytes, ending: Step
) -> None:
    steps = [Send(HEAD_CHUNKED + b"5\r\nhello\r\n" + tail), ending]
    outcome, _ = answer(proxy, upstream, steps)
    assert outcome.kind == "cut", outcome.describe()  # the head and "hello" went out already
    assert outcome.raw.endswith(b"hello\r\n"), outcome.describe()


def test_chunk_larger_than_its_data_then_close(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    outcome, _ = answer(proxy, upstream, [Send(HEAD_CHUNKED + b"ff\r\nhello"), Close()])
    assert outcome.kind == "cut", outcome.describe()


def test_chunk_extension_with_a_control_byte(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    steps = [Send(HEAD_CHUNKED), Sleep(0.1), Send(b"5;a=\x01\r\nhello\r\n0\r\n\r\n")]
    outcome, _ = answer(proxy, upstream, steps)
    assert_no_complete_message(outcome)


def test_trailer_section_over_max_header_bytes(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 100) for i in range(MAX_HEADER_BYTES // 100))
    steps = [
        Send(HEAD_CHUNKED + b"5\r\nhello\r\n"),
        Sleep(0.05),
        Send(b"0\r\n" + trailers + b"\r\n"),
    ]
    outcome, _ = answer(proxy, upstream, steps)
    assert outcome.kind == "cut", outcome.describe()


@pytest.mark.xfail(
    strict=True,
    reason="proxy bug: when the head and a broken body arrive in one read, the head is not out "
    "yet but the exchange counts as started: the client gets a reset and no byte instead of a "
    "502 (and the access log shows the app's status with out=0)",
)
@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n0\r\n\r\n", b"f" * 20 + b"\r\n"], ids=repr)
def test_broken_body_in_the_same_read_as_the_head_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, body: bytes
) -> None:
    # Nothing of the response went out yet: the proxy can still answer 502, as it does when
    # the head alone is broken (and 504 when nothing came, per issue 9).
    outcome, _ = answer(proxy, upstream, [Send(HEAD_CHUNKED + body)])
    assert_gateway(outcome)


# --- 1xx --------------------------------------------------------------------------------------


def test_100_continue_nobody_asked_for(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    outcome, _ = answer(proxy, upstream, [Send(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)])
    assert_relayed(outcome, OK)
    assert outcome.raw.startswith(b"HTTP/1.1 200 "), outcome.raw[:100]  # no 100 to the client


def test_103_early_hints_before_a_200(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello"
    outcome, _ = answer(proxy, upstream, [Send(hints), Sleep(0.05), Send(final)])
    # The 200's own fields only: the hint's Link does not leak into the final response.
    assert_relayed(outcome, final)


def test_several_1xx_before_a_200(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n"
    )
    outcome, _ = answer(proxy, upstream, [Send(interim), Sleep(0.05), Send(OK)])
    assert_relayed(outcome, OK)


def test_1xx_and_then_nothing_is_502(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    outcome, _ = answer(proxy, upstream, [Send(b"HTTP/1.1 103 Early Hints\r\n\r\n"), Close()])
    assert_gateway(outcome)


def test_1xx_and_then_a_hang_is_504(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    outcome, _ = answer(proxy, upstream, [Send(b"HTTP/1.1 102 Processing\r\n\r\n"), Hang(10)])
    assert_gateway(outcome, 504)


def test_1xx_with_a_body_is_502(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    # A 1xx has no body (RFC 9110 15.2): "hello" is where the next status line belongs.
    data = b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello" + OK
    outcome, _ = answer(proxy, upstream, [Send(data)])
    assert_gateway(outcome)


# --- a response before the request body was read ----------------------------------------------


def post_while_reading(proxy: Proxy, target: str, size: int, timeout: float = 30) -> Outcome:
    """POST `size` bytes, reading the answer as it comes (it may come before the body went)."""
    sock = client_socket(proxy.port, proxy.context(), "localhost")
    try:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
            % (target.encode(), size)
        )
        sock.setblocking(False)
        left = size
        chunk = b"b" * 16384
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            writable = [sock] if left else []
            readable, can_write, _ = select.select([sock], writable, [], 0.1)
            if readable or sock.pending():
                try:
                    data = sock.recv(65536)
                except ssl.SSLWantReadError:
                    data = None
                except OSError:
                    break  # the connection ended: read_response below says how
                if data == b"":
                    break
                if data:
                    buf += data
                    if parse_response(bytes(buf)) is not None:
                        break
            if can_write:
                try:
                    left -= sock.send(chunk[:left])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
                except OSError:
                    left = 0  # the proxy stopped taking the body; what came back counts
        sock.setblocking(True)
        return read_response(sock, buf)
    finally:
        sock.close()


def test_early_response_to_a_large_post(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    """The app answers once it has the head, then reads the body: the client gets the answer
    whole while it is still sending."""
    data = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"
    case = upstream.add(Script([Send(data), ReadBody()], read_body=False))
    outcome = post_while_reading(proxy, f"/case/{case}", 8 * 1024 * 1024)
    assert_relayed(outcome, data)


def test_early_response_and_close_without_reading(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    """The app answers and closes with the body unread (its kernel resets the connection):
    the client gets that answer or a 502, never part of it as a whole."""
    data = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"
    case = upstream.add(Script([Send(data), Sleep(0.05), Close()], read_body=False))
    outcome = post_while_reading(proxy, f"/case/{case}", 8 * 1024 * 1024)
    if outcome.kind == "complete" and not outcome.gateway_error():
        assert_relayed(outcome, data)
    else:
        assert_no_complete_message(outcome)


# --- a close, a reset or a hang in the middle of the body -------------------------------------


@pytest.mark.parametrize("ending", [Close(), Reset(), Hang(5)], ids=repr)
def test_content_length_body_cut_short(
    proxy: Proxy, upstream: ScriptedUpstream, ending: Step
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    outcome, _ = answer(proxy, upstream, [Send(head + b"x" * 5000), Sleep(0.05), ending])
    assert outcome.kind == "cut", outcome.describe()
    assert outcome.raw.startswith(b"HTTP/1.1 200 OK\r\n")  # the start came through, unchanged


@pytest.mark.parametrize("ending", [Close(), Reset(), Hang(5)], ids=repr)
def test_chunked_body_cut_short(proxy: Proxy, upstream: ScriptedUpstream, ending: Step) -> None:
    outcome, _ = answer(proxy, upstream, [Send(HEAD_CHUNKED + b"5\r\nhello\r\n"), ending])
    assert outcome.kind == "cut", outcome.describe()
    assert b"hello" in outcome.raw


def test_body_until_close_ends_at_the_fin(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    # The control: without framing, the app's FIN ends the body; the client gets it chunked.
    data = b"HTTP/1.1 200 OK\r\nX-Case: until-close\r\n\r\nall of it"
    outcome, _ = answer(proxy, upstream, [Send(data), Sleep(0.05), Close()])
    assert_relayed(outcome, data)


@pytest.mark.parametrize("ending", [Reset(), Hang(5)], ids=repr)
def test_body_until_close_without_a_fin(
    proxy: Proxy, upstream: ScriptedUpstream, ending: Step
) -> None:
    # A reset, or silence until upstream_read_timeout, is no end of the body.
    data = b"HTTP/1.1 200 OK\r\n\r\nmaybe not all of it"
    outcome, _ = answer(proxy, upstream, [Send(data), Sleep(0.05), ending])
    assert outcome.kind == "cut", outcome.describe()


# An HTTP/1.0 client gets a chunked or close-delimited body close-delimited: only the way the
# connection ends tells a whole body from part of one. TLS says it: a close_notify is a clean
# end, a connection dropped without one is a truncation (RFC 8446 6.1).
HTTP10_TRUNCATED = [
    [Send(HEAD_CHUNKED + b"5\r\nhello\r\n"), Sleep(0.05), Close()],
    [Send(HEAD_CHUNKED + b"5\r\nhello\r\n"), Sleep(0.05), Reset()],
    [Send(HEAD_CHUNKED + b"5\r\nhello\r\n"), Hang(5)],
    [Send(HEAD_CHUNKED + b"5\r\nhello\r\nzz\r\n")],
    [Send(b"HTTP/1.1 200 OK\r\n\r\nmaybe not all"), Sleep(0.05), Reset()],
]


@pytest.mark.parametrize(
    "steps",
    HTTP10_TRUNCATED,
    ids=["chunked-close", "chunked-reset", "chunked-hang", "bad-chunk", "until-close-reset"],
)
def test_cut_body_to_an_http10_client_does_not_look_complete(
    proxy: Proxy, upstream: ScriptedUpstream, steps: list[Step]
) -> None:
    outcome, _ = answer(proxy, upstream, steps, version=b"1.0")
    assert b"hello" in outcome.raw or b"maybe" in outcome.raw  # part of the body went out
    assert outcome.kind == "cut" and outcome.end != "clean", outcome.describe()


def test_whole_body_to_an_http10_client_ends_cleanly(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    # The control for the case above: a whole chunked body, close-delimited, then close_notify.
    data = HEAD_CHUNKED + b"5\r\nhello\r\n0\r\n\r\n"
    outcome, _ = answer(proxy, upstream, [Send(data)], version=b"1.0")
    assert_relayed(outcome, data)
    assert outcome.end == "clean" and outcome.response is not None
    assert outcome.response.framing == "close"


# --- hangs ------------------------------------------------------------------------------------


def test_hang_before_any_byte_is_504(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    started = time.monotonic()
    outcome, _ = answer(proxy, upstream, [Hang(10)])
    assert_gateway(outcome, 504)
    assert time.monotonic() - started < READ_TIMEOUT + 8  # by upstream_read_timeout, not ours


def test_hang_in_the_middle_of_the_head_is_504(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    outcome, _ = answer(proxy, upstream, [Send(b"HTTP/1.1 200 OK\r\nContent-"), Hang(10)])
    assert_gateway(outcome, 504)


def test_hang_after_the_head(proxy: Proxy, upstream: ScriptedUpstream) -> None:
    started = time.monotonic()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    outcome, _ = answer(proxy, upstream, [Send(head), Hang(10)])
    assert outcome.kind == "cut", outcome.describe()
    assert outcome.raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert time.monotonic() - started < READ_TIMEOUT + 8


# --- bytes after the end of the response -------------------------------------------------------

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\nsmuggled"


@pytest.mark.parametrize("pause", [0.0, 0.2], ids=["same-write", "later-write"])
@pytest.mark.parametrize(
    "first",
    [OK, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
    ids=["content-length", "chunked"],
)
def test_bytes_after_the_end_of_a_response(
    proxy: Proxy, upstream: ScriptedUpstream, first: bytes, pause: float
) -> None:
    """An app that sends more than its response on a keep-alive connection: the client gets
    the response, and the surplus is no one's next response."""
    steps: list[Step] = (
        [Send(first + SMUGGLED)] if not pause else [Send(first), Sleep(pause), Send(SMUGGLED)]
    )
    case = upstream.add(steps)
    with Client(proxy) as client:
        outcome = client.ask(f"/case/{case}")
        if outcome.kind == "complete":
            assert_relayed(outcome, first)
        else:
            assert_no_complete_message(outcome)
        assert upstream.wait_sent(case)
        time.sleep(0.2)
        kept = outcome.response is not None and b"close" not in b"".join(
            outcome.response.values(b"connection")
        )
        if outcome.end is None and kept:  # the same client connection, if the proxy kept it
            try:
                after = client.ask("/after")
            except OSError:
                after = None
            if after is not None and after.kind == "complete":
                assert after.response is not None
                assert after.response.body == clean_body(b"/after"), after.describe()
    assert_next_is_clean(proxy, upstream, case)


# --- 101 --------------------------------------------------------------------------------------

WEBSOCKET_OFFER = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def switch(upgrade: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
        + upgrade
        + b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )


def test_101_to_a_request_that_asked_for_no_upgrade_is_502(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    steps = [Send(switch(b"websocket") + b"\x81\x05hello"), Hang(3)]
    outcome, _ = answer(proxy, upstream, steps)
    assert_gateway(outcome)
    assert b"hello" not in outcome.raw


@pytest.mark.parametrize("upgrade", [b"h2c", b"foo", b"websocket, h2c", b""], ids=repr)
def test_101_naming_a_protocol_the_client_did_not_offer_is_502(
    proxy: Proxy, upstream: ScriptedUpstream, upgrade: bytes
) -> None:
    head = switch(upgrade) if upgrade else b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    case = upstream.add([Send(head + b"tunnel bytes"), Hang(3)])
    with Client(proxy) as client:
        outcome = client.ask(f"/case/{case}", headers=WEBSOCKET_OFFER, upgrade=True)
    assert_gateway(outcome)
    assert b"tunnel bytes" not in outcome.raw


def test_101_for_the_offered_protocol_opens_the_tunnel(
    proxy: Proxy, upstream: ScriptedUpstream
) -> None:
    # The control for the two cases above.
    case = upstream.add([Send(switch(b"websocket")), Sleep(0.05), Send(b"tunnel bytes"), Hang(3)])
    with Client(proxy) as client:
        outcome = client.ask(f"/case/{case}", headers=WEBSOCKET_OFFER, upgrade=True)
        assert outcome.response is not None and outcome.response.status == 101, outcome.describe()
        client.sock.settimeout(5)
        while len(client.buf) < len(b"tunnel bytes"):
            data = client.sock.recv(100)
            assert data
            client.buf += data
        assert bytes(client.buf) == b"tunnel bytes"


@pytest.mark.xfail(
    strict=True,
    reason="proxy bug: a 204/304/HEAD head and the body it must not have, in one read: the "
    "client gets a reset and no byte (the head is never written), neither the head nor a 502",
)
@pytest.mark.parametrize(
    ("method", "status"),
    [(b"GET", b"204 No Content"), (b"GET", b"304 Not Modified"), (b"HEAD", b"200 OK")],
    ids=["204", "304", "HEAD"],
)
def test_body_on_a_response_without_one_gets_an_answer(
    proxy: Proxy, upstream: ScriptedUpstream, method: bytes, status: bytes
) -> None:
    """Apps that send a body with a HEAD answer are common; the client should get the head
    (the body dropped, the upstream connection closed) or at least a 502."""
    head = b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    outcome, _ = answer(proxy, upstream, [Send(head + SMUGGLED)], method=method)
    assert outcome.kind == "complete", outcome.describe()
    if not outcome.gateway_error(method):
        assert_relayed(outcome, head, method)


# --- 204, 304 and HEAD: the length fields they carry ---------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="proxy bug: the Content-Length of a response without a body (204, 304, HEAD) is "
    "not checked and reaches the client as the app sent it, conflicting or invalid",
)
@pytest.mark.parametrize(
    ("method", "status"),
    [(b"GET", b"204 No Content"), (b"GET", b"304 Not Modified"), (b"HEAD", b"200 OK")],
    ids=["204", "304", "HEAD"],
)
@pytest.mark.parametrize(
    "fields",
    [b"Content-Length: 0\r\nContent-Length: 11", b"Content-Length: 5, 6", b"Content-Length: abc"],
    ids=["two-fields", "list", "not-a-number"],
)
def test_invalid_content_length_without_a_body(
    proxy: Proxy, upstream: ScriptedUpstream, method: bytes, status: bytes, fields: bytes
) -> None:
    """Without a body the length frames nothing here, but the client (and any cache or proxy
    after it) still reads the field: a conflicting or invalid one gets a 502, as it would on
    a 200, or is dropped."""
    data = b"HTTP/1.1 " + status + b"\r\n" + fields + b"\r\n\r\n"
    outcome, _ = answer(proxy, upstream, [Send(data)], method=method)
    assert outcome.kind != "invalid", outcome.describe()  # what the client got reads as HTTP
    if not outcome.gateway_error(method):
        assert outcome.response is not None
        assert outcome.response.values(b"content-length") in ([], [b"0"]), outcome.describe()


# --- 204, 304 and HEAD with a body ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status"),
    [(b"GET", b"204 No Content"), (b"GET", b"304 Not Modified"), (b"HEAD", b"200 OK")],
    ids=["204", "304", "HEAD"],
)
@pytest.mark.parametrize("pause", [0.0, 0.2], ids=["same-write", "later-write"])
def test_response_without_a_body_carrying_one(
    proxy: Proxy, upstream: ScriptedUpstream, method: bytes, status: bytes, pause: float
) -> None:
    """The head (which says there is no body) or a 502 reaches the client, and the body that
    should not be there is never the start of the next response."""
    head = b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    steps: list[Step] = (
        [Send(head + SMUGGLED)] if not pause else [Send(head), Sleep(pause), Send(SMUGGLED)]
    )
    outcome, case = answer(proxy, upstream, steps, method=method)
    if outcome.kind == "complete" and not outcome.gateway_error(method):
        assert_relayed(outcome, head, method)
    else:
        assert_no_complete_message(outcome, method)
    assert_next_is_clean(proxy, upstream, case)
