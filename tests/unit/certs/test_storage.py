import os
import stat

import pytest

from certs.errors import LockTimeout
from certs.keys import chain_to_pem, private_key_to_pem
from certs.storage import Storage, safe_name, write_atomic

from .factory import make_ca, make_leaf


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def pair(hosts=("a.test",)):
    cert, key = make_leaf(make_ca(), list(hosts))
    return chain_to_pem([cert]), private_key_to_pem(key)


def test_save_load_and_modes(tmp_path):
    storage = Storage(tmp_path / "data" / "nested")
    chain, key = pair()
    saved = storage.save_certificate("a.test", chain, key)
    loaded = storage.load_certificate("a.test")
    assert loaded == saved
    assert loaded.chain_pem == chain and loaded.key_pem == key
    assert mode(saved.key_path) == 0o600
    assert mode(saved.cert_path) == 0o600
    for directory in (tmp_path / "data", storage.root, saved.cert_path.parent):
        assert mode(directory) == 0o700, directory


def test_replace_keeps_previous_and_leaves_no_temp_files(tmp_path):
    storage = Storage(tmp_path)
    first, second = pair(), pair()
    storage.save_certificate("a.test", *first)
    assert not storage.previous_cert_path("a.test").exists()
    storage.save_certificate("a.test", *second)
    assert storage.load_certificate("a.test").chain_pem == second[0]
    assert storage.previous_cert_path("a.test").read_bytes() == first[0]
    assert storage.previous_key_path("a.test").read_bytes() == first[1]
    assert mode(storage.previous_key_path("a.test")) == 0o600
    names = sorted(p.name for p in storage.certificate_dir("a.test").iterdir())
    assert names == ["cert.pem", "cert.prev.pem", "key.pem", "key.prev.pem"]


def test_failed_write_keeps_old_content(tmp_path):
    target = tmp_path / "file"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # fails after the temp file exists
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_load_missing_and_mismatched(tmp_path):
    storage = Storage(tmp_path)
    assert storage.load_certificate("none.test") is None
    chain, _ = pair()
    _, other_key = pair()
    storage.save_certificate("a.test", chain, other_key)
    with pytest.raises(ValueError, match="does not match"):
        storage.load_certificate("a.test")


def test_lock_is_exclusive_and_released(tmp_path):
    storage = Storage(tmp_path)
    with storage.lock("a.test", timeout=1):
        assert storage.lock_path("a.test").read_text().strip() == str(os.getpid())
        with pytest.raises(LockTimeout) as info:
            with storage.lock("a.test", timeout=0):
                pytest.fail("second holder got the lock")
        assert str(os.getpid()) in str(info.value)
        with storage.lock("b.test", timeout=0):  # other names are independent
            pass
    with storage.lock("a.test", timeout=0):
        pass


def test_state_round_trip_and_corruption(tmp_path):
    storage = Storage(tmp_path)
    assert storage.load_state("a.test") == {}
    storage.save_state("a.test", {"failures": 2, "last_error": "boom"})
    assert storage.load_state("a.test") == {"failures": 2, "last_error": "boom"}
    storage.state_path("a.test").write_text("{not json")
    assert storage.load_state("a.test") == {}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Example.TEST", "example.test"), ("*.a.test", "wildcard_.a.test"), ("../x/y", ".._x_y")],
)
def test_safe_name(name, expected):
    assert safe_name(name) == expected
    assert "/" not in safe_name(name)


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_safe_name_rejects(name):
    with pytest.raises(ValueError):
        safe_name(name)


def test_state_is_written_in_place_when_the_file_system_is_full(tmp_path, monkeypatch):
    import errno

    import certs.storage as storage_module

    storage = Storage(tmp_path)
    storage.reserve_state("a.test")
    path = storage.state_path("a.test")
    assert path.stat().st_size == storage_module.STATE_SIZE  # reserved while there is room
    storage.reserve_state("a.test")  # a second reservation keeps what is there

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module, "write_atomic", full)
    storage.save_state("a.test", {"failures": 1, "last_error": "No space left on device"})
    assert storage.load_state("a.test") == {"failures": 1, "last_error": "No space left on device"}
    assert path.stat().st_size == storage_module.STATE_SIZE
    # No reserved file to write over: the error is raised, as before.
    with pytest.raises(OSError):
        storage.save_state("b.test", {"failures": 1})
    # Other errors than a full file system are not papered over.
    monkeypatch.setattr(
        storage_module, "write_atomic", lambda *a, **k: (_ for _ in ()).throw(PermissionError())
    )
    with pytest.raises(PermissionError):
        storage.save_state("a.test", {})


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    storage = Storage(tmp_path)
    directory = storage.certificate_dir("a.test")
    directory.mkdir(parents=True)
    dead = directory / ".key.pem.999999999.0123456789ab.tmp"  # no such pid
    ours = directory / f".key.pem.{os.getpid()}.0123456789ab.tmp"  # a write in progress
    other = directory / "key.pem"
    for path in (dead, ours, other):
        path.write_bytes(b"x")
    assert storage.remove_stale_temp_files() == [dead]
    assert not dead.exists() and ours.exists() and other.exists()
