from proxy.status import format_report
from proxy.workers.status import WorkerInfo, format_workers

WORKERS = [
    WorkerInfo("app", "app-1", 4242, "up", 125.0, 17, 52 * 1024 * 1024, "unix:/run/a.sock", 0),
    WorkerInfo("app", "app-2", None, "crashloop", 0.0, 0, None, "-", 5),
]


def test_format_shows_each_worker() -> None:
    lines = format_workers(WORKERS).splitlines()
    assert lines[0].split() == ["WORKER", "PID", "STATE", "UPTIME", "REQUESTS", "RSS",
                                "RESTARTS", "LISTEN"]  # fmt: skip
    assert lines[1].split() == ["app-1", "4242", "up", "2m05s", "17", "52.0MiB", "0",
                                "unix:/run/a.sock"]  # fmt: skip
    assert lines[2].split() == ["app-2", "-", "crashloop", "-", "0", "-", "5", "-"]


def test_no_workers() -> None:
    assert format_workers([]) == "no supervised workers\n"


def test_report_of_a_proxy_without_workers() -> None:
    doc = {
        "pid": 7,
        "uptime": 7200.0,
        "config": None,
        "https": ["0.0.0.0:443", "[::]:443"],
        "http": ["0.0.0.0:80"],
        "sites": [
            {
                "hosts": ["app.example.com"],
                "tls": "acme",
                "upstream": "app",
                "hsts": None,
                "certificate": None,
            },
            {
                "hosts": ["a.test", "b.test"],
                "tls": "internal",
                "upstream": "app",
                "hsts": "max-age=300",
                "certificate": {
                    "issuer": "CN=x",
                    "serial": "ab",
                    "not_after": "2027-01-01T00:00:00+00:00",
                },
            },
        ],
        "upstreams": {"app": [{"server": "127.0.0.1:8000", "up": False}]},
        "workers": [],
    }
    assert format_report(doc) == (
        "tlsproxy pid 7, up 2h00m, config (no config file: reverse-proxy)\n"
        "listening: https://0.0.0.0:443, https://[::]:443, http://0.0.0.0:80\n"
        "sites:\n"
        "  app.example.com -> app: tls acme, no certificate yet\n"
        "  a.test, b.test -> app: tls internal, certificate until 2027-01-01T00:00:00+00:00"
        " from CN=x, hsts 'max-age=300'\n"
        "upstreams:\n"
        "  app: 127.0.0.1:8000 (down)\n"
        "no supervised workers\n"
    )
