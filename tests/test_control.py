"""Control socket: owner-only permissions, JSON lines, clear errors."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from aio import cancel_and_wait

from daemon.control import ControlServer, default_socket_path, request
from daemon.errors import ParleyError


async def _serve(path: Path, calls: list[tuple[str, dict[str, Any]]]) -> asyncio.Task[None]:
    async def handler(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        calls.append((cmd, args))
        if cmd == "history":
            raise ParleyError("history: n must be a positive integer")
        return {"state": "idle"}

    task = asyncio.create_task(ControlServer(path, handler).run())
    for _ in range(100):
        if path.exists():
            break
        await asyncio.sleep(0.01)
    return task


async def test_commands_permissions_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    calls: list[tuple[str, dict[str, Any]]] = []
    task = await _serve(path, calls)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        reply = await asyncio.to_thread(request, path, "press")
        assert reply == {"ok": True, "state": "idle"}
        reply = await asyncio.to_thread(request, path, "history", {"n": 0})
        assert reply == {"ok": False, "error": "history: n must be a positive integer"}
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"cmd": "explode"}\nnot json\n')
        bad_cmd = json.loads(await reader.readline())
        bad_json = json.loads(await reader.readline())
        writer.close()
        assert bad_cmd["ok"] is False and "unknown command" in bad_cmd["error"]
        assert bad_json == {"ok": False, "error": "request is not JSON"}
        assert calls == [("press", {}), ("history", {"n": 0})]
    finally:
        await cancel_and_wait(task)
    assert not path.exists()


def test_client_says_when_daemon_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(ParleyError, match="is parley running"):
        request(tmp_path / "none.sock", "status")


def test_default_socket_path() -> None:
    assert default_socket_path("/x/c.sock", {}) == Path("/x/c.sock")
    assert default_socket_path("", {"RUNTIME_DIRECTORY": "/run/parley"}) == Path(
        "/run/parley/control.sock"
    )


def test_client_says_when_nothing_listens(tmp_path: Path) -> None:
    import socket as _socket

    path = tmp_path / "stale.sock"
    stale = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file left behind by a crashed daemon
    stale.close()
    with pytest.raises(ParleyError, match="not running"):
        request(path, "status")
