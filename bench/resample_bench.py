"""Resampler benchmark: parley (hw.resample) vs python-soxr HQ/MQ, libsamplerate and
libspeexdsp quality 8, side by side in one process.

Throughput: million input samples per second (MS/s), mono S16, fed from Python in 10 ms
chunks to a streaming object (best of several passes). libsamplerate is float-only, so its
figure includes the int16<->float32 conversions a caller needs; speexdsp is called through
ctypes with preallocated buffers.

Quality, each measured on the int16 output of every resampler the same way:
  rejection  worst component that must be rejected, in dB below a full-scale (30000) tone:
             for tones in the passband (0.1..0.9 Nl) and, where the input has any, in the
             stopband (1.1 Nl .. in/2), every component at |k*in +/- f| >= 1.1 Nl, observed
             at its folded output frequency (Nl = lower Nyquist; see hw/csrc/resample.h).
  ripple     largest |level error| in dB of tones from 0.02 to 0.9 Nl.
  delay      latency of a click in a 10 ms-chunked stream: the click's position in the output
             plus the input time the resampler still held back when the call returned.
Frequency responses (parley beside soxr HQ) go to bench-out/resample_<in>_<out>.png.

Usage: .venv/bin/python bench/resample_bench.py [--quick] [--no-plots]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hw.resample import Resampler

CONVERSIONS = [
    (48000, 24000), (44100, 24000), (32000, 24000), (22050, 24000), (16000, 24000),
    (8000, 24000), (24000, 48000), (24000, 44100), (24000, 32000), (24000, 22050),
    (24000, 16000), (24000, 8000),
]
AMP = 30000.0

# A streamer takes an int16 chunk (np.ndarray) and returns int16 output (np.ndarray);
# flush() returns the rest. make(in_rate, out_rate) -> (process, flush)
Process = Callable[[np.ndarray], np.ndarray]
Flush = Callable[[], np.ndarray]


def make_parley(i: int, o: int) -> tuple[Process, Flush]:
    r = Resampler(i, o)

    def process(x: np.ndarray) -> np.ndarray:
        return np.frombuffer(r.process(x), dtype="<i2")

    def flush() -> np.ndarray:
        return np.frombuffer(r.flush(), dtype="<i2")

    return process, flush


def parley_fast(i: int, o: int) -> Callable[[bytes], object]:
    """The call a daemon makes: bytes in, bytes out."""
    return Resampler(i, o).process


def make_soxr(quality: str) -> Callable[[int, int], tuple[Process, Flush]]:
    import soxr

    def make(i: int, o: int) -> tuple[Process, Flush]:
        s = soxr.ResampleStream(i, o, 1, dtype="int16", quality=quality)

        def flush() -> np.ndarray:
            return np.asarray(s.resample_chunk(np.zeros(0, np.int16), last=True))

        return s.resample_chunk, flush

    return make


def make_lsr(kind: str) -> Callable[[int, int], tuple[Process, Flush]]:
    import samplerate

    def make(i: int, o: int) -> tuple[Process, Flush]:
        s = samplerate.Resampler(kind, channels=1)
        ratio = o / i

        def to16(y: np.ndarray) -> np.ndarray:
            return np.clip(np.rint(y * 32768.0), -32768, 32767).astype(np.int16)

        def process(x: np.ndarray) -> np.ndarray:
            return to16(s.process(x.astype(np.float32) * (1 / 32768), ratio))

        def flush() -> np.ndarray:
            return to16(s.process(np.zeros(0, np.float32), ratio, end_of_input=True))

        return process, flush

    return make


class Speex:
    """libspeexdsp through ctypes (speex_resampler_process_int)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("speexdsp") or "libspeexdsp.so.1"
        lib = ctypes.CDLL(name)
        lib.speex_resampler_init.restype = ctypes.c_void_p
        lib.speex_resampler_init.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                                             ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.speex_resampler_process_int.restype = ctypes.c_int
        lib.speex_resampler_process_int.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
        lib.speex_resampler_destroy.argtypes = [ctypes.c_void_p]
        lib.speex_resampler_get_input_latency.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def make(self, quality: int) -> Callable[[int, int], tuple[Process, Flush]]:
        lib = self.lib

        def make(i: int, o: int) -> tuple[Process, Flush]:
            err = ctypes.c_int(0)
            st = lib.speex_resampler_init(1, i, o, quality, ctypes.byref(err))
            if not st or err.value:
                raise RuntimeError(f"speex_resampler_init failed: {err.value}")
            holder = _SpeexHandle(lib, st)
            out = np.zeros(1 << 16, dtype=np.int16)
            out_ptr = out.ctypes.data
            in_len, out_len = ctypes.c_uint32(0), ctypes.c_uint32(0)
            pin, pout = ctypes.byref(in_len), ctypes.byref(out_len)
            proc = lib.speex_resampler_process_int

            def process(x: np.ndarray) -> np.ndarray:
                n = len(x)
                if n > len(out) // 8:  # big one-shot call: size the output for it
                    big = np.zeros(n * o // i + 1024, dtype=np.int16)
                    in_len.value, out_len.value = n, len(big)
                    proc(holder.st, 0, x.ctypes.data, pin, big.ctypes.data, pout)
                    return big[: out_len.value].copy()
                in_len.value, out_len.value = n, len(out)
                proc(holder.st, 0, x.ctypes.data, pin, out_ptr, pout)
                return out[: out_len.value]

            def flush() -> np.ndarray:
                lat = lib.speex_resampler_get_input_latency(holder.st)
                return process(np.zeros(lat, np.int16)).copy()

            return process, flush

        return make


class _SpeexHandle:
    def __init__(self, lib: ctypes.CDLL, st: int) -> None:
        self.lib, self.st = lib, st

    def __del__(self) -> None:
        self.lib.speex_resampler_destroy(self.st)


@dataclass
class Result:
    msps: float = math.nan
    rejection: float = math.nan
    ripple: float = math.nan
    delay_ms: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)


