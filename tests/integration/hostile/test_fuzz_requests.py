"""Differential fuzzing of the request path (issue 9), against an independent strict parser.

Generated and mutated request streams (request_corpus.py) go, one TLS connection each, through
a real `tlsproxy run` to an upstream that records every byte (recording_upstream.py).

THE PROPERTY, for every input: each request of it either gets a 4xx/5xx made by the proxy and
the app sees nothing of it (at most a head and part of a body on an upstream connection that is
then closed: an aborted request, never a complete one), or the app receives it, and then the
strict parser (strict_http.py, not h11) reads from the upstream bytes the same method, origin-form
target and body as h11 (h11.Connection(SERVER), the reference of what the proxy may accept) read
from the client's bytes; in order, with no request h11 did not read, no leftover bytes on any
upstream connection, and the app's answer relayed to this client and no other. What reaches the
app must also respect the upgrade rules (no h2c, no HTTP2-Settings, Upgrade only with
Connection: upgrade) and drop what the client's Connection lists. A violation is an "ambiguous
forward". A crash is the proxy dying or logging "unexpected error" or a traceback.

CI mode: a fixed seed and count. Long mode: TLSPROXY_FUZZ_SECONDS=N runs rounds of new seeds
(each printed) for N seconds; TLSPROXY_FUZZ_SEED=S replays seed S (with TLSPROXY_FUZZ_INPUTS
inputs, CI's count by default). A failure prints each offending input's bytes and seed, what the
client got and what the app got.
"""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import h11
import pytest

from tests.integration.harness import running
from tests.integration.hostile.recording_upstream import RecordingUpstream, serial_of
from tests.integration.hostile.request_corpus import MARKER, FuzzInput, make_input
from tests.integration.hostile.strict_http import Request, StrictError, parse_requests
from tests.integration.proxy.conftest import MakeProxy
from tests.integration.proxy.support import HalfClosingClient, Proxy, proxy_config

CI_SEED = 90210
CI_INPUTS = int(os.environ.get("TLSPROXY_FUZZ_INPUTS") or 1000)
LONG_SECONDS = float(os.environ.get("TLSPROXY_FUZZ_SECONDS") or 0)
REPLAY_SEED = os.environ.get("TLSPROXY_FUZZ_SEED")
ROUND_INPUTS = 1000  # long mode: inputs per seed
CONCURRENCY = 4  # client connections in flight at once
MAX_HEADER_BYTES = 4096
MAX_BODY_BYTES = 1024
# Small limits so that inputs hit them; short timeouts so that a stuck input ends fast.
LIMITS = f"""
handshake_timeout = "3s"
header_read_timeout = "2s"
idle_timeout = "2s"
body_read_timeout = "2s"
upstream_read_timeout = "3s"
max_header_bytes = {MAX_HEADER_BYTES}
max_body_bytes = {MAX_BODY_BYTES}
"""
QUIET = 0.12  # once every expected answer is in: this long without a byte ends the read
READ_CAP = 6.0  # the most one input may take (the proxy's own timeouts are 2-3 s)
CRASH = re.compile(r"unexpected error|Traceback")
# Names a client's Connection may list that still reach the app, rightly: the framing and Host
# (listing them is a smuggling attempt; the proxy keeps the message whole), the forwarding
# headers the proxy writes itself, and what the proxy re-adds for an upgrade or TE: trailers.
_KEPT_WHEN_LISTED = frozenset(
    (
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"upgrade",
        b"te",
        b"connection",
    )
)


# --- the reference: what h11 reads from the client's bytes ---------------------------------------


@dataclass
class RefRequest:
    method: bytes
    target: bytes
    version: bytes
    body: bytes = b""
    complete: bool = False  # h11 read its end
    hop_by_hop: frozenset[bytes] = frozenset()  # the names its Connection lists
    marked: bool = True  # its head carries a marker


@dataclass
class Reference:
    requests: list[RefRequest]
    end: str  # why h11 read no further

    @property
    def complete(self) -> list[RefRequest]:
        return [r for r in self.requests if r.complete]


