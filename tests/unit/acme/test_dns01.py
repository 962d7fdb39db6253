"""TSIG key files (BIND format) and DNS-01 record names; pure, no DNS traffic."""

from __future__ import annotations

import base64

import pytest

from certs.challenges.dns01 import (
    TxtRecord,
    challenge_record_name,
    load_tsig_key,
    parse_tsig_key,
    records_for,
)
from certs.errors import CertificateFileError

SECRET = "8fMvqCpeV0Pq0EYhP18BVo8uqyLKT/J1QkT5hf0j2Q4="
TSIG_KEYGEN = f'key "acme-update" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'


def test_parses_what_tsig_keygen_writes() -> None:
    key = parse_tsig_key(TSIG_KEYGEN)
    assert key.name == "acme-update"
    assert key.algorithm == "hmac-sha256"
    assert key.secret == base64.b64decode(SECRET)
    dns_key = key.dns_key()
    assert str(dns_key.name) == "acme-update." and str(dns_key.algorithm) == "hmac-sha256."


def test_comments_unquoted_name_and_upper_case_algorithm() -> None:
    text = (
        '// made by hand\n# another comment\n/* block\n key "not-this" { }; */\n'
        f'key update-key {{ algorithm HMAC-SHA512; secret "{SECRET}"; }};'
    )
    key = parse_tsig_key(text)
    assert (key.name, key.algorithm) == ("update-key", "hmac-sha512")


def test_first_of_several_keys_is_used() -> None:
    second = TSIG_KEYGEN.replace("acme-update", "other")
    assert parse_tsig_key(TSIG_KEYGEN + second).name == "acme-update"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no key statement"),
        ("just some text", "no key statement"),
        (f'key "k" {{ secret "{SECRET}"; }};', 'key "k" has no algorithm'),
        ('key "k" { algorithm hmac-sha256; };', 'key "k" has no secret'),
        (f'key "k" {{ algorithm rot13; secret "{SECRET}"; }};', "unknown algorithm 'rot13'"),
        ('key "k" { algorithm hmac-sha256; secret "not base64!"; };', "not valid base64"),
        ('key "k" { algorithm hmac-sha256; secret ""; };', "secret is empty"),
    ],
)
def test_unusable_key_files_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_tsig_key(text)


def test_load_names_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(CertificateFileError) as info:
        load_tsig_key(missing)
    assert info.value.path == missing and "cannot read TSIG key file" in info.value.reason

    broken = tmp_path / "broken.key"
    broken.write_text('key "k" { algorithm hmac-sha256; };')
    with pytest.raises(CertificateFileError) as info:
        load_tsig_key(broken)
    assert info.value.path == broken and "has no secret" in info.value.reason

    good = tmp_path / "good.key"
    good.write_text(TSIG_KEYGEN)
    assert load_tsig_key(good).name == "acme-update"


def test_record_names_wildcard_shares_the_apex_name() -> None:
    assert challenge_record_name("app.test") == "_acme-challenge.app.test."
    assert challenge_record_name("*.app.test") == "_acme-challenge.app.test."
    assert challenge_record_name("app.test.") == "_acme-challenge.app.test."


def test_apex_and_wildcard_are_two_values_at_one_name_duplicates_dropped() -> None:
    records = records_for([("app.test", "v1"), ("*.app.test", "v2"), ("app.test", "v1")])
    assert records == [
        TxtRecord("_acme-challenge.app.test.", "v1"),
        TxtRecord("_acme-challenge.app.test.", "v2"),
    ]
