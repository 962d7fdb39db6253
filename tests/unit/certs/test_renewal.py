import random
from datetime import timedelta

import pytest

from certs.renewal import (
    needs_renewal,
    renewal_reason,
    renewal_threshold,
    renewal_time,
    retry_delay,
)

from .factory import NOW

START = NOW
END = NOW + timedelta(days=90)  # a Let's Encrypt-like lifetime: due at day 60


def test_ratio_boundary():
    assert not needs_renewal(START, END, START + timedelta(days=60) - timedelta(seconds=1))
    assert needs_renewal(START, END, START + timedelta(days=60))
    assert not needs_renewal(START, END, START + timedelta(days=44), ratio=0.5)
    assert needs_renewal(START, END, START + timedelta(days=45), ratio=0.5)


def test_expired_is_always_due():
    window = (END + timedelta(days=10), END + timedelta(days=11))
    assert needs_renewal(START, END, END, ari_window=window)
    assert renewal_reason(START, END, END, ari_window=window) == "expired"


def test_ari_window_overrides_ratio_both_ways():
    early = (START + timedelta(days=10), START + timedelta(days=12))
    assert needs_renewal(START, END, START + timedelta(days=10), ari_window=early)
    assert not needs_renewal(START, END, START + timedelta(days=9), ari_window=early)
    late = (START + timedelta(days=70), START + timedelta(days=72))
    assert not needs_renewal(START, END, START + timedelta(days=65), ari_window=late)
    assert renewal_reason(START, END, START, ari_window=late) == "ARI window"


def test_reason_names_the_fraction():
    assert renewal_reason(START, END, START) == "2/3 of lifetime"
    assert renewal_reason(START, END, START, ratio=0.5) == "1/2 of lifetime"


def test_jitter_stays_within_bounds_and_varies():
    threshold = renewal_threshold(START, END, 1 / 3)
    earliest = threshold - (END - START) * 0.1
    times = [
        renewal_time(START, END, ratio=1 / 3, jitter_fraction=0.1, rng=random.Random(seed))
        for seed in range(500)
    ]
    assert all(earliest <= t <= threshold for t in times)
    assert len(set(times)) > 400
    # spread over most of the allowed range, not bunched at one end
    assert min(times) - earliest < timedelta(days=1)
    assert threshold - max(times) < timedelta(days=1)


def test_no_jitter_is_exact_and_same_seed_same_time():
    exact = renewal_time(START, END, ratio=1 / 3, jitter_fraction=0, rng=random.Random(1))
    assert exact == START + timedelta(days=60)
    a = renewal_time(START, END, jitter_fraction=0.1, rng=random.Random(42))
    b = renewal_time(START, END, jitter_fraction=0.1, rng=random.Random(42))
    assert a == b


def test_jitter_never_before_issuance():
    t = renewal_time(START, END, ratio=0.9, jitter_fraction=0.5, rng=random.Random(3))
    assert t >= START


def test_ari_time_inside_window():
    window = (START + timedelta(days=50), START + timedelta(days=52))
    for seed in range(50):
        t = renewal_time(START, END, rng=random.Random(seed), ari_window=window)
        assert window[0] <= t <= window[1]


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [
        (0, 60),
        (1, 60),
        (2, 120),
        (3, 240),
        (5, 960),
        (9, 15360),
        (10, 6 * 3600),
        (10_000, 6 * 3600),
    ],
)
def test_retry_delay_grows_then_caps(attempt, seconds):
    assert retry_delay(attempt) == seconds


def test_retry_delay_custom_base_and_cap():
    assert [retry_delay(a, base=0.5, cap=3) for a in range(1, 6)] == [0.5, 1, 2, 3, 3]
