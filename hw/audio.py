"""Audio interfaces the conversation core codes against, and in-memory fakes.

Everything here speaks parley's wire format: 24 kHz, mono, signed 16-bit little endian
("PCM16"), the format of the OpenAI Realtime API in both directions.

* :class:`AudioCapture` — one owner task (``run``) delivers fixed-size chunks to a sink
  callback *on the event loop*. Implementations: :class:`hw.alsa_capture.AlsaCapture`
  and :class:`MemoryCapture` (fed by tests and the demo, paced by the loop clock).
* :class:`AudioPlayback` — one owner task (``run``) plays queued reply audio per item,
  with a jitter buffer (pre-roll), an interrupt (``stop``) that reports exactly how much
  of the item was heard, and earcons mixed on top. Implementations:
  :class:`hw.alsa_playback.AlsaPlayback` and :class:`MemoryPlayback`.

Both expose ``stats`` (a frozen snapshot) for the status socket and the watchdog; the
watchdog reads ``last_progress`` (``time.monotonic()`` of the last progress).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

RATE = 24000
"""Sample rate of parley's wire format (Hz)."""
SAMPLE_BYTES = 2
"""Bytes per sample of parley's wire format (mono S16_LE)."""

StreamState = Literal["starting", "running", "stalled", "reopening", "failed", "stopped"]
"""``starting`` before the first open; ``running`` streaming; ``stalled`` the device stopped
delivering/consuming audio (no error, no progress); ``reopening`` closed after an error and
waiting for the next open; ``failed`` several opens in a row failed (still retrying at the
capped backoff); ``stopped`` the owner task ended."""

ItemDoneCallback = Callable[[str, int], None]


def ms_to_samples(ms: float) -> int:
    """Samples of 24 kHz audio in ``ms`` milliseconds."""
    return round(ms * RATE / 1000)


@dataclass(frozen=True)
class CaptureStats:
    state: StreamState = "starting"
    overruns: int = 0
    reopens: int = 0
    stalls: int = 0
    chunks: int = 0
    last_error: str = ""
    last_progress: float = 0.0
    """``time.monotonic()`` when the last chunk was delivered (0 before the first)."""


@dataclass(frozen=True)
class PlaybackStats:
    state: StreamState = "starting"
    underruns: int = 0
    reopens: int = 0
    stalls: int = 0
    playing: str | None = None
    """Item being played, if any."""
    queued_samples: int = 0
    """24 kHz samples waiting to be played (all items)."""
    last_error: str = ""
    last_progress: float = 0.0
    """``time.monotonic()`` when the device last consumed audio or the idle writer was
    last seen alive."""


@runtime_checkable
class AudioCapture(Protocol):
    """A microphone delivering 24 kHz mono S16_LE chunks of a fixed duration."""

    async def run(self, sink: Callable[[bytes], None]) -> None:
        """Own the device: deliver each chunk by calling ``sink(chunk)`` on the event loop.

        Never returns; ends only by cancellation (``CancelledError`` propagates). Device
        errors are counted, logged and recovered (reopen with capped backoff).
        """
        ...

    @property
    def chunk_bytes(self) -> int:
        """Bytes of each delivered chunk."""
        ...

    @property
    def stats(self) -> CaptureStats: ...


@runtime_checkable
class AudioPlayback(Protocol):
    """A speaker playing reply audio item by item (24 kHz mono S16_LE).

    All methods except ``run`` are synchronous, non-blocking and must be called on the
    event loop thread. ``on_item_done`` is called on the loop with (item_id, samples
    played) when an ended item has been played out entirely; it is not called for an
    item cut short by :meth:`stop`.
    """

    on_item_done: ItemDoneCallback | None

    async def run(self) -> None:
        """Own the device until cancelled (``CancelledError`` propagates)."""
        ...

    def enqueue(self, item_id: str, pcm24k: bytes) -> None:
        """Queue audio of an item; a new item id queues behind the current one."""
        ...

    def end_item(self, item_id: str) -> None:
        """No more audio for this item: play what is queued even below the pre-roll."""
        ...

    def stop(self, fade: bool = True) -> tuple[str | None, int]:
        """Interrupt: flush everything queued, fade out the current item.

        Returns ``(item_id, samples)`` of the item that was playing (or about to play),
        ``samples`` being the 24 kHz samples of it that came out of the speaker, fade
        included; ``(None, 0)`` when nothing was playing.
        """
        ...

    def played_samples(self, item_id: str) -> int:
        """24 kHz samples of this item played so far (0 for an unknown item)."""
        ...

    def play_tone(self, pcm24k: bytes) -> None:
        """Play an earcon at once, mixed on top of any reply audio (not subject to pre-roll,
        not counted in played samples, not flushed by :meth:`stop`)."""
        ...

    @property
    def stats(self) -> PlaybackStats: ...


