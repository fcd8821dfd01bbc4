"""A local stand-in for the OpenAI Realtime API over WebSocket (GA, beta and Azure forms).

See the package docstring for the overview; this module holds the server and one object
per connection. Every client event is validated against the official ``openai`` types
(when installed) and logged; every server event is logged and self-checked too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import hmac
import http
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from daemon.eventcheck import EventChecker, Violation
from daemon.localserver import shapes, synth
from daemon.localserver.script import Fault, FunctionCall, InjectError, Script, TurnContext

logger = logging.getLogger(__name__)

# websockets logs request headers (Authorization included) at DEBUG: keep its logger quiet.
_ws_logger = logging.getLogger(__name__ + ".ws")
if _ws_logger.level < logging.INFO:
    _ws_logger.setLevel(logging.INFO)

DialectOption = Literal["auto", "ga", "beta"]
Direction = Literal["client", "server"]

MIN_COMMIT_MS = 100
OPENAI_PATH = "/v1/realtime"
AZURE_GA_PATH = "/openai/v1/realtime"
AZURE_PREVIEW_PATH = "/openai/realtime"
_SECRET_HEADERS = {"authorization", "api-key"}


class ApiError(Exception):
    """An error the server answers with an ``error`` event (the connection stays open)."""

    def __init__(
        self,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type


@dataclass(frozen=True)
class LogEntry:
    """One event on the wire, in the order the server saw or sent it."""

    seq: int
    t: float  # seconds since the server started
    connection: int
    direction: Direction
    event: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.event.get("type"))


@dataclass(frozen=True)
class Truncation:
    """A successful ``conversation.item.truncate``."""

    connection: int
    item_id: str
    content_index: int
    audio_end_ms: int
    audio_ms: int  # the item's audio length before truncation
    transcript: str  # the full transcript before truncation
    heard: str  # the words that started before audio_end_ms


@dataclass
class TurnRecord:
    """A user turn and what the server answered to it."""

    turn: int
    connection: int
    item_id: str
    user_transcript: str
    replies: list[str] = field(default_factory=list)
    #: (name, call_id, arguments JSON) of the function calls the model made.
    function_calls: list[tuple[str, str, str]] = field(default_factory=list)
    #: (name, output) of the function_call_output items the client sent back.
    tool_outputs: list[tuple[str, str]] = field(default_factory=list)
    calls_decided: bool = False


@dataclass
class _Response:
    id: str
    turn: TurnRecord | None
    in_conversation: bool
    params: dict[str, Any]
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    output: list[dict[str, Any]] = field(default_factory=list)
    out_text: str = ""
    out_audio_ms: int = 0
    task: asyncio.Task[None] | None = None


class _Stop(Exception):
    """The connection was dropped, stalled or closed by a fault: stop this task quietly."""


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * 12}{key[-4:]}"


def _redacted_headers(headers: Headers) -> dict[str, str]:
    return {
        k: ("<redacted>" if k.lower() in _SECRET_HEADERS else v) for k, v in headers.raw_items()
    }


def _short(event: Mapping[str, Any], limit: int = 160) -> str:
    def shrink(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: shrink(x) for k, x in v.items() if k not in ("event_id",)}
        if isinstance(v, list):
            return [shrink(x) for x in v]
        if isinstance(v, str) and len(v) > 48:
            return f"<{len(v)} chars>"
        return v

    body = {k: shrink(v) for k, v in event.items() if k not in ("type", "event_id")}
    text = json.dumps(body, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RealtimeConnection:
    """One client connection: its session, conversation and event logs."""

    def __init__(
        self,
        server: LocalRealtimeServer,
        index: int,
        *,
        ws: ServerConnection,
        dialect: shapes.Dialect,
        model: str,
        path: str,
        azure: bool,
    ) -> None:
        self.server = server
        self.index = index
        self.ws = ws
        self.dialect: shapes.Dialect = dialect
        self.model = model
        self.path = path
        self.azure = azure
        self.headers = _redacted_headers(ws.request.headers) if ws.request else {}
        self.checker = EventChecker(dialect, strict=server.strict)
        self.names = shapes.names(dialect)
        self.session_id = shapes.new_id("sess_")
        self.conversation_id = shapes.new_id("conv_")
        self.expires_at = int(time.time()) + server.script.session_minutes * 60
        self.session: dict[str, Any] = shapes.default_session(
            dialect, self.session_id, model, self.expires_at
        )
        #: The conversation, in order (server shapes, without audio bytes).
        self.items: list[dict[str, Any]] = []
        #: Audio bytes of items (user input audio, assistant output audio sent so far).
        self.audio: dict[str, bytearray] = {}
        #: Start time (ms) of each word of an assistant item's transcript.
        self.word_starts: dict[str, list[tuple[int, str]]] = {}
        self.item_turns: dict[str, TurnRecord] = {}
        self.input_buffer = bytearray()
        self.response: _Response | None = None
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.truncations: list[Truncation] = []
        self.deleted: list[str] = []
        self.stalled = False
        self.dropped = False
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._prev_input_tokens = 0
        self._audio_out_started = False

    # --- plumbing ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<RealtimeConnection {self.index} {self.dialect} {self.model}>"

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, _Stop | ConnectionClosed):
                logger.error("connection %d: task failed", self.index, exc_info=exc)
                self.server.internal_errors.append(repr(exc))

    async def send(self, event: dict[str, Any]) -> None:
        if self.stalled or self.dropped:
            raise _Stop
        text = json.dumps({"event_id": shapes.new_id("event_"), **event})
        event = json.loads(text)  # a snapshot: the log must not change with later state
        self.sent.append(event)
        self.server._record(self.index, "server", event)
        problems = self.checker.check(event, "server")
        if problems:
            # A bug in this server, not in the client: make it loud for the tests.
            violation = Violation(self.dialect, "server", str(event.get("type")), problems,
                                  event, self.index)
            logger.error("local server sent an invalid event: %s", violation)
            self.server.violations.append(violation)
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            raise _Stop from None

    async def send_error(
        self,
        code: str | None,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        client_event_id: str | None = None,
    ) -> None:
        await self.send({
            "type": "error",
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": client_event_id,
            },
        })

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close cleanly with ``code`` (the client sees a close frame)."""
        self._cancel_response_silently()
        self.close_code = code
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, reason)

    def drop(self) -> None:
        """Abort the TCP connection without a close frame."""
        logger.info("connection %d: dropping TCP connection", self.index)
        self.dropped = True
        self._cancel_response_silently()
        self.ws.transport.abort()

    def stall(self) -> None:
        """Stop reading and sending: the peer sees a half-open connection."""
        logger.info("connection %d: stalling (half-open)", self.index)
        self.stalled = True
        self.ws.transport.pause_reading()

    def _cancel_response_silently(self) -> None:
        if self.response is not None and self.response.task is not None:
            current = asyncio.current_task()
            if self.response.task is not current:
                self.response.task.cancel()

    async def expire(self) -> None:
        """End the session like the real API at its maximum duration."""
        minutes = self.server.script.session_minutes
        self._cancel_response_silently()
        await self.send_error(
            "session_expired", f"Your session hit the maximum duration of {minutes} minutes."
        )
        await self.close(1001, "")

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        expire_s = self.server.script.expire_after(self.index)
        if expire_s is not None:
            self._spawn(self._expire_later(expire_s))
        try:
            with contextlib.suppress(_Stop, ConnectionClosed):
                await self._serve()
            if self.stalled:
                # Returning would make websockets send a close frame: stay silent until
                # the peer gives up or the server stops.
                await self.ws.wait_closed()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self.close_code is None and self.ws.close_code is not None:
                self.close_code = self.ws.close_code
            self.closed.set()
            self.server._notify()

    async def _serve(self) -> None:
        script = self.server.script
        if await self._inject_errors("connect", None):
            return
        if script.delay_session_created_s > 0:
            await asyncio.sleep(script.delay_session_created_s)
        await self.send({"type": "session.created", "session": self.session})
        if await self._inject_errors("session.created", None):
            return
        await self._connect_faults()
        async for message in self.ws:
            if self.stalled:
                break
            await self._handle_message(message)

    async def _expire_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        logger.info("connection %d: session expired after %.1f s", self.index, seconds)
        await self.expire()

    async def _connect_faults(self) -> None:
        for fault in self.server._faults_for("connect", self.index, None, 0):
            await self._apply_fault(fault)

    async def _apply_fault(self, fault: Fault) -> None:
        if fault.action == "drop":
            self.drop()
            raise _Stop
        if fault.action == "stall":
            self.stall()
            raise _Stop
        await self.close(fault.close_code, "")
        raise _Stop

    async def _inject_errors(self, moment: str, turn: int | None) -> bool:
        """Send scripted errors for ``moment``; True if one of them closed the connection."""
        for inj in self.server._errors_for(moment, self.index, turn):
            await self.send_error(inj.code, inj.message, error_type=inj.error_type,
                                  param=inj.param)
            if inj.close_code is not None:
                await self.close(inj.close_code, inj.close_reason)
                return True
        return False

    # --- client events -----------------------------------------------------------------

    async def _handle_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._record_invalid({"type": "<binary>"}, ["binary frames are not supported"])
            await self.send_error("invalid_json", "Binary frames are not supported.")
            return
        try:
            event = json.loads(message)
        except json.JSONDecodeError as exc:
            self._record_invalid({"type": "<invalid json>", "raw": message[:200]}, [str(exc)])
            await self.send_error(
                "invalid_json",
                f"We could not parse the JSON body of your request. ({exc.msg})",
            )
            return
        if not isinstance(event, dict):
            self._record_invalid({"type": "<not an object>"}, ["event must be a JSON object"])
            await self.send_error("invalid_json", "Event must be a JSON object.")
            return
        self.received.append(event)
        self.server._record(self.index, "client", event)
        client_event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        problems = self.checker.check(event, "client")
        if problems:
            self._record_invalid(event, problems)
            code, msg, param = self._describe_problems(event, problems)
            await self.send_error(code, msg, param=param, client_event_id=client_event_id)
            return
        etype = str(event["type"])
        try:
            await self._dispatch(etype, event)
        except ApiError as err:
            await self.send_error(err.code, err.message, error_type=err.error_type,
                                  param=err.param, client_event_id=client_event_id)
        await self._inject_errors(etype, self._latest_turn())

    def _latest_turn(self) -> int | None:
        for turn in reversed(self.server.turns):
            if turn.connection == self.index:
                return turn.turn
        return None

    def _record_invalid(self, event: dict[str, Any], problems: list[str]) -> None:
        violation = Violation(self.dialect, "client", str(event.get("type")), problems, event,
                              self.index)
        logger.error("invalid client event: %s", violation)
        self.server.violations.append(violation)
        self.server._notify()

    @staticmethod
    def _describe_problems(
        event: Mapping[str, Any], problems: list[str]
    ) -> tuple[str, str, str | None]:
        first = problems[0]
        param, _, what = first.rpartition(": ")
        if what == "unknown field":
            return "unknown_parameter", f"Unknown parameter: '{param}'.", param
        if what == "Field required":
            return "missing_required_parameter", f"Missing required parameter: '{param}'.", param
        if param == "type":
            return "invalid_value", f"Invalid value: '{event.get('type')}'. {what}", "type"
        return "invalid_value", f"Invalid value for '{param or 'event'}': {what}", param or None

    async def _dispatch(self, etype: str, event: dict[str, Any]) -> None:
        handler = {
            "session.update": self._on_session_update,
            "transcription_session.update": self._on_unsupported,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "output_audio_buffer.clear": self._on_output_audio_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.retrieve": self._on_item_retrieve,
            "conversation.item.truncate": self._on_item_truncate,
            "conversation.item.delete": self._on_item_delete,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
        }.get(etype, self._on_unsupported)
        await handler(event)

    async def _on_unsupported(self, event: dict[str, Any]) -> None:
        raise ApiError("invalid_value", f"The local server does not support '{event['type']}'.",
                       param="type")

    async def _on_output_audio_clear(self, event: dict[str, Any]) -> None:
        # WebRTC/SIP only; over WebSocket the real API rejects it (inference, see docs).
        raise ApiError(
            "invalid_value",
            "output_audio_buffer.clear is only supported for WebRTC and SIP connections.",
            param="type",
        )

    async def _on_session_update(self, event: dict[str, Any]) -> None:
        update = dict(event["session"])
        if self.dialect == "ga" and update.get("type") != "realtime":
            raise ApiError("invalid_value", "The local server only supports realtime sessions.",
                           param="session.type")
        for key in ("id", "object", "expires_at"):
            update.pop(key, None)
        if "model" in update and update["model"] != self.session.get("model"):
            raise ApiError("invalid_value", "The model of a session cannot be changed.",
                           param="session.model")
        new = shapes.deep_merge(self.session, update)
        if self._audio_out_started and shapes.voice(new, self.dialect) != shapes.voice(
            self.session, self.dialect
        ):
            raise ApiError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                param="session.voice",
            )
        self.session = new
        await self.send({"type": "session.updated", "session": self.session})

    async def _on_append(self, event: dict[str, Any]) -> None:
        try:
            audio = base64.b64decode(event["audio"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("invalid_value", "Invalid base64 audio.", param="audio") from None
        self.input_buffer.extend(audio)

    async def _on_clear(self, event: dict[str, Any]) -> None:
        self.input_buffer.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    def _last_item_id(self) -> str | None:
        return str(self.items[-1]["id"]) if self.items else None

    def _find_item(self, item_id: str) -> int | None:
        for i, item in enumerate(self.items):
            if item.get("id") == item_id:
                return i
        return None

    async def _announce_item(self, item: dict[str, Any], previous_item_id: str | None) -> None:
        """conversation.item.added/done (GA) or conversation.item.created (beta)."""
        if self.dialect == "ga":
            for etype in ("conversation.item.added", "conversation.item.done"):
                await self.send({"type": etype, "previous_item_id": previous_item_id,
                                 "item": item})
        else:
            await self.send({"type": "conversation.item.created",
                             "previous_item_id": previous_item_id, "item": item})

    def _vad_on(self) -> bool:
        if self.dialect == "ga":
            audio = self.session.get("audio") or {}
            return (audio.get("input") or {}).get("turn_detection") is not None
        return self.session.get("turn_detection") is not None

    def _warn(self, message: str) -> None:
        text = f"connection {self.index}: {message}"
        if text not in self.server.warnings:
            logger.warning("%s", text)
            self.server.warnings.append(text)

    async def _on_commit(self, event: dict[str, Any]) -> None:
        if self._vad_on():
            self._warn("input_audio_buffer.commit while server turn detection is on (the real "
                       "API would also commit and answer by itself)")
        ms = len(self.input_buffer) / synth.BYTES_PER_SAMPLE / synth.SAMPLE_RATE * 1000
        if ms < MIN_COMMIT_MS:
            raise ApiError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {ms:.2f}ms of audio.",
            )
        item_id = shapes.new_id("item_")
        previous = self._last_item_id()
        item = shapes.user_audio_item(item_id, self.dialect)
        self.items.append(item)
        audio = bytes(self.input_buffer)
        self.audio[item_id] = bytearray(audio)
        self.input_buffer.clear()
        turn = self.server._new_turn(self.index, item_id, self._scripted_transcript(audio))
        self.item_turns[item_id] = turn
        await self.send({"type": "input_audio_buffer.committed",
                         "previous_item_id": previous, "item_id": item_id})
        await self._announce_item(item, previous)
        if shapes.transcription_config(self.session, self.dialect) is not None:
            self._spawn(self._transcribe(item, turn, synth.duration_ms(audio)))

    def _scripted_transcript(self, audio: bytes) -> str:
        n = self.server._audio_turns
        self.server._audio_turns += 1
        scripted = self.server.script.user_transcripts
        if n < len(scripted):
            return scripted[n]
        return f"({synth.duration_ms(audio) / 1000:.1f} seconds of speech)"

    async def _transcribe(self, item: dict[str, Any], turn: TurnRecord, audio_ms: int) -> None:
        script = self.server.script
        await asyncio.sleep(max(0.0, script.transcription_delay_s))
        item_id = str(item["id"])
        if turn.turn in script.transcription_fails:
            await self.send({
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": item_id,
                "content_index": 0,
                "error": {"type": "transcription_error", "code": "audio_unintelligible",
                          "message": "Audio could not be transcribed.", "param": None},
            })
            return
        text = turn.user_transcript
        words = text.split()
        for i, word in enumerate(words):
            await self.send({
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item_id,
                "content_index": 0,
                "delta": word if i == 0 else " " + word,
            })
        cfg = shapes.transcription_config(self.session, self.dialect) or {}
        usage: dict[str, Any]
        if cfg.get("model") == "whisper-1":
            usage = {"type": "duration", "seconds": round(audio_ms / 1000, 3)}
        else:
            a_tok, t_tok = shapes.input_audio_tokens(audio_ms), shapes.text_tokens(text)
            usage = {
                "type": "tokens",
                "input_tokens": a_tok,
                "output_tokens": t_tok,
                "total_tokens": a_tok + t_tok,
                "input_token_details": {"text_tokens": 0, "audio_tokens": a_tok},
            }
        item["content"][0]["transcript"] = text
        await self.send({
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id,
            "content_index": 0,
            "transcript": text,
            "usage": usage,
        })

    async def _on_item_create(self, event: dict[str, Any]) -> None:
        item = copy.deepcopy(event["item"])  # the logged client event must stay as sent
        item_id = item.get("id") or shapes.new_id("item_")
        if self._find_item(item_id) is not None:
            raise ApiError("item_id_already_exists",
                           f"Item with id '{item_id}' already exists.", param="item.id")
        item = {"id": item_id, "object": "realtime.item", **item, "status": "completed"}
        item.setdefault("type", "message")
        prev_req = event.get("previous_item_id")
        if prev_req is None:
            position = len(self.items)
        elif prev_req == "root":
            position = 0
        else:
            found = self._find_item(prev_req)
            if found is None:
                raise ApiError(
                    "previous_item_not_found",
                    f"Previous item with item_id '{prev_req}' not found.",
                    param="previous_item_id",
                )
            position = found + 1
        previous = str(self.items[position - 1]["id"]) if position > 0 else None
        self.items.insert(position, item)
        for index, part in enumerate(item.get("content") or []):
            if isinstance(part, dict) and part.get("audio"):
                with contextlib.suppress(binascii.Error, ValueError):
                    self.audio[item_id] = bytearray(base64.b64decode(part["audio"]))
                item["content"][index] = {k: v for k, v in part.items() if k != "audio"}
        if item.get("type") == "function_call_output":
            self.server._record_tool_output(str(item.get("call_id")), str(item.get("output")))
        await self._announce_item(item, previous)

    async def _on_item_retrieve(self, event: dict[str, Any]) -> None:
        index = self._find_item(event["item_id"])
        if index is None:
            raise ApiError("item_not_found", f"Item with item_id '{event['item_id']}' not found.",
                           param="item_id")
        item = json.loads(json.dumps(self.items[index]))
        audio = self.audio.get(str(item["id"]))
        if audio is not None and item.get("content"):
            item["content"][0]["audio"] = base64.b64encode(bytes(audio)).decode("ascii")
        await self.send({"type": "conversation.item.retrieved", "item": item})

    async def _on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event["item_id"]
        index = self._find_item(item_id)
        if index is None:
            raise ApiError("item_not_found", f"Item with item_id '{item_id}' not found.",
                           param="item_id")
        del self.items[index]
        self.audio.pop(item_id, None)
        self.deleted.append(item_id)
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    async def _on_item_truncate(self, event: dict[str, Any]) -> None:
        item_id = event["item_id"]
        content_index = int(event["content_index"])
        end_ms = int(event["audio_end_ms"])
        index = self._find_item(item_id)
        if index is None:
            raise ApiError("item_not_found", f"Item with item_id '{item_id}' not found.",
                           param="item_id")
        item = self.items[index]
        content = item.get("content") or []
        audio_type = "output_audio" if self.dialect == "ga" else "audio"
        if (
            item.get("role") != "assistant"
            or content_index >= len(content)
            or content[content_index].get("type") != audio_type
            or item_id not in self.audio
        ):
            raise ApiError("invalid_value", "Only model output audio messages can be truncated.",
                           param="item_id")
        if end_ms < 0:
            raise ApiError("invalid_value", "audio_end_ms must be at least 0.",
                           param="audio_end_ms")
        audio = self.audio[item_id]
        audio_ms = synth.duration_ms(audio)
        if end_ms > audio_ms:
            raise ApiError(
                "invalid_value",
                f"Audio content of {audio_ms}ms is already shorter than {end_ms}ms",
                param="audio_end_ms",
            )
        transcript = str(content[content_index].get("transcript") or "")
        heard = " ".join(w for start, w in self.word_starts.get(item_id, []) if start < end_ms)
        del audio[synth.bytes_for_ms(end_ms):]
        # The real API deletes the server-side transcript of a truncated item.
        content[content_index] = {**content[content_index], "transcript": ""}
        self.truncations.append(
            Truncation(self.index, item_id, content_index, end_ms, audio_ms, transcript, heard)
        )
        await self.send({"type": "conversation.item.truncated", "item_id": item_id,
                         "content_index": content_index, "audio_end_ms": end_ms})

    # --- responses ---------------------------------------------------------------------

    async def _on_response_create(self, event: dict[str, Any]) -> None:
        if self._vad_on():
            self._warn("response.create while server turn detection is on (the real API "
                       "would also answer by itself)")
        if self.response is not None:
            raise ApiError(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self.response.id}. Wait until the response is finished before creating "
                "a new one.",
            )
        params = dict(event.get("response") or {})
        resp = _Response(
            id=shapes.new_id("resp_"),
            turn=self._turn_for_response(),
            in_conversation=params.get("conversation", "auto") != "none",
            params=params,
        )
        self.response = resp
        resp.task = self._spawn(self._run_response(resp))

    async def _on_response_cancel(self, event: dict[str, Any]) -> None:
        resp = self.response
        wanted = event.get("response_id")
        if resp is None or (wanted is not None and wanted != resp.id):
            raise ApiError("response_cancel_not_active",
                           "Cancellation failed: no active response found.")
        resp.cancel.set()

    def _turn_for_response(self) -> TurnRecord | None:
        for item in reversed(self.items):
            if item.get("type") == "message" and item.get("role") == "user":
                item_id = str(item["id"])
                if item_id not in self.item_turns:
                    self.item_turns[item_id] = self.server._new_turn(
                        self.index, item_id, self._item_text(item)
                    )
                return self.item_turns[item_id]
        return None

    def _item_text(self, item: dict[str, Any]) -> str:
        parts = []
        for part in item.get("content") or []:
            if isinstance(part, dict):
                text = part.get("text") or part.get("transcript")
                if text:
                    parts.append(str(text))
        if parts:
            return " ".join(parts)
        audio = self.audio.get(str(item.get("id")))
        if audio is not None:
            return self._scripted_transcript(bytes(audio))
        return ""

    async def _run_response(self, resp: _Response) -> None:
        script = self.server.script
        try:
            if script.response_delay_s > 0:
                await asyncio.sleep(script.response_delay_s)
            modalities = list(
                resp.params.get("output_modalities" if self.dialect == "ga" else "modalities")
                or shapes.output_modalities(self.session, self.dialect)
            )
            resp_modalities = ["audio"] if "audio" in modalities else ["text"]
            if self.dialect == "beta" and "audio" in modalities:
                resp_modalities = ["text", "audio"]
            await self.send({"type": "response.created", "response": self._response_obj(
                resp, "in_progress", resp_modalities, None, None)})
            await self.send({"type": "rate_limits.updated", "rate_limits": self._rate_limits()})
            calls = self._decide_calls(resp)
            if calls:
                for call in calls:
                    await self._emit_function_call(resp, call)
                status, details = "completed", None
            else:
                await self._emit_message(resp, "audio" in modalities)
                if resp.cancel.is_set():
                    status = "cancelled"
                    details = {"type": "cancelled", "reason": "client_cancelled"}
                else:
                    status, details = "completed", None
            usage = self._usage(resp)
            await self.send({"type": "response.done", "response": self._response_obj(
                resp, status, resp_modalities, usage, details)})
        finally:
            if self.response is resp:
                self.response = None
            self.server._notify()

    def _response_obj(
        self,
        resp: _Response,
        status: str,
        modalities: list[str],
        usage: dict[str, Any] | None,
        details: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return shapes.response_object(
            self.dialect,
            response_id=resp.id,
            conversation_id=self.conversation_id if resp.in_conversation else None,
            status=status,
            session=self.session,
            modalities=modalities,
            output=resp.output,
            usage=usage,
            status_details=details,
            metadata=resp.params.get("metadata"),
        )

    def _rate_limits(self) -> list[dict[str, Any]]:
        used = self.server._responses
        return [
            {"name": "requests", "limit": 5000, "remaining": max(0, 4999 - used),
             "reset_seconds": 0.012},
            {"name": "tokens", "limit": 40000, "remaining": 40000 - 1200,
             "reset_seconds": 1.8},
        ]

    def _decide_calls(self, resp: _Response) -> list[FunctionCall]:
        self.server._responses += 1
        turn = resp.turn
        if turn is None or turn.calls_decided:
            return []
        turn.calls_decided = True
        wanted = self.server.script.calls_for(turn.turn, turn.user_transcript)
        available = shapes.tool_names(self.session)
        tools = resp.params.get("tools")
        if isinstance(tools, list):
            available = shapes.tool_names({"tools": tools})
        calls = []
        for name, args in wanted:
            if name in available:
                calls.append((name, args))
            else:
                logger.warning("turn %d: scripted call to %r skipped: the session has no such"
                               " tool (tools: %s)", turn.turn, name, sorted(available))
        return calls

    async def _add_output_item(self, resp: _Response, item: dict[str, Any]) -> int:
        output_index = len(resp.output)
        resp.output.append(item)
        await self.send({"type": "response.output_item.added", "response_id": resp.id,
                         "output_index": output_index, "item": item})
        if resp.in_conversation:
            previous = self._last_item_id()
            self.items.append(item)
            if self.dialect == "ga":
                await self.send({"type": "conversation.item.added",
                                 "previous_item_id": previous, "item": item})
            else:
                await self.send({"type": "conversation.item.created",
                                 "previous_item_id": previous, "item": item})
        return output_index

    async def _finish_output_item(self, resp: _Response, output_index: int,
                                  item: dict[str, Any]) -> None:
        resp.output[output_index] = item
        index = self._find_item(str(item["id"]))
        previous = None
        if index is not None:
            self.items[index] = item
            previous = str(self.items[index - 1]["id"]) if index > 0 else None
        await self.send({"type": "response.output_item.done", "response_id": resp.id,
                         "output_index": output_index, "item": item})
        if resp.in_conversation and self.dialect == "ga":
            await self.send({"type": "conversation.item.done", "previous_item_id": previous,
                             "item": item})

    async def _emit_function_call(self, resp: _Response, call: FunctionCall) -> None:
        name, args = call
        item_id, call_id = shapes.new_id("item_"), shapes.new_id("call_")[:21]
        arguments = json.dumps(dict(args))
        item = shapes.function_call_item(item_id, call_id, name, "", "in_progress")
        output_index = await self._add_output_item(resp, item)
        step = max(1, math.ceil(len(arguments) / 3))
        for i in range(0, len(arguments), step):
            await self.send({"type": "response.function_call_arguments.delta",
                             "response_id": resp.id, "item_id": item_id,
                             "output_index": output_index, "call_id": call_id,
                             "delta": arguments[i:i + step]})
        await self.send({"type": "response.function_call_arguments.done",
                         "response_id": resp.id, "item_id": item_id,
                         "output_index": output_index, "call_id": call_id, "name": name,
                         "arguments": arguments})
        done = shapes.function_call_item(item_id, call_id, name, arguments, "completed")
        resp.out_text += arguments
        await self._finish_output_item(resp, output_index, done)
        assert resp.turn is not None
        resp.turn.function_calls.append((name, call_id, arguments))
        self.server._calls[call_id] = (resp.turn, name)

    def _reply_text(self, resp: _Response) -> str:
        turn = resp.turn
        ctx = TurnContext(
            turn=turn.turn if turn else None,
            connection=self.index,
            user_transcript=turn.user_transcript if turn else "",
            tool_outputs=tuple(turn.tool_outputs) if turn else (),
        )
        text = self.server.script.reply_for(ctx)
        if turn is not None:
            turn.replies.append(text)
        return text

    async def _emit_message(self, resp: _Response, audio_mode: bool) -> None:
        script = self.server.script
        text = self._reply_text(resp)
        words = text.split()
        item_id = shapes.new_id("item_")
        item = shapes.assistant_item(item_id, "in_progress", [])
        output_index = await self._add_output_item(resp, item)
        base = {"response_id": resp.id, "item_id": item_id, "output_index": output_index,
                "content_index": 0}
        await self.send({"type": "response.content_part.added", **base,
                         "part": shapes.content_part(audio_mode, "")})
        spoken: list[str] = []
        deltas = 0
        turn_no = resp.turn.turn if resp.turn else None
        interval = script.delta_ms / 1000 / script.realtime_factor if (
            script.realtime_factor > 0 and math.isfinite(script.realtime_factor)) else 0.0
        clock = asyncio.get_running_loop().time
        t0 = clock()

        async def pace() -> None:
            nonlocal deltas
            deltas += 1
            delay = t0 + deltas * interval - clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(resp.cancel.wait(), delay)
            else:
                await asyncio.sleep(0)

        async def faults() -> None:
            for fault in self.server._faults_for("response", self.index, turn_no, deltas):
                await self._apply_fault(fault)

        if audio_mode:
            pcm, starts = self._reply_audio(resp, words)
            self._audio_out_started = True
            sent = bytearray()
            self.audio[item_id] = sent
            self.word_starts[item_id] = [(synth.duration_ms(pcm[:s]), w)
                                         for s, w in zip(starts, words, strict=True)]
            chunk = synth.bytes_for_ms(script.delta_ms)
            wi = 0
            for off in range(0, len(pcm), chunk):
                await faults()
                if resp.cancel.is_set():
                    break
                while wi < len(words) and starts[wi] < off + chunk:
                    delta = words[wi] if wi == 0 else " " + words[wi]
                    spoken.append(delta)
                    await self.send({"type": self.names.transcript_delta, **base,
                                     "delta": delta})
                    wi += 1
                piece = pcm[off:off + chunk]
                await self.send({"type": self.names.audio_delta, **base,
                                 "delta": base64.b64encode(piece).decode("ascii")})
                sent.extend(piece)
                await pace()
            transcript = "".join(spoken)
            resp.out_audio_ms += synth.duration_ms(sent)
            await self.send({"type": self.names.audio_done, **base})
            await self.send({"type": self.names.transcript_done, **base,
                             "transcript": transcript})
        else:
            for i, word in enumerate(words):
                await faults()
                if resp.cancel.is_set():
                    break
                delta = word if i == 0 else " " + word
                spoken.append(delta)
                await self.send({"type": self.names.text_delta, **base, "delta": delta})
                await pace()
            transcript = "".join(spoken)
            await self.send({"type": self.names.text_done, **base, "text": transcript})
        resp.out_text += transcript
        await self.send({"type": "response.content_part.done", **base,
                         "part": shapes.content_part(audio_mode, transcript)})
        status = "incomplete" if resp.cancel.is_set() else "completed"
        done = shapes.assistant_item(
            item_id, status, [shapes.assistant_content(self.dialect, audio_mode, transcript)]
        )
        await self._finish_output_item(resp, output_index, done)

    def _reply_audio(self, resp: _Response, words: list[str]) -> tuple[bytes, list[int]]:
        """The reply's PCM and the byte offset where each word starts."""
        turn = resp.turn
        if self.server.script.echo_user_audio and turn is not None and turn.item_id in self.audio:
            pcm = bytes(self.audio[turn.item_id])
            n = max(1, len(words))
            step = len(pcm) // n // 2 * 2
            return pcm, [i * step for i in range(len(words))]
        starts: list[int] = []
        offset = 0
        for word in words:
            starts.append(offset)
            offset += synth.bytes_for_ms(synth.word_duration_s(word) * 1000)
            offset += synth.bytes_for_ms(synth.pause_after_s(word) * 1000)
        return synth.synthesize(" ".join(words)), starts

    def _usage(self, resp: _Response) -> dict[str, Any]:
        own = {str(item.get("id")) for item in resp.output}
        in_text = shapes.text_tokens(str(self.session.get("instructions") or ""))
        in_text += shapes.text_tokens(json.dumps(self.session.get("tools") or []))
        in_audio = 0
        for item in self.items:
            item_id = str(item.get("id"))
            if item_id in own:
                continue
            if item_id in self.audio:
                in_audio += shapes.input_audio_tokens(synth.duration_ms(self.audio[item_id]))
            for part in item.get("content") or []:
                if isinstance(part, dict):
                    in_text += shapes.text_tokens(str(part.get("text") or ""))
            for key in ("arguments", "output"):
                in_text += shapes.text_tokens(str(item.get(key) or ""))
        usage = shapes.Usage(
            in_text=in_text,
            in_audio=in_audio,
            out_text=shapes.text_tokens(resp.out_text),
            out_audio=shapes.output_audio_tokens(resp.out_audio_ms),
        )
        prev = self._prev_input_tokens
        if prev >= 1024:
            cached = min(prev, usage.input_tokens) // 64 * 64
            usage.cached_audio = cached * in_audio // max(1, usage.input_tokens)
            usage.cached_text = cached - usage.cached_audio
        self._prev_input_tokens = usage.input_tokens
        return usage.to_json(self.dialect)


class LocalRealtimeServer:
    """A scriptable local Realtime API server (see the package docstring).

    ``async with LocalRealtimeServer(script=Script(...)) as srv:`` then connect to
    ``srv.url`` (OpenAI form), ``srv.azure_url("deployment")`` or ``srv.beta_url``.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        dialect: DialectOption = "auto",
        strict: bool = True,
        model: str = "gpt-realtime",
        reject_beta: bool = False,
        ping_interval: float | None = None,
    ) -> None:
        self.script = script or Script()
        self.host = host
        self.port = port
        self.api_key = api_key
        self.dialect: DialectOption = dialect
        self.strict = strict
        self.model = model
        self.reject_beta = reject_beta
        self.ping_interval = ping_interval
        # Fail now, not on the first connection, if strict checking is impossible.
        EventChecker("ga", strict=strict)
        self.connections: list[RealtimeConnection] = []
        self.log: list[LogEntry] = []
        self.violations: list[Violation] = []
        self.turns: list[TurnRecord] = []
        self.internal_errors: list[str] = []
        #: Valid but suspicious client behaviour (e.g. push-to-talk with server VAD still on).
        self.warnings: list[str] = []
        self.connection_attempts = 0
        self.refused = 0
        self._audio_turns = 0
        self._responses = 0
        self._calls: dict[str, tuple[TurnRecord, str]] = {}
        self._fired: set[int] = set()
        self._pending_refusals: dict[int, str] = {}
        self._server: Server | None = None
        self._t0 = time.monotonic()
        self._changed = asyncio.Event()
        self._cursors: dict[tuple[str, str, int | None], int] = {}

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> LocalRealtimeServer:
        self._changed = asyncio.Event()
        self._server = await serve(
            self._handler,
            self.host,
            self.port,
            process_request=self._process_request,
            ping_interval=self.ping_interval,
            close_timeout=1,
            max_size=16 * 2**20,
            logger=_ws_logger,
        )
        sock = next(iter(self._server.sockets))
        self.port = int(sock.getsockname()[1])
        logger.info("local Realtime server listening on %s", self.base_url)
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        for conn in self.connections:
            if conn.stalled:
                conn.ws.transport.abort()
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> LocalRealtimeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-form URL (GA; add ``OpenAI-Beta: realtime=v1`` for beta)."""
        return f"{self.base_url}{OPENAI_PATH}?model={self.model}"

    def azure_url(self, deployment: str = "gpt-realtime") -> str:
        """The Azure OpenAI GA form: ``/openai/v1/realtime?model=<deployment>``."""
        return f"{self.base_url}{AZURE_GA_PATH}?model={deployment}"

    def azure_preview_url(self, deployment: str = "gpt-4o-realtime-preview",
                          api_version: str = "2024-10-01-preview") -> str:
        """The Azure preview form (beta dialect)."""
        return (f"{self.base_url}{AZURE_PREVIEW_PATH}?api-version={api_version}"
                f"&deployment={deployment}")

    # --- handshake ---------------------------------------------------------------------

    def _auth_ok(self, headers: Headers, azure: bool) -> bool:
        if self.api_key is None:
            return True
        expected = self.api_key.encode()
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), expected):
            return True
        api_key = headers.get("api-key")
        return azure and api_key is not None and hmac.compare_digest(api_key.encode(), expected)

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        attempt = self.connection_attempts
        self.connection_attempts += 1
        self._notify()
        path = urlsplit(request.path).path
        if path not in (OPENAI_PATH, AZURE_GA_PATH, AZURE_PREVIEW_PATH):
            return ws.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if attempt < self.script.refuse_first:
            self.refused += 1
            logger.info("refusing connection attempt %d (%s)", attempt, self.script.refuse_with)
            if self.script.refuse_with == "http":
                status = http.HTTPStatus(self.script.refuse_status)
                return ws.respond(status, f"{status.phrase}\n")
            self._pending_refusals[id(ws)] = self.script.refuse_with
        azure = path.startswith("/openai/")
        if azure and not self._auth_ok(request.headers, azure):
            body = json.dumps({"error": {"code": "401", "message": (
                "Access denied due to invalid subscription key or wrong API endpoint. Make "
                "sure to provide a valid key for an active subscription and use a correct "
                "regional API endpoint for your resource.")}})
            response = ws.respond(http.HTTPStatus.UNAUTHORIZED, body + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        split = urlsplit(request.path)
        query = parse_qs(split.query)
        azure = split.path.startswith("/openai/")
        model = (query.get("model") or query.get("deployment") or [self.model])[0]
        beta_header = "realtime=v1" in request.headers.get("OpenAI-Beta", "")
        dialect: shapes.Dialect
        if self.dialect == "auto":
            dialect = "beta" if beta_header or split.path == AZURE_PREVIEW_PATH else "ga"
        else:
            dialect = self.dialect
        conn = RealtimeConnection(self, len(self.connections), ws=ws, dialect=dialect,
                                  model=model, path=split.path, azure=azure)
        self.connections.append(conn)
        self._notify()
        logger.info("connection %d: %s dialect, model %s, path %s", conn.index, dialect, model,
                    split.path)
        try:
            refusal = self._pending_refusals.pop(id(ws), None)
            if refusal == "abort":
                conn.drop()
                return
            if refusal == "close":
                await conn.close(1013, "try again later")
                return
            if not self._auth_ok(request.headers, azure):
                await self._reject_key(conn, request.headers)
                return
            if beta_header and (self.reject_beta or self.dialect == "ga"):
                await conn.send_error(
                    "beta_api_shape_disabled",
                    "The beta Realtime API shape is no longer supported. Remove the "
                    "'OpenAI-Beta: realtime=v1' header and use the GA event shapes.",
                )
                await conn.close(4000, "beta_api_shape_disabled")
                return
            await conn.run()
        except (_Stop, ConnectionClosed):
            pass
        finally:
            conn.closed.set()
            if conn.close_code is None:
                conn.close_code = ws.close_code
            self._notify()

    async def _reject_key(self, conn: RealtimeConnection, headers: Headers) -> None:
        auth = headers.get("Authorization", "")
        if not auth:
            message = ("You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                       "YOUR_KEY).")
            code = "missing_api_key"
        else:
            given = auth[7:] if auth.startswith("Bearer ") else auth
            message = (f"Incorrect API key provided: {_mask_key(given)}. You can find your API "
                       "key at https://platform.openai.com/account/api-keys.")
            code = "invalid_api_key"
        logger.info("connection %d: rejecting API key (%s)", conn.index, code)
        await conn.send_error(code, message)
        await conn.close(1008, code)

    # --- script ------------------------------------------------------------------------

    def _faults_for(self, at: str, connection: int, turn: int | None,
                    deltas: int) -> list[Fault]:
        out = []
        for fault in self.script.faults:
            if fault.at != at or (fault.once and id(fault) in self._fired):
                continue
            if fault.connection is not None and fault.connection != connection:
                continue
            if at == "response":
                if fault.turn is not None and fault.turn != turn:
                    continue
                if deltas != fault.after_deltas:
                    continue
            self._fired.add(id(fault))
            out.append(fault)
        return out

    def _errors_for(self, moment: str, connection: int, turn: int | None) -> list[InjectError]:
        out = []
        for inj in self.script.errors:
            if inj.on != moment or (inj.once and id(inj) in self._fired):
                continue
            if inj.connection is not None and inj.connection != connection:
                continue
            if inj.turn is not None and inj.turn != turn:
                continue
            self._fired.add(id(inj))
            out.append(inj)
        return out

    def _new_turn(self, connection: int, item_id: str, transcript: str) -> TurnRecord:
        turn = TurnRecord(len(self.turns), connection, item_id, transcript)
        self.turns.append(turn)
        return turn

    def _record_tool_output(self, call_id: str, output: str) -> None:
        found = self._calls.get(call_id)
        if found is None:
            logger.warning("function_call_output for unknown call_id %r", call_id)
            return
        turn, name = found
        turn.tool_outputs.append((name, output))

    # --- logs and waiting --------------------------------------------------------------

    def _record(self, connection: int, direction: Direction, event: dict[str, Any]) -> None:
        self.log.append(LogEntry(len(self.log), time.monotonic() - self._t0, connection,
                                 direction, event))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def received(self) -> list[list[dict[str, Any]]]:
        """Client events received, per connection."""
        return [c.received for c in self.connections]

    @property
    def sent(self) -> list[list[dict[str, Any]]]:
        """Server events sent, per connection."""
        return [c.sent for c in self.connections]

    @property
    def truncations(self) -> list[Truncation]:
        return [t for c in self.connections for t in c.truncations]

    def events(
        self,
        type: str | None = None,  # mirrors the event field
        *,
        direction: Direction | None = None,
        connection: int | None = None,
    ) -> list[dict[str, Any]]:
        """Logged events, filtered."""
        return [
            e.event for e in self.log
            if (type is None or e.type == type)
            and (direction is None or e.direction == direction)
            and (connection is None or e.connection == connection)
        ]

    def types(self, *, direction: Direction | None = None,
              connection: int | None = None) -> list[str]:
        """Event types in order, consecutive deltas collapsed into one entry."""
        out: list[str] = []
        for e in self.log:
            if direction is not None and e.direction != direction:
                continue
            if connection is not None and e.connection != connection:
                continue
            if not (e.type.endswith(".delta") and out and out[-1] == e.type):
                out.append(e.type)
        return out

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 5.0  # noqa: ASYNC109
    ) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every logged change."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"condition not met within {timeout} s; last events:\n"
                + self.transcript(last=15)
            ) from None

    async def next_event(
        self,
        type: str,
        *,
        direction: Direction = "client",
        connection: int | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - a test helper's deadline
    ) -> dict[str, Any]:
        """The next logged event of ``type`` not yet returned by this method."""
        key = (type, direction, connection)
        found: list[LogEntry] = []

        def ready() -> bool:
            start = self._cursors.get(key, 0)
            for entry in self.log[start:]:
                if entry.type == type and entry.direction == direction and (
                    connection is None or entry.connection == connection
                ):
                    found.append(entry)
                    return True
            return False

        await self.wait_for(ready, timeout)
        self._cursors[key] = found[0].seq + 1
        return found[0].event

    async def wait_connections(
        self, n: int, timeout: float = 5.0  # noqa: ASYNC109
    ) -> RealtimeConnection:
        """Wait for the ``n``-th connection (1-based count) and return it."""
        await self.wait_for(lambda: len(self.connections) >= n, timeout)
        return self.connections[n - 1]

    def assert_clean(self) -> None:
        """Raise AssertionError if any event failed validation or a server task crashed."""
        problems = [str(v) for v in self.violations] + self.internal_errors
        if problems:
            raise AssertionError("local Realtime server saw problems:\n" + "\n".join(problems))

    def transcript(self, *, connection: int | None = None, last: int | None = None) -> str:
        """A readable log: one line per event, runs of deltas collapsed."""
        lines: list[str] = []
        entries = [e for e in self.log if connection is None or e.connection == connection]
        run: dict[tuple[int, str], list[LogEntry]] = {}

        def flush() -> None:
            for (conn_no, etype), group in run.items():
                arrow = "->" if group[0].direction == "client" else "<-"
                lines.append(f"{group[0].t:8.3f} c{conn_no} {arrow} {etype} x{len(group)}")
            run.clear()

        for e in entries:
            if e.type.endswith(".delta"):
                run.setdefault((e.connection, e.type), []).append(e)
                continue
            flush()
            arrow = "->" if e.direction == "client" else "<-"
            lines.append(f"{e.t:8.3f} c{e.connection} {arrow} {e.type} {_short(e.event)}")
        flush()
        if last is not None:
            lines = lines[-last:]
        return "\n".join(lines)
