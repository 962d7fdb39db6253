"""Bring your own root: `[local_ca] root_cert` / `root_key` (RSA or EC, with or without a CN,
trustme's, a company's test CA). The local CA issues its intermediate and leaves under it, and
curl trusting only that root gets through the proxy; `tlsproxy ca` prints it. A bad root is
exit 2 naming the key. A root without a CN put in data_dir/ca by hand no longer crashes
`tlsproxy ca` (it raised IndexError)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.integration.harness import AppProcess, basic_config, tlsproxy, write_config
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import issue, make_ca
from tests.unit.certs.factory import make_foreign_root

Root = tuple[bytes, bytes]  # (certificate PEM, key PEM)


def _pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _root(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, name: x509.Name, *, ski: bool
) -> Root:
    cert, _ = make_foreign_root(key, name, ski=ski, now=dt.datetime.now(dt.UTC))
    return cert.public_bytes(serialization.Encoding.PEM), _pem(key)


def ec_root_without_cn() -> Root:
    """EC, no CN (only O and OU), and no SubjectKeyIdentifier either."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Test PKI"),
        ]
    )
    return _root(ec.generate_private_key(ec.SECP384R1()), name, ski=False)


def rsa_root_with_cn() -> Root:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Corp RSA Root CA")])
    return _root(rsa.generate_private_key(65537, 2048), name, ski=True)


def trustme_root() -> Root:
    ca = trustme.CA()  # O=trustme, OU=Testing CA #..., no CN; EC
    return ca.cert_pem.bytes(), ca.private_key_pem.bytes()


def trustme_rsa_root() -> Root:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    return ca.cert_pem.bytes(), ca.private_key_pem.bytes()


ROOTS: dict[str, Callable[[], Root]] = {
    "ec-without-cn": ec_root_without_cn,
    "rsa-with-cn": rsa_root_with_cn,
    "trustme": trustme_root,
    "trustme-rsa": trustme_rsa_root,
}


def write_root(directory: Path, root: Root) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "my-root.pem", directory / "my-root.key"
    cert.write_bytes(root[0])
    key.write_bytes(root[1])
    key.chmod(0o600)
    return cert, key


def own_root_config(upstream: str, cert: Path | str, key: Path | str | None) -> str:
    key_line = f'root_key = "{key}"' if key is not None else ""
    return basic_config(upstream) + f'\n[local_ca]\nroot_cert = "{cert}"\n{key_line}\n'


def curl(port: int, cafile: Path, path: str = "/healthz") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(cafile), f"https://localhost:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def first_der(pem: bytes | str) -> bytes:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("kind", list(ROOTS))
def test_curl_trusting_your_root_gets_through(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path, kind: str
) -> None:
    root = ROOTS[kind]()
    cert, key = write_root(tmp_path / "pki", root)
    proxy = make_proxy(own_root_config(example_app.server, cert, key), start=False)
    checked = tlsproxy("check", "-c", str(proxy.config_file))
    assert checked.returncode == 0, checked.stderr
    assert f"local CA root: yours, {cert}" in checked.stdout
    proxy.start()
    served = curl(proxy.port, cert)
    assert served.returncode == 0 and served.stdout == "ok", served.stderr
    # `tlsproxy ca` prints that very root, and the user's key was never copied to data_dir.
    printed = tlsproxy("ca", "-c", str(proxy.config_file))
    assert printed.returncode == 0, printed.stderr
    assert first_der(printed.stdout) == first_der(root[0])
    assert first_der(proxy.ca.read_bytes()) == first_der(root[0])
    assert not (proxy.dir / "data" / "ca" / "root.key").exists()
    # A client certificate from the local CA chains to it as well.
    client = tlsproxy(
        "ca", "-c", str(proxy.config_file), "--client", "alice", "--out", str(tmp_path)
    )
    assert client.returncode == 0, client.stderr
    chain = x509.load_pem_x509_certificates((tmp_path / "alice.pem").read_bytes())
    user_root = x509.load_pem_x509_certificate(root[0])
    chain[1].verify_directly_issued_by(user_root)


