import ipaddress

import h11
import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from proxy.downstream.forwarding import (
    StrictHeadScanner,
    TrustedProxies,
    request_head,
    response_headers,
    switch_accepted,
    upgrade_offer,
)

UNTRUSTED = TrustedProxies()


def parse(head: bytes) -> h11.Request:
    """The head as an upstream (h11 SERVER) sees it: proves it is a valid HTTP/1.1 request."""
    assert head.endswith(b"\r\n\r\n")
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def rewrite(headers, *, client_ip="203.0.113.7", host=b"a.test", trusted=UNTRUSTED, upgrade=None):
    headers = [(b"host", host), *headers]
    return parse(
        request_head(
            b"GET",
            b"/p?q=1",
            headers,
            client_ip=client_ip,
            host=host,
            trusted=trusted,
            upgrade=upgrade,
        )
    )


def names(request: h11.Request) -> list[bytes]:
    return [name for name, _ in request.headers]


def values(request: h11.Request, name: bytes) -> list[bytes]:
    return [v for n, v in request.headers if n == name]


def test_request_line_and_end_to_end_headers_pass_in_order():
    req = rewrite([(b"accept", b"*/*"), (b"x-a", b"1"), (b"cookie", b"c=1"), (b"x-a", b"2")])
    assert (req.method, req.target, req.http_version) == (b"GET", b"/p?q=1", b"1.1")
    assert names(req)[:5] == [b"host", b"accept", b"x-a", b"cookie", b"x-a"]
    assert values(req, b"x-a") == [b"1", b"2"]


def test_http10_client_is_forwarded_as_http11():
    head = request_head(
        b"GET",
        b"/",
        [(b"host", b"a")],
        client_ip="1.2.3.4",
        host=b"a",
        trusted=UNTRUSTED,
        upgrade=None,
    )
    assert head.startswith(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "name",
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"proxy-anything",
        b"proxy",
        b"trailer",
        b"upgrade",
    ],
)
def test_hop_by_hop_headers_are_removed(name):
    req = rewrite([(name, b"x"), (b"x-keep", b"1")])
    assert name not in names(req)
    assert values(req, b"x-keep") == [b"1"]


def test_names_listed_in_connection_are_removed():
    req = rewrite(
        [
            (b"connection", b"keep-alive, X-Secret ,x-other"),
            (b"connection", b"x-third"),
            (b"x-secret", b"s"),
            (b"x-other", b"o"),
            (b"x-third", b"t"),
            (b"x-secretive", b"kept"),  # a longer name with a listed prefix stays
            (b"x-keep", b"1"),
        ]
    )
    assert b"x-secret" not in names(req)
    assert b"x-other" not in names(req)
    assert b"x-third" not in names(req)
    assert b"connection" not in names(req)
    assert values(req, b"x-secretive") == [b"kept"]
    assert values(req, b"x-keep") == [b"1"]


def test_connection_cannot_strip_framing_host_or_forwarding():
    req = parse(
        request_head(
            b"POST",
            b"/",
            [
                (b"host", b"a.test"),
                (b"connection", b"content-length, host, x-forwarded-for, forwarded"),
                (b"content-length", b"5"),
            ],
            client_ip="203.0.113.7",
            host=b"a.test",
            trusted=UNTRUSTED,
            upgrade=None,
        )
    )
    assert values(req, b"content-length") == [b"5"]
    assert values(req, b"host") == [b"a.test"]
    assert values(req, b"x-forwarded-for") == [b"203.0.113.7"]
    assert values(req, b"forwarded") == [b"for=203.0.113.7;proto=https;host=a.test"]


def test_chunked_framing_is_kept():
    req = parse(
        request_head(
            b"POST",
            b"/",
            [(b"host", b"a"), (b"transfer-encoding", b"chunked")],
            client_ip="1.2.3.4",
            host=b"a",
            trusted=UNTRUSTED,
            upgrade=None,
        )
    )
    assert values(req, b"transfer-encoding") == [b"chunked"]


@pytest.mark.parametrize("te", [b"trailers", b"gzip, trailers", b"Trailers;q=1, deflate"])
def test_te_trailers_is_kept_with_its_connection_option(te):
    req = rewrite([(b"te", te)])
    assert values(req, b"te") == [b"trailers"]
    assert values(req, b"connection") == [b"te"]


@pytest.mark.parametrize("te", [b"gzip", b"deflate;q=0.5", b"x-trailers"])
def test_te_without_trailers_is_removed(te):
    req = rewrite([(b"te", te)])
    assert b"te" not in names(req)
    assert b"connection" not in names(req)


