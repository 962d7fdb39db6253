"""`tlsproxy run` with local-CA and files sites never maps `cryptography` into its process (about
10 MiB of resident memory): not at start-up, not after a SIGHUP that needs a new leaf. Files are
still refused with the same one line as `tlsproxy check`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import (
    REPO,
    AppProcess,
    ProxyProcess,
    local_ca,
    running,
    tlsproxy,
    write_config,
)
from tests.integration.proxy.support import Issued, curl_to, issue, make_ca, proxy_config

CRYPTO_MARKERS = ("cryptography", "_rust.abi3", "/acme/", "josepy", "/requests/")


@pytest.fixture(scope="module")
def files_ca() -> Issued:
    return make_ca("run files CA")


@pytest.fixture
def app(tmp_path: Path):
    with running(AppProcess(tmp_path)) as process:
        yield process


def config_text(upstream: str, cert: Path, key: Path, internal_hosts: list[str]) -> str:
    tls_files = f'{{ cert = "{cert}", key = "{key}" }}'
    return proxy_config(
        [(internal_hosts, "app"), (["files.test"], "app", tls_files)],
        {"app": upstream},
        default_site="localhost",
    )


def mapped_crypto(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted(
        {line.split()[-1] for line in maps.splitlines() if any(m in line for m in CRYPTO_MARKERS)}
    )


def curl(port: int, host: str, cacert: Path) -> subprocess.CompletedProcess[str]:
    return curl_to(port, cacert, host, "-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}")


def test_run_serves_internal_and_files_sites_without_cryptography(
    tmp_path: Path, app: AppProcess, files_ca: Issued
) -> None:
    cert, key = issue(files_ca, ["files.test"]).write(tmp_path / "certs", "files")
    files_root, _ = files_ca.write(tmp_path, "files-root")
    config = write_config(tmp_path, config_text(app.server, cert, key, ["localhost"]))
    proxy = ProxyProcess(config, log_level="info")
    with running(proxy):
        root = local_ca(tmp_path, config)
        assert curl(proxy.port, "localhost", root).stdout == "200 0"
        assert curl(proxy.port, "files.test", files_root).stdout == "200 0"
        assert mapped_crypto(proxy.pid) == []

        # A reload that needs a new leaf (a host added): issued by a child, served at once.
        mark = len(proxy.log())
        config.write_text(config_text(app.server, cert, key, ["localhost", "new.test"]))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"reloaded .*: 2 site\(s\)", timeout=30, start=mark)
        assert "issued certificate for localhost by local CA" in proxy.log()[mark:]
        assert curl(proxy.port, "new.test", root).stdout == "200 0"
        assert curl(proxy.port, "files.test", files_root).stdout == "200 0"
        assert mapped_crypto(proxy.pid) == []

        # A reload with a broken files site is refused with the child's words; still no
        # cryptography here, and the old certificates keep being served.
        mark = len(proxy.log())
        other_cert, _ = issue(files_ca, ["files.test"]).write(tmp_path / "certs", "other")
        config.write_text(config_text(app.server, other_cert, key, ["localhost"]))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"reload failed.*private key does not match", timeout=30, start=mark)
        assert curl(proxy.port, "files.test", files_root).stdout == "200 0"
        assert mapped_crypto(proxy.pid) == []


def run_once(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    config = write_config(tmp_path, text)
    result = tlsproxy("run", "-c", str(config), timeout=60)
    return result.returncode, result.stderr.strip().splitlines()


def test_run_refuses_a_key_that_does_not_match_with_one_line(
    tmp_path: Path, files_ca: Issued
) -> None:
    cert, _ = issue(files_ca, ["files.test"]).write(tmp_path / "certs", "files")
    _, other_key = issue(files_ca, ["files.test"]).write(tmp_path / "certs", "other")
    code, lines = run_once(tmp_path, config_text("127.0.0.1:9", cert, other_key, ["localhost"]))
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert f"{other_key}: private key does not match the certificate in {cert}" in lines[0]
    # `check` (in-process) and `run` (the child) say the very same thing.
    check = tlsproxy("check", "-c", str(tmp_path / "tlsproxy.toml"), timeout=60)
    assert check.returncode == 2 and check.stderr.strip().splitlines() == lines


def test_run_refuses_an_encrypted_key_without_asking_for_a_passphrase(
    tmp_path: Path, files_ca: Issued
) -> None:
    from cryptography.hazmat.primitives import serialization

    issued = issue(files_ca, ["files.test"])
    cert, key = issued.write(tmp_path / "certs", "files")
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    code, lines = run_once(tmp_path, config_text("127.0.0.1:9", cert, key, ["localhost"]))
    assert code == 2, lines
    assert len(lines) == 1 and str(key) in lines[0] and "encrypted" in lines[0], lines


def test_the_serving_modules_import_no_cryptography() -> None:
    # What `tlsproxy run` imports before it knows whether any site uses ACME.
    code = (
        "import sys, proxy.cli, proxy.server, proxy.certificates, certs.manager, certs.storage, "
        "certs.crypto_worker; print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'cryptography', 'acme', 'josepy', 'requests'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
