"""Dialect codec tests: connection requests, client event shapes, server event normalising."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from daemon.config import ApiConfig, SessionConfig
from daemon.protocol import (
    FATAL_ERROR_CODES,
    Dialect,
    connection_request,
    error_fields,
    redact_headers,
)

KEY = "sk-test-0123456789"
TOOLS = [{"type": "function", "name": "get_time", "description": "time",
          "parameters": {"type": "object", "properties": {}}}]


def _extras(model: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(model, BaseModel):
        if model.model_extra:
            out.append(model.model_extra)
        for name in type(model).model_fields:
            out += _extras(getattr(model, name))
    elif isinstance(model, list):
        for x in model:
            out += _extras(x)
    return out


def _adapter(dialect: str) -> TypeAdapter[Any]:
    if dialect == "beta":
        from openai.types.beta.realtime import realtime_client_event as beta

        return TypeAdapter(beta.RealtimeClientEvent)
    from openai.types.realtime import RealtimeClientEvent

    return TypeAdapter(RealtimeClientEvent)


def all_client_events(d: Dialect) -> list[dict[str, Any]]:
    return [
        d.session_update(SessionConfig(), TOOLS),
        d.session_update(SessionConfig(noise_reduction="off", transcription_model="",
                                       output_modality="text"), []),
        d.append(b"\x01\x00\x02\x00"),
        d.commit(),
        d.clear(),
        d.response_create(),
        d.response_cancel(),
        d.truncate("item_1", 1234),
        d.delete("item_1"),
        d.function_call_output("call_1", '{"ok": true}'),
        d.text_item("user", "hello", "parley_1_1"),
        d.text_item("assistant", "hi"),
        d.text_item("system", "[tool x returned: y]"),
    ]


# --- connection requests --------------------------------------------------------------

def test_ga_request() -> None:
    url, headers = connection_request(ApiConfig(), KEY)
    assert url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert headers == {"Authorization": f"Bearer {KEY}"}


def test_beta_request_adds_beta_header() -> None:
    url, headers = connection_request(
        ApiConfig(dialect="beta", model="gpt-4o-realtime-preview"), KEY)
    assert url.endswith("?model=gpt-4o-realtime-preview")
    assert headers == {"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "realtime=v1"}


def test_azure_request_bearer_and_api_key() -> None:
    api = ApiConfig(dialect="azure", url="wss://res.openai.azure.com/openai/v1/realtime",
                    model="my-deploy")
    url, headers = connection_request(api, KEY)
    assert url == "wss://res.openai.azure.com/openai/v1/realtime?model=my-deploy"
    assert headers == {"Authorization": f"Bearer {KEY}"}
    url2, headers2 = connection_request(
        ApiConfig(dialect="azure", url=api.url, model="my deploy", azure_auth="api-key"), KEY)
    assert headers2 == {"api-key": KEY}
    assert url2.endswith("?model=my+deploy")
    assert "OpenAI-Beta" not in headers2


def test_request_with_existing_query_and_without_key() -> None:
    url, headers = connection_request(
        ApiConfig(url="ws://127.0.0.1:8765/v1/realtime?x=1"), "")
    assert url == "ws://127.0.0.1:8765/v1/realtime?x=1&model=gpt-realtime"
    assert headers == {}


def test_redact_headers() -> None:
    _url, headers = connection_request(ApiConfig(dialect="azure", azure_auth="api-key"), KEY)
    assert KEY not in json.dumps(redact_headers(headers))
    _url, headers = connection_request(ApiConfig(), KEY)
    assert redact_headers(headers) == {"Authorization": "<redacted>"}


# --- client events --------------------------------------------------------------------

@pytest.mark.parametrize("dialect", ["ga", "beta", "azure"])
def test_every_client_event_validates_against_official_types(dialect: str) -> None:
    d = Dialect(dialect)  # type: ignore[arg-type]
    adapter = _adapter("beta" if dialect == "beta" else "ga")
    for event in all_client_events(d):
        model = adapter.validate_python({**event, "event_id": "evt_1"})
        assert _extras(model) == [], event["type"]
        assert KEY not in json.dumps(event)


def test_ga_session_update_shape() -> None:
    ev = Dialect("ga").session_update(SessionConfig(voice="marin", speed=1.1), TOOLS)
    assert ev == {"type": "session.update", "session": {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": SessionConfig().instructions,
        "tools": TOOLS,
        "tool_choice": "auto",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000},
                      "transcription": {"model": "gpt-4o-mini-transcribe"},
                      "noise_reduction": {"type": "near_field"},
                      "turn_detection": None},
            "output": {"format": {"type": "audio/pcm", "rate": 24000},
                       "voice": "marin", "speed": 1.1}}}}


def test_azure_uses_ga_shapes() -> None:
    ga, az = Dialect("ga"), Dialect("azure")
    assert all_client_events(ga) == all_client_events(az)


def test_beta_session_update_is_flat() -> None:
    s = Dialect("beta").session_update(SessionConfig(noise_reduction="far_field"), TOOLS)["session"]
    assert "type" not in s and "audio" not in s
    assert s["modalities"] == ["text", "audio"]
    assert s["input_audio_format"] == "pcm16" and s["output_audio_format"] == "pcm16"
    assert s["input_audio_transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert s["input_audio_noise_reduction"] == {"type": "far_field"}
    assert s["turn_detection"] is None and s["voice"] == "marin"
    assert s["tools"] == TOOLS and s["tool_choice"] == "auto"


def test_text_items_per_dialect() -> None:
    ga, beta = Dialect("ga"), Dialect("beta")
    assert ga.text_item("assistant", "x")["item"]["content"] == [{"type": "output_text",
                                                                   "text": "x"}]
    assert beta.text_item("assistant", "x")["item"]["content"] == [{"type": "text", "text": "x"}]
    for d in (ga, beta):
        item = d.text_item("user", "y", "id1")["item"]
        assert item == {"type": "message", "role": "user", "id": "id1",
                        "content": [{"type": "input_text", "text": "y"}]}


def test_append_is_base64_pcm_and_truncate_shape() -> None:
    d = Dialect("ga")
    assert base64.b64decode(d.append(b"\x01\x02\x03\x04")["audio"]) == b"\x01\x02\x03\x04"
    assert d.truncate("it", 250) == {"type": "conversation.item.truncate", "item_id": "it",
                                     "content_index": 0, "audio_end_ms": 250}


# --- server events --------------------------------------------------------------------

def test_beta_server_names_are_normalised_to_ga() -> None:
    d = Dialect("beta")
    names = {
        "response.audio.delta": "response.output_audio.delta",
        "response.audio.done": "response.output_audio.done",
        "response.audio_transcript.delta": "response.output_audio_transcript.delta",
        "response.audio_transcript.done": "response.output_audio_transcript.done",
        "response.text.delta": "response.output_text.delta",
        "response.text.done": "response.output_text.done",
        "conversation.item.created": "conversation.item.created",
        "error": "error",
    }
    for beta_name, ga_name in names.items():
        assert d.decode({"type": beta_name, "x": 1}) == {"type": ga_name, "x": 1}


def test_beta_content_types_are_normalised() -> None:
    d = Dialect("beta")
    ev = d.decode({"type": "response.done", "response": {"id": "r", "output": [
        {"type": "message", "role": "assistant",
         "content": [{"type": "audio", "transcript": "t"}, {"type": "text", "text": "u"}]}]}})
    assert [p["type"] for p in ev["response"]["output"][0]["content"]] == [
        "output_audio", "output_text"]
    part = d.decode({"type": "response.content_part.added", "part": {"type": "audio"}})
    assert part["part"]["type"] == "output_audio"
    user = d.decode({"type": "conversation.item.created", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_audio"}]}})
    assert user["item"]["content"][0]["type"] == "input_audio"


def test_ga_events_pass_through_and_json_is_parsed() -> None:
    d = Dialect("ga")
    ev = {"type": "response.output_audio.delta", "delta": "AAA=", "item_id": "i"}
    assert d.decode(ev) == ev
    assert d.decode(json.dumps(ev)) == ev
    assert d.decode({"type": "response.audio.delta"})["type"] == "response.audio.delta"


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"no": "type"}', {"type": 3}])
def test_malformed_server_messages_raise_value_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        Dialect("ga").decode(bad)


def test_error_fields_and_fatal_codes() -> None:
    ev = {"type": "error", "error": {"type": "invalid_request_error", "code": "session_expired",
                                     "message": "Your session hit the maximum duration",
                                     "event_id": "p1_3"}}
    assert error_fields(ev) == ("session_expired", "Your session hit the maximum duration",
                                "p1_3")
    assert error_fields({"type": "error"}) == ("", "", "")
    assert {"invalid_api_key", "insufficient_quota", "account_deactivated",
            "billing_hard_limit_reached"} <= FATAL_ERROR_CODES
    assert "session_expired" not in FATAL_ERROR_CODES
    assert "response_cancel_not_active" not in FATAL_ERROR_CODES
