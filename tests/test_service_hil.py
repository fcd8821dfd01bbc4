"""Hardware-in-the-loop service tests: the real daemon process on simulated hardware.

What runs for real: the daemon itself as a child process (``python -m daemon.cli run
--config ...``, as systemd starts it), alsa-lib and pyalsaaudio with parley's ALSA
backends (capture/playback threads, resampler, pre-roll, fade), the mock push-to-talk
button's whole gpiozero code path (debounce, min/max press), the control socket,
SQLite history and usage, the WebSocket client (``websockets``) and the sd_notify code.

What is simulated (see :mod:`daemon.simulator`): the sound card — a FIFO-fed ``file``
PCM as the mic (paced in real time, fed synthesized speech) and parley's paced
``parleyfault`` PCM as the speaker, which appends to a file exactly what its clock has
"played" (never what was dropped); the finger, pressing the mock button through the
control socket; the OpenAI Realtime API, replaced by the local server in this process
(which validates every client event against the official ``openai`` types:
``assert_clean`` at the end of every test); and systemd, replaced by a fake
``NOTIFY_SOCKET`` recording READY/STATUS/WATCHDOG/RELOADING/STOPPING.

Contact bounce cannot be produced through the control socket (``ctl press`` drives the
mock pin once), so that one test builds :class:`daemon.service.Service` in-process with
the in-memory audio fakes and drives the mock pin directly.

Timeouts below are deadlines for "it never happens", not speed requirements.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from daemon.app import Devices
from daemon.config import parse_config
from daemon.history import HistoryStore
from daemon.localserver import Fault, LocalRealtimeServer, Script
from daemon.localserver.synth import synthesize
from daemon.service import Hardware, Service
from daemon.simulator import SPEAKER_RATE, SimulatedDevice
from hw.audio import MemoryCapture, MemoryPlayback
from hw.button import MockButton

REPO = Path(__file__).resolve().parent.parent

# The fake speaker: 48 kHz, stereo, S16 -> 192 bytes per millisecond.
SPK_BYTES_PER_MS = SPEAKER_RATE * 2 * 2 // 1000
# One ALSA period of the simulated speaker (audio.playback.period_frames default: 960).
PERIOD_MS = 20
# The reply audio the server sends: 24 kHz mono S16 -> 48 bytes per millisecond.
REPLY_BYTES_PER_MS = 48

QUIET = {"audio": {"earcons": False}}


def _stop_timeout_s() -> float:
    """TimeoutStopSec= of the shipped unit: how long systemd waits before SIGKILL."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((REPO / "systemd" / "parley.service").read_text())
    value = unit["Service"]["TimeoutStopSec"]
    assert re.fullmatch(r"\d+", value), f"TimeoutStopSec={value!r}: plain seconds expected"
    return float(value)


@contextlib.asynccontextmanager
async def simulated(
    tmp_path: Path,
    script: Script,
    config: dict[str, Any] | None = None,
    *,
    watchdog_usec: int = 4_000_000,
) -> AsyncIterator[SimulatedDevice]:
    """A started device; stopped (SIGTERM) afterwards even if the test failed."""
    dev = SimulatedDevice(tmp_path / "device", script, config or {},
                          watchdog_usec=watchdog_usec)
    try:
        await dev.start()
        yield dev
    finally:
        await dev.stop()


def _reply_pcm(server: LocalRealtimeServer) -> dict[str, bytes]:
    """The reply audio the server sent, per assistant item, in order (24 kHz mono S16)."""
    out: dict[str, bytearray] = {}
    for ev in server.events("response.output_audio.delta", direction="server"):
        out.setdefault(ev["item_id"], bytearray()).extend(base64.b64decode(ev["delta"]))
    return {k: bytes(v) for k, v in out.items()}


def _speaker_bytes(dev: SimulatedDevice) -> int:
    return dev.speaker_raw.stat().st_size


