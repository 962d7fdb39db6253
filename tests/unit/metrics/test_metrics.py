"""The counters and their text format, read back with prometheus_client's parser (what
Prometheus itself accepts, short of running it: the integration tests do that)."""

from __future__ import annotations

import ssl

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.listeners import failure_reason
from proxy.metrics import (
    DURATION_BOUNDS,
    NO_SITE,
    CertificateSample,
    Metrics,
    Snapshot,
    UpstreamSample,
    read_process,
    render,
)
from proxy.workers.status import WorkerInfo


def scrape(metrics: Metrics, snapshot: Snapshot | None = None) -> dict[str, dict]:
    """name -> {frozenset(labels.items()): value} for every sample of a rendered page."""
    text = render(metrics, snapshot or Snapshot()).decode()
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def labels(**items: str) -> frozenset:
    return frozenset(items.items())


def test_requests_are_counted_by_site_and_exact_code() -> None:
    m = Metrics()
    m.request_done("app.test", b"GET", 200, 0, 100, 0.001)
    m.request_done("app.test", b"GET", 200, 0, 100, 0.001)
    m.request_done("app.test", b"POST", 502, 10, 50, 0.2)
    m.request_done(NO_SITE, b"GET", 421, 0, 30, 0.0)
    s = scrape(m)["tlsproxy_requests_total"]
    assert s == {
        labels(site="app.test", code="200"): 2,
        labels(site="app.test", code="502"): 1,
        labels(site="-", code="421"): 1,
    }


def test_methods_a_client_invents_are_one_label_value() -> None:
    m = Metrics()
    for method in (b"GET", b"PROPFIND", b"X" * 50, b"BREW", b"DELETE"):
        m.request_done("a", method, 200, 0, 0, 0.0)
    s = scrape(m)["tlsproxy_requests_by_method_total"]
    assert s == {
        labels(site="a", method="GET"): 1,
        labels(site="a", method="DELETE"): 1,
        labels(site="a", method="OTHER"): 3,
    }


def test_the_histogram_is_cumulative_and_le_includes_its_bound() -> None:
    m = Metrics()
    for duration in (0.001, 0.005, 0.006, 0.3, 61.0):
        m.request_done("a", b"GET", 200, 0, 0, duration)
    s = scrape(m)
    buckets = {dict(k)["le"]: v for k, v in s["tlsproxy_request_duration_seconds_bucket"].items()}
    assert buckets["0.005"] == 2  # 0.005 itself is "less or equal"
    assert buckets["0.01"] == 3
    assert buckets["0.25"] == 3
    assert buckets["0.5"] == 4
    assert buckets["60.0"] == 4
    assert buckets["+Inf"] == 5
    assert len(buckets) == len(DURATION_BOUNDS) + 1
    assert s["tlsproxy_request_duration_seconds_count"][labels(site="a")] == 5
    assert s["tlsproxy_request_duration_seconds_sum"][labels(site="a")] == pytest.approx(61.312)


def test_bytes_both_ways_add_up_per_site() -> None:
    m = Metrics()
    m.request_done("a", b"PUT", 201, 1000, 80, 0.0)
    m.request_done("a", b"GET", 200, 0, 5000, 0.0)
    s = scrape(m)
    assert s["tlsproxy_request_bytes_total"][labels(site="a")] == 1000
    assert s["tlsproxy_response_bytes_total"][labels(site="a")] == 5080


def test_handshakes_by_version_alpn_and_resumption() -> None:
    m = Metrics()
    m.handshake_done("TLSv1.3", "h2", False)
    m.handshake_done("TLSv1.3", "h2", True)
    m.handshake_done("TLSv1.2", None, False)
    s = scrape(m)["tlsproxy_handshakes_total"]
    assert s == {
        labels(version="TLSv1.3", alpn="h2", resumed="false"): 1,
        labels(version="TLSv1.3", alpn="h2", resumed="true"): 1,
        labels(version="TLSv1.2", alpn="none", resumed="false"): 1,
    }


def test_every_failure_reason_is_there_from_the_start() -> None:
    s = scrape(Metrics())["tlsproxy_handshake_failures_total"]
    assert {dict(k)["reason"] for k in s} >= {
        "no_certificate",
        "timeout",
        "protocol_version",
        "client_certificate",
    }
    assert set(s.values()) == {0}


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] test")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "timeout"),
        (
            ConnectionAbortedError(
                "SSL handshake is taking longer than 10.0 seconds: aborting the connection"
            ),
            "timeout",
        ),
        (ConnectionAbortedError("something else"), "client_closed"),
        (_ssl_error("CALLBACK_FAILED"), "no_certificate"),
        (_ssl_error("UNSUPPORTED_PROTOCOL"), "protocol_version"),
        (_ssl_error("VERSION_TOO_LOW"), "protocol_version"),
        (_ssl_error("NO_SHARED_CIPHER"), "no_shared_cipher"),
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "client_certificate"),
        (_ssl_error("CERTIFICATE_VERIFY_FAILED"), "client_certificate"),
        (_ssl_error("HTTP_REQUEST"), "plain_http"),
        (_ssl_error("DECRYPTION_FAILED_OR_BAD_RECORD_MAC"), "other"),
        (ssl.SSLEOFError(8, "EOF"), "client_closed"),
        (ConnectionResetError(), "client_closed"),
        (EOFError(), "client_closed"),
    ],
)
def test_failure_reasons(exc: BaseException, reason: str) -> None:
    assert failure_reason(exc) == reason