# --- in-memory fakes ---------------------------------------------------------------------


class MemoryCapture:
    """A fake microphone for tests and the demo.

    ``feed(pcm24k)`` queues audio; ``run`` delivers one ``chunk_ms`` chunk per chunk
    period of the *loop clock* (so a test with a fake clock stays deterministic), padding
    with silence when nothing (or too little) was fed, like a real, always-running mic.
    """

    def __init__(self, chunk_ms: int = 20) -> None:
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        self._chunk_ms = chunk_ms
        self._chunk = ms_to_samples(chunk_ms) * SAMPLE_BYTES
        self._pending = bytearray()
        self._stats = CaptureStats()

    @property
    def chunk_bytes(self) -> int:
        return self._chunk

    @property
    def stats(self) -> CaptureStats:
        return self._stats

    def feed(self, pcm24k: bytes) -> None:
        """Queue 24 kHz mono S16_LE audio; delivered in order, in chunk-sized pieces."""
        if len(pcm24k) % SAMPLE_BYTES:
            raise ValueError("pcm24k must hold whole 16-bit samples")
        self._pending += pcm24k

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    async def run(self, sink: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        period = self._chunk_ms / 1000
        start = loop.time()
        n = 0
        self._stats = CaptureStats(state="running")
        try:
            while True:
                n += 1
                await asyncio.sleep(max(0.0, start + n * period - loop.time()))
                chunk = bytes(self._pending[: self._chunk])
                del self._pending[: self._chunk]
                if len(chunk) < self._chunk:
                    chunk += bytes(self._chunk - len(chunk))
                self._stats = CaptureStats(
                    state="running", chunks=self._stats.chunks + 1,
                    last_progress=time.monotonic(),
                )
                sink(chunk)
        finally:
            self._stats = CaptureStats(
                state="stopped", chunks=self._stats.chunks,
                last_progress=self._stats.last_progress,
            )


@dataclass
class _MemItem:
    item_id: str
    data: bytearray
    ended: bool = False
    started: bool = False
    played: int = 0  # samples


class MemoryPlayback:
    """A fake speaker that "plays" at real-time pace on the loop clock.

    Every ``tick_ms`` it takes that much audio from the current item (once the pre-roll
    is queued or the item ended) and appends it to :attr:`output` (24 kHz mono S16_LE,
    tones mixed in, silence between items *not* recorded). ``stop`` is exact: the fade
    is applied to the next ``fade_ms`` of the item and recorded, and counted as played.
    :attr:`log` records ``(item_id, bytes)`` per tick for tests.
    """

    def __init__(self, preroll_ms: int = 80, fade_ms: int = 8, tick_ms: int = 20) -> None:
        self.on_item_done: ItemDoneCallback | None = None
        self._preroll = ms_to_samples(preroll_ms)
        self._fade = ms_to_samples(fade_ms)
        self._tick = ms_to_samples(tick_ms)
        self._tick_s = tick_ms / 1000
        self._items: deque[_MemItem] = deque()
        self._played: dict[str, int] = {}
        self._tone = bytearray()
        self.output = bytearray()
        self.log: list[tuple[str | None, bytes]] = []
        self._stats = PlaybackStats()

    @property
    def stats(self) -> PlaybackStats:
        cur = self._items[0].item_id if self._items and self._items[0].started else None
        return PlaybackStats(
            state=self._stats.state, underruns=self._stats.underruns, playing=cur,
            queued_samples=sum(len(i.data) // 2 for i in self._items),
            last_progress=self._stats.last_progress,
        )

    def _item(self, item_id: str) -> _MemItem:
        for it in self._items:
            if it.item_id == item_id:
                return it
        it = _MemItem(item_id, bytearray())
        self._items.append(it)
        return it

    def enqueue(self, item_id: str, pcm24k: bytes) -> None:
        if len(pcm24k) % SAMPLE_BYTES:
            raise ValueError("pcm24k must hold whole 16-bit samples")
        it = self._item(item_id)
        if it.ended:
            log.warning("audio for item %s after end_item; ignored", item_id)
            return
        it.data += pcm24k

    def end_item(self, item_id: str) -> None:
        self._item(item_id).ended = True

    def played_samples(self, item_id: str) -> int:
        for it in self._items:
            if it.item_id == item_id:
                return it.played
        return self._played.get(item_id, 0)

    def play_tone(self, pcm24k: bytes) -> None:
        _mix_into(self._tone, pcm24k)

    def stop(self, fade: bool = True) -> tuple[str | None, int]:
        if not self._items:
            return None, 0
        it = self._items[0]
        result: tuple[str | None, int] = (it.item_id, it.played)
        if fade and it.started and self._fade and it.data:
            n = min(self._fade, len(it.data) // 2)
            tail = np.frombuffer(bytes(it.data[: n * 2]), dtype="<i2").astype(np.float64)
            tail *= fade_curve(n)
            faded = tail.astype("<i2").tobytes()
            self.output += faded
            self.log.append((it.item_id, faded))
            result = (it.item_id, it.played + n)
        self._played[it.item_id] = result[1]
        self._items.clear()
        return result

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        self._stats = PlaybackStats(state="running")
        try:
            while True:
                n += 1
                await asyncio.sleep(max(0.0, start + n * self._tick_s - loop.time()))
                self._play_tick()
        finally:
            self._stats = PlaybackStats(state="stopped", underruns=self._stats.underruns)

    def _play_tick(self) -> None:
        chunk = bytearray()
        item_id: str | None = None
        done: list[tuple[str, int]] = []
        while self._items and len(chunk) < self._tick * 2:
            it = self._items[0]
            if not it.started:
                if it.ended or len(it.data) // 2 >= self._preroll:
                    it.started = True
                else:
                    break
            take = min(self._tick * 2 - len(chunk), len(it.data))
            if take == 0 and not it.ended:
                self._stats = PlaybackStats(
                    state="running", underruns=self._stats.underruns + 1,
                    last_progress=self._stats.last_progress,
                )
                break
            chunk += it.data[:take]
            del it.data[:take]
            it.played += take // 2
            item_id = it.item_id
            if it.ended and not it.data:
                self._items.popleft()
                self._played[it.item_id] = it.played
                done.append((it.item_id, it.played))
        if self._tone:
            tone = bytes(self._tone[: self._tick * 2])
            del self._tone[: self._tick * 2]
            if len(chunk) < len(tone):
                chunk += bytes(len(tone) - len(chunk))
            _mix_into(chunk, tone)
        if chunk:
            self.output += chunk
            self.log.append((item_id, bytes(chunk)))
        self._stats = PlaybackStats(
            state="running", underruns=self._stats.underruns, last_progress=time.monotonic()
        )
        for item, samples in done:
            if self.on_item_done is not None:
                self.on_item_done(item, samples)


def fade_curve(n: int) -> npt.NDArray[np.float64]:
    """A raised-cosine ramp from 1 (exclusive) to 0 over ``n`` samples."""
    if n <= 0:
        return np.ones(0)
    return 0.5 * (1.0 + np.cos(np.pi * (np.arange(n) + 1) / n))


def _mix_into(buf: bytearray, pcm: bytes) -> None:
    """Add S16 ``pcm`` onto the start of ``buf`` with saturation, extending ``buf``."""
    if len(buf) < len(pcm):
        buf += bytes(len(pcm) - len(buf))
    a = np.frombuffer(bytes(buf[: len(pcm)]), dtype="<i2").astype(np.int32)
    b = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    buf[: len(pcm)] = np.clip(a + b, -32768, 32767).astype("<i2").tobytes()