def _rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def _contour(pcm: bytes, rate: int, channels: int) -> npt.NDArray[np.float64]:
    """RMS per 10 ms frame of the first channel."""
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    x = x.reshape(-1, channels)[:, 0]
    frame = rate // 100
    n = len(x) // frame
    rms: npt.NDArray[np.float64] = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(axis=1))
    return rms


def _contour_correlation(reply24: bytes, played48: bytes) -> float:
    """How well the speaker's loudness contour follows the reply's (Pearson r)."""
    ea, eb = _contour(reply24, 24000, 1), _contour(played48, SPEAKER_RATE, 2)
    n = min(len(ea), len(eb))
    ea, eb = ea[:n] - ea[:n].mean(), eb[:n] - eb[:n].mean()
    return float(ea @ eb / np.sqrt((ea @ ea) * (eb @ eb)))


async def _until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"never happened within {timeout} s: {what}") from None


def _history(dev: SimulatedDevice) -> list[Any]:
    """The daemon's history as stored on disk (read after the daemon stopped)."""
    store = HistoryStore(dev.state_dir / "history.sqlite3", 1000)
    return store.entries()


def _log(dev: SimulatedDevice) -> str:
    return "\n".join(dev.log_lines)


# ----------------------------------------------------------------------------------------
# 1. end to end
# ----------------------------------------------------------------------------------------


async def test_turn_end_to_end_reply_reaches_the_speaker_and_systemd_is_told(
    tmp_path: Path,
) -> None:
    reply = "Paris is the capital of France, and it is lovely in spring."
    script = Script(user_transcripts=["capital of France"], replies=[reply])
    # Earcons off: then the speaker file holds the reply and nothing else, so its length
    # can be checked to a period or two (tones are tested in the button tests below).
    async with simulated(tmp_path, script, QUIET, watchdog_usec=2_000_000) as dev:
        await dev.say("France")
        await dev.wait_idle()
        # the paced speaker drains its buffer (160 ms) and the resampler tail
        await asyncio.sleep(0.4)

        [pcm24] = _reply_pcm(dev.server).values()
        played = dev.speaker_raw.read_bytes()
        reply_ms = len(pcm24) / REPLY_BYTES_PER_MS
        played_ms = len(played) / SPK_BYTES_PER_MS
        assert reply_ms > 1000
        # The whole reply and only the reply, resampled 24 kHz mono -> 48 kHz stereo.
        assert abs(played_ms - reply_ms) <= 2 * PERIOD_MS, (played_ms, reply_ms)
        assert _rms(played) > 0.3 * _rms(pcm24), "the speaker played (near) silence"
        # ... and it is that audio: its loudness contour (10 ms frames) follows the
        # reply's. (Contours, not samples: the two resamplers' delays differ by a fraction
        # of a millisecond, which a sample-wise comparison would punish.)
        corr = _contour_correlation(pcm24, played)
        assert corr > 0.95, f"the speaker did not play the reply (correlation {corr:.3f})"

        # The turn reached the server as one committed, answered buffer.
        assert len(dev.server.events("input_audio_buffer.commit")) == 1
        assert len(dev.server.events("response.create")) == 1

        # STATUS is refreshed (every 5 s while it changes): it reports the turn.
        await _until(lambda: any("1 turns today" in n.fields.get("STATUS", "")
                                 for n in dev.notifications), 12, "STATUS with the turn")
        ready_at = dev.notified("READY")[0].at
        watchdogs_before = len(dev.notified("WATCHDOG"))
        await dev.wait_notified("WATCHDOG", count=watchdogs_before + 2, timeout=10)
        status = await dev.status()
        assert status["turns_today"] == 1 and status["state"] == "idle"
    dev.server.assert_clean()

    kinds = [next(iter(n.fields)) for n in dev.notifications]
    assert kinds[0] == "STATUS", kinds  # "starting", before anything else
    assert kinds.count("READY") == 1
    first_ready = kinds.index("READY")
    assert "WATCHDOG" in kinds
    assert kinds.index("WATCHDOG") > first_ready, "a WATCHDOG ping before READY=1"
    statuses = [n.fields["STATUS"] for n in dev.notifications if "STATUS" in n.fields]
    after_ready = [n.fields["STATUS"] for n in dev.notifications
                   if "STATUS" in n.fields and n.at >= ready_at]
    assert after_ready and after_ready[0].startswith("idle"), statuses
    assert all("turns today" in s for s in after_ready), statuses
    # WATCHDOG kept coming while healthy: never a gap systemd would act on (WATCHDOG_USEC).
    pings = [n.at for n in dev.notifications if "WATCHDOG" in n.fields]
    assert len(pings) >= 4
    assert max(np.diff(pings)) < 2.0, f"watchdog gaps {np.diff(pings)}"
    assert dev.notified("STOPPING"), "no STOPPING=1 on SIGTERM"


