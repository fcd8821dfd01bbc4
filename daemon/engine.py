"""The sans-I/O conversation engine: inputs in, actions out (like websockets' protocol.py).

No sockets, no asyncio, no threads, no clock reads. Every input carries ``now`` (monotonic
seconds) and returns the list of :data:`Action` the driver must carry out, in order.
Actions queued outside an input (the constructor's first ``Connect``) are fetched with
:meth:`Conversation.take_actions`.

Design (details in the class docstring of :class:`Conversation`):

* Links. Each WebSocket is a ``_Link`` with a phase ``connecting → open → configuring →
  ready``. On ``session.created`` the engine sends ``session.update`` and re-seeds the
  history as text items with client-chosen item ids; the link is READY once
  ``session.updated`` arrived and every seeded id was acknowledged by
  ``conversation.item.added``/``.created``/``.done`` (or rejected by an ``error`` naming the
  seed's ``event_id`` — logged, counted as settled). At most three links exist: the
  *active* one (ready, carries turns), a *candidate* (reconnecting to become active) and a
  *standby* (prepared by rotation).
* Turns. A press captures audio into a ``_Turn``; while a session is ready the audio is
  streamed as ``input_audio_buffer.append`` chunks, otherwise it is kept (bounded by
  ``session.offline_buffer_s``) and sent when a session is ready. A committed turn keeps
  its audio until its reply is heard, so it can be replayed on a new session, and until
  its transcript came: if the link drops first, the next session is given the audio to
  transcribe (commit, no response), so the user's words still reach the history.
* Responses. At most one ``response.create`` is in flight; requests are queued (one
  pending flag) and sent only when no response is active, nobody holds the button and no
  interrupted item is waiting for its truncation.
* History. Entries are slots in an ordered outbox, filled asynchronously (transcripts,
  heard text, tool results) and emitted as ``RecordHistory`` strictly in conversation
  order. Every entry remembers the link it happened on; before a link is asked anything,
  entries it has not seen are sent to it as text (``_sync``) — this is the delta seeding.
* Rotation. See :meth:`Conversation.tick`: a standby link is prepared when the active
  session is due, and switched to only when it is READY and the device is idle.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from daemon.config import ApiConfig, HistoryConfig, SessionConfig
from daemon.history import HistoryEntry, Role, trim_history
from daemon.protocol import (
    BYTES_PER_SAMPLE,
    FATAL_ERROR_CODES,
    SAMPLE_RATE,
    Dialect,
    b64_to_pcm,
    error_fields,
)

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


# --- tunables ----------------------------------------------------------------------------

BYTES_PER_MS = SAMPLE_RATE * BYTES_PER_SAMPLE // 1000  # 48: PCM16 mono at 24 kHz
INAUDIBLE = "[inaudible]"
UNTRANSCRIBED = "[speech, not transcribed]"
CANCELLED_TOOL_OUTPUT = '{"error": "cancelled: the user interrupted"}'
CANCELLED_TOOL_HISTORY = "[cancelled by the user; no result]"
_CALLS_REMEMBERED = 256  # call ids kept for de-duplication
_TRANSCRIPT_TRIES = 3  # sessions asked to transcribe a turn whose reply was heard


@dataclass(frozen=True)
class Timings:
    """Engine timers (seconds). The defaults suit production; tests may shorten them."""

    transcript_timeout_s: float = 5.0
    """User transcript not in this long after the commit: recorded as ``[inaudible]``."""
    ready_timeout_s: float = 15.0
    """A link open this long without becoming READY is closed and retried."""
    stop_answer_timeout_s: float = 2.0
    """No playback_stopped this long after StopPlayback: assume all received was heard."""
    finish_answer_slack_s: float = 10.0
    """No playback_finished this long after the item's audio should have played out:
    assume it was heard (keeps history and rotation from waiting forever)."""
    response_start_timeout_s: float = 20.0
    """response.create without response.created this long: link considered broken."""
    response_stall_s: float = 45.0
    """An active response without any event this long: link considered broken."""
    cancelled_tool_wait_s: float = 30.0
    """A tool cancelled by a press may still answer this long (recorded late)."""
    rotation_retry_s: float = 30.0
    """First retry delay after a standby failed (doubles, capped at 10 min)."""
    max_expiry_horizon_s: float = 24 * 3600.0
    """An expires_at further away than this (or in the past) is ignored (clock not set)."""


_SeedRole = Literal["user", "assistant", "system"]
_Phase = Literal["connecting", "open", "configuring", "ready"]
_Role = Literal["primary", "standby"]


@dataclass(eq=False)
class _Link:
    conn_id: int
    role: _Role
    started_at: float
    phase: _Phase = "connecting"
    opened_at: float | None = None
    session_id: str = ""
    created_at: float | None = None
    ready_at: float | None = None
    expires_mono: float | None = None
    updated: bool = False
    update_event_id: str = ""
    pending_seed: set[str] = field(default_factory=set)
    seed_events: dict[str, str] = field(default_factory=dict)
    seeded_items: int = 0
    synced_upto: int = 0
    awaiting_commit: deque[_Turn] = field(default_factory=deque)
    seq: int = 0


@dataclass(eq=False)
class _Slot:
    """A history entry in the making; ``text is None`` while pending."""

    role: Role
    created_at: float
    origin: int
    session_id: str
    turn_id: str
    call_id: str = ""
    name: str = ""
    text: str | None = None
    interrupted: bool = False
    deadline: float | None = None
    skip: bool = False
    sent_to: set[int] = field(default_factory=set)  # links given it early (see _sync)


_TurnState = Literal["capturing", "unsent", "committed", "answered", "dropped"]


@dataclass(eq=False)
class _Turn:
    turn_id: str
    pressed_at: float
    audio: bytearray = field(default_factory=bytearray)
    released_at: float | None = None
    link_id: int | None = None
    sent: int = 0
    state: _TurnState = "capturing"
    overflowed: bool = False
    offline_since: float | None = None
    expires_at: float | None = None
    user_slot: _Slot | None = None
    user_item_id: str = ""
    latency_ms: float | None = None
    transcript_tries: int = 1


@dataclass(eq=False)
class _Item:
    """An assistant message item of a response (usually carrying audio)."""

    item_id: str
    conn_id: int
    slot: _Slot
    received: int = 0
    parts: list[str] = field(default_factory=list)
    final_text: str | None = None
    text_complete: bool = False
    ended: bool = False
    ended_at: float | None = None
    stop_requested: bool = False
    stop_at: float | None = None
    suppressed: bool = False
    heard: int | None = None
    done: bool = False
    lost: bool = False
    edit_pending: bool = False


@dataclass(eq=False)
class _Call:
    call_id: str
    name: str
    arguments: str
    conn_id: int
    out_slot: _Slot
    result: str | None = None
    cancelled: bool = False
    sent: bool = False


@dataclass(eq=False)
class _Response:
    conn_id: int
    turn: _Turn | None
    requested_at: float
    last_event_at: float
    turns: list[_Turn] = field(default_factory=list)
    create_event_id: str = ""
    response_id: str = ""
    created: bool = False
    cancelled: bool = False
    answered: bool = False
    items: dict[str, _Item] = field(default_factory=dict)
    call_slots: dict[str, _Slot] = field(default_factory=dict)
    calls: list[_Call] = field(default_factory=list)


@dataclass(eq=False)
class _Batch:
    """Tool calls of one finished response, waiting for their results."""

    calls: list[_Call]
    conn_id: int
    turn: _Turn | None


def cut_at_word(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text``, cut back to a word boundary."""
    if fraction >= 1.0:
        return text
    if fraction <= 0.0:
        return ""
    n = int(len(text) * fraction)
    if n >= len(text):
        return text
    if text[n].isspace():
        return text[:n].rstrip()
    head = text[:n]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut].rstrip() if cut > 0 else ""


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class Conversation:
    """One device's conversation across Realtime sessions.

    Inputs are the methods below; each returns the actions to carry out, in order.

    Optional keyword-only constructor parameters (beyond the driver contract):

    ``rng``                random source for backoff jitter (tests pass a seeded one).
    ``wall_clock_offset``  wall seconds = ``now`` + offset. Needed to convert the server's
                           ``session.created.session.expires_at`` (unix seconds) and to stamp
                           ``HistoryEntry.created_at`` in wall time. ``None``: expires_at is
                           ignored (rotation by ``rotate_after_min`` only) and history stamps are
                           monotonic. Refresh with :meth:`set_wall_clock_offset` (NTP steps).
    ``turn_id_prefix``     prefix of turn ids (``<prefix><n>``); pass something unique per
                           daemon start (e.g. a boot timestamp) if ids must be globally unique.
    ``timings``            :class:`Timings` (internal timeouts).
    """

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
        timings: Timings | None = None,
    ) -> None:
        self._api = api
        self._session = session
        self._hcfg = history
        self._tools_decl = [dict(t) for t in tools]
        self._dialect = Dialect(api.dialect)
        self._rng = rng if rng is not None else random.Random()
        self._wall_offset = wall_clock_offset
        self._turn_prefix = turn_id_prefix
        self._t = timings if timings is not None else Timings()
        self._budget = budget_exhausted
        self._chunk_bytes = max(2, session.append_chunk_ms * BYTES_PER_MS)
        self._min_commit_bytes = session.min_commit_ms * BYTES_PER_MS
        self._offline_max_bytes = int(session.offline_buffer_s * 1000) * BYTES_PER_MS

        self._out: list[Action] = []
        self.history: list[HistoryEntry] = list(initial_history)
        # Per history entry, the links that already have it (where it happened, or sent).
        self._holders: list[set[int]] = [set() for _ in self.history]
        self._outbox: deque[_Slot] = deque()

        self._links: dict[int, _Link] = {}
        self._active: _Link | None = None
        self._candidate: _Link | None = None
        self._standby: _Link | None = None
        self._next_conn = 1
        self._attempt = 0
        self._rot_attempt = 0
        self._next_rotation_try = 0.0
        self._rotation_count = 0
        # Links up to this id were configured before the last reconfigure().
        self._stale_config_upto = 0
        self._last_rotation_at: float | None = None
        self._offline_since: float | None = now
        self._fatal: tuple[str, str] | None = None
        self._shut = False

        self._turn_seq = 0
        self._capture: _Turn | None = None
        self._unsent: list[_Turn] = []
        self._awaiting_answer: list[_Turn] = []
        # Answered turns whose transcript was lost with their link: their audio is sent
        # again (commit, no response) on the next session, to be transcribed there.
        self._retranscribe: list[_Turn] = []
        self._user_items: dict[str, _Turn] = {}
        self._resp: _Response | None = None
        self._resp_queued = False
        self._resp_queued_turn: _Turn | None = None
        self._items: dict[str, _Item] = {}
        self._stopping: set[str] = set()
        self._calls: dict[str, _Call] = {}
        # Ordered set of recent call ids: a call is reported by several events
        # (arguments.done, output_item.done, response.done); bounded for months of uptime.
        self._calls_seen: dict[str, None] = {}
        self._batch: _Batch | None = None
        self._indicator: IndicatorState | None = None
        self._last_latency_ms: float | None = None

        self._candidate = self._open_link("primary", 0.0, now)
        self._update_indicator()

    def take_actions(self) -> list[Action]:
        """Actions queued so far (the constructor's, or anything not yet returned)."""
        out, self._out = self._out, []
        return out

    def start(self, now: float) -> list[Action]:
        """The start-up actions (first ``Connect``, indicator); same as take_actions."""
        return self._finish(now)

    def shutdown(self, now: float) -> list[Action]:
        """Daemon stopping: cut any reply (StopPlayback/cancel), drop a capture, close every
        connection and never reconnect. Inputs after this only record history."""
        # The connections close now, so no transcript.done will come: what was heard is
        # cut from the words received so far, as after a lost link.
        resp = self._resp
        if resp is not None:
            for item in resp.items.values():
                if item.received > 0:
                    item.text_complete = True
        self._interrupt(now)
        if self._capture is not None:
            self._capture.state = "dropped"
            self._capture = None
        self._shut = True
        for turn in self._retranscribe:
            self._give_up_transcript(turn)
        self._retranscribe.clear()
        for conn_id in list(self._links):
            self._emit(Close(conn_id))
        self._links.clear()
        self._active = self._candidate = self._standby = None
        self._resp = None
        self._resp_queued = False
        self._emit_history()
        return self.take_actions()

    # ======================================================================================
    # inputs: button and microphone
    # ======================================================================================

    def press(self, now: float) -> list[Action]:
        """Push-to-talk pressed: interrupt whatever plays, start capturing a turn."""
        if self._fatal is not None:
            self._emit(PlayTone("error"))
            self._notice("warning", "press ignored: the API refused us", code=self._fatal[0])
            return self._finish(now)
        if self._capture is not None or self._shut:
            self._notice("debug", "press ignored (already capturing or shutting down)")
            return self._finish(now)
        self._interrupt(now)
        if self._budget:
            self._emit(PlayTone("error"))
            self._notice("warning", "daily budget exhausted: no new turn")
            return self._finish(now)
        self._turn_seq += 1
        turn = _Turn(turn_id=f"{self._turn_prefix}{self._turn_seq}", pressed_at=now)
        self._capture = turn
        self._emit(PlayTone("listen_start"))
        self._pump(now)
        if turn.link_id is None:
            turn.offline_since = now
            self._notice("info", "turn started while no session is ready: buffering",
                         turn_id=turn.turn_id)
            if self._offline_max_bytes <= 0:
                self._overflow(turn)
        return self._finish(now)

    def audio(self, chunk: bytes, now: float) -> list[Action]:
        """Microphone audio (24 kHz mono PCM16); used only while a turn is captured."""
        turn = self._capture
        if turn is None or not chunk:
            return self.take_actions()
        if turn.link_id is None:
            room = self._offline_max_bytes - self._unsent_bytes()
            if room < len(chunk):
                keep = max(0, room) & ~1
                turn.audio += chunk[:keep]
                self._overflow(turn)
                return self.take_actions()
            turn.audio += chunk
            return self.take_actions()
        turn.audio += chunk
        self._flush_appends(turn, final=False)
        return self.take_actions()

    def release(self, now: float) -> list[Action]:
        """Push-to-talk released: commit the turn (or clear a too-short one)."""
        turn = self._capture
        if turn is None:
            return self._finish(now)
        self._capture = None
        turn.released_at = now
        link = self._links.get(turn.link_id) if turn.link_id is not None else None
        if len(turn.audio) < self._min_commit_bytes:
            if link is not None:
                self._send(link, self._dialect.clear())
            turn.state = "dropped"
            self._emit(PlayTone("too_short"))
            self._notice("debug", "turn too short: cleared", turn_id=turn.turn_id,
                         audio_ms=len(turn.audio) // BYTES_PER_MS)
            return self._finish(now)
        self._emit(PlayTone("listen_stop"))
        turn.user_slot = self._new_slot("user", now, link, turn.turn_id)
        if link is not None:
            self._commit(link, turn, now)
            self._request_response(turn)
        else:
            turn.state = "unsent"
            turn.expires_at = now + self._session.offline_buffer_s
            self._unsent.append(turn)
            self._notice("info", "turn kept until a session is ready", turn_id=turn.turn_id,
                         audio_ms=len(turn.audio) // BYTES_PER_MS)
        return self._finish(now)

    def cancel(self, now: float) -> list[Action]:
        """Stop the reply (and any capture) without starting a turn."""
        turn = self._capture
        if turn is not None:
            self._capture = None
            turn.state = "dropped"
            link = self._links.get(turn.link_id) if turn.link_id is not None else None
            if link is not None:
                self._send(link, self._dialect.clear())
        self._interrupt(now)
        return self._finish(now)

    def reconfigure(
        self,
        api: ApiConfig,
        session: SessionConfig,
        history: HistoryConfig,
        tools: list[dict[str, Any]],
        now: float,
    ) -> list[Action]:
        """New settings (``systemctl reload``). Session settings (instructions, voice,
        tools, ...) reach the model through a fresh session, prepared and switched to at
        the next idle moment exactly like a rotation; connection settings apply to the
        next connection. The dialect cannot change without a restart."""
        if api.dialect != self._api.dialect:
            self._notice("warning", "api.dialect changed: restart parley to apply it")
            api = dataclasses.replace(api, dialect=self._api.dialect)
        session_changed = (session, tools) != (self._session, self._tools_decl) or (
            api.model != self._api.model or api.url != self._api.url
        )
        self._api, self._session, self._hcfg = api, session, history
        self._tools_decl = [dict(t) for t in tools]
        self._chunk_bytes = max(2, session.append_chunk_ms * BYTES_PER_MS)
        self._min_commit_bytes = session.min_commit_ms * BYTES_PER_MS
        self._offline_max_bytes = int(session.offline_buffer_s * 1000) * BYTES_PER_MS
        if session_changed:
            self._stale_config_upto = self._next_conn - 1
            self._next_rotation_try = 0.0
            self._notice("info", "new session settings: switching to a fresh session when idle")
        return self._finish(now)

    def set_budget_exhausted(self, flag: bool) -> list[Action]:
        self._budget = flag
        return self.take_actions()

    def set_wall_clock_offset(self, offset: float) -> None:
        """Wall seconds = monotonic ``now`` + offset (time.time() - time.monotonic())."""
        self._wall_offset = offset

    # ======================================================================================
    # inputs: connections
    # ======================================================================================

    def connection_opened(self, conn_id: int, now: float) -> list[Action]:
        link = self._links.get(conn_id)
        if link is not None and link.phase == "connecting":
            link.phase = "open"
            link.opened_at = now
        return self._finish(now)

    def connection_closed(
        self, conn_id: int, code: int | None, reason: str, now: float
    ) -> list[Action]:
        """Any close of a connection (clean or not). Closes we asked for are ignored."""
        link = self._links.get(conn_id)
        if link is not None:
            level: NoticeLevel = "info" if code == 1001 else "warning"
            self._notice(level, "connection closed", conn_id=conn_id, code=code, reason=reason,
                         role=self._role_name(link))
            self._drop_link(link, now, close=False)
        return self._finish(now)

    def connection_failed(
        self, conn_id: int, error: str, now: float, http_status: int | None = None
    ) -> list[Action]:
        """A connect attempt failed. ``http_status`` 401/403 (handshake refused) is fatal."""
        link = self._links.get(conn_id)
        if link is None:
            return self._finish(now)
        if http_status in (401, 403):
            code = "invalid_api_key" if http_status == 401 else "forbidden"
            self._fatal_error(code, f"handshake refused with HTTP {http_status}")
            return self._finish(now)
        self._notice("warning", "connect failed", conn_id=conn_id, error=error,
                     http_status=http_status, role=self._role_name(link))
        self._drop_link(link, now, close=False)
        return self._finish(now)

    def server_event(self, conn_id: int, event: dict[str, Any], now: float) -> list[Action]:
        """One decoded JSON message from connection ``conn_id`` (normalised here)."""
        link = self._links.get(conn_id)
        if link is None:
            return self._finish(now)
        try:
            ev = self._dialect.decode(event)
        except ValueError as exc:
            self._notice("warning", "malformed server event ignored", error=str(exc))
            return self._finish(now)
        kind = ev["type"]
        handler = self._HANDLERS.get(kind)
        if handler is not None:
            handler(self, link, ev, now)
        return self._finish(now)

    # ======================================================================================
    # inputs: playback and tools
    # ======================================================================================

    def playback_stopped(self, item_id: str, played_samples: int, now: float) -> list[Action]:
        """Answer to StopPlayback: ``played_samples`` actually reached the speaker."""
        item = self._items.get(item_id)
        self._stopping.discard(item_id)
        if item is not None and not item.done:
            self._on_stopped(item, played_samples)
        return self._finish(now)

    def playback_finished(self, item_id: str, played_samples: int, now: float) -> list[Action]:
        """The item's audio was played out completely (after EndOfReply)."""
        item = self._items.get(item_id)
        self._stopping.discard(item_id)
        if item is not None and not item.done:
            item.done = True
            item.heard = min(max(0, played_samples), item.received) if item.lost else item.received
            self._maybe_finalize(item)
        return self._finish(now)

    def tool_result(self, call_id: str, output: str, now: float) -> list[Action]:
        call = self._calls.get(call_id)
        if call is None or call.result is not None:
            self._notice("debug", "tool result for an unknown or answered call", call_id=call_id)
            return self._finish(now)
        call.result = output
        del self._calls[call_id]
        call.out_slot.text = output
        call.out_slot.interrupted = call.cancelled
        call.out_slot.deadline = None
        self._check_batch()
        return self._finish(now)

    # ======================================================================================
    # timers
    # ======================================================================================

    def tick(self, now: float) -> list[Action]:
        """Timers (call every ~100 ms): link timeouts, response watchdog, playback answers,
        transcript waits, offline bounds and session rotation.

        Rotation: when the active session reaches ``rotate_after_min`` of age, or
        ``rotate_before_expiry_s`` before its ``expires_at``, a standby link is opened
        (``Connect(id, 0)``), configured and seeded with ``trim_history(...)`` of the history
        at that moment. Presses keep going to the active session meanwhile. Once the
        standby is READY and the device is idle (no capture, no response, nothing playing,
        no tool, no pending history entry, no unsent turn) the entries recorded since the
        standby's seed snapshot are sent to it as text, it becomes active and the old link
        is closed. A failed standby is retried later (backoff from ``rotation_retry_s``);
        if the active link dies meanwhile, the standby takes over (at once if READY).
        """
        if self._fatal is None:
            self._tick_links(now)
            self._tick_response(now)
        self._tick_playback(now)
        self._tick_slots(now)
        self._tick_offline(now)
        self._tick_rotation(now)
        return self._finish(now)

    # ======================================================================================
    # status
    # ======================================================================================

    def snapshot(self, now: float) -> dict[str, Any]:
        """State for ``parley ctl status`` (plain JSON-able values)."""
        a = self._active
        sb = self._standby
        return {
            "state": self._indicator,
            "ready": a is not None,
            "connected": a is not None,
            "fatal": self._fatal[0] if self._fatal else None,
            "conn_id": a.conn_id if a else None,
            "session_id": a.session_id if a else None,
            "session_age_s": round(now - a.created_at, 1) if a and a.created_at else None,
            "session_expires_in_s": (
                round(a.expires_mono - now, 1) if a and a.expires_mono is not None else None
            ),
            "rotation_due_in_s": round(self._rotation_due(a) - now, 1) if a else None,
            "standby": {"conn_id": sb.conn_id, "phase": sb.phase} if sb else None,
            "reconnecting": self._candidate is not None,
            "reconnect_attempts": self._attempt,
            "offline_for_s": (
                round(now - self._offline_since, 1) if self._offline_since is not None else None
            ),
            "last_turn_latency_ms": (
                round(self._last_latency_ms) if self._last_latency_ms is not None else None
            ),
            "pending_offline_audio_ms": self._unsent_bytes() // BYTES_PER_MS,
            "unsent_turns": len(self._unsent),
            "response_active": self._resp is not None,
            "tools_running": len(self._calls),
            "rotation_count": self._rotation_count,
            "last_rotation_at": (
                self._wall(self._last_rotation_at) if self._last_rotation_at is not None else None
            ),
            "last_rotation_ago_s": (
                round(now - self._last_rotation_at, 1)
                if self._last_rotation_at is not None else None
            ),
            "history_entries": len(self.history),
            "budget_exhausted": self._budget,
        }

    # ======================================================================================
    # internals: output helpers
    # ======================================================================================

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _notice(self, level: NoticeLevel, message: str, /, **fields: Any) -> None:
        self._out.append(Notice(level, message, fields))

    def _send(self, link: _Link, event: dict[str, Any]) -> str:
        link.seq += 1
        event_id = f"p{link.conn_id}_{link.seq}"
        self._out.append(Send(link.conn_id, {**event, "event_id": event_id}))
        return event_id

    def _finish(self, now: float) -> list[Action]:
        self._pump(now)
        return self.take_actions()

    def _wall(self, t: float) -> float:
        return t + self._wall_offset if self._wall_offset is not None else t

    def _role_name(self, link: _Link) -> str:
        if link is self._active:
            return "active"
        if link is self._standby:
            return "standby"
        return "reconnect"

    # ======================================================================================
    # internals: the pump (runs after every input)
    # ======================================================================================

    def _pump(self, now: float) -> None:
        self._emit_history()  # first: _sync below must see every finished entry
        link = self._active
        if link is not None and self._fatal is None:
            if self._retranscribe:
                self._flush_retranscribe(link, now)
            if self._unsent:
                self._flush_unsent(link, now)
            turn = self._capture
            if turn is not None and turn.link_id is None:
                turn.link_id = link.conn_id
                turn.sent = 0
                turn.offline_since = None
                self._flush_appends(turn, final=False)
            self._try_send_response(now)
        self._emit_history()
        self._maybe_switch(now)
        self._update_indicator()

    def _update_indicator(self) -> None:
        state: IndicatorState
        playing = any(i.received > 0 and not i.done for i in self._items.values())
        if self._fatal is not None:
            state = "error"
        elif self._capture is not None:
            state = "listening"
        elif playing:
            state = "speaking"
        elif self._active is None:
            state = "offline"
        elif (
            self._resp is not None
            or self._resp_queued
            or self._unsent
            or self._calls
            or self._batch is not None
        ):
            state = "thinking"
        else:
            state = "idle"
        if state != self._indicator:
            self._indicator = state
            self._emit(SetIndicator(state))

    def _is_idle(self) -> bool:
        return (
            self._capture is None
            and not self._unsent
            and self._resp is None
            and not self._resp_queued
            and self._batch is None
            and not self._calls
            and not self._stopping
            and not self._outbox
            and not any(i.received > 0 and not i.done for i in self._items.values())
            and (self._active is None or not self._active.awaiting_commit)
        )

    # ======================================================================================
    # internals: links, reconnect, fatal
    # ======================================================================================

    def _open_link(self, role: _Role, delay: float, now: float) -> _Link:
        link = _Link(conn_id=self._next_conn, role=role, started_at=now + delay)
        self._next_conn += 1
        self._links[link.conn_id] = link
        self._emit(Connect(link.conn_id, delay))
        return link

    def _backoff(self) -> float:
        rc = self._api.reconnect
        base = min(rc.max_delay_s, rc.initial_delay_s * (2.0 ** min(self._attempt, 30)))
        self._attempt += 1
        return min(rc.max_delay_s, base * (1.0 + rc.jitter * self._rng.random()))

    def _drop_link(self, link: _Link, now: float, *, close: bool) -> None:
        """Forget a link that closed, failed or timed out, and repair the topology."""
        self._links.pop(link.conn_id, None)
        if close:
            self._emit(Close(link.conn_id))
        if link is self._standby:
            self._standby = None
            delay = min(600.0, self._t.rotation_retry_s * (2.0 ** min(self._rot_attempt, 10)))
            self._rot_attempt += 1
            self._next_rotation_try = now + delay
            self._notice("warning", "standby session failed; keeping the current one",
                         retry_in_s=round(delay, 1))
            return
        if link is self._active:
            self._active = None
            self._offline_since = now
            self._on_active_lost(link, now)
        elif link is self._candidate:
            self._candidate = None
        else:
            return
        self._replace_primary(now)

    def _replace_primary(self, now: float) -> None:
        if self._fatal is not None or self._shut:
            return
        standby = self._standby
        if standby is not None:
            self._standby = None
            standby.role = "primary"
            if standby.phase == "ready":
                self._notice("info", "standby session takes over", conn_id=standby.conn_id)
                self._make_active(standby, now)
            else:
                self._candidate = standby
            return
        delay = self._backoff()
        self._candidate = self._open_link("primary", delay, now)
        self._notice("info", "reconnecting", conn_id=self._candidate.conn_id,
                     delay_s=round(delay, 3), attempt=self._attempt)

    def _make_active(self, link: _Link, now: float) -> None:
        self._active = link
        self._candidate = None
        link.role = "primary"
        self._attempt = 0
        if self._offline_since is not None:
            self._notice("info", "session ready", conn_id=link.conn_id,
                         session_id=link.session_id,
                         offline_s=round(now - self._offline_since, 3))
        self._offline_since = None

    def _fatal_error(self, code: str, message: str) -> None:
        if self._fatal is not None:
            return
        self._fatal = (code, message)
        self._emit(Fatal(code, message))
        self._emit(PlayTone("error"))
        for conn_id in list(self._links):
            self._emit(Close(conn_id))
        self._links.clear()
        self._active = self._candidate = self._standby = None
        lost = len(self._unsent) + (1 if self._capture is not None else 0)
        if lost:
            self._notice("error", "turns dropped: the API refused us", turns=lost)
        for turn in self._unsent:
            if turn.user_slot is not None:
                turn.user_slot.skip = True
        self._unsent.clear()
        for turn in self._retranscribe:
            self._give_up_transcript(turn)
        self._retranscribe.clear()
        self._capture = None
        self._resp = None
        self._resp_queued = False

    def _on_active_lost(self, link: _Link, now: float) -> None:
        """The active session is gone: keep what can be kept for the next one."""
        cid = link.conn_id
        turn = self._capture
        if turn is not None and turn.link_id == cid:
            turn.link_id = None
            turn.sent = 0
            turn.offline_since = now
        resp = self._resp
        if resp is not None and resp.conn_id == cid:
            self._resp = None
            for item in resp.items.values():
                item.lost = True
                item.text_complete = True
                if item.received == 0:
                    item.slot.skip = True
                    self._items.pop(item.item_id, None)
                    continue
                if not item.ended and not item.stop_requested:
                    item.ended = True
                    item.ended_at = now
                    self._emit(EndOfReply(item.item_id))
                self._maybe_finalize(item)
            for slot in resp.call_slots.values():
                slot.skip = True
            if resp.calls:
                self._batch = _Batch(list(resp.calls), cid, resp.turn)
                if resp.cancelled:
                    self._cancel_batch(now)
            if resp.answered:
                self._notice("warning", "reply cut off by the connection loss",
                             turn_id=resp.turn.turn_id if resp.turn else "")
        # Committed turns without any heard answer: replay them on the next session.
        replay = [t for t in self._awaiting_answer if t.link_id == cid]
        self._awaiting_answer = [t for t in self._awaiting_answer if t.link_id != cid]
        for t in replay:
            t.state = "unsent"
            t.link_id = None
            t.sent = 0
            t.expires_at = now + self._session.offline_buffer_s
            self._user_items.pop(t.user_item_id, None)
            t.user_item_id = ""
            if t.user_slot is not None:
                t.user_slot.deadline = None
        if replay:
            self._unsent[:0] = replay
            self._notice("warning", "unanswered turn will be replayed on the next session",
                         turns=[t.turn_id for t in replay])
        # Transcripts that can no longer arrive: an answered turn's audio is transcribed
        # on the next session (what the user said is kept), anything else is inaudible.
        pending = [t for t in link.awaiting_commit if t.state == "answered"]
        for item_id, t in list(self._user_items.items()):
            if t.link_id == cid:
                del self._user_items[item_id]
                pending.append(t)
        link.awaiting_commit.clear()
        for t in pending:
            user_slot = t.user_slot
            if user_slot is None or user_slot.text is not None:
                continue
            user_slot.deadline = None
            if (
                t.state == "answered"
                and t.audio
                and self._session.transcription_model
                and t.transcript_tries < _TRANSCRIPT_TRIES
            ):
                t.transcript_tries += 1
                t.link_id = None
                t.sent = 0
                t.user_item_id = ""
                t.expires_at = now + self._session.offline_buffer_s
                self._retranscribe.append(t)
                self._notice("info", "transcript lost with the session; the turn's audio "
                             "will be transcribed on the next one", turn_id=t.turn_id)
            else:
                user_slot.text = INAUDIBLE
        if self._batch is not None and self._batch.conn_id == cid:
            for call in self._batch.calls:
                call.sent = False

    # --- link handshake ---------------------------------------------------------------

    def _on_session_created(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        if link.created_at is not None:
            return
        sess = _dict(ev.get("session"))
        link.session_id = _str(sess.get("id"))
        link.created_at = now
        if link.opened_at is None:
            link.opened_at = now
        expires = sess.get("expires_at")
        if isinstance(expires, (int, float)) and expires > 0 and self._wall_offset is not None:
            mono = float(expires) - self._wall_offset
            if 0 < mono - now <= self._t.max_expiry_horizon_s:
                link.expires_mono = mono
            else:
                self._notice("warning", "session expires_at ignored (is the clock set?)",
                             expires_in_s=round(mono - now))
        link.phase = "configuring"
        link.update_event_id = self._send(
            link, self._dialect.session_update(self._session, self._tools_decl)
        )
        for entry in trim_history(self.history, self._hcfg.max_items, self._hcfg.max_chars):
            if not self._replayed_as_audio(entry.role, entry.turn_id):
                self._send_entry(link, entry, ack=True)
        link.synced_upto = len(self.history)
        self._check_ready(link, now)

    def _on_session_updated(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        link.updated = True
        self._check_ready(link, now)

    def _on_item_ack(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        item_id = _str(_dict(ev.get("item")).get("id")) or _str(ev.get("item_id"))
        if item_id in link.pending_seed:
            link.pending_seed.discard(item_id)
            self._check_ready(link, now)

    def _check_ready(self, link: _Link, now: float) -> None:
        if link.phase != "configuring" or not link.updated or link.pending_seed:
            return
        link.phase = "ready"
        link.ready_at = now
        if link is self._standby:
            self._notice("info", "standby session ready", conn_id=link.conn_id,
                         session_id=link.session_id, seeded=link.seeded_items)
        else:
            self._make_active(link, now)

    def _seed_message(self, entry: HistoryEntry) -> tuple[_SeedRole, str]:
        """How a history entry is re-created as text in a new session.

        Tool calls and outputs become *system* messages (call ids do not exist in the new
        session, and assistant text like "[tool ...]" would teach the model to speak it).
        """
        if entry.role == "user":
            return "user", entry.text
        if entry.role == "assistant":
            return "assistant", entry.text
        if entry.role == "tool_call":
            return "system", f"[tool {entry.name} called with {entry.text}]"
        return "system", f"[tool {entry.name} returned: {entry.text}]"

    def _send_entry(self, link: _Link, entry: HistoryEntry, *, ack: bool) -> None:
        if not entry.text:
            return
        role, text = self._seed_message(entry)
        link.seeded_items += 1
        item_id = f"parley_{link.conn_id}_{link.seeded_items}"
        event_id = self._send(link, self._dialect.text_item(role, text, item_id))
        if ack:
            link.pending_seed.add(item_id)
            link.seed_events[event_id] = item_id

    def _sync(self, link: _Link) -> None:
        """Send ``link`` the entries recorded elsewhere since its seed (delta seeding).

        Finished entries still in the outbox are sent too when all that is pending before
        them already happened on this link (a turn being transcribed there): the model
        must hear the reply and tool results of that turn before it is asked anything.
        """
        for idx in range(link.synced_upto, len(self.history)):
            entry = self.history[idx]
            if link.conn_id not in self._holders[idx] and not self._replayed_as_audio(
                entry.role, entry.turn_id
            ):
                self._send_entry(link, entry, ack=False)
        link.synced_upto = len(self.history)
        for slot in self._outbox:
            if slot.skip:
                continue
            if self._replayed_as_audio(slot.role, slot.turn_id):
                break  # what follows it must wait for its commit
            if slot.text is None:
                if slot.origin == link.conn_id:
                    continue
                break
            if slot.origin != link.conn_id and link.conn_id not in slot.sent_to:
                self._send_entry(link, self._entry(slot), ack=False)
                slot.sent_to.add(link.conn_id)

    def _replayed_as_audio(self, role: Role, turn_id: str) -> bool:
        """A user entry whose turn is about to be committed again (replayed on a new
        session): it reaches that session as the audio, never also as text."""
        return role == "user" and bool(turn_id) and any(
            t.turn_id == turn_id for t in self._unsent)

    # --- rotation -----------------------------------------------------------------------

    def _rotation_due(self, link: _Link | None) -> float:
        if link is None or link.created_at is None:
            return float("inf")
        if link.conn_id <= self._stale_config_upto:
            return link.created_at  # configured with settings a reload replaced: rotate now
        due = link.created_at + self._session.rotate_after_min * 60.0
        if link.expires_mono is not None:
            due = min(due, link.expires_mono - self._session.rotate_before_expiry_s)
        return due

    def _tick_rotation(self, now: float) -> None:
        active = self._active
        if (
            active is None
            or self._fatal is not None
            or self._shut
            or self._standby is not None
            or self._candidate is not None
            or now < self._rotation_due(active)
            or now < self._next_rotation_try
        ):
            return
        self._standby = self._open_link("standby", 0.0, now)
        self._notice("info", "preparing a standby session", conn_id=self._standby.conn_id,
                     session_age_s=round(now - (active.created_at or now), 1))

    def _maybe_switch(self, now: float) -> None:
        new = self._standby
        old = self._active
        if new is None or old is None or new.phase != "ready" or not self._is_idle():
            return
        self._sync(new)
        self._standby = None
        new.role = "primary"
        self._active = new
        self._links.pop(old.conn_id, None)
        self._emit(Close(old.conn_id))
        self._rotation_count += 1
        self._rot_attempt = 0
        self._last_rotation_at = now
        self._notice("info", "session rotated", old_conn_id=old.conn_id, conn_id=new.conn_id,
                     old_session_id=old.session_id, session_id=new.session_id,
                     rotations=self._rotation_count)

    # ======================================================================================
    # internals: turns
    # ======================================================================================

    def _new_slot(
        self, role: Role, now: float, link: _Link | None, turn_id: str, **kw: Any
    ) -> _Slot:
        slot = _Slot(
            role=role,
            created_at=now,
            origin=link.conn_id if link else 0,
            session_id=link.session_id if link else "",
            turn_id=turn_id,
            **kw,
        )
        self._outbox.append(slot)
        return slot

    def _unsent_bytes(self) -> int:
        total = sum(len(t.audio) for t in (*self._unsent, *self._retranscribe))
        turn = self._capture
        if turn is not None and turn.link_id is None:
            total += len(turn.audio)
        return total

    def _overflow(self, turn: _Turn) -> None:
        if turn.overflowed:
            return
        turn.overflowed = True
        self._emit(PlayTone("offline"))
        self._notice("warning", "offline: speech beyond the buffer bound is not kept",
                     turn_id=turn.turn_id, kept_ms=len(turn.audio) // BYTES_PER_MS,
                     bound_s=self._session.offline_buffer_s)

    def _flush_appends(self, turn: _Turn, *, final: bool) -> None:
        link = self._links.get(turn.link_id) if turn.link_id is not None else None
        if link is None:
            return
        size = self._chunk_bytes
        total = len(turn.audio)
        while total - turn.sent >= size or (final and turn.sent < total):
            end = min(total, turn.sent + size)
            self._send(link, self._dialect.append(bytes(turn.audio[turn.sent:end])))
            turn.sent = end

    def _commit(self, link: _Link, turn: _Turn, now: float) -> None:
        self._sync(link)
        turn.link_id = link.conn_id
        self._flush_appends(turn, final=True)
        self._send(link, self._dialect.commit())
        link.awaiting_commit.append(turn)
        if turn.state != "answered":  # a re-transcription asks for no answer
            self._awaiting_answer.append(turn)
            turn.state = "committed"
        slot = turn.user_slot
        if slot is not None:
            slot.origin = link.conn_id
            slot.session_id = link.session_id
            if slot.text is None:
                # Safety net should input_audio_buffer.committed never come.
                slot.deadline = now + 2 * self._transcript_wait(turn)

    def _flush_retranscribe(self, link: _Link, now: float) -> None:
        """Commit kept audio of answered turns with no ``response.create``: the session
        transcribes it and the user item stands where it belongs, before the delta-seeded
        reply that was heard."""
        turns, self._retranscribe = self._retranscribe, []
        for turn in turns:
            self._commit(link, turn, now)

    def _flush_unsent(self, link: _Link, now: float) -> None:
        turns = list(self._unsent)
        for turn in turns:
            turn.sent = 0
            self._commit(link, turn, now)  # its _sync must see the turns still to come
            self._unsent.remove(turn)
        self._notice("info", "sent turns kept while offline", turns=[t.turn_id for t in turns])
        if self._capture is None:
            self._request_response(turns[-1])

    def _on_committed(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        if not link.awaiting_commit:
            return
        turn = link.awaiting_commit.popleft()
        turn.user_item_id = _str(ev.get("item_id"))
        slot = turn.user_slot
        if slot is None or slot.text is not None:
            return
        if not self._session.transcription_model:
            slot.text = UNTRANSCRIBED
            return
        self._user_items[turn.user_item_id] = turn
        slot.deadline = now + self._transcript_wait(turn)

    def _transcript_wait(self, turn: _Turn) -> float:
        """How long a transcript may take: the timeout plus 10 % of the audio length."""
        return self._t.transcript_timeout_s + 0.1 * len(turn.audio) / (BYTES_PER_MS * 1000)

    def _on_transcript(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        turn = self._user_items.pop(_str(ev.get("item_id")), None)
        if turn is None or turn.user_slot is None or turn.user_slot.text is not None:
            return
        failed = ev["type"].endswith(".failed")
        text = "" if failed else _str(ev.get("transcript")).strip()
        if failed:
            self._notice("info", "transcription failed", turn_id=turn.turn_id,
                         error=_str(_dict(ev.get("error")).get("message")))
        turn.user_slot.text = text or INAUDIBLE
        turn.user_slot.deadline = None
        if turn.state == "answered":
            turn.audio = bytearray()

    def _give_up_transcript(self, turn: _Turn) -> None:
        if turn.user_slot is not None and turn.user_slot.text is None:
            turn.user_slot.text = INAUDIBLE
            turn.user_slot.deadline = None
        turn.audio = bytearray()

    def _commit_failed(self, link: _Link) -> None:
        """``input_audio_buffer_commit_empty``: the turn is gone; so is its response."""
        if not link.awaiting_commit:
            return
        turn = link.awaiting_commit.popleft()
        if turn.state == "answered":  # a re-transcription; the turn itself stands
            self._give_up_transcript(turn)
            return
        turn.state = "dropped"
        if turn.user_slot is not None:
            turn.user_slot.skip = True
        if turn in self._awaiting_answer:
            self._awaiting_answer.remove(turn)
        self._emit(PlayTone("too_short"))
        resp = self._resp
        if resp is not None and resp.turns == [turn] and not resp.cancelled:
            resp.cancelled = True
            self._send(link, self._dialect.response_cancel())
        if self._resp_queued and self._resp_queued_turn is turn and not self._awaiting_answer:
            self._resp_queued = False
            self._resp_queued_turn = None

    # ======================================================================================
    # internals: responses
    # ======================================================================================

    def _request_response(self, turn: _Turn | None) -> None:
        self._resp_queued = True
        if turn is not None:
            self._resp_queued_turn = turn

    def _try_send_response(self, now: float) -> None:
        link = self._active
        if (
            not self._resp_queued
            or link is None
            or self._resp is not None
            or self._capture is not None
            or self._batch is not None
            or any(
                (i := self._items.get(item_id)) is not None and i.conn_id == link.conn_id
                for item_id in self._stopping
            )
        ):
            return
        self._sync(link)
        turn = self._resp_queued_turn
        self._resp_queued = False
        self._resp_queued_turn = None
        event_id = self._send(link, self._dialect.response_create())
        self._resp = _Response(
            conn_id=link.conn_id,
            turn=turn,
            requested_at=now,
            last_event_at=now,
            turns=[t for t in self._awaiting_answer if t.link_id == link.conn_id],
            create_event_id=event_id,
        )

    def _current(self, link: _Link, now: float) -> _Response | None:
        resp = self._resp
        if resp is None or resp.conn_id != link.conn_id:
            return None
        resp.last_event_at = now
        return resp

    def _on_response_created(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        rid = _str(_dict(ev.get("response")).get("id"))
        resp = self._current(link, now)
        if resp is None:
            if link is not self._active:
                return
            # A response we did not ask for (should not happen with turn detection off):
            # track it so its audio plays and its done is accounted.
            resp = _Response(link.conn_id, None, now, now)
            self._resp = resp
            self._notice("debug", "unsolicited response tracked", response_id=rid)
        resp.created = True
        resp.response_id = rid or resp.response_id

    def _mark_answered(self, resp: _Response) -> None:
        if resp.answered:
            return
        resp.answered = True
        for turn in resp.turns:
            if turn in self._awaiting_answer:
                self._awaiting_answer.remove(turn)
            turn.state = "answered"
            if turn.user_slot is None or turn.user_slot.text is not None:
                turn.audio = bytearray()
            # else kept until the transcript comes: should the link drop first, the
            # audio is transcribed on the next session (_on_active_lost)

    def _item_for(self, resp: _Response, item_id: str, now: float) -> _Item:
        item = resp.items.get(item_id)
        if item is None:
            link = self._links.get(resp.conn_id)
            turn_id = resp.turn.turn_id if resp.turn else ""
            slot = self._new_slot("assistant", now, link, turn_id)
            item = _Item(item_id=item_id, conn_id=resp.conn_id, slot=slot)
            item.suppressed = resp.cancelled
            resp.items[item_id] = item
            self._items[item_id] = item
        return item

    def _on_output_item_added(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        resp = self._current(link, now)
        item = _dict(ev.get("item"))
        item_id = _str(item.get("id"))
        if resp is None or not item_id:
            return
        if item.get("type") == "message":
            self._item_for(resp, item_id, now)
        elif item.get("type") == "function_call" and item_id not in resp.call_slots:
            turn_id = resp.turn.turn_id if resp.turn else ""
            resp.call_slots[item_id] = self._new_slot(
                "tool_call", now, link, turn_id, name=_str(item.get("name"))
            )

    def _on_audio_delta(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        resp = self._current(link, now)
        item_id = _str(ev.get("item_id"))
        if resp is None or not item_id:
            return
        item = self._item_for(resp, item_id, now)
        if item.suppressed or item.stop_requested or resp.cancelled:
            return
        pcm = b64_to_pcm(_str(ev.get("delta")))
        if len(pcm) % 2:
            pcm = pcm[:-1]
        if not pcm:
            return
        self._emit(PlayAudio(item_id, pcm))
        item.received += len(pcm) // BYTES_PER_SAMPLE
        turn = resp.turn
        if turn is not None and turn.released_at is not None and turn.latency_ms is None:
            turn.latency_ms = (now - turn.released_at) * 1000.0
            self._last_latency_ms = turn.latency_ms
        self._mark_answered(resp)

    def _on_transcript_delta(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        resp = self._current(link, now)
        item_id = _str(ev.get("item_id"))
        if resp is not None and item_id:
            self._item_for(resp, item_id, now).parts.append(_str(ev.get("delta")))

    def _on_transcript_done(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        resp = self._current(link, now)
        item_id = _str(ev.get("item_id"))
        if resp is None or not item_id:
            return
        item = self._item_for(resp, item_id, now)
        text = ev.get("transcript") if "transcript" in ev else ev.get("text")
        if isinstance(text, str):
            item.final_text = text
        item.text_complete = True
        self._maybe_finalize(item)

    def _on_function_call(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        resp = self._current(link, now)
        if resp is not None:
            self._function_call(resp, link, ev, now)

    def _function_call(
        self, resp: _Response, link: _Link, data: dict[str, Any], now: float
    ) -> None:
        call_id = _str(data.get("call_id"))
        if not call_id or call_id in self._calls_seen:
            return
        self._calls_seen[call_id] = None
        if len(self._calls_seen) > _CALLS_REMEMBERED:
            del self._calls_seen[next(iter(self._calls_seen))]
        item_id = _str(data.get("item_id")) or _str(data.get("id"))
        name = _str(data.get("name"))
        arguments = _str(data.get("arguments"))
        turn_id = resp.turn.turn_id if resp.turn else ""
        slot = resp.call_slots.pop(item_id, None)
        if slot is None:
            slot = self._new_slot("tool_call", now, link, turn_id)
        name = name or slot.name
        slot.name, slot.call_id, slot.text = name, call_id, arguments
        out = self._new_slot("tool_output", now, link, turn_id, name=name, call_id=call_id)
        call = _Call(call_id, name, arguments, link.conn_id, out)
        resp.calls.append(call)
        self._calls[call_id] = call
        self._emit(RunTool(call_id, name, arguments))
        self._mark_answered(resp)

    def _on_output_item_done(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        resp = self._current(link, now)
        item = _dict(ev.get("item"))
        if resp is None:
            return
        if item.get("type") == "function_call":
            self._function_call(resp, link, item, now)
        elif item.get("type") == "message":
            self._fallback_text(resp, item, now)

    def _fallback_text(self, resp: _Response, item: dict[str, Any], now: float) -> None:
        item_id = _str(item.get("id"))
        if not item_id:
            return
        texts = []
        for raw in item.get("content") or []:
            part = _dict(raw)
            text = part.get("transcript")
            if text is None:
                text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
        it = self._item_for(resp, item_id, now)
        if it.final_text is None and texts:
            it.final_text = "".join(texts)

    def _on_response_done(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        body = _dict(ev.get("response"))
        rid = _str(body.get("id"))
        resp = self._current(link, now)
        turn_id = resp.turn.turn_id if resp and resp.turn else ""
        usage = _dict(body.get("usage"))
        self._emit(RecordUsage(turn_id, rid, self._api.model, usage))
        if resp is None:
            return
        status = _str(body.get("status"))
        for raw in body.get("output") or []:
            out = _dict(raw)
            if out.get("type") == "function_call":
                self._function_call(resp, link, out, now)
            elif out.get("type") == "message":
                self._fallback_text(resp, out, now)
        self._resp = None
        for item in resp.items.values():
            if item.edit_pending:
                self._truncate_or_delete(item)
            item.text_complete = True
            if item.received > 0 and not item.ended and not item.stop_requested:
                item.ended = True
                item.ended_at = now
                self._emit(EndOfReply(item.item_id))
            if item.received == 0 and (item.suppressed or resp.cancelled):
                # Interrupted before any audio: the user heard nothing of it.
                self._send(link, self._dialect.delete(item.item_id))
                item.slot.skip = True
                item.done = True
                self._items.pop(item.item_id, None)
                continue
            self._maybe_finalize(item)
        for slot in resp.call_slots.values():
            slot.skip = True  # a function call that never completed
        if resp.calls or resp.items or status in ("completed", "incomplete"):
            self._mark_answered(resp)
        if resp.answered or status != "cancelled":
            # A response cancelled before any output leaves its turns waiting: the next
            # response answers them (and they are replayed if the link drops first).
            for turn in resp.turns:
                if turn in self._awaiting_answer:
                    self._awaiting_answer.remove(turn)
        if status in ("failed", "incomplete"):
            details = _dict(body.get("status_details"))
            self._notice("warning", f"response {status}", response_id=rid, turn_id=turn_id,
                         reason=_str(details.get("reason")),
                         error=_dict(details.get("error")).get("message"))
            if status == "failed" and not resp.items and not resp.calls:
                self._emit(PlayTone("error"))
        if resp.calls:
            self._batch = _Batch(list(resp.calls), link.conn_id, resp.turn)
            if resp.cancelled:
                self._cancel_batch(now)
            else:
                self._check_batch()

    def _maybe_finalize(self, item: _Item) -> None:
        slot = item.slot
        if slot.text is not None or slot.skip or not item.text_complete:
            return
        full = item.final_text if item.final_text is not None else "".join(item.parts)
        if item.received == 0:
            slot.text = full
        elif item.heard is None:
            return
        elif item.heard >= item.received and not item.lost and not item.stop_requested:
            slot.text = full
        else:
            heard_text = cut_at_word(full, item.heard / item.received)
            if heard_text:
                slot.text = heard_text
                slot.interrupted = True
            else:
                slot.skip = True  # nothing of it was heard: nothing to remember
        if item.done or item.received == 0:
            self._items.pop(item.item_id, None)

    def _on_stopped(self, item: _Item, played: int) -> None:
        heard = max(0, min(played, item.received))
        item.heard = heard
        item.done = True
        item.stop_requested = True
        resp = self._resp
        if resp is not None and resp.items.get(item.item_id) is item:
            # Its response is still active (cancel in flight): the item is complete only at
            # response.done, so truncate/delete it then (before any next response.create).
            item.edit_pending = True
        else:
            self._truncate_or_delete(item)
        self._maybe_finalize(item)

    def _truncate_or_delete(self, item: _Item) -> None:
        """Tell the server what was heard of an interrupted item."""
        item.edit_pending = False
        link = self._links.get(item.conn_id)
        if link is None or link.phase != "ready" or item.heard is None:
            return
        audio_end_ms = item.heard * 1000 // SAMPLE_RATE
        if audio_end_ms > 0:
            self._send(link, self._dialect.truncate(item.item_id, audio_end_ms))
        else:
            self._send(link, self._dialect.delete(item.item_id))

    def _interrupt(self, now: float) -> None:
        """Stop the reply: cancel an active response, flush playback, cancel tools."""
        resp = self._resp
        if resp is not None and not resp.cancelled:
            resp.cancelled = True
            link = self._links.get(resp.conn_id)
            if link is not None:
                self._send(link, self._dialect.response_cancel())
            for item in resp.items.values():
                if item.received == 0:
                    item.suppressed = True
        for item in list(self._items.values()):
            if item.received > 0 and not item.done and not item.stop_requested:
                item.stop_requested = True
                item.suppressed = True
                item.stop_at = now
                self._stopping.add(item.item_id)
                self._emit(StopPlayback(item.item_id))
        if self._batch is not None:
            self._cancel_batch(now)
        if resp is not None:
            for call in resp.calls:
                self._cancel_call(call, now)
        self._resp_queued = False
        self._resp_queued_turn = None

    def _cancel_call(self, call: _Call, now: float) -> None:
        if call.result is None and not call.cancelled:
            call.cancelled = True
            call.out_slot.deadline = now + self._t.cancelled_tool_wait_s

    def _cancel_batch(self, now: float) -> None:
        """Cancel a tool batch; the server still gets an output for every call."""
        batch = self._batch
        if batch is None:
            return
        self._batch = None
        link = self._links.get(batch.conn_id)
        for call in batch.calls:
            self._cancel_call(call, now)
            if link is not None and link.phase == "ready" and not call.sent:
                call.sent = True
                output = call.result if call.result is not None else CANCELLED_TOOL_OUTPUT
                self._send(link, self._dialect.function_call_output(call.call_id, output))

    def _check_batch(self) -> None:
        batch = self._batch
        if batch is None or any(c.result is None for c in batch.calls):
            return
        self._batch = None
        link = self._active
        if link is not None and link.conn_id == batch.conn_id:
            for call in batch.calls:
                if not call.sent and call.result is not None:
                    call.sent = True
                    self._send(link, self._dialect.function_call_output(call.call_id, call.result))
        # Otherwise the session that made the calls is gone: the calls and results reach
        # the next session as text history (_sync) before its response.create.
        self._request_response(batch.turn)

    def _on_error(self, link: _Link, ev: dict[str, Any], now: float) -> None:
        code, message, event_id = error_fields(ev)
        if code in FATAL_ERROR_CODES:
            self._fatal_error(code, message)
            return
        if code == "response_cancel_not_active":
            log.debug("response.cancel with nothing active (harmless)")
            return
        if code == "session_expired":
            self._notice("info", "session expired; the server will close it",
                         conn_id=link.conn_id, message=message)
            return
        if code == "input_audio_buffer_commit_empty":
            self._notice("info", "server found the committed audio too short",
                         conn_id=link.conn_id)
            self._commit_failed(link)
            return
        if event_id and event_id in link.seed_events:
            item_id = link.seed_events.pop(event_id)
            link.pending_seed.discard(item_id)
            self._notice("warning", "history item rejected while seeding", code=code,
                         message=message)
            self._check_ready(link, now)
            return
        if event_id and event_id == link.update_event_id:
            self._fatal_error("session_config_rejected", f"{code}: {message}")
            return
        resp = self._resp
        if (
            resp is not None
            and event_id
            and event_id == resp.create_event_id
            and not resp.created
        ):
            if code == "conversation_already_has_active_response":
                # Adopt the server's active response; ask again after its response.done.
                resp.created = True
                self._request_response(resp.turn)
            else:
                self._resp = None
                self._emit(PlayTone("error"))
            self._notice("warning", "response.create rejected", code=code, message=message)
            return
        self._notice("warning", "server error", conn_id=link.conn_id, code=code,
                     message=message, event_id=event_id)

    _HANDLERS: ClassVar[dict[str, Callable[[Conversation, _Link, dict[str, Any], float], None]]]

    # ======================================================================================
    # internals: history outbox
    # ======================================================================================

    def _emit_history(self) -> None:
        box = self._outbox
        while box and (box[0].skip or box[0].text is not None):
            slot = box.popleft()
            if slot.skip or slot.text is None:
                continue
            entry = self._entry(slot)
            self.history.append(entry)
            self._holders.append({slot.origin, *slot.sent_to})
            self._emit(RecordHistory(entry))
        self._prune_history()

    def _entry(self, slot: _Slot) -> HistoryEntry:
        return HistoryEntry(
            role=slot.role,
            text=slot.text or "",
            created_at=self._wall(slot.created_at),
            session_id=slot.session_id,
            turn_id=slot.turn_id,
            call_id=slot.call_id,
            name=slot.name,
            interrupted=slot.interrupted,
        )

    def _prune_history(self) -> None:
        limit = 2 * self._hcfg.max_items + 64
        excess = len(self.history) - limit
        if excess <= 0:
            return
        del self.history[:excess]
        del self._holders[:excess]
        for link in self._links.values():
            link.synced_upto = max(0, link.synced_upto - excess)

    # ======================================================================================
    # internals: timers
    # ======================================================================================

    def _tick_links(self, now: float) -> None:
        limit_open = self._api.open_timeout_s + self._t.ready_timeout_s
        for link in list(self._links.values()):
            if link.phase == "ready":
                continue
            if link.phase == "connecting":
                late = now - link.started_at > limit_open
            else:
                late = now - (link.opened_at or link.started_at) > self._t.ready_timeout_s
            if late:
                self._notice("warning", "session not ready in time; retrying",
                             conn_id=link.conn_id, phase=link.phase)
                self._drop_link(link, now, close=True)

    def _tick_response(self, now: float) -> None:
        resp = self._resp
        link = self._active
        if resp is None or link is None or resp.conn_id != link.conn_id:
            return
        if not resp.created and now - resp.requested_at > self._t.response_start_timeout_s:
            why = "no response.created"
        elif resp.created and now - resp.last_event_at > self._t.response_stall_s:
            why = "response stalled"
        else:
            return
        self._notice("warning", f"{why}: reconnecting", conn_id=link.conn_id)
        self._drop_link(link, now, close=True)

    def _tick_playback(self, now: float) -> None:
        for item in list(self._items.values()):
            if item.done or item.ended_at is None:
                continue
            if now - item.ended_at > item.received / SAMPLE_RATE + self._t.finish_answer_slack_s:
                self._notice("warning", "no playback_finished answer; assuming it was heard",
                             item_id=item.item_id)
                item.done = True
                item.heard = item.received
                self._maybe_finalize(item)
        for item_id in list(self._stopping):
            stopping = self._items.get(item_id)
            if stopping is None:
                self._stopping.discard(item_id)
                continue
            if (
                stopping.stop_at is not None
                and now - stopping.stop_at > self._t.stop_answer_timeout_s
            ):
                self._stopping.discard(item_id)
                self._notice("warning", "no playback_stopped answer; assuming all was heard",
                             item_id=item_id)
                if not stopping.done:
                    self._on_stopped(stopping, stopping.received)

    def _tick_slots(self, now: float) -> None:
        for slot in self._outbox:
            if slot.text is None and slot.deadline is not None and now >= slot.deadline:
                slot.deadline = None
                if slot.role == "user":
                    slot.text = INAUDIBLE
                    self._notice("info", "no transcript in time", turn_id=slot.turn_id)
                    for item_id, turn in list(self._user_items.items()):
                        if turn.user_slot is slot:
                            del self._user_items[item_id]
                elif slot.role == "tool_output":
                    slot.text = CANCELLED_TOOL_HISTORY
                    slot.interrupted = True
                    self._calls.pop(slot.call_id, None)

    def _tick_offline(self, now: float) -> None:
        turn = self._capture
        if (
            turn is not None
            and turn.link_id is None
            and turn.offline_since is not None
            and now - turn.offline_since >= self._session.offline_buffer_s
        ):
            self._overflow(turn)
        for t in [t for t in self._retranscribe
                  if t.expires_at is not None and now >= t.expires_at]:
            self._retranscribe.remove(t)
            self._give_up_transcript(t)
        keep: list[_Turn] = []
        for t in self._unsent:
            if t.expires_at is not None and now >= t.expires_at:
                t.state = "dropped"
                if t.user_slot is not None:
                    t.user_slot.skip = True
                self._emit(PlayTone("offline"))
                self._notice("warning", "offline too long: turn not sent", turn_id=t.turn_id,
                             audio_ms=len(t.audio) // BYTES_PER_MS)
            else:
                keep.append(t)
        self._unsent = keep


Conversation._HANDLERS = {
    "session.created": Conversation._on_session_created,
    "session.updated": Conversation._on_session_updated,
    "conversation.item.added": Conversation._on_item_ack,
    "conversation.item.created": Conversation._on_item_ack,
    "conversation.item.done": Conversation._on_item_ack,
    "input_audio_buffer.committed": Conversation._on_committed,
    "conversation.item.input_audio_transcription.completed": Conversation._on_transcript,
    "conversation.item.input_audio_transcription.failed": Conversation._on_transcript,
    "response.created": Conversation._on_response_created,
    "response.output_item.added": Conversation._on_output_item_added,
    "response.output_item.done": Conversation._on_output_item_done,
    "response.output_audio.delta": Conversation._on_audio_delta,
    "response.output_audio_transcript.delta": Conversation._on_transcript_delta,
    "response.output_text.delta": Conversation._on_transcript_delta,
    "response.output_audio_transcript.done": Conversation._on_transcript_done,
    "response.output_text.done": Conversation._on_transcript_done,
    "response.function_call_arguments.done": Conversation._on_function_call,
    "response.done": Conversation._on_response_done,
    "error": Conversation._on_error,
}
