"""OutputLevels: a worker's line keeps the level its server printed it at."""

from __future__ import annotations

import logging

from proxy.workers.output import OutputLevels

D, I, W, E, C = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL  # noqa: E741


def levels(lines: list[str], health: str | None = None) -> list[tuple[int, str]]:
    out = OutputLevels(health)
    return [out.level(line) for line in lines]


def test_uvicorn_prefixes_give_the_level_and_are_dropped() -> None:
    assert levels(
        [
            "INFO:     Application startup complete.",
            "WARNING:  Invalid HTTP request received.",
            "ERROR:    Exception in ASGI application",
            "CRITICAL: out of memory",
            "DEBUG:    some detail",
            "TRACE:    wire bytes",
        ]
    ) == [
        (I, "Application startup complete."),
        (W, "Invalid HTTP request received."),
        (E, "Exception in ASGI application"),
        (C, "out of memory"),
        (D, "some detail"),
        (D, "wire bytes"),
    ]


def test_gunicorn_hypercorn_alembic_and_basic_config() -> None:
    assert levels(
        [
            "[2026-12-04 08:00:00 +0000] [4242] [ERROR] Exception in worker process",
            "[2026-12-04 08:00:00 +0000] [4242] [WARNING] Worker timeout",
            "[2026-12-04 08:00:00 +0000] [4242] [INFO] Booting worker with pid: 4242",
            "INFO  [alembic.runtime.migration] Running upgrade  -> 1a2b",
            "WARNI [alembic.runtime.migration] something odd",
            "WARNING:root:a bare logging.warning",
        ]
    ) == [
        (E, "Exception in worker process"),
        (W, "Worker timeout"),
        (I, "Booting worker with pid: 4242"),
        (I, "[alembic.runtime.migration] Running upgrade  -> 1a2b"),
        (W, "[alembic.runtime.migration] something odd"),
        (W, "root:a bare logging.warning"),
    ]


def test_a_traceback_keeps_the_level_of_its_record_and_ends_with_the_exception() -> None:
    lines = [
        "ERROR:    Exception in ASGI application",
        "Traceback (most recent call last):",
        '  File "/srv/app/main.py", line 3, in boom',
        "    raise KeyError('x')",
        "KeyError: 'x'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "/srv/app/main.py", line 5, in boom',
        "ValueError: boom",
        "a print() from the app afterwards",
        'INFO:     127.0.0.1:0 - "GET / HTTP/1.1" 200 OK',
    ]
    got = [level for level, _ in levels(lines)]
    assert got == [E] * 11 + [I, I]


def test_an_uncaught_traceback_is_an_error_and_plain_prints_are_info() -> None:
    got = levels(
        [
            "starting my app",
            "Traceback (most recent call last):",
            '  File "main.py", line 1, in <module>',
            "ModuleNotFoundError: No module named 'fastapi'",
            "bye",
        ]
    )
    assert [level for level, _ in got] == [I, E, E, E, I]
    assert got[0] == (I, "starting my app")


def test_a_warning_ends_at_the_next_unindented_line() -> None:
    got = levels(["WARNING:  careful", "  more of it", "something else"])
    assert [level for level, _ in got] == [W, W, I]


def test_successful_health_probes_are_debug_other_requests_stay_info() -> None:
    got = levels(
        [
            'INFO:      - "GET /healthz HTTP/1.1" 200 OK',
            'INFO:     127.0.0.1:41234 - "GET /healthz?full=1 HTTP/1.1" 204 No Content',
            'INFO:      - "GET /healthz HTTP/1.1" 503 Service Unavailable',
            'INFO:     203.0.113.9:0 - "GET /healthzz HTTP/1.1" 200 OK',
            'INFO:     203.0.113.9:0 - "GET / HTTP/1.1" 200 OK',
        ],
        health="/healthz",
    )
    assert [level for level, _ in got] == [D, D, I, I, I]
    # Without a health path nothing is demoted.
    assert levels(['INFO:      - "GET /healthz HTTP/1.1" 200 OK'])[0][0] == I
