"""Fake ALSA devices for hardware-in-the-loop tests and the demo.

alsa-lib reads ``ALSA_CONFIG_PATH`` on every config update and reloads the whole tree
when the *list of files* changes (measured with alsa-lib 1.2.8: switching the variable
to a new file in a running process makes the next ``snd_pcm_open`` see the new PCMs;
rewriting the same file in place is NOT reliably picked up). So every change here writes
a fresh, numbered config file and :meth:`FakeAlsaEnv.activate` points the variable at
it; no subprocess is needed. For a child process pass :meth:`FakeAlsaEnv.env`.

Devices:

* :meth:`FakeAlsaEnv.mic_from_wav` — a ``type file`` PCM over ``null`` whose ``infile`` is
  a FIFO fed by a thread writing whole periods of a WAV in real time: reads block like a
  real I2S mic (opening the PCM blocks until the feeder opens the FIFO, which it does at
  once). After the WAV ends the feeder sends silence (or loops) so reads never see the
  plugin's recycled stale frames.
* :meth:`FakeAlsaEnv.speaker` — a ``type file`` PCM writing raw frames to a file (tail
  flushed on close, not paced).
* :meth:`FakeAlsaEnv.fault_device` — parley's own ``parleyfault`` ioplug PCM
  (hw/alsa_fault): paced by the clock in period steps, playback lands in a file as it is
  "played", capture reads a raw file; faults (xrun, vanished device, stall, busy) are
  injected through a control file.

Usage (demo)::

    env = FakeAlsaEnv(tmpdir)
    mic = env.mic_from_wav(Path("hello.wav"), period_frames=960)
    spk = env.speaker()
    env.activate()              # before the first PCM open in this process
    ...                         # CaptureConfig(device=mic, ...), PlaybackConfig(device="fakespk")
    env.close()
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "build" / "alsa" / "libasound_module_pcm_parleyfault.so"
SYSTEM_CONF = "/usr/share/alsa/alsa.conf"

_FORMATS = {2: "S16_LE", 3: "S24_3LE", 4: "S32_LE"}


def build_plugin() -> Path:
    """Build the fault plugin if needed (``make -C hw/alsa_fault``); returns its path."""
    subprocess.run(
        ["make", "-s", "-C", str(REPO / "hw" / "alsa_fault")],
        check=True, capture_output=True, text=True,
    )
    return PLUGIN


class _Feeder(threading.Thread):
    """Writes raw frames into a FIFO at real-time pace, whole periods per write."""

    def __init__(self, fifo: Path, frames: bytes, frame_bytes: int, rate: int, *,
                 period_frames: int, after: str) -> None:
        super().__init__(daemon=True, name=f"fifo-feeder:{fifo.name}")
        self.fifo = fifo
        self.frames = frames
        self.frame_bytes = frame_bytes
        self.rate = rate
        self.period = period_frames
        self.after = after
        self.stop_event = threading.Event()
        self.paused = threading.Event()
        self._lock = threading.Lock()
        self._pending = bytearray(frames)
        self.periods_written = 0
        self.write_times: list[float] = []

    def queue(self, frames: bytes) -> None:
        """Play ``frames`` (the device's native format) next, then silence again:
        how the demo and the service tests "speak" into the mic at a chosen moment."""
        with self._lock:
            self._pending += frames

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return len(self._pending)

    def _next_period(self, pbytes: int) -> bytes:
        with self._lock:
            if not self._pending and self.after == "loop" and self.frames:
                self._pending += self.frames
            chunk = bytes(self._pending[:pbytes])
            del self._pending[:pbytes]
        return chunk + bytes(pbytes - len(chunk))

    def _open(self) -> int | None:
        # A blocking open releases the GIL while it waits for the reader. pyalsaaudio holds
        # the GIL while snd_pcm_open() opens the FIFO for reading, so a writer polling with
        # O_NONBLOCK in Python would deadlock with it.
        fd = os.open(self.fifo, os.O_WRONLY)
        if self.stop_event.is_set():
            os.close(fd)
            return None
        return fd

    def run(self) -> None:
        pbytes = self.period * self.frame_bytes
        while not self.stop_event.is_set():
            fd = self._open()
            if fd is None:
                return
            t0 = time.monotonic()
            n = 0
            try:
                while not self.stop_event.is_set():
                    if self.paused.is_set():  # a stalled mic: no data, reader blocks
                        time.sleep(0.01)
                        t0 = time.monotonic() - n * self.period / self.rate
                        continue
                    chunk = self._next_period(pbytes)
                    os.write(fd, chunk)
                    self.periods_written += 1
                    self.write_times.append(time.monotonic())
                    n += 1
                    delay = t0 + n * self.period / self.rate - time.monotonic()
                    if delay > 0:
                        self.stop_event.wait(delay)
            except BrokenPipeError:
                pass  # the reader closed the PCM; wait for it to reopen
            finally:
                os.close(fd)


@dataclass
class FaultDevice:
    """A ``parleyfault`` PCM and its control file."""

    name: str
    control: Path
    out_path: Path
    in_path: Path | None
    xruns: int = 0

    def _write(self, mode: str) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(f"mode={mode} xrun={self.xruns}\n")
        tmp.replace(self.control)  # atomic: the plugin never reads half a file
        self._mode = mode

    def __post_init__(self) -> None:
        self._mode = "ok"
        self._write("ok")

    def xrun(self) -> None:
        """Inject one xrun (-EPIPE) at the next pointer update."""
        self.xruns += 1
        self._write(self._mode)

    def vanish(self) -> None:
        """Unplug: every call and every open fails with -ENODEV until :meth:`restore`."""
        self._write("nodev")

    def stall(self) -> None:
        """Freeze the device clock: no progress, poll never ready."""
        self._write("stall")

    def busy(self) -> None:
        """Opening fails with -EBUSY until :meth:`restore`."""
        self._write("busy")

    def restore(self) -> None:
        self._write("ok")


@dataclass
class FakeAlsaEnv:
    """A directory of fake ALSA devices and the config that defines them."""

    root: Path
    plugin: Path = PLUGIN
    _pcms: dict[str, str] = field(default_factory=dict)
    _feeders: list[_Feeder] = field(default_factory=list)
    _version: int = 0
    _active: bool = False
    config_path: Path | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()

    # --- config ---------------------------------------------------------------------

    def _write_config(self) -> None:
        self._version += 1
        lines = ["# generated by hw/fake_alsa.py", ""]
        if any("parleyfault" in body for body in self._pcms.values()):
            lines.append(f'pcm_type.parleyfault {{ lib "{self.plugin}" }}')
        for name, body in self._pcms.items():
            lines.append(f"pcm.{name} {{\n{body}\n}}")
        path = self.root / f"asound-{os.getpid()}-{self._version}.conf"
        path.write_text("\n".join(lines) + "\n")
        self.config_path = path
        if self._active:
            os.environ["ALSA_CONFIG_PATH"] = self.alsa_config_path

    @property
    def alsa_config_path(self) -> str:
        return f"{SYSTEM_CONF}:{self.config_path}"

    def env(self) -> dict[str, str]:
        """Environment variables for a child process using these devices."""
        return {"ALSA_CONFIG_PATH": self.alsa_config_path}

    def activate(self) -> None:
        """Point this process's alsa-lib at the devices (and keep it updated)."""
        self._active = True
        os.environ["ALSA_CONFIG_PATH"] = self.alsa_config_path

    def close(self) -> None:
        for f in self._feeders:
            f.stop_event.set()
        for f in self._feeders:
            # unblock a feeder waiting in open() for a reader
            with contextlib.suppress(OSError):
                fd = os.open(f.fifo, os.O_RDONLY | os.O_NONBLOCK)
                os.close(fd)
            f.join(timeout=2)
        self._feeders.clear()

    # --- devices --------------------------------------------------------------------

    def mic_from_wav(self, wav_path: Path, *, name: str = "fakemic", period_frames: int = 960,
                     after: str = "silence") -> str:
        """A FIFO-fed capture PCM playing ``wav_path`` in real time; returns its name.

        ``after``: what the feeder sends once the WAV is over, ``"silence"`` or ``"loop"``.
        The WAV's rate, channels and sample width define the device's native format.
        """
        with wave.open(str(wav_path), "rb") as w:
            frames = w.readframes(w.getnframes())
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        if width not in _FORMATS:
            raise ValueError(f"unsupported WAV sample width {width}")
        fifo = self.root / f"{name}.fifo"
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo)
        self._pcms[name] = (
            f'  type file\n  slave.pcm "null"\n  file "/dev/null"\n'
            f'  infile "{fifo}"\n  format "raw"'
        )
        feeder = _Feeder(fifo, frames, width * channels, rate,
                         period_frames=period_frames, after=after)
        feeder.start()
        self._feeders.append(feeder)
        self.mic_info = {"rate": rate, "channels": channels, "format": _FORMATS[width]}
        self._write_config()
        return name

    def feeder(self, name: str = "fakemic") -> _Feeder:
        for f in self._feeders:
            if f.fifo.name == f"{name}.fifo":
                return f
        raise KeyError(name)

    def speaker(self, *, name: str = "fakespk") -> Path:
        """A playback PCM writing raw frames to a file (returned); not paced."""
        out = self.root / f"{name}.raw"
        out.write_bytes(b"")
        self._pcms[name] = f'  type file\n  slave.pcm "null"\n  file "{out}"\n  format "raw"'
        self._write_config()
        return out

    def fault_device(self, *, name: str = "faultdev", infile: Path | None = None,
                     rate: int | None = None, channels: int | None = None,
                     format: str | None = None) -> FaultDevice:
        """A paced fake PCM with fault injection (needs the plugin built)."""
        if not self.plugin.exists():
            raise FileNotFoundError(
                f"{self.plugin} is missing; build it with: make -C hw/alsa_fault"
            )
        control = self.root / f"{name}.ctl"
        out = self.root / f"{name}.out.raw"
        out.write_bytes(b"")
        body = ["  type parleyfault", f'  control "{control}"', f'  file "{out}"']
        if infile is not None:
            body.append(f'  infile "{Path(infile).resolve()}"')
        if rate:
            body.append(f"  rate {rate}")
        if channels:
            body.append(f"  channels {channels}")
        if format:
            body.append(f'  format "{format}"')
        dev = FaultDevice(name, control, out, infile)
        self._pcms[name] = "\n".join(body)
        self._write_config()
        return dev
