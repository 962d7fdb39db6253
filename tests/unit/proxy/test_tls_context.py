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
from proxy import tls
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
    # The methods the event loop calls per record are the C object's own, but for read (the
    # client's close_notify) and do_handshake (plain HTTP on the TLS port).
    for name in ("write", "pending"):
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


def _connected_pair(tmp_path: Path) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    ca = make_ca()
    now = datetime.now(UTC)
    cert, key = make_leaf(
        ca, ["app.test"], not_before=now - timedelta(hours=1), not_after=now + timedelta(days=1)
    )
    cert_file, key_file = write_pair(tmp_path, [cert, ca[0]], key)
    base = fake_installed("app.test")
    installed = Installed(
        "app.test", server_context(cert_file, key_file), base.info, cert_file, key_file
    )
    selector = CertificateSelector(OneCertificate(installed))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s_in, s_out, c_in, c_out = bios
    server = selector.context.wrap_bio(s_in, s_out, server_side=True)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca[0].public_bytes(Encoding.PEM).decode())
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="app.test")
    _pump(client, c_in, c_out, server, s_in, s_out)
    return server, client, bios


def test_close_notify_is_reported_once_and_then_reads_wait(tmp_path: Path) -> None:
    server, client, (s_in, s_out, c_in, c_out) = _connected_pair(tmp_path)
    told: list[bool] = []
    server.on_close_notify = lambda: told.append(True)  # type: ignore[attr-defined]
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    try:
        client.unwrap()  # the client's close_notify, right behind its request
    except ssl.SSLWantReadError:
        pass
    s_in.write(c_out.read())
    assert server.read(65536) == b"GET / HTTP/1.1\r\n\r\n"
    with pytest.raises(ssl.SSLWantReadError):
        server.read(65536)  # not b"": the TLS layer must not shut down on it
    assert told == [True]
    assert s_in.pending == 1  # the byte that keeps the TLS layer from reading the FIN
    with pytest.raises(ssl.SSLWantReadError):
        server.read(65536)
    assert told == [True]
    # The response still goes out, and the client reads it after its own close_notify.
    server.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    c_in.write(s_out.read())
    assert client.read(1024) == b"HTTP/1.1 204 No Content\r\n\r\n"
    # Then the server's close_notify completes the shutdown OpenSSL knows is under way.
    server.unwrap()
    c_in.write(s_out.read())
    client.unwrap()


def test_without_a_listener_close_notify_ends_reading_as_before(tmp_path: Path) -> None:
    server, client, (s_in, _, _, c_out) = _connected_pair(tmp_path)
    try:
        client.unwrap()
    except ssl.SSLWantReadError:
        pass
    s_in.write(c_out.read())
    assert server.read(65536) == b""


def test_plain_http_instead_of_a_client_hello_is_answered_in_clear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written: list[bytes] = []
    monkeypatch.setattr(tls, "_write_before_tls", written.append)
    selector = CertificateSelector(OneCertificate(fake_installed("app.test")))
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = selector.context.wrap_bio(s_in, s_out, server_side=True)
    s_in.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    with pytest.raises(ssl.SSLError) as raised:
        server.do_handshake()
    assert raised.value.reason == "HTTP_REQUEST"
    assert written == [tls.PLAIN_HTTP_ON_TLS_PORT]
    assert written[0].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    # A real ClientHello that fails for another reason writes nothing.
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = selector.context.wrap_bio(s_in, s_out, server_side=True)
    s_in.write(b"\x16\x03\x01\x00\x05hello")
    with pytest.raises(ssl.SSLError):
        server.do_handshake()
    assert len(written) == 1
