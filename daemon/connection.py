"""One WebSocket to the Realtime API, owned by one task.

The connection only moves bytes: it decodes server JSON and hands each event to the
driver, and it sends the events the engine asked for. Protocol decisions live in the
sans-I/O engine. Traps handled here (see websockets' behaviour on a device):

- every send has a deadline; when it passes the transport is aborted, because a full
  write buffer also starves the keep-alive ping and makes ``close()`` ignore its timeout;
- ping interval/timeout are short so a half-open link is noticed in seconds;
- no compression (CPU on a Pi Zero) and no proxy discovery from the environment;
- the message size is bounded;
- headers are never logged (websockets logs them at DEBUG; :mod:`daemon.logs` keeps its
  logger at INFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from daemon.config import ApiConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionCallbacks:
    """How a connection reports to the driver; all are called on the event loop."""

    opened: Callable[[int], None]
    event: Callable[[int, dict[str, Any]], None]
    closed: Callable[[int, int | None, str], None]
    failed: Callable[[int, str, int | None], None]  # conn_id, reason, HTTP status if any


def describe_connect_error(exc: BaseException) -> str:
    """A message a person can act on, never containing headers or the key."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate check failed ({exc.verify_message}); if the device just booted, "
            "its clock may not be set yet (check `timedatectl`)"
        )
    if isinstance(exc, websockets.exceptions.InvalidStatus):
        status = exc.response.status_code
        hint = {
            401: "the API key was refused; check the credential",
            403: "access denied; check the key's project and model access",
            404: "wrong URL or model name",
            429: "rate limited or out of quota",
        }.get(status, "server refused the connection")
        return f"HTTP {status} while opening the session: {hint}"
    if isinstance(exc, TimeoutError):
        return "timed out opening the connection"
    if isinstance(exc, OSError):
        return f"network error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


class Connection:
    """A Realtime WebSocket: ``run()`` is its owner task; ``send()`` queues an event."""

    def __init__(
        self,
        conn_id: int,
        url: str,
        headers: Mapping[str, str],
        api: ApiConfig,
        callbacks: ConnectionCallbacks,
    ) -> None:
        self.conn_id = conn_id
        self._url = url
        self._headers = dict(headers)
        self._api = api
        self._callbacks = callbacks
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._ws: ClientConnection | None = None
        self.last_received: float = 0.0

    @property
    def is_open(self) -> bool:
        return self._ws is not None

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event; the owner task sends it with a deadline."""
        self._outbox.put_nowait(json.dumps(event, separators=(",", ":")))

    def close(self) -> None:
        """Ask the owner task to close the socket after what is queued has been sent."""
        self._outbox.put_nowait(None)

    async def run(self) -> None:
        """Open, then read and write until the socket closes. Reports exactly once:
        ``failed`` if it never opened, otherwise ``closed``."""
        loop = asyncio.get_running_loop()
        try:
            ws = await connect(
                self._url,
                additional_headers=self._headers,
                open_timeout=self._api.open_timeout_s,
                ping_interval=self._api.ping_interval_s,
                ping_timeout=self._api.ping_timeout_s,
                close_timeout=2.0,
                max_size=self._api.max_message_bytes,
                compression=None,
                proxy=None,
                user_agent_header="parley",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = describe_connect_error(exc)
            status = (
                exc.response.status_code
                if isinstance(exc, websockets.exceptions.InvalidStatus) else None
            )
            log.warning("connection %d failed: %s", self.conn_id, reason)
            self._callbacks.failed(self.conn_id, reason, status)
            return
        self._ws = ws
        self.last_received = loop.time()
        self._callbacks.opened(self.conn_id)
        code: int | None = None
        reason = ""
        try:
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read(ws))
                writer = tasks.create_task(self._write(ws))
                await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, writer):
                    task.cancel()
        except* websockets.exceptions.ConnectionClosed:
            pass
        except* TimeoutError:
            log.warning("connection %d: send deadline passed; aborting the link", self.conn_id)
            ws.transport.abort()
        finally:
            self._ws = None
            with contextlib.suppress(Exception):
                # Bounded: the transport is either closed or aborted by now.
                async with asyncio.timeout(3):
                    await ws.close()
            if ws.close_code is not None:
                code, reason = ws.close_code, ws.close_reason or ""
            self._callbacks.closed(self.conn_id, code, reason)

    async def _read(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        async for message in ws:
            self.last_received = loop.time()
            if isinstance(message, bytes):
                log.warning("connection %d: ignoring a binary message", self.conn_id)
                continue
            try:
                event = json.loads(message)
            except ValueError:
                log.warning("connection %d: ignoring a message that is not JSON", self.conn_id)
                continue
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                log.warning("connection %d: ignoring an event without a type", self.conn_id)
                continue
            self._callbacks.event(self.conn_id, event)

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            text = await self._outbox.get()
            if text is None:
                async with asyncio.timeout(self._api.send_timeout_s):
                    await ws.close()
                return
            async with asyncio.timeout(self._api.send_timeout_s):
                await ws.send(text)
