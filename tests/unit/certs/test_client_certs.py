"""Client certificates from the local CA (certs.client_certs), and certificate contexts of
client_auth sites (certs.manager). Files in a temporary data_dir; no sockets."""

from __future__ import annotations

import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.client_certs import (
    client_intermediate_files,
    issue_client_certificate,
    write_client_certificate,
)
from certs.crypto_worker import _decode_spec, _encode
from certs.errors import CertificateFileError, IssuanceError
from certs.manager import CertificateManager, check_client_ca
from certs.models import CertSpec, ClientAuthSpec
from certs.storage import Storage

from .factory import NOW, make_ca, make_leaf, write_pair


def clock() -> float:
    return NOW.timestamp()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake in memory (OpenSSL on both sides, no socket); the server's SSLObject."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="server.test")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, tls in (("client", tls_client), ("server", tls_server)):
            if not done[side]:
                try:
                    tls.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            tls_client.write(b"x")  # TLS 1.3: the server verifies what it read by now
            s_in.write(c_out.read())
            tls_server.read(1)
            return tls_server
    raise AssertionError("the handshake did not finish")


def verify_as_client(tmp_path: Path, chain_pem: bytes, key_pem: bytes, root: Path) -> str:
    """What OpenSSL makes of this client certificate for a server trusting `root`: the
    subject the server saw. Raises ssl.SSLError when it refuses it."""
    now = datetime.now(UTC)
    server_ca = make_ca("server CA")
    leaf, key = make_leaf(
        server_ca,
        ["server.test"],
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1),
    )
    cert_file, key_file = write_pair(tmp_path, [leaf], key, stem="server")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(root))
    (tmp_path / "client.pem").write_bytes(chain_pem)
    (tmp_path / "client.key").write_bytes(key_pem)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    peer = handshake(server, client).getpeercert()
    return ",".join(f"{k}={v}" for rdn in peer["subject"] for k, v in rdn)


def test_openssl_takes_it_as_a_client_certificate_for_the_root(tmp_path: Path) -> None:
    data = tmp_path / "data"
    chain_pem, key_pem = issue_client_certificate(data, "alice")
    root = Storage(data).ca_files().root_cert
    assert verify_as_client(tmp_path, chain_pem, key_pem, root) == "commonName=alice"
    leaf, inter = x509.load_pem_x509_certificates(chain_pem)
    for cert in (leaf, inter):
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Not the server intermediate: that one may sign server certificates only.
    server_inter = Storage(data).ca_files().intermediate_cert.read_bytes()
    assert inter != x509.load_pem_x509_certificate(server_inter)


def test_openssl_refuses_a_site_certificate_of_the_same_ca_as_a_client(tmp_path: Path) -> None:
    """Why a client intermediate: the server intermediate and its leaves say serverAuth."""
    from certs.issuers.local_ca import LocalCA
    from certs.keys import generate_private_key, make_csr, private_key_to_pem

    data = tmp_path / "data"
    ca = LocalCA.load_or_create(Storage(data))
    key = generate_private_key()
    chain = ca.issue(CertSpec("a.test", ("a.test",), "internal"), make_csr(key, ["a.test"]))
    root = Storage(data).ca_files().root_cert
    with pytest.raises(ssl.SSLError) as info:
        verify_as_client(tmp_path, chain, private_key_to_pem(key), root)
    assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"


def test_the_client_intermediate_is_kept_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first, _ = issue_client_certificate(data, "alice", clock=clock)
    second, _ = issue_client_certificate(data, "bob", clock=clock)
    assert x509.load_pem_x509_certificates(first)[1] == x509.load_pem_x509_certificates(second)[1]
    cert_file, key_file = client_intermediate_files(Storage(data))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert cert_file.exists()


def test_it_never_outlives_its_intermediate(tmp_path: Path) -> None:
    chain_pem, _ = issue_client_certificate(tmp_path / "d", "alice", clock=clock)
    leaf, inter = x509.load_pem_x509_certificates(chain_pem)
    assert leaf.not_valid_after_utc <= inter.not_valid_after_utc
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(days=366)


def test_a_client_certificate_of_another_local_ca_is_refused(tmp_path: Path) -> None:
    chain_pem, key_pem = issue_client_certificate(tmp_path / "one", "alice")
    issue_client_certificate(tmp_path / "two", "bob")
    other_root = Storage(tmp_path / "two").ca_files().root_cert
    with pytest.raises(ssl.SSLError) as info:
        verify_as_client(tmp_path, chain_pem, key_pem, other_root)
    assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"


def test_write_puts_a_0600_key_beside_the_chain(tmp_path: Path) -> None:
    cert_path, key_path = write_client_certificate(tmp_path / "data", "alice", tmp_path / "out")
    assert (cert_path, key_path) == (tmp_path / "out/alice.pem", tmp_path / "out/alice.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    context = ssl.create_default_context()
    context.load_cert_chain(cert_path, key_path)  # the key belongs to the certificate


@pytest.mark.parametrize("name", ["", ".hidden", "-flag", "a/b", "../x", "x" * 65, "é"])
def test_names_that_are_no_file_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(IssuanceError):
        write_client_certificate(tmp_path / "data", name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- client_auth sites' certificate contexts --------------------------------------------------


def factory(cert_file: Path, key_file: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
    return context


def test_an_internal_client_auth_site_context_holds_the_local_root(tmp_path: Path) -> None:
    manager = CertificateManager(tmp_path / "data", factory)
    auth = ClientAuthSpec("internal", required=True)
    specs = [
        CertSpec("a.test", ("a.test",), "internal", client_auth=auth),
        CertSpec("b.test", ("b.test",), "internal"),
    ]
    cache = manager.load(specs, None)
    a, b = cache.get("a.test"), cache.get("b.test")
    assert a is not None and b is not None
    assert a.client_auth == auth and b.client_auth is None
    assert a.context.cert_store_stats()["x509_ca"] == 1
    assert b.context.cert_store_stats()["x509_ca"] == 0


def test_a_files_site_with_client_auth_creates_the_local_ca_it_verifies_with(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    ca = make_ca()
    leaf, key = make_leaf(
        ca, ["f.test"], not_before=now - timedelta(days=1), not_after=now + timedelta(days=9)
    )
    cert_file, key_file = write_pair(tmp_path, [leaf, ca[0]], key)
    manager = CertificateManager(tmp_path / "data", factory)
    auth = ClientAuthSpec("internal")
    spec = CertSpec("f.test", ("f.test",), "files", cert_file, key_file, client_auth=auth)
    installed = manager.load([spec], None).get("f.test")
    assert Storage(tmp_path / "data").ca_files().root_cert.exists()
    assert installed is not None and installed.context.cert_store_stats()["x509_ca"] == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "file not found"),
        (b"hello", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n", "not PEM"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "TLS library"),
    ],
)
def test_a_bad_client_ca_file_is_named(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CertificateFileError) as info:
        check_client_ca(path)
    assert info.value.path == path and reason in info.value.reason


def test_the_crypto_worker_carries_client_auth(tmp_path: Path) -> None:
    for auth in (ClientAuthSpec("internal", True), ClientAuthSpec(tmp_path / "ca.pem", False)):
        spec = CertSpec("a.test", ("a.test",), "internal", client_auth=auth)
        assert _decode_spec(_encode(spec)) == spec
    plain = CertSpec("a.test", ("a.test",), "internal")
    assert _decode_spec(_encode(plain)) == plain
