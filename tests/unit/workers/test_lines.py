from proxy.workers.supervisor import LineSplitter, describe_exit, is_uvicorn


def test_lines_split_across_reads() -> None:
    s = LineSplitter()
    assert s.feed(b"INFO: Start") == []
    assert s.feed(b"ed\r\nsecond\nthi") == ["INFO: Started", "second"]
    assert s.feed(b"rd") == []
    assert s.flush() == ["third"]
    assert s.flush() == []


def test_byte_at_a_time() -> None:
    s = LineSplitter()
    out: list[str] = []
    for b in b"a\nbc\n\nd":
        out += s.feed(bytes([b]))
    assert out == ["a", "bc", ""]
    assert s.flush() == ["d"]


def test_long_line_is_cut_not_buffered_forever() -> None:
    s = LineSplitter(max_line=10)
    assert s.feed(b"x" * 25) == ["x" * 10, "x" * 10]
    assert s.feed(b"yy\n") == ["xxxxxyy"]


def test_bad_utf8_is_replaced() -> None:
    assert LineSplitter().feed(b"caf\xe9\n") == ["caf\ufffd"]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(3) == "exit status 3"
    assert describe_exit(-9) == "signal SIGKILL"


def test_is_uvicorn() -> None:
    assert is_uvicorn(["uvicorn", "main:app", "--uds", "/x"])
    assert is_uvicorn(["/venv/bin/uvicorn", "main:app"])
    assert is_uvicorn(["/usr/bin/python3.11", "-m", "uvicorn", "main:app"])
    assert not is_uvicorn(["gunicorn", "main:app"])
    assert not is_uvicorn(["python3", "-m", "http.server"])
    assert not is_uvicorn([])
