import h11
import pytest

from proxy.downstream.responses import (
    ERROR_STATUSES,
    error_response,
    https_location,
    plain_response,
    reason,
    redirect_to_https,
)


def read(raw: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes, h11.Connection]:
    """Parse a response as an h11 CLIENT would after sending `method`: proves it is valid."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "a.test")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    assert client.next_event() is h11.NEED_DATA  # nothing after the message
    return response, body, client


def header(response: h11.Response, name: bytes) -> list[bytes]:
    return [v for n, v in response.headers if n == name]


PHRASES = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


@pytest.mark.parametrize("status", ERROR_STATUSES)
def test_error_responses_are_valid_http(status):
    response, body, client = read(error_response(status))
    assert response.status_code == status
    assert response.reason == PHRASES[status]
    assert header(response, b"content-type") == [b"text/plain; charset=utf-8"]
    assert header(response, b"content-length") == [str(len(body)).encode()]
    assert body.startswith(str(status).encode())
    assert header(response, b"connection") == [b"close"]
    assert client.their_state is h11.MUST_CLOSE


@pytest.mark.parametrize("status", ERROR_STATUSES)
def test_error_response_keep_alive(status):
    response, _, client = read(error_response(status, close=False))
    assert header(response, b"connection") == []
    assert client.their_state is h11.DONE  # the connection can carry the next request
    client.start_next_cycle()


def test_error_response_to_head_has_no_body_but_the_length():
    raw = error_response(404, close=False, head=True)
    assert raw.endswith(b"\r\n\r\n")
    response, body, _ = read(raw, method=b"HEAD")
    assert body == b""
    assert header(response, b"content-length") == [b"14"]


def test_retry_after():
    response, _, _ = read(error_response(503, retry_after=30))
    assert response.status_code == 503
    assert header(response, b"retry-after") == [b"30"]
    assert header(read(error_response(503))[0], b"retry-after") == []


def test_error_responses_are_precomputed():
    assert error_response(502) is error_response(502)


def test_other_statuses_get_a_phrase():
    assert reason(299) == b""
    response, _, _ = read(error_response(429))
    assert (response.status_code, response.reason) == (429, b"Too Many Requests")


def test_plain_response():
    response, body, _ = read(plain_response(200, b"token.key"))
    assert (response.status_code, body) == (200, b"token.key")


@pytest.mark.parametrize(
    ("host", "target", "port", "location"),
    [
        (b"a.test", b"/x?y=1", 443, b"https://a.test/x?y=1"),
        (b"A.Test:8080", b"/", 8443, b"https://a.test:8443/"),
        (b"a.test.", b"/p", 443, b"https://a.test/p"),
        (b"[::1]:8080", b"/p", 8443, b"https://[::1]:8443/p"),
        (b"127.0.0.1:80", b"/", 443, b"https://127.0.0.1/"),
        (b"a.test", b"*", 443, b"https://a.test/"),
        # absolute-form: its authority replaces Host (RFC 9112 3.2.2)
        (b"other.test", b"http://B.test:80/z?q", 443, b"https://b.test/z?q"),
        (b"other.test", b"http://b.test", 443, b"https://b.test/"),
        (b"other.test", b"http://b.test?q", 443, b"https://b.test/?q"),
    ],
)
def test_redirect_to_https(host, target, port, location):
    assert https_location(host, target, port) == location
    response, body, client = read(redirect_to_https(host, target, port))
    assert response.status_code == 308
    assert response.reason == b"Permanent Redirect"
    assert header(response, b"location") == [location]
    assert body == b""
    assert client.their_state is h11.DONE


def test_redirect_with_close():
    response, _, client = read(redirect_to_https(b"a.test", b"/", 443, close=True))
    assert header(response, b"connection") == [b"close"]
    assert client.their_state is h11.MUST_CLOSE


def test_redirect_answers_head_with_the_same_bytes():
    response, body, _ = read(redirect_to_https(b"a.test", b"/", 443), method=b"HEAD")
    assert response.status_code == 308
    assert body == b""


@pytest.mark.parametrize(
    ("host", "target"),
    [
        (None, b"/"),
        (b"", b"/"),
        (b"a b", b"/"),
        (b"a.test/evil", b"/"),
        (b"a.test", b"a.test:443"),  # authority-form (CONNECT)
        (b"a.test", b"ftp://a.test/"),
        (b"a.test", b"http://user@evil/"),
    ],
)
def test_redirect_with_bad_host_is_400(host, target):
    assert https_location(host, target, 443) is None
    response, _, client = read(redirect_to_https(host, target, 443))
    assert response.status_code == 400
    assert client.their_state is h11.MUST_CLOSE
