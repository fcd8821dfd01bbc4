"""`make demo`: the real daemon on simulated hardware, a scripted conversation, narrated.

Runs `parley run` as a child process (as systemd would) with a fake I2S mic and speaker
(alsa-lib plugins), the mock button pressed through the control socket, and the local
Realtime server; plays several turns, a tool call, an interrupt and a session rotation
with a shortened interval, and prints what happens as it happens.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

from daemon.localserver import LocalRealtimeServer, Script
from daemon.simulator import SimulatedDevice

REPO = Path(__file__).resolve().parent.parent

TURNS = [
    "What is the capital of France?",
    "What time is it?",
    "Tell me a long story about a lighthouse keeper.",
    "Stop. Tell me a joke instead.",
    "What did I ask you first?",
    "Thanks, that is all.",
]
REPLIES = [
    "Paris is the capital of France.",
    "",
    "Once upon a time a lighthouse keeper lived alone on a rock far out at sea. Every "
    "evening she climbed the hundred and twelve steps to light the great lamp, and every "
    "morning she wrote one line in the logbook about the ships she had seen.",
    "Why did the lighthouse keeper never get lonely? Because the ships kept dropping by.",
    "Your first question was about the capital of France.",
    "You are welcome. Goodbye!",
]
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<msg>.*)$")
SHOWN_LOGGERS = ("daemon.app", "daemon.service", "daemon.engine")


class Narrator:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def daemon_log(self, line: str) -> None:
        match = LOG_LINE.match(line)
        if match is None:
            print(f"           daemon │ {line}", flush=True)
            return
        level, logger, msg = match["level"], match["logger"], match["msg"]
        if level in ("WARNING", "ERROR", "CRITICAL") or logger in SHOWN_LOGGERS:
            msg = re.sub(r" (turn_id|session_id|conn_id|tokens|offline_s)=\S+", "", msg)
            tag = "" if level == "INFO" else f"{level}: "
            print(f"           daemon │ {tag}{msg}", flush=True)


def _first_append_after(server: LocalRealtimeServer, t_press: float) -> float | None:
    """Seconds from a press (demo clock) to the first audio append the server received."""
    for entry in server.log:
        if entry.type != "input_audio_buffer.append":
            continue
        at = server._t0 + entry.t  # the server stamps events relative to its start
        if at >= t_press:
            return at - t_press
    return None


async def _turn(dev: SimulatedDevice, n: Narrator, text: str) -> float | None:
    n.say(f'press · "{text}" · release')
    t_press = time.monotonic()
    await dev.say(text)
    status = await dev.wait_idle(timeout=60)
    gap = _first_append_after(dev.server, t_press)
    latency = status.get("last_turn_latency_ms")
    n.say(
        f"idle again · release→first reply audio {latency} ms · "
        f"press→first audio sent {gap * 1000:.0f} ms · "
        f"today {status['turns_today']} turns, "
        f"{status['tokens_today']['input']}+{status['tokens_today']['output']} tokens, "
        f"${status['cost_today_usd']:.4f}"
        if gap is not None else "idle again"
    )
    return gap


async def run_demo(workdir: Path, rotate_after_min: float) -> int:
    n = Narrator()
    script = Script(
        user_transcripts=TURNS,
        replies=REPLIES,
        function_calls={1: [("get_time", {})]},
        realtime_factor=2.0,
        # A slow session start makes the rotation's preparation visible, so the demo can
        # press while it is under way and show the press is not delayed.
        delay_session_created_s=1.0,
    )
    dev = SimulatedDevice(
        workdir, script,
        config={"session": {"rotate_after_min": rotate_after_min}},
        on_log=n.daemon_log,
    )
    print("parley demo — the real daemon (`parley run`) on simulated hardware\n")
    await dev.start(wait_ready=False)
    print(f"  Realtime server  {dev.server.base_url} (local; GA protocol; every client event"
          " validated against the official openai types)")
    print("  microphone       fakemic: FIFO → alsa-lib file plugin, 48 kHz S32_LE stereo,"
          " fed in real time")
    print(f"  speaker          fakespk: parley's paced ALSA plugin → {dev.speaker_raw}")
    print("  button           mock, pressed through the control socket (`parley ctl press`)")
    print(f"  config           {dev.config_path}")
    print(f"  rotation         every {rotate_after_min * 60:.0f} s (shortened from 30 min)\n")
    await dev.wait_notified("READY", timeout=30)
    ready_at = dev.notified("READY")[0].at
    await dev.wait_until(
        lambda: any(m.at >= ready_at for m in dev.notified("STATUS")), 10, "STATUS"
    )
    status_line = next(m for m in dev.notified("STATUS") if m.at >= ready_at).fields["STATUS"]
    n.say(f"systemd notified READY=1 · STATUS={status_line}")

    gaps: dict[str, float | None] = {}
    try:
        gaps["normal"] = await _turn(dev, n, TURNS[0])
        await _turn(dev, n, TURNS[1])

        n.say(f'press · "{TURNS[2]}" · release')
        await dev.say(TURNS[2])
        await dev.wait_status(lambda s: s.get("state") == "speaking", timeout=30)
        await asyncio.sleep(2.5)
        n.say("interrupting the story mid-sentence")
        await _turn(dev, n, TURNS[3])
        for trunc in dev.server.truncations:
            n.say(f"server truncated the story to {trunc.audio_end_ms} ms of "
                  f"{trunc.audio_ms} ms — what was actually played; heard: “{trunc.heard}”")

        n.say("waiting for the session rotation to start …")
        await dev.wait_status(lambda s: s.get("standby") is not None, timeout=120)
        n.say("a fresh session is being prepared in the background — pressing right now")
        gaps["during rotation"] = await _turn(dev, n, TURNS[4])
        status = await dev.wait_status(lambda s: s.get("rotation_count", 0) >= 1, timeout=60)
        n.say(f"switched to the fresh session {status['session_id']} at an idle moment "
              f"(rotation {status['rotation_count']})")
        await _turn(dev, n, TURNS[5])
    finally:
        history = (await dev.ctl("history", n=50)).get("history", []) if dev.process else []
        status_now = await dev.status()
        code, took = await dev.stop()
    n.say(f"SIGTERM → exit code {code} after {took:.2f} s "
          f"(STOPPING=1 sent: {bool(dev.notified('STOPPING'))})")

    print("\nConversation history (kept in SQLite, re-seeded into every new session):")
    for item in history:
        mark = " [interrupted]" if item.get("interrupted") else ""
        name = f" {item['name']}" if item.get("name") else ""
        print(f"  {item['role']:>11}{name}: {item['text']}{mark}")

    print("\nEvent flow of the rotation (local server's log; acknowledgements and deltas"
          " folded):")
    for line in _rotation_flow(dev.server):
        print(f"  {line}")

    print("\nPress → first audio sent to the server:")
    for label, gap in gaps.items():
        print(f"  {label:>16}: {'—' if gap is None else f'{gap * 1000:.0f} ms'}")
    print(f"\nTokens today: {status_now['tokens_today']}, cost ${status_now['cost_today_usd']:.4f}")
    wav = dev.speaker_wav(workdir / "speaker.wav")
    print(f"Speaker output (48 kHz stereo): {wav}")
    problems = [str(v) for v in dev.server.violations]
    print(f"Client events validated: {sum(len(r) for r in dev.server.received)}, "
          f"violations: {len(problems)}")
    ok = code == 0 and not problems and dev.server.truncations and status_now.get(
        "rotation_count", 0) >= 1
    print("\ndemo " + ("finished" if ok else "FAILED"))
    return 0 if ok else 1


# Acknowledgements and stream bookkeeping, left out of the printed flow for brevity.
_QUIET = frozenset({
    "conversation.item.added", "conversation.item.done", "rate_limits.updated",
    "response.output_item.added", "response.output_item.done", "response.content_part.added",
    "response.content_part.done", "response.output_audio.done",
    "response.output_audio_transcript.done", "input_audio_buffer.committed",
})


def _rotation_flow(server: LocalRealtimeServer) -> list[str]:
    """Everything on the wire from the second session's birth to the first audio sent on
    it: its set-up and re-seeding, what the old session did meanwhile, the switch."""
    entries = server.log
    first = next((i for i, e in enumerate(entries) if e.connection == 1), None)
    if first is None:
        return ["(no rotation happened)"]
    lines: list[str] = []
    run_key: tuple[int, str, str] | None = None
    run_start = 0.0
    count = 0

    def flush() -> None:
        if run_key is not None:
            conn, direction, etype = run_key
            arrow = "->" if direction == "client" else "<-"
            times = f" x{count}" if count > 1 else ""
            lines.append(f"{run_start:8.3f} s  session {conn + 1} {arrow} {etype}{times}")

    for entry in entries[first:]:
        if entry.type.endswith(".delta") or entry.type in _QUIET:
            continue
        key = (entry.connection, entry.direction, entry.type)
        if key != run_key:
            flush()
            run_key, run_start, count = key, entry.t, 0
        count += 1
        if entry.connection == 1 and entry.type == "input_audio_buffer.append":
            break
    flush()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO / "demo-out")
    parser.add_argument("--rotate-after-min", type=float, default=0.6)
    args = parser.parse_args(argv)
    workdir: Path = args.workdir
    rotate: float = args.rotate_after_min
    return asyncio.run(run_demo(workdir, rotate))


if __name__ == "__main__":
    sys.exit(main())
