"""Engine tests: the Conversation driven by a scripted fake server, no sockets.

:class:`FakeServer` builds realistic GA server event dicts (shapes as in the
``openai.types.realtime`` server events). :class:`Harness` plays the asyncio driver: it
feeds inputs to a :class:`~daemon.engine.Conversation` at a controlled ``now``, keeps
every action, and validates every client event the engine sends against the official
client event types (misspelt/unknown fields included).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterable
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from daemon import engine
from daemon.config import ApiConfig, HistoryConfig, ReconnectConfig, SessionConfig
from daemon.engine import (
    Action,
    Close,
    Connect,
    Conversation,
    EndOfReply,
    Fatal,
    Notice,
    PlayAudio,
    PlayTone,
    RecordHistory,
    RecordUsage,
    RunTool,
    Send,
    SetIndicator,
    StopPlayback,
    Timings,
    cut_at_word,
)
from daemon.history import HistoryEntry

TOOL = {
    "type": "function",
    "name": "get_time",
    "description": "The current local time.",
    "parameters": {"type": "object", "properties": {}},
}


def pcm(samples: int, value: int = 1) -> bytes:
    return value.to_bytes(2, "little", signed=True) * samples


def _extras(model: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(model, BaseModel):
        if model.model_extra:
            out.append((path, model.model_extra))
        for name in type(model).model_fields:
            out += _extras(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for i, x in enumerate(model):
            out += _extras(x, f"{path}[{i}]")
    return out


_VALIDATORS: dict[str, TypeAdapter[Any]] = {}


def validate_client_event(event: dict[str, Any], dialect: str = "ga") -> None:
    """Raise if ``event`` is not a valid client event of ``dialect`` (or has unknown keys)."""
    if dialect not in _VALIDATORS:
        if dialect == "beta":
            from openai.types.beta.realtime import realtime_client_event as beta

            _VALIDATORS[dialect] = TypeAdapter(beta.RealtimeClientEvent)
        else:
            from openai.types.realtime import RealtimeClientEvent

            _VALIDATORS[dialect] = TypeAdapter(RealtimeClientEvent)
    model = _VALIDATORS[dialect].validate_python(event)
    extras = _extras(model)
    assert not extras, f"unknown fields in {event['type']}: {extras}"


class FakeServer:
    """Builds GA server events with unique ids."""

    def __init__(self) -> None:
        self.n = 0

    def new_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n:04d}"

    def ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": self.new_id("event"), **fields}

    def session_created(self, session_id: str, expires_at: int = 0) -> dict[str, Any]:
        return self.ev(
            "session.created",
            session={
                "object": "realtime.session",
                "type": "realtime",
                "id": session_id,
                "model": "gpt-realtime",
                "output_modalities": ["audio"],
                "instructions": "default",
                "tools": [],
                "tool_choice": "auto",
                "expires_at": expires_at,
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000},
                              "turn_detection": None},
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
                },
            },
        )

    def session_updated(self, session_id: str) -> dict[str, Any]:
        return self.ev("session.updated", session={"type": "realtime", "id": session_id})

    def item_added(self, item: dict[str, Any], previous: str | None = None) -> dict[str, Any]:
        return self.ev("conversation.item.added", previous_item_id=previous,
                       item={**item, "object": "realtime.item", "status": "completed"})

    def committed(self, item_id: str, previous: str | None = None) -> dict[str, Any]:
        return self.ev("input_audio_buffer.committed", item_id=item_id,
                       previous_item_id=previous)

    def transcript(self, item_id: str, text: str) -> dict[str, Any]:
        return self.ev("conversation.item.input_audio_transcription.completed",
                       item_id=item_id, content_index=0, transcript=text,
                       usage={"type": "duration", "seconds": 1})

    def transcript_failed(self, item_id: str) -> dict[str, Any]:
        return self.ev("conversation.item.input_audio_transcription.failed", item_id=item_id,
                       content_index=0, error={"type": "transcription_error",
                                               "message": "could not transcribe"})

    def response_created(self, rid: str) -> dict[str, Any]:
        return self.ev("response.created", response={"id": rid, "object": "realtime.response",
                                                     "status": "in_progress", "output": []})

    def message_added(self, rid: str, item_id: str, index: int = 0) -> dict[str, Any]:
        return self.ev("response.output_item.added", response_id=rid, output_index=index,
                       item={"id": item_id, "type": "message", "role": "assistant",
                             "status": "in_progress", "content": []})

    def audio_delta(self, rid: str, item_id: str, data: bytes) -> dict[str, Any]:
        return self.ev("response.output_audio.delta", response_id=rid, item_id=item_id,
                       output_index=0, content_index=0,
                       delta=base64.b64encode(data).decode())

    def transcript_delta(self, rid: str, item_id: str, text: str) -> dict[str, Any]:
        return self.ev("response.output_audio_transcript.delta", response_id=rid,
                       item_id=item_id, output_index=0, content_index=0, delta=text)

    def transcript_done(self, rid: str, item_id: str, text: str) -> dict[str, Any]:
        return self.ev("response.output_audio_transcript.done", response_id=rid,
                       item_id=item_id, output_index=0, content_index=0, transcript=text)

    def function_call_added(self, rid: str, item_id: str, call_id: str, name: str,
                            index: int = 0) -> dict[str, Any]:
        return self.ev("response.output_item.added", response_id=rid, output_index=index,
                       item={"id": item_id, "type": "function_call", "call_id": call_id,
                             "name": name, "arguments": "", "status": "in_progress"})

    def function_args_done(self, rid: str, item_id: str, call_id: str, name: str,
                           arguments: str) -> dict[str, Any]:
        return self.ev("response.function_call_arguments.done", response_id=rid,
                       item_id=item_id, output_index=0, call_id=call_id, name=name,
                       arguments=arguments)

    def function_item_done(self, rid: str, item_id: str, call_id: str, name: str,
                           arguments: str) -> dict[str, Any]:
        return self.ev("response.output_item.done", response_id=rid, output_index=0,
                       item={"id": item_id, "type": "function_call", "call_id": call_id,
                             "name": name, "arguments": arguments, "status": "completed"})

    def response_done(self, rid: str, status: str = "completed",
                      output: list[dict[str, Any]] | None = None,
                      usage: dict[str, Any] | None = None,
                      reason: str | None = None) -> dict[str, Any]:
        usage = usage or {"total_tokens": 120, "input_tokens": 100, "output_tokens": 20,
                          "input_token_details": {"text_tokens": 10, "audio_tokens": 90,
                                                  "cached_tokens": 0},
                          "output_token_details": {"text_tokens": 5, "audio_tokens": 15}}
        details = {"type": status, "reason": reason} if reason else None
        return self.ev("response.done", response={
            "id": rid, "object": "realtime.response", "status": status,
            "status_details": details, "output": output or [], "usage": usage})

    def message_output(self, item_id: str, transcript: str) -> dict[str, Any]:
        return {"id": item_id, "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_audio", "transcript": transcript}]}

    def error(self, code: str, message: str = "", event_id: str | None = None,
              kind: str = "invalid_request_error") -> dict[str, Any]:
        return self.ev("error", error={"type": kind, "code": code, "message": message or code,
                                       "param": None, "event_id": event_id})


def fast_session(**kw: Any) -> SessionConfig:
    base: dict[str, Any] = {"append_chunk_ms": 40, "min_commit_ms": 100, "offline_buffer_s": 30.0}
    base.update(kw)
    return SessionConfig(**base)


class Harness:
    """Plays the driver around one Conversation; time only moves when told."""

    def __init__(
        self,
        *,
        api: ApiConfig | None = None,
        session: SessionConfig | None = None,
        history: HistoryConfig | None = None,
        initial: Iterable[HistoryEntry] = (),
        tools: list[dict[str, Any]] | None = None,
        budget_exhausted: bool = False,
        now: float = 1000.0,
        wall_clock_offset: float | None = None,
        timings: Timings | None = None,
        seed: int = 7,
    ) -> None:
        self.now = now
        self.api = api or ApiConfig()
        self.srv = FakeServer()
        self.conv = Conversation(
            self.api,
            session or fast_session(),
            history or HistoryConfig(),
            tools if tools is not None else [TOOL],
            list(initial),
            now,
            budget_exhausted,
            rng=random.Random(seed),
            wall_clock_offset=wall_clock_offset,
            timings=timings,
        )
        self.log: list[Action] = []
        self.acked: set[str] = set()
        self.feed(self.conv.take_actions())

    # --- bookkeeping ----------------------------------------------------------------------

    def feed(self, actions: list[Action]) -> list[Action]:
        dialect = "beta" if self.api.dialect == "beta" else "ga"
        for a in actions:
            if isinstance(a, Send):
                validate_client_event(a.event, dialect)
        self.log += actions
        return actions

    def mark(self) -> int:
        return len(self.log)

    def since(self, mark: int, kind: type[Any] | None = None) -> list[Any]:
        return [a for a in self.log[mark:] if kind is None or isinstance(a, kind)]

    def sent(self, conn: int | None = None, mark: int = 0) -> list[dict[str, Any]]:
        return [a.event for a in self.log[mark:]
                if isinstance(a, Send) and (conn is None or a.conn_id == conn)]

    def sent_types(self, conn: int | None = None, mark: int = 0) -> list[str]:
        return [e["type"] for e in self.sent(conn, mark)]

    def connects(self, mark: int = 0) -> list[Connect]:
        return self.since(mark, Connect)

    def history(self, mark: int = 0) -> list[HistoryEntry]:
        return [a.entry for a in self.since(mark, RecordHistory)]

    # --- inputs at the current time -------------------------------------------------------

    def press(self) -> list[Action]:
        return self.feed(self.conv.press(self.now))

    def release(self) -> list[Action]:
        return self.feed(self.conv.release(self.now))

    def cancel(self) -> list[Action]:
        return self.feed(self.conv.cancel(self.now))

    def audio(self, ms: int, chunk_ms: int = 10) -> None:
        """``ms`` of microphone audio in ``chunk_ms`` pieces; time advances accordingly."""
        for _ in range(ms // chunk_ms):
            self.now += chunk_ms / 1000
            self.feed(self.conv.audio(pcm(24 * chunk_ms), self.now))

    def talk(self, ms: int = 500) -> list[Action]:
        """Press, speak ``ms``, release; returns the release's actions."""
        self.press()
        self.audio(ms)
        return self.release()

    def tick(self, dt: float = 0.1) -> list[Action]:
        self.now += dt
        return self.feed(self.conv.tick(self.now))

    def advance(self, seconds: float, step: float = 0.5) -> None:
        end = self.now + seconds
        while self.now + step <= end:
            self.tick(step)
        if end > self.now:
            self.tick(end - self.now)

    def ev(self, conn: int, event: dict[str, Any]) -> list[Action]:
        return self.feed(self.conv.server_event(conn, event, self.now))

    def opened(self, conn: int) -> list[Action]:
        return self.feed(self.conv.connection_opened(conn, self.now))

    def closed(self, conn: int, code: int | None = 1006, reason: str = "") -> list[Action]:
        return self.feed(self.conv.connection_closed(conn, code, reason, self.now))

    def failed(self, conn: int, error: str = "refused", status: int | None = None) -> list[Action]:
        return self.feed(self.conv.connection_failed(conn, error, self.now, http_status=status))

    def stopped(self, item_id: str, played: int) -> list[Action]:
        return self.feed(self.conv.playback_stopped(item_id, played, self.now))

    def finished(self, item_id: str, played: int) -> list[Action]:
        return self.feed(self.conv.playback_finished(item_id, played, self.now))

    def tool_result(self, call_id: str, output: str) -> list[Action]:
        return self.feed(self.conv.tool_result(call_id, output, self.now))

    # --- scripted server behaviour --------------------------------------------------------

    def open(self, conn: int, session_id: str | None = None, expires_at: int = 0,
             ack: bool = True) -> None:
        """Open ``conn``: session.created, then acknowledge session.update and the seed."""
        sid = session_id or f"sess_{conn}"
        self.opened(conn)
        self.ev(conn, self.srv.session_created(sid, expires_at))
        if ack:
            self.ack(conn, sid)

    def ack(self, conn: int, session_id: str | None = None) -> None:
        self.ev(conn, self.srv.session_updated(session_id or f"sess_{conn}"))
        self.ack_items(conn)

    def ack_items(self, conn: int) -> None:
        prev = None
        for e in self.sent(conn):
            if e["type"] == "conversation.item.create" and "id" in e["item"]:
                item_id = e["item"]["id"]
                if item_id in self.acked:
                    continue
                self.acked.add(item_id)
                self.ev(conn, self.srv.item_added(e["item"], prev))
                prev = item_id

    def reply(
        self,
        conn: int,
        text: str = "It is noon.",
        samples: int = 4800,
        chunks: int = 2,
        *,
        user_item: str | None = None,
        done: bool = True,
    ) -> tuple[str, str]:
        """The server side of a turn: committed (if ``user_item``), a spoken reply."""
        if user_item is not None:
            self.ev(conn, self.srv.committed(user_item))
        rid = self.srv.new_id("resp")
        item_id = self.srv.new_id("item")
        self.ev(conn, self.srv.response_created(rid))
        self.ev(conn, self.srv.message_added(rid, item_id))
        per = samples // chunks
        for _ in range(chunks):
            self.ev(conn, self.srv.audio_delta(rid, item_id, pcm(per)))
        self.ev(conn, self.srv.transcript_done(rid, item_id, text))
        if done:
            output = [self.srv.message_output(item_id, text)]
            self.ev(conn, self.srv.response_done(rid, output=output))
        return rid, item_id

    def full_turn(self, conn: int, user_text: str, reply_text: str, ms: int = 500,
                  samples: int = 4800) -> str:
        """Press/speak/release, server answers, transcript arrives, playback finishes."""
        self.talk(ms)
        user_item = self.srv.new_id("item")
        _rid, item_id = self.reply(conn, reply_text, samples, user_item=user_item)
        self.ev(conn, self.srv.transcript(user_item, user_text))
        self.finished(item_id, samples)
        return item_id


