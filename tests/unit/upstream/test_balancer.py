from collections import Counter

import pytest

from proxy.upstream.balancer import LeastConn, RoundRobin, make


def none(_: str) -> int:
    return 0


def test_make_by_policy_name() -> None:
    assert isinstance(make("least_conn"), LeastConn)
    assert isinstance(make("round_robin"), RoundRobin)
    with pytest.raises(ValueError):
        make("random")


@pytest.mark.parametrize("policy", ["least_conn", "round_robin"])
def test_no_candidates_gives_none(policy: str) -> None:
    assert make(policy).choose([], none) is None


@pytest.mark.parametrize("policy", ["least_conn", "round_robin"])
def test_single_candidate(policy: str) -> None:
    b = make(policy)
    assert [b.choose(["a"], none) for _ in range(3)] == ["a", "a", "a"]


def test_round_robin_takes_turns_and_ignores_load() -> None:
    b = RoundRobin()
    load = {"a": 100, "b": 0, "c": 0}
    assert [b.choose(["a", "b", "c"], load.__getitem__) for _ in range(6)] == list("abcabc")


def test_round_robin_survives_a_shrinking_list() -> None:
    b = RoundRobin()
    picks = [b.choose(["a", "b", "c"], none) for _ in range(2)]
    picks += [b.choose(["a", "c"], none) for _ in range(4)]  # "b" went down
    assert picks[:2] == ["a", "b"]
    assert Counter(picks[2:]) == {"a": 2, "c": 2}


def test_least_conn_picks_the_least_loaded() -> None:
    b = LeastConn()
    load = {"a": 3, "b": 1, "c": 2}
    for _ in range(5):
        assert b.choose(["a", "b", "c"], load.__getitem__) == "b"


def test_least_conn_ties_rotate() -> None:
    b = LeastConn()
    load = {"a": 1, "b": 1, "c": 5}
    picks = [b.choose(["a", "b", "c"], load.__getitem__) for _ in range(6)]
    assert set(picks) == {"a", "b"}
    assert Counter(picks)["a"] == Counter(picks)["b"]


def test_least_conn_spreads_an_idle_pool_evenly() -> None:
    b = LeastConn()
    picks = Counter(b.choose(["a", "b", "c"], none) for _ in range(300))
    assert picks == {"a": 100, "b": 100, "c": 100}


def test_least_conn_tracks_load_as_requests_start() -> None:
    # requests that never finish: each choice adds one; the spread must stay even
    b = LeastConn()
    load = {"a": 0, "b": 0, "c": 0}
    for _ in range(9):
        pick = b.choose(["a", "b", "c"], load.__getitem__)
        assert pick is not None
        load[pick] += 1
    assert load == {"a": 3, "b": 3, "c": 3}