# ---- measurements ------------------------------------------------------------------------


def throughput(make: Callable[[int, int], tuple[Process, Flush]] | None, i: int, o: int,
               seconds: float, passes: int, *, fast: Callable[[bytes], object] | None = None
               ) -> float:
    rng = np.random.default_rng(1)
    n = i // 100
    total = int(seconds * 100)
    x = np.clip(rng.standard_normal(n * total) * 4000, -32768, 32767).astype(np.int16)
    if fast is not None:
        chunks_b = [x[k * n: (k + 1) * n].tobytes() for k in range(total)]
        best = math.inf
        for _ in range(passes):
            t = time.perf_counter()
            for cb in chunks_b:
                fast(cb)
            best = min(best, time.perf_counter() - t)
        return len(x) / best / 1e6
    assert make is not None
    process, _ = make(i, o)
    chunks = [x[k * n: (k + 1) * n] for k in range(total)]
    best = math.inf
    for _ in range(passes):
        t = time.perf_counter()
        for c in chunks:
            process(c)
        best = min(best, time.perf_counter() - t)
    return len(x) / best / 1e6


_WIN: dict[int, tuple[np.ndarray, float]] = {}


def amp_at(y: np.ndarray, rate: int, freq: float) -> float:
    if len(y) not in _WIN:
        w = np.kaiser(len(y), 20.0)
        _WIN[len(y)] = (w, float(w.sum()))
    w, ws = _WIN[len(y)]
    e = np.exp(-2j * np.pi * freq / rate * np.arange(len(y)))
    return float(2 * abs(np.dot(w * y, e)) / ws)


def fold(f: float, rate: float) -> float:
    f = math.fmod(f, rate)
    return rate - f if f > rate / 2 else f


def tone_output(make: Callable[[int, int], tuple[Process, Flush]], i: int, o: int, f: float,
                nout: int) -> np.ndarray:
    """Steady-state int16 output (nout samples) for a full-scale-ish tone at f."""
    skip = o // 10 + 2000  # past any start-up transient / hold-back
    n_in = int((skip + nout + 200) * i / o) + 2048
    x = np.rint(AMP * np.sin(2 * np.pi * f / i * np.arange(n_in))).astype(np.int16)
    process, flush = make(i, o)
    y = np.concatenate([process(x), flush()]).astype(np.float64)
    return y[skip: skip + nout]


