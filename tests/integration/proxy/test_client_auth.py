"""Mutual TLS (`[[site]] client_auth`) seen from real clients: curl, openssl s_client, httpx and
Python's ssl, against `tlsproxy run` in front of examples/app.py (whose GET / echoes the
request headers it got).

One listener, five sites: req.test requires a certificate from the local CA, opt.test asks for
one, path.test requires one from a CA made here (`ca = PATH`), open.test asks for none and is
the default site (no SNI), and localhost too asks for none. Client certificates come from
`tlsproxy ca --client`. The bypass tests try to reach a client_auth site's upstream without
its handshake: no SNI, another site's SNI, an optional site's connection, a split ClientHello,
a reload between handshake and request.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.harness import AppProcess, tlsproxy, write_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    Issued,
    Proxy,
    curl_to,
    make_ca,
    s_client,
    served_certificate_in,
)

CLIENT_CERT_REQUIRED = "alert certificate required"


# --- certificates -------------------------------------------------------------------------------


def client_certificate(config: Path, name: str, out: Path) -> tuple[Path, Path]:
    """`tlsproxy ca -c CONFIG --client NAME --out OUT`: the paths of NAME.pem and NAME.key."""
    result = tlsproxy("ca", "-c", str(config), "--client", name, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out / f"{name}.pem", out / f"{name}.key"


def foreign_client(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str):
    """A client certificate (EKU clientAuth) signed by a CA of the test's own."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def pem_ders(path: Path) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(path.read_bytes())
    ]


# --- the proxy ----------------------------------------------------------------------------------


def mtls_config(upstream: str, path_ca: Path, *, server: str = "", local_ca: str = "") -> str:
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "open.test"
trusted_proxies = ["127.0.0.2"]
shutdown_grace = "2s"
{server}

[limits]
handshake_timeout = "5s"

[local_ca]
{local_ca}

[[site]]
hosts = ["req.test"]
upstream = "app"
client_auth = {{ ca = "internal", required = true }}

[[site]]
hosts = ["opt.test"]
upstream = "app"
client_auth = {{ ca = "internal", required = false }}

[[site]]
hosts = ["path.test"]
upstream = "app"
client_auth = {{ ca = "{path_ca}" }}

[[site]]
hosts = ["open.test", "localhost"]
upstream = "app"

[upstream.app]
servers = ["{upstream}"]
"""


def context_for(proxy: Proxy, cert: tuple[Path, Path] | None = None, *, tls12: bool = False):
    context = ssl.create_default_context(cafile=str(proxy.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def get(
    proxy: Proxy,
    sni: str | None,
    host: str,
    cert: tuple[Path, Path] | None = None,
    headers: bytes = b"",
    source: str | None = None,
) -> tuple[int, dict]:
    """One GET / over Python's ssl: (status, the app's echo of what it got, or {})."""
    context = context_for(proxy, cert)
    if sni is None:
        context.check_hostname = False
    raw = socket.create_connection(
        ("127.0.0.1", proxy.port), timeout=10, source_address=(source, 0) if source else None
    )
    with context.wrap_socket(raw, server_hostname=sni) as tls:
        request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n"
        tls.sendall(request % (host.encode(), headers))
        return parse_reply(read_all(tls))


@dataclass
class Env:
    proxy: Proxy
    alice: tuple[Path, Path]  # from `tlsproxy ca --client`
    bob: tuple[Path, Path]  # from path.test's CA
    mallory: tuple[Path, Path]  # from a CA nobody trusts
    path_ca_cert: x509.Certificate

    @property
    def port(self) -> int:
        return self.proxy.port

    def curl(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        # curl's default, h2: it sends its preface right after the handshake, before it reads
        # the alert of a refused certificate (see tls._linger_after_alert).
        return curl_to(self.port, self.proxy.ca, host, "--http2", *args)

    def context(self, cert: tuple[Path, Path] | None = None, *, tls12: bool = False):
        return context_for(self.proxy, cert, tls12=tls12)

    def get(self, sni: str | None, host: str, cert=None, headers=b"", source=None):
        return get(self.proxy, sni, host, cert, headers, source)


def read_all(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = tls.recv(65536)
        except ssl.SSLEOFError:
            break
        if not chunk:
            break
        data += chunk
    return data


def one_response(tls: ssl.SSLSocket) -> bytes:
    """One response with a Content-Length off a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += tls.recv(65536)
    return data