def _tokens(headers: h11.Headers, name: bytes) -> set[bytes]:
    return {t.strip().lower() for n, v in headers for t in v.split(b",") if n == name}


def h11_reference(data: bytes, half_close: bool) -> Reference:
    """The requests h11.Connection(SERVER) reads from `data`, as the proxy would serve them: one
    after the other, each answered (with a 404, so that no upgrade or CONNECT switches), and an
    HTTP/1.0 keep-alive connection (which h11 does not do) read on as a new connection."""
    out: list[RefRequest] = []
    rest = data
    while True:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(rest)
        if half_close:
            conn.receive_data(b"")
        current: RefRequest | None = None
        keep_alive_10 = False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return Reference(out, "need-data")
                if isinstance(event, h11.ConnectionClosed):
                    return Reference(out, "closed")
                if isinstance(event, h11.Request):
                    options = _tokens(event.headers, b"connection")
                    current = RefRequest(
                        event.method,
                        event.target,
                        event.http_version,
                        hop_by_hop=frozenset(options),
                        marked=bool(MARKER.search(event.target))
                        or any(MARKER.search(v) for _, v in event.headers),
                    )
                    out.append(current)
                    keep_alive_10 = (
                        event.http_version == b"1.0"
                        and b"keep-alive" in options
                        and b"close" not in options
                    )
                elif isinstance(event, h11.Data):
                    assert current is not None
                    current.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    current.complete = True
                    conn.send(h11.Response(status_code=404, headers=[("content-length", "0")]))
                    conn.send(h11.EndOfMessage())
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                    elif keep_alive_10:
                        break
                    else:
                        return Reference(out, "close")
                else:
                    return Reference(out, f"h11 event {event!r}")
        except h11.RemoteProtocolError as exc:
            return Reference(out, f"h11 refused: {exc}")
        rest = conn.trailing_data[0]
        if not rest and not half_close:
            return Reference(out, "need-data")


def all_marked(data: bytes) -> bool:
    """Does every request h11 reads in `data` (half-closed or not) carry a marker?"""
    return all(r.marked for half in (False, True) for r in h11_reference(data, half).requests)


def origin_form(target: bytes) -> bytes | None:
    """What a gateway must send upstream for a request-target (RFC 9112 3.2), None for a target
    that has none (authority-form, garbage, an absolute-URI with a fragment or an odd scheme)."""
    if target.startswith(b"/") or target == b"*":
        return target
    match = re.fullmatch(rb"(?i)https?://([^/?#]*)([/?][^#]*)?", target)
    if match is None:
        return None
    path = match.group(2) or b""
    return path if path.startswith(b"/") else b"/" + path


# --- the client side ---------------------------------------------------------------------------


@dataclass
class ClientResponse:
    status: int
    serial: int | None  # the app's serial, if the app made it


@dataclass
class Outcome:
    raw: bytes = b""
    ended: str = ""  # "closed", "quiet", "timeout", or an error
    seconds: float = 0.0
    started: float = 0.0  # time.monotonic() at the start


def read_responses(raw: bytes, methods: list[bytes]) -> tuple[list[ClientResponse], str]:
    """The final responses in `raw` (1xx skipped), answering `methods` in order, and what went
    wrong reading them ("" if they are all whole, "incomplete" if the last one is cut)."""
    conn = h11.Connection(h11.CLIENT)
    if raw:  # (an empty receive_data would mean EOF)
        conn.receive_data(raw)
    out: list[ClientResponse] = []
    for method in [*methods, b"GET", b"GET"]:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        elif out:
            break  # the connection must close after the last one
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        head: h11.Response | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return out, ("incomplete" if head or conn.trailing_data[0] else "")
                if isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    serial = dict(head.headers).get(b"x-app-serial")
                    out.append(ClientResponse(head.status_code, int(serial) if serial else None))
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return out, ""
        except h11.RemoteProtocolError as exc:
            return out, f"unparseable: {exc}"
    leftover = conn.trailing_data[0]
    return out, (f"bytes after the last response: {leftover[:200]!r}" if leftover else "")