# ----------------------------------------------------------------------------------------
# 2. reload
# ----------------------------------------------------------------------------------------


async def test_sighup_with_a_good_config_switches_to_a_session_with_the_new_settings(
    tmp_path: Path,
) -> None:
    script = Script(user_transcripts=["ahoy"], replies=["Arr."])
    async with simulated(tmp_path, script, QUIET) as dev:
        assert len(dev.server.connections) == 1
        old = dev.server.events("session.update", connection=0)
        assert old and "pirate" not in old[-1]["session"].get("instructions", "")
        dev.write_config(session={"instructions": "Talk like a pirate."})
        dev.signal(signal.SIGHUP)
        await dev.wait_notified("READY", count=2)
        reloading = dev.notified("RELOADING")
        assert len(reloading) == 1
        assert "MONOTONIC_USEC" in reloading[0].fields
        ready2 = dev.notified("READY")[1]
        assert reloading[0].at <= ready2.at
        seq = [k for n in dev.notifications for k in n.fields if k in ("RELOADING", "READY")]
        assert seq == ["READY", "RELOADING", "READY"]

        # Idle: the engine prepares a fresh session carrying the new instructions and
        # switches to it.
        await dev.server.wait_connections(2, timeout=10)
        await dev.server.wait_for(
            lambda: bool(dev.server.events("session.update", connection=1)), 10)
        new = dev.server.events("session.update", connection=1)[-1]
        assert new["session"]["instructions"] == "Talk like a pirate."
        new_session = dev.server.connections[1].session_id
        await dev.wait_status(lambda s: s["session_id"] == new_session, timeout=15)
        assert "configuration reloaded" in _log(dev)
        # The new session is the one in use: a turn goes there.
        await dev.say("ahoy")
        await dev.wait_idle()
        assert dev.server.events("input_audio_buffer.commit", connection=1)
        assert not dev.server.events("input_audio_buffer.commit", connection=0)
    dev.server.assert_clean()


async def test_sighup_mid_reply_lets_the_reply_finish_before_switching(tmp_path: Path) -> None:
    reply = "Here is a reply that takes a few seconds to say, so a reload lands in it."
    script = Script(user_transcripts=["go on", "and now"], replies=[reply, "New session."])
    async with simulated(tmp_path, script, QUIET) as dev:
        await dev.say("go")
        await _until(lambda: _speaker_bytes(dev) > 500 * SPK_BYTES_PER_MS, 15,
                     "the reply starts playing")
        dev.write_config(session={"instructions": "Be terse."})
        dev.signal(signal.SIGHUP)
        await dev.wait_notified("READY", count=2)
        assert (await dev.status())["state"] == "speaking"
        await dev.wait_idle()
        await asyncio.sleep(0.4)
        # Not cut: the whole reply reached the speaker, nothing was cancelled.
        [pcm24] = _reply_pcm(dev.server).values()
        played_ms = _speaker_bytes(dev) / SPK_BYTES_PER_MS
        assert abs(played_ms - len(pcm24) / REPLY_BYTES_PER_MS) <= 2 * PERIOD_MS
        assert "response.cancel" not in dev.server.types(direction="client")
        assert not dev.server.truncations
        # Then the switch, and the next turn goes to the new session.
        await dev.server.wait_connections(2, timeout=10)
        new_session = dev.server.connections[1].session_id
        await dev.wait_status(lambda s: s["session_id"] == new_session, timeout=15)
        await dev.say("and now")
        await dev.wait_idle()
        assert [t.connection for t in dev.server.turns] == [0, 1]
        update = dev.server.events("session.update", connection=1)[-1]
        assert update["session"]["instructions"] == "Be terse."
        await dev.stop()
    dev.server.assert_clean()
    said = [(e.role, e.text, e.interrupted) for e in _history(dev)
            if e.role in ("user", "assistant")]
    assert said == [("user", "go on", False), ("assistant", reply, False),
                    ("user", "and now", False), ("assistant", "New session.", False)]


