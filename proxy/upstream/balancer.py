"""Which server gets the next request (pure; the caller passes only servers that are up).

- round_robin: the candidates in turn.
- least_conn: the candidate with the fewest outstanding requests; ties go round robin, so an
  idle pool still spreads requests instead of sending every one to the first server.

A balancer keeps one counter, not a position in a list: the candidate list may change between
calls (servers going down, workers being replaced) and the counter still rotates over whatever
list it is given. Called once per request, so it does no allocation beyond the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Balancer(Generic[T]):
    policy = ""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[T], outstanding: Callable[[T], int]) -> T | None:
        raise NotImplementedError


class RoundRobin(Balancer[T]):
    policy = "round_robin"

    def choose(self, candidates: Sequence[T], outstanding: Callable[[T], int]) -> T | None:
        n = len(candidates)
        if n == 0:
            return None
        turn = self._turn
        self._turn = turn + 1
        return candidates[turn % n]


class LeastConn(Balancer[T]):
    policy = "least_conn"

    def choose(self, candidates: Sequence[T], outstanding: Callable[[T], int]) -> T | None:
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        best = candidates[0]
        best_load = outstanding(best)
        ties = 1
        for i in range(1, n):
            load = outstanding(candidates[i])
            if load < best_load:
                best, best_load, ties = candidates[i], load, 1
            elif load == best_load:
                ties += 1
        if ties == 1:
            return best
        # Rotate among the tied ones only, so that a busier server elsewhere in the list does
        # not skew the turns towards whichever tied server follows it.
        turn = self._turn % ties
        self._turn += 1
        for candidate in candidates:
            if outstanding(candidate) == best_load:
                if turn == 0:
                    return candidate
                turn -= 1
        return best  # pragma: no cover - loads changed under us; still a fair answer


def make(policy: str) -> Balancer:
    """A balancer for a config `balance` value ("least_conn" or "round_robin")."""
    if policy == "least_conn":
        return LeastConn()
    if policy == "round_robin":
        return RoundRobin()
    raise ValueError(f"unknown balance policy {policy!r}")
