import os
import stat
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs.errors import CertificateFileError, IssuanceError
from certs.issuers import Issuer
from certs.issuers.local_ca import LocalCA
from certs.keys import generate_private_key, load_certificates, make_csr
from certs.models import CertSpec
from certs.storage import Storage

from .factory import NOW, make_ca

DAY = timedelta(days=1)


class Clock:
    def __init__(self, start=NOW):
        self.now = start

    def __call__(self) -> float:
        return self.now.timestamp()


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


def issue(ca, hosts):
    key = generate_private_key()
    spec = CertSpec(hosts[0], tuple(hosts), "internal")
    return load_certificates(ca.issue(spec, make_csr(key, hosts))), key


def verify(root, chain, host, when):
    verifier = (
        PolicyBuilder().store(Store([root])).time(when).build_server_verifier(x509.DNSName(host))
    )
    return verifier.verify(chain[0], chain[1:])


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def storage(tmp_path):
    return Storage(tmp_path / "data")


def test_ca_files_and_extensions(storage, clock):
    ca = LocalCA.load_or_create(storage, clock=clock)
    assert isinstance(ca, Issuer)
    files = storage.ca_files()
    for key_file in (files.root_key, files.intermediate_key):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.root_cert.parent).st_mode) == 0o700
    root, inter = ca.root, ca.intermediate
    assert ext(root, x509.BasicConstraints).value.ca
    assert ext(root, x509.BasicConstraints).critical
    assert ext(root, x509.KeyUsage).value.key_cert_sign
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert ext(inter, x509.BasicConstraints).value.path_length == 0
    assert inter.issuer == root.subject
    assert (
        ext(inter, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(root, x509.SubjectKeyIdentifier).value.digest
    )
    assert ca.root_pem == files.root_cert.read_bytes()


def test_leaf(storage, clock):
    ca = LocalCA.load_or_create(storage, clock=clock, leaf_lifetime=timedelta(days=7))
    chain, key = issue(ca, ["localhost", "app.test", "*.wild.test"])
    leaf = chain[0]
    assert chain[1] == ca.intermediate
    assert leaf.public_key() == key.public_key()
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    assert ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "localhost",
        "app.test",
        "*.wild.test",
    ]
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(leaf, x509.BasicConstraints).value.ca
    usage = ext(leaf, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
    assert (
        ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(ca.intermediate, x509.SubjectKeyIdentifier).value.digest
    )
    ext(leaf, x509.SubjectKeyIdentifier)
    assert leaf.not_valid_after_utc == NOW + timedelta(days=7)
    assert NOW - timedelta(minutes=1) <= leaf.not_valid_before_utc < NOW
    assert ca.issued(leaf)
    for host in ("localhost", "app.test", "a.wild.test"):
        verify(ca.root, chain, host, NOW)


def test_wrong_name_and_wrong_root_fail_verification(storage, clock):
    ca = LocalCA.load_or_create(storage, clock=clock)
    chain, _ = issue(ca, ["localhost"])
    with pytest.raises(VerificationError):
        verify(ca.root, chain, "other.test", NOW)
    with pytest.raises(VerificationError):
        verify(make_ca()[0], chain, "localhost", NOW)
    with pytest.raises(VerificationError):
        verify(ca.root, chain, "localhost", NOW + timedelta(days=8))


def test_short_lifetime_for_tests(storage, clock):
    ca = LocalCA.load_or_create(storage, clock=clock, leaf_lifetime=timedelta(seconds=6))
    leaf = issue(ca, ["localhost"])[0][0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(seconds=6)


def test_reused_from_storage(storage, clock):
    first = LocalCA.load_or_create(storage, clock=clock)
    second = LocalCA.load_or_create(storage, clock=clock)
    assert second.root == first.root and second.intermediate == first.intermediate


def test_intermediate_renewed_when_due_root_kept(storage, clock):
    first = LocalCA.load_or_create(storage, clock=clock)
    clock.now += timedelta(days=250)  # more than 2/3 of a year
    second = LocalCA.load_or_create(storage, clock=clock)
    assert second.root == first.root
    assert second.intermediate != first.intermediate
    chain, _ = issue(second, ["localhost"])
    verify(first.root, chain, "localhost", clock.now)
    assert not second.issued(issue(first, ["localhost"])[0][0])


def test_missing_intermediate_is_reissued(storage, clock):
    first = LocalCA.load_or_create(storage, clock=clock)
    storage.ca_files().intermediate_cert.unlink()
    second = LocalCA.load_or_create(storage, clock=clock)
    assert second.root == first.root and second.intermediate != first.intermediate


def test_expired_root_is_replaced(storage, clock):
    first = LocalCA.load_or_create(storage, clock=clock)
    clock.now += timedelta(days=3651)
    assert LocalCA.load_or_create(storage, clock=clock).root != first.root


def test_root_key_offline(storage, clock):
    first = LocalCA.load_or_create(storage, clock=clock)
    storage.ca_files().root_key.unlink()
    clock.now += timedelta(days=250)  # intermediate due, but still valid: keep using it
    assert LocalCA.load_or_create(storage, clock=clock).intermediate == first.intermediate
    clock.now += timedelta(days=200)  # now expired, and nothing can sign a new one
    with pytest.raises(CertificateFileError) as info:
        LocalCA.load_or_create(storage, clock=clock)
    assert info.value.path == storage.ca_files().root_key


def test_damaged_ca_file_is_reported_not_replaced(storage, clock):
    LocalCA.load_or_create(storage, clock=clock)
    root_file = storage.ca_files().root_cert
    root_file.write_text("garbage")
    with pytest.raises(CertificateFileError) as info:
        LocalCA.read_stored(storage)
    assert info.value.path == root_file
    assert root_file.read_text() == "garbage"


def test_bad_csr_and_no_hosts(storage, clock):
    ca = LocalCA.load_or_create(storage, clock=clock)
    spec = CertSpec("x", ("x.test",), "internal")
    with pytest.raises(IssuanceError):
        ca.issue(spec, b"not a csr")
    with pytest.raises(IssuanceError):
        ca.sign_leaf(generate_private_key().public_key(), ())


def _foreign_root(key, name: x509.Name, *, ski: bool):
    from .factory import make_foreign_root

    return make_foreign_root(key, name, ski=ski)


def _write_pair(directory, cert, key):
    from certs.keys import certificate_to_pem, private_key_to_pem

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "r.pem").write_bytes(certificate_to_pem(cert))
    (directory / "r.key").write_bytes(private_key_to_pem(key))
    return directory / "r.pem", directory / "r.key"


NO_CN = x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "Example Corp")])