async def test_sighup_with_a_bad_config_is_rejected_and_the_daemon_keeps_working(
    tmp_path: Path,
) -> None:
    script = Script(user_transcripts=["still there"], replies=["Yes, still here."])
    async with simulated(tmp_path, script, QUIET) as dev:
        dev.write_config(session={"speed": 99})
        dev.signal(signal.SIGHUP)
        await dev.wait_notified("READY", count=2)
        seq = [k for n in dev.notifications for k in n.fields if k in ("RELOADING", "READY")]
        assert seq == ["READY", "RELOADING", "READY"]
        await _until(lambda: "reload rejected" in _log(dev), 5, "reload rejected in the log")
        # The error names the key (the message continues on the next lines).
        at = next(i for i, line in enumerate(dev.log_lines) if "reload rejected" in line)
        assert "session.speed" in "\n".join(dev.log_lines[at:at + 3]), dev.log_lines[at:]
        statuses = [n.fields["STATUS"] for n in dev.notified("STATUS")]
        assert any("reload rejected" in s and "session.speed" in s for s in statuses), statuses
        assert dev.process is not None and dev.process.returncode is None
        # The previous configuration still runs: same session, and a turn works.
        assert len(dev.server.connections) == 1
        await dev.say("still there")
        await dev.wait_idle()
        assert len(dev.server.events("input_audio_buffer.commit")) == 1
        assert len(dev.server.events("response.done", direction="server")) == 1
        assert len(dev.server.connections) == 1
        assert all(u["session"].get("audio", {}).get("output", {}).get("speed", 1.0) != 99
                   for u in dev.server.events("session.update"))
        code, _ = await dev.stop()
        assert code == 0
    dev.server.assert_clean()
    users = [(e.role, e.text) for e in _history(dev) if e.role in ("user", "assistant")]
    assert users == [("user", "still there"), ("assistant", "Yes, still here.")]


# ----------------------------------------------------------------------------------------
# 3. stop
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [
    pytest.param(False, id="reply-received"),
    pytest.param(True, id="reply-still-streaming"),
])
async def test_sigterm_mid_reply_stops_cleanly_and_flushes_history(
    tmp_path: Path, streaming: bool
) -> None:
    long_reply = " ".join(["blah"] * 40) + "."
    # realtime_factor 0: the server sends the whole reply at once, so at SIGTERM it has
    # fully arrived and is being played; 1.0: it is still arriving, as from the real API
    # during a long answer.
    script = Script(user_transcripts=["talk to me"], replies=[long_reply],
                    realtime_factor=1.0 if streaming else 0)
    limit = _stop_timeout_s()
    async with simulated(tmp_path, script, QUIET) as dev:
        await dev.say("talk")
        # Mid-reply: some of it has been heard (~0.7 s on the speaker), most has not.
        await _until(lambda: _speaker_bytes(dev) > 700 * SPK_BYTES_PER_MS, 15,
                     "the reply starts playing")
        status = await dev.status()
        assert status["state"] == "speaking"
        transcript_done = bool(dev.server.events("response.output_audio_transcript.done",
                                                 direction="server"))
        assert transcript_done != streaming
        code, took = await dev.stop(timeout=limit + 5)
        assert code == 0, _log(dev)
        assert took < limit, f"stop took {took:.1f} s, TimeoutStopSec={limit:.0f}"
        assert dev.notified("STOPPING")
        assert "stopping" in _log(dev)
    dev.server.assert_clean()
    entries = _history(dev)
    roles = [(e.role, e.interrupted) for e in entries]
    assert roles == [("user", False), ("assistant", True)], roles
    assert entries[0].text == "talk to me"
    heard = entries[1].text
    assert heard and long_reply.startswith(heard.rstrip(".")) and len(heard) < len(long_reply)
    assert entries[0].turn_id == entries[1].turn_id != ""


