"""A local stand-in for the OpenAI Realtime API, for tests and ``make demo``.

It speaks the GA protocol (``/v1/realtime?model=...``), the legacy beta dialect (header
``OpenAI-Beta: realtime=v1``, or ``dialect="beta"``) and the Azure URL forms
(``/openai/v1/realtime?model=<deployment>``, preview ``/openai/realtime?deployment=...``),
validates every client event against the official ``openai`` types (see
:mod:`daemon.eventcheck`), answers each user turn with a scripted reply spoken by a small
synthesizer, and can misbehave on cue (see :class:`Script`, :class:`Fault`,
:class:`InjectError`).

In-process::

    async with LocalRealtimeServer(script=Script(user_transcripts=["hi"])) as srv:
        ... connect to srv.url ...
        await srv.next_event("response.create")
        srv.assert_clean()

Standalone: ``python -m daemon.localserver --port 8765`` (``--help`` for the options; the
expected API key comes from an environment variable named by ``--api-key-env``).

Misbehaviour on cue (per server, per connection index, per turn):

* ``Script.expire_after_s``: ``error session_expired`` ("Your session hit the maximum
  duration of N minutes.") then close 1001; ``RealtimeConnection.expire()`` does it now.
* ``Fault("drop" | "stall" | "close", at="response" | "connect", after_deltas=K, turn=T,
  connection=C)``: abort TCP without a close frame; stop reading and sending (half-open:
  the transport's reading is paused, so client pings get no pong and nothing is answered;
  the server's own keepalive pings are off by default); or a clean close with a code.
  ``RealtimeConnection.drop()`` / ``.stall()`` / ``.close(code)`` act at once.
* ``InjectError(code, message, on="connect" | "session.created" | <client event type>,
  close_code=...)``: e.g. a fatal ``insufficient_quota`` instead of ``session.created``.
* ``refuse_first=N`` with ``refuse_with="http"`` (HTTP ``refuse_status``, 503 by default),
  ``"close"`` (handshake, then close 1013) or ``"abort"`` (handshake, then TCP abort).
* ``delay_session_created_s``, ``response_delay_s``; ``transcription_fails``.
* Wrong or missing API key: OpenAI paths get ``error invalid_api_key`` (or
  ``missing_api_key``) and close 1008; Azure paths get HTTP 401 at the handshake.
* ``reject_beta=True`` (or ``dialect="ga"``): a beta client gets
  ``beta_api_shape_disabled`` and close 4000, like OpenAI today.

Known deviations from the real API (inferences are marked in the code):

* No voice activity detection: turn detection settings are stored and echoed, never acted
  on. A commit or response.create while it is still on is logged in ``server.warnings``.
* Transcription sessions (``session.type: "transcription"``, beta
  ``transcription_session.update``) and ``output_audio_buffer.clear`` (WebRTC/SIP only)
  are answered with an ``invalid_value`` error. MCP tools, images and a
  ``response.create`` ``input`` list are accepted but ignored; ``conversation: "none"``
  keeps the reply out of the conversation, any other value means the default one.
* Error codes and messages are the real ones where known (commit_empty, active response,
  cancel_not_active, session_expired, invalid_api_key, unknown_parameter,
  missing_required_parameter, "Audio content of X ms is already shorter than Y ms",
  "Only model output audio messages can be truncated"); ``item_not_found``,
  ``previous_item_not_found``, ``item_id_already_exists``, ``invalid_json`` and the
  close codes 1008 (bad key) and 1013 (refusal) are plausible guesses.
* On ``response.cancel`` the server still sends the audio/transcript/part/item ``.done``
  events (item status ``incomplete``) before ``response.done``; the real ordering is not
  documented.
* A truncated item's transcript becomes ``""`` (the documented behaviour); the words
  heard are kept in ``server.truncations[].heard`` for tests.
* Token usage uses rules of thumb (input audio 1 token/100 ms, output audio 1 token/50 ms,
  text 4 characters/token, caching of a >= 1024-token prefix in 64-token blocks); the
  ``rate_limits`` numbers are fixed.
* The server announces ``expires_at`` from ``session_minutes`` but only ends a session
  when ``expire_after_s`` says so.
"""

from daemon.localserver import synth
from daemon.localserver.script import Fault, InjectError, Script, TurnContext
from daemon.localserver.server import (
    ApiError,
    LocalRealtimeServer,
    LogEntry,
    RealtimeConnection,
    Truncation,
    TurnRecord,
)

__all__ = [
    "ApiError",
    "Fault",
    "InjectError",
    "LocalRealtimeServer",
    "LogEntry",
    "RealtimeConnection",
    "Script",
    "Truncation",
    "TurnContext",
    "TurnRecord",
    "synth",
]