def send_input(proxy: Proxy, context: ssl.SSLContext, fuzz: FuzzInput, expected: int) -> Outcome:
    """Send one input on a new TLS connection; read until the proxy closes, or every expected
    answer came and then QUIET passed, or READ_CAP."""
    start = time.monotonic()
    outcome = Outcome(started=start)
    if fuzz.half_close:
        return _send_half_closed(proxy, fuzz, outcome, start)
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        sock = context.wrap_socket(raw, server_hostname="localhost")
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        outcome.ended = f"handshake failed: {exc!r}"
        return outcome
    methods = [r.method for r in fuzz_reference(fuzz).requests]
    data = bytearray()
    try:
        for i, piece in enumerate(fuzz.writes):
            if i and fuzz.pause:
                time.sleep(fuzz.pause)
            sock.sendall(piece)
        sock.settimeout(0.03)
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - start > READ_CAP:
                outcome.ended = "timeout"
                break
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                if now - last >= QUIET and len(read_responses(bytes(data), methods)[0]) >= expected:
                    outcome.ended = "quiet"
                    break
                continue
            if not chunk:
                outcome.ended = "closed"
                break
            data += chunk
            last = time.monotonic()
    except (OSError, ssl.SSLError) as exc:
        outcome.ended = (
            "closed" if isinstance(exc, ConnectionResetError | ssl.SSLEOFError) else repr(exc)
        )
    finally:
        sock.close()
    outcome.raw = bytes(data)
    outcome.seconds = time.monotonic() - start
    return outcome


def _send_half_closed(proxy: Proxy, fuzz: FuzzInput, outcome: Outcome, start: float) -> Outcome:
    try:
        client = HalfClosingClient(proxy)
    except (OSError, ssl.SSLError) as exc:
        outcome.ended = f"handshake failed: {exc!r}"
        return outcome
    try:
        for i, piece in enumerate(fuzz.writes):
            if i and fuzz.pause:
                time.sleep(fuzz.pause)
            client.send(piece)
        client.half_close()
        client.sock.settimeout(READ_CAP)
        outcome.raw = client.read_all()
        outcome.ended = "closed"
    except TimeoutError:
        outcome.ended = "timeout"
    except (OSError, ssl.SSLError) as exc:
        outcome.ended = f"closed ({exc!r})"
    finally:
        client.close()
    outcome.seconds = time.monotonic() - start
    return outcome


_references: dict[int, Reference] = {}


def fuzz_reference(fuzz: FuzzInput) -> Reference:
    ref = _references.get(fuzz.number)
    if ref is None:
        ref = _references[fuzz.number] = h11_reference(fuzz.data, fuzz.half_close)
    return ref


# --- the app side --------------------------------------------------------------------------------


@dataclass
class Forwarded:
    """A request (or the start of one, `complete` False) on an upstream connection."""

    conn: int
    start: int
    arrival: float
    number: int | None  # the input its marker names
    method: bytes
    target: bytes
    body: bytes
    complete: bool
    request: Request | None = None

    def show(self) -> str:
        what = "request" if self.complete else "ABORTED request"
        return f"{what} {self.method!r} {self.target!r} body {self.body[:300]!r}"


@dataclass
class AppSide:
    forwards: dict[int, list[Forwarded]] = field(default_factory=dict)  # by input number
    by_position: dict[tuple[int, int], Forwarded] = field(default_factory=dict)
    problems: list[tuple[int | None, str]] = field(default_factory=list)
    unattributed: list[Forwarded] = field(default_factory=list)  # no marker at all


def _marker_numbers(request: Request | None, raw: bytes) -> set[int]:
    if request is None:
        return {int(m.group(1)) for m in MARKER.finditer(raw)}
    # A mutation may have moved the marker anywhere in the head (into Host, say).
    found = {int(m.group(1)) for m in MARKER.finditer(request.target)}
    for _, value in request.fields:
        found |= {int(m.group(1)) for m in MARKER.finditer(value)}
    return found


