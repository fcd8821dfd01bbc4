"""The sans-I/O conversation engine: inputs in, actions out.

No sockets, no asyncio, no clock reads. Every input carries ``now`` (monotonic seconds)
and returns the list of :data:`Action` the driver must carry out, in order.
(Interface version: behaviour being filled in.)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.config import ApiConfig, HistoryConfig, SessionConfig
from daemon.history import HistoryEntry

log = logging.getLogger(__name__)

ToneKind = Literal["listen_start", "listen_stop", "too_short", "error", "offline"]
IndicatorState = Literal["idle", "listening", "thinking", "speaking", "offline", "error"]
NoticeLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class Connect:
    """Open a WebSocket (URL/headers from protocol.connection_request) after ``delay_s``."""

    conn_id: int
    delay_s: float


@dataclass(frozen=True)
class Send:
    """Send this already dialect-encoded client event as JSON on connection ``conn_id``."""

    conn_id: int
    event: dict[str, Any]


@dataclass(frozen=True)
class Close:
    """Close connection ``conn_id``; the driver still reports connection_closed (ignored)."""

    conn_id: int


@dataclass(frozen=True)
class PlayAudio:
    """Queue 24 kHz mono PCM16 of reply item ``item_id`` for playback."""

    item_id: str
    pcm: bytes


@dataclass(frozen=True)
class EndOfReply:
    """No more audio will come for ``item_id``; answer playback_finished when played out."""

    item_id: str


@dataclass(frozen=True)
class StopPlayback:
    """Flush ``item_id`` now (with a fade); answer playback_stopped(item_id, played)."""

    item_id: str


@dataclass(frozen=True)
class PlayTone:
    kind: ToneKind


@dataclass(frozen=True)
class SetIndicator:
    state: IndicatorState


@dataclass(frozen=True)
class RunTool:
    """Run a tool; answer tool_result(call_id, output) (also for errors and timeouts)."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class RecordHistory:
    entry: HistoryEntry


@dataclass(frozen=True)
class RecordUsage:
    turn_id: str
    response_id: str
    model: str
    usage: dict[str, Any]


@dataclass(frozen=True)
class Fatal:
    """Retrying cannot help (bad key, no quota...): log once, signal error, stop."""

    code: str
    message: str


@dataclass(frozen=True)
class Notice:
    """Something the driver should log/report. Never contains a secret."""

    level: NoticeLevel
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


Action = (
    Connect
    | Send
    | Close
    | PlayAudio
    | EndOfReply
    | StopPlayback
    | PlayTone
    | SetIndicator
    | RunTool
    | RecordHistory
    | RecordUsage
    | Fatal
    | Notice
)


class Conversation:
    """One device's conversation across Realtime sessions (see module docstring)."""

    def __init__(  # noqa: PLR0917 - the constructor signature is the driver's contract
        self,
        api: ApiConfig,
        session: SessionConfig,
        history: HistoryConfig,
        tools: list[dict[str, Any]],
        initial_history: list[HistoryEntry],
        now: float,
        budget_exhausted: bool = False,
        *,
        rng: random.Random | None = None,
        wall_clock_offset: float | None = None,
        turn_id_prefix: str = "t",
    ) -> None:
        self._out: list[Action] = []

    def take_actions(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    # --- inputs (each returns the actions to carry out) --------------------------------
    def press(self, now: float) -> list[Action]:
        return self.take_actions()

    def release(self, now: float) -> list[Action]:
        return self.take_actions()

    def cancel(self, now: float) -> list[Action]:
        return self.take_actions()

    def audio(self, chunk: bytes, now: float) -> list[Action]:
        return self.take_actions()

    def connection_opened(self, conn_id: int, now: float) -> list[Action]:
        return self.take_actions()

    def server_event(self, conn_id: int, event: dict[str, Any], now: float) -> list[Action]:
        return self.take_actions()

    def connection_closed(
        self, conn_id: int, code: int | None, reason: str, now: float
    ) -> list[Action]:
        return self.take_actions()

    def connection_failed(
        self, conn_id: int, error: str, now: float, http_status: int | None = None
    ) -> list[Action]:
        return self.take_actions()

    def playback_stopped(self, item_id: str, played_samples: int, now: float) -> list[Action]:
        return self.take_actions()

    def playback_finished(self, item_id: str, played_samples: int, now: float) -> list[Action]:
        return self.take_actions()

    def tool_result(self, call_id: str, output: str, now: float) -> list[Action]:
        return self.take_actions()

    def set_budget_exhausted(self, flag: bool) -> list[Action]:
        return self.take_actions()

    def set_wall_clock_offset(self, offset: float) -> None:
        """Wall seconds = monotonic ``now`` + offset (time.time() - time.monotonic())."""

    def tick(self, now: float) -> list[Action]:
        return self.take_actions()

    def snapshot(self, now: float) -> dict[str, Any]:
        return {}
