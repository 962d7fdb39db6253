"""Soak (issue 9): a bounded mixed-traffic run against one proxy in front of the example app,
sampling the proxy's resident memory and open file descriptors every second.

TLSPROXY_SOAK_SECONDS sets how long the traffic runs (30 s by default, what CI runs). Every
operation's answer is checked (traffic.Mix); the run must end with none failed, and:
- memory: after the warm-up (the first third of the run), RSS never exceeds the warm-up's peak
  by more than 10 % (+1 MiB so that a small process is not held to a few pages);
- descriptors: once the traffic stops and idle pooled connections have expired, the proxy holds
  no more than 2 descriptors above what it held before the traffic started.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.integration.harness import AppProcess
from tests.integration.hostile.traffic import Mix, Sampler, Target, sample, summary
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import proxy_config

SECONDS = float(os.environ.get("TLSPROXY_SOAK_SECONDS", "30"))
RSS_GROWTH = 0.10
RSS_SLACK_MIB = 1.0
FD_SLACK = 2
# Idle pooled upstream connections close after keepalive_timeout (here 2 s); client
# connections end with their clients. Waiting this long for the count to come back is ample.
SETTLE_SECONDS = 20.0


# pytest-timeout's default (300 s) would cut a long run: the run's own length plus set-up and
# settling is the bound.
@pytest.mark.timeout(SECONDS + 180)
def test_soak_mixed_traffic(make_proxy: MakeProxy, example_app: AppProcess) -> None:
    proxy = make_proxy(
        # No default_site: an unknown Host gets 404 and an unknown SNI the unrecognized_name
        # alert, two of the error cases of the mix.
        proxy_config(
            [(["localhost"], "app"), (["other.test"], "app")],
            {"app": example_app.server},
            server='access_log = "off"',
        )
        + 'keepalive_timeout = "2s"\n'
    )
    target = Target(proxy.port, proxy.ca)
    # What an idle proxy holds, before any traffic.
    baseline = sample(proxy.pid)
    sampler = Sampler(proxy.pid, interval=1.0).start()
    started = time.monotonic()
    report = Mix(target, seconds=SECONDS, threads=4, seed=9).run()
    traffic = time.monotonic() - started
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline and sample(proxy.pid).fds > baseline.fds + FD_SLACK:
        time.sleep(0.5)
    settled = sample(proxy.pid)
    samples = sampler.stop()
    figures = summary(samples, warmup_end=SECONDS / 3)

    print(
        f"\n[soak] {traffic:.0f} s of traffic, {sum(report.ops.values())} operations, "
        f"{report.bytes_up / 2**20:.0f} MiB up, {report.bytes_down / 2**20:.0f} MiB down"
    )
    for name, count in sorted(report.ops.items()):
        print(f"[soak]   {name}: {count}")
    print(f"[soak] failures: {dict(report.failures)} {report.examples[:5]}")
    print(
        f"[soak] RSS MiB: idle {baseline.rss_kib / 1024:.1f}, warm-up end "
        f"{figures['rss_warmup_end_mib']:.1f} (peak {figures['rss_warmup_max_mib']:.1f}), "
        f"after warm-up peak {figures['rss_after_max_mib']:.1f}, settled "
        f"{settled.rss_kib / 1024:.1f}; trend after warm-up "
        f"{figures['rss_slope_kib_per_min']:+.0f} KiB/min"
    )
    print(
        f"[soak] fds: idle {baseline.fds}, warm-up peak {figures['fds_warmup_max']}, after "
        f"warm-up peak {figures['fds_after_max']}, settled {settled.fds} "
        f"({len(samples)} samples)"
    )

    assert not report.failures, report.examples
    missing = {name for name, _, _ in Mix(target, seconds=0).kinds} - set(report.ops)
    assert not missing or SECONDS < 30, f"never ran: {missing}"
    assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy died"
    limit = figures["rss_warmup_max_mib"] * (1 + RSS_GROWTH) + RSS_SLACK_MIB
    assert figures["rss_after_max_mib"] <= limit, (
        f"RSS grew after the warm-up: {figures['rss_after_max_mib']:.1f} MiB > {limit:.1f} MiB"
    )
    assert settled.fds <= baseline.fds + FD_SLACK, (
        f"{settled.fds} fds {SETTLE_SECONDS:.0f} s after the traffic, {baseline.fds} before"
    )
    log = proxy.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
