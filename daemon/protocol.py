"""Realtime API dialects: build client events, normalise server events. Pure functions, no I/O.

Three dialects are supported:

``ga``     OpenAI GA Realtime (default): nested ``session`` shape (``type: realtime``,
           ``audio.input`` / ``audio.output``), ``response.output_audio.*`` event names,
           ``output_text`` assistant content.
``azure``  Azure OpenAI GA: the GA event shapes; only the connection request differs
           (deployment name as ``model``, ``Authorization: Bearer`` or ``api-key`` header).
``beta``   Legacy preview: flat session shape (``input_audio_format: pcm16``, ``modalities``,
           ``voice``...), ``response.audio.*`` names, ``text`` assistant content, and the
           ``OpenAI-Beta: realtime=v1`` header.

Server events are normalised to GA names and content types on the way in
(:meth:`Dialect.decode`), so the engine only ever sees GA shapes. Client events are built
here (:class:`Dialect`) already in the dialect's shape.

The API key only ever goes into the headers returned by :func:`connection_request`; no
event built here carries it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from daemon.config import ApiConfig, SessionConfig

Event = dict[str, Any]

SAMPLE_RATE = 24000
"""PCM16 mono sample rate of both directions."""
BYTES_PER_SAMPLE = 2

# Beta server event names -> GA names.
_BETA_EVENT_NAMES: dict[str, str] = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
}
# Beta content part types -> GA (assistant side only; user parts keep input_*).
_BETA_CONTENT_TYPES: dict[str, str] = {"audio": "output_audio", "text": "output_text"}

FATAL_ERROR_CODES: frozenset[str] = frozenset(
    {
        "invalid_api_key",
        "insufficient_quota",
        "account_deactivated",
        "billing_hard_limit_reached",
        # OpenAI rejects the legacy beta shape for good: retrying cannot fix it.
        "beta_api_shape_disabled",
    }
)


def connection_request(api: ApiConfig, api_key: str) -> tuple[str, dict[str, str]]:
    """URL and headers for the WebSocket handshake.

    ``api.url`` is the endpoint without ``?model=``; the model (Azure: the deployment) is
    appended as a query parameter. An empty ``api_key`` sends no auth header (local proxy).
    """
    query = urlencode({"model": api.model})
    sep = "&" if urlsplit(api.url).query else "?"
    url = f"{api.url}{sep}{query}"
    headers: dict[str, str] = {}
    if api.dialect == "azure" and api.azure_auth == "api-key":
        if api_key:
            headers["api-key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if api.dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    return url, headers


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers safe to log: credentials replaced by ``<redacted>``."""
    secret = {"authorization", "api-key"}
    return {k: ("<redacted>" if k.lower() in secret else v) for k, v in headers.items()}


def pcm_to_b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode("ascii")


def b64_to_pcm(data: str) -> bytes:
    return base64.b64decode(data)