async def test_sigterm_with_a_half_open_connection_still_stops_in_time(
    tmp_path: Path,
) -> None:
    # The server stops reading and sending mid-reply (a half-open TCP connection): the
    # close handshake can never complete, and the stop must not wait for it.
    script = Script(user_transcripts=["hello"], replies=[" ".join(["la"] * 30) + "."],
                    realtime_factor=1.0,
                    faults=[Fault("stall", at="response", after_deltas=10)])
    limit = _stop_timeout_s()
    async with simulated(tmp_path, script, QUIET) as dev:
        await dev.say("hello")
        await dev.server.wait_for(lambda: dev.server.connections[0].stalled, 10)
        await _until(lambda: _speaker_bytes(dev) > 200 * SPK_BYTES_PER_MS, 10,
                     "the start of the reply plays")
        code, took = await dev.stop(timeout=limit + 5)
        assert code == 0, _log(dev)
        assert took < limit, f"stop took {took:.1f} s, TimeoutStopSec={limit:.0f}"
        assert dev.notified("STOPPING")
    dev.server.assert_clean()
    assert [(e.role, e.text) for e in _history(dev)][:1] == [("user", "hello")]


# ----------------------------------------------------------------------------------------
# 4. interrupt
# ----------------------------------------------------------------------------------------


async def test_interrupt_truncates_the_reply_to_what_the_speaker_played(
    tmp_path: Path,
) -> None:
    long_reply = " ".join(["word"] * 60) + "."
    script = Script(user_transcripts=["story", "stop"], replies=[long_reply, "Okay."],
                    realtime_factor=1.5)
    async with simulated(tmp_path, script, QUIET) as dev:
        await dev.say("story")
        await _until(lambda: _speaker_bytes(dev) > 1200 * SPK_BYTES_PER_MS, 15,
                     "over a second of the reply heard")
        await dev.press()
        trunc_ev = await dev.server.next_event("conversation.item.truncate", timeout=5)
        # Earcons are off, so nothing plays until the next reply: let the 8 ms fade and
        # the device buffer drain into the file, then measure what was heard.
        await asyncio.sleep(0.3)
        heard_bytes = _speaker_bytes(dev)
        await asyncio.sleep(0.15)
        dev.speak("stop")
        await asyncio.sleep(0.8)
        await dev.release()
        await dev.wait_idle()

        types = dev.server.types(direction="client")
        assert "response.cancel" in types
        assert types.index("response.cancel") < types.index("conversation.item.truncate")
        [trunc] = dev.server.truncations
        assert trunc.audio_end_ms == trunc_ev["audio_end_ms"]
        first_item = next(iter(_reply_pcm(dev.server)))
        assert trunc.item_id == first_item
        assert 0 < trunc.audio_end_ms < trunc.audio_ms
        heard_ms = heard_bytes / SPK_BYTES_PER_MS
        # What the speaker received of that reply vs. what parley told the server.
        # Both come from the same device pointer, so they agree to within:
        #  - one period (20 ms): the parleyfault pointer, and so the file, moves in
        #    whole periods, while parley measures `written - delay` at its own poll;
        #  - the 8 ms fade, written after the drop and counted as heard on both sides;
        #  - the resampler's group delay (a few ms) and ms rounding;
        # The 80 ms pre-roll does not count: the file only holds what the device clock
        # passed. 60 ms is twice that sum, and still rejects an off-by-one-chunk (40 ms
        # append chunks, 100 ms of pre-roll+buffer) or a "queued, not heard" report.
        print(f"speaker heard {heard_ms:.1f} ms, truncate audio_end_ms {trunc.audio_end_ms}")
        assert abs(heard_ms - trunc.audio_end_ms) <= 60, (heard_ms, trunc.audio_end_ms)
        assert len(dev.server.events("input_audio_buffer.commit")) == 2
    dev.server.assert_clean()
    entries = _history(dev)
    cut = [e for e in entries if e.role == "assistant" and e.interrupted]
    assert len(cut) == 1 and 0 < len(cut[0].text) < len(long_reply)
    # History keeps about the words the server says started before audio_end_ms.
    assert abs(len(cut[0].text.split()) - len(trunc.heard.split())) <= 1, (
        cut[0].text, trunc.heard)
    assert [e.text for e in entries if e.role == "user"] == ["story", "stop"]
    assert entries[-1].text == "Okay."


