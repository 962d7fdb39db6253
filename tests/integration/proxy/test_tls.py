"""TLS termination seen from real clients: openssl s_client, curl and Python's ssl.

Three sites on one listener: app.test (+ localhost) from the local CA, other.test from files made
here with `cryptography`, and *.wild.test from the local CA. Which certificate a ClientHello gets
is read back from what `openssl s_client` was actually served.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.integration.harness import AppProcess
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import (
    Issued,
    Proxy,
    dns_names,
    issue,
    make_ca,
    proxy_config,
    s_client,
    served_certificate,
)

CBC_CIPHERS = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:"
    "ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA256"
)
GCM_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"


def sni_config(upstream: str, cert: Path, key: Path, *, default_site: str | None) -> str:
    return proxy_config(
        [
            (["app.test", "localhost"], "app"),
            (["other.test"], "app", f'{{ cert = "{cert}", key = "{key}" }}'),
            (["*.wild.test"], "app"),
        ],
        {"app": upstream},
        default_site=default_site,
    )


@pytest.fixture(scope="module")
def files_ca() -> Issued:
    return make_ca("files test CA")


@pytest.fixture(scope="module")
def other_leaf(files_ca: Issued) -> Issued:
    return issue(files_ca, ["other.test"])


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory, files_ca: Issued) -> Path:
    directory = tmp_path_factory.mktemp("files")
    (directory / "files-ca.pem").write_bytes(files_ca.cert.public_bytes(serialization.Encoding.PEM))
    return directory


@pytest.fixture(scope="module")
def sni_proxy(
    make_module_proxy: MakeProxy, example_app: AppProcess, files_dir: Path, other_leaf: Issued
) -> Proxy:
    cert, key = other_leaf.write(files_dir, "other")
    return make_module_proxy(sni_config(example_app.server, cert, key, default_site="app.test"))


@pytest.fixture(scope="module")
def strict_proxy(
    make_module_proxy: MakeProxy, example_app: AppProcess, files_dir: Path, other_leaf: Issued
) -> Proxy:
    """The same sites without default_site: no SNI or an unknown name has no certificate."""
    cert, key = other_leaf.write(files_dir, "other-strict")
    return make_module_proxy(sni_config(example_app.server, cert, key, default_site=None))


def cert_for(proxy: Proxy, *args: str):  # type: ignore[no-untyped-def]
    return served_certificate(proxy.port, *args)


def test_each_sni_name_gets_its_own_sites_certificate(
    sni_proxy: Proxy, other_leaf: Issued, files_ca: Issued
) -> None:
    internal = cert_for(sni_proxy, "-servername", "app.test")
    assert internal is not None
    assert "app.test" in dns_names(internal)
    assert "other.test" not in dns_names(internal)
    assert internal.issuer != files_ca.cert.subject

    files = cert_for(sni_proxy, "-servername", "other.test")
    assert files is not None
    assert files.serial_number == other_leaf.cert.serial_number
    assert dns_names(files) == ["other.test"]

    # Names compare case-insensitively, and a trailing dot is ignored.
    for spelling in ("OTHER.Test", "other.test."):
        got = cert_for(sni_proxy, "-servername", spelling)
        assert got is not None and got.serial_number == other_leaf.cert.serial_number, spelling


def test_wildcard_covers_one_label_only(sni_proxy: Proxy) -> None:
    default = cert_for(sni_proxy, "-servername", "app.test")
    wild = cert_for(sni_proxy, "-servername", "a.wild.test")
    assert wild is not None
    assert "*.wild.test" in dns_names(wild)
    assert wild.serial_number != default.serial_number

    # Two labels deep and the bare parent are not covered: they get the default site's cert.
    for name in ("a.b.wild.test", "wild.test"):
        got = cert_for(sni_proxy, "-servername", name)
        assert got is not None, name
        assert got.serial_number == default.serial_number, name


def test_no_sni_and_unknown_names_get_the_default_site(sni_proxy: Proxy) -> None:
    default = cert_for(sni_proxy, "-servername", "app.test")
    no_sni = cert_for(sni_proxy, "-noservername")
    unknown = cert_for(sni_proxy, "-servername", "unknown.test")
    assert no_sni is not None and no_sni.serial_number == default.serial_number
    assert unknown is not None and unknown.serial_number == default.serial_number


def test_without_default_site_the_handshake_fails_and_is_logged(strict_proxy: Proxy) -> None:
    assert cert_for(strict_proxy, "-servername", "app.test") is not None  # the listener works
    mark = len(strict_proxy.log())
    # The client is told why: the unrecognized_name alert (112), as nginx's
    # ssl_reject_handshake sends it, not just a closed connection.
    for args in (("-noservername",), ("-servername", "unknown.test")):
        result = s_client(strict_proxy.port, *args)
        assert result.returncode != 0, args
        assert "SSL alert number 112" in result.stderr, (args, result.stderr)
    context = ssl.create_default_context(cafile=str(strict_proxy.ca))
    with (
        socket.create_connection(("127.0.0.1", strict_proxy.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError, match="TLSV1_UNRECOGNIZED_NAME"),
    ):
        context.wrap_socket(raw, server_hostname="unknown.test")
    # One debug line per refused handshake, naming the peer (three were refused above).
    refused = r"DEBUG tlsproxy\.tls: 127\.0\.0\.1:\d+: handshake failed"
    strict_proxy.wait_for_log(f"(?s)({refused}.*){{3}}", start=mark)
    tail = strict_proxy.log()[mark:]
    assert "Traceback" not in tail
    assert " ERROR " not in tail
    assert strict_proxy.proc.poll() is None


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_curl_trusts_the_local_ca_and_not_another(sni_proxy: Proxy, files_dir: Path) -> None:
    port = sni_proxy.port
    ok = curl(
        "--cacert", str(sni_proxy.ca), "--resolve", f"app.test:{port}:127.0.0.1",
        f"https://app.test:{port}/",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["message"] == "Hello from behind tlsproxy"

    wrong = curl(
        "--cacert", str(files_dir / "files-ca.pem"), "--resolve", f"app.test:{port}:127.0.0.1",
        f"https://app.test:{port}/",
    )  # fmt: skip
    assert wrong.returncode == 60, (wrong.returncode, wrong.stderr)  # peer certificate not trusted

    # The files site is trusted through its own CA, and only through it.
    files = curl(
        "--cacert", str(files_dir / "files-ca.pem"), "--resolve", f"other.test:{port}:127.0.0.1",
        f"https://other.test:{port}/healthz",
    )  # fmt: skip
    assert files.returncode == 0, files.stderr
    assert files.stdout == "ok"


HANDSHAKE_LINE = re.compile(
    r"handshake 127\.0\.0\.1:\d+ sni=app\.test cert='app\.test' subject='(?P<subject>[^']*)' "
    r"serial=(?P<serial>[0-9a-f]+) not_after=(?P<not_after>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) "
    r"version=(?P<version>TLSv1\.[23]) cipher=(?P<cipher>\S+) alpn=(?P<alpn>\S+) "
    r"resumed=(?P<resumed>yes|no)"
)


def test_debug_line_per_handshake_names_what_was_chosen(sni_proxy: Proxy) -> None:
    served = cert_for(sni_proxy, "-servername", "app.test")
    mark = len(sni_proxy.log())
    result = s_client(sni_proxy.port, "-servername", "app.test", "-tls1_2", "-alpn", "http/1.1")
    assert result.returncode == 0, result.stdout + result.stderr
    line = sni_proxy.wait_for_log(HANDSHAKE_LINE.pattern, start=mark)
    assert int(line["serial"], 16) == served.serial_number
    assert line["not_after"] == served.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "app.test" in line["subject"]
    assert line["version"] == "TLSv1.2"
    assert "GCM" in line["cipher"] or "CHACHA20" in line["cipher"]
    assert line["alpn"] == "http/1.1"
    assert line["resumed"] == "no"


def test_tls_1_1_is_refused(sni_proxy: Proxy) -> None:
    # SECLEVEL=0 so that it is the proxy, not this machine's OpenSSL policy, that refuses.
    old = s_client(
        sni_proxy.port, "-servername", "app.test", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"
    )
    assert old.returncode != 0
    assert "BEGIN CERTIFICATE" not in old.stdout
    for version in ("-tls1_2", "-tls1_3"):
        ok = s_client(sni_proxy.port, "-servername", "app.test", version)
        assert ok.returncode == 0, (version, ok.stdout + ok.stderr)


def test_tls_1_2_only_with_aead_ciphers(sni_proxy: Proxy) -> None:
    cbc = s_client(sni_proxy.port, "-servername", "app.test", "-tls1_2", "-cipher", CBC_CIPHERS)
    assert cbc.returncode != 0, cbc.stdout
    gcm = s_client(sni_proxy.port, "-servername", "app.test", "-tls1_2", "-cipher", GCM_CIPHERS)
    assert gcm.returncode == 0, gcm.stdout + gcm.stderr
    assert re.search(r"Cipher is ECDHE-\w+-AES128-GCM-SHA256", gcm.stdout)


@pytest.mark.parametrize("name", ["app.test", "other.test", "x.wild.test", "unknown.test"])
def test_alpn_prefers_h2_on_every_site(sni_proxy: Proxy, name: str) -> None:
    # OpenSSL asks for ALPN after the SNI callback moved the connection to the site's own
    # certificate context: each of those must offer h2 too (files, local CA, wildcard, default).
    both = s_client(sni_proxy.port, "-servername", name, "-alpn", "http/1.1,h2")
    assert both.returncode == 0
    assert "ALPN protocol: h2" in both.stdout
    http1 = s_client(sni_proxy.port, "-servername", name, "-alpn", "http/1.1")
    assert "ALPN protocol: http/1.1" in http1.stdout
    other = s_client(sni_proxy.port, "-servername", name, "-alpn", "spdy/3")
    assert "ALPN protocol" not in other.stdout  # nothing in common: none, as OpenSSL does


def test_session_resumption_works_and_is_logged(sni_proxy: Proxy) -> None:
    context = sni_proxy.context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # tickets arrive with the handshake

    def get(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool]:
        with (
            socket.create_connection(("127.0.0.1", sni_proxy.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="app.test", session=session) as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            return tls.session, tls.session_reused

    session, reused = get(None)
    assert not reused
    mark = len(sni_proxy.log())
    _, reused = get(session)
    assert reused
    sni_proxy.wait_for_log(r"handshake 127\.0\.0\.1:\d+ sni=app\.test .* resumed=yes", start=mark)


def _client_context(tls: str) -> ssl.SSLContext:
    """A client of one TLS version that does not check the certificate: only resumption is
    tested. A session resumes only through the context it came from."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    version = ssl.TLSVersion.TLSv1_3 if tls == "1.3" else ssl.TLSVersion.TLSv1_2
    context.minimum_version = context.maximum_version = version
    return context


