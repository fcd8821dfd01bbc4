"""Contract tests for hw.button: one suite, every backend, driven like a finger.

* ``mock``: MockButton (its private MockFactory), driven by press()/release() and its pin.
* ``gpio``: GpioButton with gpiozero's MockFactory as pin factory: the gpio code path.
* ``keyboard``: KeyboardButton on a pty (os.openpty), so the real termios code runs; a
  thread writes spaces like a held key with autorepeat.

The finger always acts from a separate thread, as gpiozero's callbacks would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aio import cancel_and_wait
from gpiozero.pins.mock import MockFactory, MockPin

import hw.button as button_mod
from daemon.config import ButtonConfig
from daemon.errors import ParleyError
from hw.button import (
    ButtonError,
    ButtonEvent,
    GpioButton,
    KeyboardButton,
    MockButton,
    PushToTalk,
    _PressMachine,
    make_button,
)

BOUNCE_MS = 50
MIN_PRESS_MS = 150


def _cfg(backend: str, **kw: Any) -> ButtonConfig:
    base = ButtonConfig(backend=backend, pin=17)  # type: ignore[arg-type]
    return dataclasses.replace(base, **{"bounce_ms": BOUNCE_MS, "min_press_ms": MIN_PRESS_MS, **kw})


# --- fingers -------------------------------------------------------------------------------


class PinFinger:
    """Drives a mock input pin like a contact to ground (pull-up) or to 3V3 (pull-down)."""

    can_bounce = True

    def __init__(self, factory: Any, cfg: ButtonConfig) -> None:
        self.pin = factory.pin(cfg.pin)
        self.pull_up = cfg.pull_up

    def _level(self, pressed: bool) -> None:
        if pressed == self.pull_up:
            self.pin.drive_low()
        else:
            self.pin.drive_high()

    def down(self) -> None:
        self._level(True)

    def up(self) -> None:
        self._level(False)

    def bouncy(self, pressed: bool) -> None:
        """Chatter a few times (well inside the bounce window), settle at ``pressed``."""
        for _ in range(4):
            self._level(pressed)
            self._level(not pressed)
        self._level(pressed)


class MockMethodFinger(PinFinger):
    """Uses MockButton.press()/release() (what `parley ctl press/release` calls)."""

    def __init__(self, button: MockButton, cfg: ButtonConfig) -> None:
        super().__init__(button.pin_factory, cfg)
        self.button = button

    def down(self) -> None:
        self.button.press()

    def up(self) -> None:
        self.button.release()


class KeyFinger:
    """Holds the space bar on a pty: one space, then autorepeat until up()."""

    can_bounce = False
    INITIAL_DELAY_S = 0.15
    REPEAT_S = 0.03

    def __init__(self, master: int) -> None:
        self.master = master
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def down(self) -> None:
        self._stop.clear()
        os.write(self.master, b" ")

        def repeat() -> None:
            if self._stop.wait(self.INITIAL_DELAY_S):
                return
            while not self._stop.wait(self.REPEAT_S):
                os.write(self.master, b" ")

        self._thread = threading.Thread(target=repeat, daemon=True)
        self._thread.start()

    def up(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def bouncy(self, pressed: bool) -> None:  # pragma: no cover - keyboards don't bounce
        raise NotImplementedError


# --- harness -------------------------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    backend: str
    cfg: ButtonConfig
    button: PushToTalk
    finger: Any
    tty: int | None = None


@pytest.fixture(autouse=True)
def _fast_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(button_mod, "PROBE_INTERVAL_S", 0.05)


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


def make_rig(backend: str, pty_pair: tuple[int, int], **cfg_kw: Any) -> Rig:
    cfg = _cfg(backend, **cfg_kw)
    if backend == "mock":
        button = make_button(cfg)
        assert isinstance(button, MockButton)
        return Rig(backend, cfg, button, MockMethodFinger(button, cfg))
    if backend == "gpio":
        factory = MockFactory()
        button = make_button(cfg, pin_factory=factory)
        assert isinstance(button, GpioButton) and not isinstance(button, MockButton)
        return Rig(backend, cfg, button, PinFinger(factory, cfg))
    master, slave = pty_pair
    kb = make_button(cfg, tty_fd=slave)
    assert isinstance(kb, KeyboardButton)
    kb._first_timeout = 0.6  # well above KeyFinger.INITIAL_DELAY_S, like the default
    kb._repeat_timeout = 0.25
    return Rig(backend, cfg, kb, KeyFinger(master), tty=slave)


BACKENDS = ["mock", "gpio", "keyboard"]


async def eventually(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.events: list[ButtonEvent] = []
        self.threads: set[int] = set()

    def __call__(self, event: ButtonEvent) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(event)

    @property
    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


async def scenario(
    rig: Rig,
    script: Callable[[], None],
    expect_kinds: list[str],
    *,
    quiet_s: float = 0.3,
) -> Recorder:
    """Run the button, play ``script`` on a thread, wait for ``expect_kinds``, check order."""
    rec = Recorder()
    task = asyncio.create_task(rig.button.run(rec))
    try:
        await eventually(rig.button.healthy)
        await asyncio.to_thread(script)
        await eventually(lambda: len(rec.events) >= len(expect_kinds))
        await asyncio.sleep(quiet_s)  # nothing more may arrive
        assert rec.kinds == expect_kinds
        assert rec.threads == {threading.get_ident()}, "events must arrive on the loop thread"
        ats = [e.at for e in rec.events]
        assert ats == sorted(ats)
        assert all(abs(e.at - time.monotonic()) < 30 for e in rec.events), "monotonic clock"
    finally:
        await cancel_and_wait(task)
    assert not rig.button.healthy()
    return rec


# --- the contract, every backend ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_normal_hold_gives_press_then_release(backend: str, pty_pair: tuple[int, int]) -> None:
    rig = make_rig(backend, pty_pair)

    def finger() -> None:
        rig.finger.down()
        time.sleep(0.6)
        rig.finger.up()

    rec = asyncio.run(scenario(rig, finger, ["press", "release"]))
    press, release = rec.events
    assert press.held_s == 0.0
    assert 0.4 <= release.held_s < 5.0
    assert release.held_s == pytest.approx(release.at - press.at)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_press_is_reported_after_the_fact(backend: str, pty_pair: tuple[int, int]) -> None:
    rig = make_rig(backend, pty_pair)

    def finger() -> None:
        rig.finger.down()
        if backend != "keyboard":  # a keyboard tap is one character, no repeat
            time.sleep(0.09)  # longer than bounce (50 ms), shorter than min press (150 ms)
        rig.finger.up()

    rec = asyncio.run(scenario(rig, finger, ["press", "too_short"]))
    assert rec.events[1].held_s < MIN_PRESS_MS / 1000


@pytest.mark.parametrize("backend", BACKENDS)
def test_stuck_button_ends_turn_and_its_release_is_swallowed(
    backend: str, pty_pair: tuple[int, int]
) -> None:
    rig = make_rig(backend, pty_pair, max_press_s=0.8)  # below the config minimum on purpose
    seen: list[str] = []

    async def run() -> Recorder:
        rec = Recorder()
        task = asyncio.create_task(rig.button.run(rec))
        try:
            await eventually(rig.button.healthy)
            await asyncio.to_thread(rig.finger.down)
            await eventually(lambda: rec.kinds == ["press", "stuck"])
            stuck = rec.events[1]
            assert 0.8 <= stuck.held_s < 3.0
            await asyncio.sleep(0.3)  # still sat on
            await asyncio.to_thread(rig.finger.up)
            await asyncio.sleep(0.6)  # the real release: not emitted
            seen.extend(rec.kinds)
            # the button works normally again
            await asyncio.to_thread(rig.finger.down)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(rig.finger.up)
            await eventually(lambda: len(rec.events) >= 4)
            await asyncio.sleep(0.2)
        finally:
            await cancel_and_wait(task)
        return rec

    rec = asyncio.run(run())
    assert seen == ["press", "stuck"]
    assert rec.kinds == ["press", "stuck", "press", "release"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_health_probe_and_lifecycle(backend: str, pty_pair: tuple[int, int]) -> None:
    rig = make_rig(backend, pty_pair)
    assert not rig.button.healthy()
    assert rig.button.last_progress == 0.0

    async def run() -> None:
        task = asyncio.create_task(rig.button.run(lambda e: None))
        await eventually(rig.button.healthy)
        first = rig.button.last_progress
        await eventually(lambda: rig.button.last_progress > first + 0.1)
        assert rig.button.healthy()
        with pytest.raises(RuntimeError, match="already running"):
            await rig.button.run(lambda e: None)
        await cancel_and_wait(task)
        assert not rig.button.healthy()
        # a second run() after the first ended works (resource was released)
        task = asyncio.create_task(rig.button.run(lambda e: None))
        await eventually(rig.button.healthy)
        await cancel_and_wait(task)

    asyncio.run(run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_event_errors_propagate_out_of_run(backend: str, pty_pair: tuple[int, int]) -> None:
    rig = make_rig(backend, pty_pair)

    def boom(event: ButtonEvent) -> None:
        raise ValueError("daemon bug")

    async def run() -> None:
        task = asyncio.create_task(rig.button.run(boom))
        await eventually(rig.button.healthy)
        await asyncio.to_thread(rig.finger.down)
        with pytest.raises(ValueError, match="daemon bug"):
            await asyncio.wait_for(task, 5)
        await asyncio.to_thread(rig.finger.up)
        assert not rig.button.healthy()

    asyncio.run(run())
    if rig.tty is not None:
        assert termios.tcgetattr(rig.tty)[3] & termios.ECHO


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_always_ends_run_even_while_items_flow(
    backend: str, pty_pair: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: asyncio.wait_for on 3.11 could swallow a cancel racing with a get()."""
    monkeypatch.setattr(button_mod, "PROBE_INTERVAL_S", 0.0005)  # a constant stream of items
    rig = make_rig(backend, pty_pair)

    async def run() -> None:
        for i in range(40):
            task = asyncio.create_task(rig.button.run(lambda e: None))
            await eventually(rig.button.healthy)
            await asyncio.sleep((i % 7) * 0.0007)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=3)
            assert done, f"run() ignored cancellation (round {i})"
            assert task.cancelled()

    asyncio.run(run())


