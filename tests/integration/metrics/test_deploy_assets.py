"""deploy/prometheus and deploy/grafana as a user installs them: promtool checks the rules and
the example scrape config and runs the rules' unit tests; the dashboard is JSON Grafana can
import, and it and the rules use only the metric names of the spec (tests/.../spec.py).
The queries themselves run against a real Prometheus in test_prometheus.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.integration.metrics.spec import require, sample_names
from tests.integration.metrics.support import (
    DASHBOARD,
    EXAMPLE,
    PROMETHEUS_DIR,
    RULE_TESTS,
    RULES,
    dashboard,
    dashboard_queries,
    panels,
)

# A metric-like word: tlsproxy_... or the standard process_... (not tlsproxy-alerts.yml).
METRIC_WORD = re.compile(r"\b((?:tlsproxy|process)_[a-z0-9_]+)")
ALERT = re.compile(r"^\s*- alert: (\w+)\s*$", re.M)


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def alerts() -> list[str]:
    return ALERT.findall(RULES.read_text())


def test_promtool_accepts_the_rules_and_the_example_config() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout
    config = promtool("check", "config", str(EXAMPLE))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "job_name: tlsproxy" in EXAMPLE.read_text()  # what the rules select


def test_the_rules_unit_tests_pass() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    expected = {
        "TLSProxyDown",
        "TLSProxyCertificateExpiringSoon",
        "TLSProxyCertificateRenewalFailing",
        "TLSProxyUpstreamServerDown",
        "TLSProxyWorkerCrashLooping",
    }
    names = alerts()
    assert expected <= set(names), names
    text = RULE_TESTS.read_text()
    firing, quiet = set(), set()
    for block in text.split("- eval_time:")[1:]:
        name = re.search(r"alertname: (\w+)", block)
        assert name is not None, block
        (quiet if "exp_alerts: []" in block else firing).add(name.group(1))
    assert firing == set(names) and quiet == set(names), (firing, quiet)
    for alert in names:
        annotations = RULES.read_text().split(f"- alert: {alert}")[1].split("- alert:")[0]
        assert "summary:" in annotations and "description:" in annotations, alert


def test_each_alerts_firing_test_can_fail(tmp_path: Path) -> None:
    """An alert renamed in a copy of the rules must fail its unit tests: each firing
    expectation really depends on its rule."""
    rules_text = RULES.read_text()
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    for alert in alerts():
        (tmp_path / RULES.name).write_text(
            rules_text.replace(f"- alert: {alert}\n", f"- alert: {alert}Renamed\n")
        )
        tested = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
        assert tested.returncode != 0, f"{alert}: the unit tests pass without it"
        output = tested.stdout + tested.stderr
        assert f"alertname: {alert}," in output, output


def test_the_dashboard_is_importable_json() -> None:
    doc = dashboard()
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    assert doc["__inputs"][0]["pluginId"] == "prometheus"
    assert doc["uid"] == "tlsproxy" and doc["title"] == "tlsproxy"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    shown = [p for p in panels(doc) if p["type"] != "row"]
    assert len(shown) >= 15
    for panel in shown:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel
        assert panel["description"], panel["title"]
    # no two panels share a grid cell (Grafana would push one down, silently)
    cells: set[tuple[int, int]] = set()
    for panel in panels(doc):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, panel["title"]
        cells |= mine


def test_the_dashboard_and_rules_use_only_the_specs_names() -> None:
    known = sample_names()
    for path in (DASHBOARD, RULES, RULE_TESTS):
        used = set(METRIC_WORD.findall(path.read_text()))
        assert used, path
        assert used <= known, f"{path.name}: not in the spec: {sorted(used - known)}"


def test_the_dashboard_shows_what_a_vps_user_needs_first() -> None:
    used = set(METRIC_WORD.findall(" ".join(dashboard_queries(dashboard()))))
    needed = {
        "tlsproxy_requests_total",
        "tlsproxy_request_duration_seconds_bucket",
        "tlsproxy_request_bytes_total",
        "tlsproxy_response_bytes_total",
        "tlsproxy_connections_open",
        "tlsproxy_handshakes_in_progress",
        "tlsproxy_handshakes_total",
        "tlsproxy_handshake_failures_total",
        "tlsproxy_certificate_not_after_seconds",
        "tlsproxy_certificate_renewal_failures_total",
        "tlsproxy_upstream_up",
        "tlsproxy_upstream_in_flight",
        "tlsproxy_upstream_connect_failures_total",
        "tlsproxy_upstream_retries_total",
        "tlsproxy_worker_rss_bytes",
        "tlsproxy_worker_restarts_total",
        "tlsproxy_worker_requests_total",
        "tlsproxy_access_log_dropped_lines_total",
    }
    assert needed <= used, sorted(needed - used)
    queries = " ".join(dashboard_queries(dashboard()))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in queries
