"""RFC 9440 headers: what a client sends is dropped unless it is a trusted proxy; the proxy's
own values are sf-binary DER; and a client_auth site is served only on its own handshake."""

from __future__ import annotations

import base64
from pathlib import Path

import h11

from certs.models import ClientAuthSpec
from proxy.config import ClientAuth, Site
from proxy.downstream.forwarding import TrustedProxies, client_cert_lines, request_head
from proxy.downstream.routing import client_auth_allows

LEAF, INTER, ROOT = b"\x30\x03leaf", b"\x30\x04inter", b"\x30\x02rt"
OURS = client_cert_lines([LEAF, INTER, ROOT])
SPOOFED = [(b"client-cert", b":c3Bvb2Y=:"), (b"client-cert-chain", b":c3Bvb2Y=:, :eA==:")]
PROXY = TrustedProxies(["10.0.0.0/8"])


def head(headers, *, client_ip="203.0.113.7", trusted=PROXY, client_cert=None) -> h11.Request:
    raw = request_head(
        b"GET",
        b"/",
        [(b"host", b"a.test"), *headers],
        client_ip=client_ip,
        host=b"a.test",
        trusted=trusted,
        upgrade=None,
        client_cert=client_cert,
    )
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def values(request: h11.Request, name: bytes) -> list[bytes]:
    return [v for n, v in request.headers if n == name]


def sf_binary_list(value: bytes) -> list[bytes]:
    items = [item.strip() for item in value.split(b",")]
    assert all(item[:1] == b":" and item[-1:] == b":" for item in items), value
    return [base64.b64decode(item[1:-1], validate=True) for item in items]


def test_the_values_are_sf_binary_der_leaf_apart_chain_in_order() -> None:
    request = head([], client_cert=OURS)
    assert values(request, b"client-cert") == [b":" + base64.b64encode(LEAF) + b":"]
    (chain,) = values(request, b"client-cert-chain")
    assert sf_binary_list(chain) == [INTER, ROOT]  # no leaf in it (RFC 9440 2.3)


def test_no_chain_header_when_the_leaf_is_all_there_is() -> None:
    assert client_cert_lines([LEAF]) == b"client-cert: :" + base64.b64encode(LEAF) + b":\r\n"
    assert client_cert_lines([]) == b""


def test_a_client_cannot_send_them() -> None:
    request = head(SPOOFED)
    assert values(request, b"client-cert") == []
    assert values(request, b"client-cert-chain") == []


def test_an_untrusted_clients_values_give_way_to_the_verified_ones() -> None:
    request = head(SPOOFED, client_cert=OURS)
    assert sf_binary_list(values(request, b"client-cert")[0]) == [LEAF]
    assert sf_binary_list(values(request, b"client-cert-chain")[0]) == [INTER, ROOT]


def test_a_trusted_proxys_values_are_kept_and_ours_not_added() -> None:
    request = head(SPOOFED, client_ip="10.1.2.3", client_cert=OURS)
    assert values(request, b"client-cert") == [b":c3Bvb2Y=:"]
    assert values(request, b"client-cert-chain") == [b":c3Bvb2Y=:, :eA==:"]


def test_a_trusted_proxy_that_sent_none_gets_ours() -> None:
    request = head([], client_ip="10.1.2.3", client_cert=OURS)
    assert sf_binary_list(values(request, b"client-cert")[0]) == [LEAF]


def test_connection_cannot_list_them_to_keep_ours_out() -> None:
    request = head([(b"connection", b"client-cert")], client_cert=OURS)
    assert sf_binary_list(values(request, b"client-cert")[0]) == [LEAF]


REQUIRED = ClientAuthSpec(ca="internal", required=True)
MTLS = Site(("m.test",), "internal", "app", client_auth=ClientAuth("internal", True))
OPEN = Site(("o.test",), "internal", "app")


def test_a_site_without_client_auth_is_served_on_any_connection() -> None:
    assert client_auth_allows(OPEN, None)
    assert client_auth_allows(OPEN, ("m.test", REQUIRED))


def test_a_client_auth_site_only_on_its_own_handshake() -> None:
    assert client_auth_allows(MTLS, ("m.test", REQUIRED))
    assert not client_auth_allows(MTLS, None)  # a no-SNI or other-site connection
    assert not client_auth_allows(MTLS, ("other.test", REQUIRED))
    # A reload changed the site's client_auth after this connection's handshake.
    assert not client_auth_allows(MTLS, ("m.test", ClientAuthSpec("internal", required=False)))
    assert not client_auth_allows(MTLS, ("m.test", ClientAuthSpec(Path("/ca.pem"), True)))
