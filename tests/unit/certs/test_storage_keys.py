"""The key builder: the keys the managers' files already have, and keys that cannot escape."""

from __future__ import annotations

from pathlib import Path

import pytest

from certs.issuers.local_ca import CA_LOCK_NAME
from certs.storage import Storage, keys


def test_keys_are_the_data_dir_layout() -> None:
    storage = Storage(Path("/d"))
    assert storage.cert_path("*.A.test") == Path("/d") / keys.cert("*.A.test")
    assert keys.cert("*.A.test") == "certificates/wildcard_.a.test/cert.pem"
    assert keys.private_key("a.test") == "certificates/a.test/key.pem"
    assert keys.state("a.test") == "certificates/a.test/state.json"
    assert storage.ca_files().root_key == Path("/d/ca/root.key")
    assert storage.path("acme", "x", "account.key") == Path("/d") / keys.acme_account_key("x")
    assert keys.http01_token("aB_-9") == "challenges/http-01/aB_-9"
    assert keys.CA_LOCK == CA_LOCK_NAME


def test_private_keys_are_known() -> None:
    private = [keys.private_key("a"), keys.previous_key("a"), keys.CA_ROOT_KEY]
    private += [keys.CA_CLIENT_INTERMEDIATE_KEY, keys.acme_account_key("x")]
    assert all(keys.is_private(k) for k in private)
    public = [keys.cert("a"), keys.state("a"), keys.CA_ROOT_CERT, keys.acme_account("x")]
    assert not any(keys.is_private(k) for k in public)


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc", "a//b", "", "a/", "x\x00", "é"])
def test_keys_cannot_leave_the_store(bad: str) -> None:
    with pytest.raises(ValueError):
        keys.check_key(bad)
    with pytest.raises(ValueError):
        keys.http01_token("../../ca/root.key")
