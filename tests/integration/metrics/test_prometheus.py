"""A real Prometheus (Debian's /usr/bin/prometheus) scraping a real `tlsproxy run` with
deploy/prometheus's alert rules loaded (their `for:` shortened in a copy): the series arrive
over its HTTP API; the upstream-down alerts fire when the app stops, the expiry alert for
one-day certificates, the proxy-down alert when the proxy stops; every query of the Grafana
dashboard runs without an error. Bounded: the whole test takes well under a minute."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import AppProcess, free_port, running, stop_process, wait_for_port
from tests.integration.metrics.spec import require
from tests.integration.metrics.support import (
    FAST_HEALTH,
    RULES,
    WORKER_COMMAND,
    dashboard,
    dashboard_queries,
    eventually,
    get_as,
    start,
)
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import s_client

IDENTITY = ("__name__", "job", "instance")
# The dashboard's variables as Grafana would fill them with "All".
DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$job": ".*",
    "$instance": ".*",
    "$site": ".*",
}


class Prometheus:
    def __init__(self, directory: Path, admin_port: int) -> None:
        self.port = free_port()
        # The rules as shipped, with every `for:` a second so the alert fires within the test.
        rules = re.sub(r"(?m)^(\s+for:) \S+$", r"\1 1s", RULES.read_text())
        (directory / RULES.name).write_text(rules)
        (directory / "prometheus.yml").write_text(
            f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES.name}
scrape_configs:
  - job_name: tlsproxy
    static_configs:
      - targets: ["127.0.0.1:{admin_port}"]
"""
        )
        self.log = open(directory / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                require("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                document = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error as JSON
            document = json.load(exc)
        return document

    def query(self, expr: str) -> list[dict]:
        document = self.api("query", query=expr)
        assert document["status"] == "success", (expr, document)
        return document["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start_prometheus(admin_port: int) -> Prometheus:
        directory = tmp_path / "prometheus"
        directory.mkdir()
        server = Prometheus(directory, admin_port)
        started.append(server)
        wait_for_port(server.port, timeout=20)
        eventually(lambda: _ready(server), bool, 20, "Prometheus ready (GET /-/ready)")
        return server

    try:
        yield start_prometheus
    finally:
        for server in started:
            server.stop()


def _ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _filled(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable at "All"; a variable's
    label_values(METRIC, LABEL) as the series query it stands for."""
    if expr.startswith("label_values("):
        expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
    for name, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def values(result: list[dict]) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(
            sorted(
                (k, v) for k, v in r["metric"].items() if k not in ("__name__", "job", "instance")
            )
        ): float(r["value"][1])
        for r in result
    }


def test_prometheus_scrapes_the_proxy_and_its_alerts_fire(
    make_proxy: MakeProxy, prometheus_for: Any, tmp_path: Path
) -> None:
    began = time.monotonic()
    (tmp_path / "app").mkdir()
    with running(AppProcess(tmp_path / "app")) as app:
        # Leaves of one day: under the alert's 7 days from the start. A supervised worker
        # behind api.test, for the dashboard's worker panels.
        proxy, admin = start(
            make_proxy,
            f'servers = ["{app.server}"]\n{FAST_HEALTH}',
            upstreams=f'[upstream.api]\ncommand = "{WORKER_COMMAND}"\nhealth = "/healthz"\n'
            '[[site]]\nhosts = ["api.test"]\nupstream = "api"\n'
            '[local_ca]\nleaf_lifetime = "1d"\n',
        )
        prometheus = prometheus_for(admin)
        with proxy.client() as client:
            for _ in range(3):
                assert client.get(proxy.url("/")).status_code == 200
            assert get_as(client, proxy, "api.test") == 200

        up = 'tlsproxy_upstream_up{job="tlsproxy"}'
        server = (("server", app.server), ("upstream", "app"))
        eventually(lambda: values(prometheus.query(up)), lambda v: v.get(server) == 1, 15, "up=1")
        requests = 'tlsproxy_requests_total{job="tlsproxy", site="localhost", code="200"}'
        eventually(
            lambda: values(prometheus.query(requests)),
            lambda v: v.get((("code", "200"), ("site", "localhost"))) == 3,
            10,
            "3 requests scraped",
        )
        targets = prometheus.api("targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets

        # Every dashboard query is valid PromQL for this Prometheus and has data once rate()
        # has two samples of everything (a handshake failure is counted after the first).
        assert s_client(proxy.port, "-servername", "unknown.test").returncode != 0
        with proxy.client() as client:
            assert get_as(client, proxy, "api.test") == 200
        queries = [_filled(expr) for expr in dashboard_queries(dashboard())]
        eventually(
            lambda: [expr for expr in queries if not prometheus.query(expr)],
            lambda empty: not empty,
            15,
            "every dashboard query with data",
        )

        app.stop()
        alert = 'ALERTS{alertname="TLSProxyUpstreamServerDown", alertstate="firing"}'
        firing = eventually(
            lambda: prometheus.query(alert), bool, 20, "TLSProxyUpstreamServerDown firing"
        )
        labels = firing[0]["metric"]
        assert (labels["upstream"], labels["server"], labels["severity"]) == (
            "app",
            app.server,
            "warning",
        )
        alerts = prometheus.api("alerts")["data"]["alerts"]
        (shown,) = [a for a in alerts if a["labels"]["alertname"] == "TLSProxyUpstreamServerDown"]
        assert shown["annotations"]["summary"] == f"Upstream app server {app.server} is down"
        # The only server of its upstream: that alert fires too.
        eventually(
            lambda: prometheus.query(
                'ALERTS{alertname="TLSProxyUpstreamAllServersDown", alertstate="firing"}'
            ),
            bool,
            10,
            "TLSProxyUpstreamAllServersDown firing",
        )
        expiring = prometheus.query(
            'ALERTS{alertname="TLSProxyCertificateExpiringSoon", alertstate="firing"}'
        )
        assert sorted(a["metric"]["host"] for a in expiring) == [
            "api.test",
            "app.test",
            "localhost",
            "other.test",
        ]
        assert not prometheus.query('ALERTS{alertname="TLSProxyDown"}')

        proxy.stop()  # the target itself is gone
        eventually(
            lambda: prometheus.query('ALERTS{alertname="TLSProxyDown", alertstate="firing"}'),
            bool,
            15,
            "TLSProxyDown firing",
        )
    assert time.monotonic() - began < 60
