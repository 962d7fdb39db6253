"""Testing with tlsproxy: a real TLS-terminating proxy in front of an app, per test.

    pip install 'tlsproxy[testing]' fastapi
    pytest examples/test_with_tlsproxy.py

The `tlsproxy` and `tlsproxy_ca` fixtures come with the installed package (a pytest plugin).
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from cryptography import x509
from fastapi import FastAPI, Request

app = FastAPI()


@app.get("/")
async def whoami(request: Request) -> dict[str, str | None]:
    # Client-Cert (RFC 9440) is set by the proxy, from the verified client certificate only.
    cert = request.headers.get("client-cert")
    subject = None
    if cert:
        der = base64.b64decode(cert.strip(":"))
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return {
        "scheme": request.url.scheme,
        "client": request.client.host if request.client else None,
        "client_cert_subject": subject,
    }


def test_an_app_behind_tls(tlsproxy):
    p = tlsproxy(app=app, hosts=["api.test"])
    assert p.client().get(p.url("api.test")).status_code == 200


def test_the_app_sees_https_and_the_client_address(tlsproxy):
    p = tlsproxy(app=app, hosts=["api.test"])
    seen = p.client().get(p.url("api.test")).json()
    assert seen["scheme"] == "https"
    assert seen["client"] == "127.0.0.1"


def test_a_renewal_watched_with_a_short_leaf_lifetime(tlsproxy):
    # Leaves live 10 s; the proxy renews each after about two thirds of its life.
    p = tlsproxy(app=app, hosts=["api.test"], config={"local_ca": {"leaf_lifetime": "10s"}})
    first = served_serial(p, "api.test")
    deadline = time.monotonic() + 30
    while served_serial(p, "api.test") == first:
        assert time.monotonic() < deadline, "no renewal within 30 s"
        time.sleep(0.5)
    # A renewal can also be asked for: `p.renew()` is `tlsproxy certs renew`.
    assert int(p.renew("api.test")["serial"], 16) == served_serial(p, "api.test")


def served_serial(p, host: str) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", p.port)) as raw:
        with p.ssl_context().wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_a_client_certificate(tlsproxy):
    p = tlsproxy(
        app=app, hosts=["api.test"], site={"client_auth": {"ca": "internal", "required": True}}
    )
    alice = p.client_cert("alice")
    seen = p.client(cert=alice).get(p.url("api.test")).json()
    assert seen["client_cert_subject"] == "CN=alice"
    with pytest.raises(httpx.HTTPError):  # no certificate: the handshake is refused
        p.client().get(p.url("api.test"))


BROKEN = {
    "expired.test": ("expired", "certificate has expired"),
    "future.test": ("not-yet-valid", "certificate is not yet valid"),
    "wrong.test": ("wrong-host", "Hostname mismatch"),
    "self.test": ("self-signed", "self-signed certificate"),
    "untrusted.test": ("untrusted-root", "self-signed certificate in certificate chain"),
    "incomplete.test": ("incomplete-chain", "unable to get local issuer certificate"),
}


@pytest.mark.parametrize("host", BROKEN)
def test_an_https_client_refuses_a_broken_certificate(tlsproxy, host):
    kind, reason = BROKEN[host]
    p = tlsproxy(app=app, broken={host: kind})
    # Your webhook sender or SDK goes here; httpx stands in for it.
    with pytest.raises(httpx.ConnectError, match=reason):
        p.client().get(p.url(host))
