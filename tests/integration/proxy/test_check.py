"""`tlsproxy check` (and `run`) on broken configs: exit 2 and ONE stderr line naming the key or
the file at fault. Certificates are made here with `cryptography`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.harness import basic_config, tlsproxy, write_config
from tests.integration.proxy.support import Issued, issue, make_ca, proxy_config


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca()


def files_config(cert: Path, key: Path, *, limits: str = "") -> str:
    tls = f'{{ cert = "{cert}", key = "{key}" }}'
    return proxy_config(
        [(["files.test", "www.files.test"], "app", tls)], {"app": "127.0.0.1:9"}, limits=limits
    )


def check(tmp_path: Path, text: str, command: str = "check") -> tuple[int, list[str], str]:
    config = write_config(tmp_path, text)
    result = tlsproxy(command, "-c", str(config), timeout=30)
    return result.returncode, result.stderr.strip().splitlines(), result.stdout


def assert_one_line(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in lines[0]


@pytest.fixture
def good(tmp_path: Path, ca: Issued) -> tuple[Path, Path]:
    return issue(ca, ["files.test", "www.files.test"]).write(tmp_path / "certs", "good")


def test_a_good_config_passes(tmp_path: Path, good: tuple[Path, Path]) -> None:
    code, lines, out = check(tmp_path, files_config(*good))
    assert code == 0, lines
    assert "files.test" in out


def test_missing_cert_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    missing = tmp_path / "nowhere" / "cert.pem"
    code, lines, _ = check(tmp_path, files_config(missing, good[1]))
    assert_one_line(code, lines, str(missing))


def test_missing_key_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    missing = tmp_path / "nowhere" / "key.pem"
    code, lines, _ = check(tmp_path, files_config(good[0], missing))
    assert_one_line(code, lines, str(missing))


def test_unreadable_cert_a_directory(tmp_path: Path, good: tuple[Path, Path]) -> None:
    directory = tmp_path / "a-directory.pem"
    directory.mkdir()
    code, lines, _ = check(tmp_path, files_config(directory, good[1]))
    assert_one_line(code, lines, str(directory))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_key_chmod_000(tmp_path: Path, good: tuple[Path, Path]) -> None:
    good[1].chmod(0)
    code, lines, _ = check(tmp_path, files_config(*good))
    assert_one_line(code, lines, str(good[1]))


def test_expired_cert(tmp_path: Path, ca: Issued) -> None:
    cert, key = issue(
        ca, ["files.test", "www.files.test"], valid_from_days=-30, valid_until_days=-1
    ).write(tmp_path / "certs", "expired")
    code, lines, _ = check(tmp_path, files_config(cert, key))
    assert_one_line(code, lines, str(cert), "expired")


def test_key_not_matching_the_cert(tmp_path: Path, ca: Issued) -> None:
    cert, _ = issue(ca, ["files.test", "www.files.test"]).write(tmp_path / "a", "leaf")
    _, other_key = issue(ca, ["files.test", "www.files.test"]).write(tmp_path / "b", "leaf")
    code, lines, _ = check(tmp_path, files_config(cert, other_key))
    assert_one_line(code, lines, str(other_key))
    assert "match" in lines[0]


def test_cert_not_covering_the_sites_hosts(tmp_path: Path, ca: Issued) -> None:
    cert, key = issue(ca, ["files.test"]).write(tmp_path / "certs", "narrow")
    code, lines, _ = check(tmp_path, files_config(cert, key))
    assert_one_line(code, lines, str(cert), "www.files.test")


def test_not_a_pem_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    code, lines, _ = check(tmp_path, files_config(junk, good[1]))
    assert_one_line(code, lines, str(junk))


def test_unknown_key(tmp_path: Path, good: tuple[Path, Path]) -> None:
    code, lines, _ = check(tmp_path, files_config(*good, limits="max_bananas = 3"))
    assert_one_line(code, lines, "limits.max_bananas")


def test_bad_duration(tmp_path: Path, good: tuple[Path, Path]) -> None:
    code, lines, _ = check(tmp_path, files_config(*good, limits='idle_timeout = "10 parsecs"'))
    assert_one_line(code, lines, "limits.idle_timeout")


def test_bad_size(tmp_path: Path, good: tuple[Path, Path]) -> None:
    code, lines, _ = check(tmp_path, files_config(*good, limits='max_body_bytes = "lots"'))
    assert_one_line(code, lines, "limits.max_body_bytes")


def test_site_naming_an_undefined_upstream(tmp_path: Path) -> None:
    text = basic_config("127.0.0.1:9").replace('upstream = "app"', 'upstream = "nope"')
    code, lines, _ = check(tmp_path, text)
    assert_one_line(code, lines, "upstream")


def test_run_refuses_a_broken_config_the_same_way(tmp_path: Path, ca: Issued) -> None:
    cert, key = issue(
        ca, ["files.test", "www.files.test"], valid_from_days=-30, valid_until_days=-1
    ).write(tmp_path / "certs", "expired")
    code, lines, _ = check(tmp_path, files_config(cert, key), command="run")
    assert_one_line(code, lines, str(cert), "expired")
