"""Issue 3: a tls = "acme" site with no certificate yet (its CA unreachable here) fails its
handshakes, even with a default_site, instead of showing a certificate for another name; the
other sites keep being served, and the failure is logged clearly."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.integration.harness import ProxyProcess, free_port, local_ca, write_config


def handshake(port: int, name: str, root: Path) -> str:
    """The first DNS name of the certificate served for `name` (verified against the root)."""
    context = ssl.create_default_context(cafile=str(root))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            cert = tls.getpeercert()
    return next(value for kind, value in cert["subjectAltName"] if kind == "DNS")


def test_an_acme_site_without_a_certificate_fails_rather_than_showing_another(
    tmp_path: Path,
) -> None:
    unreachable = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens: orders keep failing
    config = write_config(
        tmp_path,
        f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
default_site = "localhost"

[[site]]
hosts = ["localhost"]
tls = "internal"
upstream = "app"

[[site]]
hosts = ["shop.test"]
tls = "acme"
upstream = "app"

[upstream.app]
servers = ["127.0.0.1:{free_port()}"]

[acme]
directory = "{unreachable}"
email = "ops@example.test"
""",
    )
    proxy = ProxyProcess(config).start()
    try:
        root = local_ca(tmp_path, config)
        assert handshake(proxy.port, "localhost", root) == "localhost"
        assert handshake(proxy.port, "unknown.test", root) == "localhost"  # not a site: default
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(proxy.port, "shop.test", root)
        proxy.wait_for_log(r"no certificate yet for shop\.test", timeout=10)
        assert "Traceback" not in proxy.log()
    finally:
        proxy.stop()
