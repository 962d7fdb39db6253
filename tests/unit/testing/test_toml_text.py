"""The TOML writer round-trips what proxy.testing writes, through tomllib."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.testing.process import merge
from proxy.testing.toml_text import dumps

DOCUMENTS = [
    {"server": {"https": ["127.0.0.1:1"], "http": [], "shutdown_grace": "2s"}},
    {
        "server": {"data_dir": '/tmp/a b/"quoted"\\ü\n'},
        "site": [
            {"hosts": ["a.test", "*.b.test"], "upstream": "app"},
            {
                "hosts": ["c.test"],
                "upstream": "app",
                "client_auth": {"ca": "internal", "required": True},
            },
        ],
        "upstream": {"app": {"servers": ["127.0.0.1:8000"], "workers": 2, "env": {"A B": "1"}}},
        "limits": {"idle_timeout": 1.5, "max_connections": 10},
    },
    {"top": 1, "nested": {"deeper": {"x": False}}, "empty": {}},
]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_round_trip(document: dict) -> None:
    assert tomllib.loads(dumps(document)) == document


def test_none_leaves_the_key_out_and_paths_are_strings() -> None:
    text = dumps({"a": None, "t": {"p": Path("/x"), "n": None}})
    assert tomllib.loads(text) == {"t": {"p": "/x"}}


def test_what_toml_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_merge_adds_sites_merges_tables_and_replaces_the_rest() -> None:
    base = {
        "server": {"https": ["127.0.0.1:1"], "http": []},
        "site": [{"hosts": ["a.test"]}],
        "upstream": {"app": {"servers": ["x:1"]}},
    }
    merged = merge(
        base,
        {
            "server": {"http": ["127.0.0.1:0"]},
            "site": [{"hosts": ["b.test"]}],
            "upstream": {"other": {"servers": ["y:2"]}},
            "limits": {"idle_timeout": "1s"},
        },
    )
    assert merged["server"] == {"https": ["127.0.0.1:1"], "http": ["127.0.0.1:0"]}
    assert [s["hosts"] for s in merged["site"]] == [["a.test"], ["b.test"]]
    assert set(merged["upstream"]) == {"app", "other"}
    assert merged["limits"] == {"idle_timeout": "1s"}
    assert base["site"] == [{"hosts": ["a.test"]}]  # the base is not touched
