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

Standalone: ``python -m daemon.localserver --port 8765``.
"""

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
]
