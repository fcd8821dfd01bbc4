"""Push-to-talk button: hold to talk, release to send.

Every backend implements :class:`PushToTalk`. ``run(on_event)`` is the single owner task of
the button resource: it opens the device, delivers :class:`ButtonEvent` s by calling
``on_event`` *from its own task, on the event loop thread*, and closes the device when it
returns or is cancelled.

Backends (``button.backend``):

``gpio``
    ``gpiozero.Button`` with gpiozero's default pin factory (lgpio on Pi OS bookworm).
    lgpio creates ``.lgd-nfy*`` pipes in ``$LG_WD`` or the current directory; when
    ``LG_WD`` is unset we point it at ``$RUNTIME_DIRECTORY`` or the temp directory, because
    a service's working directory (``/``) is usually not writable.
``mock``
    The same code path on a private gpiozero ``MockFactory``; :class:`MockButton` adds
    ``press()`` / ``release()`` which drive the mock pin like a finger would (used by tests
    and ``parley ctl press/release``).
``keyboard``
    Hold the space bar in the terminal on stdin. See :class:`KeyboardButton` for the
    autorepeat-based hold detection and its limits.

Threading boundary
------------------
gpiozero calls ``when_pressed`` / ``when_released`` on its own thread (for mock pins: on
whichever thread drives the pin). Those callbacks do exactly one thing:
:meth:`_ButtonBase._post_from_thread`, which captures ``time.monotonic()`` and hands the
raw edge to the event loop with ``loop.call_soon_threadsafe(queue.put_nowait, ...)``. That
is the ONLY place a thread crosses into asyncio in this module. Everything else — the
debounce/press state machine, timers, ``on_event`` — runs in the ``run()`` task. The
keyboard backend needs no thread at all (``loop.add_reader`` on the tty); the periodic
health probe runs its blocking pin read through ``asyncio.to_thread`` and is awaited.

Semantics (all backends)
------------------------
* ``press`` is emitted at once on the first accepted edge (no added latency; the daemon
  starts capturing immediately).
* Debounce: after each accepted edge, further edges for ``bounce_ms`` are treated as contact
  bounce and dropped; when that window ends the real pin level is read and, if it differs,
  the missed edge is applied (dated at the last raw edge). So a bouncy contact yields
  exactly one ``press`` and one ``release``, and a release hidden inside the bounce window
  (a very short tap) is not lost.
* A press shorter than ``min_press_ms`` ends with ``too_short`` *instead of* ``release``,
  reported after the fact (``held_s`` is the measured hold).
* A press held for ``max_press_s`` emits ``stuck`` (``held_s`` = time held so far). The
  daemon should end the turn as if released. That press is then ignored until the button is
  really released, and **that release is NOT emitted**: after ``stuck`` the next event is
  always the next ``press``.
* A button already held when ``run()`` starts is treated the same way (ignored until
  released, nothing emitted).
* A periodic probe reads the level (``healthy()``/``last_progress`` for the watchdog); if
  it disagrees with the state machine on two probes in a row (a lost edge), the state is
  corrected and the corresponding event emitted, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import termios
import time
import tty
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from daemon.config import ButtonConfig
from daemon.errors import ParleyError

log = logging.getLogger(__name__)

ButtonEventKind = Literal["press", "release", "too_short", "stuck"]

PROBE_INTERVAL_S = 1.0
"""How often the health probe reads the backend."""
PROBE_TIMEOUT_S = 2.0
"""A probe that takes longer counts as a failure (the backend does not answer)."""


class ButtonError(ParleyError):
    """The push-to-talk button could not be opened or stopped working."""


@dataclass(frozen=True, slots=True)
class ButtonEvent:
    """One push-to-talk event. ``at`` is ``time.monotonic()``; ``held_s`` is 0 for press."""

    kind: ButtonEventKind
    at: float
    held_s: float


class PushToTalk(Protocol):
    """A push-to-talk button. See the module docstring for the event semantics."""

    async def run(self, on_event: Callable[[ButtonEvent], None]) -> None:
        """Own the button until cancelled; call ``on_event`` on the loop thread."""
        ...

    def healthy(self) -> bool:
        """True while ``run()`` is active and the backend answered a probe recently."""
        ...

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` of the last successful probe or edge (0.0 before run)."""
        ...


