from proxy.config import UpstreamConfig
from proxy.upstream.health import ServerHealth, retry_after


def health(**kw: float) -> ServerHealth:
    base = {"fail_timeout": 10.0, "healthy_threshold": 2, "unhealthy_threshold": 3}
    base.update(kw)
    return ServerHealth(**base)  # type: ignore[arg-type]


def test_from_config() -> None:
    cfg = UpstreamConfig(name="x", fail_timeout=7.0, healthy_threshold=4, unhealthy_threshold=5)
    h = ServerHealth.from_config(cfg, initially_up=False)
    assert (h.fail_timeout, h.healthy_threshold, h.unhealthy_threshold) == (7.0, 4, 5)
    assert not h.is_up(0.0)


def test_passive_failure_takes_it_down_for_fail_timeout() -> None:
    h = health()
    assert h.is_up(100.0)
    h.record_failure(100.0)
    assert not h.is_up(100.0)
    assert not h.is_up(109.999)
    assert h.is_up(110.0)


def test_a_later_failure_extends_the_cool_down() -> None:
    h = health()
    h.record_failure(100.0)
    h.record_failure(105.0)
    assert not h.is_up(112.0)
    assert h.is_up(115.0)


def test_success_clears_a_passive_mark() -> None:
    h = health()
    h.record_failure(100.0)
    h.record_success(101.0)
    assert h.is_up(101.0)


def test_active_down_after_unhealthy_threshold_consecutive_fails() -> None:
    h = health()
    assert h.probe_result(False, 1.0) is False
    assert h.probe_result(False, 2.0) is False
    assert h.is_up(2.0)
    assert h.probe_result(False, 3.0) is True
    assert not h.is_up(3.0)
    assert h.probe_result(False, 4.0) is False  # already down: no second transition


def test_a_pass_between_fails_restarts_the_count() -> None:
    h = health()
    for ok in (False, False, True, False, False):
        h.probe_result(ok, 0.0)
    assert h.is_up(0.0)


def test_active_up_again_after_healthy_threshold_passes() -> None:
    h = health()
    for t in range(3):
        h.probe_result(False, float(t))
    assert h.probe_result(True, 10.0) is False
    assert not h.is_up(10.0)
    assert h.probe_result(True, 11.0) is True
    assert h.is_up(11.0)


def test_fail_pass_fail_while_down_needs_two_passes_in_a_row() -> None:
    h = health()
    for t in range(3):
        h.probe_result(False, float(t))
    for ok in (True, False, True):
        h.probe_result(ok, 5.0)
    assert not h.is_up(5.0)
    h.probe_result(True, 6.0)
    assert h.is_up(6.0)


def test_active_down_wins_over_an_expired_passive_mark() -> None:
    h = health()
    h.record_failure(0.0)
    for t in range(3):
        h.probe_result(False, float(t))
    assert not h.is_up(100.0)


def test_recovery_by_probes_clears_the_passive_mark_too() -> None:
    h = health(fail_timeout=60.0)
    for t in range(3):
        h.probe_result(False, float(t))
    h.record_failure(3.0)
    h.probe_result(True, 4.0)
    h.probe_result(True, 5.0)
    assert h.is_up(5.0)


def test_up_again_in_and_retry_after() -> None:
    passive = health()
    passive.record_failure(100.0)
    active = health()
    for t in range(3):
        active.probe_result(False, float(t))
    active.probe_result(True, 50.0)  # one of two passes done
    assert passive.up_again_in(104.0, interval=5.0) == 6.0
    assert active.up_again_in(104.0, interval=5.0) == 5.0
    assert retry_after([passive, active], 104.0, interval=5.0) == 5
    assert retry_after([passive], 109.5, interval=5.0) == 1  # rounded up, at least 1
    assert retry_after([], 0.0, interval=5.0) == 5