# ----------------------------------------------------------------------------------------
# 5. the button
# ----------------------------------------------------------------------------------------


def _band_energy(pcm48_stereo: bytes, lo: float, hi: float) -> float:
    x = np.frombuffer(pcm48_stereo, dtype="<i2").reshape(-1, 2)[:, 0].astype(np.float64)
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SPEAKER_RATE)
    return float(spec[(freqs >= lo) & (freqs <= hi)].sum() / max(spec.sum(), 1e-9))


async def test_very_short_press_is_dropped_with_a_tone(tmp_path: Path) -> None:
    script = Script(user_transcripts=["later"])
    async with simulated(tmp_path, script, {"button": {"min_press_ms": 150}}) as dev:
        await dev.press()
        await dev.release()
        await asyncio.sleep(0.8)  # the tones play (listen_start, then too_short)
        status = await dev.wait_idle(timeout=10)
        assert status["state"] == "idle" and not status["response_active"]
        assert not dev.server.events("input_audio_buffer.commit")
        assert not dev.server.events("response.create")
        played = dev.speaker_raw.read_bytes()
        # listen_start (660+880 Hz, 150 ms) then too_short (2 x 440 Hz, 120 ms).
        assert len(played) >= 200 * SPK_BYTES_PER_MS
        assert _band_energy(played, 420, 460) > 0.2, "no too_short tone (440 Hz)"
        assert _band_energy(played, 640, 900) > 0.2, "no listen_start tone"
        # A later, normal press works.
        await dev.say("later")
        await dev.wait_idle()
        assert len(dev.server.events("input_audio_buffer.commit")) == 1
    dev.server.assert_clean()


async def test_stuck_button_ends_the_turn_by_itself(tmp_path: Path) -> None:
    script = Script(user_transcripts=["i am stuck", "unstuck"],
                    replies=["You are stuck.", "Free again."])
    async with simulated(tmp_path, script,
                         {**QUIET, "button": {"max_press_s": 1.5}}) as dev:
        await dev.press()
        await asyncio.sleep(0.15)
        dev.speak("i am stuck")
        # never released: the button's max_press_s ends the turn
        await dev.server.next_event("input_audio_buffer.commit", timeout=10)
        await dev.server.next_event("response.create", timeout=5)
        await dev.wait_idle()
        assert len(dev.server.events("response.done", direction="server")) == 1
        text = _log(dev)
        assert "treating it as stuck" in text
        assert "ending the turn (stuck or sat on?)" in text
        # The real release of the stuck contact is not a turn; the next press is.
        await dev.release()
        await asyncio.sleep(0.3)
        assert len(dev.server.events("input_audio_buffer.commit")) == 1
        await dev.say("unstuck")
        await dev.wait_idle()
        assert len(dev.server.events("input_audio_buffer.commit")) == 2
        assert len(dev.server.events("response.done", direction="server")) == 2
        await dev.stop()
    dev.server.assert_clean()
    said = [(e.role, e.text) for e in _history(dev) if e.role in ("user", "assistant")]
    assert said == [("user", "i am stuck"), ("assistant", "You are stuck."),
                    ("user", "unstuck"), ("assistant", "Free again.")]


