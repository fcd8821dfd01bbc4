"""A tiny Realtime API test client: raw websockets, every sent event validated first."""

from __future__ import annotations

import asyncio
import base64
import json
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from daemon.eventcheck import Dialect, EventChecker

SAMPLE_RATE = 24_000


def pcm(ms: int, value: int = 0) -> bytes:
    """``ms`` milliseconds of constant PCM16 24 kHz mono audio."""
    return int(value).to_bytes(2, "little", signed=True) * (SAMPLE_RATE * ms // 1000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class RealtimeTestClient:
    """Send validated client events, receive server events, keep everything received."""

    def __init__(self, ws: ClientConnection, dialect: Dialect = "ga") -> None:
        self.ws = ws
        self.dialect: Dialect = dialect
        self.checker = EventChecker(dialect, strict=True)
        self.received: list[dict[str, Any]] = []
        self._n = 0

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        api_key: str | None = "test-key",
        beta: bool = False,
        azure_api_key: bool = False,
        extra_headers: dict[str, str] | None = None,
    ) -> RealtimeTestClient:
        headers: dict[str, str] = dict(extra_headers or {})
        if api_key is not None:
            if azure_api_key:
                headers["api-key"] = api_key
            else:
                headers["Authorization"] = f"Bearer {api_key}"
        if beta:
            headers["OpenAI-Beta"] = "realtime=v1"
        ws = await connect(url, additional_headers=headers, open_timeout=5, max_size=None)
        return cls(ws, "beta" if beta else "ga")

    async def __aenter__(self) -> RealtimeTestClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.ws.close()

    async def send(self, event: dict[str, Any], *, validate: bool = True) -> None:
        """Send ``event``; with ``validate`` it must pass the official types first."""
        if validate:
            self.checker.require(event, "client")
        self._n += 1
        event = {"event_id": f"evt_test_{self._n}", **event}
        await self.ws.send(json.dumps(event))

    async def send_raw(self, text: str) -> None:
        await self.ws.send(text)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        event: dict[str, Any] = json.loads(raw)
        self.received.append(event)
        return event

    async def recv_until(
        self, etype: str, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Events up to and including the first one of type ``etype``."""
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout)
                out.append(event)
                if event.get("type") == etype:
                    return out

    async def recv_until_closed(
        self, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Events until the connection closes (clean or not)."""
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    out.append(await self.recv(timeout))
                except ConnectionClosed:
                    return out

    async def append_audio(self, audio: bytes, chunk_ms: int = 40) -> None:
        step = SAMPLE_RATE * 2 * chunk_ms // 1000
        for i in range(0, len(audio), step):
            await self.send({"type": "input_audio_buffer.append", "audio": b64(audio[i:i + step])})

    @staticmethod
    def types(events: list[dict[str, Any]]) -> list[str]:
        """Event types in order, consecutive duplicates of deltas collapsed."""
        out: list[str] = []
        for e in events:
            t = str(e.get("type"))
            if t.endswith(".delta") and out and out[-1] == t:
                continue
            out.append(t)
        return out

    def audio_of(self, events: list[dict[str, Any]], delta_type: str) -> bytes:
        return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == delta_type)
