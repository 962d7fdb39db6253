"""The metrics of issue 13 (/work/spec/METRICS_SPEC.md, README's "Metrics"), kept here as the
tests' own copy: the scrape tests check /metrics against it, the deploy tests check that the
Grafana dashboard and the alert rules use no other name."""

from __future__ import annotations

import os
import shutil

import pytest

# name as the text format writes its samples -> (TYPE, label names)
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    name: (kind, frozenset(labels.split()))
    for name, kind, labels in (
        ("tlsproxy_requests_total", "counter", "site code"),
        ("tlsproxy_requests_by_method_total", "counter", "site method"),
        ("tlsproxy_request_duration_seconds", "histogram", "site"),
        ("tlsproxy_request_bytes_total", "counter", "site"),
        ("tlsproxy_response_bytes_total", "counter", "site"),
        ("tlsproxy_connections_open", "gauge", "protocol"),
        ("tlsproxy_handshakes_in_progress", "gauge", ""),
        ("tlsproxy_connections_refused_total", "counter", ""),
        ("tlsproxy_handshakes_total", "counter", "version alpn resumed"),
        ("tlsproxy_handshake_failures_total", "counter", "reason"),
        ("tlsproxy_certificate_not_after_seconds", "gauge", "host"),
        ("tlsproxy_certificate_next_renewal_seconds", "gauge", "host"),
        ("tlsproxy_certificate_renewal_failures_total", "counter", "host"),
        ("tlsproxy_certificate_last_renewal_success_seconds", "gauge", "host"),
        ("tlsproxy_upstream_up", "gauge", "upstream server"),
        ("tlsproxy_upstream_in_flight", "gauge", "upstream server"),
        ("tlsproxy_upstream_connect_failures_total", "counter", "upstream server"),
        ("tlsproxy_upstream_retries_total", "counter", "upstream server"),
        ("tlsproxy_worker_up", "gauge", "upstream worker"),
        ("tlsproxy_worker_rss_bytes", "gauge", "upstream worker"),
        ("tlsproxy_worker_restarts_total", "counter", "upstream worker"),
        ("tlsproxy_worker_requests_total", "counter", "upstream worker"),
        ("tlsproxy_access_log_dropped_lines_total", "counter", ""),
        ("tlsproxy_config_reloads_total", "counter", "result"),
        ("tlsproxy_build_info", "gauge", "version"),
        ("tlsproxy_start_time_seconds", "gauge", ""),
        ("process_resident_memory_bytes", "gauge", ""),
        ("process_cpu_seconds_total", "counter", ""),
        ("process_open_fds", "gauge", ""),
        ("process_max_fds", "gauge", ""),
        ("process_start_time_seconds", "gauge", ""),
    )
}
DURATION_BUCKETS = ("0.005 0.01 0.025 0.05 0.1 0.25 0.5 1.0 2.5 5.0 10.0 30.0 60.0 +Inf").split()
HANDSHAKE_FAILURE_REASONS = frozenset(
    "no_certificate timeout protocol_version no_shared_cipher client_certificate plain_http "
    "client_closed other".split()
)


def sample_names() -> set[str]:
    """Every name a sample or a query may use: a histogram's _bucket, _sum and _count too."""
    names = set()
    for name, (kind, _) in METRICS.items():
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def require(tool: str, package: str = "prometheus") -> str:
    """The path of `tool`. Missing: a skip on a developer's machine, a failure under CI=true,
    where scripts/test.sh has installed it (a missing tool must not pass as a skip there)."""
    path = shutil.which(tool)
    if path is None:
        message = f"needs {tool} (apt-get install {package}; scripts/test.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
