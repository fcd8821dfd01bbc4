"""Tests for the C streaming resampler (hw.resample / hw._resample)."""

from __future__ import annotations

import math
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest

from hw.resample import Resampler

LISTED = [8000, 16000, 22050, 32000, 44100, 48000]
CONVERSIONS = (
    [(r, 24000) for r in LISTED]
    + [(24000, r) for r in LISTED]
    + [(24000, 24000), (44100, 48000), (48000, 44100), (48000, 16000), (11025, 24000),
       (96000, 24000)]
)
FORMATS = {"S16_LE": 2, "S24_3LE": 3, "S32_LE": 4}


def ids(conv: tuple[int, int]) -> str:
    return f"{conv[0]}->{conv[1]}"


def s16(x: np.ndarray) -> bytes:
    return np.asarray(np.round(x), dtype="<i2").tobytes()


def to_i16(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i2").astype(np.float64)


def encode(samples: np.ndarray, fmt: str) -> bytes:
    """Integer S16-scale samples (frames x channels) -> raw bytes in fmt."""
    v = np.asarray(samples, dtype=np.int64)
    if fmt == "S16_LE":
        return v.astype("<i2").tobytes()
    if fmt == "S24_3LE":
        u = (v * 256).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        return u.tobytes()
    return (v * 65536).astype("<i4").tobytes()


def tone(rate: int, freq: float, n: int, amp: float, phase: float = 0.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(n) / rate + phase)


def amplitude_at(y: np.ndarray, rate: int, freq: float) -> float:
    """Amplitude of the component at freq (Kaiser beta=20 window, ~190 dB sidelobes)."""
    w = np.kaiser(len(y), 20.0)
    e = np.exp(-2j * np.pi * freq * np.arange(len(y)) / rate)
    return float(2 * abs(np.sum(w * y * e)) / np.sum(w))


def spectrum(y: np.ndarray) -> np.ndarray:
    w = np.kaiser(len(y), 20.0)
    return 2 * np.abs(np.fft.rfft(w * y)) / np.sum(w)


def steady(r: Resampler, freq: float, amp: float, n_out: int = 16384) -> np.ndarray:
    """Resamples an S16 tone; returns n_out output samples after the start-up transient."""
    skip = int(r.delay_frames) * 2 + 64
    n_in = (n_out + skip + 16) * r.in_rate // r.out_rate + 1
    y = to_i16(r.process(s16(tone(r.in_rate, freq, n_in, amp))))
    assert len(y) >= skip + n_out
    return y[skip: skip + n_out]


def chunked(r: Resampler, data: bytes, rng: np.random.Generator, max_chunk: int) -> bytes:
    out = []
    i = 0
    while i < len(data):
        n = int(rng.integers(1, max_chunk + 1))
        out.append(r.process(data[i: i + n]))
        i += n
    out.append(r.flush())
    return b"".join(out)


# ---- streaming / oracle -------------------------------------------------------------------


@pytest.mark.parametrize("conv", CONVERSIONS, ids=ids)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chunked_equals_one_shot(conv: tuple[int, int], fmt: str) -> None:
    in_rate, out_rate = conv
    rng = np.random.default_rng(in_rate * 7 + out_rate + FORMATS[fmt])
    ch = 2
    frames = in_rate // 10
    # Random full-scale noise plus a DC offset exercises saturation and all code paths.
    raw = rng.integers(0, 256, size=frames * ch * FORMATS[fmt], dtype=np.uint8).tobytes()
    for channel in ("left", "mix"):
        r = Resampler(in_rate, out_rate, in_format=fmt, in_channels=ch, channel=channel,  # type: ignore[arg-type]
                      dc_remove=channel == "mix")
        one = r.process(raw) + r.flush()
        assert len(one) > 0
        for max_chunk in (1, 7, 97, 4096):
            if max_chunk == 1 and len(raw) > 20000:
                data = raw[:20000]
                ref = r.process(data) + r.flush()
            else:
                data, ref = raw, one
            assert chunked(r, data, rng, max_chunk) == ref, (channel, max_chunk)


@pytest.mark.parametrize("conv", CONVERSIONS, ids=ids)
def test_nothing_held_back(conv: tuple[int, int]) -> None:
    """After n input frames exactly ceil(n*out/in) outputs exist: no block buffering."""
    in_rate, out_rate = conv
    r = Resampler(in_rate, out_rate)
    rng = np.random.default_rng(3)
    total_in = total_out = 0
    for _ in range(200):
        n = int(rng.integers(0, 300))
        total_out += len(r.process(bytes(2 * n))) // 2
        total_in += n
        assert total_out == math.ceil(Fraction(total_in * out_rate, in_rate))


@pytest.mark.parametrize("conv", CONVERSIONS, ids=ids)
def test_flush_tail_is_the_delay(conv: tuple[int, int]) -> None:
    in_rate, out_rate = conv
    r = Resampler(in_rate, out_rate)
    n = 12345
    body = len(r.process(bytes(2 * n))) // 2
    tail = len(r.flush()) // 2
    d = Fraction(r.filter_length - 1, 2 * r.decimation)
    assert abs(r.delay_frames - float(d)) < 1e-12
    assert body + tail == math.ceil(Fraction(n * out_rate, in_rate) + d)
    assert abs(tail - r.delay_frames) <= 1.0
    # flush() reset the resampler: flushing again gives nothing, a new stream starts clean.
    assert r.flush() == b""
    fresh = Resampler(in_rate, out_rate)
    x = s16(tone(in_rate, 440, 3000, 9000))
    assert r.process(x) == fresh.process(x)


@pytest.mark.parametrize("conv", CONVERSIONS, ids=ids)
def test_group_delay(conv: tuple[int, int]) -> None:
    """Measured delay of a 125 Hz tone == delay_frames, and <= 3 ms."""
    in_rate, out_rate = conv
    r = Resampler(in_rate, out_rate)
    f = 125.0  # period 8 ms > any delay: no phase ambiguity
    n_in = in_rate  # 1 s
    x = tone(in_rate, f, n_in, 20000.0)
    y = to_i16(r.process(s16(x)))
    skip = 2000
    seg = y[skip: skip + 16384]
    t = np.arange(skip, skip + len(seg)) / out_rate
    w = np.kaiser(len(seg), 20.0)
    ph = np.angle(np.sum(w * seg * np.exp(-2j * np.pi * f * t)))  # sin -> phase -pi/2
    delay_s = (-(ph + np.pi / 2)) / (2 * np.pi * f)
    delay_s = (delay_s + 0.5 / f) % (1 / f) - 0.5 / f
    assert abs(delay_s * out_rate - r.delay_frames) < 0.02
    if in_rate in [*LISTED, 24000] and out_rate in [*LISTED, 24000]:
        assert r.delay_frames / out_rate <= 0.003


# ---- quality ------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", CONVERSIONS, ids=ids)
def test_1khz_level_within_0_1_db(conv: tuple[int, int]) -> None:
    in_rate, out_rate = conv
    r = Resampler(in_rate, out_rate)
    y = steady(r, 1000.0, 16000.0)
    level = 20 * math.log10(amplitude_at(y, out_rate, 1000.0) / 16000.0)
    assert abs(level) < 0.1, level


@pytest.mark.parametrize("conv", CONVERSIONS, ids=ids)
def test_passband_flat_to_0_9_nyquist(conv: tuple[int, int]) -> None:
    in_rate, out_rate = conv
    nl = min(in_rate, out_rate) / 2
    r = Resampler(in_rate, out_rate)
    for frac in (0.02, 0.3, 0.6, 0.8, 0.85, 0.9):
        f = frac * nl
        r.reset()
        y = steady(r, f, 16000.0)
        level = 20 * math.log10(amplitude_at(y, out_rate, f) / 16000.0)
        assert abs(level) < 0.1, (f, level)


def _alias_worst_db(in_rate: int, out_rate: int, freqs: list[float], amp: float,
                    below: float | None = None) -> float:
    """Worst output component (dB re amp) other than the tone itself, for tones at freqs;
    only output frequencies < below if given."""
    r = Resampler(in_rate, out_rate)
    worst = -300.0
    nl = min(in_rate, out_rate) / 2
    for f0 in freqs:
        # an incommensurate frequency, so the input's own int16 rounding error is noise-like
        # (a periodic one puts discrete lines in the passband, 40 dB above the noise floor)
        f = f0 + 0.1234567
        r.reset()
        y = steady(r, f, amp)
        spec = spectrum(y)
        bins = np.fft.rfftfreq(len(y), 1 / out_rate)
        if f < nl:  # keep the tone itself out of the measurement
            spec = spec[np.abs(bins - f) > 40.0]
            bins = bins[np.abs(bins - f) > 40.0]
        if below is not None:
            spec = spec[bins < below]
        worst = max(worst, 20 * math.log10(spec.max() / amp + 1e-30))
    return worst


@pytest.mark.parametrize("conv", [c for c in CONVERSIONS if c[0] > c[1]], ids=ids)
def test_alias_rejection_90db(conv: tuple[int, int]) -> None:
    """Downsampling: any input tone above 1.1 x the output Nyquist is >= 90 dB down;
    tones between 1.0 and 1.1 x Nyquist alias only above 0.9 x Nyquist."""
    in_rate, out_rate = conv
    nl = out_rate / 2
    top = 0.995 * in_rate / 2
    if top > 1.1 * nl:
        freqs = list(np.linspace(1.1 * nl, top, 9))
        assert _alias_worst_db(in_rate, out_rate, freqs, 30000.0) <= -90.0
    trans = list(np.linspace(1.0 * nl + 20, min(1.1 * nl, top), 5))
    assert _alias_worst_db(in_rate, out_rate, trans, 30000.0, below=0.9 * nl - 40) <= -90.0


@pytest.mark.parametrize("conv", [c for c in CONVERSIONS if c[0] < c[1]], ids=ids)
def test_image_rejection_90db(conv: tuple[int, int]) -> None:
    """Upsampling: images of passband tones (0..0.9 x input Nyquist) are >= 90 dB down."""
    in_rate, out_rate = conv
    nl = in_rate / 2
    freqs = [0.05 * nl, 0.4 * nl, 0.75 * nl, 0.9 * nl]
    assert _alias_worst_db(in_rate, out_rate, freqs, 30000.0) <= -90.0


def test_rejection_test_can_fail() -> None:
    """The measurement sees a tone in the 1.0..1.1 Nl transition band (not rejected)."""
    assert _alias_worst_db(48000, 24000, [12500.0], 30000.0) > -90.0


# ---- sample path ----------------------------------------------------------------------------


def test_saturation_never_wraps() -> None:
    r = Resampler(48000, 24000, gain_db=12.0)
    x = tone(48000, 1000.0, 4800, 32767.0)
    y = to_i16(r.process(s16(x)))
    t = (np.arange(len(y)) - r.delay_frames) / 24000
    ideal = 10 ** (12 / 20) * 32767.0 * np.sin(2 * np.pi * 1000.0 * t)
    big = (np.abs(ideal) > 33000 * 1.05) & (np.arange(len(y)) > 4 * r.delay_frames)
    assert big.sum() > 100
    assert np.all(y[big & (ideal > 0)] == 32767)
    assert np.all(y[big & (ideal < 0)] == -32768)
    # A full-scale square wave overshoots (Gibbs) at 0 dB: clipped, never sign-flipped.
    r2 = Resampler(8000, 24000)
    sq = np.where((np.arange(8000) // 20) % 2 == 0, 32767, -32768)
    y2 = to_i16(r2.process(s16(sq)))
    d = round(r2.delay_frames)
    ref = np.repeat(sq, 3)[: len(y2) - d]
    y2 = y2[d:]
    far = np.ones(len(ref), bool)
    edges = np.flatnonzero(np.diff(ref) != 0)
    for e in edges:
        far[max(0, e - 30): e + 30] = False
    far[-30:] = False  # the last edge may lie just past the truncated reference
    assert y2.max() == 32767 and y2.min() == -32768
    assert np.all(np.sign(y2[far]) == np.sign(ref[far]))


@pytest.mark.parametrize("fmt", ["S24_3LE", "S32_LE"])
def test_formats_match_s16(fmt: str) -> None:
    rng = np.random.default_rng(5)
    v = rng.integers(-32768, 32768, size=(9600, 2))
    ref = Resampler(48000, 24000, in_channels=2, channel="right").process(encode(v, "S16_LE"))
    got = Resampler(48000, 24000, in_format=fmt, in_channels=2,  # type: ignore[arg-type]
                    channel="right").process(encode(v, fmt))
    assert got == ref
    if fmt == "S32_LE":
        # the 8 least significant bits (below 24 bits) are ignored
        raw = np.frombuffer(encode(v, fmt), dtype="<i4") | rng.integers(0, 256, size=v.size)
        got2 = Resampler(48000, 24000, in_format="S32_LE", in_channels=2,
                         channel="right").process(raw.astype("<i4").tobytes())
        assert got2 == ref


def test_s24_precision_kept() -> None:
    """A -80 dBFS 1 kHz tone in 24-bit input comes out at the right (3.3 LSB) level."""
    amp24 = 8388607 * 10 ** (-80 / 20)
    n = 48000
    v = np.round(tone(48000, 1000.0, n, amp24)).astype(np.int64)
    raw = v.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    r = Resampler(48000, 24000, in_format="S24_3LE")
    y = to_i16(r.process(raw))[200:16584]
    level = amplitude_at(y, 24000, 1000.0)
    assert abs(20 * math.log10(level / (amp24 / 256))) < 0.2


def test_channel_pick_and_mix() -> None:
    n = 4800
    left = 2 * np.round(tone(48000, 700.0, n, 8000.0))
    right = 2 * np.round(tone(48000, 1900.0, n, 6000.0))
    st = np.stack([left, right], axis=1)
    raw = encode(st, "S16_LE")

    def mono(x: np.ndarray) -> bytes:
        return Resampler(48000, 24000).process(s16(x))

    assert Resampler(48000, 24000, in_channels=2, channel="left").process(raw) == mono(left)
    assert Resampler(48000, 24000, in_channels=2, channel="right").process(raw) == mono(right)
    assert Resampler(48000, 24000, in_channels=2, channel="mix").process(raw) == mono(
        (left + right) / 2
    )
    assert mono(left) != mono(right)
    # extra channels are ignored for left/right
    four = np.concatenate([st, st * 0 + 1234], axis=1)
    assert Resampler(48000, 24000, in_channels=4, channel="right").process(
        encode(four, "S16_LE")
    ) == mono(right)


def test_out_channels_duplicates() -> None:
    x = s16(tone(16000, 440.0, 1600, 10000.0))
    mono = np.frombuffer(Resampler(16000, 24000).process(x), "<i2")
    st = np.frombuffer(Resampler(16000, 24000, out_channels=2).process(x), "<i2")
    assert np.array_equal(st[0::2], mono) and np.array_equal(st[1::2], mono)


def test_dc_removal() -> None:
    n = 48000
    x = tone(48000, 1000.0, n, 8000.0) + 6000.0  # SPH0645-style offset
    y_plain = to_i16(Resampler(48000, 24000).process(s16(x)))
    y_dc = to_i16(Resampler(48000, 24000, dc_remove=True).process(s16(x)))
    assert abs(np.mean(y_plain[12000:]) - 6000.0) < 6000 * 0.006  # DC within the ripple
    assert abs(np.mean(y_dc[12000:])) < 2.0  # offset gone after ~0.5 s (15 Hz corner)
    lvl = amplitude_at(y_dc[12000: 12000 + 8192], 24000, 1000.0)
    assert abs(20 * math.log10(lvl / 8000.0)) < 0.1
    # a 15 Hz hum is attenuated by ~3 dB, 5 Hz by much more
    r = Resampler(48000, 24000, dc_remove=True)
    y5 = to_i16(r.process(s16(tone(48000, 5.0, 4 * n, 8000.0))))[48000:]
    assert 20 * math.log10(amplitude_at(y5, 24000, 5.0) / 8000.0) < -9.0


@pytest.mark.parametrize("gain_db", [-20.0, -6.0, 3.5])
def test_gain(gain_db: float) -> None:
    r = Resampler(44100, 24000, gain_db=gain_db)
    y = steady(r, 1000.0, 8000.0)
    level = 20 * math.log10(amplitude_at(y, 24000, 1000.0) / 8000.0)
    assert abs(level - gain_db) < 0.05


def test_passthrough_is_identity() -> None:
    rng = np.random.default_rng(9)
    x = rng.integers(-32768, 32768, size=5000).astype("<i2").tobytes()
    r = Resampler(24000, 24000)
    assert r.delay_frames == 0.0
    assert r.process(x) == x
    assert r.flush() == b""
    st = np.stack([np.frombuffer(x, "<i2"), np.frombuffer(x, "<i2") // 3], axis=1)
    r2 = Resampler(24000, 24000, in_format="S32_LE", in_channels=2, channel="left")
    assert r2.process(encode(st, "S32_LE")) == x


# ---- Python API ---------------------------------------------------------------------------


def test_buffer_types_equivalent() -> None:
    rng = np.random.default_rng(11)
    arr = rng.integers(-20000, 20000, size=4410).astype("<i2")
    raw = arr.tobytes()
    outs = []
    for data in (raw, bytearray(raw), memoryview(raw), arr, arr.view(np.uint8),
                 memoryview(bytearray(raw))):
        r = Resampler(44100, 24000)
        outs.append(r.process(data))  # type: ignore[arg-type]
        r.reset()
        buf = bytearray(r.max_output_bytes(len(raw)))
        n = r.process_into(data, buf)  # type: ignore[arg-type]
        outs.append(bytes(buf[:n]))
        np_out = np.zeros(r.max_output_bytes(len(raw)) // 2, dtype="<i2")
        r.reset()
        n = r.process_into(data, np_out)  # type: ignore[arg-type]
        outs.append(np_out.tobytes()[:n])
    assert all(o == outs[0] for o in outs)
    with pytest.raises((BufferError, ValueError)):
        Resampler(44100, 24000).process(arr[::2])  # type: ignore[arg-type]


def test_process_into_bounds() -> None:
    rng = np.random.default_rng(13)
    for in_rate, out_rate in CONVERSIONS:
        r = Resampler(in_rate, out_rate, in_channels=2)
        twin = Resampler(in_rate, out_rate, in_channels=2)
        for _ in range(30):
            data = rng.integers(0, 256, size=int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
            cap = r.max_output_bytes(len(data))
            buf = bytearray(b"\xa5" * (cap + 16))
            n = r.process_into(data, buf)
            expected = twin.process(data)
            assert n == len(expected) <= cap
            assert bytes(buf[:n]) == expected
            assert buf[n:] == b"\xa5" * (cap + 16 - n)
    r = Resampler(8000, 24000)
    with pytest.raises(ValueError, match="too small"):
        r.process_into(bytes(160), bytearray(10))
    with pytest.raises(TypeError, match="writable"):
        r.process_into(bytes(160), b"\x00" * 1000)  # read-only


def test_reset_and_partial_frames() -> None:
    r = Resampler(48000, 24000, in_format="S24_3LE", in_channels=2)
    data = bytes(range(256)) * 30
    ref = Resampler(48000, 24000, in_format="S24_3LE", in_channels=2).process(data)
    assert r.process(data[:5]) == b""  # less than one frame
    r.reset()  # drops the partial frame
    assert r.process(data) == ref


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"in_rate": 0, "out_rate": 24000}, ValueError, "sample rates"),
        ({"in_rate": 48000, "out_rate": -1}, ValueError, "sample rates"),
        ({"in_rate": 44101, "out_rate": 24000}, ValueError, "unsupported rate ratio"),
        ({"in_rate": 48000.0, "out_rate": 24000}, TypeError, "int"),
        ({"in_rate": True, "out_rate": 24000}, TypeError, "int"),
        ({"in_rate": 48000, "out_rate": 24000, "in_format": "S8"}, ValueError, "in_format"),
        ({"in_rate": 48000, "out_rate": 24000, "channel": "centre"}, ValueError, "channel"),
        ({"in_rate": 48000, "out_rate": 24000, "channel": "right"}, ValueError, "in_channels"),
        ({"in_rate": 48000, "out_rate": 24000, "in_channels": 0}, ValueError, "in_channels"),
        ({"in_rate": 48000, "out_rate": 24000, "out_channels": 3}, ValueError, "out_channels"),
        ({"in_rate": 48000, "out_rate": 24000, "gain_db": math.nan}, ValueError, "gain_db"),
        ({"in_rate": 48000, "out_rate": 24000, "gain_db": 100.0}, ValueError, "gain_db"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        Resampler(**kwargs)  # type: ignore[arg-type]


def test_bad_call_arguments() -> None:
    r = Resampler(48000, 24000)
    with pytest.raises(TypeError):
        r.process("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        r.max_output_bytes(-1)
    with pytest.raises(TypeError):
        Resampler(48000, 24000, "S16_LE")  # type: ignore[call-arg]  # keyword-only


def test_properties() -> None:
    r = Resampler(44100, 24000, in_format="S32_LE", in_channels=2, channel="mix",
                  out_channels=2, dc_remove=True, gain_db=-3.0)
    assert (r.in_rate, r.out_rate, r.in_format, r.in_channels, r.channel) == (
        44100, 24000, "S32_LE", 2, "mix")
    assert (r.out_channels, r.dc_remove, r.gain_db) == (2, True, -3.0)
    assert (r.phases, r.decimation) == (80, 147)
    assert r.in_frame_bytes == 8 and r.out_frame_bytes == 4
    proto = np.frombuffer(r.prototype(), dtype=np.float64)
    assert len(proto) == r.filter_length
    assert np.allclose(proto, proto[::-1])  # linear phase
    assert abs(proto.sum() - 80 * 10 ** (-3 / 20)) < 1e-9
    assert "44100" in repr(r)


def test_gil_released_during_process() -> None:
    """Another thread runs while a big process() call is in C (deterministic: with a huge
    switch interval a GIL-holding call would let the other thread run 0 times)."""
    r = Resampler(44100, 24000)
    big = bytes(2 * 44100 * 100)  # 100 s of audio: ~20 ms of work here, more on a Pi
    counter = [0]
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()
        while not stop.is_set():
            counter[0] += 1
            stop.wait(0.0002)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    t = threading.Thread(target=spin)
    try:
        t.start()
        started.wait()
        before = counter[0]
        r.process(big)
        after = counter[0]
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert after - before >= 1
