"""proxy/tls.py's contexts, driven over memory BIOs (no sockets): the certificate the SNI
callback picks, the C-bound SSLObject, and keys OpenSSL must refuse without asking anything."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certs.files import ENCRYPTED_KEY_REASON
from certs.models import Installed
from proxy.tls import CertificateSelector, DirectSSLObject, server_context
from tests.unit.certs.factory import (
    encrypted_key_pem,
    fake_installed,
    make_ca,
    make_leaf,
    write_pair,
)


class OneCertificate:
    def __init__(self, installed: Installed) -> None:
        self.installed = installed

    def lookup_exact_or_wildcard(self, server_name: str) -> Installed | None:
        return self.installed if server_name == "app.test" else None

    def lookup(self, server_name: str | None) -> Installed | None:
        return None


def _pump(client: ssl.SSLObject, c_in, c_out, server: ssl.SSLObject, s_in, s_out) -> None:
    """Move the records between the two ends until both handshakes are done."""
    for _ in range(10):
        done = 0
        for end in (client, server):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def test_handshake_and_data_through_the_c_bound_object(tmp_path: Path) -> None:
    ca = make_ca()
    now = datetime.now(UTC)
    cert, key = make_leaf(
        ca, ["app.test"], not_before=now - timedelta(hours=1), not_after=now + timedelta(days=1)
    )
    cert_file, key_file = write_pair(tmp_path, [cert, ca[0]], key)
    installed = fake_installed("app.test")
    installed = Installed(
        "app.test", server_context(cert_file, key_file), installed.info, cert_file, key_file
    )
    selector = CertificateSelector(OneCertificate(installed))

    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = selector.context.wrap_bio(s_in, s_out, server_side=True)
    assert isinstance(server, DirectSSLObject)
    # The methods the event loop calls per record are the C object's own.
    for name in ("read", "write", "pending", "do_handshake"):
        assert type(getattr(server, name)).__name__ == "builtin_function_or_method", name

    # Not create_default_context: from Python 3.13 it is X.509-strict, which this bare test CA
    # (no key identifiers) does not satisfy; the local CA's own certificates do.
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca[0].public_bytes(Encoding.PEM).decode())
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="app.test")
    _pump(client, c_in, c_out, server, s_in, s_out)

    assert server.tlsproxy_sni == "app.test"  # type: ignore[attr-defined]
    assert server.selected_alpn_protocol() is None  # the client offered none
    assert client.getpeercert()["subjectAltName"] == (("DNS", "app.test"),)
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    s_in.write(c_out.read())
    assert server.pending() == 0
    assert server.read(65536) == b"GET / HTTP/1.1\r\n\r\n"
    assert server.write(b"HTTP/1.1 200 OK\r\n\r\n") == 19
    c_in.write(s_out.read())
    assert client.read(1024) == b"HTTP/1.1 200 OK\r\n\r\n"
    buffer = bytearray(64)
    server.write(b"into a buffer")
    c_in.write(s_out.read())
    assert client.read(64, buffer) == 13


def test_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key = make_leaf(ca, ["app.test"])
    cert_file, _ = write_pair(tmp_path, [cert], key)
    key_file = tmp_path / "encrypted.key"
    key_file.write_bytes(encrypted_key_pem(key))
    # Without a password callback OpenSSL would read a passphrase from the terminal.
    with pytest.raises(ssl.SSLError) as caught:
        server_context(cert_file, key_file)
    assert str(caught.value) == ENCRYPTED_KEY_REASON  # the words `tlsproxy check` uses


def test_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    ca = make_ca()
    cert, _ = make_leaf(ca, ["app.test"])
    _, other_key = make_leaf(ca, ["other.test"])
    cert_file, key_file = write_pair(tmp_path, [cert], other_key)
    with pytest.raises(ssl.SSLError, match=r"KEY_VALUES_MISMATCH|key values mismatch"):
        server_context(cert_file, key_file)