def test_upgrade_is_kept_with_connection_upgrade():
    req = rewrite(
        [
            (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-key", b"k"),
            (b"sec-websocket-version", b"13"),
        ],
        upgrade=b"websocket",
    )
    assert values(req, b"upgrade") == [b"websocket"]
    assert values(req, b"connection") == [b"upgrade"]
    assert values(req, b"sec-websocket-key") == [b"k"]


def test_without_an_offer_upgrade_and_http2_settings_are_dropped():
    req = rewrite(
        [(b"upgrade", b"h2c"), (b"http2-settings", b"AAMAAABkAAQCAAAAAAIAAAAA")], upgrade=None
    )
    assert b"upgrade" not in names(req)
    assert b"http2-settings" not in names(req)
    assert b"connection" not in names(req)


def test_the_offer_replaces_the_clients_upgrade_fields():
    req = rewrite(
        [(b"connection", b"upgrade"), (b"upgrade", b"h2c, websocket")], upgrade=b"websocket"
    )
    assert values(req, b"upgrade") == [b"websocket"]


@pytest.mark.parametrize(
    ("upgrades", "connection", "http10", "offer"),
    [
        ([b"websocket"], [b"Upgrade"], False, b"websocket"),
        ([b"websocket"], [b"keep-alive, upgrade"], False, b"websocket"),
        ([b"websocket"], [b"keep-alive", b"UPGRADE"], False, b"websocket"),
        # RFC 9110 7.8: without "upgrade" in Connection, Upgrade means nothing
        ([b"websocket"], [], False, None),
        ([b"websocket"], [b"keep-alive"], False, None),
        ([b"websocket"], [b"upgraded"], False, None),
        ([b"h2c"], [b"keep-alive"], False, None),
        # h2c is never offered upstream (RFC 9113 removed it; behind TLS it means nothing)
        ([b"h2c"], [b"upgrade, http2-settings"], False, None),
        ([b"H2C, websocket"], [b"upgrade"], False, b"websocket"),
        ([b"foo/2", b"Bar"], [b"upgrade"], False, b"foo/2, bar"),
        ([b" , "], [b"upgrade"], False, None),
        # a server ignores Upgrade in an HTTP/1.0 request
        ([b"websocket"], [b"upgrade"], True, None),
    ],
)
def test_upgrade_offer(upgrades, connection, http10, offer):
    assert upgrade_offer(upgrades, connection, http10=http10) == offer


@pytest.mark.parametrize(
    ("offer", "headers", "accepted"),
    [
        (b"websocket", [(b"upgrade", b"websocket")], True),
        (b"websocket", [(b"upgrade", b"WebSocket")], True),
        (b"websocket, foo", [(b"upgrade", b"foo")], True),
        (None, [(b"upgrade", b"websocket")], False),  # not an upgrade request
        (b"websocket", [], False),  # a 101 that does not say what it switched to
        (b"websocket", [(b"upgrade", b"h2c")], False),
        (b"websocket", [(b"upgrade", b"websocket, h2c")], False),
    ],
)
def test_switch_accepted(offer, headers, accepted):
    assert switch_accepted(offer, headers) is accepted


def test_upgrade_with_te_trailers_names_both_options():
    req = rewrite([(b"upgrade", b"websocket"), (b"te", b"trailers")], upgrade=b"websocket")
    assert values(req, b"connection") == [b"te, upgrade"]


def test_untrusted_client_forwarding_headers_are_replaced():
    req = rewrite(
        [
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"evil.test"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"x-forwarded-for", b"7.7.7.7"),
        ],
        host=b"a.test:8443",
    )
    assert values(req, b"x-forwarded-for") == [b"203.0.113.7"]
    assert values(req, b"x-forwarded-proto") == [b"https"]
    assert values(req, b"x-forwarded-host") == [b"a.test:8443"]
    # host contains ':' which is not a token character: quoted
    assert values(req, b"forwarded") == [b'for=203.0.113.7;proto=https;host="a.test:8443"']


def test_forwarding_headers_added_when_client_sent_none_even_if_trusted():
    trusted = TrustedProxies(["203.0.113.0/24"])
    assert rewrite([], trusted=trusted).headers == rewrite([]).headers


def test_trusted_proxy_chain_is_appended_to():
    trusted = TrustedProxies([ipaddress.ip_network("10.0.0.0/8")])
    req = rewrite(
        [
            (b"x-forwarded-for", b"198.51.100.1, 10.1.1.1"),
            (b"x-forwarded-for", b"10.2.2.2"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"public.test"),
            (b"forwarded", b"for=198.51.100.1;proto=http"),
            (b"forwarded", b"for=10.2.2.2"),
        ],
        client_ip="10.9.9.9",
        trusted=trusted,
    )
    assert values(req, b"x-forwarded-for") == [b"198.51.100.1, 10.1.1.1, 10.2.2.2, 10.9.9.9"]
    # single-valued: the first proxy's view of the client stays (uvicorn reads one value)
    assert values(req, b"x-forwarded-proto") == [b"http"]
    assert values(req, b"x-forwarded-host") == [b"public.test"]
    assert values(req, b"forwarded") == [
        b"for=198.51.100.1;proto=http, for=10.2.2.2, for=10.9.9.9;proto=https;host=a.test"
    ]


