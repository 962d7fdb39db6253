"""Pure renewal arithmetic: when a certificate is due, why, and how long to wait after a failure.

Times come in as arguments (`now`), never from a clock, so tests drive it with plain values.
A certificate is due when less than `ratio` of its lifetime remains (1/3 by default, as
Let's Encrypt recommends), or when the CA's ARI window (RFC 9773) has opened, or once expired.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

DEFAULT_RATIO = 1 / 3
DEFAULT_JITTER = 0.05
RETRY_BASE = 60.0  # seconds before the first retry
RETRY_CAP = 6 * 3600.0  # never wait longer than this between attempts
# Local-CA leaves live days, so that a copied leaf key is worth little and renewal runs often
# enough that it is known to work (certs.issuers.local_ca).
DEFAULT_LEAF_LIFETIME = timedelta(days=7)

AriWindow = tuple[datetime, datetime]  # (start, end) suggested by the CA


def renewal_threshold(not_before: datetime, not_after: datetime, ratio: float) -> datetime:
    """The moment when `ratio` of the lifetime remains."""
    return not_after - (not_after - not_before) * ratio


def needs_renewal(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    *,
    ratio: float = DEFAULT_RATIO,
    ari_window: AriWindow | None = None,
) -> bool:
    if now >= not_after:
        return True
    if ari_window is not None:
        # The CA knows better (e.g. a mass revocation is coming): follow it in both directions.
        return now >= ari_window[0]
    return now >= renewal_threshold(not_before, not_after, ratio)


def renewal_reason(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    *,
    ratio: float = DEFAULT_RATIO,
    ari_window: AriWindow | None = None,
) -> str:
    """Why the certificate will be (or is being) renewed, for `tlsproxy certs` and logs."""
    if now >= not_after:
        return "expired"
    if ari_window is not None:
        return "ARI window"
    return f"{_as_fraction(1 - ratio)} of lifetime"


def _as_fraction(value: float) -> str:
    """2/3 rather than 0.6666666666666667; a percentage when no small fraction fits."""
    for denominator in range(1, 13):
        numerator = round(value * denominator)
        if abs(value * denominator - numerator) < 1e-9:
            return f"{numerator}/{denominator}" if denominator > 1 else str(numerator)
    return f"{value:.0%}"


def renewal_time(
    not_before: datetime,
    not_after: datetime,
    *,
    ratio: float = DEFAULT_RATIO,
    jitter_fraction: float = DEFAULT_JITTER,
    rng: random.Random,
    ari_window: AriWindow | None = None,
) -> datetime:
    """When to renew. Jitter spreads many certificates issued together (and several proxies
    sharing them) over time; it only moves the time earlier, so that a jittered certificate is
    never renewed later than the ratio promises. With an ARI window, a uniform time inside it.
    """
    if ari_window is not None:
        start, end = ari_window
        return start + (end - start) * rng.random() if end > start else start
    lifetime = not_after - not_before
    earliest_shift = lifetime * max(0.0, jitter_fraction)
    when = renewal_threshold(not_before, not_after, ratio) - earliest_shift * rng.random()
    return max(when, not_before)


def retry_delay(attempt: int, *, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds to wait after the `attempt`-th consecutive failure (1-based): 1 min, 2, 4, ...
    up to `cap`."""
    exponent = max(0, attempt - 1)
    if exponent >= 64:  # 2**64 minutes is past any cap; avoid float overflow
        return cap
    return min(cap, base * (2**exponent))


def seconds_until(when: datetime, now: datetime) -> float:
    return max(0.0, (when - now) / timedelta(seconds=1))
