"""The HTTP-01 responder the http listeners read."""

from __future__ import annotations

import pytest

from certs.challenges.http01 import Http01Responder, token_from_path


def test_only_pending_tokens_are_answered() -> None:
    responder = Http01Responder()
    assert responder.lookup("abc") is None
    responder.add("abc", "abc.thumbprint")
    assert responder.lookup("abc") == "abc.thumbprint"
    assert responder.lookup("abd") is None
    responder.remove("abc")
    assert responder.lookup("abc") is None
    responder.remove("abc")  # removing twice is fine (cleanup after a failure)
    assert len(responder) == 0


def test_a_token_must_be_base64url() -> None:
    with pytest.raises(ValueError):
        Http01Responder().add("../etc/passwd", "x")


@pytest.mark.parametrize(
    ("target", "token"),
    [
        ("/.well-known/acme-challenge/Ab-_9", "Ab-_9"),
        ("/.well-known/acme-challenge/Ab9?x=1", "Ab9"),
        ("/.well-known/acme-challenge/", None),
        ("/.well-known/acme-challenge/a/b", None),
        ("/.well-known/acme-challenge/a%2Fb", None),
        ("/.well-known/acme-challengeX/abc", None),
        ("/index.html", None),
    ],
)
def test_token_from_path(target: str, token: str | None) -> None:
    assert token_from_path(target) == token
