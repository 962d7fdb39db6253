"""Storage over a shared store: data_dir as each instance's working copy.

The shared store here is a FileBackend in its own directory (the real `file` backend, standing
in for Redis, whose own tests are in tests/integration/certs); `Unreachable` makes it fail the
way a Redis that went away does.
"""

import os
import stat

import pytest

from certs.storage import FileBackend, LockLost, Storage, StorageError, keys, safe_name

from .test_storage import pair


class Unreachable:
    """The backend while `down` is set: every call fails as an unreachable Redis does."""

    def __init__(self, backend):
        self.backend = backend
        self.kind = "redis"
        self.down = False

    def describe(self):
        return "test store"

    def __getattr__(self, name):
        attr = getattr(self.backend, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise StorageError(f"test store: {name}: connection refused")
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def shared(tmp_path):
    return Unreachable(FileBackend(tmp_path / "store"))


def instance(tmp_path, shared, name):
    return Storage(tmp_path / name, shared)


def test_what_one_instance_saves_the_other_loads_into_its_own_data_dir(tmp_path, shared):
    one, two = instance(tmp_path, shared, "one"), instance(tmp_path, shared, "two")
    chain, key = pair()
    one.save_certificate("a.test", chain, key)
    assert shared.backend.load(keys.cert("a.test")) == chain
    assert not two.cert_path("a.test").exists()
    loaded = two.load_certificate("a.test")
    assert loaded is not None and (loaded.chain_pem, loaded.key_pem) == (chain, key)
    # The TLS library reads files: the working copy has them, keys 0600.
    assert two.cert_path("a.test").read_bytes() == chain
    assert stat.S_IMODE(os.stat(two.key_path("a.test")).st_mode) == 0o600


def test_a_renewal_elsewhere_replaces_the_working_copy_and_sync_says_so(tmp_path, shared):
    one, two = instance(tmp_path, shared, "one"), instance(tmp_path, shared, "two")
    one.save_certificate("a.test", *pair())
    two.load_certificate("a.test")
    assert two.sync_certificate("a.test") is False  # nothing new
    renewed = pair()
    one.save_certificate("a.test", *renewed)
    assert two.sync_certificate("a.test") is True
    assert two.cert_path("a.test").read_bytes() == renewed[0]
    assert two.sync_certificate("a.test") is False


def test_the_store_down_reads_fall_back_writes_fail_and_the_error_is_kept(tmp_path, shared):
    one = instance(tmp_path, shared, "one")
    chain, key = pair()
    one.save_certificate("a.test", chain, key)
    shared.down = True
    loaded = one.load_certificate("a.test")  # serving goes on from the working copy
    assert loaded is not None and loaded.chain_pem == chain
    assert one.last_error is not None and "connection refused" in one.last_error
    with pytest.raises(StorageError):
        one.save_certificate("a.test", *pair())
    assert one.cert_path("a.test").read_bytes() == chain  # the working copy left as it was
    with pytest.raises(StorageError):
        with one.lock("a.test", timeout=0):
            pass
    shared.down = False
    assert one.load_certificate("a.test") is not None
    assert one.last_error is None


def test_a_new_instance_does_not_blank_the_shared_renewal_state(tmp_path, shared):
    one, two = instance(tmp_path, shared, "one"), instance(tmp_path, shared, "two")
    one.save_state("a.test", {"failures": 2, "last_error": "CA down"})
    two.reserve_state("a.test")  # what load() does for every managed name
    assert two.load_state("a.test") == {"failures": 2, "last_error": "CA down"}
    assert one.load_state("a.test")["failures"] == 2


def test_a_write_under_a_lost_lock_is_refused(tmp_path, shared):
    one = instance(tmp_path, shared, "one")
    with one.lock("a.test", timeout=1):
        one._held[safe_name("a.test")].lost.set()  # what the backend's refresher does
        with pytest.raises(LockLost):
            one.save_certificate("a.test", *pair())
        one.write(one.path("other"), b"not under that lock")  # other keys are unaffected
    assert shared.backend.load(keys.cert("a.test")) is None
