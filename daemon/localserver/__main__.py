"""Run the local Realtime server standalone: ``python -m daemon.localserver --port 8765``.

The API key it expects is read from an environment variable (``--api-key-env``), never
from the command line, so it does not show up in ``ps``. Stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from daemon.localserver.script import Fault, Script
from daemon.localserver.server import LocalRealtimeServer

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m daemon.localserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--dialect", choices=("auto", "ga", "beta"), default="auto",
                   help="auto: beta if the client sends 'OpenAI-Beta: realtime=v1'")
    p.add_argument("--model", default="gpt-realtime")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="check clients' key against this environment variable")
    p.add_argument("--no-strict", action="store_true",
                   help="run without the openai package (no event validation)")
    p.add_argument("--reject-beta", action="store_true",
                   help="answer beta clients with beta_api_shape_disabled, like OpenAI today")
    p.add_argument("--realtime-factor", type=float, default=1.0,
                   help="audio pacing: N times real time (0: unpaced)")
    p.add_argument("--delta-ms", type=int, default=40)
    p.add_argument("--user-transcript", action="append", default=[], metavar="TEXT",
                   help="scripted user transcript for the next turn (repeatable)")
    p.add_argument("--reply", action="append", default=[], metavar="TEXT",
                   help="scripted assistant reply for the next turn (repeatable)")
    p.add_argument("--echo", action="store_true", help="reply with the user's own audio")
    p.add_argument("--transcription-delay", type=float, default=0.3, metavar="S")
    p.add_argument("--session-minutes", type=int, default=60)
    p.add_argument("--expire-after", type=float, default=None, metavar="S",
                   help="end every session with session_expired after S seconds")
    p.add_argument("--refuse-first", type=int, default=0, metavar="N",
                   help="answer the first N connection attempts with HTTP 503")
    p.add_argument("--drop-after-deltas", type=int, default=None, metavar="K",
                   help="abort TCP once, after K audio deltas of the first reply")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def _serve(args: argparse.Namespace) -> int:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: environment variable {args.api_key_env} is empty", file=sys.stderr)
            return 2
    faults: list[Fault] = []
    if args.drop_after_deltas is not None:
        faults.append(Fault("drop", after_deltas=args.drop_after_deltas))
    script = Script(
        user_transcripts=args.user_transcript,
        replies=args.reply or None,
        echo_user_audio=args.echo,
        realtime_factor=args.realtime_factor,
        delta_ms=args.delta_ms,
        transcription_delay_s=args.transcription_delay,
        session_minutes=args.session_minutes,
        expire_after_s=args.expire_after,
        refuse_first=args.refuse_first,
        faults=faults,
    )
    server = LocalRealtimeServer(
        script,
        host=args.host,
        port=args.port,
        api_key=api_key,
        dialect=args.dialect,
        strict=not args.no_strict,
        model=args.model,
        reject_beta=args.reject_beta,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"local Realtime server: {server.url}", flush=True)
        await stop.wait()
    if server.violations:
        print(f"{len(server.violations)} invalid client event(s):", file=sys.stderr)
        for v in server.violations:
            print(f"  {v}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # websockets logs request headers (with Authorization) at DEBUG: never go below INFO.
    logging.getLogger("websockets").setLevel(logging.INFO)
    logging.getLogger("daemon.localserver.server.ws").setLevel(logging.INFO)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