class Dialect:
    """Encoder/decoder of one dialect. Stateless apart from the dialect name."""

    def __init__(self, name: Literal["ga", "beta", "azure"]) -> None:
        self.name = name
        self.beta = name == "beta"

    # --- client events ----------------------------------------------------------------

    def session_update(self, session: SessionConfig, tools: Sequence[Mapping[str, Any]]) -> Event:
        """The ``session.update`` configuring a push-to-talk session (turn detection off)."""
        tool_list = [dict(t) for t in tools]
        transcription: dict[str, Any] | None = (
            {"model": session.transcription_model} if session.transcription_model else None
        )
        noise: dict[str, Any] | None = (
            None if session.noise_reduction == "off" else {"type": session.noise_reduction}
        )
        body: dict[str, Any]
        if self.beta:
            body = {
                "modalities": ["text", "audio"] if session.output_modality == "audio" else ["text"],
                "instructions": session.instructions,
                "voice": session.voice,
                "speed": session.speed,
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": transcription,
                "input_audio_noise_reduction": noise,
                "turn_detection": None,
                "tools": tool_list,
                "tool_choice": "auto",
            }
        else:
            fmt = {"type": "audio/pcm", "rate": SAMPLE_RATE}
            body = {
                "type": "realtime",
                "output_modalities": [session.output_modality],
                "instructions": session.instructions,
                "tools": tool_list,
                "tool_choice": "auto",
                "audio": {
                    "input": {
                        "format": dict(fmt),
                        "transcription": transcription,
                        "noise_reduction": noise,
                        "turn_detection": None,
                    },
                    "output": {"format": dict(fmt), "voice": session.voice, "speed": session.speed},
                },
            }
        return {"type": "session.update", "session": body}

    def append(self, pcm: bytes) -> Event:
        return {"type": "input_audio_buffer.append", "audio": pcm_to_b64(pcm)}

    def commit(self) -> Event:
        return {"type": "input_audio_buffer.commit"}

    def clear(self) -> Event:
        return {"type": "input_audio_buffer.clear"}

    def response_create(self) -> Event:
        return {"type": "response.create"}

    def response_cancel(self) -> Event:
        return {"type": "response.cancel"}

    def truncate(self, item_id: str, audio_end_ms: int) -> Event:
        return {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": audio_end_ms,
        }

    def delete(self, item_id: str) -> Event:
        return {"type": "conversation.item.delete", "item_id": item_id}

    def function_call_output(self, call_id: str, output: str) -> Event:
        return {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": call_id, "output": output},
        }

    def text_item(
        self, role: Literal["user", "assistant", "system"], text: str, item_id: str | None = None
    ) -> Event:
        """A text message item (history re-seeding). ``item_id`` is client-chosen (≤ 32 chars)."""
        beta_or_ga = "text" if self.beta else "output_text"
        ctype = beta_or_ga if role == "assistant" else "input_text"
        item: dict[str, Any] = {
            "type": "message",
            "role": role,
            "content": [{"type": ctype, "text": text}],
        }
        if item_id is not None:
            item["id"] = item_id
        return {"type": "conversation.item.create", "item": item}

    # --- server events ----------------------------------------------------------------

    def decode(self, raw: str | bytes | Mapping[str, Any]) -> Event:
        """A server message (JSON text or an already-parsed dict) normalised to GA names.

        Raises ``ValueError`` for a message that is not a JSON object with a string ``type``.
        """
        if isinstance(raw, (str, bytes)):
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"server message is not JSON: {exc.msg}") from None
        else:
            parsed = raw
        if not isinstance(parsed, Mapping) or not isinstance(parsed.get("type"), str):
            raise ValueError("server message is not an event object with a 'type'")
        event = dict(parsed)
        if not self.beta:
            return event
        event["type"] = _BETA_EVENT_NAMES.get(event["type"], event["type"])
        if event["type"] in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, Mapping):
                event["item"] = _normalise_item(item)
        elif event["type"] in ("response.content_part.added", "response.content_part.done"):
            part = event.get("part")
            if isinstance(part, Mapping):
                event["part"] = _normalise_part(part)
        elif event["type"] in (
            "conversation.item.created",
            "conversation.item.added",
            "conversation.item.done",
        ):
            item = event.get("item")
            if isinstance(item, Mapping):
                event["item"] = _normalise_item(item)
        elif event["type"] == "response.done":
            response = event.get("response")
            if isinstance(response, Mapping):
                response = dict(response)
                output = response.get("output")
                if isinstance(output, list):
                    response["output"] = [
                        _normalise_item(i) if isinstance(i, Mapping) else i for i in output
                    ]
                event["response"] = response
        return event


def _normalise_part(part: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(part)
    ptype = out.get("type")
    if isinstance(ptype, str) and ptype in _BETA_CONTENT_TYPES:
        out["type"] = _BETA_CONTENT_TYPES[ptype]
    return out


def _normalise_item(item: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(item)
    if out.get("role") == "assistant" and isinstance(out.get("content"), list):
        out["content"] = [
            _normalise_part(p) if isinstance(p, Mapping) else p for p in out["content"]
        ]
    return out


def error_fields(event: Mapping[str, Any]) -> tuple[str, str, str]:
    """(code, message, client event_id) of an ``error`` event; missing parts are ''."""
    err = event.get("error")
    if not isinstance(err, Mapping):
        return "", "", ""
    code = err.get("code") or err.get("type") or ""
    message = err.get("message") or ""
    event_id = err.get("event_id") or ""
    return str(code), str(message), str(event_id)
