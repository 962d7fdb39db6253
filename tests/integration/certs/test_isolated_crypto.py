"""CertificateManager(isolate_crypto=True): validation and local-CA issuance in a real child
process (certs.crypto_worker), with the same results and the same error texts as in-process."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from certs.errors import CertError, CertificateFileError, IssuanceError
from certs.keys import cert_info, load_certificates
from certs.manager import CertificateManager
from certs.models import CertSpec
from tests.unit.certs.factory import (
    NOW,
    encrypted_key_pem,
    make_ca,
    make_leaf,
    server_context,
    write_pair,
)

from .conftest import client_context, connect
from .test_maintain import maintaining, wait_for

LOCAL = CertSpec("localhost", ("localhost", "app.test"), "internal")
HOSTS = ("files.test", "www.files.test")


def fixed_clock() -> float:
    return NOW.timestamp()


def managers(data_dir: Path, **kwargs) -> tuple[CertificateManager, CertificateManager]:
    """The same settings in-process and isolated."""
    kwargs.setdefault("clock", fixed_clock)
    return (
        CertificateManager(data_dir, server_context, **kwargs),
        CertificateManager(data_dir, server_context, isolate_crypto=True, **kwargs),
    )


def files_spec(cert_file: Path, key_file: Path, hosts=HOSTS) -> CertSpec:
    return CertSpec(hosts[0], tuple(hosts), "files", cert_file, key_file)


@pytest.fixture(scope="module")
def ca():
    return make_ca("files CA")


@pytest.fixture
def good(tmp_path, ca):
    cert, key = make_leaf(ca, list(HOSTS))
    return write_pair(tmp_path, [cert, ca[0]], key, "good")


def test_load_issues_through_the_child_and_serves_what_it_stored(tmp_path, good, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy")
    _, isolated = managers(tmp_path / "data")
    cache = isolated.load([LOCAL, files_spec(*good)], "localhost")

    chain = load_certificates(isolated.storage.cert_path("localhost").read_bytes())
    root = x509.load_pem_x509_certificate((tmp_path / "data/ca/root.pem").read_bytes())
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(root)
    assert cache.get("localhost").info == cert_info(chain[0])
    assert cache.get("localhost").info.not_before <= NOW  # the child used the parent's clock
    assert cache.get("files.test").info.issuer == "CN=files CA"
    messages = [r.getMessage() for r in caplog.records]
    # The child's own records are replayed here, and the parent says what it installed.
    assert any(m.startswith("created local CA root") for m in messages), messages
    assert any(m.startswith("issued certificate for localhost by local CA") for m in messages)

    # Stored and still good: the next load serves it again, in-process or isolated alike.
    again = isolated.load([LOCAL], None)
    assert again.get("localhost").info.serial == chain[0].serial_number


def test_replaced_ca_means_a_new_leaf(tmp_path):
    in_process, isolated = managers(tmp_path / "data")
    first = in_process.load([LOCAL], None).get("localhost").info.serial
    for f in (tmp_path / "data" / "ca").iterdir():
        f.unlink()
    second = isolated.load([LOCAL], None).get("localhost").info
    assert second.serial != first
    new_intermediate = (tmp_path / "data/ca/intermediate.pem").read_bytes()
    assert cert_info(x509.load_pem_x509_certificate(new_intermediate)).subject == second.issuer


def _error(manager: CertificateManager, call) -> CertError:
    with pytest.raises(CertError) as info:
        call(manager)
    return info.value


def _broken_cases(tmp_path: Path, ca, good: tuple[Path, Path]) -> dict[str, list[CertSpec]]:
    cert_file, key_file = good
    other_cert, other_key = make_leaf(ca, list(HOSTS))
    _, mismatched_key = write_pair(tmp_path, [other_cert], other_key, "other")
    expired_leaf, expired_key = make_leaf(
        ca, list(HOSTS), not_before=NOW - timedelta(days=9), not_after=NOW
    )
    expired = write_pair(tmp_path, [expired_leaf], expired_key, "expired")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(encrypted_key_pem(other_key))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    return {
        "mismatch": [files_spec(cert_file, mismatched_key)],
        "expired": [files_spec(*expired)],
        "uncovered": [files_spec(cert_file, key_file, (*HOSTS, "more.test"))],
        "encrypted": [files_spec(cert_file, encrypted)],
        "missing": [files_spec(tmp_path / "gone.pem", key_file)],
        "junk": [files_spec(junk, key_file)],
        "no key": [CertSpec("k.test", ("k.test",), "files", cert_file, None)],
    }


@pytest.mark.parametrize(
    "case", ["mismatch", "expired", "uncovered", "encrypted", "missing", "junk", "no key"]
)
def test_validate_errors_are_the_in_process_ones(tmp_path, ca, good, case):
    specs = _broken_cases(tmp_path, ca, good)[case]
    in_process, isolated = managers(tmp_path / "data")
    expected = _error(in_process, lambda m: m.validate(specs))
    got = _error(isolated, lambda m: m.validate(specs))
    assert type(got) is type(expected) is CertificateFileError
    assert (got.path, got.reason, str(got)) == (expected.path, expected.reason, str(expected))


def test_validate_texts_that_users_and_tests_rely_on(tmp_path, ca, good):
    cases = _broken_cases(tmp_path, ca, good)
    _, isolated = managers(tmp_path / "data")
    texts = {}
    for case, specs in cases.items():
        texts[case] = str(_error(isolated, lambda m, s=specs: m.validate(s)))
    assert "private key does not match the certificate in" in texts["mismatch"]
    assert "certificate expired on 2026-06-01 12:00:00 UTC" in texts["expired"]
    assert "certificate does not cover more.test" in texts["uncovered"]
    assert "private key is encrypted" in texts["encrypted"]
    assert texts["missing"].endswith("gone.pem: file not found")


def test_validate_data_dir_and_damaged_ca(tmp_path):
    (tmp_path / "data").write_text("a file")
    in_process, isolated = managers(tmp_path / "data")
    expected = _error(in_process, lambda m: m.validate([LOCAL]))
    got = _error(isolated, lambda m: m.validate([LOCAL]))
    assert (type(got), str(got)) == (type(expected), str(expected))
    assert "not a directory" in str(got)

    in_process, isolated = managers(tmp_path / "data2")
    in_process.load([LOCAL], None)
    (tmp_path / "data2/ca/intermediate.key").write_text("junk")
    got = _error(isolated, lambda m: m.validate([LOCAL]))
    assert isinstance(got, CertificateFileError)
    assert got.path == tmp_path / "data2/ca/intermediate.key"
    assert str(got) == str(_error(in_process, lambda m: m.validate([LOCAL])))


def test_issue_error_unwritable_certificates_dir(tmp_path):
    # A file where the certificates directory should be: the child's OSError comes back as the
    # same OSError (root ignores permission bits, so a chmod would prove nothing here).
    in_process, isolated = managers(tmp_path / "data")
    in_process.load([LOCAL], None)
    for f in (tmp_path / "data/certificates/localhost").iterdir():
        f.unlink()
    (tmp_path / "data/certificates/localhost").rmdir()
    (tmp_path / "data/certificates").rmdir()
    (tmp_path / "data/certificates").write_text("not a directory")
    expected = _error(in_process, lambda m: m.load([LOCAL], None))
    got = _error(isolated, lambda m: m.load([LOCAL], None))
    assert isinstance(got, CertificateFileError)
    assert isinstance(got.__cause__, NotADirectoryError)
    assert str(got) == str(expected)


def test_issue_waits_for_the_lock_and_names_its_holder(tmp_path):
    _, isolated = managers(tmp_path / "data", lock_timeout=0.5)
    with isolated.storage.lock("localhost", timeout=1):
        got = _error(isolated, lambda m: m.load([LOCAL], None))
    assert f"held by pid {os.getpid()} for more than 0.5s" in str(got)
    assert got.__cause__.__class__.__name__ == "LockTimeout"
    assert isolated.load([LOCAL], None).get("localhost") is not None  # free again: issued


def test_a_crashed_child_is_an_issuance_error_naming_its_last_words(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo 'MemoryError: the worker died' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    _, isolated = managers(tmp_path / "data")
    monkeypatch.setattr(sys, "executable", str(fake))
    got = _error(isolated, lambda m: m.validate([LOCAL]))
    assert isinstance(got, IssuanceError)
    assert (
        str(got) == "crypto worker (validate) failed (exit status 3): MemoryError: the worker died"
    )
    loaded = _error(isolated, lambda m: m.load([LOCAL], None))
    assert "crypto worker (issue) failed" in str(loaded)


def test_a_child_that_does_not_answer_in_time(tmp_path):
    _, isolated = managers(tmp_path / "data", worker_timeout=0.001)
    got = _error(isolated, lambda m: m.validate([LOCAL]))
    assert isinstance(got, IssuanceError)
    assert "gave no answer within" in str(got)


async def test_background_renewal_goes_through_the_child(tmp_path, echo_server, caplog):
    caplog.set_level(logging.INFO, logger="tlsproxy.certs")
    manager = CertificateManager(
        tmp_path / "data",
        server_context,
        leaf_lifetime=timedelta(seconds=3),
        jitter_fraction=0,
        isolate_crypto=True,
    )
    cache = await asyncio.to_thread(manager.load, [LOCAL], "localhost")
    server = await echo_server(cache)
    trust = client_context((tmp_path / "data/ca/root.pem").read_bytes())
    before = await connect(server.port, "localhost", trust)
    first_serial = before.leaf.serial_number
    async with maintaining(manager, server):
        await wait_for(
            lambda: cache.get("localhost").info.serial != first_serial, 8, "a renewed leaf"
        )
        after = await connect(server.port, "app.test", trust)
        assert after.leaf.serial_number == cache.get("localhost").info.serial != first_serial
        assert await before.echo(b"still here\n") == b"still here\n"
        await before.close()
        await after.close()
    issued = [r for r in caplog.records if "issued certificate for localhost" in r.getMessage()]
    assert len(issued) >= 2  # start-up and at least one renewal, both logged by the parent


def count_children(monkeypatch) -> list[str]:
    """The crypto worker operations run from now on, in order."""
    from certs import crypto_worker

    calls: list[str] = []
    real = crypto_worker.run_worker

    def counted(manager, op, args):
        calls.append(op)
        return real(manager, op, args)

    monkeypatch.setattr(crypto_worker, "run_worker", counted)
    return calls


def test_broken_certificates_are_made_in_one_child_and_reused_without_one(tmp_path, monkeypatch):
    from certs.broken import BROKEN_KINDS

    calls = count_children(monkeypatch)
    specs = [CertSpec(f"{k}.test", (f"{k}.test",), "internal", broken=k) for k in BROKEN_KINDS]
    _, isolated = managers(tmp_path / "data")
    cache = isolated.load(specs, None)
    assert calls == ["broken"]  # six certificates, one child
    serials = {s.name: cache.get(s.name).info.serial for s in specs}
    assert cache.get("self-signed.test").info.issuer == "CN=self-signed.test"
    assert {s.name: isolated.load(specs, None).get(s.name).info.serial for s in specs} == serials
    assert calls == ["broken"]  # still broken in their way: served again, no child


def test_local_ca_leaves_due_at_load_are_issued_in_one_child(tmp_path, monkeypatch):
    calls = count_children(monkeypatch)
    specs = [CertSpec(f"s{i}.test", (f"s{i}.test",), "internal") for i in range(5)]
    _, isolated = managers(tmp_path / "data")
    cache = isolated.load(specs, None)
    assert calls == ["issue_many"]  # five sites, one child
    serials = {s.name: cache.get(s.name).info.serial for s in specs}
    assert len(set(serials.values())) == 5
    assert {s.name: isolated.load(specs, None).get(s.name).info.serial for s in specs} == serials
    assert calls == ["issue_many"]  # all stored and valid: no child at all
