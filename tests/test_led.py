"""Contract tests for hw.led on gpiozero mock pins.

Each state is run for a few seconds on its own mock pin (all in parallel, to keep the suite
short) and the recorded pin history (``MockPin.states``) is reduced to structure: steady or
changing, intermediate PWM levels or not, how pulses group. Timing is asserted only
relatively or with wide margins.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPin, MockPWMPin

from daemon.config import LedConfig
from daemon.errors import ParleyError
from hw.led import (
    LED_STATES,
    GpioLed,
    LedError,
    LedState,
    MockLed,
    NullLed,
    StatusLed,
    make_led,
)

WINDOW_S = 4.5
GROUP_GAP_S = 0.35  # gaps longer than this separate pulse groups


@dataclasses.dataclass
class Trace:
    """A pin's history: (absolute time since start, value) pairs."""

    points: list[tuple[float, float]]
    end: float

    @classmethod
    def of(cls, pin: Any, end: float) -> Trace:
        t = 0.0
        points = []
        for st in list(pin.states):
            t += st.timestamp  # MockPin stores the time since the previous change
            points.append((t, float(st.state)))
        return cls(points, end)

    @property
    def values(self) -> list[float]:
        return [v for _, v in self.points]

    @property
    def changes(self) -> int:
        return len(self.points) - 1

    @property
    def intermediate(self) -> set[float]:
        return {round(v, 3) for v in self.values if 0.0 < v < 1.0}

    def on_runs(self) -> list[tuple[float, float]]:
        runs: list[tuple[float, float]] = []
        start: float | None = None
        for t, v in self.points:
            if v >= 0.5 and start is None:
                start = t
            elif v < 0.5 and start is not None:
                runs.append((start, t))
                start = None
        if start is not None:
            runs.append((start, self.end))
        return runs

    def off_gaps(self) -> list[float]:
        runs = self.on_runs()
        return [b[0] - a[1] for a, b in itertools.pairwise(runs)]

    def groups(self) -> list[int]:
        """Sizes of pulse groups separated by off-gaps longer than GROUP_GAP_S."""
        sizes: list[int] = []
        last_end: float | None = None
        for start, end in self.on_runs():
            if last_end is None or start - last_end > GROUP_GAP_S:
                sizes.append(1)
            else:
                sizes[-1] += 1
            last_end = end
        return sizes

    def median_on(self) -> float:
        runs = sorted(e - s for s, e in self.on_runs()[:-1])  # the last may be cut off
        return runs[len(runs) // 2]


def _cfg(pin: int, **kw: Any) -> LedConfig:
    return dataclasses.replace(LedConfig(enabled=True, pin=pin), **kw)


@pytest.fixture(scope="module")
def traces() -> dict[tuple[bool, str], Trace]:
    """Every state, PWM and on/off, recorded over the same window in parallel."""
    leds: list[tuple[bool, LedState, StatusLed, Any]] = []
    for pwm in (True, False):
        factory = MockFactory(pin_class=MockPWMPin if pwm else MockPin)
        for i, state in enumerate(LED_STATES):
            cfg = _cfg(2 + i, pwm=pwm)
            led = make_led(cfg, "gpio", pin_factory=factory)
            assert isinstance(led, GpioLed)
            leds.append((pwm, state, led, factory.pin(cfg.pin)))
    for _, state, led, pin in leds:
        if state == "idle":
            led.set_state("listening")  # so that idle is a real transition
        led.set_state(state)
        pin.clear_states()
    time.sleep(WINDOW_S)
    out: dict[tuple[bool, str], Trace] = {
        (pwm, state): Trace.of(pin, WINDOW_S) for pwm, state, _, pin in leds
    }
    for _, _, led, _ in leds:
        led.close()
    return out


PWM = [True, False]


@pytest.mark.parametrize("pwm", PWM)
def test_idle_is_steady_dim_or_off(traces: dict[tuple[bool, str], Trace], pwm: bool) -> None:
    tr = traces[pwm, "idle"]
    assert tr.changes == 0
    if pwm:
        assert 0.0 < tr.values[0] < 0.2  # a dim glow
    else:
        assert tr.values[0] == 0.0


@pytest.mark.parametrize("pwm", PWM)
def test_listening_is_solid_on(traces: dict[tuple[bool, str], Trace], pwm: bool) -> None:
    tr = traces[pwm, "listening"]
    assert tr.changes == 0
    assert tr.values[0] == 1.0


@pytest.mark.parametrize("pwm", PWM)
def test_thinking_is_a_fast_even_blink(traces: dict[tuple[bool, str], Trace], pwm: bool) -> None:
    tr = traces[pwm, "thinking"]
    assert set(tr.values) <= {0.0, 1.0}
    assert len(tr.on_runs()) >= 10  # ~22 expected in the window
    assert tr.groups() == [len(tr.on_runs())], "no long pauses: one continuous group"


def test_speaking_breathes_on_pwm(traces: dict[tuple[bool, str], Trace]) -> None:
    tr = traces[True, "speaking"]
    assert len(tr.intermediate) >= 10, "a breathe goes through many brightness levels"
    assert max(tr.values) > 0.9 and min(tr.values) < 0.1


def test_speaking_is_a_slower_blink_without_pwm(traces: dict[tuple[bool, str], Trace]) -> None:
    tr = traces[False, "speaking"]
    assert set(tr.values) <= {0.0, 1.0}
    assert len(tr.on_runs()) >= 3
    assert tr.median_on() > 2 * traces[False, "thinking"].median_on()
    gaps = tr.off_gaps()
    assert max(gaps) < 1.5 * min(gaps), f"an even rhythm, no pauses: {gaps}"


@pytest.mark.parametrize(("state", "size"), [("offline", 2), ("error", 3)])
@pytest.mark.parametrize("pwm", PWM)
def test_grouped_pulses(
    traces: dict[tuple[bool, str], Trace], pwm: bool, state: str, size: int
) -> None:
    tr = traces[pwm, state]
    assert set(tr.values) <= {0.0, 1.0}
    groups = tr.groups()
    complete = groups[:-1]  # the window started with the pattern; the last may be cut off
    assert len(complete) >= 2, groups
    assert set(complete) == {size}, groups


@pytest.mark.parametrize("pwm", PWM)
def test_every_state_looks_different(traces: dict[tuple[bool, str], Trace], pwm: bool) -> None:
    def signature(tr: Trace) -> tuple[object, ...]:
        groups = tr.groups()
        return (
            tr.changes == 0,
            round(tr.values[0], 2) if tr.changes == 0 else None,
            bool(tr.intermediate),
            groups[0] if len(groups) > 1 else "one",
            tr.median_on() > 0.25 if len(tr.on_runs()) > 2 else None,
        )

    sigs = {state: signature(traces[pwm, state]) for state in LED_STATES}
    assert len(set(sigs.values())) == len(LED_STATES), sigs


# --- transitions and lifecycle -----------------------------------------------------------


def _mock(**kw: Any) -> tuple[MockLed, Any]:
    led = make_led(_cfg(27, **kw), "mock")
    assert isinstance(led, MockLed)
    return led, led.pin_factory.pin(27)


@pytest.mark.parametrize("pwm", PWM)
@pytest.mark.parametrize("old", ["thinking", "speaking", "offline", "error"])
def test_a_new_state_stops_the_old_pattern(pwm: bool, old: LedState) -> None:
    led, pin = _mock(pwm=pwm)
    try:
        led.set_state(old)
        time.sleep(0.35)
        led.set_state("listening")
        pin.clear_states()
        time.sleep(0.4)
        tr = Trace.of(pin, 0.4)
        assert tr.values == [1.0], "the old pattern's thread must not write any more"
        assert led.state == "listening"
    finally:
        led.close()


def test_setting_the_same_state_does_not_restart_the_pattern() -> None:
    led, pin = _mock(pwm=False)
    try:
        led.set_state("offline")  # on for 0.15 s, then off for most of 2 s
        time.sleep(0.5)
        pin.clear_states()
        led.set_state("offline")
        time.sleep(0.3)
        assert Trace.of(pin, 0.3).values == [0.0], "a restart would light the LED again"
    finally:
        led.close()


def test_active_low_inverts_the_pin() -> None:
    led, pin = _mock(pwm=False, active_high=False)
    try:
        assert pin.state  # idle = off = pin high
        led.set_state("listening")
        assert not pin.state
    finally:
        led.close()
    assert pin.state  # closed: off


@pytest.mark.parametrize("pwm", PWM)
def test_close_turns_off_and_later_calls_are_ignored(pwm: bool) -> None:
    led, pin = _mock(pwm=pwm)
    led.set_state("thinking")
    time.sleep(0.15)
    led.close()
    pin.clear_states()
    led.set_state("listening")
    led.close()  # idempotent
    time.sleep(0.25)
    tr = Trace.of(pin, 0.25)
    assert tr.values == [0.0]


def test_a_failing_led_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    led, _ = _mock(pwm=True)
    try:

        def broken(*a: Any, **k: Any) -> None:
            raise OSError("pin gone")

        led.device.blink = broken
        led.device.pulse = broken

        def warnings() -> int:
            return sum("status LED failed" in r.message for r in caplog.records)

        with caplog.at_level(logging.WARNING, logger="hw.led"):
            led.set_state("thinking")
            led.set_state("speaking")
            assert led.state == "speaking"
            assert warnings() == 1, "logged once while it keeps failing"
            led.set_state("listening")  # works again
            assert led.device.value == 1.0
            led.set_state("thinking")
            assert warnings() == 2, "a new failure after recovery is logged again"
    finally:
        led.close()


def test_unknown_state_is_a_value_error() -> None:
    for led in (NullLed(), _mock()[0]):
        with pytest.raises(ValueError, match="unknown LED state"):
            led.set_state("party")  # type: ignore[arg-type]
        led.close()


def test_disabled_or_keyboard_gives_a_null_led() -> None:
    for cfg, backend in ((LedConfig(enabled=False), "gpio"), (_cfg(27), "keyboard")):
        led = make_led(cfg, backend)
        assert isinstance(led, NullLed)
        states = [led.state]
        led.set_state("error")
        states.append(led.state)
        assert states == ["idle", "error"]
        led.close()
    with pytest.raises(LedError):
        make_led(_cfg(27), "usb")


def test_gpio_without_gpio_hardware_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if any(Path("/dev").glob("gpiochip*")):
        pytest.skip("this machine has GPIO chips")
    monkeypatch.setenv("LG_WD", str(tmp_path))
    with pytest.raises(ParleyError) as info:
        make_led(_cfg(27), "gpio")
    msg = str(info.value)
    assert "GPIO27" in msg and "group gpio" in msg and "led.enabled: false" in msg
