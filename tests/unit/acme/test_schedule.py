"""The renewal decision with a fake clock: ratio, jitter bounds, ARI, backoff, Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from certs.acme_state import AcmeState, decide, failure_delay, forced_decision
from certs.models import CertInfo

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400.0
DIRECTORY = "https://ca.test/dir"


def info(days: float = 90, serial: int = 1234, hosts=("app.test",)) -> CertInfo:
    return CertInfo(
        subject="",
        issuer="CN=Test CA",
        serial=serial,
        not_before=T0,
        not_after=T0 + timedelta(days=days),
        hosts=tuple(hosts),
    )


def at(days: float) -> float:
    return (T0 + timedelta(days=days)).timestamp()


def test_no_certificate_is_due_now() -> None:
    d = decide(at(0), None, ["app.test"], AcmeState())
    assert d.at == at(0) and d.reason == "no certificate yet"


def test_renews_when_a_third_is_left_moved_earlier_by_at_most_five_percent() -> None:
    threshold = at(60)
    for serial in range(200):
        d = decide(at(1), info(serial=serial), ["app.test"], AcmeState())
        assert threshold - 0.05 * 90 * DAY <= d.at <= threshold
        assert d.reason == "1/3 of the lifetime left"
    spread = {decide(at(1), info(serial=s), ["app.test"], AcmeState()).at for s in range(50)}
    assert len(spread) > 40  # certificates issued together do not all renew at once


def test_jitter_is_stable_for_one_certificate_across_calls_and_processes() -> None:
    a = decide(at(1), info(serial=77), ["app.test"], AcmeState())
    b = decide(at(30), info(serial=77), ["app.test"], AcmeState())
    assert a.at == b.at


def test_other_ratio() -> None:
    d = decide(at(0), info(days=30, serial=5), ["app.test"], AcmeState(), ratio=0.8)
    assert at(6) - 0.05 * 30 * DAY <= d.at <= at(6)


def test_ari_time_from_the_ca_wins_for_that_certificate_only() -> None:
    state = AcmeState(ari_serial=1234, ari_renewal_at=at(10))
    d = decide(at(1), info(), ["app.test"], state)
    assert d.at == at(10) and "ARI" in d.reason
    other = decide(at(1), info(serial=99), ["app.test"], state)
    assert other.at > at(50)


def test_hosts_added_to_the_site_make_it_due_now() -> None:
    d = decide(at(1), info(), ["app.test", "new.test"], AcmeState())
    assert d.at == at(1) and "new.test not covered" in d.reason


def test_wildcard_covers_names_below_it() -> None:
    d = decide(at(1), info(hosts=("*.app.test",)), ["a.app.test"], AcmeState())
    assert d.at > at(50)


def test_expired_is_due_now() -> None:
    d = decide(at(91), info(), ["app.test"], AcmeState())
    assert d.at == at(91) and d.reason == "expired"


@pytest.mark.parametrize(
    ("failures", "minutes"), [(1, 1), (2, 2), (3, 4), (4, 8), (7, 64), (9, 256), (10, 360)]
)
def test_backoff_grows_from_minutes_to_hours(failures: int, minutes: float) -> None:
    assert failure_delay(failures, spread=0.0, remaining=None) == minutes * 60
    spread = failure_delay(failures, spread=0.999, remaining=None)
    assert 0.9 * minutes * 60 <= spread <= minutes * 60


def test_backoff_never_waits_past_a_quarter_of_what_the_certificate_has_left() -> None:
    assert failure_delay(10, spread=0.0, remaining=3600) == 900
    assert failure_delay(1, spread=0.0, remaining=10) == 60  # but never under the base


def test_failed_attempts_push_the_next_one_out() -> None:
    now = at(61)  # due since day 60
    state = AcmeState().failed(now, "boom", None, 0.0)
    d = decide(now, info(), ["app.test"], state)
    assert d.at == now + 60 and d.reason.startswith("retry after 1 failed attempt(s)")
    state = state.failed(now, "boom", None, 0.0).failed(now, "boom", None, 0.0)
    assert decide(now, info(), ["app.test"], state).at == now + 240
    state = state.succeeded(now, 1234, DIRECTORY)
    assert state.failures == 0 and state.last_error is None
    assert decide(now, info(), ["app.test"], state).at <= now


def test_no_certificate_backs_off_too() -> None:
    state = AcmeState().failed(at(0), "boom", None, 0.0)
    assert decide(at(0), None, ["app.test"], state).at == at(0) + 60


def test_retry_after_from_the_ca_is_honoured() -> None:
    state = AcmeState().failed(at(61), "rate limited", at(62), 0.0)
    d = decide(at(61), info(), ["app.test"], state)
    assert d.at == at(62) and "Retry-After" in d.reason


def test_test_sized_backoff() -> None:
    state = AcmeState().failed(100.0, "x", None, 0.0)
    d = decide(100.0, None, ["a.test"], state, base=0.5, cap=2.0)
    assert d.at == 100.5


def test_state_round_trips_and_keeps_the_keys_certificate_manager_reads() -> None:
    state = (
        AcmeState().failed(1000.0, "the CA said no", 2000.0, 0.25).with_ari(1234, 5000.0, 6000.0)
    )
    decision = decide(1000.0, info(), ["app.test"], state)
    saved = state.decided(decision, 1234)
    data = saved.to_dict()
    assert data["failures"] == 1 and data["last_error"] == "the CA said no"
    assert datetime.fromisoformat(data["next_attempt"]).timestamp() == decision.at
    assert data["ari"]["serial"] == 1234
    assert AcmeState.from_dict(data) == saved


def test_unreadable_state_is_an_empty_state() -> None:
    assert AcmeState.from_dict({"failures": "many", "acme": [], "ari": 3}) == AcmeState()


def test_a_certificate_not_issued_through_the_directory_is_replaced_now() -> None:
    ours = AcmeState().succeeded(at(0), 1234, DIRECTORY)
    assert decide(at(1), info(), ["app.test"], ours, directory=DIRECTORY).at > at(50)
    # Left over from tls = "internal" (no record), or issued by another CA (staging):
    for state in (AcmeState(), ours):
        d = decide(at(1), info(), ["app.test"], state, directory="https://other.test/dir")
        assert d.at == at(1) and d.reason == "not issued through https://other.test/dir"
    other_cert = decide(at(1), info(serial=99), ["app.test"], ours, directory=DIRECTORY)
    assert other_cert.at == at(1)


def test_the_same_state_gives_the_same_time_whenever_asked() -> None:
    # The manager compares decisions to know whether there is anything to record.
    state = AcmeState().failed(at(61), "boom", None, 0.3).failed(at(61), "boom", None, 0.3)
    times = {decide(at(61) + dt, info(), ["app.test"], state).at for dt in (0, 5, 500)}
    assert len(times) == 1


def test_asked_for_ari_without_an_answer_survives_a_round_trip() -> None:
    # Lost, the task would ask the CA again at every wake-up.
    state = AcmeState().with_ari(1234, None, 9999.0)
    assert AcmeState.from_dict(state.to_dict()) == state


def test_a_requested_renewal_is_now_whatever_the_schedule_and_backoff_say() -> None:
    failing = AcmeState(failures=5, last_error="x", last_attempt=at(1), retry_spread=0.5)
    assert decide(at(1), info(), ["app.test"], failing).at > at(1)
    d = forced_decision(at(1), failing)
    assert d.at == at(1) and d.reason == "renewal requested (tlsproxy certs renew)"


def test_a_requested_renewal_still_waits_for_the_cas_retry_after() -> None:
    held = AcmeState(failures=1, last_attempt=at(1), retry_after=at(1) + 3600)
    d = forced_decision(at(1), held)
    assert d.at == at(1) + 3600 and "Retry-After" in d.reason
    assert forced_decision(at(1) + 3601, held).at == at(1) + 3601