# ==========================================================================================
# helpers used by the tests
# ==========================================================================================

def ready(h: Harness | None = None, **kw: Any) -> Harness:
    """A harness whose first session (conn 1) is READY."""
    h = h or Harness(**kw)
    h.open(1)
    return h


def tones(actions: Iterable[Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, PlayTone)]


def indicators(actions: Iterable[Action]) -> list[str]:
    return [a.state for a in actions if isinstance(a, SetIndicator)]


def notices(actions: Iterable[Action], level: str | None = None) -> list[Notice]:
    return [a for a in actions if isinstance(a, Notice) and (level is None or a.level == level)]


def appended_bytes(events: Iterable[dict[str, Any]]) -> int:
    return sum(len(base64.b64decode(e["audio"])) for e in events
               if e["type"] == "input_audio_buffer.append")


def seeded_texts(events: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for e in events:
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "message":
            out.append((e["item"]["role"], e["item"]["content"][0]["text"]))
    return out


def E(role: Any, text: str, **kw: Any) -> HistoryEntry:
    return HistoryEntry(role=role, text=text, created_at=1.0, **kw)


# ==========================================================================================
# start-up, READY, seeding
# ==========================================================================================

def test_startup_connects_and_becomes_ready_only_after_update_and_seed_acks() -> None:
    initial = [E("user", "hello"), E("assistant", "hi there")]
    h = Harness(initial=initial)
    assert h.connects() == [Connect(1, 0.0)]
    assert indicators(h.log) == ["offline"]
    h.opened(1)
    h.ev(1, h.srv.session_created("sess_1"))
    sent = h.sent(1)
    assert sent[0]["type"] == "session.update"
    assert seeded_texts(sent) == [("user", "hello"), ("assistant", "hi there")]
    h.ev(1, h.srv.session_updated("sess_1"))
    assert h.conv.snapshot(h.now)["connected"] is False  # seed not acknowledged yet
    # conversation.item.created (older streams) is accepted as an acknowledgement too.
    for e in sent[1:]:
        h.ev(1, {**h.srv.item_added(e["item"]), "type": "conversation.item.created"})
    snap = h.conv.snapshot(h.now)
    assert snap["connected"] is True and snap["session_id"] == "sess_1"
    assert indicators(h.log)[-1] == "idle"


def test_session_update_is_the_ga_shape() -> None:
    h = Harness(session=fast_session(noise_reduction="off", voice="cedar", speed=1.2))
    h.opened(1)
    h.ev(1, h.srv.session_created("s"))
    upd = h.sent(1)[0]["session"]
    assert upd["type"] == "realtime"
    assert upd["output_modalities"] == ["audio"]
    assert upd["tools"] == [TOOL] and upd["tool_choice"] == "auto"
    assert upd["audio"]["input"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": {"model": "gpt-4o-mini-transcribe"},
        "noise_reduction": None,
        "turn_detection": None,
    }
    assert upd["audio"]["output"] == {
        "format": {"type": "audio/pcm", "rate": 24000}, "voice": "cedar", "speed": 1.2}


def test_seed_maps_roles_skips_empty_and_respects_trim() -> None:
    initial = [
        E("user", "old question"),
        E("assistant", "old answer"),
        E("user", "what time is it"),
        E("tool_call", "{}", name="get_time", call_id="c1"),
        E("tool_output", "12:00", name="get_time", call_id="c1"),
        E("assistant", "", interrupted=True),
        E("assistant", "It is noon."),
    ]
    h = Harness(initial=initial, history=HistoryConfig(max_items=5, max_chars=1000))
    h.open(1)
    items = [e["item"] for e in h.sent(1) if e["type"] == "conversation.item.create"]
    assert [(i["role"], i["content"][0]["type"], i["content"][0]["text"]) for i in items] == [
        ("user", "input_text", "what time is it"),
        ("system", "input_text", "[tool get_time called with {}]"),
        ("system", "input_text", "[tool get_time returned: 12:00]"),
        ("assistant", "output_text", "It is noon."),
    ]
    assert h.conv.snapshot(h.now)["connected"]


def test_seed_item_rejected_by_error_still_settles_ready() -> None:
    h = Harness(initial=[E("user", "x")])
    h.opened(1)
    h.ev(1, h.srv.session_created("s"))
    create = next(e for e in h.sent(1) if e["type"] == "conversation.item.create")
    h.ev(1, h.srv.session_updated("s"))
    h.ev(1, h.srv.error("invalid_value", "bad item", event_id=create["event_id"]))
    assert h.conv.snapshot(h.now)["connected"]
    assert notices(h.log, "warning")


def test_link_not_ready_in_time_is_closed_and_retried() -> None:
    h = Harness(timings=Timings(ready_timeout_s=5))
    h.opened(1)
    h.ev(1, h.srv.session_created("s"))  # never acknowledged
    m = h.mark()
    h.advance(6)
    assert Close(1) in h.since(m)
    assert [c.conn_id for c in h.connects(m)] == [2]


# ==========================================================================================
# a push-to-talk turn
# ==========================================================================================

def test_turn_streams_chunks_commits_and_plays_reply() -> None:
    h = ready()
    m = h.mark()
    acts = h.press()
    assert tones(acts) == ["listen_start"] and indicators(acts) == ["listening"]
    h.audio(250)  # 10 ms chunks; append_chunk_ms = 40
    appends = [e for e in h.sent(1, m) if e["type"] == "input_audio_buffer.append"]
    assert len(appends) == 6 and all(len(base64.b64decode(e["audio"])) == 1920 for e in appends)
    h.now += 0.001
    rel = h.release()
    assert tones(rel) == ["listen_stop"] and indicators(rel) == ["thinking"]
    assert h.sent_types(1, m)[-3:] == [
        "input_audio_buffer.append", "input_audio_buffer.commit", "response.create"]
    assert appended_bytes(h.sent(1, m)) == 250 * 48
    released_at = h.now

    h.now += 0.4
    m2 = h.mark()
    rid, item = h.reply(1, "It is noon.", 4800, user_item="item_user1", done=False)
    plays = h.since(m2, PlayAudio)
    assert [p.item_id for p in plays] == [item, item]
    assert b"".join(p.pcm for p in plays) == pcm(4800)
    assert indicators(h.log)[-1] == "speaking"
    assert h.conv.snapshot(h.now)["last_turn_latency_ms"] == round((h.now - released_at) * 1000)

    m3 = h.mark()
    h.ev(1, h.srv.response_done(rid, output=[h.srv.message_output(item, "It is noon.")]))
    assert EndOfReply(item) in h.since(m3)
    usage = h.since(m3, RecordUsage)
    assert len(usage) == 1 and usage[0].response_id == rid and usage[0].turn_id == "t1"
    assert usage[0].model == "gpt-realtime" and usage[0].usage["total_tokens"] == 120
    assert indicators(h.log)[-1] == "speaking"  # until played out

    h.ev(1, h.srv.transcript("item_user1", "What time is it?"))
    h.finished(item, 4800)
    assert [(e.role, e.text, e.interrupted) for e in h.history()] == [
        ("user", "What time is it?", False), ("assistant", "It is noon.", False)]
    assert h.history()[0].session_id == "sess_1" and h.history()[0].turn_id == "t1"
    assert indicators(h.log)[-1] == "idle"


def test_user_transcript_after_reply_keeps_conversation_order() -> None:
    h = ready()
    h.talk()
    _rid, item = h.reply(1, "Noon.", user_item="u1")
    h.finished(item, 4800)
    assert h.history() == []  # the assistant entry waits for the user's
    h.ev(1, h.srv.transcript("u1", "time?"))
    assert [e.role for e in h.history()] == ["user", "assistant"]


def test_transcript_failure_and_timeout_record_inaudible() -> None:
    h = ready(timings=Timings(transcript_timeout_s=3))
    h.talk()
    _rid, item = h.reply(1, "A.", user_item="u1")
    h.finished(item, 4800)
    h.ev(1, h.srv.transcript_failed("u1"))
    h.talk()
    _rid, item = h.reply(1, "B.", user_item="u2")
    h.finished(item, 4800)
    assert [e.text for e in h.history()] == ["[inaudible]", "A."]
    h.advance(3.5)
    assert [e.text for e in h.history()] == ["[inaudible]", "A.", "[inaudible]", "B."]
    h.ev(1, h.srv.transcript("u2", "too late"))  # ignored
    assert len(h.history()) == 4


def test_too_short_press_clears_instead_of_committing() -> None:
    h = ready()
    m = h.mark()
    h.press()
    h.audio(60)
    acts = h.release()
    assert tones(acts) == ["too_short"]
    types = h.sent_types(1, m)
    assert "input_audio_buffer.clear" in types
    assert "input_audio_buffer.commit" not in types and "response.create" not in types
    assert indicators(h.log)[-1] == "idle"


def test_commit_empty_error_clears_state_and_cancels_its_response() -> None:
    h = ready()
    m = h.mark()
    h.talk(200)
    commit = next(e for e in h.sent(1, m) if e["type"] == "input_audio_buffer.commit")
    acts = h.ev(1, h.srv.error("input_audio_buffer_commit_empty", "buffer too small",
                               event_id=commit["event_id"]))
    assert tones(acts) == ["too_short"]
    assert "response.cancel" in h.sent_types(1, m)


def test_budget_exhausted_press_plays_error_and_starts_no_turn() -> None:
    h = ready(budget_exhausted=True)
    m = h.mark()
    acts = h.press()
    h.audio(300)
    h.release()
    assert tones(acts) == ["error"] and notices(acts, "warning")
    assert h.sent(1, m) == []
    h.conv.set_budget_exhausted(False)
    h.talk()
    assert "response.create" in h.sent_types(1, m)


# ==========================================================================================
# one response at a time; interrupting
# ==========================================================================================

def test_never_a_second_response_create_while_one_is_active() -> None:
    h = ready()
    m = h.mark()
    h.talk()
    rid, item = h.reply(1, "A long answer about many things.", 24000, user_item="u1", done=False)
    h.press()  # barge in while the response is still active
    h.audio(300)
    h.release()
    types = h.sent_types(1, m)
    assert types.count("response.create") == 1
    assert types.count("response.cancel") == 1
    assert types.index("response.cancel") < len(types) - 1
    h.stopped(item, 12000)
    assert h.sent_types(1, m).count("response.create") == 1  # still active
    h.ev(1, h.srv.response_done(rid, status="cancelled", reason="client_cancelled"))
    assert h.sent_types(1, m).count("response.create") == 2
    # The second request comes after the truncate of the interrupted item.
    types = h.sent_types(1, m)
    assert types.index("conversation.item.truncate") < len(types) - 1
    assert types[-1] == "response.create"


def test_interrupt_truncates_to_played_samples_and_cuts_history() -> None:
    h = ready()
    h.talk()
    text = "The quick brown fox jumps over the lazy dog"
    rid, item = h.reply(1, text, 24000, user_item="u1", done=False)  # 1 s of audio received
    h.ev(1, h.srv.transcript("u1", "tell me"))
    m = h.mark()
    acts = h.press()
    assert StopPlayback(item) in acts
    assert h.sent_types(1, m)[0] == "response.cancel"
    h.stopped(item, 10000)  # 416.67 ms heard
    # Audio still arriving for the cancelled response is not played.
    m2 = h.mark()
    h.ev(1, h.srv.audio_delta(rid, item, pcm(2400)))
    assert h.since(m2, PlayAudio) == []
    # The item is edited once its response is over (it is complete only then).
    assert "conversation.item.truncate" not in h.sent_types(1, m)
    h.ev(1, h.srv.response_done(rid, status="cancelled", reason="client_cancelled",
                                output=[h.srv.message_output(item, text)]))
    trunc = [e for e in h.sent(1, m) if e["type"] == "conversation.item.truncate"]
    assert trunc == [{"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                      "audio_end_ms": 416, "event_id": trunc[0]["event_id"]}]
    hist = h.history()
    assert hist[1].role == "assistant" and hist[1].interrupted
    # 10000/24000 of 43 chars = 17 chars -> "The quick brown f" -> cut back to a word.
    assert hist[1].text == "The quick brown"


def test_interrupt_played_beyond_received_is_capped() -> None:
    h = ready()
    h.talk()
    _rid, item = h.reply(1, "Short reply here.", 12000, user_item="u1")
    m = h.mark()
    h.press()
    assert "response.cancel" not in h.sent_types(1, m)  # response already done
    h.stopped(item, 50000)
    trunc = [e for e in h.sent(1, m) if e["type"] == "conversation.item.truncate"]
    assert trunc[0]["audio_end_ms"] == 500  # 12000 samples received, never beyond


def test_interrupt_with_nothing_played_deletes_the_item() -> None:
    h = ready()
    h.talk()
    _rid, item = h.reply(1, "Never heard.", 4800, user_item="u1")
    h.ev(1, h.srv.transcript("u1", "hi"))
    m = h.mark()
    h.press()
    h.stopped(item, 0)
    types = h.sent_types(1, m)
    assert "conversation.item.delete" in types and "conversation.item.truncate" not in types
    assert [e.role for e in h.history()] == ["user"]  # nothing heard, nothing recorded


def test_press_before_any_audio_cancels_and_deletes_unheard_item() -> None:
    h = ready()
    h.talk()
    h.ev(1, h.srv.committed("u1"))
    rid = "resp_x"
    h.ev(1, h.srv.response_created(rid))
    h.ev(1, h.srv.message_added(rid, "item_x"))
    m = h.mark()
    h.press()
    assert h.since(m, StopPlayback) == []
    h.ev(1, h.srv.audio_delta(rid, "item_x", pcm(480)))
    assert h.since(m, PlayAudio) == []
    h.ev(1, h.srv.response_done(rid, status="cancelled"))
    assert h.sent_types(1, m).count("conversation.item.delete") == 1


def test_cancel_input_stops_reply_without_a_turn() -> None:
    h = ready()
    h.talk()
    _rid, item = h.reply(1, "Answer.", 4800, user_item="u1", done=False)
    m = h.mark()
    acts = h.cancel()
    assert StopPlayback(item) in acts and "listen_start" not in tones(acts)
    assert h.sent_types(1, m) == ["response.cancel"]


def test_response_cancel_not_active_is_harmless() -> None:
    h = ready()
    acts = h.ev(1, h.srv.error("response_cancel_not_active", "no active response"))
    assert notices(acts, "warning") == [] and not any(isinstance(a, Fatal) for a in acts)


# ==========================================================================================
# function calling
# ==========================================================================================

def tool_response(h: Harness, conn: int, call_id: str = "call_1", args: str = "{}",
                  user_item: str | None = "u1") -> str:
    if user_item:
        h.ev(conn, h.srv.committed(user_item))
    rid = h.srv.new_id("resp")
    fc_item = h.srv.new_id("item")
    h.ev(conn, h.srv.response_created(rid))
    h.ev(conn, h.srv.function_call_added(rid, fc_item, call_id, "get_time"))
    h.ev(conn, h.srv.function_args_done(rid, fc_item, call_id, "get_time", args))
    h.ev(conn, h.srv.function_item_done(rid, fc_item, call_id, "get_time", args))
    return rid


def test_function_call_round_trip_with_dedupe_and_history_order() -> None:
    h = ready()
    m = h.mark()
    h.talk()
    rid = tool_response(h, 1)
    runs = h.since(m, RunTool)
    assert runs == [RunTool("call_1", "get_time", "{}")]
    h.tool_result("call_1", '{"time": "12:00"}')  # before response.done: held back
    assert "conversation.item.create" not in h.sent_types(1, m)
    fc = {"id": "x", "type": "function_call", "call_id": "call_1", "name": "get_time",
          "arguments": "{}", "status": "completed"}
    m2 = h.mark()
    h.ev(1, h.srv.response_done(rid, output=[fc]))
    assert h.since(m, RunTool) == runs  # deduplicated by call_id
    assert h.sent_types(1, m2) == ["conversation.item.create", "response.create"]
    out = h.sent(1, m2)[0]["item"]
    assert out == {"type": "function_call_output", "call_id": "call_1",
                   "output": '{"time": "12:00"}'}
    _rid2, item = h.reply(1, "It is noon.")
    h.ev(1, h.srv.transcript("u1", "what time is it"))
    h.finished(item, 4800)
    assert [(e.role, e.text) for e in h.history()] == [
        ("user", "what time is it"),
        ("tool_call", "{}"),
        ("tool_output", '{"time": "12:00"}'),
        ("assistant", "It is noon."),
    ]
    assert h.history()[1].call_id == "call_1" and h.history()[1].name == "get_time"
    assert sum(1 for a in h.log[m:] if isinstance(a, RecordUsage)) == 2


def test_call_ids_remembered_for_dedupe_stay_bounded_over_many_turns() -> None:
    h = ready()
    turns = engine._CALLS_REMEMBERED + 40
    for i in range(turns):
        h.talk()
        rid = tool_response(h, 1, call_id=f"call_{i}", user_item=f"u{i}")
        h.ev(1, h.srv.response_done(rid))
        h.tool_result(f"call_{i}", "ok")
        _rid, item = h.reply(1, "done")
        h.finished(item, 480)
        if i % 2:  # every other transcript never comes: its wait times out
            h.ev(1, h.srv.transcript(f"u{i}", "what time is it"))
        h.advance(1.0)
    h.advance(60.0)
    assert len(h.since(0, RunTool)) == turns
    # Months of uptime: nothing per-turn piles up in the engine.
    assert len(h.conv._calls_seen) <= engine._CALLS_REMEMBERED
    assert len(h.conv._items) <= 2 and len(h.conv._calls) == 0
    assert len(h.conv._user_items) == 0
    assert len(h.conv.history) <= 2 * h.conv._hcfg.max_items + 64
    # The newest calls are still recognised when the server repeats them.
    m = h.mark()
    h.talk()
    rid = tool_response(h, 1, call_id=f"call_{turns - 1}", user_item="again")
    assert h.since(m, RunTool) == []


def test_tool_thinking_indicator_and_error_output_passes_through() -> None:
    h = ready()
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    assert indicators(h.log)[-1] == "thinking"
    m = h.mark()
    h.tool_result("call_1", '{"error": "timeout after 5 s"}')
    assert h.sent(1, m)[0]["item"]["output"] == '{"error": "timeout after 5 s"}'
    assert h.sent_types(1, m)[-1] == "response.create"
    h.tool_result("call_1", "duplicate")  # ignored
    assert len(h.sent(1, m)) == 2


def test_press_during_tool_run_cancels_it_and_records_late_result() -> None:
    h = ready()
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    h.ev(1, h.srv.transcript("u1", "time please"))
    m = h.mark()
    h.press()
    cancel_out = [e for e in h.sent(1, m) if e["type"] == "conversation.item.create"]
    assert cancel_out[0]["item"]["call_id"] == "call_1"
    assert "cancelled" in cancel_out[0]["item"]["output"]
    h.audio(300)
    h.release()
    m2 = h.mark()
    h.tool_result("call_1", "12:00")
    assert h.sent(1, m2) == []  # ignored for the conversation
    hist = h.history()
    assert [(e.role, e.text, e.interrupted) for e in hist] == [
        ("user", "time please", False), ("tool_call", "{}", False),
        ("tool_output", "12:00", True)]


def test_cancelled_tool_that_never_answers_is_recorded_after_a_while() -> None:
    h = ready(timings=Timings(cancelled_tool_wait_s=2))
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    h.ev(1, h.srv.transcript("u1", "x"))
    h.press()
    h.audio(200)
    h.release()
    h.advance(2.5)
    assert h.history()[-1].role == "tool_output" and h.history()[-1].interrupted


# ==========================================================================================
# errors, fatal
# ==========================================================================================

@pytest.mark.parametrize("code", ["invalid_api_key", "insufficient_quota",
                                  "account_deactivated", "billing_hard_limit_reached"])
def test_fatal_error_stops_reconnecting(code: str) -> None:
    h = ready()
    m = h.mark()
    acts = h.ev(1, h.srv.error(code, "nope"))
    assert [a for a in acts if isinstance(a, Fatal)] == [Fatal(code, "nope")]
    assert "error" in tones(acts) and indicators(acts)[-1] == "error" and Close(1) in acts
    h.closed(1, 1000)
    h.advance(120)
    assert h.connects(m) == []
    acts = h.press()
    assert tones(acts) == ["error"]
    h.audio(300)
    h.release()
    assert h.sent(None, m) == []
    assert h.conv.snapshot(h.now)["fatal"] == code


def test_handshake_401_is_fatal() -> None:
    h = Harness()
    acts = h.failed(1, "server rejected WebSocket connection: HTTP 401", status=401)
    assert any(isinstance(a, Fatal) for a in acts)
    h.advance(60)
    assert h.connects() == [Connect(1, 0.0)]


def test_other_errors_are_notices() -> None:
    h = ready()
    acts = h.ev(1, h.srv.error("invalid_value", "something odd"))
    assert [n.fields["code"] for n in notices(acts, "warning")] == ["invalid_value"]
    assert h.conv.snapshot(h.now)["connected"]


# ==========================================================================================
# connection loss, reconnect, re-seed, replay, offline buffering
# ==========================================================================================

def expected_backoff(seed: int, n: int, api: ApiConfig) -> list[float]:
    rng = random.Random(seed)
    rc = api.reconnect
    out = []
    for i in range(n):
        base = min(rc.max_delay_s, rc.initial_delay_s * 2**i)
        out.append(min(rc.max_delay_s, base * (1 + rc.jitter * rng.random())))
    return out


def test_reconnect_backoff_sequence_capped_and_reset_after_ready() -> None:
    api = ApiConfig(reconnect=ReconnectConfig(initial_delay_s=0.5, max_delay_s=4.0, jitter=0.25))
    h = ready(api=api, seed=3)
    m = h.mark()
    acts = h.closed(1, 1006, "abnormal")
    assert indicators(acts)[-1] == "offline"
    conn = 2
    for _ in range(5):
        h.failed(conn)
        conn += 1
    delays = [c.delay_s for c in h.connects(m)]
    assert delays == pytest.approx(expected_backoff(3, 6, api))
    assert delays[-1] <= 4.0 and delays[3] >= 4.0 * 1.0 - 1e-9 and delays[0] < 0.7
    h.open(conn)
    assert h.conv.snapshot(h.now)["connected"]
    m2 = h.mark()
    h.closed(conn, 1006)
    first = h.connects(m2)[0].delay_s
    assert 0.5 <= first <= 0.625  # attempt counter reset by the successful READY


def test_reconnect_reseeds_history_in_order() -> None:
    h = ready(initial=[E("user", "earlier"), E("assistant", "before")])
    h.full_turn(1, "first question", "first answer")
    h.full_turn(1, "second question", "second answer")
    m = h.mark()
    h.closed(1, 1006)
    (c,) = h.connects(m)
    h.open(c.conn_id)
    assert seeded_texts(h.sent(c.conn_id, m)) == [
        ("user", "earlier"), ("assistant", "before"),
        ("user", "first question"), ("assistant", "first answer"),
        ("user", "second question"), ("assistant", "second answer"),
    ]
    assert h.sent(c.conn_id, m)[0]["type"] == "session.update"
    assert indicators(h.log)[-1] == "idle"


def test_session_expired_then_clean_1001_close_reconnects() -> None:
    h = ready()
    h.full_turn(1, "q", "a")
    m = h.mark()
    h.ev(1, h.srv.error("session_expired",
                        "Your session hit the maximum duration of 60 minutes."))
    acts = h.closed(1, 1001, "going away")
    assert not any(isinstance(a, Fatal) for a in h.log[m:])
    (c,) = h.connects(m)
    assert c.conn_id == 2 and indicators(acts)[-1] == "offline"
    h.open(2)
    assert seeded_texts(h.sent(2)) == [("user", "q"), ("assistant", "a")]


def test_offline_press_buffers_then_sends_when_ready() -> None:
    h = Harness()  # conn 1 never opened yet
    m = h.mark()
    acts = h.press()
    assert tones(acts) == ["listen_start"]
    h.audio(1000)
    h.release()
    assert h.sent(None, m) == []
    assert h.conv.snapshot(h.now)["pending_offline_audio_ms"] == 1000
    h.open(1)
    types = h.sent_types(1, m)
    assert types[0] == "session.update"
    turn_events = [e for e in h.sent(1, m) if e["type"].startswith(("input_audio", "response"))]
    assert appended_bytes(turn_events) == 1000 * 48
    assert [e["type"] for e in turn_events][-2:] == ["input_audio_buffer.commit",
                                                     "response.create"]
    assert h.conv.snapshot(h.now)["pending_offline_audio_ms"] == 0


def test_offline_overflow_plays_offline_tone_and_notice_once() -> None:
    h = Harness(session=fast_session(offline_buffer_s=0.5))
    h.press()
    m = h.mark()
    h.audio(1200)
    assert tones(h.since(m)) == ["offline"]
    assert any("buffer" in n.message for n in notices(h.since(m), "warning"))
    h.release()
    assert h.conv.snapshot(h.now)["pending_offline_audio_ms"] == 500


def test_held_offline_longer_than_the_bound_warns_even_without_audio() -> None:
    h = Harness(session=fast_session(offline_buffer_s=2.0))
    h.press()
    m = h.mark()
    h.advance(2.5)
    assert tones(h.since(m)) == ["offline"]


def test_unsent_turn_expires_with_offline_tone() -> None:
    h = Harness(session=fast_session(offline_buffer_s=3.0))
    h.talk(400)
    m = h.mark()
    h.advance(4)
    assert "offline" in tones(h.since(m))
    h.open(1)
    assert "input_audio_buffer.commit" not in h.sent_types(1)


def test_capture_started_offline_goes_live_when_session_becomes_ready() -> None:
    h = Harness()
    m = h.mark()
    h.press()
    h.audio(300)
    h.open(1)
    h.audio(200)
    h.release()
    assert appended_bytes(h.sent(1, m)) == 500 * 48
    assert h.sent_types(1, m)[-2:] == ["input_audio_buffer.commit", "response.create"]


def test_unanswered_committed_turn_is_replayed_on_the_new_session() -> None:
    h = ready()
    m = h.mark()
    h.talk(700)
    h.ev(1, h.srv.committed("u1"))
    h.ev(1, h.srv.response_created("resp_lost"))
    h.closed(1, 1006)  # dropped before any audio
    (c,) = h.connects(m)
    m2 = h.mark()
    h.open(c.conn_id)
    ev = h.sent(c.conn_id, m2)
    assert appended_bytes(ev) == 700 * 48
    assert [e["type"] for e in ev][-2:] == ["input_audio_buffer.commit", "response.create"]
    _rid, item = h.reply(c.conn_id, "Answer.", user_item="u1b")
    h.ev(c.conn_id, h.srv.transcript("u1b", "my question"))
    h.finished(item, 4800)
    assert [(e.role, e.text, e.session_id) for e in h.history()] == [
        ("user", "my question", "sess_2"), ("assistant", "Answer.", "sess_2")]


def test_reply_in_flight_when_link_drops_records_what_was_heard() -> None:
    h = ready()
    h.talk()
    _rid, item = h.reply(1, "one two three four five six seven eight", 24000,
                         user_item="u1", done=False)
    h.ev(1, h.srv.transcript("u1", "count"))
    m = h.mark()
    acts = h.closed(1, 1006)
    assert EndOfReply(item) in acts  # let what arrived play out
    h.finished(item, 12000)
    hist = h.history()
    assert hist[-1].role == "assistant" and hist[-1].interrupted
    assert hist[-1].text == "one two three four"
    # Not replayed: the user heard part of the answer.
    (c,) = h.connects(m)
    h.open(c.conn_id)
    assert "input_audio_buffer.commit" not in h.sent_types(c.conn_id)
    assert seeded_texts(h.sent(c.conn_id))[-1] == ("assistant", "one two three four")


def test_transcript_lost_with_the_link_is_made_on_the_next_session() -> None:
    # The reply was partly heard, but the user's transcript had not come when the link
    # dropped: the turn's audio is committed again (no response) on the next session.
    h = ready()
    h.talk(600)
    said = b"".join(base64.b64decode(e["audio"]) for e in h.sent(1)
                    if e["type"] == "input_audio_buffer.append")
    _rid, item = h.reply(1, "one two three four five six seven eight", 24000,
                         user_item="u1", done=False)
    m = h.mark()
    h.closed(1, 1006)
    h.finished(item, 12000)
    assert h.history(m) == []  # the user's words are not given up as inaudible
    (c,) = h.connects(m)
    m2 = h.mark()
    h.open(c.conn_id)
    sent = h.sent(c.conn_id, m2)
    types = [e["type"] for e in sent]
    assert "response.create" not in types
    assert types[-1] == "input_audio_buffer.commit"
    again = b"".join(base64.b64decode(e["audio"]) for e in sent
                     if e["type"] == "input_audio_buffer.append")
    assert again == said
    h.ev(c.conn_id, h.srv.committed("u1b"))
    h.ev(c.conn_id, h.srv.transcript("u1b", "count to eight"))
    assert [(e.role, e.text, e.interrupted) for e in h.history(m)] == [
        ("user", "count to eight", False), ("assistant", "one two three four", True)]
    # The user item is the session's own; the heard reply follows it as text.
    m3 = h.mark()
    h.talk()
    seeded = seeded_texts(h.sent(c.conn_id, m3))
    assert seeded == [("assistant", "one two three four")]


def test_heard_reply_reaches_the_new_session_before_a_turn_asked_meanwhile() -> None:
    # The link drops mid-reply before u1's transcript; u2 interrupted the reply and was
    # not answered.  The new session must hear the reply a1 before it is asked about u2,
    # even though u1 is still being transcribed there.
    h = ready()
    h.talk(600)
    rid, item = h.reply(1, "one two three four", 24000, user_item="u1", done=False)
    h.press()
    h.stopped(item, 12000)
    h.audio(400)
    h.release()
    h.ev(1, h.srv.response_done(rid, status="cancelled"))
    m = h.mark()
    h.closed(1)
    (c,) = h.connects(m)
    m2 = h.mark()
    h.open(c.conn_id)
    sent = h.sent(c.conn_id, m2)
    order = [(e["type"], e["item"]["content"][0]["text"])
             if e["type"] == "conversation.item.create" else (e["type"], "")
             for e in sent if e["type"] != "input_audio_buffer.append"]
    assert seeded_texts(sent) == [("assistant", "one two")]
    assert order[-4:] == [
        ("input_audio_buffer.commit", ""),  # u1 again, to be transcribed
        ("conversation.item.create", "one two"),  # what was heard of a1
        ("input_audio_buffer.commit", ""),  # u2, replayed
        ("response.create", ""),
    ]
    h.ev(c.conn_id, h.srv.committed("u1b"))
    h.ev(c.conn_id, h.srv.transcript("u1b", "count"))
    m3 = h.mark()
    h.ev(c.conn_id, h.srv.committed("u2b"))
    h.ev(c.conn_id, h.srv.transcript("u2b", "stop"))
    _rid, item2 = h.reply(c.conn_id, "Stopped.")
    h.finished(item2, 4800)
    assert [(e.role, e.text) for e in h.history(m)] == [
        ("user", "count"), ("assistant", "one two"), ("user", "stop"),
        ("assistant", "Stopped.")]
    # Nothing was sent twice.
    h.talk()
    assert seeded_texts(h.sent(c.conn_id, m3)) == []


def test_replayed_turn_reaches_the_new_session_once_as_audio_not_also_as_text() -> None:
    # u2's transcript came but its answer had not started when the link dropped: u2 is
    # replayed as audio on the next session, and must not also be seeded as text.
    for u1_transcript_lost in (False, True):
        h = ready()
        h.talk(600)
        _rid, item = h.reply(1, "one two three four", 24000, user_item="u1")
        if not u1_transcript_lost:
            h.ev(1, h.srv.transcript("u1", "count"))
        h.finished(item, 24000)
        h.talk(400)
        h.ev(1, h.srv.committed("u2"))
        h.ev(1, h.srv.transcript("u2", "what time is it"))
        h.ev(1, h.srv.response_created("resp_x"))
        m = h.mark()
        h.closed(1)
        (c,) = h.connects(m)
        m2 = h.mark()
        h.open(c.conn_id)
        sent = h.sent(c.conn_id, m2)
        assert ("user", "what time is it") not in seeded_texts(sent), u1_transcript_lost
        assert [e["type"] for e in sent].count("input_audio_buffer.commit") == (
            2 if u1_transcript_lost else 1)
        assert [e["type"] for e in sent][-1] == "response.create"


def test_tool_results_reach_the_new_session_while_the_lost_transcript_is_made() -> None:
    h = ready()
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    m = h.mark()
    h.closed(1, 1006)
    (c,) = h.connects(m)
    h.tool_result("call_1", "12:00")
    m2 = h.mark()
    h.open(c.conn_id)
    sent = h.sent(c.conn_id, m2)
    types = [e["type"] for e in sent]
    assert types[-1] == "response.create"
    assert "input_audio_buffer.commit" in types
    commit = types.index("input_audio_buffer.commit")
    assert seeded_texts(sent[:commit]) == []  # the tool ran after the user spoke
    assert seeded_texts(sent[commit:]) == [("system", "[tool get_time called with {}]"),
                                           ("system", "[tool get_time returned: 12:00]")]
    h.ev(c.conn_id, h.srv.committed("u1b"))
    h.ev(c.conn_id, h.srv.transcript("u1b", "time?"))
    assert [(e.role, e.text) for e in h.history(m)][:3] == [
        ("user", "time?"), ("tool_call", "{}"), ("tool_output", "12:00")]
    m3 = h.mark()
    h.talk()
    assert seeded_texts(h.sent(c.conn_id, m3)) == []  # nothing sent twice


def test_a_flapping_link_gives_up_on_a_lost_transcript_after_a_few_sessions() -> None:
    h = ready()
    h.talk(600)
    _rid, item = h.reply(1, "one two", 4800, user_item="u1", done=False)
    h.finished(item, 4800)
    m = h.mark()
    conn, commits = 1, 0
    for _ in range(engine._TRANSCRIPT_TRIES + 2):
        mark = h.mark()
        h.closed(conn, 1006)
        (c,) = h.connects(mark)
        conn = c.conn_id
        h.open(conn)
        commits += h.sent_types(conn, mark).count("input_audio_buffer.commit")
        h.ev(conn, h.srv.committed(f"u{conn}"))
    assert commits == engine._TRANSCRIPT_TRIES - 1
    assert [(e.role, e.text) for e in h.history(m)] == [
        ("user", "[inaudible]"), ("assistant", "one two")]


def test_lost_transcript_becomes_inaudible_when_no_session_comes_back() -> None:
    h = ready()
    h.talk(600)
    _rid, item = h.reply(1, "one two", 4800, user_item="u1", done=False)
    m = h.mark()
    h.closed(1, 1006)
    h.finished(item, 4800)
    for c in h.connects(m):
        h.failed(c.conn_id)
    h.advance(h.conv._session.offline_buffer_s + 1)
    assert [(e.role, e.text) for e in h.history(m)][:1] == [("user", "[inaudible]")]
    assert h.conv._retranscribe == []


def test_tool_results_after_link_loss_reach_the_new_session_as_text() -> None:
    h = ready()
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    h.ev(1, h.srv.transcript("u1", "time?"))
    m = h.mark()
    h.closed(1, 1006)
    (c,) = h.connects(m)
    h.tool_result("call_1", "12:00")
    h.open(c.conn_id)
    sent = h.sent(c.conn_id)
    assert seeded_texts(sent)[-2:] == [("system", "[tool get_time called with {}]"),
                                       ("system", "[tool get_time returned: 12:00]")]
    assert sent[-1]["type"] == "response.create"
    assert all(e["item"]["type"] != "function_call_output" for e in sent
               if e["type"] == "conversation.item.create")


def test_response_watchdog_reconnects_a_silent_link() -> None:
    h = ready(timings=Timings(response_start_timeout_s=5))
    h.talk()
    m = h.mark()
    h.advance(6)
    assert Close(1) in h.since(m)
    (c,) = h.connects(m)
    h.open(c.conn_id)
    assert "input_audio_buffer.commit" in h.sent_types(c.conn_id)  # replayed


# ==========================================================================================
# session rotation
# ==========================================================================================

ROT = {"rotate_after_min": 1.0}


def test_rotation_prepares_standby_and_switches_at_idle() -> None:
    h = ready(session=fast_session(**ROT), initial=[E("user", "old"), E("assistant", "older")])
    h.full_turn(1, "q1", "a1")
    m = h.mark()
    h.advance(59)
    assert h.connects(m) == []
    h.advance(1.5)
    assert h.connects(m) == [Connect(2, 0.0)]
    h.open(2)
    # Idle: switch immediately, old one closed.
    assert Close(1) in h.since(m)
    assert seeded_texts(h.sent(2)) == [("user", "old"), ("assistant", "older"),
                                       ("user", "q1"), ("assistant", "a1")]
    snap = h.conv.snapshot(h.now)
    assert snap["rotation_count"] == 1 and snap["session_id"] == "sess_2"
    assert snap["session_age_s"] == 0.0
    m2 = h.mark()
    h.talk()
    assert h.sent(1, m2) == [] and "input_audio_buffer.commit" in h.sent_types(2, m2)
    assert not notices(h.since(m), "warning")


def test_press_during_rotation_goes_to_old_session_then_delta_is_seeded() -> None:
    h = ready(session=fast_session(**ROT))
    h.full_turn(1, "q1", "a1")
    h.advance(61)
    assert h.connects()[-1] == Connect(2, 0.0)
    h.opened(2)
    h.ev(2, h.srv.session_created("sess_2"))
    m = h.mark()
    # A turn while the standby is still being prepared: it goes to the old session at once.
    h.press()
    h.audio(300)
    assert appended_bytes(h.sent(1, m)) > 0 and h.sent(2, m) == []
    h.ack(2)  # standby READY while the button is held: no switch yet
    assert Close(1) not in h.since(m)
    h.release()
    _rid, item = h.reply(1, "a2", user_item="u2")
    assert Close(1) not in h.since(m)  # reply still playing
    h.ev(1, h.srv.transcript("u2", "q2"))
    assert Close(1) not in h.since(m)
    m2 = h.mark()
    h.finished(item, 4800)  # now idle
    acts = h.since(m2)
    close_at = acts.index(Close(1))
    delta = [a for a in acts[:close_at] if isinstance(a, Send) and a.conn_id == 2]
    assert seeded_texts(a.event for a in delta) == [("user", "q2"), ("assistant", "a2")]
    assert [e.text for e in h.history()] == ["q1", "a1", "q2", "a2"]
    m3 = h.mark()
    h.talk()
    assert h.sent(1, m3) == [] and "response.create" in h.sent_types(2, m3)


def test_no_switch_while_tool_runs_or_transcript_pending() -> None:
    h = ready(session=fast_session(**ROT), timings=Timings(transcript_timeout_s=600))
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    h.advance(61)
    h.open(2)
    m = h.mark()
    h.advance(1)
    assert Close(1) not in h.since(m)
    h.tool_result("call_1", "12:00")
    _rid, item = h.reply(1, "Noon.")
    h.finished(item, 4800)
    assert Close(1) not in h.since(m)  # user transcript still pending
    h.ev(1, h.srv.transcript("u1", "time?"))
    assert Close(1) in h.since(m)
    roles = [r for r, _ in seeded_texts(a.event for a in h.since(m, Send) if a.conn_id == 2)]
    assert roles == ["user", "system", "system", "assistant"]


def test_rotation_before_server_expiry_uses_wall_clock_offset() -> None:
    offset = 1_700_000_000.0 - 1000.0  # wall = now + offset
    h = Harness(session=fast_session(rotate_after_min=55, rotate_before_expiry_s=60),
                wall_clock_offset=offset)
    expires_at = int(h.now + offset + 15 * 60)  # a 15 min session
    h.open(1, expires_at=expires_at)
    m = h.mark()
    h.advance(13 * 60)
    assert h.connects(m) == []
    h.advance(60.5)
    assert h.connects(m) == [Connect(2, 0.0)]


def test_standby_failure_keeps_old_session_and_retries_later() -> None:
    h = ready(session=fast_session(**ROT), timings=Timings(rotation_retry_s=10))
    h.advance(61)
    m = h.mark()
    h.failed(2, "timeout")
    assert h.conv.snapshot(h.now)["connected"] and h.conv.snapshot(h.now)["conn_id"] == 1
    assert Close(1) not in h.since(m)
    h.advance(9)
    assert h.connects(m) == []
    h.advance(1.5)
    assert h.connects(m) == [Connect(3, 0.0)]
    h.talk()
    assert "response.create" in h.sent_types(1, m)


def test_old_session_dies_during_rotation_standby_takes_over_at_once() -> None:
    h = ready(session=fast_session(**ROT))
    h.full_turn(1, "q1", "a1")
    h.advance(61)
    h.open(2)  # ready, but keep the device busy so no switch happens
    h.ev(1, h.srv.committed("x"))  # (ignored: nothing awaits it)
    m = h.mark()
    h.press()
    h.audio(300)
    h.closed(1, 1006)
    assert h.connects(m) == []  # no reconnect needed
    h.audio(200)
    h.release()
    ev = h.sent(2, m)
    assert appended_bytes(ev) == 500 * 48  # the whole turn, re-sent from the start
    assert [e["type"] for e in ev][-2:] == ["input_audio_buffer.commit", "response.create"]


def test_old_session_dies_before_standby_ready_standby_becomes_active() -> None:
    h = ready(session=fast_session(**ROT))
    h.advance(61)
    h.opened(2)
    m = h.mark()
    h.closed(1, 1006)
    assert h.connects(m) == []
    assert not h.conv.snapshot(h.now)["connected"]
    h.ev(2, h.srv.session_created("sess_2"))
    h.ack(2)
    snap = h.conv.snapshot(h.now)
    assert snap["connected"] and snap["conn_id"] == 2


def test_three_rotations_in_a_row_preserve_history_order() -> None:
    h = ready(session=fast_session(**ROT))
    expected: list[tuple[str, str]] = []
    conn = 1
    for r in range(3):
        h.full_turn(conn, f"q{r}a", f"a{r}a")
        expected += [("user", f"q{r}a"), ("assistant", f"a{r}a")]
        h.advance(61)
        new = conn + 1
        assert h.connects()[-1] == Connect(new, 0.0)
        h.opened(new)
        h.ev(new, h.srv.session_created(f"sess_{new}"))
        # A turn on the old session while the standby is being prepared.
        h.full_turn(conn, f"q{r}b", f"a{r}b")
        expected += [("user", f"q{r}b"), ("assistant", f"a{r}b")]
        m = h.mark()
        h.ack(new)
        assert Close(conn) in h.since(m)
        # Seed + delta seen by the new session == the whole history, in order.
        assert seeded_texts(h.sent(new)) == expected
        conn = new
    assert [(e.role, e.text) for e in h.history()] == expected
    assert h.conv.snapshot(h.now)["rotation_count"] == 3


# ==========================================================================================
# dialects, status, misc
# ==========================================================================================

def test_beta_dialect_encodes_flat_session_and_decodes_beta_events() -> None:
    h = Harness(api=ApiConfig(dialect="beta", model="gpt-4o-realtime-preview"),
                initial=[E("user", "u"), E("assistant", "a")])
    h.open(1)
    upd = h.sent(1)[0]["session"]
    assert upd["input_audio_format"] == "pcm16" and upd["turn_detection"] is None
    assert upd["modalities"] == ["text", "audio"] and "type" not in upd
    items = [e["item"] for e in h.sent(1) if e["type"] == "conversation.item.create"]
    assert items[1]["content"][0]["type"] == "text"
    h.talk()
    h.ev(1, h.srv.committed("u1"))
    h.ev(1, h.srv.response_created("r1"))
    h.ev(1, h.srv.ev("response.output_item.added", response_id="r1", output_index=0,
                     item={"id": "i1", "type": "message", "role": "assistant", "content": []}))
    m = h.mark()
    h.ev(1, h.srv.ev("response.audio.delta", response_id="r1", item_id="i1", output_index=0,
                     content_index=0, delta=base64.b64encode(pcm(480)).decode()))
    assert h.since(m, PlayAudio) == [PlayAudio("i1", pcm(480))]
    h.ev(1, h.srv.ev("response.done", response={
        "id": "r1", "status": "completed", "usage": {"total_tokens": 3},
        "output": [{"id": "i1", "type": "message", "role": "assistant",
                    "content": [{"type": "audio", "transcript": "beta words"}]}]}))
    h.ev(1, h.srv.transcript("u1", "hello"))
    h.finished("i1", 480)
    assert [e.text for e in h.history(m)] == ["hello", "beta words"]


def test_snapshot_reports_status() -> None:
    h = ready()
    h.full_turn(1, "q", "a")
    snap = h.conv.snapshot(h.now)
    for key in ("state", "connected", "session_id", "session_age_s", "last_turn_latency_ms",
                "pending_offline_audio_ms", "rotation_count", "standby"):
        assert key in snap
    assert snap["state"] == "idle" and snap["history_entries"] == 2
    import json
    json.dumps(snap)


def test_stale_events_from_closed_connection_are_ignored() -> None:
    h = ready(session=fast_session(**ROT))
    h.advance(61)
    h.open(2)
    m = h.mark()
    h.ev(1, h.srv.response_created("ghost"))
    h.ev(1, h.srv.audio_delta("ghost", "gi", pcm(480)))
    assert h.since(m, PlayAudio) == []
    h.closed(1, 1000)
    assert h.connects(m) == []


def test_missing_playback_stopped_answer_times_out() -> None:
    h = ready(timings=Timings(stop_answer_timeout_s=1))
    h.talk()
    _rid, _item = h.reply(1, "Some reply words.", 4800, user_item="u1")
    m = h.mark()
    h.press()
    h.audio(200)
    h.release()
    assert "response.create" not in h.sent_types(1, m)  # waits for the truncation
    h.advance(1.5)
    types = h.sent_types(1, m)
    assert "conversation.item.truncate" in types and types[-1] == "response.create"


def test_cut_at_word() -> None:
    assert cut_at_word("hello world again", 1.0) == "hello world again"
    assert cut_at_word("hello world again", 0.0) == ""
    assert cut_at_word("hello world again", 0.5) == "hello"
    assert cut_at_word("hello world again", 12 / 17) == "hello world"
    assert cut_at_word("unbroken", 0.5) == ""


def test_no_event_ever_carries_the_api_key() -> None:
    h = ready()
    h.full_turn(1, "q", "a")
    blob = repr(h.log)
    assert "Bearer" not in blob and "sk-" not in blob


def test_tool_result_after_reconnect_is_synced_as_text_before_response_create() -> None:
    h = ready()
    h.talk()
    rid = tool_response(h, 1)
    h.ev(1, h.srv.response_done(rid))
    h.ev(1, h.srv.transcript("u1", "time?"))
    m = h.mark()
    h.closed(1, 1006)
    (c,) = h.connects(m)
    h.open(c.conn_id)  # READY before the tool answers
    assert seeded_texts(h.sent(c.conn_id))[-1] == ("system", "[tool get_time called with {}]")
    m2 = h.mark()
    h.tool_result("call_1", "12:00")
    sent = h.sent(c.conn_id, m2)
    assert [e["type"] for e in sent] == ["conversation.item.create", "response.create"]
    assert seeded_texts(sent) == [("system", "[tool get_time returned: 12:00]")]


def test_turn_whose_response_was_cancelled_before_output_is_still_replayed() -> None:
    h = ready()
    h.talk(400)  # turn 1
    h.ev(1, h.srv.committed("u1"))
    h.ev(1, h.srv.response_created("r1"))
    h.press()  # turn 2 interrupts before any output
    h.audio(300)
    h.release()
    h.ev(1, h.srv.response_done("r1", status="cancelled", reason="client_cancelled"))
    h.ev(1, h.srv.committed("u2"))
    m = h.mark()
    h.closed(1, 1006)  # the answer to both never came
    (c,) = h.connects(m)
    h.open(c.conn_id)
    sent = h.sent(c.conn_id, m)
    assert appended_bytes(sent) == 700 * 48
    assert [e["type"] for e in sent].count("input_audio_buffer.commit") == 2
    assert [e["type"] for e in sent].count("response.create") == 1


def test_missing_playback_finished_does_not_block_history_forever() -> None:
    h = ready(timings=Timings(finish_answer_slack_s=2))
    h.talk()
    _rid, _item = h.reply(1, "Reply.", 4800, user_item="u1")  # 0.2 s of audio
    h.ev(1, h.srv.transcript("u1", "q"))
    h.advance(2.5)
    assert [e.text for e in h.history()] == ["q", "Reply."]
    assert indicators(h.log)[-1] == "idle"


def test_commit_never_acknowledged_does_not_block_history_forever() -> None:
    h = ready(timings=Timings(transcript_timeout_s=2))
    h.talk(500)
    _rid, item = h.reply(1, "Reply.", 4800)  # no input_audio_buffer.committed
    h.finished(item, 4800)
    assert h.history() == []
    h.advance(5)
    assert [e.text for e in h.history()] == ["[inaudible]", "Reply."]


def test_text_modality_reply_is_recorded_at_response_done() -> None:
    h = ready(session=fast_session(output_modality="text"))
    h.talk()
    h.ev(1, h.srv.committed("u1"))
    h.ev(1, h.srv.transcript("u1", "hi"))
    h.ev(1, h.srv.response_created("r1"))
    h.ev(1, h.srv.message_added("r1", "i1"))
    h.ev(1, h.srv.ev("response.output_text.delta", response_id="r1", item_id="i1",
                     output_index=0, content_index=0, delta="Hel"))
    h.ev(1, h.srv.ev("response.output_text.done", response_id="r1", item_id="i1",
                     output_index=0, content_index=0, text="Hello!"))
    m = h.mark()
    h.ev(1, h.srv.response_done("r1"))
    assert h.since(m, EndOfReply) == []
    assert [e.text for e in h.history()] == ["hi", "Hello!"]


def test_start_and_shutdown() -> None:
    h = Harness()
    assert h.conv.start(h.now) == []  # the constructor's actions were already taken
    h.open(1)
    assert h.conv.snapshot(h.now)["ready"] is True
    h.talk()
    _rid, item = h.reply(1, "Long reply words here.", 24000, user_item="u1", done=False)
    m = h.mark()
    acts = h.feed(h.conv.shutdown(h.now))
    assert StopPlayback(item) in acts and Close(1) in acts
    assert h.sent_types(1, m) == ["response.cancel"]
    h.stopped(item, 2400)
    h.closed(1, 1000)
    h.advance(60)
    assert h.connects(m) == []
    assert tones(h.press()) == []


def test_reconfigure_switches_to_a_fresh_session_with_the_new_instructions() -> None:
    h = ready(initial=[E("user", "hi")])
    h.full_turn(1, "q1", "a1")
    m = h.mark()
    new_session = fast_session(instructions="Speak like a pirate.", voice="cedar")
    h.feed(h.conv.reconfigure(ApiConfig(), new_session, HistoryConfig(), [TOOL], h.now))
    h.tick()
    assert h.connects(m) == [Connect(2, 0.0)]
    h.open(2)
    assert Close(1) in h.since(m)
    update = next(e for e in h.sent(2) if e["type"] == "session.update")
    assert update["session"]["instructions"] == "Speak like a pirate."
    assert update["session"]["audio"]["output"]["voice"] == "cedar"
    assert seeded_texts(h.sent(2)) == [("user", "hi"), ("user", "q1"), ("assistant", "a1")]
    # The fresh session is not rotated again before its time.
    m2 = h.mark()
    h.advance(5)
    assert h.connects(m2) == []


def test_reconfigure_without_session_changes_keeps_the_session() -> None:
    h = ready()
    m = h.mark()
    h.feed(h.conv.reconfigure(ApiConfig(), fast_session(), HistoryConfig(), [TOOL], h.now))
    h.advance(5)
    assert h.connects(m) == []


def test_shutdown_mid_stream_records_what_was_heard() -> None:
    h = ready()
    h.talk()
    user_item = h.srv.new_id("item")
    h.ev(1, h.srv.committed(user_item))
    rid, item_id = h.srv.new_id("resp"), h.srv.new_id("item")
    h.ev(1, h.srv.response_created(rid))
    h.ev(1, h.srv.message_added(rid, item_id))
    h.ev(1, h.srv.transcript_delta(rid, item_id, "one two three four "))
    h.ev(1, h.srv.audio_delta(rid, item_id, pcm(2400)))
    h.ev(1, h.srv.transcript_delta(rid, item_id, "five six seven eight"))
    h.ev(1, h.srv.audio_delta(rid, item_id, pcm(2400)))
    h.ev(1, h.srv.transcript(user_item, "count for me"))
    # Still streaming: no transcript.done, no response.done, when the daemon stops.
    m = h.mark()
    actions = h.feed(h.conv.shutdown(h.now))
    assert StopPlayback(item_id) in actions
    h.stopped(item_id, 2400)  # half of what was received had been played
    recorded = [a.entry for a in h.since(0, RecordHistory)]
    assert [e.role for e in recorded] == ["user", "assistant"]
    assert recorded[1].interrupted
    assert recorded[1].text == "one two three four"
    assert len(h.since(m, RecordHistory)) == 1
