"""Hardware-in-the-loop tests: real pyalsaaudio + alsa-lib against fake devices.

FIFO-fed ``type file`` mic, ``type file`` speaker, and parley's ``parleyfault`` plugin
for pacing and faults (hw/fake_alsa.py). Assertions are on content and counters.
"""

from __future__ import annotations

import asyncio
import os
import time
import wave
from pathlib import Path
from typing import Any

import alsaaudio
import numpy as np
import pytest
from aio import cancel_and_wait, until

import hw.alsa_pcm
from daemon.config import CaptureConfig, PlaybackConfig
from daemon.errors import AudioDeviceError
from hw.alsa_capture import AlsaCapture
from hw.alsa_pcm import find_pcm_holders, open_pcm
from hw.alsa_playback import AlsaPlayback
from hw.fake_alsa import FakeAlsaEnv

pytestmark = pytest.mark.timeout(90)


def resample_poly(x: np.ndarray, up: int, down: int) -> np.ndarray:
    """Reference resampler (numpy Kaiser-windowed sinc; scipy is not a dependency),
    independent of the C implementation under test."""
    taps = 255
    cutoff = 0.45 / max(up, down)  # cycles per sample at the upsampled rate
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, 10.0) * up
    y = np.zeros(len(x) * up)
    y[::up] = x
    return np.convolve(y, h, mode="same")[::down]