def _fetch(  # type: ignore[no-untyped-def]
    port: int, context: ssl.SSLContext, name: str | None, session: ssl.SSLSession | None
):
    """One request on a new connection offering `session`: (the session to offer next time,
    whether this one resumed)."""
    host = name or "app.test"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name, session=session) as conn,
    ):
        conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data
        # Read after the response: TLS 1.3 tickets come after the handshake.
        return conn.session, conn.session_reused


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_every_site_resumes_and_a_reload_keeps_the_tickets(
    make_proxy: MakeProxy, example_app: AppProcess, files_dir: Path, other_leaf: Issued, tls: str
) -> None:
    cert, key = other_leaf.write(files_dir, f"other-resume-{tls}")
    config = sni_config(example_app.server, cert, key, default_site="app.test")
    proxy = make_proxy(config)
    client = _client_context(tls)
    # Each name goes through the SNI callback's switch to its own site's context: the local
    # CA's, a files certificate, a wildcard, and the default site for a client without SNI.
    names = ["app.test", "other.test", "a.wild.test", None]
    sessions = {}
    for name in names:
        session, reused = _fetch(proxy.port, client, name, None)
        assert not reused
        sessions[name], reused = _fetch(proxy.port, client, name, session)
        assert reused, f"{name} did not resume over TLS {tls}"

    mark = len(proxy.log())
    proxy.signal(signal.SIGHUP)  # the same config: nothing changes for any certificate
    proxy.wait_for_log(r"reloaded", start=mark, timeout=30)
    for name in names:
        _, reused = _fetch(proxy.port, client, name, sessions[name])
        assert reused, f"{name}: a ticket from before the reload did not resume over TLS {tls}"


def test_a_restart_forgets_the_tickets(
    make_proxy: MakeProxy, example_app: AppProcess, files_dir: Path, other_leaf: Issued
) -> None:
    # What the README says of a restart: the ticket keys live in the process, so a new process
    # (the same config, the same certificates) cannot read the old tickets: full handshakes.
    cert, key = other_leaf.write(files_dir, "other-restart")
    config = sni_config(example_app.server, cert, key, default_site="app.test")
    first, second = make_proxy(config), make_proxy(config)
    client = _client_context("1.3")
    session, _ = _fetch(first.port, client, "app.test", None)
    _, reused = _fetch(first.port, client, "app.test", session)
    assert reused
    _, reused = _fetch(second.port, client, "app.test", session)
    assert not reused
