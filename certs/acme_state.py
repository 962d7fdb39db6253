"""Per-certificate ACME state and the pure renewal decision (no I/O; time comes in as `now`).

The state lives in storage's state.json for the certificate so that `tlsproxy certs` (another
process) shows what the running proxy decided. The keys `failures`, `next_attempt` (ISO time),
`last_error` and `ari` are the ones CertificateManager.status() reads as well; the rest is kept
under `acme`.

Decision, for one certificate:
- none stored yet, one that does not cover every host of the site, or one not recorded as
  issued through the configured ACME directory: now;
- else the CA's ARI time when it gave one, else when 1/3 of the lifetime is left, moved earlier
  by a jitter drawn from the serial (certs.renewal.renewal_time: the same certificate gets the
  same time in every process and after every restart);
- after failures: retry_delay (1 min doubling up to 6 h), never later than a quarter of the time
  the certificate still has, spread by up to 10 % with `rng`; never before the CA's Retry-After.
- on request (`tlsproxy certs renew`, forced_decision): now, unless the CA's Retry-After is
  still ahead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .models import CertInfo
from .renewal import DEFAULT_JITTER, DEFAULT_RATIO, RETRY_BASE, RETRY_CAP, renewal_time, retry_delay
from .selection import uncovered_hosts

RETRY_SPREAD = 0.1


@dataclass(frozen=True)
class AcmeState:
    failures: int = 0  # consecutive failed attempts since the last success
    last_error: str | None = None
    last_attempt: float | None = None  # epoch seconds
    retry_spread: float = 0.0  # in [0, 1), drawn at each failure
    retry_after: float | None = None  # the CA's Retry-After, as an epoch time
    ari_serial: int | None = None  # the certificate the ARI answer is about
    ari_renewal_at: float | None = None
    ari_next_check: float | None = None
    next_renewal: float | None = None  # the running proxy's last decision, for `certs`
    reason: str | None = None
    decided_for: int | None = None  # serial the decision was made for (None: no certificate)
    issued_serial: int | None = None  # the certificate the ACME CA below issued to us
    issued_directory: str | None = None

    # -- state.json --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"failures": self.failures}
        if self.last_error is not None:
            data["last_error"] = self.last_error
        if self.next_renewal is not None:
            data["next_attempt"] = datetime.fromtimestamp(self.next_renewal, UTC).isoformat()
        if self.ari_serial is not None and self.ari_renewal_at is not None:
            at = datetime.fromtimestamp(self.ari_renewal_at, UTC).isoformat()
            data["ari"] = {"serial": self.ari_serial, "start": at, "end": at}
        data["acme"] = {
            "last_attempt": self.last_attempt,
            "retry_spread": self.retry_spread,
            "retry_after": self.retry_after,
            "ari_serial": self.ari_serial,
            "ari_renewal_at": self.ari_renewal_at,
            "ari_next_check": self.ari_next_check,
            "next_renewal": self.next_renewal,
            "reason": self.reason,
            "decided_for": self.decided_for,
            "issued_serial": self.issued_serial,
            "issued_directory": self.issued_directory,
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcmeState:
        acme = data.get("acme") if isinstance(data.get("acme"), dict) else {}
        return cls(
            failures=_int(data.get("failures")) or 0,
            last_error=_str(data.get("last_error")),
            last_attempt=_num(acme.get("last_attempt")),
            retry_spread=_num(acme.get("retry_spread")) or 0.0,
            retry_after=_num(acme.get("retry_after")),
            ari_serial=_int(acme.get("ari_serial")),
            ari_renewal_at=_num(acme.get("ari_renewal_at")),
            ari_next_check=_num(acme.get("ari_next_check")),
            next_renewal=_num(acme.get("next_renewal")),
            reason=_str(acme.get("reason")),
            decided_for=_int(acme.get("decided_for")),
            issued_serial=_int(acme.get("issued_serial")),
            issued_directory=_str(acme.get("issued_directory")),
        )

    # -- transitions -------------------------------------------------------------------------
    def failed(self, now: float, error: str, retry_after: float | None, spread: float) -> AcmeState:
        return replace(
            self,
            failures=self.failures + 1,
            last_error=error,
            last_attempt=now,
            retry_spread=spread,
            retry_after=retry_after,
        )

    def succeeded(self, now: float, serial: int, directory: str) -> AcmeState:
        return replace(
            self,
            issued_serial=serial,
            issued_directory=directory,
            failures=0,
            last_error=None,
            last_attempt=now,
            retry_after=None,
            ari_serial=None,
            ari_renewal_at=None,
            ari_next_check=None,
        )

    def with_ari(self, serial: int, renewal_at: float | None, next_check: float) -> AcmeState:
        return replace(
            self, ari_serial=serial, ari_renewal_at=renewal_at, ari_next_check=next_check
        )

    def decided(self, decision: Decision, serial: int | None) -> AcmeState:
        return replace(self, next_renewal=decision.at, reason=decision.reason, decided_for=serial)


@dataclass(frozen=True)
class Decision:
    at: float  # epoch seconds; <= now means "order now"
    reason: str


def failure_delay(
    failures: int,
    *,
    spread: float,
    remaining: float | None,
    base: float = RETRY_BASE,
    cap: float = RETRY_CAP,
) -> float:
    """Seconds from the `failures`-th failed attempt in a row to the next attempt."""
    delay = retry_delay(failures, base=base, cap=cap)
    if remaining is not None and remaining > 0:
        delay = min(delay, remaining / 4)  # several more tries before the old one expires
    return max(base, delay) * (1 - RETRY_SPREAD * spread)


def decide(
    now: float,
    info: CertInfo | None,
    hosts: Sequence[str],
    state: AcmeState,
    *,
    directory: str | None = None,
    ratio: float = DEFAULT_RATIO,
    jitter_fraction: float = DEFAULT_JITTER,
    base: float = RETRY_BASE,
    cap: float = RETRY_CAP,
) -> Decision:
    """When to order next for one certificate, and why. With `directory`, a certificate that
    the state does not record as issued through that ACME directory is replaced at once."""
    if info is None:
        due, reason = now, "no certificate yet"
    else:
        missing = uncovered_hosts(hosts, info.hosts)
        ari_at = state.ari_renewal_at if state.ari_serial == info.serial else None
        if missing:
            due, reason = now, f"hosts changed: {', '.join(missing)} not covered"
        elif directory is not None and (
            state.issued_serial != info.serial or state.issued_directory != directory
        ):
            # E.g. left over from tls = "internal", or from another CA (staging -> production).
            due, reason = now, f"not issued through {directory}"
        elif info.not_after.timestamp() <= now:
            due, reason = now, "expired"
        elif ari_at is not None:
            due, reason = ari_at, "renewal time from the CA (ARI)"
        else:
            when = renewal_time(
                info.not_before,
                info.not_after,
                ratio=ratio,
                jitter_fraction=jitter_fraction,
                rng=random.Random(info.serial),
            )
            due, reason = when.timestamp(), f"{_fraction(ratio)} of the lifetime left"
    if state.failures and state.last_attempt is not None:
        # Measured at the failed attempt, not now: the same state always gives the same time.
        remaining = info.not_after.timestamp() - state.last_attempt if info is not None else None
        retry = state.last_attempt + failure_delay(
            state.failures, spread=state.retry_spread, remaining=remaining, base=base, cap=cap
        )
        if retry > due:
            due, reason = retry, f"retry after {state.failures} failed attempt(s); {reason}"
    if state.retry_after is not None and state.retry_after > due:
        due, reason = state.retry_after, f"the CA asked to wait (Retry-After); {reason}"
    return Decision(due, reason)


FORCED_REASON = "renewal requested (tlsproxy certs renew)"


def forced_decision(now: float, state: AcmeState) -> Decision:
    """`tlsproxy certs renew`: order now, whatever the schedule and the failure back-off say
    (the person asking has usually just fixed the cause); only the CA's Retry-After still
    holds, since ordering before it would fail again and count against the limits."""
    if state.retry_after is not None and state.retry_after > now:
        return Decision(state.retry_after, f"{FORCED_REASON}; the CA asked to wait (Retry-After)")
    return Decision(now, FORCED_REASON)


def _fraction(ratio: float) -> str:
    return "1/3" if abs(ratio - 1 / 3) < 1e-9 else f"{ratio:.0%}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
