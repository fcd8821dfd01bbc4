"""Connection owner: events in, events out, clear failures, and the send deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from daemon.config import ApiConfig
from daemon.connection import Connection, ConnectionCallbacks


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.done = asyncio.Event()

    def callbacks(self) -> ConnectionCallbacks:
        return ConnectionCallbacks(
            opened=lambda cid: self.log.append(("opened", cid)),
            event=lambda cid, ev: self.log.append(("event", ev)),
            closed=lambda cid, code, reason: (self.log.append(("closed", code)), self.done.set()),
            failed=lambda cid, reason, status: (
                self.log.append(("failed", reason)), self.done.set()
            ),
        )


async def test_round_trip_and_clean_close_code() -> None:
    received: list[dict[str, Any]] = []
    headers: dict[str, str] = {}

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        headers.update(ws.request.headers)
        await ws.send(json.dumps({"type": "session.created"}))
        await ws.send("not json")
        await ws.send(json.dumps({"no": "type"}))
        received.append(json.loads(await ws.recv()))
        await ws.close(1001, "session expired")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        conn = Connection(1, f"ws://127.0.0.1:{port}/v1/realtime", {"Authorization": "Bearer k"},
                          ApiConfig(), rec.callbacks())
        task = asyncio.create_task(conn.run())
        conn.send({"type": "session.update", "session": {"type": "realtime"}})
        await asyncio.wait_for(rec.done.wait(), 10)
        await task
    assert rec.log == [("opened", 1), ("event", {"type": "session.created"}), ("closed", 1001)]
    assert received == [{"type": "session.update", "session": {"type": "realtime"}}]
    assert headers["authorization"] == "Bearer k"
    assert "permessage-deflate" not in headers.get("sec-websocket-extensions", "")


async def test_refused_connection_reports_failure() -> None:
    rec = Recorder()
    conn = Connection(7, "ws://127.0.0.1:9/", {}, ApiConfig(open_timeout_s=2), rec.callbacks())
    await asyncio.wait_for(conn.run(), 10)
    assert rec.log[0][0] == "failed" and "network error" in rec.log[0][1]


async def test_stuck_send_aborts_the_link() -> None:
    """A peer that stops reading must not wedge us: the send deadline aborts the link."""
    stop = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        ws.transport.pause_reading()  # a peer that never reads again
        await stop.wait()

    async with serve(handler, "127.0.0.1", 0, max_size=None, close_timeout=0.5) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        api = dataclasses.replace(
            ApiConfig(), send_timeout_s=0.5, ping_interval_s=60, ping_timeout_s=60
        )
        conn = Connection(2, f"ws://127.0.0.1:{port}/", {}, api, rec.callbacks())
        task = asyncio.create_task(conn.run())
        big = {"type": "input_audio_buffer.append", "audio": "A" * 4_000_000}
        for _ in range(20):
            conn.send(big)
        await asyncio.wait_for(rec.done.wait(), 15)
        stop.set()
        await task
    assert rec.log[0] == ("opened", 2)
    assert rec.log[-1][0] == "closed"
    assert not conn.is_open


@pytest.mark.parametrize("code", [1000, 1011])
async def test_close_codes_are_reported(code: int) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(code)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        conn = Connection(3, f"ws://127.0.0.1:{port}/", {}, ApiConfig(), rec.callbacks())
        await asyncio.wait_for(conn.run(), 10)
    assert rec.log == [("opened", 3), ("closed", code)]
