from proxy.workers.restart_policy import RestartPolicy, RestartSettings

S = RestartSettings(base=0.5, factor=2.0, cap=4.0, stable_after=10.0, max_quick_exits=5)


def test_quick_exits_grow_the_backoff_up_to_the_cap() -> None:
    policy = RestartPolicy(RestartSettings(base=0.5, factor=2.0, cap=3.0, max_quick_exits=10))
    now, delays = 100.0, []
    for _ in range(6):
        delay = policy.on_exit(now + 1.0, started_at=now)
        assert delay is not None
        delays.append(delay)
        now += 1.0 + delay
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_crash_loop_after_max_quick_exits_in_a_row() -> None:
    policy = RestartPolicy(S)
    results = [policy.on_exit(float(i * 5 + 2), started_at=float(i * 5)) for i in range(5)]
    assert results[:4] == [0.5, 1.0, 2.0, 4.0]
    assert results[4] is None
    assert policy.gave_up


def test_a_stable_run_resets_the_count() -> None:
    policy = RestartPolicy(S)
    for i in range(4):  # four quick exits: one short of a crash loop
        assert policy.on_exit(float(i) + 1.0, started_at=float(i)) is not None
    # this one ran for exactly stable_after: it proved it can run
    assert policy.on_exit(100.0, started_at=90.0) == 0.5
    for i in range(3):
        assert policy.on_exit(101.0 + i, started_at=100.5 + i) is not None
    assert not policy.gave_up


def test_exit_just_before_stable_still_counts_as_quick() -> None:
    policy = RestartPolicy(S)
    delays = [policy.on_exit(t + 9.99, started_at=t) for t in (0.0, 20.0, 40.0, 60.0, 80.0)]
    assert delays[-1] is None


def test_reset_after_crash_loop_allows_a_fresh_start() -> None:
    policy = RestartPolicy(S)
    for i in range(5):
        policy.on_exit(float(i) + 0.1, started_at=float(i))
    assert policy.gave_up
    policy.reset()
    assert not policy.gave_up
    assert policy.on_exit(50.1, started_at=50.0) == 0.5
