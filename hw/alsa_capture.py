"""ALSA microphone: :class:`AlsaCapture` implements :class:`hw.audio.AudioCapture`.

Threading model (the one boundary)
----------------------------------
``run()`` starts ONE worker thread that owns the capture PCM: it opens it non-blocking,
waits in ``poll()`` on the PCM's descriptors (plus a wake-up pipe, with a deadline), reads,
resamples to 24 kHz mono S16_LE in C (:class:`hw.resample.Resampler`, GIL released), cuts
fixed ``chunk_ms`` chunks, and hands each chunk to the event loop with
``loop.call_soon_threadsafe`` — the only way data crosses from the thread to the loop. The
sink is therefore always called on the loop. Counters are shared under a lock and read
by :attr:`AlsaCapture.stats`.

Why a thread and not the PCM's poll descriptors on the loop: some capture PCMs block
inside a "non-blocking" read (the ``file`` plugin reading a FIFO, several USB/bluetooth
plugins), and resampling a period is real work; neither may stall the loop. The thread's
own ``poll()`` deadline is what detects a stalled device (a blocking read would wait
forever in alsa-lib).

Faults
------
* overrun (``read()`` returns -EPIPE; pyalsaaudio has already re-prepared): counted, logged
  (rate-limited), read again at once (a re-prepared capture does not wake ``poll()``);
  the resampler keeps running, so the stream continues with a gap.
* device gone ('No such device'), any other ALSA error, or no data for
  ``stall_reopen_s``: the PCM is closed and reopened with capped exponential backoff;
  ``stats.state`` is ``reopening`` (``failed`` after 3 failed opens in a row) meanwhile.
* no data for ``stall_timeout_s``: ``stats.state`` reads ``stalled`` — derived from
  ``last_progress`` at the time ``stats`` is read, so it is reported even when the device
  hangs the worker thread inside a read.
* cancelling ``run()`` stops the thread and waits for it (up to ``join_timeout_s``, without
  blocking the loop); ``CancelledError`` always propagates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import alsaaudio

from daemon.config import CaptureConfig
from hw.alsa_pcm import (
    POLLERR,
    Backoff,
    DeviceWorker,
    PcmPoller,
    RateLimitedLog,
    Stalled,
    Waker,
)
from hw.audio import SAMPLE_BYTES, CaptureStats, StreamState, ms_to_samples
from hw.resample import Resampler

log = logging.getLogger(__name__)

class AlsaCapture(DeviceWorker):
    """Capture from ``cfg.device`` and deliver 24 kHz mono S16_LE chunks of ``chunk_ms``."""

    direction = "capture"

    def __init__(self, cfg: CaptureConfig, chunk_ms: int, *, stall_timeout_s: float = 0.5,
                 stall_reopen_s: float = 2.0, backoff_initial_s: float = 0.2,
                 backoff_max_s: float = 5.0, join_timeout_s: float = 2.0) -> None:
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        self.cfg = cfg
        self.chunk_ms = chunk_ms
        self._chunk_bytes = ms_to_samples(chunk_ms) * SAMPLE_BYTES
        period_s = cfg.period_frames / cfg.rate
        self.stall_timeout_s = max(stall_timeout_s, 3 * period_s)
        self.stall_reopen_s = max(stall_reopen_s, self.stall_timeout_s)
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self.join_timeout_s = join_timeout_s
        self._lock = threading.Lock()
        self._state: StreamState = "starting"
        self._overruns = 0
        self._reopens = 0
        self._stalls = 0
        self._chunks = 0
        self._last_error = ""
        self._last_progress = 0.0
        self._stop = threading.Event()
        self._waker: Waker | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._overrun_log = RateLimitedLog(log)
        # created here so a bad config fails at construction, not in the thread
        self._resampler = Resampler(
            cfg.rate, 24000, in_format=cfg.format, in_channels=cfg.channels,
            channel=cfg.channel, out_channels=1, dc_remove=cfg.dc_remove, gain_db=cfg.gain_db,
        )

    @property
    def chunk_bytes(self) -> int:
        return self._chunk_bytes

    @property
    def stats(self) -> CaptureStats:
        with self._lock:
            state = self._state
            if (state == "running" and self._last_progress
                    and time.monotonic() - self._last_progress > self.stall_timeout_s):
                state = "stalled"
            return CaptureStats(
                state=state, overruns=self._overruns, reopens=self._reopens,
                stalls=self._stalls, chunks=self._chunks, last_error=self._last_error,
                last_progress=self._last_progress,
            )

    # --- the owner task ---------------------------------------------------------------

    async def run(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._waker = Waker()
        await self._run_worker(self._waker, close_waker=True)

    def _deliver(self, chunk: bytes) -> None:
        """On the loop: hand one chunk to the sink."""
        if self._stop.is_set() or self._sink is None:
            return
        self._sink(chunk)

    # --- the worker thread --------------------------------------------------------------

    def _stream(self, pcm: Any, loop: asyncio.AbstractEventLoop) -> None:
        assert self._waker is not None
        poller = PcmPoller(pcm, self._waker)
        rs = self._resampler
        rs.reset()
        pending = bytearray()
        chunk = self._chunk_bytes
        last_data = time.monotonic()
        stalled = False
        backoff_reset = False
        pcm.read()  # starts the stream (returns nothing yet in non-blocking mode)
        while not self._stop.is_set():
            revents, _woken = poller.wait(self.stall_timeout_s / 2)
            if self._stop.is_set():
                return
            got = False
            while not self._stop.is_set():
                n, data = pcm.read()
                if n == -32:  # overrun; already re-prepared by pyalsaaudio: read again now
                    with self._lock:
                        self._overruns += 1
                        count = self._overruns
                    self._overrun_log.warning(
                        time.monotonic(), "capture overrun on %r (total %d): the reader fell "
                        "behind; audio has a gap", self.cfg.device, count,
                    )
                    pcm.read()  # restart the re-prepared stream
                    continue
                if n <= 0 or not data:
                    break
                got = True
                pending += rs.process(data)
                while len(pending) >= chunk:
                    out = bytes(pending[:chunk])
                    del pending[:chunk]
                    with self._lock:
                        self._chunks += 1
                        self._last_progress = time.monotonic()
                    loop.call_soon_threadsafe(self._deliver, out)
            now = time.monotonic()
            if got:
                last_data = now
                if stalled:
                    log.info("capture device %r delivers audio again", self.cfg.device)
                    stalled = False
                if not backoff_reset:
                    self._backoff.reset()
                    backoff_reset = True
                continue
            # an error the read did not raise (yet)? ask the state
            state = pcm.state()
            if state == alsaaudio.PCM_STATE_DISCONNECTED:
                raise alsaaudio.ALSAAudioError(f"No such device [{self.cfg.device}]")
            if revents & POLLERR and state == alsaaudio.PCM_STATE_XRUN:
                continue  # the next read() reports and recovers the overrun
            idle = now - last_data
            if idle > self.stall_timeout_s and not stalled:
                stalled = True
                with self._lock:
                    self._stalls += 1
                    self._last_error = (
                        f"capture device {self.cfg.device!r} delivered no audio for "
                        f"{idle:.1f} s"
                    )
                log.warning("capture device %r stalled: no audio for %.1f s",
                            self.cfg.device, idle)
            if idle > self.stall_reopen_s:
                raise Stalled(f"no audio for {idle:.1f} s")