def read_app_side(upstream: RecordingUpstream, checked: dict[int, int]) -> AppSide:
    """Every upstream connection's new bytes, read by the strict parser and attributed to
    inputs by their markers. `checked` (per connection, the offset read up to) is updated."""
    side = AppSide()
    for conn, (data, closed) in enumerate(upstream.snapshot()):
        begin = checked.get(conn, 0)
        checked[conn] = len(data)
        segment = data[begin:]
        if not segment:
            continue
        try:
            stream = parse_requests(segment)
        except StrictError as exc:
            before = [m for m in MARKER.finditer(segment) if m.start() <= exc.offset + 64]
            number = int(before[-1].group(1)) if before else None
            context = segment[max(0, exc.offset - 300) : exc.offset + 300]
            side.problems.append(
                (
                    number,
                    f"upstream connection {conn} is not a strict request stream: {exc}; "
                    f"around it: {context!r}",
                )
            )
            continue
        for request in stream.requests:
            at = begin + request.start
            _add(side, conn, at, upstream, request, request.body, True, segment)
        partial = stream.partial
        if partial is not None:
            if not closed:
                side.problems.append(
                    (
                        None,
                        f"upstream connection {conn} was left open in the middle of a "
                        f"request: {stream.leftover[:400]!r}",
                    )
                )
            head = partial.head
            _add(
                side,
                conn,
                begin + partial.start,
                upstream,
                head,
                partial.body,
                False,
                stream.leftover,
            )
    return side


def _add(
    side: AppSide,
    conn: int,
    at: int,
    upstream: RecordingUpstream,
    request: Request | None,
    body: bytes,
    complete: bool,
    raw: bytes,
) -> None:
    numbers = _marker_numbers(request, raw)
    method = request.method if request else b"?"
    target = request.target if request else raw[:200]
    forwarded = Forwarded(
        conn,
        at,
        upstream.arrival(conn, at),
        min(numbers) if numbers else None,
        method,
        target,
        body,
        complete,
        request,
    )
    side.by_position[(conn, at)] = forwarded
    if len(numbers) != 1:
        side.problems.append(
            (
                forwarded.number,
                f"a request on upstream connection {conn} names inputs "
                f"{sorted(numbers)}: {forwarded.show()}",
            )
        )
    if forwarded.number is not None:
        side.forwards.setdefault(forwarded.number, []).append(forwarded)
    else:
        side.unattributed.append(forwarded)
    if request is not None and complete:
        side.problems.extend((forwarded.number, p) for p in _hop_problems(request))


def _hop_problems(request: Request) -> list[str]:
    """What the fixed upgrade rules (issue 9, defect 1) forbid on the app's side."""
    problems = []
    upgrades = {t.strip().lower() for v in request.values(b"upgrade") for t in v.split(b",")}
    connection = {t.strip().lower() for v in request.values(b"connection") for t in v.split(b",")}
    if b"h2c" in upgrades:
        problems.append(f"Upgrade: h2c reached the app: {request.target!r}")
    if request.values(b"http2-settings"):
        problems.append(f"HTTP2-Settings reached the app: {request.target!r}")
    if upgrades and b"upgrade" not in connection:
        problems.append(f"Upgrade without Connection: upgrade reached the app: {request.target!r}")
    if not (request.target.startswith(b"/") or request.target == b"*"):
        problems.append(f"a target not in origin-form reached the app: {request.target!r}")
    return problems


# --- the property --------------------------------------------------------------------------------


