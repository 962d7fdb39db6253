"""The storage lock between two real processes."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from certs.errors import LockTimeout
from certs.storage import Storage

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from certs.storage import Storage
    with Storage(Path(sys.argv[1])).lock("shared.test", timeout=5):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def start_holder(data_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_excludes_another_process(tmp_path):
    storage = Storage(tmp_path)
    proc = start_holder(tmp_path)
    try:
        with pytest.raises(LockTimeout) as info:
            with storage.lock("shared.test", timeout=0.3):
                pytest.fail("got a lock another process holds")
        assert f"pid {proc.pid}" in str(info.value)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
        with storage.lock("shared.test", timeout=2):
            pass
    finally:
        proc.kill()
        proc.wait(5)


def test_lock_of_a_killed_process_is_free(tmp_path):
    storage = Storage(tmp_path)
    proc = start_holder(tmp_path)
    proc.kill()  # no chance to clean up: the kernel drops the flock
    proc.wait(5)
    with storage.lock("shared.test", timeout=2):
        pass


def test_waiter_gets_lock_when_holder_releases(tmp_path):
    storage = Storage(tmp_path)
    proc = start_holder(tmp_path)

    def release():
        proc.stdin.write("go\n")
        proc.stdin.flush()

    timer = threading.Timer(0.3, release)
    timer.start()
    try:
        started = time.monotonic()
        with storage.lock("shared.test", timeout=5):  # waits for the holder, does not fail
            waited = time.monotonic() - started
        assert 0.2 < waited < 4
    finally:
        timer.cancel()
        proc.kill()
        proc.wait(5)