def quality(make: Callable[[int, int], tuple[Process, Flush]], i: int, o: int, quick: bool
            ) -> tuple[float, float]:
    nl = min(i, o) / 2
    nout = 8192
    levels = []
    for frac in (0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)[:: 2 if quick else 1]:
        f = frac * nl + 0.1234567
        y = tone_output(make, i, o, f, nout)
        levels.append(20 * math.log10(amp_at(y, o, f) / AMP + 1e-30))
    ripple = max(abs(v) for v in levels)
    tones = [nl * k / 5 * 0.9 + 0.1234567 for k in range(1, 6)]
    if 1.1 * nl < 0.995 * i / 2:
        tones += [1.1 * nl + (0.995 * i / 2 - 1.1 * nl) * k / 4 + 0.1234567 for k in range(5)]
    worst = -400.0
    for f in tones[:: 2 if quick else 1]:
        y = tone_output(make, i, o, f, nout)
        keep = fold(f, o) if f < nl else -1e9
        for k in range(5):
            for sgn in (-1, 1):
                g = abs(k * i + sgn * f)
                if g < 1.1 * nl:
                    continue
                at = fold(g, o)
                if abs(at - keep) < 60.0:
                    continue
                worst = max(worst, 20 * math.log10(amp_at(y, o, at) / AMP + 1e-30))
    return -worst, ripple