async def test_press_during_session_rotation_is_answered_and_nothing_is_dropped(
    tmp_path: Path,
) -> None:
    # 0.05 min = 3 s sessions; a slow session.created keeps the standby in preparation
    # for a while, so the press lands right in the middle of the rotation.
    script = Script(user_transcripts=["one", "two"], replies=["First.", "Second."],
                    delay_session_created_s=1.0)
    async with simulated(tmp_path, script,
                         {**QUIET, "session": {"rotate_after_min": 0.05}}) as dev:
        await dev.wait_status(lambda s: s["standby"] is not None, timeout=15)
        await dev.press()
        during = await dev.status()
        assert during["standby"] is not None and during["state"] == "listening", during
        await asyncio.sleep(0.15)
        await asyncio.sleep(dev.speak("one") + 0.25)
        await dev.release()
        await dev.wait_idle()
        await dev.wait_status(lambda s: s["rotation_count"] >= 1 and s["ready"], timeout=15)
        await dev.say("two")
        await dev.wait_idle()
        commits = dev.server.events("input_audio_buffer.commit")
        assert len(commits) == 2
        assert len(dev.server.events("response.done", direction="server")) == 2
        assert [t.user_transcript for t in dev.server.turns] == ["one", "two"]
        # The second turn went to the session switched to, which was seeded with the
        # first turn (re-seeded history items are conversation.item.create messages).
        second = dev.server.turns[1].connection
        assert second > 0, "the second turn did not reach a rotated session"
        seeded = [e["item"]["content"][0]["text"]
                  for e in dev.server.events("conversation.item.create", connection=second)
                  if e["item"].get("type") == "message" and e["item"]["role"] == "user"]
        assert seeded[:1] == ["one"], seeded
        await dev.stop()
    dev.server.assert_clean()
    said = [(e.role, e.text) for e in _history(dev) if e.role in ("user", "assistant")]
    assert said == [("user", "one"), ("assistant", "First."),
                    ("user", "two"), ("assistant", "Second.")]


async def test_turn_spoken_while_offline_is_sent_once_the_server_accepts(
    tmp_path: Path,
) -> None:
    # Refuse every attempt until the turn has been spoken and released; then accept.
    # (Script.refuse_first is read per attempt, so raising/lowering it at run time
    # decides exactly when the network comes back, instead of guessing backoff timing.)
    script = Script(user_transcripts=["are you online"], replies=["Now I am."],
                    refuse_first=10_000, refuse_with="http")
    async with simulated(tmp_path, script, QUIET) as dev:
        status = await dev.status()
        assert not status["ready"] and not dev.server.connections
        assert any("offline" in n.fields.get("STATUS", "") for n in dev.notifications)
        await dev.say("are you online")
        status = await dev.wait_status(lambda s: s["unsent_turns"] == 1, timeout=5)
        assert status["pending_offline_audio_ms"] > 500
        assert not dev.server.connections
        dev.server.script.refuse_first = dev.server.connection_attempts
        await dev.server.wait_connections(1, timeout=10)
        await dev.server.next_event("input_audio_buffer.commit", timeout=10)
        await dev.wait_idle()
        assert len(dev.server.events("response.done", direction="server")) == 1
        assert [t.user_transcript for t in dev.server.turns] == ["are you online"]
        await dev.stop()
    dev.server.assert_clean()
    said = [(e.role, e.text) for e in _history(dev) if e.role in ("user", "assistant")]
    assert said == [("user", "are you online"), ("assistant", "Now I am.")]


class _Notes:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self) -> None:
        self.sent.append("READY=1")

    def status(self, text: str) -> None:
        self.sent.append("STATUS=" + text)

    def reloading(self) -> None:
        self.sent.append("RELOADING=1")

    def stopping(self) -> None:
        self.sent.append("STOPPING=1")

    def watchdog(self) -> None:
        self.sent.append("WATCHDOG=1")