def check_input(
    fuzz: FuzzInput,
    outcome: Outcome,
    side: AppSide,
    serials: dict[int, tuple[int, int]],
) -> list[str]:
    """The property for one input; the list of ways it was broken."""
    ref = fuzz_reference(fuzz)
    problems: list[str] = []
    responses, error = read_responses(outcome.raw, [r.method for r in ref.requests])
    if error and not (error == "incomplete" and outcome.ended == "timeout"):
        if not _body_after_head_error(error, responses, ref, outcome):
            problems.append(f"the client's response stream: {error}")
    forwards = side.forwards.get(fuzz.number, [])
    complete = sorted((f for f in forwards if f.complete), key=lambda f: f.arrival)
    aborted = [f for f in forwards if not f.complete]
    answered_by_app: set[int] = set()
    next_forward = 0
    for j, response in enumerate(responses):
        if response.serial is None:
            if response.status < 400:
                problems.append(f"response {j}: a {response.status} the app did not make")
            continue
        forwarded = side.by_position.get(serials.get(response.serial, (-1, -1)))
        if forwarded is None or forwarded.number != fuzz.number:
            problems.append(
                f"response {j} answers app request #{response.serial}, not one of this input's"
            )
            continue
        if next_forward >= len(complete) or complete[next_forward] is not forwarded:
            problems.append(f"response {j} answers the app's requests out of order")
        next_forward += 1
        answered_by_app.add(j)
        if j >= len(ref.requests) or not ref.requests[j].complete:
            problems.append(f"the app answered request {j}, which h11 did not read whole")
            continue
        problems.extend(f"request {j}: {p}" for p in _differences(forwarded, ref.requests[j]))
    if len(complete) > len(ref.complete):
        problems.append(f"the app got {len(complete)} requests, h11 read {len(ref.complete)}")
    if next_forward < len(complete):
        problems.append(
            f"the app got {len(complete) - next_forward} request(s) whose answer did not reach "
            "this client"
        )
    if len(aborted) > 1:
        problems.append(f"{len(aborted)} aborted requests from one connection")
    for forwarded in aborted:
        if not any(
            j not in answered_by_app
            and forwarded.method in (r.method, b"?")
            and (forwarded.request is None or forwarded.target == origin_form(r.target))
            and r.body.startswith(forwarded.body)
            for j, r in enumerate(ref.requests)
        ):
            problems.append(
                f"an aborted request that is no unanswered part of the input: {forwarded.show()}"
            )
    return problems


def _body_after_head_error(
    error: str, responses: list[ClientResponse], ref: Reference, outcome: Outcome
) -> bool:
    """A proxy-made error to a HEAD request that h11 read but the proxy refused as malformed
    carries a body. The connection closes right after it, so nothing can be read out of step;
    counted apart (Tally.head_error_bodies), not as an ambiguous forward."""
    last = len(responses) - 1
    return (
        error.startswith("bytes after the last response")
        and last >= 0
        and responses[last].serial is None
        and responses[last].status >= 400
        and last < len(ref.requests)
        and ref.requests[last].method == b"HEAD"
        and outcome.ended == "closed"
    )


def _differences(forwarded: Forwarded, ref: RefRequest) -> list[str]:
    out = []
    if forwarded.method != ref.method:
        out.append(f"method {forwarded.method!r}, h11 read {ref.method!r}")
    expected = origin_form(ref.target)
    if expected is None:
        out.append(f"target {ref.target!r} has no origin-form, yet {forwarded.target!r} went on")
    elif forwarded.target != expected:
        out.append(f"target {forwarded.target!r}, h11 read {ref.target!r} ({expected!r})")
    if forwarded.body != ref.body:
        out.append(f"body {forwarded.body[:200]!r}, h11 read {ref.body[:200]!r}")
    if forwarded.request is not None:
        for name in sorted(ref.hop_by_hop - _KEPT_WHEN_LISTED):
            if forwarded.request.values(name):
                out.append(f"{name.decode('latin-1')} reached the app though Connection lists it")
    return out


def report(fuzz: FuzzInput, outcome: Outcome, side: AppSide, problems: list[str]) -> str:
    ref = fuzz_reference(fuzz)
    app = [f.show() for f in side.forwards.get(fuzz.number, [])] or ["nothing"]
    return "\n".join(
        [
            f"AMBIGUOUS FORWARD: {fuzz.describe()}",
            *(f"  - {p}" for p in problems),
            f"  h11 read: {[(r.method, r.target, r.body[:80], r.complete) for r in ref.requests]}"
            f" then {ref.end}",
            f"  the client got ({outcome.ended}, {outcome.seconds:.2f}s): {outcome.raw[:600]!r}",
            f"  the app got: {app}",
            f"  replay: TLSPROXY_FUZZ_SEED={fuzz.seed} (input {fuzz.index})",
        ]
    )


# --- running rounds ------------------------------------------------------------------------------