def lgpio_workdir_setup() -> None:
    """Give lgpio a writable directory for its ``.lgd-nfy*`` pipes unless LG_WD is set."""
    if "LG_WD" not in os.environ:
        wd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or tempfile.gettempdir()
        os.environ["LG_WD"] = wd
        log.debug("LG_WD not set; lgpio will use %s", wd)


# --- the state machine (pure; runs in the run() task) ----------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    """A raw observation queued for the run() task."""

    kind: Literal["edge", "level", "eof"]
    pressed: bool
    at: float


class _PressMachine:
    """Debounce + press/release/too_short/stuck logic. No I/O except ``read_level``."""

    def __init__(
        self,
        *,
        bounce_s: float,
        min_press_s: float,
        max_press_s: float,
        read_level: Callable[[], bool],
    ) -> None:
        self._bounce_s = bounce_s
        self._min_press_s = min_press_s
        self._max_press_s = max_press_s
        self._read_level = read_level
        self._down = False  # debounced level as we believe it
        self._pressed_at: float | None = None  # set while a reported press is open
        self._ignoring = False  # stuck (or held at start): swallow until a real release
        self._lock_until: float | None = None
        self._last_raw: tuple[bool, float] | None = None
        self._mismatches = 0

    def start(self, level: bool) -> None:
        self._down = level
        if level:
            self._ignoring = True
            log.warning("push-to-talk button is held at start; ignoring it until released")

    def deadline(self) -> float | None:
        candidates = [self._lock_until] if self._lock_until is not None else []
        if self._pressed_at is not None:
            candidates.append(self._pressed_at + self._max_press_s)
        return min(candidates) if candidates else None

    def edge(self, pressed: bool, at: float) -> list[ButtonEvent]:
        self._last_raw = (pressed, at)
        self._mismatches = 0
        if self._lock_until is not None and at < self._lock_until:
            return []  # contact bounce; reconciled when the window ends
        return self._apply(pressed, at)

    def observe(self, level: bool, at: float) -> list[ButtonEvent]:
        """A probed level. Two disagreeing probes in a row mean an edge was lost."""
        if self._lock_until is not None or level == self._down:
            self._mismatches = 0
            return []
        self._mismatches += 1
        if self._mismatches < 2:
            return []
        self._mismatches = 0
        log.warning(
            "push-to-talk button: missed a %s edge; correcting from the pin level",
            "press" if level else "release",
        )
        return self._apply(level, at)

    def tick(self, now: float) -> list[ButtonEvent]:
        events: list[ButtonEvent] = []
        if self._lock_until is not None and now >= self._lock_until:
            self._lock_until = None
            try:
                level = self._read_level()
            except Exception as exc:  # the health probe reports a dead backend
                log.warning("push-to-talk button: cannot read the pin level: %s", exc)
                level = self._down
            if level != self._down:
                raw = self._last_raw
                at = raw[1] if raw is not None and raw[0] == level else now
                events += self._apply(level, at)
        if self._pressed_at is not None and now >= self._pressed_at + self._max_press_s:
            held = now - self._pressed_at
            self._pressed_at = None
            self._ignoring = True
            log.warning("push-to-talk button held for %.1f s: treating it as stuck", held)
            events.append(ButtonEvent("stuck", now, held))
        return events

    def _apply(self, pressed: bool, at: float) -> list[ButtonEvent]:
        if pressed == self._down:
            return []
        self._down = pressed
        if self._bounce_s > 0:
            self._lock_until = at + self._bounce_s
        if pressed:
            self._pressed_at = at
            return [ButtonEvent("press", at, 0.0)]
        if self._ignoring or self._pressed_at is None:
            self._ignoring = False
            log.info("push-to-talk button released after being ignored (stuck or held at start)")
            return []
        held = max(0.0, at - self._pressed_at)
        self._pressed_at = None
        kind: ButtonEventKind = "too_short" if held < self._min_press_s else "release"
        return [ButtonEvent(kind, at, held)]


