"""`[[site]] broken = "KIND"`: a site that serves a certificate clients must refuse (for tests)."""

from __future__ import annotations

import tomllib

import pytest

from certs.broken import BROKEN_KINDS
from proxy.certificates import cert_specs
from proxy.config import parse_config
from proxy.errors import ConfigError

from .test_config import BASE, MINIMAL

TWO_SITES = (
    MINIMAL
    + """
[[site]]
hosts = ["expired.test", "www.expired.test"]
upstream = "app"
broken = "expired"
"""
)


def with_broken(value: str, tls: str = "") -> str:
    return MINIMAL.replace('upstream = "app"', f'upstream = "app"\nbroken = {value}\n{tls}', 1)


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), BASE)
    return info.value


@pytest.mark.parametrize("kind", list(BROKEN_KINDS))
def test_every_kind_is_accepted_with_hosts_and_upstream_alone(kind: str) -> None:
    site = parse_config(tomllib.loads(with_broken(f'"{kind}"')), BASE).sites[0]
    assert site.broken == kind and site.tls == "internal"


def test_absent_means_a_good_certificate() -> None:
    assert parse_config(tomllib.loads(MINIMAL), BASE).sites[0].broken is None


def test_an_explicit_internal_tls_is_fine() -> None:
    text = with_broken('"self-signed"', 'tls = "internal"')
    assert parse_config(tomllib.loads(text), BASE).sites[0].broken == "self-signed"


@pytest.mark.parametrize("value", ['"expird"', '"Expired"', "true", "1", '["expired"]', '""'])
def test_anything_else_names_the_key_and_lists_the_kinds(value: str) -> None:
    exc = error(MINIMAL + TWO_SITES.removeprefix(MINIMAL).replace('"expired"', value, 1))
    assert exc.key == "site[1].broken"
    message = str(exc)
    assert "\n" not in message
    assert all(f"'{kind}'" in message for kind in BROKEN_KINDS), message


@pytest.mark.parametrize(
    ("tls", "said"),
    [('tls = "acme"', "not acme"), ('tls = { cert = "c.pem", key = "k.pem" }', "not files")],
)
def test_acme_or_files_cannot_be_broken(tls: str, said: str) -> None:
    exc = error(with_broken('"expired"', tls) + '[acme]\nemail = "a@b.test"\n')
    assert exc.key == "site[0].broken"
    assert "tls = 'internal'" in str(exc) and said in str(exc)


def test_the_kind_reaches_the_certificate_spec() -> None:
    specs = cert_specs(parse_config(tomllib.loads(TWO_SITES), BASE))
    assert [(s.name, s.hosts, s.source, s.broken) for s in specs] == [
        ("localhost", ("localhost",), "internal", None),
        ("expired.test", ("expired.test", "www.expired.test"), "internal", "expired"),
    ]