def latency_ms(make: Callable[[int, int], tuple[Process, Flush]], i: int, o: int) -> float:
    """Click at input time 0.5 s, fed in 10 ms chunks: position in the output + backlog."""
    n = i // 100
    x = np.zeros(i, dtype=np.int16)
    click_at = i // 2
    # a band-limited click (windowed sinc at 0.4 x lower Nyquist) so every resampler passes it
    k = np.arange(-64, 65)
    fc = 0.4 * min(i, o) / i
    x[click_at - 64: click_at + 65] = np.rint(
        20000 * np.sinc(2 * fc * k) * np.kaiser(len(k), 8.0)).astype(np.int16)
    process, _ = make(i, o)
    outs = []
    backlog = []
    fed = got = 0
    for c in range(len(x) // n):
        y = process(x[c * n: (c + 1) * n])
        outs.append(np.array(y, dtype=np.float64))
        fed += n
        got += len(y)
        if c > 20:
            backlog.append(fed / i - got / o)
    y = np.concatenate(outs)
    p = int(np.argmax(np.abs(y)))
    if 0 < p < len(y) - 1:  # parabolic peak interpolation
        a, b, cc = abs(y[p - 1]), abs(y[p]), abs(y[p + 1])
        den = a - 2 * b + cc
        p_f = p + (0.5 * (a - cc) / den if den else 0.0)
    else:
        p_f = float(p)
    content = p_f / o - click_at / i
    return (content + float(np.mean(backlog))) * 1e3


def response(make: Callable[[int, int], tuple[Process, Flush]], i: int, o: int, npts: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Effective response at f in [0, max/2]: tone at fold(f, in), level at fold(f, out)."""
    top = max(i, o) / 2
    fs = np.linspace(20.0, top * 0.999, npts) + 0.1234567
    db = []
    for f in fs:
        y = tone_output(make, i, o, fold(f, i), 8192)
        db.append(20 * math.log10(amp_at(y, o, fold(f, o)) / AMP + 1e-12))
    return fs, np.array(db)


def call_overhead(peers: dict[str, Callable[[int, int], tuple[Process, Flush]]]) -> str:
    """Per-call time from Python for an empty chunk and a 10 ms chunk, 48 kHz -> 24 kHz."""
    n_calls = 20000
    x = np.zeros(480, dtype=np.int16)
    empty = np.zeros(0, dtype=np.int16)
    r = Resampler(48000, 24000)
    out = bytearray(r.max_output_bytes(960))
    xb = x.tobytes()
    rows = []

    def per_call(fn: Callable[[], object]) -> float:
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(n_calls):
                fn()
            best = min(best, time.perf_counter() - t)
        return best / n_calls * 1e6

    rows.append(("parley process", per_call(lambda: r.process(b"")),
                 per_call(lambda: r.process(xb))))
    rows.append(("parley process_into", per_call(lambda: r.process_into(b"", out)),
                 per_call(lambda: r.process_into(xb, out))))
    for name in ("soxr HQ", "speex q8"):
        if name in peers:
            proc, _ = peers[name](48000, 24000)
            rows.append((name, per_call(lambda p=proc: p(empty)), per_call(lambda p=proc: p(x))))
    text = [f"{'call cost, 48->24 (us/call)':<30}{'empty':>8}{'10 ms':>8}"]
    text += [f"{name:<30}{a:8.2f}{b:8.2f}" for name, a, b in rows]
    return "\n".join(text)


def plot(i: int, o: int, curves: dict[str, tuple[np.ndarray, np.ndarray]], outdir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nl = min(i, o) / 2
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, (f, db) in curves.items():
        ax1.plot(f / 1000, db, label=name, lw=1)
        m = f <= 1.05 * nl
        ax2.plot(f[m] / 1000, db[m], label=name, lw=1)
    for ax in (ax1, ax2):
        ax.axvline(0.9 * nl / 1000, color="g", ls=":", lw=0.8)
        ax.axvline(1.1 * nl / 1000, color="r", ls=":", lw=0.8)
        ax.set_xlabel("frequency (kHz, before folding)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.axhline(-90, color="r", ls="--", lw=0.8)
    ax1.set_ylim(-150, 5)
    ax1.set_ylabel("level (dB re input tone)")
    ax1.set_title(f"{i} -> {o} Hz: response incl. aliases/images")
    ax2.set_ylim(-0.3, 0.15)
    ax2.axhspan(-0.1, 0.1, color="g", alpha=0.08)
    ax2.set_title("passband (green band: +/-0.1 dB, dotted: 0.9 / 1.1 Nl)")
    fig.tight_layout()
    path = os.path.join(outdir, f"resample_{i}_{o}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- main --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer passes and tones")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--outdir", default="bench-out")
    args = ap.parse_args()
    seconds, passes = (1.0, 3) if args.quick else (3.0, 7)

    peers: dict[str, Callable[[int, int], tuple[Process, Flush]]] = {"parley": make_parley}
    notes = []
    try:
        peers["soxr HQ"] = make_soxr("HQ")
        peers["soxr MQ"] = make_soxr("MQ")
    except ImportError:
        notes.append("python-soxr not installed")
    try:
        peers["lsr fastest"] = make_lsr("sinc_fastest")
        peers["lsr best"] = make_lsr("sinc_best")
    except ImportError:
        notes.append("samplerate not installed")
    try:
        peers["speex q8"] = Speex().make(8)
    except OSError:
        notes.append("libspeexdsp not found")

    print(f"resampler benchmark: mono S16, 10 ms chunks from Python, {seconds:.0f} s x "
          f"best of {passes}; parley kernel: {Resampler(48000, 24000).kernel}")
    os.makedirs(args.outdir, exist_ok=True)
    results: dict[tuple[int, int], dict[str, Result]] = {}
    for i, o in CONVERSIONS:
        res: dict[str, Result] = {}
        for name, make in peers.items():
            r = Result()
            fast = parley_fast(i, o) if name == "parley" else None
            r.msps = throughput(make, i, o, seconds, passes, fast=fast)
            r.rejection, r.ripple = quality(make, i, o, args.quick)
            r.delay_ms = latency_ms(make, i, o)
            res[name] = r
        results[(i, o)] = res
        if not args.no_plots:
            curves = {n: response(peers[n], i, o, 80 if args.quick else 200)
                      for n in ("parley", "soxr HQ") if n in peers}
            plot(i, o, curves, args.outdir)
        print(f"  measured {i}->{o}", file=sys.stderr)

    hdr = (f"{'conversion':<13}{'resampler':<13}{'MS/s':>8}{'parley/x':>10}"
           f"{'reject dB':>11}{'ripple dB':>11}{'delay ms':>10}")
    lines = [hdr, "-" * len(hdr)]
    for (i, o), res in results.items():
        p = res["parley"].msps
        for name, r in res.items():
            ratio = "" if name == "parley" else f"{p / r.msps:9.2f}x"
            lines.append(f"{f'{i}->{o}' if name == 'parley' else '':<13}{name:<13}"
                         f"{r.msps:8.1f}{ratio:>10}{r.rejection:11.1f}{r.ripple:11.3f}"
                         f"{r.delay_ms:10.2f}")
    lines.append("")
    shdr = (f"{'conversion':<13}{'parley':>8}{'soxr HQ':>9}{'speex q8':>9}"
            f"{'parley/soxrHQ':>15}{'parley/speex8':>15}   (MS/s)")
    lines += [shdr, "-" * len(shdr)]
    for (i, o), res in results.items():
        p = res["parley"].msps
        sx = res.get("soxr HQ", Result()).msps
        sp = res.get("speex q8", Result()).msps
        lines.append(f"{f'{i}->{o}':<13}{p:8.1f}{sx:9.1f}{sp:9.1f}{p / sx:14.2f}x"
                     f"{p / sp:14.2f}x")
    lines.append("")
    lines.append(call_overhead(peers))
    print("\n".join(lines))
    for n in notes:
        print("note:", n)
    if not args.no_plots:
        print(f"frequency responses: {args.outdir}/resample_<in>_<out>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