# --- common run() ------------------------------------------------------------------------


class _ButtonBase:
    """Shared ``run()`` loop; backends implement ``_open``/``_close``/``_read_level``/``_probe``."""

    _bounce_s: float = 0.0

    def __init__(self, cfg: ButtonConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._cfg = cfg
        self._expected_loop = loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Raw] | None = None
        self._running = False
        self._last_progress = 0.0
        self._probe_ok = False

    # backend hooks
    def _open(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Open the device; return True if the button is pressed right now."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _read_level(self) -> bool:
        """Current level (True = pressed); called on the loop, must be quick."""
        raise NotImplementedError

    def _probe(self) -> bool | None:
        """Blocking liveness check run in a worker thread; the level, or None if n/a."""
        raise NotImplementedError

    # the one thread -> loop crossing
    def _post_from_thread(self, pressed: bool) -> None:
        """Called on a gpiozero thread: hand the edge to the loop. Never touches other state."""
        at = time.monotonic()
        loop, queue = self._loop, self._queue
        if loop is None or queue is None:
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, _Raw("edge", pressed, at))
        except RuntimeError:  # loop closed during shutdown
            log.debug("button edge after the event loop closed; dropped")

    @property
    def last_progress(self) -> float:
        return self._last_progress

    def healthy(self) -> bool:
        if not self._running or not self._probe_ok:
            return False
        return time.monotonic() - self._last_progress < 3 * PROBE_INTERVAL_S + PROBE_TIMEOUT_S

    async def run(self, on_event: Callable[[ButtonEvent], None]) -> None:
        if self._running:
            raise RuntimeError("PushToTalk.run() is already running")
        loop = asyncio.get_running_loop()
        if self._expected_loop is not None and self._expected_loop is not loop:
            raise RuntimeError("PushToTalk.run() called on a different event loop")
        queue: asyncio.Queue[_Raw] = asyncio.Queue()
        self._loop, self._queue = loop, queue
        self._running = True
        try:
            initial = self._open(loop)
            try:
                await self._serve(queue, initial, on_event)
            finally:
                self._close()
        finally:
            self._running = False
            self._probe_ok = False
            self._loop = self._queue = None

    async def _serve(
        self,
        queue: asyncio.Queue[_Raw],
        initial: bool,
        on_event: Callable[[ButtonEvent], None],
    ) -> None:
        machine = _PressMachine(
            bounce_s=self._bounce_s,
            min_press_s=self._cfg.min_press_ms / 1000.0,
            max_press_s=self._cfg.max_press_s,
            read_level=self._read_level,
        )
        machine.start(initial)
        self._last_progress = time.monotonic()
        self._probe_ok = True
        probe = asyncio.create_task(self._probe_loop(queue), name="button-probe")
        try:
            while True:
                deadline = machine.deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                raw: _Raw | None
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
                # races with a completing get(), and run() would never end.
                try:
                    async with asyncio.timeout(timeout):
                        raw = await queue.get()
                except TimeoutError:
                    raw = None
                events: list[ButtonEvent] = []
                if raw is not None:
                    if raw.kind == "eof":
                        raise ButtonError("the terminal of the keyboard button was closed")
                    if raw.kind == "edge":
                        self._last_progress = max(self._last_progress, raw.at)
                        events += machine.edge(raw.pressed, raw.at)
                    else:
                        events += machine.observe(raw.pressed, raw.at)
                events += machine.tick(time.monotonic())
                for event in events:
                    log.debug("button %s (held %.3f s)", event.kind, event.held_s)
                    on_event(event)
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _probe_loop(self, queue: asyncio.Queue[_Raw]) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    level = await asyncio.to_thread(self._probe)
            except Exception as exc:
                if self._probe_ok:
                    log.warning("push-to-talk button backend does not answer: %s", exc)
                self._probe_ok = False
                continue
            if not self._probe_ok:
                log.info("push-to-talk button backend answers again")
            self._probe_ok = True
            now = time.monotonic()
            self._last_progress = now
            if level is not None:
                queue.put_nowait(_Raw("level", level, now))


