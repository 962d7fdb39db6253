"""The control socket, with real unix sockets: one request, one reply, clear errors."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from proxy.control import ControlError, ControlServer, ask, control_path


async def serve(data_dir: Path) -> ControlServer:
    async def renew(request: dict) -> dict:
        if request.get("host") == "bad.test":
            raise ControlError("bad.test is not a host of any [[site]]")
        return {"renewed": request["host"]}

    server = ControlServer(data_dir, {"renew": renew})
    assert await server.start()
    return server


async def test_a_request_gets_its_handlers_answer(tmp_path: Path) -> None:
    server = await serve(tmp_path)
    try:
        assert stat.S_IMODE(control_path(tmp_path).stat().st_mode) == 0o600
        reply = await asyncio.to_thread(ask, tmp_path, {"op": "renew", "host": "a.test"})
        assert reply == {"renewed": "a.test"}
        with pytest.raises(ControlError, match="not a host"):
            await asyncio.to_thread(ask, tmp_path, {"op": "renew", "host": "bad.test"})
        with pytest.raises(ControlError, match="not a request"):
            await asyncio.to_thread(ask, tmp_path, {"op": "explode"})
    finally:
        await server.stop()
    assert not control_path(tmp_path).exists()


async def test_no_proxy_is_a_control_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no running proxy"):
        await asyncio.to_thread(ask, tmp_path, {"op": "renew", "host": "a.test"})


async def test_a_data_dir_deeper_than_sun_path_still_works(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*(["d" * 50] * 3))
    server = await serve(deep)
    try:
        reply = await asyncio.to_thread(ask, deep, {"op": "renew", "host": "a.test"})
        assert reply == {"renewed": "a.test"}
    finally:
        await server.stop()


async def test_a_second_proxy_on_the_same_data_dir_leaves_the_socket_alone(
    tmp_path: Path,
) -> None:
    first = await serve(tmp_path)
    try:
        second = ControlServer(tmp_path, {})
        assert not await second.start()
        reply = await asyncio.to_thread(ask, tmp_path, {"op": "renew", "host": "a.test"})
        assert reply == {"renewed": "a.test"}
    finally:
        await first.stop()
