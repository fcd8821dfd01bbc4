"""The local Realtime server and the event checker, driven by a raw websockets client."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from typing import Any

import pytest
from realtime_client import RealtimeTestClient, b64, pcm
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from daemon import eventcheck
from daemon.eventcheck import EventChecker, EventCheckFailed, EventCheckUnavailable
from daemon.localserver import Fault, InjectError, LocalRealtimeServer, Script, synth

KEY = "test-key"

# The GA session.update of /work/shared/realtime-protocol.md, with a real tool.
GA_SESSION_UPDATE: dict[str, Any] = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": "You are a terse voice assistant.",
        "tools": [{
            "type": "function",
            "name": "get_time",
            "description": "Current time in a timezone",
            "parameters": {"type": "object",
                           "properties": {"timezone": {"type": "string"}}},
        }],
        "tool_choice": "auto",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000},
                      "transcription": {"model": "gpt-4o-mini-transcribe"},
                      "noise_reduction": {"type": "near_field"},
                      "turn_detection": None},
            "output": {"format": {"type": "audio/pcm", "rate": 24000},
                       "voice": "marin", "speed": 1.0},
        },
    },
}

BETA_SESSION_UPDATE: dict[str, Any] = {
    "type": "session.update",
    "session": {
        "modalities": ["text", "audio"],
        "instructions": "You are a terse voice assistant.",
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": None,
        "temperature": 0.8,
    },
}

GA_TURN = [
    "input_audio_buffer.committed",
    "conversation.item.added",
    "conversation.item.done",
    "response.created",
    "rate_limits.updated",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]

def _script(**options: Any) -> Script:
    """A Script with unpaced audio and immediate transcription unless told otherwise."""
    options.setdefault("realtime_factor", 0.0)
    options.setdefault("transcription_delay_s", 0.0)
    return Script(**options)


def _without_deltas(events: list[dict[str, Any]], *also: str) -> list[str]:
    return [e["type"] for e in events
            if not e["type"].endswith(".delta") and e["type"] not in also]


async def _user_turn(c: RealtimeTestClient, ms: int = 500) -> None:
    await c.append_audio(pcm(ms, 300))
    await c.send({"type": "input_audio_buffer.commit"})


# --- the validator ---------------------------------------------------------------------

VALID_GA_EVENTS: list[dict[str, Any]] = [
    GA_SESSION_UPDATE,
    {"type": "input_audio_buffer.append", "audio": b64(pcm(40))},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "output_audio_buffer.clear"},
    {"type": "conversation.item.create", "previous_item_id": "root", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
    {"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": "hello"}]}},
    {"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_1", "output": "{\"ok\": true}"}},
    {"type": "conversation.item.retrieve", "item_id": "item_1"},
    {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0,
     "audio_end_ms": 1200},
    {"type": "conversation.item.delete", "item_id": "item_1"},
    {"type": "response.create"},
    {"type": "response.create", "response": {"output_modalities": ["audio"],
                                             "instructions": "shorter"}},
    {"type": "response.cancel"},
]


@pytest.mark.parametrize("event", VALID_GA_EVENTS, ids=lambda e: e["type"])
def test_checker_accepts_valid_ga_events(event: dict[str, Any]) -> None:
    assert EventChecker("ga", strict=True).check_client(event) == []


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (BETA_SESSION_UPDATE, "session.type: Field required"),
        ({"type": "session.update", "session": {**GA_SESSION_UPDATE["session"],
                                                "modalities": ["audio"]}},
         "session.modalities: unknown field"),
        ({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "txt": "x"}]}},
         "item.content.0.txt: unknown field"),
        ({"type": "conversation.item.create", "item": {
            "type": "message", "role": "assistant", "content": [{"type": "text", "text": "x"}]}},
         "item.content.0.type"),
        ({"type": "conversation.item.truncate", "item_id": "i", "content_index": 0,
          "audio_end_ms": "soon"}, "audio_end_ms: Input should be a valid integer"),
        ({"type": "response.create", "response": {"output_modalities": ["audio", "text"]}},
         "output_modalities: must be ['audio'] or ['text']"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "audio: not valid"),
        ({"type": "response.audio.delta"}, "unknown ga client event type"),
        ({"session": {}}, "type: missing"),
    ],
    ids=["beta-session-on-ga", "beta-field", "misspelt", "beta-content-type", "wrong-type",
         "both-modalities", "bad-base64", "unknown-type", "no-type"],
)
def test_checker_rejects_invalid_ga_events(event: dict[str, Any], expected: str) -> None:
    problems = EventChecker("ga", strict=True).check_client(event)
    assert any(expected in p for p in problems), problems


def test_checker_beta_dialect() -> None:
    beta = EventChecker("beta", strict=True)
    assert beta.check_client(BETA_SESSION_UPDATE) == []
    problems = beta.check_client(GA_SESSION_UPDATE)
    assert "session.type: unknown field" in problems
    with pytest.raises(EventCheckFailed, match=r"session\.audio"):
        beta.require(GA_SESSION_UPDATE)


def test_checker_server_events_and_missing_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = {"type": "conversation.item.truncated", "event_id": "e", "item_id": "i",
          "content_index": 0, "audio_end_ms": 10}
    assert eventcheck.check_server_event(ok) == []
    assert eventcheck.check_server_event({**ok, "audio_end_ms": None}) != []
    monkeypatch.setattr(eventcheck, "available", lambda: False)
    with pytest.raises(EventCheckUnavailable):
        EventChecker("ga", strict=True)
    lax = EventChecker("ga", strict=False)
    assert lax.check_client({"type": "anything", "bogus": 1}) == []
    with pytest.raises(EventCheckUnavailable):
        LocalRealtimeServer(strict=True)


# --- GA flows --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_full_ga_turn() -> None:
    script = _script(user_transcripts=["what is the weather like"])
    async with LocalRealtimeServer(script, api_key=KEY) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            created = await c.recv()
            assert created["type"] == "session.created"
            assert created["session"]["type"] == "realtime"
            assert created["session"]["id"].startswith("sess_")
            assert created["session"]["expires_at"] > 0
            await c.send(GA_SESSION_UPDATE)
            updated = await c.recv()
            assert updated["type"] == "session.updated"
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            assert updated["session"]["audio"]["output"]["voice"] == "marin"
            assert updated["session"]["id"] == created["session"]["id"]
            await _user_turn(c, 600)
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            transcription = [e for e in events if e["type"].startswith(
                "conversation.item.input_audio_transcription")]
            if not any(e["type"].endswith(".completed") for e in transcription):
                transcription += await c.recv_until(
                    "conversation.item.input_audio_transcription.completed")
            flow = _without_deltas(
                events, "conversation.item.input_audio_transcription.completed")
            assert flow == GA_TURN

            committed = events[0]
            assert committed["previous_item_id"] is None
            user_id = committed["item_id"]
            completed = transcription[-1]
            assert completed["item_id"] == user_id
            assert completed["transcript"] == "what is the weather like"
            assert completed["usage"]["type"] == "tokens"

            done = events[-1]["response"]
            assert done["status"] == "completed"
            transcript = done["output"][0]["content"][0]["transcript"]
            assert transcript.startswith("You said: what is the weather like.")
            deltas = "".join(e["delta"] for e in events
                             if e["type"] == "response.output_audio_transcript.delta")
            assert deltas == transcript
            audio = c.audio_of(events, "response.output_audio.delta")
            assert audio == synth.synthesize(transcript)
            words = len(transcript.split())
            assert 0.3 * words < len(audio) / 48000 < 0.6 * words
            usage = done["usage"]
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
            details = usage["input_token_details"]
            assert details["audio_tokens"] == 6  # 600 ms at 1 token / 100 ms
            assert set(details) >= {"text_tokens", "audio_tokens", "image_tokens",
                                    "cached_tokens", "cached_tokens_details"}
            assert usage["output_token_details"]["audio_tokens"] == -(-synth.duration_ms(
                audio) // 50)

        conn = srv.connections[0]
        assert [i["role"] for i in conn.items] == ["user", "assistant"]
        assert conn.items[0]["content"][0]["transcript"] == "what is the weather like"
        assert srv.turns[0].replies == [transcript]
        assert srv.received[0][0]["type"] == "session.update"
        assert "session.updated" in srv.types(direction="server")
        assert "response.output_audio.delta x" in srv.transcript()
        assert srv.warnings == []  # turn detection was switched off
        srv.assert_clean()


@pytest.mark.asyncio
async def test_too_short_commit_and_clear() -> None:
    async with LocalRealtimeServer(_script()) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await c.append_audio(pcm(50))
            await c.send({"type": "input_audio_buffer.commit"})
            err = await c.recv()
            assert err["type"] == "error"
            assert err["error"]["type"] == "invalid_request_error"
            assert err["error"]["code"] == "input_audio_buffer_commit_empty"
            assert "Expected at least 100ms" in err["error"]["message"]
            assert "buffer only has 50.00ms of audio" in err["error"]["message"]
            assert err["error"]["event_id"] == "evt_test_3"
            await c.send({"type": "input_audio_buffer.clear"})
            assert (await c.recv())["type"] == "input_audio_buffer.cleared"
            await c.send({"type": "input_audio_buffer.commit"})
            err = await c.recv()
            assert "buffer only has 0.00ms" in err["error"]["message"]
        srv.assert_clean()


@pytest.mark.asyncio
async def test_second_response_create_while_active() -> None:
    async with LocalRealtimeServer(_script()) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            errors = [e for e in events if e["type"] == "error"]
            assert [e["error"]["code"] for e in errors] == [
                "conversation_already_has_active_response"]
            assert sum(e["type"] == "response.created" for e in events) == 1
            # After response.done a new response is fine.
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            assert not [e for e in events if e["type"] == "error"]
        # No session.update switched server VAD off: valid, but suspicious for push-to-talk.
        assert any("turn detection is on" in w for w in srv.warnings)
        srv.assert_clean()


@pytest.mark.asyncio
async def test_cancel_and_truncate() -> None:
    script = Script(realtime_factor=1.0, delta_ms=40, transcription_delay_s=0)
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await c.send({"type": "response.cancel"})
            err = await c.recv()
            assert err["error"]["code"] == "response_cancel_not_active"

            await _user_turn(c)
            await c.send({"type": "response.create"})
            events: list[dict[str, Any]] = []
            while sum(e["type"] == "response.output_audio.delta" for e in events) < 4:
                events.append(await c.recv())
            await c.send({"type": "response.cancel"})
            events += await c.recv_until("response.done")
            done = events[-1]["response"]
            assert done["status"] == "cancelled"
            assert done["status_details"]["reason"] == "client_cancelled"
            assert done["output"][0]["status"] == "incomplete"
            audio = c.audio_of(events, "response.output_audio.delta")
            received_ms = synth.duration_ms(audio)
            assert 4 * 40 <= received_ms < 1000  # stopped long before the ~4 s reply
            item_id = done["output"][0]["id"]

            await c.send({"type": "conversation.item.truncate", "item_id": item_id,
                          "content_index": 0, "audio_end_ms": received_ms + 40})
            err = await c.recv()
            assert err["type"] == "error"
            assert err["error"]["param"] == "audio_end_ms"
            assert "is already shorter than" in err["error"]["message"]

            await c.send({"type": "conversation.item.truncate", "item_id": item_id,
                          "content_index": 0, "audio_end_ms": 100})
            truncated = await c.recv()
            assert truncated["type"] == "conversation.item.truncated"
            assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 100)

            user_item = srv.connections[0].items[0]["id"]
            await c.send({"type": "conversation.item.truncate", "item_id": user_item,
                          "content_index": 0, "audio_end_ms": 10})
            err = await c.recv()
            assert "Only model output audio messages can be truncated" in err["error"]["message"]

        [trunc] = srv.truncations
        assert (trunc.item_id, trunc.audio_end_ms, trunc.audio_ms) == (item_id, 100, received_ms)
        assert trunc.heard == "You"
        conn = srv.connections[0]
        assert synth.duration_ms(conn.audio[item_id]) == 100
        assert conn.items[1]["content"][0]["transcript"] == ""
        srv.assert_clean()


@pytest.mark.asyncio
async def test_function_call_round_trip() -> None:
    script = _script(function_calls={0: [("get_time", {"timezone": "UTC"})]})
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await c.send(GA_SESSION_UPDATE)
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            added = next(e for e in events if e["type"] == "response.output_item.added")
            assert added["item"]["type"] == "function_call"
            assert added["item"]["name"] == "get_time"
            call_id = added["item"]["call_id"]
            args_done = next(e for e in events
                             if e["type"] == "response.function_call_arguments.done")
            assert (args_done["call_id"], args_done["name"]) == (call_id, "get_time")
            assert json.loads(args_done["arguments"]) == {"timezone": "UTC"}
            pieces = "".join(e["delta"] for e in events
                             if e["type"] == "response.function_call_arguments.delta")
            assert pieces == args_done["arguments"]
            assert not any(e["type"] == "response.output_audio.delta" for e in events)
            assert events[-1]["response"]["output"][0]["type"] == "function_call"

            await c.send({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": call_id,
                "output": json.dumps({"time": "12:34"})}})
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            transcript = events[-1]["response"]["output"][0]["content"][0]["transcript"]
            assert "get_time" in transcript and "12:34" in transcript
        turn = srv.turns[0]
        assert turn.function_calls == [("get_time", call_id, '{"timezone": "UTC"}')]
        assert turn.tool_outputs == [("get_time", '{"time": "12:34"}')]
        assert [i["type"] for i in srv.connections[0].items] == [
            "message", "function_call", "function_call_output", "message"]
        srv.assert_clean()


@pytest.mark.asyncio
async def test_function_call_needs_the_tool_in_the_session() -> None:
    script = _script(trigger_words={"time": ("get_time", {})}, user_transcripts=["what time"])
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await _user_turn(c)  # no tools configured: the model cannot call one
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            assert events[-1]["response"]["output"][0]["type"] == "message"
        srv.assert_clean()


@pytest.mark.asyncio
async def test_items_reseeded_in_order_delete_retrieve() -> None:
    async with LocalRealtimeServer(_script()) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            for role, kind, text in [("user", "input_text", "first"),
                                     ("assistant", "output_text", "second"),
                                     ("user", "input_text", "third")]:
                await c.send({"type": "conversation.item.create", "item": {
                    "type": "message", "role": role, "content": [{"type": kind, "text": text}]}})
                added, done = await c.recv(), await c.recv()
                assert (added["type"], done["type"]) == (
                    "conversation.item.added", "conversation.item.done")
            await c.send({"type": "conversation.item.create", "previous_item_id": "root",
                          "item": {"id": "item_zero", "type": "message", "role": "system",
                                   "content": [{"type": "input_text", "text": "zero"}]}})
            added = await c.recv()
            assert added["previous_item_id"] is None
            await c.recv()
            conn = srv.connections[0]
            texts = [i["content"][0]["text"] for i in conn.items]
            assert texts == ["zero", "first", "second", "third"]
            await c.send({"type": "conversation.item.create", "previous_item_id": "nope",
                          "item": {"type": "message", "role": "user",
                                   "content": [{"type": "input_text", "text": "x"}]}})
            assert (await c.recv())["error"]["param"] == "previous_item_id"

            await c.send({"type": "conversation.item.retrieve", "item_id": "item_zero"})
            got = await c.recv()
            assert got["type"] == "conversation.item.retrieved"
            assert got["item"]["content"][0]["text"] == "zero"
            await c.send({"type": "conversation.item.delete", "item_id": "item_zero"})
            assert await c.recv() == {**(c.received[-1]), "type": "conversation.item.deleted",
                                      "item_id": "item_zero"}
            await c.send({"type": "conversation.item.delete", "item_id": "item_zero"})
            assert (await c.recv())["error"]["code"] == "item_not_found"

            # Client-created input audio is kept (retrieve returns it), the log stays intact.
            audio = b64(pcm(200, 7))
            await c.send({"type": "conversation.item.create", "item": {
                "id": "item_audio", "type": "message", "role": "user",
                "content": [{"type": "input_audio", "audio": audio}]}})
            await c.recv_until("conversation.item.done")
            await c.send({"type": "conversation.item.retrieve", "item_id": "item_audio"})
            assert (await c.recv())["item"]["content"][0]["audio"] == audio
            assert srv.received[0][-2]["item"]["content"][0]["audio"] == audio
            await c.send({"type": "conversation.item.delete", "item_id": "item_audio"})
            await c.recv()

            # A text-only user turn gets a spoken reply about its text.
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            transcript = events[-1]["response"]["output"][0]["content"][0]["transcript"]
            assert transcript.startswith("You said: third.")
            assert srv.turns[0].user_transcript == "third"
        srv.assert_clean()


@pytest.mark.asyncio
async def test_session_expired_then_1001() -> None:
    script = _script(expire_after_s={0: 0.2}, session_minutes=30)
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            created = await c.recv()
            assert created["session"]["expires_at"] > 0
            events = await c.recv_until_closed()
            assert [e["type"] for e in events] == ["error"]
            assert events[0]["error"] == {
                "type": "invalid_request_error",
                "code": "session_expired",
                "message": "Your session hit the maximum duration of 30 minutes.",
                "param": None,
                "event_id": None,
            }
            with pytest.raises(ConnectionClosedOK) as info:
                await c.ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        # The next connection (index 1) is not scripted to expire.
        async with await RealtimeTestClient.connect(srv.url) as c2:
            await c2.recv()
            with pytest.raises(TimeoutError):
                await c2.recv(timeout=0.4)
        assert srv.connections[0].close_code == 1001
        srv.assert_clean()


@pytest.mark.asyncio
async def test_drop_mid_response() -> None:
    script = _script(faults=[Fault("drop", after_deltas=3, turn=0)])
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = []
            with pytest.raises(ConnectionClosedError) as info:
                while True:
                    events.append(await c.recv())
            assert info.value.rcvd is None  # no close frame: the TCP connection was cut
            assert sum(e["type"] == "response.output_audio.delta" for e in events) == 3
            assert "response.done" not in [e["type"] for e in events]
        # once=True: the reconnection and turn 1 are served normally.
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            assert events[-1]["response"]["status"] == "completed"
        assert srv.connections[0].dropped
        srv.assert_clean()


@pytest.mark.asyncio
async def test_refusals_injected_errors_and_stall() -> None:
    script = _script(
        refuse_first=2,
        errors=[InjectError("insufficient_quota", "You exceeded your current quota.",
                            on="connect", connection=0, close_code=1008,
                            error_type="insufficient_quota")],
        faults=[Fault("stall", at="connect", connection=1)],
    )
    async with LocalRealtimeServer(script) as srv:
        for _ in range(2):
            with pytest.raises(InvalidStatus) as status:
                await RealtimeTestClient.connect(srv.url)
            assert status.value.response.status_code == 503
        assert srv.refused == 2
        async with await RealtimeTestClient.connect(srv.url) as c:
            events = await c.recv_until_closed()
            assert [e["error"]["code"] for e in events] == ["insufficient_quota"]
        async with await RealtimeTestClient.connect(srv.url) as c:
            assert (await c.recv())["type"] == "session.created"
            await c.send({"type": "input_audio_buffer.clear"})
            with pytest.raises(TimeoutError):
                await c.recv(timeout=0.3)
            pong = await c.ws.ping()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await pong
            c.ws.transport.abort()
        assert srv.connections[1].stalled
        srv.assert_clean()


@pytest.mark.asyncio
async def test_runtime_expire_and_close_fault() -> None:
    script = _script(realtime_factor=1.0, faults=[Fault("close", after_deltas=2, turn=1,
                                                        close_code=1011)])
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            await c.recv_until("response.output_audio.delta")
            await srv.connections[0].expire()  # tests can end a session at any moment
            events = await c.recv_until_closed()
            assert [e["error"]["code"] for e in events if e["type"] == "error"] == [
                "session_expired"]
            assert "response.done" not in [e["type"] for e in events]
            assert c.ws.close_code == 1001
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = await c.recv_until_closed()
            assert sum(e["type"] == "response.output_audio.delta" for e in events) == 2
            assert c.ws.close_code == 1011
        srv.assert_clean()


@pytest.mark.asyncio
async def test_scripted_replies_text_mode_out_of_band_and_cached_tokens() -> None:
    script = _script(replies=["First scripted reply.", "Second one."])
    long_instructions = "Be helpful. " * 400  # > 1024 tokens: the prefix gets cached
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            update = copy.deepcopy(GA_SESSION_UPDATE)
            update["session"]["output_modalities"] = ["text"]
            update["session"]["instructions"] = long_instructions
            await c.send(update)
            await c.recv()
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            assert "response.output_text.delta" in c.types(events)
            assert not any("audio" in e["type"] for e in events if e["type"].startswith(
                "response."))
            done = events[-1]["response"]
            assert done["output_modalities"] == ["text"]
            assert done["output"][0]["content"] == [
                {"type": "output_text", "text": "First scripted reply."}]
            first_usage = done["usage"]
            assert first_usage["input_token_details"]["cached_tokens"] == 0

            await c.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "and again"}]}})
            assert (await c.recv_until("conversation.item.done"))[0]["previous_item_id"]
            await c.send({"type": "response.create", "response": {
                "conversation": "none", "metadata": {"purpose": "test"}}})
            events = await c.recv_until("response.done")
            done = events[-1]["response"]
            assert done["conversation_id"] is None and done["metadata"] == {"purpose": "test"}
            assert done["output"][0]["content"][0]["text"] == "Second one."
            assert "conversation.item.added" not in [e["type"] for e in events]
            cached = done["usage"]["input_token_details"]
            assert cached["cached_tokens"] > 1024 and cached["cached_tokens"] % 64 == 0
            assert cached["cached_tokens"] == sum(cached["cached_tokens_details"].values())
        assert [i["role"] for i in srv.connections[0].items] == ["user", "assistant", "user"]
        srv.assert_clean()


# --- beta and Azure --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_beta_dialect_turn() -> None:
    script = _script(user_transcripts=["hello there"])
    async with LocalRealtimeServer(script, api_key=KEY) as srv:
        async with await RealtimeTestClient.connect(srv.url, beta=True) as c:
            created = await c.recv()
            assert "modalities" in created["session"] and "type" not in created["session"]
            await c.send(BETA_SESSION_UPDATE)
            assert (await c.recv())["session"]["input_audio_transcription"] == {
                "model": "whisper-1"}
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            types = set(c.types(events))
            assert {"response.audio.delta", "response.audio_transcript.delta",
                    "response.audio.done", "response.audio_transcript.done",
                    "conversation.item.created"} <= types
            assert not {"response.output_audio.delta", "conversation.item.added"} & types
            item = events[-1]["response"]["output"][0]
            assert item["content"][0]["type"] == "audio"
            assert "cached_tokens_details" not in events[-1]["response"]["usage"][
                "input_token_details"]
            # A GA-shaped event is a violation on a beta connection.
            await c.send(GA_SESSION_UPDATE, validate=False)
            events = await c.recv_until("error")
            assert events[-1]["error"]["code"] == "unknown_parameter"
        assert srv.connections[0].dialect == "beta"
        assert [v.event_type for v in srv.violations] == ["session.update"]
        completed = srv.events("conversation.item.input_audio_transcription.completed")
        assert completed and completed[0]["usage"]["type"] == "duration"


@pytest.mark.asyncio
async def test_beta_rejected_when_ga_only() -> None:
    async with LocalRealtimeServer(_script(), reject_beta=True) as srv:
        async with await RealtimeTestClient.connect(srv.url, beta=True) as c:
            events = await c.recv_until_closed()
            assert events[0]["error"]["code"] == "beta_api_shape_disabled"
        assert srv.connections[0].close_code == 4000


@pytest.mark.asyncio
async def test_azure_path_and_api_key_header() -> None:
    async with LocalRealtimeServer(_script(), api_key=KEY) as srv:
        url = srv.azure_url("my-realtime-deployment")
        assert "/openai/v1/realtime?model=my-realtime-deployment" in url
        async with await RealtimeTestClient.connect(url, azure_api_key=True) as c:
            created = await c.recv()
            assert created["session"]["model"] == "my-realtime-deployment"
            await _user_turn(c)
            await c.send({"type": "response.create"})
            events = await c.recv_until("response.done")
            assert events[-1]["response"]["status"] == "completed"
        async with await RealtimeTestClient.connect(url) as c:  # Bearer works too
            assert (await c.recv())["type"] == "session.created"
        with pytest.raises(InvalidStatus) as info:
            await RealtimeTestClient.connect(url, api_key="wrong", azure_api_key=True)
        assert info.value.response.status_code == 401
        preview = srv.azure_preview_url("my-preview")
        async with await RealtimeTestClient.connect(preview, azure_api_key=True) as c:
            c.dialect = "beta"
            created = await c.recv()
            assert created["session"]["model"] == "gpt-4o-realtime-preview"
            assert srv.connections[-1].model == "my-preview"
        conn = srv.connections[0]
        assert conn.azure and conn.headers["api-key"] == "<redacted>"
        assert srv.connections[-1].dialect == "beta"
        srv.assert_clean()


# --- errors ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_invalid_events_land_in_violations() -> None:
    async with LocalRealtimeServer(_script()) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            await c.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "txt": "hi"}]}}, validate=False)
            err = await c.recv()
            assert err["error"]["type"] == "invalid_request_error"
            assert err["error"]["code"] == "unknown_parameter"
            assert err["error"]["param"] == "item.content.0.txt"
            await c.send({"type": "conversation.item.truncate", "item_id": "x",
                          "content_index": 0, "audio_end_ms": "late"}, validate=False)
            err = await c.recv()
            assert err["error"]["code"] == "invalid_value"
            assert err["error"]["param"] == "audio_end_ms"
            await c.send_raw("{not json")
            assert (await c.recv())["error"]["code"] == "invalid_json"
            with pytest.raises(EventCheckFailed):
                await c.send({"type": "session.update", "session": {"voice": "alloy"}})
        assert [v.event_type for v in srv.violations] == [
            "conversation.item.create", "conversation.item.truncate", "<invalid json>"]
        assert "txt" in str(srv.violations[0])
        assert srv.connections[0].items == []  # invalid events change nothing
        with pytest.raises(AssertionError, match="unknown field"):
            srv.assert_clean()


@pytest.mark.asyncio
async def test_wrong_api_key() -> None:
    secret = "sk-wrong-key-1234567890abcd"
    async with LocalRealtimeServer(_script(), api_key=KEY) as srv:
        async with await RealtimeTestClient.connect(srv.url, api_key=secret) as c:
            events = await c.recv_until_closed()
            assert [e["error"]["code"] for e in events] == ["invalid_api_key"]
            assert secret not in events[0]["error"]["message"]
            assert secret[-4:] in events[0]["error"]["message"]
        async with await RealtimeTestClient.connect(srv.url, api_key=None) as c:
            events = await c.recv_until_closed()
            assert [e["error"]["code"] for e in events] == ["missing_api_key"]
        assert srv.connections[0].close_code == 1008
        assert srv.connections[0].headers["Authorization"] == "<redacted>"
        assert not any(e["type"] == "session.created" for e in srv.events())


@pytest.mark.asyncio
async def test_wait_helpers_and_echo_mode() -> None:
    script = _script(echo_user_audio=True)
    async with LocalRealtimeServer(script) as srv:
        async with await RealtimeTestClient.connect(srv.url) as c:
            await c.recv()
            audio = b"".join(int(v).to_bytes(2, "little", signed=True)
                             for v in range(-2400, 2400))  # 200 ms ramp
            await c.append_audio(audio)
            commit = asyncio.ensure_future(srv.next_event("input_audio_buffer.commit"))
            await c.send({"type": "input_audio_buffer.commit"})
            assert (await commit)["type"] == "input_audio_buffer.commit"
            await c.send({"type": "response.create"})
            await srv.wait_for(lambda: bool(srv.events("response.done")), timeout=5)
            events = await c.recv_until("response.done")
            assert c.audio_of(events, "response.output_audio.delta") == audio
            with pytest.raises(TimeoutError, match="condition not met"):
                await srv.wait_for(lambda: False, timeout=0.05)
        srv.assert_clean()


def test_session_update_merges_deeply() -> None:
    async def run() -> None:
        async with LocalRealtimeServer(_script()) as srv:
            async with await RealtimeTestClient.connect(srv.url) as c:
                await c.recv()
                await c.send(GA_SESSION_UPDATE)
                await c.recv()
                update = copy.deepcopy(GA_SESSION_UPDATE)
                update["session"] = {"type": "realtime",
                                     "audio": {"output": {"speed": 1.2}}}
                await c.send(update)
                session = (await c.recv())["session"]
                assert session["audio"]["output"] == {
                    "format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin",
                    "speed": 1.2}
                assert session["audio"]["input"]["transcription"] == {
                    "model": "gpt-4o-mini-transcribe"}
                assert session["tools"][0]["name"] == "get_time"
            srv.assert_clean()

    asyncio.run(run())


def test_synth_is_deterministic_and_word_proportional() -> None:
    one = synth.synthesize("hello")
    assert one == synth.synthesize("hello")
    five = synth.synthesize("one two three four five")
    assert 4 * len(one) < len(five) < 6 * len(one)
    assert len(five) % 2 == 0
    assert base64.b64encode(five)