def test_trusted_proxy_without_proto_or_host_gets_ours():
    trusted = TrustedProxies(["10.0.0.0/8"])
    req = rewrite([(b"x-forwarded-for", b"1.1.1.1")], client_ip="10.0.0.1", trusted=trusted)
    assert values(req, b"x-forwarded-for") == [b"1.1.1.1, 10.0.0.1"]
    assert values(req, b"x-forwarded-proto") == [b"https"]
    assert values(req, b"x-forwarded-host") == [b"a.test"]


def test_forwarded_quotes_ipv6_in_brackets():
    req = rewrite([], client_ip="2001:db8::7", host=b"[2001:db8::1]:8443")
    assert values(req, b"x-forwarded-for") == [b"2001:db8::7"]
    assert values(req, b"forwarded") == [
        b'for="[2001:db8::7]";proto=https;host="[2001:db8::1]:8443"'
    ]


def test_uvicorn_reads_the_client_and_scheme_we_send():
    # What uvicorn's --proxy-headers middleware does with our headers (trusting only us).
    seen = {}

    async def app(scope, receive, send):
        seen.update(scheme=scope["scheme"], client=scope["client"])

    req = rewrite([(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-proto", b"ws")])
    scope = {
        "type": "http",
        "scheme": "http",
        "client": ("127.0.0.1", 5000),
        "headers": list(req.headers),
    }
    # Nothing in it awaits I/O: drive the coroutine by hand instead of starting a loop.
    with pytest.raises(StopIteration):
        ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")(scope, None, None).send(None)
    assert seen == {"scheme": "https", "client": ("203.0.113.7", 0)}


@pytest.mark.parametrize(
    ("networks", "addr", "expected"),
    [
        ([], "127.0.0.1", False),
        (["127.0.0.1/32"], "127.0.0.1", True),
        (["127.0.0.1"], "127.0.0.2", False),
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "::ffff:10.0.0.1", True),  # dual-stack listener spelling
        (["::1/128"], "::1", True),
        (["fd00::/8"], "fd12::1", True),
        (["10.0.0.0/8"], "not-an-ip", False),
        (["10.0.0.0/8"], "", False),
    ],
)
def test_trusted_proxies_contains(networks, addr, expected):
    trusted = TrustedProxies(networks)
    assert trusted.contains(addr) is expected
    assert trusted.contains(addr) is expected  # the cached answer agrees
    assert bool(trusted) is bool(networks)


def test_response_hop_by_hop_headers_are_removed():
    out = response_headers(
        [
            (b"content-type", b"text/plain"),
            (b"connection", b"keep-alive, x-hop"),
            (b"keep-alive", b"timeout=5"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"trailer", b"x-checksum"),
            (b"te", b"trailers"),
            (b"proxy-authenticate", b"Basic"),
            (b"upgrade", b"h2c"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"content-length", b"10"),
        ]
    )
    assert out == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"content-length", b"10"),
    ]


def test_response_connection_cannot_strip_content_length():
    out = response_headers([(b"connection", b"content-length"), (b"content-length", b"3")])
    assert out == [(b"content-length", b"3")]


def test_response_101_keeps_upgrade_and_says_connection_upgrade():
    out = response_headers(
        [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", b"abc"),
        ],
        upgrade=True,
    )
    assert out == [
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"abc"),
        (b"connection", b"upgrade"),
    ]
    # and h11 (our client side) accepts it as a 101 switching the protocol
    server = h11.Connection(h11.SERVER)
    server.receive_data(
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )
    server.next_event()
    server.send(h11.InformationalResponse(status_code=101, headers=out))
    assert server.our_state is h11.SWITCHED_PROTOCOL


def test_content_length_beside_chunked_never_reaches_the_upstream():
    req = parse(
        request_head(
            b"POST",
            b"/",
            [(b"host", b"a"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
            client_ip="1.2.3.4",
            host=b"a",
            trusted=UNTRUSTED,
            upgrade=None,
        )
    )
    assert values(req, b"transfer-encoding") == [b"chunked"]
    assert values(req, b"content-length") == []


GOOD_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n"


@pytest.mark.parametrize("size", [1, 2, 3, 5, len(GOOD_HEAD)])
def test_crlf_head_in_any_pieces_has_no_bare_lf(size):
    scanner = StrictHeadScanner()
    pieces = [GOOD_HEAD[i : i + size] for i in range(0, len(GOOD_HEAD), size)]
    assert not any(scanner.feed(piece) for piece in pieces)


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\n",
        b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\t2\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",  # whitespace before the first field
    ],
)
@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_bare_lf_and_obs_fold_are_found_in_any_pieces(head, size):
    scanner = StrictHeadScanner()
    pieces = [head[i : i + size] for i in range(0, len(head), size)]
    assert any(scanner.feed(piece) for piece in pieces)


def test_body_after_the_head_is_not_scanned_until_reset():
    scanner = StrictHeadScanner()
    assert not scanner.feed(GOOD_HEAD + b"body\nwith\nlf\r\n folded")
    assert not scanner.feed(b"more\n\n")
    scanner.reset()
    assert scanner.feed(b"GET / HTTP/1.1\n")