def test_certificates_upstreams_and_workers_from_the_snapshot() -> None:
    snapshot = Snapshot(
        connections={"h2": 2, "http/1.1": 0},
        handshakes_in_progress=3,
        certificates=[
            CertificateSample("app.test", 1800000000.0, 1790000000.0, 2, 1780000000.0),
            CertificateSample("*.example.test", None, None, 0, None),
        ],
        upstreams=[UpstreamSample("app", "unix:/run/a.sock", False, 4, 5, 6)],
        workers=[
            WorkerInfo("app", "app-1", 42, "up", 10.0, 7, 50_000_000, "unix:/run/a.sock", 1),
            WorkerInfo("app", "app-2", None, "backoff", 0.0, 0, None, "unix:/run/b.sock", 3),
        ],
        access_log_dropped=9,
        version="1.2.3",
    )
    s = scrape(Metrics(), snapshot)
    assert s["tlsproxy_connections_open"] == {
        labels(protocol="h2"): 2,
        labels(protocol="http/1.1"): 0,
    }
    assert s["tlsproxy_handshakes_in_progress"] == {labels(): 3}
    assert s["tlsproxy_certificate_not_after_seconds"] == {labels(host="app.test"): 1.8e9}
    assert s["tlsproxy_certificate_next_renewal_seconds"] == {labels(host="app.test"): 1.79e9}
    assert s["tlsproxy_certificate_renewal_failures_total"] == {
        labels(host="app.test"): 2,
        labels(host="*.example.test"): 0,
    }
    server = labels(upstream="app", server="unix:/run/a.sock")
    assert s["tlsproxy_upstream_up"] == {server: 0}
    assert s["tlsproxy_upstream_in_flight"] == {server: 4}
    assert s["tlsproxy_upstream_connect_failures_total"] == {server: 5}
    assert s["tlsproxy_upstream_retries_total"] == {server: 6}
    one, two = labels(upstream="app", worker="app-1"), labels(upstream="app", worker="app-2")
    assert s["tlsproxy_worker_up"] == {one: 1, two: 0}
    assert s["tlsproxy_worker_rss_bytes"] == {one: 50_000_000}
    assert s["tlsproxy_worker_restarts_total"] == {one: 1, two: 3}
    assert s["tlsproxy_worker_requests_total"] == {one: 7, two: 0}
    assert s["tlsproxy_access_log_dropped_lines_total"] == {labels(): 9}
    assert s["tlsproxy_build_info"] == {labels(version="1.2.3"): 1}


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.request_done('we"ird\\site\nname', b"GET", 200, 0, 0, 0.0)
    s = scrape(m)["tlsproxy_requests_total"]
    assert s == {labels(site='we"ird\\site\nname', code="200"): 1}


def test_counter_type_lines_carry_total_as_prometheus_0_0_4_expects() -> None:
    text = render(Metrics(), Snapshot()).decode()
    assert "# TYPE tlsproxy_config_reloads_total counter" in text
    assert "# TYPE tlsproxy_request_duration_seconds histogram" in text


def test_process_metrics_are_this_process() -> None:
    values = read_process()
    assert values["process_resident_memory_bytes"] > 1_000_000
    assert values["process_open_fds"] >= 3
    assert values["process_cpu_seconds_total"] > 0
    import time

    assert 0 < time.time() - values["process_start_time_seconds"] < 3600


def test_requests_waiting_in_a_batch_are_counted_by_a_scrape_and_by_a_full_batch() -> None:
    from proxy.metrics import BATCH

    m = Metrics()
    for _ in range(BATCH - 1):
        m.request_done("a", b"GET", 200, 0, 1, 0.0)
    assert m.sites == {} and len(m.done) == BATCH - 1  # nothing counted yet: no work per request
    m.request_done("a", b"GET", 200, 0, 1, 0.0)
    assert m.done == [] and m.sites["a"].codes() == {200: BATCH}
    m.request_done("a", b"GET", 404, 0, 1, 0.0)
    assert scrape(m)["tlsproxy_requests_total"][labels(site="a", code="404")] == 1
