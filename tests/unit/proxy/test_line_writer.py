"""LineWriter against real pipes: order kept, the event loop never blocked, memory bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import pytest

from proxy.line_writer import LineWriter


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_lines_arrive_in_order_one_write_per_loop_iteration() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w)
        for i in range(1000):
            writer.write(f"line {i}")
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.to_thread(writer.close)
        os.close(w)
        w = -1
        assert read_all(r).decode().splitlines() == [f"line {i}" for i in range(1000)]
        assert writer.dropped == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_lines_go_to_the_thread_in_blocks_by_time_or_size() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        writer = LineWriter(w, flush_every=0.2, flush_bytes=1000)
        writer.write("first")
        await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):  # not handed over yet: it waits for company
            os.read(r, 65536)
        await asyncio.sleep(0.3)
        assert os.read(r, 65536) == b"first\n"  # flush_every passed
        for i in range(20):
            writer.write(f"{i:049d}")  # 50 bytes a line: the 20th reaches flush_bytes
        await asyncio.sleep(0.05)
        assert os.read(r, 65536).count(b"\n") == 20
        await asyncio.to_thread(writer.close)
    finally:
        os.close(r)
        os.close(w)


async def test_a_reader_that_never_reads_costs_lines_not_the_loop(caplog) -> None:
    r, w = os.pipe()  # 64 KiB of pipe buffer, then write() blocks: in the thread only
    try:
        writer = LineWriter(w, max_pending=256 * 1024, report_every=0.0, flush_every=0.0)
        line = "x" * 99
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="tlsproxy"):
            for _ in range(100):
                for _ in range(100):  # 1 MB in all, far beyond the pipe and the bound
                    writer.write(line)
                await asyncio.sleep(0)
        assert time.monotonic() - started < 5  # the loop went on (it would hang forever)
        assert 0 < writer.dropped < 10000
        assert writer.pending <= 256 * 1024
        assert any("line(s) dropped" in r.getMessage() for r in caplog.records)
        # Once the reader reads, what was kept arrives, whole lines only.
        os.set_blocking(r, False)
        got = b""
        deadline = time.monotonic() + 10
        while writer.pending and time.monotonic() < deadline:
            try:
                got += os.read(r, 1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert writer.pending == 0
        with contextlib.suppress(BlockingIOError):  # what the pipe itself still holds
            while chunk := os.read(r, 1 << 20):
                got += chunk
        assert got.count(b"\n") == 10000 - writer.dropped
        assert set(got.split(b"\n")[:-1]) == {line.encode()}
        await asyncio.to_thread(writer.close)
    finally:
        os.close(r)
        os.close(w)


async def test_a_closed_reader_is_said_once_and_serving_goes_on(caplog) -> None:
    r, w = os.pipe()
    os.close(r)
    writer = LineWriter(w)
    with caplog.at_level(logging.ERROR, logger="tlsproxy"):
        for _ in range(10):
            writer.write("lost")
            await asyncio.sleep(0.02)
        await asyncio.to_thread(writer.close)
    os.close(w)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "EPIPE" in errors[0]
    assert writer.pending == 0


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_log_lines_keep_their_format(fmt: str) -> None:
    import json

    from proxy.logs import AccessLog

    lines: list[str] = []

    class Sink:
        write = staticmethod(lines.append)

    fields = dict(
        client="127.0.0.1", sni=None, host=b'a"b\\c', method=b"GET", target=b'/\xe9"',
        status=200, bytes_in=1, bytes_out=20, upstream="127.0.0.1:8000", duration=0.0012345,
        protocol="h2",
    )  # fmt: skip
    AccessLog(fmt, Sink()).emit(**fields)  # type: ignore[arg-type]
    (line,) = lines
    if fmt == "json":
        parsed = json.loads(line)
        assert parsed["host"] == 'a"b\\c' and parsed["target"] == '/é"' and parsed["sni"] is None
        assert parsed["duration_ms"] == 1.234 and parsed["status"] == 200
        assert parsed["protocol"] == "h2"
    else:
        assert line.endswith(' 127.0.0.1 sni=- host=a"b\\c "GET /é"" 200 in=1 out=20 '
                             "upstream=127.0.0.1:8000 1.2ms proto=h2")  # fmt: skip