# --- gpio / mock -------------------------------------------------------------------------


class GpioButton(_ButtonBase):
    """``gpiozero.Button`` on ``cfg.pin``; ``pin_factory`` None means gpiozero's default."""

    def __init__(
        self,
        cfg: ButtonConfig,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        pin_factory: Any = None,
    ) -> None:
        super().__init__(cfg, loop)
        self._pin_factory = pin_factory
        self._bounce_s = cfg.bounce_ms / 1000.0
        self._button: Any = None

    def _open(self, loop: asyncio.AbstractEventLoop) -> bool:
        from gpiozero import Button

        if self._pin_factory is None:
            lgpio_workdir_setup()
        cfg = self._cfg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                button = Button(
                    cfg.pin,
                    pull_up=cfg.pull_up,
                    bounce_time=self._bounce_s or None,
                    pin_factory=self._pin_factory,
                )
            except Exception as exc:
                tried = "; ".join(str(w.message) for w in caught)
                raise ButtonError(
                    f"cannot open the push-to-talk button on GPIO{cfg.pin}: {exc}"
                    + (f" ({tried})" if tried else "")
                    + ". On a Raspberry Pi, check that /dev/gpiochip* exists and that the "
                    "user is in group gpio (sudo usermod -aG gpio $USER, then log in again), "
                    "and that no other program uses the pin; on a machine without GPIO set "
                    "button.backend: keyboard (or mock)."
                ) from exc
        button.when_pressed = self._on_pressed
        button.when_released = self._on_released
        self._button = button
        log.info(
            "push-to-talk button on GPIO%d (pull_up=%s, pin factory %s)",
            cfg.pin,
            cfg.pull_up,
            type(button.pin_factory).__name__,
        )
        return bool(button.is_pressed)

    # gpiozero thread: cross into asyncio and nothing else
    def _on_pressed(self) -> None:
        self._post_from_thread(True)

    def _on_released(self) -> None:
        self._post_from_thread(False)

    def _close(self) -> None:
        button, self._button = self._button, None
        if button is not None:
            button.when_pressed = None
            button.when_released = None
            button.close()

    def _read_level(self) -> bool:
        button = self._button
        return bool(button.is_pressed) if button is not None else False

    def _probe(self) -> bool | None:
        button = self._button
        if button is None:
            raise ButtonError("button closed")
        return bool(button.is_pressed)