@pytest.mark.parametrize("kind", ["ec-no-cn-no-ski", "rsa-no-cn"])
def test_a_user_root_signs_the_intermediate_and_leaves(storage, clock, tmp_path, kind):
    from cryptography.hazmat.primitives.asymmetric import rsa

    if kind.startswith("ec"):
        root, key = _foreign_root(ec.generate_private_key(ec.SECP384R1()), NO_CN, ski=False)
    else:
        root, key = _foreign_root(rsa.generate_private_key(65537, 2048), NO_CN, ski=True)
    files = _write_pair(tmp_path / "pki", root, key)
    LocalCA.load_or_create(storage, clock=clock)  # a root made here first: then replaced
    ca = LocalCA.load_or_create(storage, clock=clock, root_files=files)
    assert ca.root == root
    assert storage.ca_files().root_cert.read_bytes() == files[0].read_bytes()
    assert not storage.ca_files().root_key.exists()  # the user's key stays with the user
    assert (storage.ca_files().root_key.parent / "root.key.replaced").exists()
    chain, _ = issue(ca, ["app.test"])
    verify(root, chain, "app.test", NOW)
    # Named after the root's fingerprint, since it has no CN of ours.
    assert ca.intermediate.subject.rfc4514_string().startswith("CN=tlsproxy local intermediate ")
    # Loaded again: the same intermediate, nothing redone.
    again = LocalCA.load_or_create(storage, clock=clock, root_files=files)
    assert again.intermediate == ca.intermediate


def test_a_root_without_cn_in_storage_no_index_error(storage, clock, tmp_path):
    root, key = _foreign_root(ec.generate_private_key(ec.SECP256R1()), NO_CN, ski=True)
    files = storage.ca_files()
    _write_pair(files.root_cert.parent, root, key)
    (files.root_cert.parent / "r.pem").rename(files.root_cert)
    (files.root_cert.parent / "r.key").rename(files.root_key)
    ca = LocalCA.load_or_create(storage, clock=clock)
    chain, _ = issue(ca, ["app.test"])
    verify(root, chain, "app.test", NOW)


def test_bad_user_roots_name_the_file(tmp_path, clock):
    from certs.issuers.local_ca import load_user_root

    root, key = make_ca()
    other, other_key = make_ca("other")
    good = _write_pair(tmp_path / "good", root, key)
    mixed = (good[0], _write_pair(tmp_path / "other", other, other_key)[1])
    with pytest.raises(CertificateFileError) as caught:
        load_user_root(mixed, NOW)
    assert caught.value.path == mixed[1] and "is not the key" in str(caught.value)
    with pytest.raises(CertificateFileError, match="file not found"):
        load_user_root((tmp_path / "none.pem", good[1]), NOW)
    with pytest.raises(CertificateFileError, match="expired"):
        load_user_root(good, NOW + 4000 * DAY)
    assert load_user_root(good, NOW)[0] == root
