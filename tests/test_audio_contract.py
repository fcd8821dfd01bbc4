"""Protocol behaviour every AudioCapture / AudioPlayback backend must show.

Runs against the in-memory fakes and against the ALSA implementations on the paced
``parleyfault`` fake device (real pyalsaaudio + alsa-lib).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from aio import cancel_and_wait, until

from daemon.config import CaptureConfig, PlaybackConfig
from hw.alsa_capture import AlsaCapture
from hw.alsa_playback import AlsaPlayback
from hw.audio import AudioCapture, AudioPlayback, MemoryCapture, MemoryPlayback
from hw.fake_alsa import FakeAlsaEnv

pytestmark = pytest.mark.timeout(60)


def sine24k(seconds: float, freq: float = 440.0, level: float = 0.3) -> bytes:
    t = np.arange(int(24000 * seconds)) / 24000
    return (level * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def _raw_s32_stereo(path: Path, seconds: float) -> Path:
    t = np.arange(int(48000 * seconds)) / 48000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * 2**31).astype("<i4")
    np.stack([x, x], axis=1).tofile(path)
    return path


@pytest.fixture(params=["memory", "alsa"])
def capture(request: pytest.FixtureRequest, tmp_path: Path) -> AudioCapture:
    if request.param == "memory":
        return MemoryCapture(chunk_ms=20)
    env: FakeAlsaEnv = request.getfixturevalue("alsa_env")
    env.fault_device(name="mic", infile=_raw_s32_stereo(tmp_path / "in.raw", 1.0),
                     rate=48000, channels=2, format="S32_LE")
    return AlsaCapture(CaptureConfig(device="mic"), 20)


@pytest.fixture(params=["memory", "alsa"])
def playback(request: pytest.FixtureRequest) -> AudioPlayback:
    if request.param == "memory":
        return MemoryPlayback(preroll_ms=80, fade_ms=8)
    env: FakeAlsaEnv = request.getfixturevalue("alsa_env")
    env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")
    return AlsaPlayback(PlaybackConfig(device="spk", preroll_ms=80, fade_ms=8))


async def test_capture_delivers_fixed_chunks_on_the_loop(capture: AudioCapture) -> None:
    loop_thread = threading.get_ident()
    chunks: list[bytes] = []
    threads: set[int] = set()

    def sink(chunk: bytes) -> None:
        threads.add(threading.get_ident())
        chunks.append(chunk)

    assert isinstance(capture, AudioCapture)
    task = asyncio.create_task(capture.run(sink))
    await until(lambda: len(chunks) >= 10)
    assert capture.stats.state == "running"
    progress = capture.stats.last_progress
    await until(lambda: capture.stats.last_progress > progress)
    await cancel_and_wait(task)
    assert threads == {loop_thread}
    assert {len(c) for c in chunks} == {capture.chunk_bytes} == {960}
    final: str = capture.stats.state  # re-read after the task ended (no narrowing)
    assert final == "stopped"


async def test_capture_cancellation_propagates_promptly(capture: AudioCapture) -> None:
    task = asyncio.create_task(capture.run(lambda _c: None))
    await asyncio.sleep(0.1)
    task.cancel()
    async with asyncio.timeout(3):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_playback_item_done_with_full_count(playback: AudioPlayback) -> None:
    assert isinstance(playback, AudioPlayback)
    done: list[tuple[str, int]] = []
    playback.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(playback.run())
    try:
        playback.enqueue("a", sine24k(0.3))
        playback.enqueue("a", sine24k(0.1))
        playback.end_item("a")
        playback.enqueue("b", sine24k(0.2))
        playback.end_item("b")
        await until(lambda: len(done) == 2)
        assert done == [("a", 9600), ("b", 4800)]
        assert playback.played_samples("a") == 9600
        assert playback.played_samples("unknown") == 0
        assert playback.stop() == (None, 0)
    finally:
        await cancel_and_wait(task)


async def test_playback_preroll_holds_back_short_unended_item(playback: AudioPlayback) -> None:
    task = asyncio.create_task(playback.run())
    try:
        playback.enqueue("a", sine24k(0.04))  # below the 80 ms pre-roll
        await asyncio.sleep(0.3)
        assert playback.played_samples("a") == 0
        playback.enqueue("a", sine24k(0.06))  # now 100 ms queued: starts
        await until(lambda: playback.played_samples("a") > 0)
    finally:
        await cancel_and_wait(task)


async def test_playback_stop_reports_heard_samples(playback: AudioPlayback) -> None:
    done: list[tuple[str, int]] = []
    playback.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(playback.run())
    try:
        playback.enqueue("a", sine24k(2.0))
        playback.end_item("a")
        await until(lambda: playback.played_samples("a") >= 7200)  # 0.3 s heard
        item, n = playback.stop(fade=True)
        assert item == "a"
        assert 7200 <= n < 48000
        assert playback.played_samples("a") == n
        playback.play_tone(sine24k(0.05))
        await asyncio.sleep(0.3)
        assert done == []  # an interrupted item never reports done
        assert playback.stats.queued_samples == 0
    finally:
        await cancel_and_wait(task)


@pytest.mark.parametrize("fade", [False, True])
async def test_playback_pauses_and_stops_are_not_faults(playback: AudioPlayback,
                                                        fade: bool) -> None:
    """Idle time between sounds, and a stop, are not device trouble: after a pause longer
    than any stall timeout the next sound plays at once and nothing is counted."""
    done: list[tuple[str, int]] = []
    playback.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(playback.run())
    try:
        playback.play_tone(sine24k(0.15))
        await asyncio.sleep(0.8)
        playback.enqueue("a", sine24k(2.0))
        playback.end_item("a")
        await until(lambda: playback.played_samples("a") >= 4800)
        item, _n = playback.stop(fade=fade)
        assert item == "a"
        await asyncio.sleep(2.5)  # longer than the backends' stall/reopen timeouts
        playback.enqueue("b", sine24k(0.2))
        playback.end_item("b")
        await until(lambda: done, timeout=2.0)
        assert done == [("b", 4800)]
        st = playback.stats
        assert (st.stalls, st.reopens, st.underruns) == (0, 0, 0), st
        assert st.state == "running" and st.last_error == ""
    finally:
        await cancel_and_wait(task)