class MockButton(GpioButton):
    """The gpio code path on a private ``MockFactory``, driven by :meth:`press`/:meth:`release`."""

    def __init__(self, cfg: ButtonConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        from gpiozero.pins.mock import MockFactory

        super().__init__(cfg, loop, pin_factory=MockFactory())

    @property
    def pin_factory(self) -> Any:
        """The private ``MockFactory`` (tests may drive ``pin_factory.pin(cfg.pin)``)."""
        return self._pin_factory

    def press(self) -> None:
        """Close the contact like a finger: drive the pin to its active level.

        Has no effect on events unless ``run()`` is active. Any thread.
        """
        pin = self._pin_factory.pin(self._cfg.pin)
        if self._cfg.pull_up:
            pin.drive_low()
        else:
            pin.drive_high()

    def release(self) -> None:
        """Open the contact: let the pin return to its pulled level. Any thread."""
        pin = self._pin_factory.pin(self._cfg.pin)
        if self._cfg.pull_up:
            pin.drive_high()
        else:
            pin.drive_low()


# --- keyboard ----------------------------------------------------------------------------


class KeyboardButton(_ButtonBase):
    """Hold the space bar in a terminal.

    A terminal delivers no key-up events, only characters, and while a key is held the
    autorepeat sends it again after an initial delay (typically 250-660 ms), then every
    ~30-40 ms. So a hold is: the first space starts it (``press`` at once), and it ends when
    no further space arrives within ``first_repeat_timeout_s`` after the first character
    (initial autorepeat delay + margin) or ``repeat_timeout_s`` after a repeat. The release
    is dated at the last space seen.

    Limits: the release is noticed up to that timeout late; a hold shorter than the
    autorepeat delay looks like a single tap (``held_s`` 0, so ``too_short``); a terminal
    with autorepeat disabled cannot do holds at all; other keys are ignored.

    The terminal is put in cbreak mode (no echo, no line buffering; Ctrl-C still raises
    SIGINT) and restored when ``run()`` ends, including on cancellation.
    """

    def __init__(
        self,
        cfg: ButtonConfig,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        fd: int | None = None,
        first_repeat_timeout_s: float = 0.75,
        repeat_timeout_s: float = 0.2,
    ) -> None:
        super().__init__(cfg, loop)
        self._fd_arg = fd
        self._fd = -1
        self._first_timeout = first_repeat_timeout_s
        self._repeat_timeout = repeat_timeout_s
        self._saved: list[Any] | None = None
        self._held = False
        self._last_space = 0.0
        self._release_timer: asyncio.TimerHandle | None = None
        self._reader_loop: asyncio.AbstractEventLoop | None = None

    def _open(self, loop: asyncio.AbstractEventLoop) -> bool:
        fd = self._fd_arg if self._fd_arg is not None else sys.stdin.fileno()
        if not os.isatty(fd):
            raise ButtonError(
                "button.backend keyboard needs a terminal on stdin; run parley in a "
                "terminal, or set button.backend: gpio (or mock)"
            )
        self._fd = fd
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd, termios.TCSANOW)
        loop.add_reader(fd, self._on_readable)
        self._reader_loop = loop
        self._held = False
        log.info("push-to-talk: hold the space bar in this terminal")
        return False

    def _on_readable(self) -> None:  # on the loop (add_reader)
        queue, loop = self._queue, self._reader_loop
        if queue is None or loop is None:
            return
        try:
            data = os.read(self._fd, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        now = time.monotonic()
        if not data:
            loop.remove_reader(self._fd)
            queue.put_nowait(_Raw("eof", False, now))
            return
        if b" " not in data:
            return
        if self._release_timer is not None:
            self._release_timer.cancel()
        if not self._held:
            self._held = True
            queue.put_nowait(_Raw("edge", True, now))
            timeout = self._first_timeout
        else:
            timeout = self._repeat_timeout
        self._last_space = now
        self._release_timer = loop.call_later(timeout, self._on_release_timeout)

    def _on_release_timeout(self) -> None:  # on the loop
        self._release_timer = None
        self._held = False
        if self._queue is not None:
            self._queue.put_nowait(_Raw("edge", False, self._last_space))

    def _close(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._reader_loop is not None:
            with contextlib.suppress(Exception):
                self._reader_loop.remove_reader(self._fd)
            self._reader_loop = None
        if self._saved is not None:
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            except termios.error as exc:
                log.warning("could not restore the terminal: %s", exc)
            self._saved = None
        self._held = False

    def _read_level(self) -> bool:
        return self._held

    def _probe(self) -> bool | None:
        termios.tcgetattr(self._fd)  # raises once the terminal is gone
        return None


def make_button(
    cfg: ButtonConfig,
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    pin_factory: Any = None,
    tty_fd: int | None = None,
) -> PushToTalk:
    """Build the backend named by ``cfg.backend``. Nothing is opened until ``run()``.

    ``pin_factory`` (gpio only) overrides gpiozero's default pin factory, e.g. a
    ``MockFactory`` in tests; ``tty_fd`` (keyboard only) replaces stdin.
    """
    if cfg.backend == "gpio":
        return GpioButton(cfg, loop, pin_factory=pin_factory)
    if cfg.backend == "mock":
        return MockButton(cfg, loop)
    if cfg.backend == "keyboard":
        return KeyboardButton(cfg, loop, fd=tty_fd)
    raise ButtonError(f"unknown button.backend {cfg.backend!r}; use gpio, keyboard or mock")
