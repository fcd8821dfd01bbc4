"""Server event and object shapes of the GA and legacy beta Realtime dialects."""

from __future__ import annotations

import copy
import math
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

Dialect = Literal["ga", "beta"]

_ALPHABET = string.ascii_letters + string.digits

GA_DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. "
    "Your voice and personality should be warm and engaging."
)


BETA_MODELS = frozenset({
    "gpt-realtime",
    "gpt-realtime-2025-08-28",
    "gpt-4o-realtime-preview",
    "gpt-4o-realtime-preview-2024-10-01",
    "gpt-4o-realtime-preview-2024-12-17",
    "gpt-4o-realtime-preview-2025-06-03",
    "gpt-4o-mini-realtime-preview",
    "gpt-4o-mini-realtime-preview-2024-12-17",
})


def new_id(prefix: str) -> str:
    """An id like the real API's: ``item_`` + 21 random letters and digits."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(21))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``: dicts recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Names:
    """Event names that differ between dialects."""

    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str
    text_delta: str
    text_done: str


GA_NAMES = Names(
    audio_delta="response.output_audio.delta",
    audio_done="response.output_audio.done",
    transcript_delta="response.output_audio_transcript.delta",
    transcript_done="response.output_audio_transcript.done",
    text_delta="response.output_text.delta",
    text_done="response.output_text.done",
)
BETA_NAMES = Names(
    audio_delta="response.audio.delta",
    audio_done="response.audio.done",
    transcript_delta="response.audio_transcript.delta",
    transcript_done="response.audio_transcript.done",
    text_delta="response.text.delta",
    text_done="response.text.done",
)


def names(dialect: Dialect) -> Names:
    return GA_NAMES if dialect == "ga" else BETA_NAMES


def default_session(
    dialect: Dialect, session_id: str, model: str, expires_at: int
) -> dict[str, Any]:
    """The session object of ``session.created`` (server defaults, VAD on like the real API)."""
    if dialect == "ga":
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": ["audio"],
            "instructions": GA_DEFAULT_INSTRUCTIONS,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": expires_at,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.5,
                        "prefix_padding_ms": 300,
                        "silence_duration_ms": 200,
                        "idle_timeout_ms": None,
                        "create_response": True,
                        "interrupt_response": True,
                    },
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "voice": "marin",
                    "speed": 1.0,
                },
            },
            "include": None,
        }
    return {
        "id": session_id,
        "object": "realtime.session",
        # The beta session names one of a fixed set of models; an Azure deployment name
        # (any string) stands for the model behind it.
        "model": model if model in BETA_MODELS else "gpt-4o-realtime-preview",
        "expires_at": expires_at,
        "modalities": ["text", "audio"],
        "instructions": GA_DEFAULT_INSTRUCTIONS,
        "voice": "alloy",
        "input_audio_format": "pcm16",
        "output_audio_format": "pcm16",
        "input_audio_transcription": None,
        "input_audio_noise_reduction": None,
        "turn_detection": {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 200,
            "create_response": True,
            "interrupt_response": True,
        },
        "tools": [],
        "tool_choice": "auto",
        "temperature": 0.8,
        "max_response_output_tokens": "inf",
        "speed": 1.0,
        "tracing": None,
    }


def transcription_config(session: dict[str, Any], dialect: Dialect) -> dict[str, Any] | None:
    if dialect == "ga":
        audio = session.get("audio") or {}
        cfg = (audio.get("input") or {}).get("transcription")
    else:
        cfg = session.get("input_audio_transcription")
    return cfg if isinstance(cfg, dict) else None


def output_modalities(session: dict[str, Any], dialect: Dialect) -> list[str]:
    key = "output_modalities" if dialect == "ga" else "modalities"
    value = session.get(key)
    return list(value) if isinstance(value, list) else ["audio"]


def tool_names(session: dict[str, Any]) -> set[str]:
    return {
        str(t.get("name"))
        for t in session.get("tools") or []
        if isinstance(t, dict) and t.get("type", "function") == "function"
    }


def voice(session: dict[str, Any], dialect: Dialect) -> str:
    if dialect == "ga":
        out = ((session.get("audio") or {}).get("output")) or {}
        return str(out.get("voice") or "marin")
    return str(session.get("voice") or "alloy")


def user_audio_item(
    item_id: str, dialect: Dialect, transcript: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }


def assistant_item(
    item_id: str, status: str, content: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def assistant_content(dialect: Dialect, audio: bool, text: str) -> dict[str, Any]:
    """One content entry of an assistant message (no audio bytes)."""
    if audio:
        return {"type": "output_audio" if dialect == "ga" else "audio", "transcript": text}
    return {"type": "output_text" if dialect == "ga" else "text", "text": text}


def content_part(audio: bool, text: str) -> dict[str, Any]:
    """The ``part`` of response.content_part.added/done (both dialects use text/audio)."""
    if audio:
        return {"type": "audio", "transcript": text}
    return {"type": "text", "text": text}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "name": name,
        "call_id": call_id,
        "arguments": arguments,
    }


def response_object(
    dialect: Dialect,
    *,
    response_id: str,
    conversation_id: str | None,
    status: str,
    session: dict[str, Any],
    modalities: list[str],
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    status_details: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "object": "realtime.response",
        "id": response_id,
        "status": status,
        "status_details": status_details,
        "output": output,
        "conversation_id": conversation_id,
        "usage": usage,
        "metadata": metadata,
    }
    if dialect == "ga":
        obj["output_modalities"] = modalities
        obj["max_output_tokens"] = session.get("max_output_tokens", "inf")
        obj["audio"] = {
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": voice(session, "ga"),
            }
        }
    else:
        obj["modalities"] = modalities
        obj["max_output_tokens"] = session.get("max_response_output_tokens", "inf")
        obj["voice"] = voice(session, "beta")
        obj["output_audio_format"] = session.get("output_audio_format", "pcm16")
        obj["temperature"] = session.get("temperature", 0.8)
    return obj


# --- token accounting -------------------------------------------------------------------
# Rates are the public rules of thumb: input audio 1 token per 100 ms, output audio 1 token
# per 50 ms, text about 4 characters per token. Caching follows the prompt-caching rule:
# a prefix of at least 1024 tokens, counted in 64-token blocks.


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def input_audio_tokens(ms: int) -> int:
    return math.ceil(ms / 100)


def output_audio_tokens(ms: int) -> int:
    return math.ceil(ms / 50)


@dataclass
class Usage:
    in_text: int = 0
    in_audio: int = 0
    out_text: int = 0
    out_audio: int = 0
    cached_text: int = 0
    cached_audio: int = 0

    @property
    def input_tokens(self) -> int:
        return self.in_text + self.in_audio

    @property
    def output_tokens(self) -> int:
        return self.out_text + self.out_audio

    def to_json(self, dialect: Dialect) -> dict[str, Any]:
        cached = self.cached_text + self.cached_audio
        details: dict[str, Any] = {
            "text_tokens": self.in_text,
            "audio_tokens": self.in_audio,
            "cached_tokens": cached,
        }
        if dialect == "ga":
            details["image_tokens"] = 0
            details["cached_tokens_details"] = {
                "text_tokens": self.cached_text,
                "audio_tokens": self.cached_audio,
                "image_tokens": 0,
            }
        return {
            "total_tokens": self.input_tokens + self.output_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "input_token_details": details,
            "output_token_details": {"text_tokens": self.out_text, "audio_tokens": self.out_audio},
        }
