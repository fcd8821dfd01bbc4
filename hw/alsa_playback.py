"""ALSA speaker: :class:`AlsaPlayback` implements :class:`hw.audio.AudioPlayback`.

Threading model (the boundaries)
--------------------------------
``run()`` starts ONE worker thread that owns the playback PCM (opened non-blocking). It
waits in ``poll()`` on the PCM's descriptors plus a wake-up pipe, converts 24 kHz mono
audio to the device's rate/channels/format (:class:`hw.resample.Resampler` in C, GIL
released) and writes it.

* loop -> thread: ``enqueue``/``end_item``/``play_tone``/``stop`` only append to or mark a
  queue under ``self._lock`` and poke the wake-up pipe; they never touch ALSA. ``stop``
  additionally waits for the thread's acknowledgement (a ``threading.Event``, normally
  well under a millisecond, bounded by ``stop_timeout_s``) because it must return the
  exact count of samples heard, which only the PCM owner can measure.
* thread -> loop: only ``loop.call_soon_threadsafe`` (item finished). Counters are read
  under the lock by ``stats``/``played_samples``.

Timing and accounting
---------------------
The thread keeps the device buffer filled up to ``buffer_frames - period_frames``. Every
24 kHz sample fed to the resampler has an absolute index; the samples of each item form
segments of that index space. The sample being heard now is
``(written - delay) - resampler delay`` converted to 24 kHz, where ``delay`` is
``buffer_size - snd_pcm_avail()`` (ALSA's queued frames; pyalsaaudio exposes no
``snd_pcm_delay``; both are equal for devices without extra FIFO latency). So
``played_samples`` and ``stop()`` are exact to the device's pointer granularity (one
period for most I2S/USB drivers).

Interrupt (``stop``): the thread measures the position, ``drop()``s everything queued, and
— with ``fade`` — writes the next ``fade_ms`` of exactly the audio that was about to play,
under a raised-cosine ramp to zero, so the waveform does not jump (a click). The samples
of the fade are counted as played. Earcons (``play_tone``) are *mixed* on top of reply
audio, start at once (no pre-roll), are not counted and are not flushed by ``stop``.

Faults: an underrun (-EPIPE) while a reply is open is counted and logged (rate-limited)
and the stream restarts with the next write; running dry after the last item is normal
and not counted. A vanished device, other ALSA errors, or no progress for
``stall_reopen_s`` while audio is queued: close and reopen with capped backoff (audio
queued in the ALSA buffer at that moment is lost; items continue from where they were).
The stall clock runs only while frames are queued: idle time (drained, XRUN after the last
sound, or SETUP after a ``drop()``) is not stall time, so the first write after a pause is
not mistaken for a device that stopped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import alsaaudio
import numpy as np
import numpy.typing as npt

from daemon.config import PlaybackConfig
from hw.alsa_pcm import (
    Backoff,
    DeviceWorker,
    PcmPoller,
    RateLimitedLog,
    Stalled,
    Waker,
)
from hw.audio import (
    RATE,
    SAMPLE_BYTES,
    ItemDoneCallback,
    PlaybackStats,
    StreamState,
    _mix_into,
    fade_curve,
    ms_to_samples,
)
from hw.resample import Resampler

log = logging.getLogger(__name__)

_DONE_KEEP = 256  # finished items whose played count stays queryable


class GainSource(Protocol):
    """Anything with a linear ``gain`` (0..1), e.g. :class:`hw.mixer.SoftwareVolume`."""

    @property
    def gain(self) -> float: ...


@dataclass
class _StreamPos:
    base24: int           # 24 kHz index fed first after the last resampler reset
    base_dev: int = 0     # device frames written when the resampler was last reset
    written: int = 0      # device frames written since open
    xrun_seen: bool = False


@dataclass
class _Item:
    item_id: str
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    started: bool = False
    queued: int = 0      # 24 kHz samples enqueued in total
    consumed: int = 0    # 24 kHz samples handed to the resampler
    segments: list[tuple[int, int]] = field(default_factory=list)  # (start24, length)

    def truncate(self, heard24: float) -> None:
        self.segments = [(s, int(min(max(heard24 - s, 0), n))) for s, n in self.segments]

    def played(self, heard24: float) -> int:
        total = 0
        for start, length in self.segments:
            total += int(min(max(heard24 - start, 0), length))
        return total


class AlsaPlayback(DeviceWorker):
    """Play 24 kHz mono S16_LE reply audio on ``cfg.device``."""

    direction = "playback"

    def __init__(self, cfg: PlaybackConfig, *, volume: GainSource | None = None,
                 stall_timeout_s: float = 0.5, stall_reopen_s: float = 2.0,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 5.0,
                 stop_timeout_s: float = 0.2, join_timeout_s: float = 2.0) -> None:
        self.cfg = cfg
        self.volume = volume
        self.on_item_done: ItemDoneCallback | None = None
        period_s = cfg.period_frames / cfg.rate
        self.stall_timeout_s = max(stall_timeout_s, 3 * period_s)
        self.stall_reopen_s = max(stall_reopen_s, self.stall_timeout_s)
        self.stop_timeout_s = stop_timeout_s
        self.join_timeout_s = join_timeout_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._preroll = ms_to_samples(cfg.preroll_ms)
        self._fade_frames = round(cfg.fade_ms * cfg.rate / 1000)
        self._rs = Resampler(RATE, cfg.rate, in_format="S16_LE", in_channels=1,
                             out_channels=cfg.channels)
        self._lock = threading.Lock()
        self._items: deque[_Item] = deque()
        self._finishing: deque[_Item] = deque()  # fully fed, still in the device buffer
        self._done: OrderedDict[str, int] = OrderedDict()
        self._tone = bytearray()
        self._waker = Waker()
        self._stop = threading.Event()
        self._streaming = False
        self._stop_req: bool | None = None
        self._stop_ack = threading.Event()
        self._stop_result: tuple[str | None, int] = (None, 0)
        self._heard24 = 0.0
        self._fed24 = 0  # 24 kHz samples fed to the resampler, ever (index space)
        # stats
        self._state: StreamState = "starting"
        self._underruns = 0
        self._reopens = 0
        self._stalls = 0
        self._last_error = ""
        self._last_progress = 0.0
        self._underrun_log = RateLimitedLog(log)

    # --- loop-side API ----------------------------------------------------------------

    @property
    def stats(self) -> PlaybackStats:
        with self._lock:
            cur = self._current()
            return PlaybackStats(
                state=self._state, underruns=self._underruns, reopens=self._reopens,
                stalls=self._stalls,
                playing=cur.item_id if cur is not None and cur.consumed else None,
                queued_samples=sum(len(i.data) // SAMPLE_BYTES for i in self._items),
                last_error=self._last_error, last_progress=self._last_progress,
            )

    def _current(self) -> _Item | None:
        """The item being heard (or next to be heard); lock held."""
        for it in self._finishing:
            if it.played(self._heard24) < it.consumed:
                return it
        return self._items[0] if self._items else None

    def enqueue(self, item_id: str, pcm24k: bytes) -> None:
        if len(pcm24k) % SAMPLE_BYTES:
            raise ValueError("pcm24k must hold whole 16-bit samples")
        with self._lock:
            it = self._find(item_id)
            if it is None:
                if item_id in self._done or any(f.item_id == item_id for f in self._finishing):
                    log.warning("audio for finished item %s ignored", item_id)
                    return
                it = _Item(item_id)
                self._items.append(it)
            if it.ended:
                log.warning("audio for item %s after end_item ignored", item_id)
                return
            it.data += pcm24k
            it.queued += len(pcm24k) // SAMPLE_BYTES
            if not it.started and it.queued >= self._preroll:
                it.started = True
        self._waker.wake()

    def end_item(self, item_id: str) -> None:
        with self._lock:
            it = self._find(item_id)
            if it is None:
                if item_id in self._done or any(f.item_id == item_id for f in self._finishing):
                    return
                it = _Item(item_id)
                self._items.append(it)
            it.ended = True
            it.started = True
        self._waker.wake()

    def _find(self, item_id: str) -> _Item | None:
        for it in self._items:
            if it.item_id == item_id:
                return it
        return None

    def played_samples(self, item_id: str) -> int:
        with self._lock:
            if item_id in self._done:
                return self._done[item_id]
            for it in (*self._finishing, *self._items):
                if it.item_id == item_id:
                    return it.played(self._heard24)
        return 0

    def play_tone(self, pcm24k: bytes) -> None:
        if len(pcm24k) % SAMPLE_BYTES:
            raise ValueError("pcm24k must hold whole 16-bit samples")
        with self._lock:
            _mix_into(self._tone, pcm24k)
        self._waker.wake()

    def stop(self, fade: bool = True) -> tuple[str | None, int]:
        with self._lock:
            if not self._streaming:
                return self._stop_locked()
            self._stop_ack.clear()
            self._stop_req = fade
        self._waker.wake()
        if self._stop_ack.wait(self.stop_timeout_s):
            return self._stop_result
        # the thread did not answer in time: account from its last measurement
        log.warning("playback thread did not acknowledge stop within %.0f ms",
                    self.stop_timeout_s * 1000)
        with self._lock:
            self._stop_req = None
            return self._stop_locked()

    def _stop_locked(self) -> tuple[str | None, int]:
        """Forget all queued reply audio; lock held. Returns the heard item's count."""
        cur = self._current()
        result: tuple[str | None, int] = (None, 0)
        if cur is not None:
            result = (cur.item_id, cur.played(self._heard24))
        for it in (*self._finishing, *self._items):
            self._remember(it.item_id, it.played(self._heard24))
        self._items.clear()
        self._finishing.clear()
        return result

    def _remember(self, item_id: str, samples: int) -> None:
        self._done[item_id] = samples
        while len(self._done) > _DONE_KEEP:
            self._done.popitem(last=False)

    def _item_done(self, item_id: str, samples: int) -> None:
        """On the loop."""
        if self.on_item_done is not None:
            self.on_item_done(item_id, samples)

    # --- the owner task ---------------------------------------------------------------

    async def run(self) -> None:
        # The waker lives as long as the device: play() and stop() wake the worker.
        await self._run_worker(self._waker, close_waker=False)

    # --- the worker thread --------------------------------------------------------------

    def _after_stream(self) -> None:
        with self._lock:
            self._streaming = False
            # audio still in the closed device's buffer was never heard
            for it in (*self._finishing, *self._items):
                it.truncate(self._heard24)
            if self._stop_req is not None:
                self._stop_req = None
                self._stop_result = self._stop_locked()
                self._stop_ack.set()

    def _stream(self, pcm: Any, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.cfg
        info = pcm.info()
        bufsize = int(info.get("buffer_size", cfg.buffer_frames))
        period = int(info.get("period_size", cfg.period_frames))
        target = max(period, bufsize - period)
        ratio = RATE / cfg.rate
        rs = self._rs
        rs.reset()
        rs_delay = float(rs.delay_frames)
        pad24 = math.ceil(rs_delay * ratio) + 2
        ch = cfg.channels
        # history of written frames (int16, interleaved) for the fade on stop
        hist = np.zeros((bufsize + 4 * period) * ch, dtype=np.int16)
        hist_frames = len(hist) // ch
        st = _StreamPos(base24=self._fed24)
        tail = 0  # zeros still to feed to push the resampler's tail out
        poller = PcmPoller(pcm, self._waker)
        last_pos = -1
        last_move = time.monotonic()
        stalled = False
        with self._lock:
            self._streaming = True

        def write(frames16: npt.NDArray[np.int16]) -> None:
            buf = frames16 if cfg.format == "S16_LE" else frames16.astype("<i4") << 16
            data = buf.tobytes()
            fbytes = ch * buf.itemsize
            n_frames = len(frames16) // ch
            off = 0
            while off < n_frames and not self._stop.is_set():
                try:
                    n = pcm.write(data[off * fbytes:])
                except alsaaudio.ALSAAudioError as exc:
                    if "Broken pipe" not in str(exc):
                        raise
                    n = -32
                if n == -32:  # pyalsaaudio re-prepared the stream: write again
                    if not st.xrun_seen:
                        self._underrun()
                    st.xrun_seen = True
                    continue
                if n <= 0:
                    poller.wait(period / cfg.rate)
                    continue
                off += n
                st.xrun_seen = False
            start = st.written % hist_frames
            first_n = min(n_frames, hist_frames - start)
            hist[start * ch:(start + first_n) * ch] = frames16[:first_n * ch]
            rest = n_frames - first_n
            if rest:
                hist[:rest * ch] = frames16[first_n * ch:]
            st.written += n_frames

        while not self._stop.is_set():
            # 1. where is the device?
            # SETUP: after drop() (a stop with no fade frames) nothing is queued and there
            # is no position until the next write re-prepares the stream; do not ask (a
            # kernel PCM answers -EBADFD, alsa-lib's ioplug a stale pre-drop count).
            setup = pcm.state() == alsaaudio.PCM_STATE_SETUP
            avail = bufsize if setup else pcm.avail()
            now = time.monotonic()
            if pcm.state() == alsaaudio.PCM_STATE_DISCONNECTED:
                raise alsaaudio.ALSAAudioError(f"No such device [{cfg.device}]")
            if avail < 0 and avail != -errno.EPIPE:
                raise alsaaudio.ALSAAudioError(f"{os.strerror(-avail)} [{cfg.device}]")
            if avail < 0:  # -EPIPE: ran dry (state XRUN until the next write)
                if not st.xrun_seen:
                    self._underrun()
                    st.xrun_seen = True
                delay = 0
            else:
                delay = max(0, bufsize - int(avail))
            pos = st.written - delay
            heard24 = st.base24 + max(0.0, (pos - st.base_dev - rs_delay) * ratio)
            if pos != last_pos:
                last_pos, last_move = pos, now
                if stalled:
                    log.info("playback device %r plays again", cfg.device)
                    stalled = False
            elif delay == 0:
                # nothing queued: the device owes no progress, so idle time is not stall
                # time (else the first write after a pause looks like a long stall)
                last_move = now
            elif now - last_move > self.stall_timeout_s:
                if not stalled:
                    stalled = True
                    msg = (f"playback device {cfg.device!r} consumed no audio for "
                           f"{now - last_move:.1f} s")
                    log.warning("%s", msg)
                    with self._lock:
                        self._stalls += 1
                        self._state = "stalled"
                        self._last_error = msg
                if now - last_move > self.stall_reopen_s:
                    raise Stalled(f"no progress for {now - last_move:.1f} s")
            done: list[tuple[str, int]] = []
            with self._lock:
                self._heard24 = heard24
                if not stalled:
                    self._state = "running"
                    self._last_progress = now
                while self._finishing:
                    it = self._finishing[0]
                    if delay > 0 and it.played(heard24) < it.consumed:
                        break
                    self._finishing.popleft()
                    n = it.played(math.inf if delay == 0 else heard24)
                    self._remember(it.item_id, n)
                    done.append((it.item_id, n))
                stop_req = self._stop_req
            for item_id, samples in done:
                loop.call_soon_threadsafe(self._item_done, item_id, samples)

            # 2. interrupt?
            if stop_req is not None:
                fade_frames = min(self._fade_frames if stop_req else 0, delay)
                with self._lock:
                    cur = self._current()
                    cur_id = cur.item_id if cur is not None else None
                    heard_fade = heard24 + fade_frames * ratio
                    extra = cur.played(heard_fade) if cur is not None else 0
                    result = self._stop_locked()
                    if cur_id is not None:
                        result = (cur_id, extra)
                        self._remember(cur_id, extra)
                    self._stop_req = None
                pcm.drop()
                st.written = pos
                if fade_frames > 0:
                    idx = np.arange(pos, pos + fade_frames) % hist_frames
                    seg = hist.reshape(-1, ch)[idx].astype(np.float64)
                    seg *= fade_curve(fade_frames)[:, None]
                    write(seg.astype(np.int16).reshape(-1))
                rs.reset()
                st.base_dev, st.base24, tail = st.written, self._fed24, 0
                self._stop_result = result
                self._stop_ack.set()
                continue

            # 3. fill the buffer up to `target`
            room = target - delay
            if room > 0 and (room >= period or delay == 0):
                n24 = max(1, int((room - 2) * ratio))
                block = self._take(n24, self._fed24)
                if len(block):
                    tail = pad24
                elif tail:
                    block = np.zeros(min(tail, n24), dtype=np.int16)
                    tail -= len(block)
                if len(block):
                    self._fed24 += len(block)
                    gain = self.volume.gain if self.volume is not None else 1.0
                    if gain != 1.0:
                        block = np.clip(block.astype(np.float32) * gain, -32768,
                                        32767).astype(np.int16)
                    out = np.frombuffer(rs.process(block.tobytes()), dtype="<i2")
                    if len(out):
                        write(out)
                    continue
            # 4. wait: for the device while audio is queued, else only for the loop
            if delay > 0:
                poller.wait(period / cfg.rate)
            else:
                self._waker.sleep(0.5)

    def _take(self, n24: int, fed24: int) -> npt.NDArray[np.int16]:
        """Up to n24 samples: reply audio of started items, tones mixed on top."""
        out = bytearray()
        with self._lock:
            while self._items and len(out) < n24 * SAMPLE_BYTES:
                it = self._items[0]
                if not it.started:
                    break
                take = min(n24 * SAMPLE_BYTES - len(out), len(it.data))
                if take:
                    start24 = fed24 + len(out) // SAMPLE_BYTES
                    it.segments.append((start24, take // SAMPLE_BYTES))
                    out += it.data[:take]
                    del it.data[:take]
                    it.consumed += take // SAMPLE_BYTES
                if it.ended and not it.data:
                    self._items.popleft()
                    self._finishing.append(it)
                    continue
                break  # started, not ended, starved: wait for more
            if self._tone:
                n = min(len(self._tone), n24 * SAMPLE_BYTES)
                tone = bytes(self._tone[:n])
                del self._tone[:n]
                _mix_into(out, tone)
        return np.frombuffer(bytes(out), dtype="<i2")

    def _underrun(self) -> None:
        """The device ran dry: an underrun if a started reply still has audio to come."""
        with self._lock:
            if not (self._items and self._items[0].started):
                return  # after the last item: running dry is the normal end
            self._underruns += 1
            n = self._underruns
        self._underrun_log.warning(
            time.monotonic(), "playback underrun on %r (total %d): reply audio arrived too "
            "late; raise audio.playback.preroll_ms if this repeats", self.cfg.device, n,
        )