@dataclass
class Tally:
    inputs: int = 0
    forwarded: int = 0  # complete requests the app got
    refused: int = 0  # inputs with at least one error made by the proxy
    aborted: int = 0  # requests the app got the start of, then a close
    h11_read: int = 0  # complete requests h11 read
    timeouts: int = 0
    head_error_bodies: int = 0  # see _body_after_head_error
    ambiguous: int = 0
    crashes: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.inputs} inputs in {self.seconds:.1f}s: h11 read {self.h11_read} requests, "
            f"the app got {self.forwarded} (+{self.aborted} aborted), {self.refused} inputs "
            f"refused, {self.timeouts} reads timed out, {self.head_error_bodies} errors to HEAD "
            f"with a body, {self.ambiguous} ambiguous forwards, "
            f"{self.crashes} crashes"
        )


def settle(upstream: RecordingUpstream, checked: dict[int, int]) -> None:
    """Wait until nothing more reaches the upstream and cut requests are closed (bounded)."""
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        if upstream.quiet_for() > 0.4:
            pending = False
            for conn, (data, closed) in enumerate(upstream.snapshot()):
                if closed or len(data) == checked.get(conn, 0):
                    continue
                try:
                    pending = (
                        pending or parse_requests(data[checked.get(conn, 0) :]).partial is not None
                    )
                except StrictError:
                    continue
            if not pending:
                return
        time.sleep(0.1)


