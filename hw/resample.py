"""Streaming resampler for parley's audio path (thin typed wrapper over ``hw._resample``).

Converts interleaved PCM capture frames (``S16_LE``, ``S24_3LE`` or ``S32_LE``) to the
24 kHz mono ``S16_LE`` the Realtime API wants, and 24 kHz replies to the playback device's
rate, in streaming fashion:

* every output sample whose inputs have arrived is returned by the call that delivered them
  (nothing held back beyond the constant filter delay, :attr:`Resampler.delay_frames`);
* output is bit-identical whatever the chunking of the input bytes (partial frames are kept);
* ``process_into`` writes into a caller-owned buffer without allocating;
* the filtering runs with the GIL released for inputs of 1 KiB or more.

Quality for any rate pair (``Nl`` = the lower of the two Nyquist frequencies): flat within
+/-0.1 dB up to 0.9 Nl, at least 90 dB of alias/image rejection for everything that would
land below 0.9 Nl (stopband from 1.1 Nl), linear phase. Details in ``hw/csrc/resample.h``.

Example::

    r = Resampler(48000, 24000, in_format="S32_LE", in_channels=2, channel="left",
                  dc_remove=True)
    pcm24k = r.process(period_bytes)
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from hw import _resample

__all__ = ["CHANNELS", "FORMATS", "ChannelName", "FormatName", "Resampler"]

FormatName = Literal["S16_LE", "S24_3LE", "S32_LE"]
ChannelName = Literal["left", "right", "mix"]

FORMATS: Final[tuple[str, ...]] = get_args(FormatName)
CHANNELS: Final[tuple[str, ...]] = get_args(ChannelName)
SAMPLE_BYTES: Final[dict[str, int]] = {"S16_LE": 2, "S24_3LE": 3, "S32_LE": 4}


class Resampler(_resample.Resampler):
    """Streaming rational-ratio resampler producing ``S16_LE`` (see module docstring).

    ``Resampler(in_rate, out_rate, *, in_format="S16_LE", in_channels=1, channel="left",
    out_channels=1, dc_remove=False, gain_db=0.0)``

    * ``channel``: ``"left"`` (channel 0), ``"right"`` (channel 1) or ``"mix"`` (mean of
      channels 0 and 1; channel 0 when mono).
    * ``out_channels``: 1, or 2 to duplicate the mono result into stereo frames.
    * ``dc_remove``: one-pole high-pass (15 Hz corner) before the filter, for MEMS mics
      with a DC offset (SPH0645).
    * ``gain_db``: applied in float before rounding; the output saturates, never wraps.

    ``S32_LE`` input keeps its 24 most significant bits (I2S MEMS mics left-justify 24-bit
    samples). Raises ``ValueError`` for unsupported arguments or rate ratios.

    Methods (all implemented in C, no Python-level overhead):
    ``process(data) -> bytes``, ``process_into(data, out) -> int``,
    ``max_output_bytes(in_bytes) -> int``, ``flush() -> bytes`` (filter tail, then reset),
    ``reset()``; properties ``delay_frames``, ``in_rate``, ``out_rate`` and more.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return (
            f"Resampler({self.in_rate}, {self.out_rate}, in_format={self.in_format!r}, "
            f"in_channels={self.in_channels}, channel={self.channel!r}, "
            f"out_channels={self.out_channels}, dc_remove={self.dc_remove}, "
            f"gain_db={self.gain_db})"
        )

    @property
    def delay_seconds(self) -> float:
        """Group delay in seconds (constant; linear-phase filter)."""
        return self.delay_frames / self.out_rate
