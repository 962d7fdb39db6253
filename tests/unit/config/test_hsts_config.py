"""`[[site]] hsts`: checked at load, the header line made once per site."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError


def load(hsts: object | None) -> object:
    site: dict[str, object] = {"hosts": ["a.test"], "upstream": "app"}
    if hsts is not None:
        site["hsts"] = hsts
    data = {"site": [{"hosts": ["b.test"], "upstream": "app"}, site]}
    data["upstream"] = {"app": {"servers": ["127.0.0.1:8000"]}}
    return parse_config(data, Path("/"))


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("max-age=300", "max-age=300"),
        (
            "max-age=63072000; includeSubDomains; preload",
            "max-age=63072000; includeSubDomains; preload",
        ),
        (' MAX-AGE = "0300" ;includesubdomains;', "max-age=300; includeSubDomains"),
        ("includeSubDomains; max-age=0", "includeSubDomains; max-age=0"),
    ],
)
def test_good_values_are_sent_in_canonical_form(value: str, sent: str) -> None:
    site = load(value).sites[1]  # type: ignore[attr-defined]
    assert site.hsts == sent
    assert site.hsts_header == b"strict-transport-security: " + sent.encode() + b"\r\n"


def test_off_by_default() -> None:
    site = load(None).sites[1]  # type: ignore[attr-defined]
    assert site.hsts is None and site.hsts_header is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        300,
        True,
        "includeSubDomains",
        "max-age",
        "max-age=",
        "max-age=-1",
        "max-age=1.5",
        "max-age=1; max-age=2",
        "max-age=1; preload=1",
        "max-age=1; includeSubdomain",
        "max-age=1\r\nSet-Cookie: x=1",
        "max-age=1;\n includeSubDomains",
    ],
)
def test_bad_values_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load(value)
    assert caught.value.key == "site[1].hsts"
