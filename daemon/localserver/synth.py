"""A tiny speech-like synthesizer for the local Realtime server.

Each word becomes a vowel-like buzz (a glottal pulse train shaped by two formants) of
0.25-0.35 s, separated by short pauses (longer after punctuation), so the audio length is
proportional to the word count and a test can tell words apart by energy. Deterministic:
the same text always gives the same bytes. Output is PCM16 LE mono at 24 kHz.
"""

from __future__ import annotations

import zlib

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 24_000
BYTES_PER_SAMPLE = 2

# (F1, F2) in Hz for a handful of vowels.
_VOWELS: tuple[tuple[float, float], ...] = (
    (730.0, 1090.0),  # a
    (530.0, 1840.0),  # e
    (270.0, 2290.0),  # i
    (570.0, 840.0),  # o
    (300.0, 870.0),  # u
)
_PAUSE_S = 0.07
_PUNCT_PAUSE_S = 0.2


def word_duration_s(word: str) -> float:
    """Duration of one synthesized word: 0.25 s plus 10 ms per letter, at most 0.35 s."""
    letters = sum(ch.isalnum() for ch in word)
    return min(0.35, 0.25 + 0.01 * letters)


def pause_after_s(word: str) -> float:
    return _PUNCT_PAUSE_S if word[-1:] in ".,;:!?" else _PAUSE_S


def _word_samples(word: str, amplitude: float) -> npt.NDArray[np.float64]:
    seed = zlib.crc32(word.lower().encode("utf-8"))
    f1, f2 = _VOWELS[seed % len(_VOWELS)]
    f0 = 110.0 + (seed >> 8) % 70  # 110-179 Hz
    n = round(word_duration_s(word) * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    # Slight falling pitch, like a spoken syllable.
    phase = 2 * np.pi * f0 * (t - 0.15 * t * t)
    out = np.zeros(n, dtype=np.float64)
    for k in range(1, int(3800 // f0) + 1):
        fk = k * f0
        gain = np.exp(-(((fk - f1) / 110.0) ** 2)) + 0.6 * np.exp(-(((fk - f2) / 160.0) ** 2))
        gain += 0.05 / k  # a little spectral tilt keeps it buzzy
        out += gain * np.sin(k * phase)
    peak = float(np.max(np.abs(out))) or 1.0
    env = np.minimum(1.0, np.minimum(t / 0.03, (t[-1] - t) / 0.05 + 1e-9))
    result: npt.NDArray[np.float64] = amplitude * out / peak * np.clip(env, 0.0, 1.0)
    return result


def synthesize(text: str, *, amplitude: float = 0.3) -> bytes:
    """PCM16 LE 24 kHz mono audio for ``text`` (empty text gives 0.1 s of silence)."""
    words = text.split()
    if not words:
        return bytes(round(0.1 * SAMPLE_RATE) * BYTES_PER_SAMPLE)
    chunks: list[npt.NDArray[np.float64]] = []
    for word in words:
        chunks.append(_word_samples(word, amplitude))
        chunks.append(np.zeros(round(pause_after_s(word) * SAMPLE_RATE)))
    signal = np.concatenate(chunks)
    pcm = np.clip(np.round(signal * 32767.0), -32768, 32767).astype("<i2")
    return pcm.tobytes()


def duration_ms(pcm: bytes | bytearray) -> int:
    """Duration in whole milliseconds of PCM16 24 kHz mono audio."""
    return (len(pcm) // BYTES_PER_SAMPLE) * 1000 // SAMPLE_RATE


def bytes_for_ms(ms: float) -> int:
    """Byte count (whole samples) of ``ms`` milliseconds of PCM16 24 kHz mono audio."""
    return round(ms * SAMPLE_RATE / 1000) * BYTES_PER_SAMPLE