# --- pin backends (mock, gpio): contacts bounce ------------------------------------------

PIN_BACKENDS = ["mock", "gpio"]


@pytest.mark.parametrize("backend", PIN_BACKENDS)
def test_bouncy_contact_gives_exactly_one_press_and_one_release(
    backend: str, pty_pair: tuple[int, int]
) -> None:
    rig = make_rig(backend, pty_pair)

    def finger() -> None:
        rig.finger.bouncy(True)
        time.sleep(0.5)
        rig.finger.bouncy(False)

    rec = asyncio.run(scenario(rig, finger, ["press", "release"]))
    assert rec.events[1].held_s >= 0.4


@pytest.mark.parametrize("backend", PIN_BACKENDS)
def test_tap_inside_the_bounce_window_is_not_lost(backend: str, pty_pair: tuple[int, int]) -> None:
    rig = make_rig(backend, pty_pair)

    def finger() -> None:
        rig.finger.down()
        rig.finger.up()  # released within the bounce window: only the pin level tells

    rec = asyncio.run(scenario(rig, finger, ["press", "too_short"]))
    assert rec.events[1].held_s < BOUNCE_MS / 1000


class FingerPin(MockPin):  # type: ignore[misc]
    """A mock input a finger can hold against the pull while the button opens."""

    held = False

    def _set_pull(self, value: str) -> None:
        super()._set_pull(value)
        if self.held:  # the contact wins over the pull resistor
            self._change_state(value != "up")


