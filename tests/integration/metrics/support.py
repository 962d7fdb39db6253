"""Reading a real proxy's admin endpoint: /metrics through prometheus_client's text parser,
the JSON pages, and waiting for a value to change; the proxy's config for these tests; the
deploy/ files."""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import REPO, AppProcess, free_port
from tests.integration.metrics.spec import METRICS, sample_names
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import Proxy

T = TypeVar("T")
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "tlsproxy-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tlsproxy-alerts.test.yml"
EXAMPLE = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "tlsproxy-dashboard.json"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def admin_request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def admin_json(port: int, path: str) -> Any:
    status, headers, body = admin_request(port, path)
    assert status == 200, (path, status, body)
    assert headers["content-type"].startswith("application/json"), headers
    return json.loads(body)


class Scrape:
    """One /metrics page, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families:
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def get(self, name: str, **labels: str) -> float:
        """The value, 0 for a series not there yet (a counter nothing has counted)."""
        return self.value(name, **labels) or 0.0

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (n, labels), v in self.samples.items() if n == name]

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(port: int) -> Scrape:
    status, headers, body = admin_request(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"] == CONTENT_TYPE
    return Scrape(body.decode("utf-8"))


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    """probe() until done(value); the last value on success, an AssertionError naming `what`
    and the last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s: {what}; last: {value!r}")
        time.sleep(0.1)


def check_against_spec(page: Scrape) -> set[str]:
    """Every family on the page is one of the spec's, with its TYPE, a HELP line and its
    labels; returns the spec's names the page has."""
    known = sample_names()
    seen = set()
    for family in page.families:
        for sample in family.samples:
            assert sample.name in known, f"not in the spec: {sample.name}"
            base = sample.name
            for suffix in ("_bucket", "_sum", "_count"):
                if base.endswith(suffix) and base.removesuffix(suffix) in METRICS:
                    base = base.removesuffix(suffix)
            kind, labels = METRICS[base]
            assert family.type == kind, (sample.name, family.type, kind)
            assert family.documentation, f"{family.name}: no HELP text"
            got = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
            assert got == labels, (sample.name, sorted(got), sorted(labels))
            seen.add(base)
    return seen


WORKER_COMMAND = " ".join(
    (sys.executable, "-m uvicorn examples.app:app --app-dir", str(REPO), "--uds {socket}")
)
# Health checks fast enough for a test: one failed probe takes a server out, one brings it back.
FAST_HEALTH = """health = "/healthz"
health_interval = "200ms"
health_timeout = "1s"
unhealthy_threshold = 1
healthy_threshold = 1
"""


def config(
    admin: str,
    upstream: str,
    *,
    server: str = "",
    upstreams: str = "",
) -> str:
    """Two sites (localhost + app.test, other.test) on upstream "app" (the `upstream` body of
    [upstream.app]), no default_site: an unknown name gets no certificate."""
    return f"""
[server]
https = ["127.0.0.1:0"]
http = []
data_dir = "data"
admin = "{admin}"
{server}

[[site]]
hosts = ["localhost", "app.test"]
upstream = "app"

[[site]]
hosts = ["other.test"]
upstream = "app"

[upstream.app]
{upstream}
{upstreams}
"""


def start(make_proxy: MakeProxy, upstream: str, **kw: str) -> tuple[Proxy, int]:
    """A started proxy with config(...) and the admin endpoint on a free port: (proxy, port)."""
    port = free_port()
    proxy = make_proxy(config(f"127.0.0.1:{port}", upstream, **kw))
    return proxy, port


def start_before(make_proxy: MakeProxy, app: AppProcess, **kw: str) -> tuple[Proxy, int]:
    """start() with [upstream.app] the one server `app`."""
    return start(make_proxy, f'servers = ["{app.server}"]', **kw)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(doc: dict) -> list[dict]:
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(doc: dict) -> list[str]:
    queries = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    queries += [v["definition"] for v in doc["templating"]["list"]]
    return queries


def get_as(client: httpx.Client, proxy: Proxy, host: str, path: str = "/") -> int:
    """A GET to the site of `host` (SNI and Host), which no resolver knows: the status."""
    response = client.get(
        f"https://127.0.0.1:{proxy.port}{path}",
        headers={"Host": host},
        extensions={"sni_hostname": host},
    )
    return response.status_code