def run_round(
    proxy: Proxy,
    upstream: RecordingUpstream,
    seed: int,
    count: int,
    first_number: int,
    checked: dict[int, int],
    tally: Tally,
) -> None:
    context = proxy.context()
    inputs = [
        make_input(
            seed,
            i,
            first_number + i,
            max_header_bytes=MAX_HEADER_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
            keep=all_marked,
        )
        for i in range(count)
    ]

    def one(fuzz: FuzzInput) -> Outcome:
        expected = len(fuzz_reference(fuzz).complete)
        return send_input(proxy, context, fuzz, expected)

    start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = list(pool.map(one, inputs))
    settle(upstream, checked)
    side = read_app_side(upstream, checked)
    serials = {a.serial: (a.conn, a.start) for a in list(upstream.answered)}
    flagged: dict[int | None, list[str]] = {}
    for number, problem in side.problems:
        flagged.setdefault(number, []).append(problem)
    for fuzz, outcome in zip(inputs, outcomes, strict=True):
        ref = fuzz_reference(fuzz)
        tally.inputs += 1
        tally.h11_read += len(ref.complete)
        forwards = side.forwards.get(fuzz.number, [])
        tally.forwarded += sum(f.complete for f in forwards)
        tally.aborted += sum(not f.complete for f in forwards)
        tally.timeouts += outcome.ended == "timeout"
        responses, _ = read_responses(outcome.raw, [r.method for r in ref.requests])
        tally.refused += any(r.serial is None for r in responses)
        tally.head_error_bodies += _body_after_head_error(
            read_responses(outcome.raw, [r.method for r in ref.requests])[1],
            responses,
            ref,
            outcome,
        )
        problems = flagged.pop(fuzz.number, []) + check_input(fuzz, outcome, side, serials)
        if problems:
            tally.ambiguous += 1
            tally.failures.append(report(fuzz, outcome, side, problems))
        _references.pop(fuzz.number, None)
    for number, problems in flagged.items():  # names no input of this round
        tally.ambiguous += 1
        tally.failures.append(f"AMBIGUOUS FORWARD (input {number}, seed {seed}): {problems}")
    for forwarded in side.unattributed:  # the inputs whose connection was open when it came
        suspects = [
            fuzz.describe()
            for fuzz, outcome in zip(inputs, outcomes, strict=True)
            if outcome.started - 0.5 <= forwarded.arrival <= outcome.started + outcome.seconds + 3
        ]
        tally.failures.append(
            f"  the {forwarded.show()} came while these inputs were sent: " + "\n".join(suspects)
        )
    tally.seconds += time.monotonic() - start


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with running(RecordingUpstream()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(make_module_proxy: MakeProxy, upstream: RecordingUpstream) -> Proxy:
    return make_module_proxy(
        proxy_config(
            [(["localhost"], "app")],
            {"app": upstream.server},
            default_site="localhost",
            limits=LIMITS,
            server='access_log = "off"',
        )
    )


def crashes(proxy: Proxy, log_start: int) -> list[str]:
    found = []
    if proxy.proc is not None and proxy.proc.poll() is not None:
        found.append(f"the proxy exited with {proxy.proc.returncode}")
    log = proxy.log()[log_start:]
    found += [line for line in log.splitlines() if CRASH.search(line)]
    return found


def normal_get(proxy: Proxy) -> None:
    with proxy.conn("localhost") as conn:
        # Marker number 0 is no input's: the control requests.
        conn.send(b"GET /fz00000000k0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = conn.response()
    assert response.status == 200, response
    assert serial_of(response.body) is not None, response


def _timeout() -> float:
    return max(300.0, LONG_SECONDS * 1.5 + 120)


@pytest.mark.timeout(_timeout())
def test_request_path_differential_fuzz(proxy: Proxy, upstream: RecordingUpstream) -> None:
    log_start = len(proxy.log())
    normal_get(proxy)
    checked: dict[int, int] = {}
    tally = Tally()
    wall = time.monotonic()
    if LONG_SECONDS:
        number = 1
        while time.monotonic() - wall < LONG_SECONDS:
            seed = random.SystemRandom().randrange(2**32)
            print(f"request fuzz: round with seed {seed} ({ROUND_INPUTS} inputs)", flush=True)
            run_round(proxy, upstream, seed, ROUND_INPUTS, number, checked, tally)
            number += ROUND_INPUTS
            tally.crashes = len(crashes(proxy, log_start))
            if tally.failures or tally.crashes:
                break
    else:
        seed = int(REPLAY_SEED) if REPLAY_SEED else CI_SEED
        run_round(proxy, upstream, seed, CI_INPUTS, 1, checked, tally)
    found = crashes(proxy, log_start)
    tally.crashes = len(found)
    print(f"request fuzz: {tally.line()}; wall {time.monotonic() - wall:.1f}s", flush=True)
    assert not tally.failures, f"{tally.line()}\n" + "\n\n".join(tally.failures[:20])
    assert not found, "\n".join(found[:20])
    normal_get(proxy)
    assert tally.inputs >= (1 if LONG_SECONDS else CI_INPUTS)


HEAD_REFUSALS = {
    "bare LF": b"HEAD /h HTTP/1.1\r\nHost: localhost\nX-A: b\r\n\r\n",
    "obs-fold": b"HEAD /h HTTP/1.1\r\nHost: localhost\r\nX-A: b\r\n c\r\n\r\n",
    "control byte": b"HEAD /h HTTP/1.1\r\nHost: localhost\r\nX-A: a\x01b\r\n\r\n",
    "HTTP/1.2": b"HEAD /h HTTP/1.2\r\nHost: localhost\r\n\r\n",
    "head too large": b"HEAD /h HTTP/1.1\r\nHost: localhost\r\nX-A: "
    + b"v" * MAX_HEADER_BYTES
    + b"\r\n\r\n",
}


@pytest.mark.xfail(
    strict=True,
    reason="errors made while the head is read (400 for bare LF, obs-fold or control bytes, "
    "505, 431) carry a body even when the method is HEAD; Exchange._reply_error's do not",
)
@pytest.mark.parametrize("data", HEAD_REFUSALS.values(), ids=HEAD_REFUSALS.keys())
def test_an_error_to_a_head_request_has_no_body(proxy: Proxy, data: bytes) -> None:
    """Found by the fuzzer (counted as Tally.head_error_bodies): RFC 9112 6.3, a response to
    HEAD ends with its head; a client reads what follows as the next response."""
    with proxy.conn("localhost") as conn:
        conn.send(data)
        waited, raw = conn.wait_closed(5.0)
    assert waited is not None
    responses, error = read_responses(raw, [b"HEAD"])
    assert [r.status for r in responses] and responses[0].status >= 400, raw
    assert error == "", raw
