"""`tlsproxy reverse-proxy` with a public name: ACME, from real Pebble standing in for Let's
Encrypt (--directory, --ca-bundle), the http-01 challenge answered on --http-port, and curl
trusting Pebble's root reaching the app. named serves example.com on loopback, so the name is
one the command sends to ACME (not *.test) yet resolves to 127.0.0.1 for Pebble."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import AppProcess, ProxyProcess, free_port, running

EXAMPLE_COM = """\
$ORIGIN example.com.
$TTL 5
@    IN SOA ns.example.com. hostmaster.example.com. ( 1 60 60 3600 5 )
     IN NS  ns.example.com.
ns   IN A   127.0.0.1
app  IN A   127.0.0.1
"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_a_public_name_gets_its_certificate_over_acme(components, tmp_path: Path) -> None:
    c = components(zones={"example.com": EXAMPLE_COM})
    port = free_port()
    data = tmp_path / "data"
    with running(AppProcess(tmp_path)) as app:
        proxy = ProxyProcess(
            tmp_path / "reverse-proxy",
            log_level="info",
            command=[
                "reverse-proxy",
                "--from",
                f"app.example.com:{port}",
                "--to",
                app.server,
                "--http-port",
                str(c.http_port),
                "--directory",
                c.directory,
                "--ca-bundle",
                str(c.tls.ca),
                "--email",
                "ops@example.com",
                "--data-dir",
                str(data),
            ],
        )
        try:
            proxy.start()
            proxy.wait_for_log(r"certificate for app\.example\.com issued", 30)
            assert f"app.example.com: certificate over ACME from {c.directory}" in proxy.log()
            assert "local CA" not in proxy.log()
            root = tmp_path / "pebble-root.pem"
            root.write_bytes(c.root_pem())
            result = subprocess.run(
                [
                    "curl",
                    "--silent",
                    "--show-error",
                    "--max-time",
                    "10",
                    "--cacert",
                    str(root),
                    "--resolve",
                    f"app.example.com:{port}:127.0.0.1",
                    "--write-out",
                    "\\n%{http_code}",
                    f"https://app.example.com:{port}/pid",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert result.returncode == 0, result.stderr
            pid, code = result.stdout.split("\n")
            assert code == "200" and pid.isdigit()
            # The account and the certificate live in --data-dir, as a config's data_dir.
            assert any(data.rglob("*.pem"))
        finally:
            proxy.stop()