@pytest.mark.parametrize("pull_up", [True, False])
def test_button_held_at_start_is_ignored_until_released(pull_up: bool) -> None:
    cfg = _cfg("gpio", pull_up=pull_up)
    factory = MockFactory(pin_class=FingerPin)
    finger = PinFinger(factory, cfg)
    finger.pin.held = True
    button = make_button(cfg, pin_factory=factory)

    async def run() -> list[str]:
        rec = Recorder()
        task = asyncio.create_task(button.run(rec))
        try:
            await eventually(button.healthy)
            assert finger.pin.state == (not pull_up), "the finger holds the contact"
            await asyncio.sleep(0.3)  # several probes see it held: still nothing
            finger.pin.held = False
            await asyncio.to_thread(finger.up)
            await asyncio.sleep(0.2)
            assert rec.kinds == [], "neither the held press nor its release is reported"
            await asyncio.to_thread(finger.down)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(finger.up)
            await eventually(lambda: len(rec.events) >= 2)
            await asyncio.sleep(0.1)
        finally:
            await cancel_and_wait(task)
        return rec.kinds

    assert asyncio.run(run()) == ["press", "release"]


def test_mock_button_press_release_respect_pull_down(pty_pair: tuple[int, int]) -> None:
    rig = make_rig("mock", pty_pair, pull_up=False)
    assert isinstance(rig.button, MockButton)
    button = rig.button
    pin = button.pin_factory.pin(17)

    async def run() -> Recorder:
        rec = Recorder()
        task = asyncio.create_task(button.run(rec))
        await eventually(button.healthy)
        assert pin.state is False or pin.state == 0  # pulled down, released
        button.press()  # from the loop thread, as `parley ctl press` would
        assert pin.state
        await asyncio.sleep(0.3)
        button.release()
        assert not pin.state
        await eventually(lambda: len(rec.events) >= 2)
        await cancel_and_wait(task)
        return rec

    rec = asyncio.run(run())
    assert rec.kinds == ["press", "release"]
    assert rec.threads == {threading.get_ident()}