def parse_reply(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if status == 200 else {}


def seen(echo: dict, name: str) -> list[str]:
    """The values of header `name` as the app got them."""
    return [value for key, value in echo["headers"] if key == name]


@pytest.fixture(scope="module")
def env(
    make_module_proxy: MakeProxy, example_app: AppProcess, tmp_path_factory: pytest.TempPathFactory
) -> Env:
    files = tmp_path_factory.mktemp("client-certs")
    ca = make_ca("mtls test clients CA")
    ca_file = files / "clients-ca.pem"
    ca_file.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    proxy = make_module_proxy(mtls_config(example_app.server, ca_file))
    other = make_ca("a CA nobody trusts")
    return Env(
        proxy=proxy,
        alice=client_certificate(proxy.config_file, "alice", files),
        bob=Issued(*foreign_client(ca.cert, ca.key, "bob")).write(files, "bob"),
        mallory=Issued(*foreign_client(other.cert, other.key, "m")).write(files, "mallory"),
        path_ca_cert=ca.cert,
    )


# --- required -----------------------------------------------------------------------------------


def test_required_without_a_certificate_curl_hears_certificate_required(env: Env) -> None:
    result = env.curl("req.test")
    assert result.returncode != 0
    assert CLIENT_CERT_REQUIRED in result.stderr, result.stderr


def test_required_without_a_certificate_openssl_tls13_reads_alert_116(env: Env) -> None:
    result = s_client(env.port, "-tls1_3", "-servername", "req.test", "-ign_eof")
    assert "alert certificate required" in result.stdout + result.stderr
    assert "SSL alert number 116" in result.stdout + result.stderr


def test_required_without_a_certificate_python_ssl_error(env: Env) -> None:
    with pytest.raises(ssl.SSLError) as info:
        env.get("req.test", "req.test")
    assert info.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def test_required_without_a_certificate_tls12_handshake_failure(env: Env) -> None:
    # OpenSSL's answer in TLS 1.2 (no certificate_required alert there): handshake_failure.
    result = s_client(env.port, "-tls1_2", "-servername", "req.test")
    assert "alert handshake failure" in result.stdout + result.stderr
    with pytest.raises(ssl.SSLError) as info:
        raw = socket.create_connection(("127.0.0.1", env.port), timeout=10)
        env.context(tls12=True).wrap_socket(raw, server_hostname="req.test").close()
    assert info.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


def test_required_with_the_local_cas_client_certificate_the_app_learns_who(env: Env) -> None:
    result = env.curl("req.test", "--cert", str(env.alice[0]), "--key", str(env.alice[1]))
    assert result.returncode == 0, result.stderr
    echo = json.loads(result.stdout)
    (leaf,) = seen(echo, "client-cert")
    (chain,) = seen(echo, "client-cert-chain")
    # RFC 9440: sf-binary DER; the chain without the leaf, each one certifying the one before.
    leaf_der = base64.b64decode(leaf.strip(":"), validate=True)
    chain_ders = [base64.b64decode(i.strip().strip(":"), validate=True) for i in chain.split(",")]
    sent = pem_ders(env.alice[0])  # the leaf, then the client intermediate
    root = pem_ders(env.proxy.ca)
    assert leaf_der == sent[0]
    assert chain_ders == [sent[1], *root]
    subject = x509.load_der_x509_certificate(leaf_der).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"


def test_required_httpx_with_and_without_a_client_certificate(env: Env) -> None:
    def fetch(context: ssl.SSLContext) -> httpx.Response:
        with httpx.Client(verify=context, timeout=10) as client:
            return client.get(
                f"https://127.0.0.1:{env.port}/",
                headers={"host": "req.test"},
                extensions={"sni_hostname": "req.test"},
            )

    response = fetch(env.context(env.alice))
    assert response.status_code == 200
    (leaf,) = seen(response.json(), "client-cert")
    cert = x509.load_der_x509_certificate(base64.b64decode(leaf.strip(":")))
    assert cert.subject.rfc4514_string() == "CN=alice"
    with pytest.raises(httpx.HTTPError) as info:
        fetch(env.context())
    assert "CERTIFICATE_REQUIRED" in str(info.value)


def test_over_http2_every_stream_carries_the_verified_certificate(env: Env) -> None:
    # The certificate is read once per connection; each HTTP/2 stream's request gets its lines,
    # and a client's own Client-Cert fields are replaced, as over HTTP/1.1.
    with httpx.Client(verify=env.context(env.alice), timeout=10, http2=True) as client:
        responses = [
            client.get(
                f"https://127.0.0.1:{env.port}/",
                headers={"host": "req.test", "client-cert": ":c3Bvb2Y=:"},
                extensions={"sni_hostname": "req.test"},
            )
            for _ in range(3)
        ]
    for response in responses:
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        (leaf,) = seen(response.json(), "client-cert")
        cert = x509.load_der_x509_certificate(base64.b64decode(leaf.strip(":")))
        assert cert.subject.rfc4514_string() == "CN=alice"


def test_required_with_a_certificate_from_another_ca_is_refused(env: Env) -> None:
    result = env.curl("req.test", "--cert", str(env.mallory[0]), "--key", str(env.mallory[1]))
    assert result.returncode != 0
    assert "alert unknown ca" in result.stderr, result.stderr
    result = s_client(
        env.port,
        "-tls1_3",
        "-servername",
        "req.test",
        "-cert",
        str(env.mallory[0]),
        "-key",
        str(env.mallory[1]),
        "-ign_eof",
    )
    assert "alert unknown ca" in result.stdout + result.stderr


def test_a_server_certificate_of_the_local_ca_is_no_client_certificate(env: Env) -> None:
    # The local CA's site leaves chain to the same root but say serverAuth only.
    site_cert = env.proxy.dir / "data" / "certificates" / "req.test" / "cert.pem"
    site_key = site_cert.with_name("key.pem")
    result = env.curl("req.test", "--cert", str(site_cert), "--key", str(site_key))
    assert result.returncode != 0
    assert "alert unsupported certificate" in result.stderr, result.stderr


# --- optional -----------------------------------------------------------------------------------


def test_optional_without_a_certificate_is_served_without_the_headers(env: Env) -> None:
    status, echo = env.get("opt.test", "opt.test")
    assert status == 200
    assert seen(echo, "client-cert") == [] and seen(echo, "client-cert-chain") == []


def test_optional_with_a_valid_certificate_passes_it_on(env: Env) -> None:
    status, echo = env.get("opt.test", "opt.test", env.alice)
    assert status == 200
    (leaf,) = seen(echo, "client-cert")
    assert base64.b64decode(leaf.strip(":")) == pem_ders(env.alice[0])[0]


def test_optional_with_an_invalid_certificate_is_refused(env: Env) -> None:
    result = env.curl("opt.test", "--cert", str(env.mallory[0]), "--key", str(env.mallory[1]))
    assert result.returncode != 0
    assert "alert unknown ca" in result.stderr, result.stderr


# --- ca = PATH ----------------------------------------------------------------------------------


def test_a_ca_file_site_takes_its_own_clients_only(env: Env) -> None:
    status, echo = env.get("path.test", "path.test", env.bob)
    assert status == 200
    (chain,) = seen(echo, "client-cert-chain")
    assert base64.b64decode(chain.strip(":")) == env.path_ca_cert.public_bytes(
        serialization.Encoding.DER
    )
    result = env.curl("path.test", "--cert", str(env.alice[0]), "--key", str(env.alice[1]))
    assert "alert unknown ca" in result.stderr, result.stderr
    status, _ = env.get("req.test", "req.test", env.alice)
    assert status == 200
    with pytest.raises(ssl.SSLError):
        env.get("req.test", "req.test", env.bob)


# --- headers a client sends ---------------------------------------------------------------------

SPOOF = b"Client-Cert: :c3Bvb2Y=:\r\nClient-Cert-Chain: :c3Bvb2Y=:\r\n"


def test_spoofed_headers_never_reach_the_app_of_a_site_without_client_auth(env: Env) -> None:
    status, echo = env.get("open.test", "open.test", headers=SPOOF)
    assert status == 200
    assert seen(echo, "client-cert") == [] and seen(echo, "client-cert-chain") == []


def test_spoofed_headers_are_replaced_by_the_verified_certificate(env: Env) -> None:
    status, echo = env.get("req.test", "req.test", env.alice, headers=SPOOF)
    assert status == 200
    (leaf,) = seen(echo, "client-cert")
    assert base64.b64decode(leaf.strip(":")) == pem_ders(env.alice[0])[0]
    status, echo = env.get("opt.test", "opt.test", headers=SPOOF)
    assert seen(echo, "client-cert") == []


def test_a_trusted_proxys_headers_are_kept(env: Env) -> None:
    status, echo = env.get("open.test", "open.test", headers=SPOOF, source="127.0.0.2")
    assert status == 200
    assert seen(echo, "client-cert") == [":c3Bvb2Y=:"]
    assert seen(echo, "client-cert-chain") == [":c3Bvb2Y=:"]


# --- one port, sites that ask and sites that do not ---------------------------------------------


def certificate_requests(port: int, name: str | None) -> int:
    # The CertificateRequest is in the server's first flight: no need to wait for more.
    args = ["-tls1_3", "-msg", *(["-servername", name] if name else ["-noservername"])]
    result = s_client(port, *args)
    return (result.stdout + result.stderr).count("CertificateRequest")


def test_only_client_auth_sites_send_a_certificate_request(env: Env) -> None:
    assert certificate_requests(env.port, "open.test") == 0
    assert certificate_requests(env.port, "localhost") == 0
    assert certificate_requests(env.port, None) == 0  # the default site
    assert certificate_requests(env.port, "req.test") == 1
    assert certificate_requests(env.port, "opt.test") == 1


# --- bypasses: a client_auth site's upstream without its handshake -------------------------------


def test_no_sni_then_a_host_of_a_client_auth_site_is_misdirected(env: Env) -> None:
    assert env.get(None, "req.test") == (421, {})
    assert env.get(None, "open.test")[0] == 200


def test_another_sites_sni_then_a_client_auth_host_is_misdirected(env: Env) -> None:
    assert env.get("open.test", "req.test") == (421, {})
    # An optional site's connection without a certificate does not open the required site.
    assert env.get("opt.test", "req.test") == (421, {})
    # Nor one with a certificate: it was verified for opt.test's client_auth, not req.test's.
    assert env.get("opt.test", "req.test", env.alice) == (421, {})


def handshake_in_pieces(
    port: int, context: ssl.SSLContext, sni: str, *, record: int | None, segment: int | None
) -> bytes:
    """A handshake driven by hand, whose ClientHello is cut into TLS records of `record` bytes
    and sent in TCP segments of `segment` bytes, 20 ms apart; then GET / and the raw reply."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        if record is not None:
            message, hello = hello[5:], b""
            for i in range(0, len(message), record):
                piece = message[i : i + record]
                hello += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
        step = segment or len(hello)
        for i in range(0, len(hello), step):
            sock.sendall(hello[i : i + step])
            time.sleep(0.02)
        reply = b""
        done = False
        while True:
            if not done:
                try:
                    tls.do_handshake()
                    done = True
                    tls.write(
                        b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % sni.encode()
                    )
                except ssl.SSLWantReadError:
                    pass
            else:
                try:
                    while chunk := tls.read(65536):
                        reply += chunk
                    return reply  # the server's close_notify
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return reply
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                try:
                    reply += tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    pass
                return reply
            incoming.write(data)
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("record", "segment"), [(None, 7), (40, None), (40, 3)], ids=["tcp", "records", "both"]
)
def test_a_client_hello_in_pieces_is_still_asked_for_a_certificate(
    env: Env, record: int | None, segment: int | None
) -> None:
    with pytest.raises(ssl.SSLError) as info:
        handshake_in_pieces(env.port, env.context(), "req.test", record=record, segment=segment)
    assert info.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    reply = handshake_in_pieces(
        env.port, env.context(env.alice), "req.test", record=record, segment=segment
    )
    status, echo = parse_reply(reply)
    assert status == 200
    assert seen(echo, "client-cert")


def oversized_client_hello(context: ssl.SSLContext, sni: str) -> bytes:
    """A real ClientHello for `sni`, grown past what the peek parses (64 KiB; OpenSSL takes up
    to 128 KiB) with unknown cipher suites and an unknown extension, in 16000-byte records."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    body = outgoing.read()[9:]  # one record: its header (5) and the handshake header (4)
    at = 34 + 1 + body[34]
    suites_end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    suites = body[at + 2 : suites_end] + b"\x0a\x0a" * 30000  # GREASE: ignored by servers
    at = suites_end + 1 + body[suites_end]
    extensions = body[at + 2 :] + b"\x7a\x7a" + (10000).to_bytes(2, "big") + bytes(10000)
    body = (
        body[: 34 + 1 + body[34]]
        + len(suites).to_bytes(2, "big")
        + suites
        + body[suites_end:at]
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    assert len(message) > 64 * 1024
    return b"".join(
        b"\x16\x03\x01" + len(message[i : i + 16000]).to_bytes(2, "big") + message[i : i + 16000]
        for i in range(0, len(message), 16000)
    )


def test_a_client_hello_the_peek_cannot_read_is_refused_for_a_client_auth_site(env: Env) -> None:
    """Fail closed: the peek gives up on this hello, so the connection starts without asking
    for a certificate; OpenSSL still reads the name, and the SNI callback refuses it."""
    for name, refused in (("req.test", True), ("open.test", False)):
        with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
            sock.sendall(oversized_client_hello(env.context(), name))
            first = sock.recv(7)
        if refused:
            assert first == bytes((21, 3, 3, 0, 2, 2, 40))  # alert: fatal handshake_failure
        else:
            assert first[:1] == b"\x16"  # a ServerHello: served, nothing asked


def test_a_client_that_stalls_mid_hello_is_dropped_at_handshake_timeout(env: Env) -> None:
    hello_start = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    with socket.create_connection(("127.0.0.1", env.port), timeout=15) as sock:
        sock.sendall(hello_start)
        started = time.monotonic()
        try:
            assert sock.recv(100) == b""  # closed, nothing sent
        except ConnectionResetError:
            pass  # closed with the unread hello in its buffer: a reset
        assert 4 <= time.monotonic() - started < 10  # limits.handshake_timeout = 5s
    assert env.get("req.test", "req.test", env.alice)[0] == 200  # the loop was never blocked


def test_plain_http_to_the_port_still_gets_its_400(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: req.test\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


# --- tlsproxy ca --client, tlsproxy check -------------------------------------------------------


def test_ca_client_writes_a_chain_and_a_private_key(env: Env, tmp_path: Path) -> None:
    result = tlsproxy("ca", "-c", str(env.proxy.config_file), "--client", "carol", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cert, key = tmp_path / "carol.pem", tmp_path / "carol.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    chain = x509.load_pem_x509_certificates(cert.read_bytes())
    assert len(chain) == 2
    assert chain[0].subject.rfc4514_string() == "CN=carol"
    eku = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(env.proxy.ca),
            "-untrusted",
            str(cert),
            "-purpose",
            "sslclient",
            str(cert),
        ],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "--client NAME" in tlsproxy("ca", "--help").stdout


@pytest.mark.parametrize("name", ["../evil", ".hidden", "", "a/b"])
def test_ca_client_refuses_names_that_are_no_file_names(
    env: Env, tmp_path: Path, name: str
) -> None:
    result = tlsproxy("ca", "-c", str(env.proxy.config_file), "--client", name, cwd=tmp_path)
    assert result.returncode == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "file not found"),
        ("directory", "is a directory"),
        ("not a certificate\n", "no PEM certificate"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "not PEM"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "TLS library"),
    ],
)
def test_check_names_a_bad_client_ca_file(tmp_path: Path, content: str | None, reason: str) -> None:
    ca_file = tmp_path / "clients.pem"
    if content == "directory":
        ca_file.mkdir()
    elif content is not None:
        ca_file.write_text(content)
    config = write_config(tmp_path, mtls_config("127.0.0.1:9", ca_file))
    result = tlsproxy("check", "-c", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "site[2].client_auth.ca" in result.stderr
    assert reason in result.stderr


def test_check_shows_client_auth(env: Env) -> None:
    result = tlsproxy("check", "-c", str(env.proxy.config_file))
    assert result.returncode == 0, result.stderr
    assert "site req.test: tls=internal client_auth=internal (required)" in result.stdout


# --- SIGHUP, renewal, the asyncio event loop ----------------------------------------------------


def reload(proxy: Proxy, config_text: str) -> None:
    mark = len(proxy.log())
    proxy.config_file.write_text(config_text)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded|reload failed", start=mark)
    assert "reload failed" not in proxy.log()[mark:], proxy.log()[mark:]


ONE_SITE = """
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
shutdown_grace = "2s"
[local_ca]
{local_ca}
[[site]]
hosts = ["app.test"]
upstream = "app"
{client_auth}
[upstream.app]
servers = ["{upstream}"]
"""


def one_site(upstream: str, client_auth: str = "", local_ca: str = "") -> str:
    return ONE_SITE.format(upstream=upstream, client_auth=client_auth, local_ca=local_ca)


def app_test(proxy: Proxy, cert: tuple[Path, Path] | None = None) -> int:
    return get(proxy, "app.test", "app.test", cert)[0]


REQUIRE = 'client_auth = { ca = "internal" }'


def test_sighup_adds_and_removes_client_auth_for_new_connections(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    proxy = make_proxy(one_site(example_app.server))
    alice = client_certificate(proxy.config_file, "alice", tmp_path)
    assert app_test(proxy) == 200
    # A keep-alive connection made before the reload, without a certificate.
    early = ssl.create_default_context(cafile=str(proxy.ca)).wrap_socket(
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10), server_hostname="app.test"
    )
    try:
        early.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert one_response(early).startswith(b"HTTP/1.1 200")

        reload(proxy, one_site(example_app.server, REQUIRE))
        with pytest.raises(ssl.SSLError) as info:
            app_test(proxy)
        assert info.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        assert app_test(proxy, alice) == 200
        # An open connection keeps the rules it started with, as for the rest of a reload
        # (it ends at idle_timeout); client_auth applies to new connections.
        early.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert one_response(early).startswith(b"HTTP/1.1 200")
    finally:
        early.close()

    reload(proxy, one_site(example_app.server))
    assert app_test(proxy) == 200
    assert certificate_requests(proxy.port, "app.test") == 0


def test_a_renewed_server_certificate_keeps_client_auth(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    proxy = make_proxy(one_site(example_app.server, REQUIRE, 'leaf_lifetime = "12s"'))
    alice = client_certificate(proxy.config_file, "alice", tmp_path)
    first = proxy.wait_for_log(r"issued certificate for app\.test by local CA: serial (\w+)")
    renewed = proxy.wait_for_log(
        r"issued certificate for app\.test by local CA: serial (\w+)", timeout=30, start=first.end()
    )
    assert renewed.group(1) != first.group(1)
    # -cert sends the leaf alone; its issuer (the client intermediate) is in the same file.
    alice_args = ("-cert", str(alice[0]), "-cert_chain", str(alice[0]), "-key", str(alice[1]))
    result = s_client(proxy.port, "-servername", "app.test", *alice_args)
    served = served_certificate_in(result)
    why = f"s_client {result.returncode}: {result.stderr[-600:]}\nproxy log:\n{proxy.log()[-3000:]}"
    assert served is not None, why
    # Renewals go on every few seconds: the one served is the one logged last before it.
    serials = re.findall(r"issued certificate for app\.test by local CA: serial (\w+)", proxy.log())
    assert f"{served.serial_number:x}" in [x.lower().lstrip("0") for x in serials[1:]], why
    with pytest.raises(ssl.SSLError):
        app_test(proxy)
    assert app_test(proxy, alice) == 200


def test_the_asyncio_event_loop_sends_the_alert_too(
    example_app: AppProcess, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "asyncio", one_site(example_app.server, REQUIRE))
    proxy = Proxy(config, loop="asyncio")
    proxy.start()
    try:
        alice = client_certificate(config, "alice", tmp_path)
        with pytest.raises(ssl.SSLError) as info:
            app_test(proxy)
        assert info.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        assert app_test(proxy, alice) == 200
    finally:
        proxy.stop()


def test_resumed_sessions_keep_the_certificate_and_its_chain(env: Env) -> None:
    context = env.context(env.alice)
    replies = []
    session = None
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", env.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="req.test", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: req.test\r\nConnection: close\r\n\r\n")
            replies.append((tls.session_reused, parse_reply(read_all(tls))))
            session = tls.session
    (first_reused, (_, first)), (second_reused, (status, second)) = replies
    assert not first_reused and second_reused and status == 200
    assert seen(second, "client-cert") == seen(first, "client-cert")
    assert seen(second, "client-cert-chain") == seen(first, "client-cert-chain")


def test_a_ticket_of_one_site_does_not_resume_on_another(env: Env) -> None:
    context = env.context(env.alice)
    raw = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="opt.test") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: opt.test\r\nConnection: close\r\n\r\n")
        read_all(tls)
        session = tls.session
    # The same client, its opt.test session offered to req.test: a full handshake instead.
    raw = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="req.test", session=session) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: req.test\r\nConnection: close\r\n\r\n")
        status, _ = parse_reply(read_all(tls))
        assert not tls.session_reused and status == 200


# --- through the testing API ----------------------------------------------------------------------


def test_the_testing_api_client_cert_reaches_a_client_auth_site(example_app: AppProcess) -> None:
    from proxy.testing import TLSProxy

    site = {"client_auth": {"ca": "internal", "required": True}}
    with TLSProxy(upstream=example_app.server, hosts=["api.test"], site=site) as p:
        alice = p.client_cert("alice")
        with p.client(cert=alice) as client:
            echo = client.get(p.url("api.test", "/")).json()
        (leaf,) = seen(echo, "client-cert")
        cert = x509.load_der_x509_certificate(base64.b64decode(leaf.strip(":")))
        assert cert.subject.rfc4514_string() == "CN=alice"
        with p.client() as client, pytest.raises(httpx.HTTPError):
            client.get(p.url("api.test", "/"))
