"""Audio commands for the CLI: ``parley devices``, ``parley mic-test``, ``parley speaker-test``.

Each function prints to stdout/stderr and returns a process exit code (0 = success,
1 = the device could not be used, 2 = it worked but the result looks wrong).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import wave
from pathlib import Path
from typing import Any

import alsaaudio
import numpy as np

from daemon.config import CaptureConfig, PlaybackConfig
from daemon.errors import AudioDeviceError
from hw.alsa_capture import AlsaCapture
from hw.alsa_pcm import FORMATS, open_error, open_pcm
from hw.alsa_playback import AlsaPlayback
from hw.earcons import blip


def _probe(device: str, direction: str) -> str:
    kind = alsaaudio.PCM_CAPTURE if direction == "capture" else alsaaudio.PCM_PLAYBACK
    try:
        pcm = alsaaudio.PCM(kind, alsaaudio.PCM_NONBLOCK, device=device)
    except alsaaudio.ALSAAudioError as exc:
        return str(open_error("capture" if direction == "capture" else "playback", device, exc))
    try:
        fmts = [f for f in pcm.getformats() if f in FORMATS]
        lo, hi = pcm.getratebounds()
        rates: Any = pcm.getrates()
        ch = pcm.getchannels()
    except alsaaudio.ALSAAudioError as exc:
        return f"cannot query: {exc}"
    finally:
        pcm.close()
    rate_txt = (", ".join(str(r) for r in rates) if isinstance(rates, list) and rates
                else f"{lo}-{hi}")
    return (f"formats {', '.join(fmts) or 'none usable (needs S16_LE/S24_3LE/S32_LE)'}; "
            f"rates {rate_txt} Hz; channels {', '.join(map(str, ch))}")


def _hw_devices(direction: str) -> list[str]:
    suffix = "c" if direction == "capture" else "p"
    names = []
    for card in sorted(Path("/proc/asound").glob("card[0-9]*")):
        for pcm_dir in sorted(card.glob(f"pcm[0-9]*{suffix}")):
            names.append(f"hw:{card.name[4:]},{pcm_dir.name[3:-1]}")
    return names


def list_devices() -> int:
    """Print capture and playback PCMs, probing each hardware device."""
    try:
        cards = alsaaudio.cards()
    except alsaaudio.ALSAAudioError:
        cards = []
    print("Sound cards:" if cards else "Sound cards: none found")
    for idx, name in zip(alsaaudio.card_indexes(), cards, strict=False):
        print(f"  {idx}: {name}")
    for direction, kind in (("capture", alsaaudio.PCM_CAPTURE),
                            ("playback", alsaaudio.PCM_PLAYBACK)):
        print(f"\n{direction.capitalize()} devices (audio.{direction}.device):")
        for hw in _hw_devices(direction):
            print(f"  {hw:<24} {_probe(hw, direction)}")
        for name in alsaaudio.pcms(kind):
            if name.startswith(("hw:", "plughw:")) or name in ("null",):
                continue
            print(f"  {name}")
    return 0


def _check_open(direction: str, cfg: CaptureConfig | PlaybackConfig) -> str | None:
    try:
        pcm = open_pcm("capture" if direction == "capture" else "playback", cfg.device,
                       rate=cfg.rate, channels=cfg.channels, fmt=cfg.format,
                       period_frames=cfg.period_frames, buffer_frames=cfg.buffer_frames)
    except AudioDeviceError as exc:
        return str(exc)
    pcm.close()
    return None


def mic_test(cfg: CaptureConfig, seconds: float, wav_path: Path) -> int:
    """Show a live level meter and record ``seconds`` of 24 kHz mono audio to a WAV."""
    err = _check_open("capture", cfg)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    cap = AlsaCapture(cfg, 40)
    chunks: list[bytes] = []
    peak_db = -120.0
    tty = sys.stdout.isatty()

    def sink(chunk: bytes) -> None:
        nonlocal peak_db
        chunks.append(chunk)
        x = np.frombuffer(chunk, dtype="<i2").astype(np.float64) / 32768
        rms = math.sqrt(float(np.mean(x * x))) if len(x) else 0.0
        db = 20 * math.log10(max(rms, 1e-6))
        peak_db = max(peak_db, db)
        if tty:
            bar = "#" * max(0, int((db + 60) / 60 * 40))
            print(f"\r{db:6.1f} dBFS |{bar:<40}|", end="", flush=True)

    async def record() -> None:
        task = asyncio.create_task(cap.run(sink))
        # wall-clock bound: a stalled mic must not make the test hang
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(_enough()), seconds + 2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _enough() -> None:
        while len(chunks) * 0.04 < seconds:  # noqa: ASYNC110 - polls a counter fed by the sink
            await asyncio.sleep(0.04)

    asyncio.run(record())
    if tty:
        print()
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(b"".join(chunks))
    got = len(chunks) * 0.04
    print(f"recorded {got:.1f} s to {wav_path}; loudest 40 ms: {peak_db:.1f} dBFS; "
          f"overruns {cap.stats.overruns}")
    if got < seconds * 0.5:
        print(f"error: the microphone delivered only {got:.1f} s of {seconds:.1f} s "
              f"({cap.stats.last_error or 'no error reported'})", file=sys.stderr)
        return 2
    if peak_db < -70:
        print("warning: the recording is silent; check audio.capture.channel (left/right) "
              "and the mic's wiring", file=sys.stderr)
        return 2
    return 0


def _sweep(f0: float, f1: float, seconds: float, level: float) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    k = math.log(f1 / f0) / seconds
    x = level * np.sin(2 * math.pi * f0 * (np.exp(k * t) - 1) / k)
    r = 240
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)
    x[:r] *= ramp
    x[-r:] *= ramp[::-1]
    return x


def speaker_test(cfg: PlaybackConfig) -> int:
    """Play a 440 Hz tone, then a 100 Hz - 10 kHz sweep."""
    err = _check_open("playback", cfg)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    pb = AlsaPlayback(cfg)
    signal = np.concatenate([blip(440.0, 1000, 0.3, ramp_ms=20), np.zeros(4800),
                             _sweep(100.0, 10000.0, 3.0, 0.3)])
    pcm = np.round(signal * 32767).astype("<i2").tobytes()
    done: list[int] = []

    async def play() -> None:
        finished = asyncio.Event()

        def on_done(_item: str, samples: int) -> None:
            done.append(samples)
            finished.set()

        pb.on_item_done = on_done
        task = asyncio.create_task(pb.run())
        print("playing: 440 Hz tone (1 s), then a sweep 100 Hz -> 10 kHz (3 s)")
        pb.enqueue("speaker-test", pcm)
        pb.end_item("speaker-test")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), len(signal) / 24000 + 3.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(play())
    if not done:
        print(f"error: playback did not finish ({pb.stats.last_error or pb.stats.state})",
              file=sys.stderr)
        return 2
    print(f"done; underruns {pb.stats.underruns}")
    return 0
