"""Seeded generator of hostile request streams for the request fuzzer.

Each input is what one client connection sends: one to five requests built from a corpus of
request-smuggling payloads (Transfer-Encoding and Content-Length spellings, chunk sizes and
extensions, control bytes, obs-fold, bare LF, absolute-form and other targets, odd versions,
pipelining, Upgrade/Connection combinations, Expect, heads near max_header_bytes), then often
mutated (byte flips, insertions of tricky bytes, deletions, duplications, truncation, splicing
with another input).

Every generated request carries a marker, `fz<input number, 8 digits>k<request index>`, in its
target (when its form has room) and in an X-Fz header, so that the fuzzer can tell which input a
request reaching the app came from, although the proxy pools upstream connections. Mutations
never touch the marker's bytes (they work on a placeholder that is filled in last), so a marker
always names the input whose bytes carry it.

Input `i` of seed `s` depends on (s, i) only: any one input can be rebuilt from the two numbers
a failure message prints.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

PLACEHOLDER = b"fz@@@@@@@@"  # exactly as long as the marker that replaces it
MARKER = re.compile(rb"fz(\d{8})k(\d+)")

# Bytes and strings that have split parsers before: every one is a way to disagree on where a
# line, a field or a message ends.
TRICKY = (
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b"\x7f",
    b"\x0b",
    b"\x0c",
    b"\t",
    b" ",
    b":",
    b",",
    b";",
    b"\x80",
    b"\xff",
    b"0",
    b"\r\n\r\n",
    b"\r\n ",
    b"\r\n\t",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Connection: close\r\n",
    b"Host: localhost\r\n",
)
TE_NAMES = (
    b"Transfer-Encoding",
    b"transfer-encoding",
    b"TRANSFER-ENCODING",
    b"Transfer-Encoding ",
    b" Transfer-Encoding",
    b"Transfer-Encoding\t",
    b"Transfer_Encoding",
    b"Transfer-Encodings",
    b"X-Transfer-Encoding",
)
TE_VALUES = (
    b"chunked",
    b"Chunked",
    b"CHUNKED",
    b" chunked",
    b"chunked ",
    b"\tchunked",
    b"chunked\t",
    b"chunked, identity",
    b"identity, chunked",
    b"gzip, chunked",
    b"chunked, chunked",
    b"chunked,",
    b",chunked",
    b"xchunked",
    b"chunkedx",
    b"chunk",
    b'"chunked"',
    b"chunked;q=1",
    b"identity",
    b"",
    b"chunked\x0b",
    b"ch\x00unked",
    b"\x0bchunked",
    b"chunked\r",
)
CL_NAMES = (
    b"Content-Length",
    b"content-length",
    b"CONTENT-LENGTH",
    b"Content-Length ",
    b"Content_Length",
    b"Content-Length\t",
)
CL_VALUES = (
    b"{n}",
    b"0{n}",
    b"00{n}",
    b"+{n}",
    b"-{n}",
    b"0x{n}",
    b"{n} ",
    b" {n}",
    b"{n},{n}",
    b"{n}, {n}",
    b"{n},{m}",
    b"{n}.0",
    b"{n}e0",
    b"{n}\x00",
    b"",
    b"99999999999999999999999",
    b"4294967{n}",
    b"{m}",
)
CHUNK_SIZES = (
    b"{x}",
    b"{X}",
    b"0{x}",
    b"000000000000000000{x}",
    b"{x};ext",
    b"{x};ext=val",
    b'{x};ext="q;v"',
    b"{x} ;ext",
    b"{x}; ext = v",
    b"{x} ",
    b"{x}\t",
    b"0x{x}",
    b"+{x}",
    b"-{x}",
    b" {x}",
    b"{x};",
    b"{x};\x00",
    b"ffffffffffffffffff",
    b"{x}\n",
)
LAST_CHUNKS = (
    b"0\r\n\r\n",
    b"00\r\n\r\n",
    b"0;ext\r\n\r\n",
    b"0\r\nX-Trailer: 1\r\n\r\n",
    b"0\r\nX-Trailer : 1\r\n\r\n",
    b"0\r\nContent-Length: 5\r\n\r\n",
    b"0\r\n\r\n\r\n",
    b"0\n\n",
    b"0\r\n",
    b"0\r\n \r\n\r\n",
)
TARGETS = (
    b"/" + PLACEHOLDER + b"k{k}/a?b=c",
    b"/" + PLACEHOLDER + b"k{k}",
    b"http://localhost/" + PLACEHOLDER + b"k{k}",
    b"https://localhost/" + PLACEHOLDER + b"k{k}?q",
    b"HTTPS://localhost:443/" + PLACEHOLDER + b"k{k}",
    b"http://other.test/" + PLACEHOLDER + b"k{k}",
    b"http://localhost?" + PLACEHOLDER + b"k{k}/x",
    b"http://localhost#/" + PLACEHOLDER + b"k{k}",
    b"http://user@localhost/" + PLACEHOLDER + b"k{k}",
    b"http://[::1]/" + PLACEHOLDER + b"k{k}",
    b"http:/" + PLACEHOLDER + b"k{k}",
    b"ftp://localhost/" + PLACEHOLDER + b"k{k}",
    b"//" + PLACEHOLDER + b"k{k}",
    b"/" + PLACEHOLDER + b"k{k}#frag",
    b"/" + PLACEHOLDER + b"k{k}/../../etc",
    b"/%00" + PLACEHOLDER + b"k{k}",
    b"/" + PLACEHOLDER + b"k{k} HTTP/1.1\r\nX: y",
    b"localhost:443",
    b"*",
    PLACEHOLDER + b"k{k}",
)
VERSIONS = (
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/0.9",
    b"HTTP/2.0",
    b"HTTP/1.2",
    b"HTTP/2",
    b"http/1.1",
    b"HTTP/01.1",
    b"HTTP/1.1 ",
    b"HTTP/1",
    b"HTTP/ 1.1",
)
METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"FZ")
UPGRADES = (b"h2c", b"websocket", b"h2c, websocket", b"WebSocket", b"H2C", b"foo/1", b"")
CONNECTIONS = (
    b"Upgrade, HTTP2-Settings",
    b"upgrade",
    b"Upgrade",
    b"close",
    b"keep-alive",
    b"keep-alive, Upgrade",
    b"x-fz-hop, upgrade",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Host",
    b"X-Forwarded-For",
    b"close, upgrade",
    None,
)
HOP_NAMES = (
    b"X-Fz-Hop",
    b"x-fz-hop",
    b"Keep-Alive",
    b"TE",
    b"Proxy-Authorization",
    b"X-Forwarded-For",
    b"Forwarded",
    b"Content-Length",
    b"Host",
    b"X-Fz",
    b"Cookie",
)
H2C_SETTINGS = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class FuzzInput:
    """What one client connection sends, and how."""

    seed: int
    index: int  # within its seed
    number: int  # the marker's number: unique over a whole run
    data: bytes
    writes: list[bytes]  # `data` cut into the pieces sent one by one
    pause: float  # seconds between two pieces
    half_close: bool  # end with close_notify + FIN, then read the answers
    recipe: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"seed {self.seed} input {self.index} (marker fz{self.number:08d}), "
            f"recipe {' + '.join(self.recipe)}, {len(self.writes)} write(s), "
            f"half-close {self.half_close}\n  bytes: {self.data!r}"
        )


class _Builder:
    """The generators of one input, drawing from its own seeded Random."""

    def __init__(self, rng: random.Random, max_header_bytes: int, max_body_bytes: int) -> None:
        self.rng = rng
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.k = 0  # index of the next request in this input
        self.recipe: list[str] = []

    # --- pieces ---------------------------------------------------------------------------

    def body(self, size: int | None = None) -> bytes:
        rng = self.rng
        if size is None:
            size = rng.choice((0, 1, 5, 16, rng.randrange(1, 300)))
        alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
        if rng.random() < 0.2:  # a body that looks like a request: the smuggler's payload
            inner = b"GET /" + PLACEHOLDER + b"k99 HTTP/1.1\r\nHost: localhost\r\n\r\n"
            return (inner * (size // len(inner) + 1))[:size] if size else b""
        return bytes(rng.choice(alphabet) for _ in range(size))

    def chunked(self, body: bytes, *, tricky: bool) -> bytes:
        rng = self.rng
        out = bytearray()
        pos = 0
        while pos < len(body):
            n = min(len(body) - pos, rng.choice((1, 3, 16, 100, len(body))))
            spec = rng.choice(CHUNK_SIZES) if tricky and rng.random() < 0.3 else b"{x}"
            size = spec.replace(b"{x}", b"%x" % n).replace(b"{X}", b"%X" % n)
            end = b"\r\n"
            if tricky and rng.random() < 0.05:
                end = rng.choice((b"", b"\n", b"\r", b"XX\r\n", b"\r\n\r\n"))
            out += size + (b"" if size.endswith(b"\n") else b"\r\n") + body[pos : pos + n] + end
            pos += n
        out += rng.choice(LAST_CHUNKS) if tricky and rng.random() < 0.3 else b"0\r\n\r\n"
        return bytes(out)

    def request(
        self,
        *,
        method: bytes | None = None,
        target: bytes | None = None,
        version: bytes = b"HTTP/1.1",
        headers: list[bytes] | None = None,
        host: bool = True,
        body: bytes = b"",
        framing: str | None = None,
    ) -> bytes:
        """A request with the marker in its target and X-Fz; `headers` are whole lines."""
        rng = self.rng
        k = self.k
        self.k += 1
        if method is None:
            method = rng.choice(METHODS[:7])
        if target is None:
            target = TARGETS[rng.choice((0, 0, 0, 1, 1, 2, 3))]
        target = target.replace(b"{k}", b"%d" % k)
        lines = [method + b" " + target + b" " + version + b"\r\n"]
        if host:
            lines.append(b"Host: localhost\r\n")
        lines.append(b"X-Fz: " + PLACEHOLDER + b"k%d\r\n" % k)
        lines.extend(headers or [])
        if framing is None:
            framing = rng.choice(("length", "chunked")) if body else "none"
        if framing == "length":
            lines.append(b"Content-Length: %d\r\n" % len(body))
            payload = body
        elif framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked\r\n")
            payload = self.chunked(body, tricky=False)
        else:
            payload = body
        if rng.random() < 0.3:  # field order must not matter
            fields = lines[1:]
            rng.shuffle(fields)
            lines[1:] = fields
        return b"".join(lines) + b"\r\n" + payload

    # --- generators: each returns the bytes of one or more requests -------------------------

    def plain(self) -> bytes:
        return self.request(body=self.body() if self.rng.random() < 0.5 else b"")

    def te_cl(self) -> bytes:
        """Transfer-Encoding and Content-Length in every spelling and combination."""
        rng = self.rng
        body = self.body(rng.choice((0, 5, 11, 40)))
        chunked = self.chunked(body, tricky=False)
        n, m = len(body), len(chunked)
        lines = []
        for _ in range(rng.choice((1, 1, 2, 2, 3))):
            if rng.random() < 0.5:
                name = rng.choice(TE_NAMES) if rng.random() < 0.4 else b"Transfer-Encoding"
                lines.append(name + b":" + rng.choice((b" ", b"", b"\t")) + rng.choice(TE_VALUES))
            else:
                name = rng.choice(CL_NAMES) if rng.random() < 0.4 else b"Content-Length"
                value = rng.choice(CL_VALUES)
                value = value.replace(b"{n}", b"%d" % rng.choice((n, m)))
                value = value.replace(b"{m}", b"%d" % rng.choice((m, n + 1, 0)))
                lines.append(name + b": " + value)
        payload = chunked if rng.random() < 0.6 else body
        if rng.random() < 0.4:  # what a server reading the other framing takes for a new request
            payload += b"GET /" + PLACEHOLDER + b"k98 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        return self.request(
            method=rng.choice((b"POST", b"PUT", b"GET")),
            headers=[line + b"\r\n" for line in lines],
            body=payload,
            framing="none",
        )

    def chunks(self) -> bytes:
        """A chunked body with unusual chunk lines, extensions, ends and trailers."""
        rng = self.rng
        body = self.body(rng.choice((1, 7, 33, 200)))
        return self.request(
            method=b"POST",
            headers=[b"Transfer-Encoding: chunked\r\n"],
            body=self.chunked(body, tricky=True),
            framing="none",
        )

    def control(self) -> bytes:
        """A tricky byte inside the request line, a name, a value or around the colon."""
        rng = self.rng
        byte = rng.choice((b"\x00", b"\r", b"\x7f", b"\x0b", b"\x0c", b"\t", b" ", b"\x80", b"\n"))
        where = rng.choice(("value", "name", "colon", "target", "method", "line"))
        if where == "value":
            header = b"X-Fz-Value: a" + byte + b"b\r\n"
        elif where == "name":
            header = b"X-Fz" + byte + b"Name: v\r\n"
        elif where == "colon":
            header = b"Content-Length" + byte + b": 0\r\n"
        else:
            header = b""
        raw = self.request(headers=[header] if header else [], body=self.body(5))
        if where == "target":
            raw = raw.replace(b" /", b" /" + byte, 1)
        elif where == "method":
            raw = raw[:1] + byte + raw[1:]
        elif where == "line":
            raw = raw.replace(b" HTTP/", byte + b"HTTP/", 1)
        return raw

    def fold(self) -> bytes:
        """obs-fold: a header line continued on the next one."""
        rng = self.rng
        fold = rng.choice(
            (
                b"X-Folded: a\r\n b\r\n",
                b"Transfer-Encoding:\r\n chunked\r\n",
                b"Transfer-Encoding: identity\r\n\tchunked\r\n",
                b"Content-Length: 5\r\n 0\r\n",
                b"X-Fz-Fold: x\r\n\r\n",
            )
        )
        body = self.body(5)
        framing = "none" if b"Transfer" in fold or b"Length" in fold else None
        payload = self.chunked(body, tricky=False) if b"chunked" in fold else body
        return self.request(method=b"POST", headers=[fold], body=payload, framing=framing)

    def bare_lf(self) -> bytes:
        """LF without CR (all of them or one), or one CR without its LF."""
        raw = self.request(body=self.body(5) if self.rng.random() < 0.5 else b"")
        choice = self.rng.choice(("all", "one", "cr"))
        if choice == "all":
            return raw.replace(b"\r\n", b"\n")
        ends = [m.start() for m in re.finditer(rb"\r\n", raw)]
        pos = self.rng.choice(ends)
        return raw[:pos] + (b"\n" if choice == "one" else b"\r") + raw[pos + 2 :]

    def target(self) -> bytes:
        rng = self.rng
        target = rng.choice(TARGETS)
        method = b"CONNECT" if target == b"localhost:443" and rng.random() < 0.7 else None
        if target == b"*":
            method = rng.choice((b"OPTIONS", b"OPTIONS", b"GET"))
        return self.request(method=method, target=target, host=rng.random() < 0.8)

    def version(self) -> bytes:
        rng = self.rng
        version = rng.choice(VERSIONS)
        if version == b"HTTP/0.9" and rng.random() < 0.5:
            return b"GET /" + PLACEHOLDER + b"k%d\r\n" % self.k
        if version == b"HTTP/2.0" and rng.random() < 0.3:
            return H2_PREFACE
        headers = []
        if version == b"HTTP/1.0" and rng.random() < 0.6:
            headers.append(rng.choice((b"Connection: keep-alive\r\n", b"Connection: close\r\n")))
        body = self.body() if rng.random() < 0.4 else b""
        return (
            self.request(version=version, headers=headers, host=rng.random() < 0.7, body=body)
            + self.request()
        )

    def upgrade(self) -> bytes:
        """Upgrade (h2c with HTTP2-Settings, websocket ...) with and without Connection."""
        rng = self.rng
        headers = []
        upgrade = rng.choice(UPGRADES)
        headers.append(b"Upgrade: " + upgrade + b"\r\n")
        if b"h2c" in upgrade.lower() or rng.random() < 0.2:
            headers.append(H2C_SETTINGS)
        connection = rng.choice(CONNECTIONS)
        if connection is not None:
            headers.append(b"Connection: " + connection + b"\r\n")
        if b"websocket" in upgrade.lower() and rng.random() < 0.5:
            headers.append(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
            headers.append(b"Sec-WebSocket-Version: 13\r\n")
        if rng.random() < 0.3:
            headers.append(b"X-Fz-Hop: secret\r\n")
        body = self.body(5) if rng.random() < 0.3 else b""
        raw = self.request(method=rng.choice((b"GET", b"GET", b"POST")), headers=headers, body=body)
        # What a tunnel would carry if the proxy switched: an h2 preface or a smuggled request.
        follow = rng.choice((H2_PREFACE, self.request(), b""))
        return raw + follow

    def hop(self) -> bytes:
        """Connection naming other headers (hop-by-hop for this request), some of which the
        proxy must keep (framing, Host) or write itself (forwarding)."""
        rng = self.rng
        names = rng.sample(HOP_NAMES, rng.randrange(1, 4))
        headers = [b"Connection: " + b", ".join(names) + b"\r\n"]
        if rng.random() < 0.3:
            headers.append(b"Connection: " + rng.choice((b"close", b"keep-alive")) + b"\r\n")
        headers += [n + b": v\r\n" for n in names if n not in (b"Content-Length", b"Host")]
        body = self.body(5) if rng.random() < 0.5 else b""
        return self.request(headers=headers, body=body) + self.request()

    def expect(self) -> bytes:
        rng = self.rng
        value = rng.choice((b"100-continue", b"100-Continue", b"100-continue, foo", b"200-ok"))
        body = self.body(rng.choice((5, 50)))
        raw = self.request(method=b"POST", headers=[b"Expect: " + value + b"\r\n"], body=body)
        if rng.random() < 0.3:
            raw = raw[: len(raw) - rng.randrange(1, len(body) + 1)]  # the body never comes
        return raw

    def huge(self) -> bytes:
        """A head within a few bytes of max_header_bytes (either side), or a body around
        max_body_bytes."""
        rng = self.rng
        if rng.random() < 0.3:
            size = self.max_body_bytes + rng.choice((-1, 0, 1, 100))
            framing = rng.choice(("length", "chunked"))
            return self.request(method=b"POST", body=self.body(size), framing=framing)
        base = self.request()
        head_len = base.find(b"\r\n\r\n") + 4
        want = self.max_header_bytes + rng.randrange(-40, 40) - head_len
        if rng.random() < 0.5:
            filler = [b"X-Fz-Big: " + b"v" * max(0, want - 13) + b"\r\n"]
        else:
            line = b"X-Fz-Many: vvvvvvvvvv\r\n"
            filler = [line] * max(0, want // len(line))
        cut = base.find(b"\r\n") + 2
        return base[:cut] + b"".join(filler) + base[cut:]

    def pipelined(self) -> bytes:
        """Two to five requests in one input, valid and invalid mixed."""
        parts = []
        for _ in range(self.rng.randrange(2, 6)):
            generator = self.rng.choice(SINGLE_GENERATORS + (_Builder.plain,) * 4)
            self.recipe.append(generator.__name__)
            parts.append(generator(self))
        return b"".join(parts)


SINGLE_GENERATORS: tuple[Callable[[_Builder], bytes], ...] = (
    _Builder.plain,
    _Builder.te_cl,
    _Builder.chunks,
    _Builder.control,
    _Builder.fold,
    _Builder.bare_lf,
    _Builder.target,
    _Builder.version,
    _Builder.upgrade,
    _Builder.expect,
    _Builder.hop,
    _Builder.huge,
)
GENERATORS = (*SINGLE_GENERATORS, _Builder.te_cl, _Builder.chunks, _Builder.pipelined)


def _protected(data: bytes) -> list[tuple[int, int]]:
    spans = []
    pos = data.find(PLACEHOLDER)
    while pos >= 0:
        spans.append((pos, pos + len(PLACEHOLDER)))
        pos = data.find(PLACEHOLDER, pos + len(PLACEHOLDER))
    return spans


def _cut_position(rng: random.Random, data: bytes) -> int | None:
    """A place between two bytes (0 to len) that does not split a placeholder."""
    spans = _protected(data)
    for _ in range(20):
        pos = rng.randrange(len(data) + 1)
        if not any(start < pos < end for start, end in spans):
            return pos
    return None


def _byte_position(rng: random.Random, data: bytes, n: int = 1) -> int | None:
    """The first of `n` bytes to change that are all outside every placeholder."""
    spans = _protected(data)
    for _ in range(20):
        pos = rng.randrange(len(data))
        if not any(start < pos + n and pos < end for start, end in spans):
            return pos
    return None


def mutate(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    """One mutation of `data` (`other` is the partner of a splice); placeholders stay whole."""
    kind = rng.choice(("flip", "insert", "insert", "delete", "duplicate", "truncate", "splice"))
    if not data:
        return other, "splice"
    if kind in ("flip", "delete"):
        n = 1 if kind == "flip" else rng.randrange(1, 5)
        pos = _byte_position(rng, data, n)
        if pos is None:
            return data, f"{kind}(skipped)"
        if kind == "delete":
            return data[:pos] + data[pos + n :], "delete"
        new = rng.choice(TRICKY)[:1] if rng.random() < 0.5 else bytes([rng.randrange(256)])
        return data[:pos] + new + data[pos + 1 :], "flip"
    if kind == "duplicate":
        # A whole line duplicated: the classic two Content-Lengths, two Hosts, two chunked.
        lines = data.split(b"\r\n")
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
        return b"\r\n".join(lines), "duplicate"
    pos = _cut_position(rng, data)
    if pos is None:
        return data, f"{kind}(skipped)"
    if kind == "insert":
        return data[:pos] + rng.choice(TRICKY) + data[pos:], "insert"
    if kind == "truncate":
        return data[:pos], "truncate"
    other_pos = _cut_position(rng, other) if other else 0
    return data[:pos] + other[other_pos or 0 :], "splice"


def make_input(
    seed: int,
    index: int,
    number: int,
    *,
    max_header_bytes: int,
    max_body_bytes: int,
    keep: Callable[[bytes], bool] | None = None,
) -> FuzzInput:
    """Input `index` of `seed`, its markers numbered `number`. A mutated input that `keep`
    refuses is mutated again from the start (a few times, then left unmutated): the fuzzer uses
    it to make sure every request a parser can read still carries a marker, which a splice or a
    truncation can otherwise cut away."""
    rng = random.Random(f"{seed}/{index}")
    builder = _Builder(rng, max_header_bytes, max_body_bytes)
    generator = rng.choice(GENERATORS)
    builder.recipe.append(generator.__name__)
    generated = generator(builder)
    recipe = list(builder.recipe)
    data = generated.replace(PLACEHOLDER, b"fz%08d" % number)
    if rng.random() < 0.45:
        partner = _Builder(rng, max_header_bytes, max_body_bytes)
        other = rng.choice(GENERATORS)(partner)
        for _ in range(4):
            mutated, steps = generated, []
            for _ in range(rng.choice((1, 1, 2, 3))):
                mutated, what = mutate(rng, mutated, other)
                steps.append(what)
            candidate = mutated.replace(PLACEHOLDER, b"fz%08d" % number)
            if keep is None or keep(candidate):
                data, recipe = candidate, recipe + steps
                break
    writes = [data]
    if len(data) > 1 and rng.random() < 0.4:
        cuts = sorted({rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 5))})
        writes = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    pause = rng.choice((0.0, 0.0, 0.001, 0.005))
    half_close = rng.random() < 0.15
    return FuzzInput(seed, index, number, data, writes, pause, half_close, recipe)


def markers(data: bytes) -> set[int]:
    """The input numbers named by the markers in `data`."""
    return {int(m.group(1)) for m in MARKER.finditer(data)}
