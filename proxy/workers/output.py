"""The level of each line a worker (or a prestart step) prints, for the proxy's own log.

A worker's stdout and stderr arrive as plain lines; logged all at INFO, a crash's traceback looks
like chatter and a filter on WARNING shows nothing. The servers tlsproxy runs say their level at
the start of each line, so it is read back from there (and the prefix dropped, since the proxy's
log line says it again):
- uvicorn and Python's default logging: ``WARNING:  text``, ``ERROR:    text``, ``INFO:root:text``
- gunicorn and hypercorn: ``[2026-12-04 08:00:00 +0000] [1234] [ERROR] text``
- alembic (a typical prestart step): ``INFO  [alembic.runtime.migration] text`` (5 letters)
Lines without a level: the rest of a WARNING or ERROR record (its traceback) keep that level, a
bare ``Traceback (most recent call last):`` (an uncaught exception) is an ERROR, anything else
is INFO. Pure: no I/O, one instance per worker (it remembers the record in progress).
"""

from __future__ import annotations

import logging
import re

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "WARNI": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "CRITI": logging.CRITICAL,
}
_PREFIXES = (
    # uvicorn ("WARNING:  "), logging.basicConfig ("WARNING:root:")
    re.compile(r"(TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL):\s*"),
    # gunicorn, hypercorn: "[time] [pid] [LEVEL] "
    re.compile(r"\[[^\]]*\] \[\d+\] \[(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\] "),
    # alembic: "%(levelname)-5.5s [%(name)s]"
    re.compile(r"(DEBUG|INFO |WARNI|ERROR|CRITI) (?=\[)"),
)
_TRACEBACK = "Traceback (most recent call last):"
# Between two chained tracebacks; exception groups indent their parts ("  + ", "  | ").
_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")


class OutputLevels:
    """`level(line)` -> (logging level, the line without its level prefix).

    `health_path`: the access-log line of a successful health probe (uvicorn prints one per
    probe, every health_interval) is DEBUG, so that the log shows state changes, not probes."""

    def __init__(self, health_path: str | None = None) -> None:
        self._probe = (
            re.compile(rf'"GET {re.escape(health_path)}(\?\S*)? HTTP/[\d.]+" [23]\d\d\b')
            if health_path
            else None
        )
        self._carry: int | None = None  # the level of the WARNING/ERROR record in progress
        self._in_traceback = False

    def level(self, line: str) -> tuple[int, str]:
        for prefix in _PREFIXES:
            match = prefix.match(line)
            if match:
                level = _LEVELS[match.group(1).strip()]
                text = line[match.end() :]
                self._carry = level if level >= logging.WARNING else None
                self._in_traceback = False
                if level == logging.INFO and self._probe is not None and self._probe.search(text):
                    return logging.DEBUG, text
                return level, text
        return self._continuation(line), line

    def _continuation(self, line: str) -> int:
        if line.startswith(_TRACEBACK):
            self._carry = self._carry or logging.ERROR
            self._in_traceback = True
            return self._carry
        if self._carry is None:
            return logging.INFO
        if not line or line[0].isspace() or line.startswith(_CHAIN):
            return self._carry
        if self._in_traceback:
            # The exception's own line ("ValueError: boom") ends the traceback; a chained
            # one may follow, after a blank line and one of _CHAIN.
            self._in_traceback = False
            return self._carry
        self._carry = None  # something else printed: the record is over
        return logging.INFO