def test_gpio_without_gpio_hardware_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if any(Path("/dev").glob("gpiochip*")):
        pytest.skip("this machine has GPIO chips")
    monkeypatch.setenv("LG_WD", str(tmp_path))
    button = make_button(_cfg("gpio"))

    async def run() -> None:
        await button.run(lambda e: None)

    with pytest.raises(ParleyError) as info:
        asyncio.run(run())
    msg = str(info.value)
    assert isinstance(info.value, ButtonError)
    assert "GPIO17" in msg and "group gpio" in msg and "button.backend: keyboard" in msg
    assert not button.healthy()


def test_lgpio_workdir_defaults_to_a_writable_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LG_WD", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/parley")
    button_mod.lgpio_workdir_setup()
    assert os.environ["LG_WD"] == "/run/parley"
    monkeypatch.setenv("LG_WD", "/elsewhere")
    button_mod.lgpio_workdir_setup()
    assert os.environ["LG_WD"] == "/elsewhere"


# --- keyboard specifics --------------------------------------------------------------------


def test_keyboard_restores_the_terminal_on_cancel(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON and before[3] & termios.ECHO
    button = make_button(_cfg("keyboard"), tty_fd=slave)

    async def run() -> list[Any]:
        task = asyncio.create_task(button.run(lambda e: None))
        await eventually(button.healthy)
        during = termios.tcgetattr(slave)
        os.write(master, b" ")  # in the middle of a press
        await asyncio.sleep(0.05)
        await cancel_and_wait(task)
        return during

    during = asyncio.run(run())
    assert not during[3] & termios.ICANON and not during[3] & termios.ECHO
    assert during[3] & termios.ISIG, "Ctrl-C must still work"
    assert termios.tcgetattr(slave) == before


def test_keyboard_ignores_other_keys(pty_pair: tuple[int, int]) -> None:
    rig = make_rig("keyboard", pty_pair)
    master = pty_pair[0]

    def finger() -> None:
        os.write(master, b"abc\n")
        time.sleep(0.1)
        rig.finger.down()
        time.sleep(0.5)
        rig.finger.up()

    rec = asyncio.run(scenario(rig, finger, ["press", "release"], quiet_s=0.5))
    assert rec.events[1].held_s >= 0.3


def test_keyboard_needs_a_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w+b") as f:
        button = make_button(_cfg("keyboard"), tty_fd=f.fileno())
        with pytest.raises(ButtonError, match="needs a terminal"):
            asyncio.run(button.run(lambda e: None))


def test_keyboard_terminal_going_away_ends_run_with_error(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    button = make_button(_cfg("keyboard"), tty_fd=slave)

    async def run() -> None:
        task = asyncio.create_task(button.run(lambda e: None))
        await eventually(button.healthy)
        os.close(master)  # hang up
        with pytest.raises(ButtonError, match="terminal"):
            await asyncio.wait_for(task, 5)

    asyncio.run(run())


def test_make_button_rejects_unknown_backend() -> None:
    with pytest.raises(ButtonError, match=r"unknown button\.backend"):
        make_button(dataclasses.replace(ButtonConfig(), backend="usb"))  # type: ignore[arg-type]


# --- the state machine on its own (deterministic clock) ------------------------------------


class Level:
    def __init__(self) -> None:
        self.value = False

    def __call__(self) -> bool:
        return self.value


def _machine(level: Level, bounce: float = 0.02) -> _PressMachine:
    m = _PressMachine(bounce_s=bounce, min_press_s=0.15, max_press_s=10.0, read_level=level)
    m.start(level.value)
    return m


def test_machine_debounce_and_reconcile() -> None:
    level = Level()
    m = _machine(level)
    level.value = True
    ev = m.edge(True, 100.0)
    assert [e.kind for e in ev] == ["press"]
    assert m.edge(False, 100.001) == [] and m.edge(True, 100.002) == []
    assert m.deadline() == pytest.approx(100.02)
    assert m.tick(100.02) == []  # level agrees: nothing
    level.value = False
    ev = m.edge(False, 101.0)
    assert [e.kind for e in ev] == ["release"]
    assert ev[0].held_s == pytest.approx(1.0)
    assert m.edge(True, 101.005) == []  # bounce on release
    assert m.tick(101.03) == []


def test_machine_release_hidden_in_bounce_window_is_dated_at_the_raw_edge() -> None:
    level = Level()
    m = _machine(level)
    level.value = True
    m.edge(True, 5.0)
    level.value = False
    assert m.edge(False, 5.004) == []
    ev = m.tick(5.02)
    assert [(e.kind, e.at) for e in ev] == [("too_short", 5.004)]
    assert ev[0].held_s == pytest.approx(0.004)


def test_machine_stuck_then_silent_release() -> None:
    level = Level()
    m = _machine(level, bounce=0.0)
    level.value = True
    m.edge(True, 0.0)
    assert m.deadline() == pytest.approx(10.0)
    assert m.tick(9.9) == []
    ev = m.tick(10.0)
    assert [(e.kind, e.held_s) for e in ev] == [("stuck", 10.0)]
    assert m.deadline() is None
    level.value = False
    assert m.edge(False, 30.0) == []
    assert [e.kind for e in m.edge(True, 31.0)] == ["press"]


def test_machine_survives_an_unreadable_pin() -> None:
    def broken() -> bool:
        raise OSError("gpiochip gone")

    m = _PressMachine(bounce_s=0.02, min_press_s=0.15, max_press_s=10.0, read_level=broken)
    m.start(False)
    assert [e.kind for e in m.edge(True, 1.0)] == ["press"]
    assert m.tick(1.05) == []
    assert m.deadline() == pytest.approx(11.0)


def test_machine_lost_edge_is_corrected_after_two_probes() -> None:
    level = Level()
    m = _machine(level, bounce=0.0)
    assert m.observe(True, 1.0) == []  # could be an edge still in flight
    ev = m.observe(True, 2.0)
    assert [e.kind for e in ev] == ["press"]
    assert m.observe(False, 3.0) == []
    assert m.edge(True, 3.5) == []  # a real edge resets the count (already pressed)
    assert m.observe(False, 4.0) == []
    assert [e.kind for e in m.observe(False, 5.0)] == ["release"]
