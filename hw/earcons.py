"""Earcons: short tones generated in code, 24 kHz mono S16_LE.

Each is a few sine blips with raised-cosine (Hann) attack and release, so nothing
clicks. They are distinct by pitch contour: rising for listen_start, falling for
listen_stop, a quick low double blip for too_short, a low minor third falling for
error, and a slow low two-tone for offline. ``volume`` is 0..1 of full scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RATE = 24000
NAMES = ("listen_start", "listen_stop", "too_short", "error", "offline")

# (frequency Hz, duration ms, gap after ms) per blip
_SPECS: dict[str, Sequence[tuple[float, float, float]]] = {
    "listen_start": ((660.0, 60, 10), (880.0, 80, 0)),
    "listen_stop": ((880.0, 60, 10), (660.0, 80, 0)),
    "too_short": ((440.0, 40, 40), (440.0, 40, 0)),
    "error": ((392.0, 120, 20), (330.0, 180, 0)),
    "offline": ((330.0, 150, 80), (262.0, 220, 0)),
}


def blip(freq: float, ms: float, volume: float, ramp_ms: float = 10.0) -> np.ndarray:
    """One sine blip with raised-cosine attack/release (float64, -1..1)."""
    n = max(1, round(ms * RATE / 1000))
    t = np.arange(n) / RATE
    # a touch of the octave makes small speakers sound less thin
    x = np.sin(2 * np.pi * freq * t) + 0.15 * np.sin(4 * np.pi * freq * t)
    r = min(n // 2, round(ramp_ms * RATE / 1000))
    if r > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)
        x[:r] *= ramp
        x[n - r:] *= ramp[::-1]
    return volume * x / 1.15


def earcon(name: str, volume: float = 0.3) -> bytes:
    """The named earcon as 24 kHz mono S16_LE bytes."""
    if name not in _SPECS:
        raise ValueError(f"unknown earcon {name!r}; one of {', '.join(NAMES)}")
    if not 0.0 <= volume <= 1.0:
        raise ValueError("volume must be within 0..1")
    parts: list[np.ndarray] = []
    for freq, ms, gap in _SPECS[name]:
        parts.append(blip(freq, ms, volume))
        parts.append(np.zeros(round(gap * RATE / 1000)))
    x = np.concatenate(parts)
    out: bytes = np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    return out


def all_earcons(volume: float = 0.3) -> dict[str, bytes]:
    return {name: earcon(name, volume) for name in NAMES}
