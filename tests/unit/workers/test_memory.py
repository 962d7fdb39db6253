import os

import pytest

from proxy.workers.memory import (
    MEMORY_SHARE,
    auto_workers,
    parse_meminfo_available,
    parse_status_rss,
    plan_workers,
    read_rss,
    read_rss_tree,
)

MiB = 1024 * 1024


def test_auto_is_two_per_core_plus_one() -> None:
    assert auto_workers(1) == 3
    assert auto_workers(2) == 5
    assert auto_workers(8) == 17
    assert auto_workers(0) == 3  # a nonsense CPU count still runs something


def test_fixed_count_that_fits_is_kept_without_message() -> None:
    plan = plan_workers(4, cpus=2, first_rss=100 * MiB, available=2000 * MiB)
    assert (plan.count, plan.fits, plan.message) == (4, True, None)


def test_auto_that_fits_gives_the_full_rule() -> None:
    plan = plan_workers("auto", cpus=2, first_rss=50 * MiB, available=4000 * MiB)
    assert (plan.count, plan.wanted, plan.fits) == (5, 5, True)


def test_auto_is_capped_by_available_memory() -> None:
    # room = 0.9 x 250 MiB = 225 MiB -> 2 more workers of 100 MiB besides the first
    plan = plan_workers("auto", cpus=4, first_rss=100 * MiB, available=250 * MiB)
    assert plan.wanted == 9
    assert plan.count == 3
    assert not plan.fits
    assert plan.message is not None
    assert "starting 3" in plan.message and "9" in plan.message


def test_auto_never_goes_below_one_worker() -> None:
    plan = plan_workers("auto", cpus=2, first_rss=500 * MiB, available=10 * MiB)
    assert plan.count == 1


def test_fixed_count_that_does_not_fit_is_started_anyway_with_a_message() -> None:
    plan = plan_workers(8, cpus=2, first_rss=200 * MiB, available=1000 * MiB)
    assert plan.count == 8
    assert not plan.fits
    assert plan.message is not None
    assert "8 workers x 200 MiB" in plan.message and "1600 MiB" in plan.message


def test_boundary_exactly_fitting() -> None:
    rss = 100 * MiB
    available = int(3 * rss / MEMORY_SHARE) + 1  # room for exactly 3 more
    assert plan_workers(4, 2, rss, available).fits
    assert not plan_workers(5, 2, rss, available).fits


@pytest.mark.parametrize("rss,available", [(None, 100 * MiB), (50 * MiB, None), (0, 1)])
def test_unknown_figures_do_not_cap(rss: int | None, available: int | None) -> None:
    plan = plan_workers("auto", cpus=2, first_rss=rss, available=available)
    assert (plan.count, plan.fits) == (5, True)


def test_parse_proc_files() -> None:
    meminfo = "MemTotal:       24684084 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n"
    assert parse_meminfo_available(meminfo) == 2048 * 1024
    assert parse_meminfo_available("MemTotal: 1 kB\n") is None
    status = "Name:\tpython\nVmPeak:\t  9000 kB\nVmRSS:\t   51200 kB\nRssAnon:\t 1 kB\n"
    assert parse_status_rss(status) == 51200 * 1024
    assert parse_status_rss("Name:\tkthreadd\nState:\tS\n") is None


def test_read_rss_of_this_process_and_a_missing_one() -> None:
    # reads /proc (a file, no sockets): this process has some RSS, its tree at least as much
    own = read_rss(os.getpid())
    assert own is not None and own > 1 * MiB
    tree = read_rss_tree(os.getpid())
    assert tree is not None and tree >= own
    assert read_rss(2**22 + 12345) is None