class _NoLed:
    def set_state(self, state: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Volume:
    def get(self) -> int:
        return 50

    def set(self, percent: int) -> int:
        return percent


async def test_contact_bounce_gives_exactly_one_turn(tmp_path: Path) -> None:
    """In-process: the real Service (its button -> daemon mapping) with a MockButton whose
    pin chatters within bounce_ms on press and on release."""
    bounce_ms = 50
    script = Script(user_transcripts=["bouncy"], replies=["One turn."], realtime_factor=0)
    async with LocalRealtimeServer(script=script) as server:
        doc = {
            "api": {"url": server.base_url + "/v1/realtime", "key_source": "none",
                    "reconnect": {"initial_delay_s": 0.1, "max_delay_s": 0.5}},
            "button": {"backend": "mock", "bounce_ms": bounce_ms, "min_press_ms": 150},
            "service": {"state_dir": str(tmp_path / "state"),
                        "control_socket": str(tmp_path / "run" / "control.sock")},
        }
        config = parse_config(doc)
        button = MockButton(config.button)
        capture = MemoryCapture(chunk_ms=20)
        playback = MemoryPlayback(preroll_ms=60)
        devices = Devices(capture=capture, playback=playback)
        hardware = Hardware(devices=devices, button=button, volume=_Volume(), led=_NoLed())
        notes = _Notes()
        service = Service(tmp_path / "config.yaml", config, None, hardware, notes)  # type: ignore[arg-type]
        daemon = service.daemon
        task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(10):
                while not (daemon.status()["ready"] and button.healthy()):
                    await asyncio.sleep(0.02)
            pin = button.pin_factory.pin(config.button.pin)

            def chatter(pressed: bool) -> None:
                # pull-up: pressed = low. Several flips, all well inside bounce_ms.
                def level(p: bool) -> None:
                    (pin.drive_low if p else pin.drive_high)()

                for _ in range(5):
                    level(pressed)
                    time.sleep(0.002)
                    level(not pressed)
                    time.sleep(0.002)
                level(pressed)

            await asyncio.to_thread(chatter, True)
            speech = synthesize("bouncy")
            capture.feed(speech)
            await asyncio.sleep(len(speech) / 2 / 24000 + 0.2)
            await asyncio.to_thread(chatter, False)
            await server.next_event("response.create", timeout=5)
            async with asyncio.timeout(15):
                while daemon.status()["state"] != "idle" or daemon.status()["response_active"]:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(bounce_ms / 1000 * 4)  # any late, missed edge would show
            assert len(server.events("input_audio_buffer.commit")) == 1
            assert len(server.events("response.create")) == 1
            assert not server.events("input_audio_buffer.clear")
            users = [e.text for e in daemon.history.entries() if e.role == "user"]
            assert users == ["bouncy"]
        finally:
            daemon.stop()
            await asyncio.wait_for(task, 10)
        server.assert_clean()


# ----------------------------------------------------------------------------------------
# the speaker after a pause
# ----------------------------------------------------------------------------------------


async def test_reply_after_an_idle_pause_is_played_whole(tmp_path: Path) -> None:
    """Found by these tests: the playback stall detector used to count idle time (nothing
    queued) as "no progress", so the first write after > 2 s of silence looked like a
    stalled device: the PCM was reopened and the reply's first ~100 ms, already in the
    ALSA buffer, were lost (and a false stall was logged after > 0.5 s)."""
    script = Script(user_transcripts=["hello"], replies=["Hello to you, my friend."])
    async with simulated(tmp_path, script, QUIET) as dev:
        await asyncio.sleep(3.0)  # a device sits idle far longer than this between turns
        await dev.say("hello")
        await dev.wait_idle()
        await asyncio.sleep(0.4)
        [pcm24] = _reply_pcm(dev.server).values()
        reply_ms = len(pcm24) / REPLY_BYTES_PER_MS
        played_ms = _speaker_bytes(dev) / SPK_BYTES_PER_MS
        playback = (await dev.status())["audio"]["playback"]
        assert abs(played_ms - reply_ms) <= 2 * PERIOD_MS, (played_ms, reply_ms)
        assert playback["reopens"] == 0 and playback["stalls"] == 0, playback
        assert "consumed no audio" not in _log(dev)
    dev.server.assert_clean()
