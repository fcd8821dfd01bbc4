"""Volume control: an ALSA mixer control, or a software gain applied by the playback.

:func:`make_volume` picks :class:`AlsaMixerVolume` when ``cfg.control`` names a mixer
control and :class:`SoftwareVolume` when it is empty. Pass a ``SoftwareVolume`` to
``AlsaPlayback(cfg, volume=...)``; the playback thread reads :attr:`SoftwareVolume.gain`
once per block, so a change is heard within one ALSA period.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from daemon.config import MixerConfig
from daemon.errors import AudioDeviceError

log = logging.getLogger(__name__)


@runtime_checkable
class Volume(Protocol):
    def get(self) -> int:
        """Current volume in percent (0..100)."""
        ...

    def set(self, percent: int) -> int:
        """Set the volume (clamped to 0..100); returns the value now in effect."""
        ...


def _clamp(percent: int) -> int:
    return max(0, min(100, int(percent)))


class SoftwareVolume:
    """A gain the playback applies to reply audio and earcons.

    The percent maps to an amplitude on a perceptual curve, ``(percent/100) ** 2``
    (about -12 dB at 50 %, -28 dB at 20 %, silence at 0).
    """

    def __init__(self, percent: int = 100) -> None:
        self._percent = _clamp(percent)

    def get(self) -> int:
        return self._percent

    def set(self, percent: int) -> int:
        self._percent = _clamp(percent)
        return self._percent

    @property
    def gain(self) -> float:
        return (self._percent / 100.0) ** 2


class AlsaMixerVolume:
    """Volume through an ALSA simple mixer control (e.g. 'PCM', 'Master', 'Digital')."""

    def __init__(self, cfg: MixerConfig) -> None:
        import alsaaudio

        self._alsa = alsaaudio
        self.cfg = cfg
        try:
            self._mixer = alsaaudio.Mixer(control=cfg.control, cardindex=cfg.card_index)
        except alsaaudio.ALSAAudioError as exc:
            card = "the default card" if cfg.card_index < 0 else f"card {cfg.card_index}"
            try:
                names = ", ".join(alsaaudio.mixers(cardindex=cfg.card_index)) or "none"
            except alsaaudio.ALSAAudioError:
                names = "unknown (cannot open the card's mixer)"
            raise AudioDeviceError(
                f"no mixer control {cfg.control!r} on {card} ({exc}); controls there: "
                f"{names}. Set audio.mixer.control to one of them, or '' for software volume"
            ) from exc
        if cfg.initial_volume >= 0:
            self.set(cfg.initial_volume)

    def get(self) -> int:
        values = self._mixer.getvolume()
        return _clamp(round(sum(values) / len(values))) if values else 0

    def set(self, percent: int) -> int:
        p = _clamp(percent)
        try:
            self._mixer.setvolume(p)
        except self._alsa.ALSAAudioError as exc:
            raise AudioDeviceError(
                f"cannot set mixer control {self.cfg.control!r}: {exc}"
            ) from exc
        return self.get()


def make_volume(cfg: MixerConfig) -> Volume:
    """ALSA mixer when ``cfg.control`` is set, else a software volume."""
    if cfg.control == "":
        return SoftwareVolume(100 if cfg.initial_volume < 0 else cfg.initial_volume)
    return AlsaMixerVolume(cfg)
