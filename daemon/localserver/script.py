"""What the local Realtime server says and how it misbehaves: the test's script.

Turn numbering: a *turn* is a user item (committed audio or a user text message) that a
``response.create`` answered. Turns are numbered from 0 across the whole server, over
every connection, in the order their first response was requested; re-seeded history
items that never get a response do not count. Connections are numbered from 0 in the
order their WebSocket handshake completed (refused attempts are not connections).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_FILLER = "That is all I have to say about it for now."
DEFAULT_GREETING = "Hello! How can I help you today?"


@dataclass(frozen=True)
class TurnContext:
    """Given to a reply callable to choose the assistant's reply text."""

    turn: int | None
    connection: int
    user_transcript: str
    #: (tool name, output string) for every function_call_output of this turn so far.
    tool_outputs: tuple[tuple[str, str], ...] = ()


ReplyFn = Callable[[TurnContext], str]
FunctionCall = tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Fault:
    """Break the connection on purpose.

    ``action``:

    * ``"drop"``: abort the TCP connection without a close frame (a lost network).
    * ``"stall"``: stop reading from the socket and stop sending (a half-open
      connection): client pings go unanswered and client data piles up in buffers.
    * ``"close"``: a clean WebSocket close with ``close_code``.

    ``at="response"`` fires during a reply, once ``after_deltas`` audio (or text) deltas
    of it have been sent (0: right after ``response.created``/``output_item.added``);
    ``at="connect"`` fires right after ``session.created``. ``turn``/``connection``
    restrict it (None: any). ``once``: fire at most once per server.
    """

    action: Literal["drop", "stall", "close"] = "drop"
    at: Literal["response", "connect"] = "response"
    after_deltas: int = 0
    turn: int | None = None
    connection: int | None = None
    close_code: int = 1011
    once: bool = True


@dataclass(frozen=True)
class InjectError:
    """Send an ``error`` event at a moment.

    ``on``: ``"connect"`` (instead of / before ``session.created``: with ``close_code`` set
    the connection is closed without a ``session.created``, as for a fatal
    ``insufficient_quota``), ``"session.created"`` (right after it), or a client event
    type (after the server handled that event, e.g. ``"input_audio_buffer.commit"``).
    """

    code: str
    message: str
    error_type: str = "invalid_request_error"
    on: str = "connect"
    connection: int | None = None
    turn: int | None = None
    param: str | None = None
    close_code: int | None = None
    close_reason: str = ""
    once: bool = True


@dataclass
class Script:
    """Everything scriptable about the local server (all optional)."""

    #: What the user "said" in each audio turn (by turn index); past the end, the
    #: transcript describes the audio: "(1.3 seconds of speech)".
    user_transcripts: Sequence[str] = ()
    #: Assistant replies by turn index (a list; past its end the default is used) or a
    #: callable. Default: "You said: <user transcript>. " + filler.
    replies: Sequence[str] | ReplyFn | None = None
    filler: str = DEFAULT_FILLER
    #: Reply to a response.create without any user item (e.g. a greeting).
    greeting: str = DEFAULT_GREETING
    #: Function calls the model makes on a turn's first response: {turn: [(name, args)]}.
    function_calls: Mapping[int, Sequence[FunctionCall]] = field(default_factory=dict)
    #: A word in the user transcript (case-insensitive) that makes the model call a tool.
    trigger_words: Mapping[str, FunctionCall] = field(default_factory=dict)
    #: Reply with the user's own committed audio instead of synthesized speech.
    echo_user_audio: bool = False
    #: Audio pacing: N times faster than real time (0 or inf: no pacing at all).
    realtime_factor: float = 4.0
    #: Audio per response.output_audio.delta, in milliseconds (20-100 is realistic).
    delta_ms: int = 40
    #: Delay between commit and the user transcription events (negative: 0).
    transcription_delay_s: float = 0.05
    #: Turns whose transcription fails (a ...input_audio_transcription.failed event).
    transcription_fails: Collection[int] = ()
    #: Session length the server announces (expires_at) and names in session_expired.
    session_minutes: int = 60
    #: End each session after this many seconds (per connection index with a mapping).
    expire_after_s: float | Mapping[int, float] | None = None
    #: Delay before session.created and before each response.created.
    delay_session_created_s: float = 0.0
    response_delay_s: float = 0.0
    #: Refuse the first N connection attempts: HTTP ``refuse_status``, or accept and
    #: close (1013), or accept and abort TCP.
    refuse_first: int = 0
    refuse_with: Literal["http", "close", "abort"] = "http"
    refuse_status: int = 503
    faults: Sequence[Fault] = ()
    errors: Sequence[InjectError] = ()

    def expire_after(self, connection: int) -> float | None:
        if isinstance(self.expire_after_s, Mapping):
            return self.expire_after_s.get(connection)
        return self.expire_after_s

    def reply_for(self, ctx: TurnContext) -> str:
        if callable(self.replies):
            return self.replies(ctx)
        if ctx.turn is None:
            base = self.greeting
        elif self.replies is not None and ctx.turn < len(self.replies):
            base = self.replies[ctx.turn]
        else:
            base = f"You said: {ctx.user_transcript.rstrip('.')}. {self.filler}".strip()
        if ctx.tool_outputs:
            said = " ".join(f"The {name} tool returned {out}." for name, out in ctx.tool_outputs)
            return f"{said} {base}"
        return base

    def calls_for(self, turn: int | None, user_transcript: str) -> list[FunctionCall]:
        calls: list[FunctionCall] = []
        if turn is not None:
            calls.extend(self.function_calls.get(turn, ()))
        words = {w.strip(".,;:!?\"'()").lower() for w in user_transcript.split()}
        for trigger, call in self.trigger_words.items():
            if trigger.lower() in words:
                calls.append(call)
        return calls
