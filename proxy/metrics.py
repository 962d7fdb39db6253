"""Counters for Prometheus: bumped on the hot paths, rendered only when /metrics is scraped.

Why not prometheus_client's Counter and Histogram: each `labels(...).inc()` takes a lock and
looks the child up through a tuple of strings, about a microsecond per call, and a request
would need four of them. Here a finished request costs a few dict updates on one per-site
object (proxy/downstream/exchange.py `_finish`), a handshake one dict update. Everything
else (connections open, certificates, upstreams, workers, the process) is read from the
objects that already hold it, at scrape time. The text format (version 0.0.4) is written
here; the tests read it back with prometheus_client's parser.

Counters belong to the process: a SIGHUP keeps them. Label values a client controls are
bounded: methods outside the common ones count as OTHER, sites are the config's (or "-").
"""

from __future__ import annotations

import math
import os
import resource
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter

from proxy.workers.status import WorkerInfo

NO_SITE = "-"  # a request no site took: refused before routing, unknown Host, 421
# Seconds; request durations of a web app, from a cache hit to a long upload.
DURATION_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Others count as OTHER, so that a client cannot mint label values.
METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"OTHER")
_METHOD_INDEX = {method: i for i, method in enumerate(METHODS)}
_OTHER_INDEX = len(METHODS) - 1
_PER_STATUS = len(METHODS)  # outcome key: status * _PER_STATUS + the method's index
HANDSHAKE_FAILURE_REASONS = (
    "no_certificate",
    "timeout",
    "protocol_version",
    "no_shared_cipher",
    "client_certificate",
    "plain_http",
    "client_closed",
    "other",
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SiteCounters:
    """What one site's finished requests add up to."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "duration_sum", "outcomes")

    def __init__(self) -> None:
        # (status, method) as one int, so that a request costs one dict update, not two.
        self.outcomes: dict[int, int] = {}
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)  # the last one: above every bound
        self.duration_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0

    def codes(self) -> dict[int, int]:
        totals: dict[int, int] = {}
        for key, count in self.outcomes.items():
            status = key // _PER_STATUS
            totals[status] = totals.get(status, 0) + count
        return totals

    def methods(self) -> dict[bytes, int]:
        totals: dict[bytes, int] = {}
        for key, count in self.outcomes.items():
            method = METHODS[key % _PER_STATUS]
            totals[method] = totals.get(method, 0) + count
        return totals


# Finished requests wait in Metrics.done, as tuples, until this many are there or a scrape
# comes: appending costs a request less than counting it at once (measured side by side, 3.6%
# of keep-alive throughput counted at once, by method call, dict and bisect per request), and
# the counting loop runs over a batch with its code and locals warm.
BATCH = 256

# One finished request: site, method, status, request body bytes, response bytes, seconds.
Done = tuple[str, bytes, int, int, int, float]
_SITE = itemgetter(0)
_METHOD_STATUS = itemgetter(1, 2)
_BYTES_IN = itemgetter(3)
_BYTES_OUT = itemgetter(4)
_DURATION = itemgetter(5)


class Metrics:
    """The process's counters. The hot paths append to `done` and call `handshake_done`; the
    rest is rare (failures, reloads)."""

    def __init__(self) -> None:
        self.done: list[Done] = []
        self.sites: dict[str, SiteCounters] = {}
        self.handshakes: dict[tuple[str, str, bool], int] = {}
        self.handshake_failures: dict[str, int] = dict.fromkeys(HANDSHAKE_FAILURE_REASONS, 0)
        self.connections_refused = 0
        self.reloads = {"success": 0, "failure": 0}
        self.started_at = time.time()

    def request_done(
        self,
        site: str,
        method: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
    ) -> None:
        """One finished request (the exchange appends to `done` itself, without the call)."""
        done = self.done
        done.append((site, method, status, bytes_in, bytes_out, duration))
        if len(done) >= BATCH:
            self.tally()

    def tally(self) -> None:
        """Count the requests waiting in `done` into their sites' counters. Per site, each
        column is gone through by C code (sorted, sum, Counter over itemgetter), not by a
        Python loop over the requests: a batch costs a few calls per site and per bucket."""
        done, self.done = self.done, []
        done.sort(key=_SITE)
        for site, group in groupby(done, _SITE):
            batch = list(group)
            counters = self.sites.get(site)
            if counters is None:
                counters = self.sites[site] = SiteCounters()
            outcomes = counters.outcomes
            for (method, status), count in Counter(map(_METHOD_STATUS, batch)).items():
                key = status * _PER_STATUS + _METHOD_INDEX.get(method, _OTHER_INDEX)
                outcomes[key] = outcomes.get(key, 0) + count
            durations = sorted(map(_DURATION, batch))
            # bisect_right over the sorted batch: how many are <= each bound ("le")
            below = 0
            buckets = counters.buckets
            for i, bound in enumerate(DURATION_BOUNDS):
                upto = bisect_right(durations, bound)
                buckets[i] += upto - below
                below = upto
            buckets[-1] += len(durations) - below
            counters.duration_sum += sum(durations)
            counters.bytes_in += sum(map(_BYTES_IN, batch))
            counters.bytes_out += sum(map(_BYTES_OUT, batch))

    def handshake_done(self, version: str | None, alpn: str | None, resumed: bool) -> None:
        key = (version or "unknown", alpn or "none", resumed)
        handshakes = self.handshakes
        handshakes[key] = handshakes.get(key, 0) + 1

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1


# --- what a scrape reads from the rest of the proxy -------------------------------------------


@dataclass(frozen=True)
class CertificateSample:
    host: str
    not_after: float | None  # Unix time, of the certificate served now
    next_renewal: float | None
    renewal_failures: int
    last_success: float | None


@dataclass(frozen=True)
class UpstreamSample:
    upstream: str
    server: str
    up: bool
    in_flight: int
    connect_failures: int
    retries: int


@dataclass(frozen=True)
class Snapshot:
    """The gauges of one scrape, gathered by the server from the objects that hold them."""

    connections: dict[str, int] = field(default_factory=dict)  # by protocol
    handshakes_in_progress: int = 0
    certificates: Sequence[CertificateSample] = ()
    upstreams: Sequence[UpstreamSample] = ()
    workers: Sequence[WorkerInfo] = ()
    access_log_dropped: int = 0
    version: str = ""
    process: dict[str, float] = field(default_factory=dict)


# --- the text format ------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


Labels = tuple[tuple[str, str], ...]


class Exposition:
    """Writes metric families in the Prometheus text format, version 0.0.4."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]
    ) -> None:
        # The 0.0.4 format names a counter with its _total suffix, on its TYPE line too
        # (as prometheus_client writes it): Prometheus matches samples to TYPE by name.
        sample_name = name + "_total" if kind == "counter" else name
        self.lines.append(f"# HELP {sample_name} {help_text}")
        self.lines.append(f"# TYPE {sample_name} {kind}")
        for labels, value in samples:
            self.sample(sample_name, labels, value)

    def sample(self, name: str, labels: Labels, value: float) -> None:
        if labels:
            text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
            self.lines.append(f"{name}{{{text}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def histogram(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[Labels, Sequence[int], float]],
        bounds: Sequence[float],
    ) -> None:
        """`series`: (labels, per-bucket counts with the +Inf one last, sum)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        les = [_number(float(b)) for b in bounds] + ["+Inf"]
        for labels, buckets, total in series:
            running = 0
            for le, count in zip(les, buckets, strict=True):
                running += count
                self.sample(name + "_bucket", (*labels, ("le", le)), running)
            self.sample(name + "_sum", labels, total)
            self.sample(name + "_count", labels, running)

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def render(metrics: Metrics, snapshot: Snapshot) -> bytes:
    """The whole /metrics page. Counter families are given without their `_total` suffix,
    which the exposition adds."""
    metrics.tally()
    out = Exposition()
    sites = sorted(metrics.sites.items())
    out.family(
        "tlsproxy_requests",
        "counter",
        "Requests answered, by site and status code (site - for requests no site took).",
        (
            ((("site", site), ("code", str(code))), count)
            for site, counters in sites
            for code, count in sorted(counters.codes().items())
        ),
    )
    out.family(
        "tlsproxy_requests_by_method",
        "counter",
        "Requests answered, by site and method (uncommon methods as OTHER).",
        (
            ((("site", site), ("method", method.decode("ascii"))), count)
            for site, counters in sites
            for method, count in sorted(counters.methods().items())
        ),
    )
    out.histogram(
        "tlsproxy_request_duration_seconds",
        "Time from the request head to the last response byte, by site.",
        ((((("site", site),)), c.buckets, c.duration_sum) for site, c in sites),
        DURATION_BOUNDS,
    )
    out.family(
        "tlsproxy_request_bytes",
        "counter",
        "Request body bytes received from clients, by site.",
        (((("site", site),), c.bytes_in) for site, c in sites),
    )
    out.family(
        "tlsproxy_response_bytes",
        "counter",
        "Response bytes sent to clients (heads and bodies), by site.",
        (((("site", site),), c.bytes_out) for site, c in sites),
    )
    out.family(
        "tlsproxy_connections_open",
        "gauge",
        "Client connections past their TLS handshake, by HTTP protocol.",
        (((("protocol", p),), n) for p, n in sorted(snapshot.connections.items())),
    )
    out.family(
        "tlsproxy_handshakes_in_progress",
        "gauge",
        "TLS handshakes started and not finished.",
        [((), snapshot.handshakes_in_progress)],
    )
    out.family(
        "tlsproxy_connections_refused",
        "counter",
        "Connections closed at accept because max_connections was reached.",
        [((), metrics.connections_refused)],
    )
    out.family(
        "tlsproxy_handshakes",
        "counter",
        "Completed TLS handshakes, by TLS version, ALPN protocol and session resumption.",
        (
            (
                (("version", version), ("alpn", alpn), ("resumed", "true" if resumed else "false")),
                count,
            )
            for (version, alpn, resumed), count in sorted(metrics.handshakes.items())
        ),
    )
    out.family(
        "tlsproxy_handshake_failures",
        "counter",
        "TLS handshakes that failed, by reason.",
        (((("reason", r),), n) for r, n in sorted(metrics.handshake_failures.items())),
    )
    _certificates(out, snapshot.certificates)
    _upstreams(out, snapshot.upstreams)
    _workers(out, snapshot.workers)
    out.family(
        "tlsproxy_access_log_dropped_lines",
        "counter",
        "Access log lines dropped because stdout did not keep up.",
        [((), snapshot.access_log_dropped)],
    )
    out.family(
        "tlsproxy_config_reloads",
        "counter",
        "Configuration reloads (SIGHUP), by result.",
        (((("result", r),), n) for r, n in sorted(metrics.reloads.items())),
    )
    out.family(
        "tlsproxy_build_info",
        "gauge",
        "Always 1; the version of tlsproxy running.",
        [((("version", snapshot.version),), 1)],
    )
    out.family(
        "tlsproxy_start_time_seconds",
        "gauge",
        "When this proxy process started (Unix time).",
        [((), metrics.started_at)],
    )
    _process(out, snapshot.process)
    return out.text()


def _certificates(out: Exposition, certs: Sequence[CertificateSample]) -> None:
    def per_host(attribute: str) -> Iterable[tuple[Labels, float]]:
        for cert in certs:
            value = getattr(cert, attribute)
            if value is not None:
                yield (("host", cert.host),), value

    out.family(
        "tlsproxy_certificate_not_after_seconds",
        "gauge",
        "Expiry (Unix time) of the certificate served for each host.",
        per_host("not_after"),
    )
    out.family(
        "tlsproxy_certificate_next_renewal_seconds",
        "gauge",
        "When (Unix time) the certificate of each host is next renewed or retried.",
        per_host("next_renewal"),
    )
    out.family(
        "tlsproxy_certificate_renewal_failures",
        "counter",
        "Failed issuance or renewal attempts for each host's certificate since start.",
        per_host("renewal_failures"),
    )
    out.family(
        "tlsproxy_certificate_last_renewal_success_seconds",
        "gauge",
        "When (Unix time) the certificate stored for each host was last issued.",
        per_host("last_success"),
    )


def _upstreams(out: Exposition, upstreams: Sequence[UpstreamSample]) -> None:
    def each(attribute: str) -> Iterable[tuple[Labels, float]]:
        for u in upstreams:
            yield (("upstream", u.upstream), ("server", u.server)), int(getattr(u, attribute))

    out.family(
        "tlsproxy_upstream_up", "gauge", "1 if the server takes requests, else 0.", each("up")
    )
    out.family(
        "tlsproxy_upstream_in_flight", "gauge", "Requests at the server now.", each("in_flight")
    )
    out.family(
        "tlsproxy_upstream_connect_failures",
        "counter",
        "Connections to the server that could not be opened.",
        each("connect_failures"),
    )
    out.family(
        "tlsproxy_upstream_retries",
        "counter",
        "Requests sent again, elsewhere, after this server failed them before answering.",
        each("retries"),
    )


def _workers(out: Exposition, workers: Sequence[WorkerInfo]) -> None:
    def each(values: Iterable[tuple[WorkerInfo, float | None]]) -> Iterable[tuple[Labels, float]]:
        for w, value in values:
            if value is not None:
                yield (("upstream", w.upstream), ("worker", w.worker)), value

    out.family(
        "tlsproxy_worker_up",
        "gauge",
        "1 if the supervised worker is up and taking requests, else 0.",
        each((w, int(w.state == "up")) for w in workers),
    )
    out.family(
        "tlsproxy_worker_rss_bytes",
        "gauge",
        "Resident memory of the worker and its children.",
        each((w, w.rss) for w in workers),
    )
    out.family(
        "tlsproxy_worker_restarts",
        "counter",
        "Unplanned exits of the worker in this slot since the proxy started.",
        each((w, w.restarts) for w in workers),
    )
    out.family(
        "tlsproxy_worker_requests",
        "counter",
        "Requests sent to the worker's current process (restarts from 0 with a new one).",
        each((w, w.requests) for w in workers),
    )


def _process(out: Exposition, process: dict[str, float]) -> None:
    described = (
        ("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds."),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
        ("process_open_fds", "gauge", "Number of open file descriptors."),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
        ("process_start_time_seconds", "gauge", "Start time of the process (Unix time)."),
    )
    for name, kind, help_text in described:
        if name in process:
            family = name.removesuffix("_total") if kind == "counter" else name
            out.family(family, kind, help_text, [((), process[name])])


def read_process() -> dict[str, float]:
    """The standard process_* metrics of this process, from /proc (Linux); what cannot be
    read is left out."""
    values: dict[str, float] = {}
    try:
        with open("/proc/self/stat", "rb") as f:
            # Field 22, counted after the command name (which may hold spaces): clock ticks
            # from boot to the process's start.
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        values["process_start_time_seconds"] = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    values["process_cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        values["process_resident_memory_bytes"] = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        values["process_open_fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    values["process_max_fds"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return values