def _test_signal(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.2 * np.sin(2 * np.pi * 300 * t) + 0.1 * np.sin(2 * np.pi * 1700 * t + 1) \
        + 0.05 * np.sin(2 * np.pi * 5100 * t + 2)


def _align(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Best normalised correlation of ``got`` against ``ref`` and the level ratio (dB)."""
    n = min(len(got), 12000)
    seg = got[2400:2400 + n]
    c = np.correlate(ref, seg, mode="valid")
    k = int(np.argmax(c))
    r = ref[k:k + len(seg)]
    corr = float(np.dot(r, seg) / np.sqrt(np.dot(r, r) * np.dot(seg, seg)))
    level = 20 * np.log10(np.sqrt(np.mean(seg**2)) / np.sqrt(np.mean(r**2)))
    return corr, float(level)


async def _collect(cap: AlsaCapture, seconds: float) -> tuple[np.ndarray, list[float]]:
    chunks: list[bytes] = []
    times: list[float] = []

    def sink(c: bytes) -> None:
        chunks.append(c)
        times.append(time.monotonic())

    task = asyncio.create_task(cap.run(sink))
    await until(lambda: len(chunks) * 0.02 >= seconds, timeout=seconds + 5)
    await cancel_and_wait(task)
    x = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float64) / 32768
    return x, times


async def test_fifo_mic_48k_s32_stereo_becomes_24k_mono(alsa_env: FakeAlsaEnv,
                                                         tmp_path: Path) -> None:
    left = _test_signal(48000, 3.0)
    right = 0.5 * np.sin(2 * np.pi * 90 * np.arange(len(left)) / 48000)  # must not leak
    frames = np.stack([left, right], axis=1) * 2**31
    wav = tmp_path / "mic.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(4)
        w.setframerate(48000)
        w.writeframes(np.clip(frames, -2**31, 2**31 - 1).astype("<i4").tobytes())
    mic = alsa_env.mic_from_wav(wav, period_frames=960)
    cfg = CaptureConfig(device=mic, format="S32_LE", rate=48000, channels=2, channel="left",
                        dc_remove=False, gain_db=0.0)
    got, times = await _collect(AlsaCapture(cfg, 20), 1.5)
    ref = resample_poly(left, 1, 2)
    corr, level = _align(ref, got)
    assert corr > 0.995, corr
    assert abs(level) < 0.5, level
    intervals = np.diff(times[10:])
    assert 0.015 < float(np.median(intervals)) < 0.025  # paced by the FIFO, not free-running


async def test_file_speaker_gets_48k_stereo_of_the_stream(alsa_env: FakeAlsaEnv) -> None:
    spk_file = alsa_env.speaker()
    x = _test_signal(24000, 0.5)
    pcm = (x * 32767).astype("<i2")
    pb = AlsaPlayback(PlaybackConfig(device="fakespk", format="S16_LE", rate=48000,
                                     channels=2))
    done: list[tuple[str, int]] = []
    pb.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(pb.run())
    pb.enqueue("r1", pcm.tobytes())
    pb.end_item("r1")
    await until(lambda: done)
    await cancel_and_wait(task)
    assert done == [("r1", 12000)]
    out = np.fromfile(spk_file, dtype="<i2").reshape(-1, 2)
    # every input sample became two frames, plus the resampler's tail (< 2 ms)
    assert 24000 <= len(out) <= 24000 + 96
    assert np.array_equal(out[:, 0], out[:, 1])
    ref = resample_poly(x, 2, 1)
    corr, level = _align(ref, out[:, 0].astype(np.float64) / 32768)
    assert corr > 0.995 and abs(level) < 0.5


@pytest.mark.parametrize("fade", [False, True])
async def test_stop_accounting_matches_speaker_within_a_period(alsa_env: FakeAlsaEnv,
                                                               fade: bool) -> None:
    dev = alsa_env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")
    pb = AlsaPlayback(PlaybackConfig(device="spk", fade_ms=8))
    task = asyncio.create_task(pb.run())
    pb.enqueue("r1", (_test_signal(24000, 2.0) * 32767).astype("<i2").tobytes())
    pb.end_item("r1")
    await until(lambda: pb.played_samples("r1") > 9000)
    item, n = pb.stop(fade=fade)
    await asyncio.sleep(0.2)
    await cancel_and_wait(task)
    heard = os.path.getsize(dev.out_path) // 4 / 2  # 48 kHz frames -> 24 kHz samples
    assert item == "r1"
    assert abs(heard - n) <= 480, (heard, n)  # one 20 ms period
    assert 9000 < n < 48000


async def test_short_sounds_after_idle_are_not_stalls(alsa_env: FakeAlsaEnv) -> None:
    """Regression: an earcon written after an idle pause longer than the stall timeout
    was reported as 'consumed no audio for <pause>' (the stall clock ran while nothing
    was queued) and, past stall_reopen_s, the device was reopened and the earcon cut."""
    dev = alsa_env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")
    pb = AlsaPlayback(PlaybackConfig(device="spk"), stall_timeout_s=0.3, stall_reopen_s=0.8)
    task = asyncio.create_task(pb.run())
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 880 * np.arange(3600) / 24000)).astype("<i2")
    await asyncio.sleep(0.5)  # idle from the start: longer than stall_timeout_s
    for _ in range(2):
        pb.play_tone(tone.tobytes())
        await asyncio.sleep(1.2)  # the tone plays out (150 ms), then idle > stall_reopen_s
    st = pb.stats
    await cancel_and_wait(task)
    assert (st.stalls, st.reopens, st.underruns) == (0, 0, 0), st
    assert st.state == "running" and st.last_error == ""
    # the file holds only what the pointer passed: both whole tones (2 x 7200 frames at
    # 48 kHz, each plus the resampler's tail), none of the idle time
    out = np.fromfile(dev.out_path, dtype="<i2").reshape(-1, 2)[:, 0] / 32768
    assert 2 * 7200 <= len(out) <= 2 * (7200 + 96), len(out)
    loud = np.abs(out) > 0.15  # above half the tone's amplitude
    assert 0.6 * 2 * 7200 < int(loud.sum()) <= 2 * 7200


async def test_stop_without_fade_leaves_a_healthy_idle_stream(alsa_env: FakeAlsaEnv,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Regression: stop(fade=False) drop()s the PCM into SETUP and writes nothing. The
    worker then asked avail(): alsa-lib's ioplug answers with the stale pre-drop count
    (a 'stall', then a reopen), a kernel device with -EBADFD (a 'failure', a reopen).
    The SETUP answer of a kernel (hw:) PCM is emulated here."""
    dev = alsa_env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")

    class KernelLikeSetup:
        def __init__(self, pcm: Any) -> None:
            self._pcm = pcm

        def __getattr__(self, name: str) -> Any:
            return getattr(self._pcm, name)

        def avail(self) -> int:
            if self._pcm.state() == alsaaudio.PCM_STATE_SETUP:
                return -77  # -EBADFD: snd_pcm_hwsync() on a kernel PCM in SETUP
            return int(self._pcm.avail())

    monkeypatch.setattr(hw.alsa_pcm, "open_pcm",
                        lambda *a, **k: KernelLikeSetup(open_pcm(*a, **k)))
    pb = AlsaPlayback(PlaybackConfig(device="spk"), stall_timeout_s=0.3, stall_reopen_s=0.8)
    done: list[tuple[str, int]] = []
    pb.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(pb.run())
    pb.enqueue("r1", (_test_signal(24000, 2.0) * 32767).astype("<i2").tobytes())
    pb.end_item("r1")
    await until(lambda: pb.played_samples("r1") > 4800)
    item, n = pb.stop(fade=False)
    await asyncio.sleep(0.1)
    assert pb.stop(fade=True) == (None, 0)  # a stop while idle: drop() again, nothing to fade
    await asyncio.sleep(1.2)  # > stall_reopen_s
    size = os.path.getsize(dev.out_path)
    pb.enqueue("r2", (_test_signal(24000, 0.3) * 32767).astype("<i2").tobytes())
    pb.end_item("r2")
    await until(lambda: done, timeout=3)
    st = pb.stats
    await cancel_and_wait(task)
    assert item == "r1" and 4800 < n < 48000
    assert done == [("r2", 7200)]
    assert (st.stalls, st.reopens) == (0, 0), st
    assert st.state == "running" and st.last_error == ""
    assert os.path.getsize(dev.out_path) - size >= 14400 * 4  # r2 reached the speaker


async def test_stalled_playback_still_detected_and_recovers(alsa_env: FakeAlsaEnv) -> None:
    """The idle rule must not hide a real stall: audio queued, clock frozen."""
    dev = alsa_env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")
    pb = AlsaPlayback(PlaybackConfig(device="spk"), stall_timeout_s=0.3, stall_reopen_s=10.0)
    task = asyncio.create_task(pb.run())
    pb.enqueue("r1", (_test_signal(24000, 3.0) * 32767).astype("<i2").tobytes())
    pb.end_item("r1")
    await until(lambda: pb.played_samples("r1") > 4800)
    dev.stall()
    await until(lambda: pb.stats.state == "stalled")
    heard = pb.played_samples("r1")
    await asyncio.sleep(0.3)
    assert pb.played_samples("r1") == heard and pb.stats.stalls == 1
    dev.restore()
    await until(lambda: pb.stats.state == "running" and pb.played_samples("r1") > heard)
    assert pb.stats.stalls == 1 and pb.stats.reopens == 0
    await cancel_and_wait(task)


async def test_capture_overrun_counted_and_stream_continues(alsa_env: FakeAlsaEnv,
                                                            tmp_path: Path) -> None:
    dev = alsa_env.fault_device(name="mic", rate=48000, channels=2, format="S32_LE")
    cap = AlsaCapture(CaptureConfig(device="mic"), 20)
    chunks: list[bytes] = []
    task = asyncio.create_task(cap.run(chunks.append))
    await until(lambda: len(chunks) >= 5)
    dev.xrun()
    await until(lambda: cap.stats.overruns == 1)
    n = len(chunks)
    await until(lambda: len(chunks) >= n + 10)
    assert cap.stats.state == "running" and cap.stats.reopens == 0
    await cancel_and_wait(task)


async def test_playback_underrun_counted_and_item_completes(alsa_env: FakeAlsaEnv) -> None:
    dev = alsa_env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")
    pb = AlsaPlayback(PlaybackConfig(device="spk"))
    done: list[tuple[str, int]] = []
    pb.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(pb.run())
    pb.enqueue("r1", (_test_signal(24000, 1.0) * 32767).astype("<i2").tobytes())
    pb.end_item("r1")
    await until(lambda: pb.played_samples("r1") > 4800)
    dev.xrun()
    await until(lambda: done, timeout=5)
    assert pb.stats.underruns == 1
    await cancel_and_wait(task)


async def test_vanished_capture_device_reopened_with_backoff(alsa_env: FakeAlsaEnv) -> None:
    dev = alsa_env.fault_device(name="mic", rate=48000, channels=2, format="S32_LE")
    cap = AlsaCapture(CaptureConfig(device="mic"), 20, backoff_initial_s=0.05,
                      backoff_max_s=0.4)
    chunks: list[bytes] = []
    task = asyncio.create_task(cap.run(chunks.append))
    await until(lambda: len(chunks) >= 5)
    dev.vanish()
    await until(lambda: "vanished" in cap.stats.last_error)
    state = cap.stats.state  # read into a variable: mypy would narrow cap.stats.state
    assert state == "reopening"
    await until(lambda: "is not present" in cap.stats.last_error)
    await asyncio.sleep(1.0)  # several failed opens: 0.05, 0.1, 0.2, 0.4, 0.4 s apart
    state = cap.stats.state
    assert state == "failed"
    n = len(chunks)
    dev.restore()
    await until(lambda: cap.stats.reopens == 1 and len(chunks) >= n + 10)
    state = cap.stats.state
    assert state == "running"
    await cancel_and_wait(task)


async def test_vanished_playback_device_reopened_and_playing(alsa_env: FakeAlsaEnv) -> None:
    dev = alsa_env.fault_device(name="spk", rate=48000, channels=2, format="S16_LE")
    pb = AlsaPlayback(PlaybackConfig(device="spk"), backoff_initial_s=0.05)
    done: list[tuple[str, int]] = []
    pb.on_item_done = lambda i, n: done.append((i, n))
    task = asyncio.create_task(pb.run())
    pb.enqueue("r1", (_test_signal(24000, 1.5) * 32767).astype("<i2").tobytes())
    pb.end_item("r1")
    await until(lambda: pb.played_samples("r1") > 4800)
    dev.vanish()
    await until(lambda: pb.stats.state in ("reopening", "failed"))
    dev.restore()
    await until(lambda: done, timeout=6)
    assert pb.stats.reopens == 1
    assert 4800 < done[0][1] <= 36000  # what was lost in the vanished buffer is not counted
    await cancel_and_wait(task)


async def test_stalled_capture_reported_and_loop_stays_live(alsa_env: FakeAlsaEnv) -> None:
    dev = alsa_env.fault_device(name="mic", rate=48000, channels=2, format="S32_LE")
    cap = AlsaCapture(CaptureConfig(device="mic"), 20, stall_timeout_s=0.3,
                      stall_reopen_s=10.0)
    chunks: list[bytes] = []
    task = asyncio.create_task(cap.run(chunks.append))
    await until(lambda: len(chunks) >= 5)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    dev.stall()
    await until(lambda: cap.stats.state == "stalled")
    progress = cap.stats.last_progress
    n = len(chunks)
    await asyncio.sleep(0.3)
    assert len(chunks) == n and cap.stats.last_progress == progress
    assert cap.stats.stalls == 1
    assert max(lags) < 0.1  # the reader never blocked the loop
    dev.restore()
    await until(lambda: cap.stats.state == "running" and len(chunks) > n + 5)
    tick.cancel()
    await cancel_and_wait(task)


async def test_stalled_fifo_mic_does_not_hang_cancellation(alsa_env: FakeAlsaEnv,
                                                           tmp_path: Path) -> None:
    wav = tmp_path / "m.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(4)
        w.setframerate(48000)
        w.writeframes(bytes(48000 * 8))
    mic = alsa_env.mic_from_wav(wav)
    cap = AlsaCapture(CaptureConfig(device=mic), 20, stall_timeout_s=0.2, join_timeout_s=0.5)
    chunks: list[bytes] = []
    task = asyncio.create_task(cap.run(chunks.append))
    await until(lambda: len(chunks) >= 5)
    alsa_env.feeder(mic).paused.set()  # reads now block inside alsa-lib
    await until(lambda: cap.stats.state == "stalled")
    t = time.monotonic()
    await cancel_and_wait(task)
    assert time.monotonic() - t < 2.0
    alsa_env.feeder(mic).paused.clear()


async def test_busy_device_message_names_device(alsa_env: FakeAlsaEnv) -> None:
    dev = alsa_env.fault_device(name="mic", rate=48000, channels=2, format="S32_LE")
    dev.busy()
    with pytest.raises(AudioDeviceError, match=r"capture device 'mic' is busy"):
        open_pcm("capture", "mic", rate=48000, channels=2, fmt="S32_LE",
                 period_frames=960, buffer_frames=7680)
    cap = AlsaCapture(CaptureConfig(device="mic"), 20, backoff_initial_s=0.05)
    task = asyncio.create_task(cap.run(lambda _c: None))
    await until(lambda: "busy" in cap.stats.last_error)
    await cancel_and_wait(task)


def test_unknown_device_and_wrong_format_messages(alsa_env: FakeAlsaEnv) -> None:
    alsa_env.fault_device(name="mic", rate=48000, channels=2, format="S32_LE")
    with pytest.raises(AudioDeviceError, match="no ALSA capture device named 'nosuch'"):
        open_pcm("capture", "nosuch", rate=48000, channels=2, fmt="S32_LE",
                 period_frames=960, buffer_frames=7680)
    with pytest.raises(AudioDeviceError, match="'mic'"):
        open_pcm("capture", "mic", rate=16000, channels=1, fmt="S16_LE",
                 period_frames=320, buffer_frames=2560)


def test_find_pcm_holders_reads_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "asound").mkdir(parents=True)
    (proc / "asound" / "cards").write_text(" 1 [sndrpihifiber ]: HifiBerry - snd_rpi\n")
    sub = proc / "asound" / "card1" / "pcm0c" / "sub0"
    sub.mkdir(parents=True)
    (sub / "status").write_text("state: RUNNING\nowner_pid   : 4242\n")
    (proc / "4242").mkdir()
    (proc / "4242" / "comm").write_text("arecord\n")
    (proc / "777" / "fd").mkdir(parents=True)
    (proc / "777" / "comm").write_text("pulseaudio\n")
    os.symlink("/dev/snd/pcmC1D0c", proc / "777" / "fd" / "5")
    (proc / "778" / "fd").mkdir(parents=True)
    os.symlink("/dev/snd/pcmC1D0p", proc / "778" / "fd" / "5")  # playback: not a holder
    assert find_pcm_holders("hw:1,0", "capture", proc=proc) == [
        (777, "pulseaudio"), (4242, "arecord")]
    assert find_pcm_holders("plughw:CARD=sndrpihifiber,DEV=0", "capture", proc=proc) == [
        (777, "pulseaudio"), (4242, "arecord")]
    assert find_pcm_holders("hw:1,0", "playback", proc=proc) == [(778, "?")]
