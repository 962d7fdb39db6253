"""A TLS resumption load: new connections that resume the previous one's session.

    python bench/resume.py --port PORT --tls 1.3 --duration 10 [--procs 6] [--client openssl]

What browsers and HTTP clients do when they come back: each connection offers the session of
the one before (TLS 1.3 tickets with --tls 1.3; TLS 1.2 session tickets, or session IDs when the
server gives no ticket, with --tls 1.2), sends one request, reads the response and closes. wrk
has no way to resume, so bench/run.py runs this instead for its "resume" workloads: several
processes, each a loop of one connection at a time. The server's certificate is not verified
(the bench measures the terminator, not the client's checks).

Two clients:
- `openssl` (the default): `openssl s_time -reuse -www PATH`, OpenSSL's own timing client in C.
  It sends no SNI (the terminators answer with their default site's certificate) and an
  HTTP/1.0 request without Host, and it reports no latencies.
- `python`: Python's ssl, with SNI and an HTTP/1.1 request with `Connection: close`. A Python
  client spends more CPU per connection than the terminator does, so the load core cannot keep
  the terminator busy: it then wakes up for each connection alone, and its CPU per handshake
  grows with the idle time (the figures become a measure of the client).

Prints one line, `BENCH_JSON {...}`, with the fields run_wrk reads from wrk, plus `resumed`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import socket
import ssl
import subprocess
import sys
import time
from typing import Any


def client_context(tls: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    version = ssl.TLSVersion.TLSv1_3 if tls == "1.3" else ssl.TLSVersion.TLSv1_2
    context.minimum_version = context.maximum_version = version
    return context


def one_client(args: argparse.Namespace, deadline: float, out: multiprocessing.Queue) -> None:
    context = client_context(args.tls)
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.server_name}\r\nConnection: close\r\n\r\n"
    ).encode()
    session = None
    done = resumed = errors = received = 0
    latencies: list[float] = []
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            with socket.create_connection((args.host, args.port), timeout=10) as raw:
                # As wrk and browsers do: without it, the request written right after a
                # resumed TLS 1.2 handshake waits for a delayed ACK (40 ms per connection).
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with context.wrap_socket(
                    raw, server_hostname=args.server_name, session=session
                ) as tls:
                    tls.sendall(request)
                    while chunk := tls.recv(65536):
                        received += len(chunk)
                    resumed += tls.session_reused
                    # Read after the response: a TLS 1.3 ticket arrives after the handshake.
                    session = tls.session
        except (OSError, ssl.SSLError):
            errors += 1
            session = None
            continue
        latencies.append(time.perf_counter() - started)
        done += 1
    out.put({"requests": done, "resumed": resumed, "errors": errors, "bytes": received,
             "latencies": latencies})  # fmt: skip


def openssl_client(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """One `openssl s_time` process: it prints "r" for each connection that resumed and "*"
    for each full handshake, then a summary with the bytes read."""
    return subprocess.Popen(
        ["openssl", "s_time", "-connect", f"{args.host}:{args.port}", "-reuse",
         "-tls1_3" if args.tls == "1.3" else "-tls1_2", "-www", args.path,
         "-time", f"{max(args.duration, 1):.0f}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


_S_TIME_DONE = re.compile(rb"(\d+) connections in [\d.]+ real seconds, (\d+) bytes read per")


_S_TIME_MARKS = re.compile(rb"starting\s*([r*]*)")


def openssl_result(out: bytes) -> dict[str, Any]:
    """One s_time run's counts. Its first (full) handshake is not in the timed part."""
    match = _S_TIME_DONE.search(out)
    if match is None:
        return {"requests": 0, "resumed": 0, "errors": 1, "bytes": 0, "latencies": []}
    connections, per_connection = int(match.group(1)), int(match.group(2))
    marks = _S_TIME_MARKS.findall(out)  # the second run is the timed one, with -reuse
    return {
        "requests": connections,
        "resumed": marks[-1].count(b"r") if marks else 0,
        "errors": 0,
        "bytes": connections * per_connection,
        "latencies": [],
    }


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--path", default="/")
    parser.add_argument("--tls", choices=("1.2", "1.3"), default="1.3")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=6)
    parser.add_argument("--client", choices=("openssl", "python"), default="openssl")
    args = parser.parse_args()
    parser_started = time.monotonic()
    if args.client == "openssl":
        clients = [openssl_client(args) for _ in range(args.procs)]
        outputs = []
        for client in clients:
            try:
                outputs.append(client.communicate(timeout=args.duration + 30)[0])
            except subprocess.TimeoutExpired:  # a server that never ends its response
                client.kill()
                outputs.append(client.communicate()[0])
        parts = [openssl_result(out) for out in outputs]
        seconds = time.monotonic() - parser_started
    else:
        out: multiprocessing.Queue = multiprocessing.Queue()
        started = time.monotonic()
        deadline = started + args.duration
        procs = [
            multiprocessing.Process(target=one_client, args=(args, deadline, out))
            for _ in range(args.procs)
        ]
        for proc in procs:
            proc.start()
        parts = [out.get(timeout=args.duration + 60) for _ in procs]
        seconds = time.monotonic() - started
        for proc in procs:
            proc.join(10)
    latencies = [x for part in parts for x in part["latencies"]]
    requests = sum(p["requests"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    result = {
        "requests": requests,
        "resumed": sum(p["resumed"] for p in parts),
        "seconds": seconds,
        "bytes": sum(p["bytes"] for p in parts),
        "errors": {"connect_or_tls": errors} if errors else {},
        "latency_us": {
            "p50": percentile(latencies, 0.50) * 1e6,
            "p99": percentile(latencies, 0.99) * 1e6,
        }
        if latencies
        else {},
    }
    print("BENCH_JSON " + json.dumps(result))
    return 0 if requests else 1


if __name__ == "__main__":
    sys.exit(main())