def test_switching_a_running_data_dir_to_your_root(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    """A data_dir whose local CA made its own root: the user's takes its place at the next
    start, leaves are issued again under it, the old root's key is kept aside."""
    first = make_proxy(basic_config(example_app.server))
    old_root = first.ca.read_bytes()
    old_root_file = tmp_path / "old-root.pem"
    old_root_file.write_bytes(old_root)
    first.stop()
    cert, key = write_root(tmp_path / "pki", ec_root_without_cn())
    data = first.dir / "data"
    config = write_config(first.dir, own_root_config(example_app.server, cert, key), "mine.toml")
    proxy = type(first)(config)
    try:
        proxy.start()
        assert curl(proxy.port, cert).stdout == "ok"
        refused = curl(proxy.port, old_root_file)
        assert refused.returncode == 60, refused  # the old root no longer vouches for it
        assert (data / "ca" / "root.key.replaced").exists()
        assert not (data / "ca" / "root.key").exists()
        assert first_der(proxy.ca.read_bytes()) != first_der(old_root)
    finally:
        proxy.stop()


def test_a_root_without_cn_put_in_data_dir_by_hand(
    make_proxy: MakeProxy, example_app: AppProcess, tmp_path: Path
) -> None:
    """The old way of bringing a root: its files in data_dir/ca. No CN, an RSA key: `tlsproxy
    ca` used to die with IndexError (the intermediate's name was taken from the root's CN)."""
    proxy = make_proxy(basic_config(example_app.server), start=False)
    ca_dir = proxy.dir / "data" / "ca"
    cert_pem, key_pem = trustme_rsa_root()
    ca_dir.mkdir(parents=True)
    (ca_dir / "root.pem").write_bytes(cert_pem)
    (ca_dir / "root.key").write_bytes(key_pem)
    printed = tlsproxy("ca", "-c", str(proxy.config_file))
    assert printed.returncode == 0, printed.stderr
    assert first_der(printed.stdout) == first_der(cert_pem)
    proxy.start()
    assert curl(proxy.port, ca_dir / "root.pem").stdout == "ok"


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_root_is_exit_2_naming_the_key(tmp_path: Path, command: str) -> None:
    good_cert, good_key = write_root(tmp_path / "pki", ec_root_without_cn())
    other_cert, other_key = write_root(tmp_path / "other", rsa_root_with_cn())
    leaf_cert, leaf_key = issue(make_ca(), ["leaf.test"]).write(tmp_path / "leaf", "leaf")
    pathlen0_cert, pathlen0_key = make_ca().write(tmp_path / "pathlen0", "ca")
    upstream = "127.0.0.1:9"
    cases = [
        (good_cert.with_name("nowhere.pem"), good_key, "local_ca.root_cert", "file not found"),
        (good_cert, good_key.with_name("nowhere.key"), "local_ca.root_key", "file not found"),
        (
            good_cert,
            other_key,
            "local_ca.root_key",
            f"is not the key of the certificate in {good_cert}",
        ),
        (leaf_cert, leaf_key, "local_ca.root_cert", "not a CA certificate"),
        (pathlen0_cert, pathlen0_key, "local_ca.root_cert", "pathlen:0"),
        (good_cert, None, "local_ca.root_key", "missing"),
    ]
    for i, (cert, key, name, why) in enumerate(cases):
        config = write_config(tmp_path / f"case{i}", own_root_config(upstream, cert, key))
        result = tlsproxy(command, "-c", str(config), timeout=60)
        one_line(result, name, why)
    assert other_cert.exists()  # made only for its key


def test_curl_is_on_this_machine() -> None:
    assert shutil.which("curl"), "scripts/test.sh installs curl"
