"""Shared ALSA plumbing for :mod:`hw.alsa_capture` and :mod:`hw.alsa_playback`.

Opening a PCM with checked parameters, turning pyalsaaudio's errors into messages that
say what to do, finding the process that holds a busy device, a capped backoff, and a
wake-up pipe that lets the event loop interrupt a worker thread's ``poll()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import alsaaudio

from daemon.errors import AudioDeviceError

log = logging.getLogger(__name__)

Direction = Literal["capture", "playback"]

FORMATS: dict[str, tuple[int, int]] = {
    # name: (pyalsaaudio constant, bytes per sample)
    "S16_LE": (alsaaudio.PCM_FORMAT_S16_LE, 2),
    "S24_3LE": (alsaaudio.PCM_FORMAT_S24_3LE, 3),
    "S32_LE": (alsaaudio.PCM_FORMAT_S32_LE, 4),
}

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


def is_no_device(exc: BaseException) -> bool:
    """pyalsaaudio reports an unplugged device as 'No such device [...]' (no errno)."""
    return "No such device" in str(exc)


def _section(direction: Direction) -> str:
    return f"audio.{direction}"


def open_pcm(direction: Direction, device: str, *, rate: int, channels: int, fmt: str,
             period_frames: int, buffer_frames: int) -> Any:
    """Open ``device`` non-blocking with exactly these parameters, or raise a clear
    :class:`AudioDeviceError` (what went wrong and which config key to change)."""
    if fmt not in FORMATS:
        raise AudioDeviceError(f"{_section(direction)}.format {fmt!r} is not supported")
    pcm_type = alsaaudio.PCM_CAPTURE if direction == "capture" else alsaaudio.PCM_PLAYBACK
    periods = max(2, buffer_frames // period_frames)
    try:
        pcm = alsaaudio.PCM(
            pcm_type, alsaaudio.PCM_NONBLOCK, rate=rate, channels=channels,
            format=FORMATS[fmt][0], periodsize=period_frames, periods=periods, device=device,
        )
    except alsaaudio.ALSAAudioError as exc:
        raise open_error(direction, device, exc) from exc
    try:
        info = pcm.info()
    except alsaaudio.ALSAAudioError as exc:
        pcm.close()
        raise open_error(direction, device, exc) from exc
    got = (info.get("rate"), info.get("channels"), info.get("format_name"))
    if got != (rate, channels, fmt):
        pcm.close()
        raise AudioDeviceError(
            f"ALSA {direction} device {device!r} runs at {got[0]} Hz, {got[1]} channel(s), "
            f"{got[2]}, not {rate} Hz, {channels} channel(s), {fmt} as configured; set "
            f"{_section(direction)}.rate/channels/format to what `parley devices` lists, "
            f"or use a 'plughw:' device that converts"
        )
    return pcm


def open_error(direction: Direction, device: str, exc: BaseException) -> AudioDeviceError:
    """Translate an ALSAAudioError raised while opening into an actionable message."""
    text = str(exc)
    sec = _section(direction)
    if "busy" in text.lower():
        holders = find_pcm_holders(device, direction)
        who = (
            "held by " + ", ".join(f"{name} (pid {pid})" for pid, name in holders)
            if holders else "the process holding it could not be identified"
        )
        return AudioDeviceError(
            f"ALSA {direction} device {device!r} is busy: {who}. Stop that program, or "
            f"point {sec}.device at a shared device such as 'dsnoop'/'dmix' or 'default'"
        )
    if "No such device" in text:
        return AudioDeviceError(
            f"ALSA {direction} device {device!r} is not present (unplugged or its driver is "
            f"not loaded); check `aplay -l` / `arecord -l` and {sec}.device"
        )
    if "No such file or directory" in text or "Unknown PCM" in text:
        return AudioDeviceError(
            f"there is no ALSA {direction} device named {device!r}; `parley devices` lists "
            f"the names you can use in {sec}.device"
        )
    if "Permission denied" in text:
        return AudioDeviceError(
            f"no permission to open ALSA {direction} device {device!r}; add the user to "
            f"the 'audio' group (or SupplementaryGroups=audio in the service)"
        )
    if "Invalid argument" in text:
        return AudioDeviceError(
            f"ALSA {direction} device {device!r} rejected the configured rate, channels, "
            f"format or period/buffer size ({text}); `parley devices` lists what it supports"
        )
    return AudioDeviceError(f"cannot open ALSA {direction} device {device!r}: {text}")


# --- who holds a busy device ---------------------------------------------------------------

_HW_RE = re.compile(r"^(?:plug)?hw:(?:CARD=)?([^,]+)(?:,(?:DEV=)?(\d+))?")


def _card_index(card: str, proc: Path) -> int | None:
    if card.isdigit():
        return int(card)
    with contextlib.suppress(OSError):
        for line in (proc / "asound" / "cards").read_text().splitlines():
            m = re.match(r"\s*(\d+)\s+\[(\S+)\s*\]", line)
            if m and m.group(2) == card:
                return int(m.group(1))
    return None


def _device_nodes(device: str, direction: Direction, proc: Path) -> tuple[str, list[Path]]:
    """The /dev/snd node pattern and /proc/asound status files for a PCM name."""
    suffix = "c" if direction == "capture" else "p"
    m = _HW_RE.match(device)
    if m:
        card = _card_index(m.group(1), proc)
        dev = int(m.group(2) or 0)
        if card is not None:
            status = sorted((proc / "asound" / f"card{card}" / f"pcm{dev}{suffix}").glob(
                "sub*/status"))
            return f"/dev/snd/pcmC{card}D{dev}{suffix}", status
    # a plugin name ('default', 'dsnoop', ...): any PCM node of that direction
    status = sorted((proc / "asound").glob(f"card*/pcm*{suffix}/sub*/status"))
    return f"/dev/snd/pcmC*D*{suffix}", status


def find_pcm_holders(device: str, direction: Direction, *,
                     proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """Processes holding the kernel PCM behind ``device``: ``[(pid, command name)]``.

    Looks at ``owner_pid`` in /proc/asound/card*/pcm*/sub*/status and at /proc/*/fd links
    to /dev/snd/pcm* nodes; either may be unreadable (other users' processes), so the
    result can be empty.
    """
    pattern, status_files = _device_nodes(device, direction, proc)
    node_re = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
    pids: set[int] = set()
    for status in status_files:
        with contextlib.suppress(OSError):
            m = re.search(r"owner_pid\s*:\s*(\d+)", status.read_text())
            if m:
                pids.add(int(m.group(1)))
    me = os.getpid()
    for entry in _iter_pids(proc):
        if entry == me:
            continue
        fd_dir = proc / str(entry) / "fd"
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if node_re.match(os.readlink(fd)):
                        pids.add(entry)
                        break
    result = []
    for pid in sorted(pids):
        name = "?"
        with contextlib.suppress(OSError):
            name = (proc / str(pid) / "comm").read_text().strip()
        result.append((pid, name))
    return result


def _iter_pids(proc: Path) -> Iterable[int]:
    with contextlib.suppress(OSError):
        for p in proc.iterdir():
            if p.name.isdigit():
                yield int(p.name)


# --- worker-thread helpers -----------------------------------------------------------------


class Backoff:
    """Capped exponential backoff: initial, 2x, 4x ... up to ``cap`` seconds."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Waker:
    """A self-pipe: the loop calls :meth:`wake`; the worker includes :attr:`fd` in its
    poll set, or sleeps with :meth:`sleep` (interruptible)."""

    def __init__(self) -> None:
        self.fd, self._wfd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wfd, False)
        self.event = threading.Event()

    def wake(self) -> None:
        self.event.set()
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wfd, b"!")

    def drain(self) -> None:
        self.event.clear()
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.fd, 512):
                pass

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; returns early when woken."""
        self.event.wait(seconds)
        self.drain()

    def close(self) -> None:
        for fd in (self.fd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)


class PcmPoller:
    """poll() over a PCM's descriptors plus the waker; returns the PCM's demangled revents
    (``polldescriptors_revents`` after every wake-up, as alsa-lib requires)."""

    def __init__(self, pcm: Any, waker: Waker) -> None:
        self._pcm = pcm
        self._waker = waker
        self._poll = select.poll()
        self._fds = set()
        for fd, events in pcm.polldescriptors():
            self._poll.register(fd, events)
            self._fds.add(fd)
        self._poll.register(waker.fd, select.POLLIN)

    def wait(self, timeout_s: float) -> tuple[int, bool]:
        """Returns (PCM revents, woken by the loop)."""
        try:
            ready = self._poll.poll(max(0, int(timeout_s * 1000)))
        except InterruptedError:
            ready = []
        woken = False
        pcm_events: list[tuple[int, int]] = []
        for fd, ev in ready:
            if fd == self._waker.fd:
                woken = True
            elif fd in self._fds:
                pcm_events.append((fd, ev))
        if woken:
            self._waker.drain()
        revents = 0
        if pcm_events:
            revents = int(self._pcm.polldescriptors_revents(pcm_events))
        return revents, woken


class RateLimitedLog:
    """Logs a repeating condition at most once per ``interval`` seconds, with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._log = logger
        self._interval = interval
        self._last = -1e9
        self._suppressed = 0

    def warning(self, now: float, msg: str, *args: object) -> None:
        if now - self._last >= self._interval:
            extra = f" ({self._suppressed} more since last report)" if self._suppressed else ""
            self._log.warning(msg + extra, *args)
            self._last = now
            self._suppressed = 0
        else:
            self._suppressed += 1


FAILED_AFTER = 3
"""Consecutive failed opens after which the state reads ``failed`` (retries continue)."""


class Stalled(Exception):
    """The device stopped making progress; the worker reopens it."""


def close_pcm(pcm: Any) -> None:
    with contextlib.suppress(alsaaudio.ALSAAudioError):
        pcm.drop()
    with contextlib.suppress(alsaaudio.ALSAAudioError):
        pcm.close()


class DeviceWorker:
    """The worker thread's life shared by capture and playback: open the PCM, stream it,
    and on a failure (vanished, stalled, any ALSA error) close and reopen with backoff,
    keeping ``state`` / ``last_error`` / ``reopens`` up to date for the stats.

    Subclasses set the attributes below and implement :meth:`_stream`.
    """

    direction: Direction
    cfg: Any  # CaptureConfig | PlaybackConfig: device, rate, channels, format, frames
    join_timeout_s: float
    _lock: threading.Lock
    _stop: threading.Event
    _backoff: Backoff
    _state: str
    _last_error: str
    _reopens: int

    async def _run_worker(self, waker: Waker, *, close_waker: bool) -> None:
        """The owner task's body: serve the device on a worker thread until cancelled.

        This is the boundary between the thread and the loop: the thread hands its end
        (an exception, or None) back with ``call_soon_threadsafe``, and the loop never
        waits on ALSA.  Cancelling stops the thread and waits up to ``join_timeout_s``;
        a thread stuck in a driver call is abandoned (it is a daemon thread) rather than
        hanging the daemon's shutdown.
        """
        loop = asyncio.get_running_loop()
        self._stop.clear()
        done: asyncio.Future[BaseException | None] = loop.create_future()

        def finished(exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(exc)

        def main() -> None:
            exc: BaseException | None = None
            try:
                self._serve_device(loop, waker)
            except BaseException as e:  # re-raised by the owner task
                exc = e
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(finished, exc)

        thread = threading.Thread(target=main, name=f"alsa-{self.direction}:{self.cfg.device}",
                                  daemon=True)
        thread.start()
        try:
            exc = await asyncio.shield(done)
            if exc is not None:
                raise exc
            raise RuntimeError(f"{self.direction} thread ended without being stopped")
        finally:
            self._stop.set()
            waker.wake()
            if not done.done():
                try:
                    await asyncio.wait_for(asyncio.shield(done), self.join_timeout_s)
                except TimeoutError:
                    log.error(
                        "%s thread for %r did not stop within %.1f s (the device hung in a "
                        "driver call); abandoning it",
                        self.direction, self.cfg.device, self.join_timeout_s,
                    )
            with self._lock:
                self._state = "stopped"
            if close_waker and not thread.is_alive():
                waker.close()

    def _set(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, "_" + k, v)

    def _stream(self, pcm: Any, loop: Any) -> None:
        raise NotImplementedError

    def _after_stream(self) -> None:
        """Called after every stream ends, before the PCM is closed."""

    def _serve_device(self, loop: Any, waker: Waker) -> None:
        cfg = self.cfg
        failures = 0
        first = True
        while not self._stop.is_set():
            try:
                pcm = open_pcm(
                    self.direction, cfg.device, rate=cfg.rate, channels=cfg.channels,
                    fmt=cfg.format, period_frames=cfg.period_frames,
                    buffer_frames=cfg.buffer_frames,
                )
            except AudioDeviceError as exc:
                failures += 1
                delay = self._backoff.next()
                msg = str(exc)
                if msg != self._last_error:
                    log.error("%s (retrying every %.1f s at most)", msg, self._backoff.cap)
                self._set(state="failed" if failures >= FAILED_AFTER else "reopening",
                          last_error=msg)
                waker.sleep(delay)
                continue
            if not first:
                with self._lock:
                    self._reopens += 1
                log.info("%s device %r reopened", self.direction, cfg.device)
            first = False
            failures = 0
            self._set(state="running", last_progress=time.monotonic())
            try:
                self._stream(pcm, loop)
            except (alsaaudio.ALSAAudioError, Stalled) as exc:
                what = (
                    "vanished" if is_no_device(exc) else
                    "stalled" if isinstance(exc, Stalled) else "failed"
                )
                msg = f"{self.direction} device {cfg.device!r} {what}: {exc}; reopening"
                log.warning("%s", msg)
                self._set(state="reopening", last_error=msg)
                self._after_stream()
                close_pcm(pcm)
                waker.sleep(self._backoff.next())
                continue
            self._after_stream()
            close_pcm(pcm)
