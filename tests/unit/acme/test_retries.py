"""Request retry rules (badNonce, 429/503 with Retry-After) and the challenge plan; the
transport is replaced by in-memory fakes only around this pure decision logic."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import josepy as jose
import pytest
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec

from certs.issuers.acme import (
    NONCE_RETRIES,
    AcmeError,
    AcmeStopped,
    _Network,
    challenge_error,
    challenge_type_for,
    parse_retry_after,
    plan_challenges,
    retry_delay,
)

TOKEN = "dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHQ"
KEY = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def test_parse_retry_after() -> None:
    now = 1_000_000.0
    assert parse_retry_after("120", now) == 120
    when = datetime.fromtimestamp(now, UTC) + timedelta(seconds=90)
    assert parse_retry_after(format_datetime(when, usegmt=True), now) == pytest.approx(90)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_retry_rules() -> None:
    assert retry_delay("badNonce", 400, None, 0) == 0
    assert retry_delay("badNonce", 400, None, NONCE_RETRIES - 1) == 0
    assert retry_delay("badNonce", 400, None, NONCE_RETRIES) is None
    assert retry_delay(None, 503, 5.0, 0) == 5.0  # short Retry-After: wait it out
    assert retry_delay(None, 503, None, 0) == 1.0
    assert retry_delay(None, 503, 5.0, 3) is None  # but not forever
    assert retry_delay("rateLimited", 429, 3600.0, 0) is None  # long: left to the scheduler
    assert retry_delay("rateLimited", 429, None, 0) is None
    assert retry_delay("unauthorized", 403, None, 0) is None
    assert retry_delay("serverInternal", 500, None, 0) is None


class _Clock(threading.Event):
    """A stop event whose wait() records the delay instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return self.is_set()


def _failing(net: _Network, failures: list[tuple[str | None, int, float | None]]):
    calls = []

    def send():
        calls.append(1)
        if len(calls) <= len(failures):
            code, status, after = failures[len(calls) - 1]
            net._last = (status, after)
            raise messages.Error.with_code(code) if code else messages.Error(detail="busy")
        return "response"

    return send, calls


def test_bad_nonce_retried_more_than_once() -> None:
    stop = _Clock()
    net = _Network(KEY, verify=True, stop=stop)
    send, calls = _failing(net, [("badNonce", 400, None)] * 5)
    assert net._retrying(send) == "response"
    assert len(calls) == 6 and stop.waits == []


def test_bad_nonce_gives_up_after_the_limit() -> None:
    net = _Network(KEY, verify=True, stop=_Clock())
    send, calls = _failing(net, [("badNonce", 400, None)] * (NONCE_RETRIES + 1))
    with pytest.raises(messages.Error, match="badNonce"):
        net._retrying(send)
    assert len(calls) == NONCE_RETRIES + 1


def test_short_retry_after_on_503_is_waited_out() -> None:
    stop = _Clock()
    net = _Network(KEY, verify=True, stop=stop)
    send, _ = _failing(net, [(None, 503, 7.0)])
    assert net._retrying(send) == "response"
    assert stop.waits == [7.0]


def test_long_retry_after_surfaces_for_the_scheduler() -> None:
    net = _Network(KEY, verify=True, stop=_Clock())
    send, _ = _failing(net, [("rateLimited", 429, 3600.0)])
    with pytest.raises(AcmeError) as info:
        net._retrying(send)
    assert info.value.retry_after is not None and "Retry-After 3600s" in str(info.value)


def test_stop_ends_the_wait() -> None:
    stop = _Clock()
    stop.set()
    net = _Network(KEY, verify=True, stop=stop)
    send, _ = _failing(net, [(None, 503, 7.0)])
    with pytest.raises(AcmeStopped):
        net._retrying(send)


# -- challenge plan ---------------------------------------------------------------------------


def _authz(host: str, status: str, wildcard: bool = False, types=("http-01", "dns-01")):
    body = {
        "identifier": {"type": "dns", "value": host},
        "status": status,
        "challenges": [
            {
                "type": t,
                "url": f"https://ca.test/chall/{host}/{t}",
                "token": TOKEN,
                "status": "pending",
            }
            for t in types
        ],
    }
    if wildcard:
        body["wildcard"] = True
    return messages.AuthorizationResource(
        body=messages.Authorization.from_json(body), uri=f"https://ca.test/authz/{host}"
    )


def test_wildcard_is_always_dns01() -> None:
    assert challenge_type_for("*.app.test", "http-01", "http-01") == "dns-01"
    assert challenge_type_for("app.test", "dns-01", "http-01") == "dns-01"
    assert challenge_type_for("app.test", None, "http-01") == "http-01"


def test_plan_skips_valid_authorizations_and_picks_types() -> None:
    authzs = [
        _authz("app.test", "valid"),
        _authz("www.app.test", "pending"),
        _authz("app.test", "pending", wildcard=True, types=("dns-01",)),
    ]
    plan = plan_challenges(authzs, KEY, lambda host: "http-01")
    assert [(p.host, p.type) for p in plan] == [
        ("www.app.test", "http-01"),
        ("*.app.test", "dns-01"),
    ]
    http = plan[0]
    assert http.token == TOKEN
    assert http.validation.startswith(TOKEN + ".")  # key authorization = token.thumbprint
    assert "." not in plan[1].validation  # the TXT value is a bare digest


def test_plan_fails_clearly_when_the_type_is_not_offered_or_authz_is_dead() -> None:
    with pytest.raises(AcmeError, match=r"offers no dns-01 challenge for app\.test"):
        plan_challenges(
            [_authz("app.test", "pending", types=("http-01",))], KEY, lambda h: "dns-01"
        )
    with pytest.raises(AcmeError, match=r"authorization for app\.test is invalid"):
        plan_challenges([_authz("app.test", "invalid")], KEY, lambda h: "http-01")


def test_challenge_error_quotes_the_ca() -> None:
    body = messages.Authorization.from_json(
        {
            "identifier": {"type": "dns", "value": "app.test"},
            "status": "invalid",
            "challenges": [
                {
                    "type": "http-01",
                    "url": "https://ca.test/c",
                    "token": TOKEN,
                    "status": "invalid",
                    "error": {
                        "type": "urn:ietf:params:acme:error:connection",
                        "detail": "connection refused",
                    },
                }
            ],
        }
    )
    text = challenge_error(body)
    assert text.startswith("app.test: authorization invalid: http-01: ")
    assert "urn:ietf:params:acme:error:connection" in text and "connection refused" in text
