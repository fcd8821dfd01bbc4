"""Status LED: one light, six patterns.

==========  ========================================  ====================================
state       PWM LED (``led.pwm: true``)                on/off LED (``led.pwm: false``)
==========  ========================================  ====================================
idle        dim steady glow (the daemon is alive)      off
listening   solid on                                   solid on
thinking    fast blink, 0.1 s on / 0.1 s off           same
speaking    slow breathe, 1 s up / 1 s down            medium blink, 0.4 s on / 0.4 s off
offline     double blink every 2 s                     same
error       fast triple blink every 1.2 s              same
==========  ========================================  ====================================

Timing is gpiozero's: ``blink``/``pulse`` and, for the multi-pulse patterns, a ``source``
iterator stepped every 50 ms; each runs on a gpiozero background thread. ``set_state`` is
called from the event loop, only stops/starts those threads (a thread stop wakes it through
an Event, so it returns quickly) and never blocks on the pattern. A failing LED is logged and
otherwise ignored: the status light must never take the assistant down.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any, Literal, Protocol, get_args

from daemon.config import LedConfig
from daemon.errors import ParleyError

log = logging.getLogger(__name__)

LedState = Literal["idle", "listening", "thinking", "speaking", "offline", "error"]
LED_STATES: tuple[LedState, ...] = get_args(LedState)

IDLE_GLOW = 0.04
"""Brightness of the idle glow on a PWM LED."""
STEP_S = 0.05
"""Step of the ``source`` patterns (offline, error)."""
# 1 = on, 0 = off, one entry per STEP_S.
OFFLINE_PATTERN = (1, 1, 1, 0, 0, 0, 1, 1, 1) + (0,) * 31  # 2 pulses, 2.0 s period
ERROR_PATTERN = (1, 1, 0, 0, 1, 1, 0, 0, 1, 1) + (0,) * 14  # 3 pulses, 1.2 s period


class LedError(ParleyError):
    """The status LED could not be opened."""


class StatusLed(Protocol):
    """A status light. Every method is cheap and safe to call from the event loop."""

    @property
    def state(self) -> LedState:
        """The last state set (``idle`` initially)."""
        ...

    def set_state(self, state: LedState) -> None:
        """Show ``state``; setting the current state again does nothing."""
        ...

    def close(self) -> None:
        """Turn the LED off and release the pin; later ``set_state`` calls are ignored."""
        ...


def _check(state: str) -> LedState:
    if state not in LED_STATES:
        raise ValueError(f"unknown LED state {state!r}; use one of {', '.join(LED_STATES)}")
    return state


class NullLed:
    """No LED (``led.enabled: false``, or a keyboard setup): records and logs the state."""

    def __init__(self) -> None:
        self._state: LedState = "idle"

    @property
    def state(self) -> LedState:
        return self._state

    def set_state(self, state: LedState) -> None:
        state = _check(state)
        if state != self._state:
            log.debug("status: %s", state)
            self._state = state

    def close(self) -> None:
        pass


class GpioLed:
    """``gpiozero.PWMLED`` (``cfg.pwm``) or ``gpiozero.LED`` on ``cfg.pin``.

    ``pin_factory`` None means gpiozero's default pin factory.
    """

    def __init__(self, cfg: LedConfig, *, pin_factory: Any = None) -> None:
        from gpiozero import LED, PWMLED

        if pin_factory is None:
            from hw.button import lgpio_workdir_setup

            lgpio_workdir_setup()
        self._pwm = cfg.pwm
        self._state: LedState = "idle"
        self._closed = False
        self._failed = False
        error: Exception | None = None
        tried = ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self._dev: Any = (PWMLED if cfg.pwm else LED)(
                    cfg.pin,
                    active_high=cfg.active_high,
                    initial_value=0,
                    pin_factory=pin_factory,
                )
            except Exception as exc:
                tried = "; ".join(str(w.message) for w in caught)
                error = exc
        if error is not None:
            raise LedError(
                f"cannot open the status LED on GPIO{cfg.pin}: {error}"
                + (f" ({tried})" if tried else "")
                + ". On a Raspberry Pi, "
                "add the user to group gpio (sudo usermod -aG gpio $USER, then log in "
                "again) and check the pin is free"
                + ("; if PWM is not available, set led.pwm: false" if cfg.pwm else "")
                + "; or set led.enabled: false."
            ) from error
        self._dev.source_delay = STEP_S
        self._apply("idle")

    @property
    def state(self) -> LedState:
        return self._state

    @property
    def device(self) -> Any:
        """The gpiozero device (tests and diagnostics)."""
        return self._dev

    def set_state(self, state: LedState) -> None:
        state = _check(state)
        if self._closed or state == self._state:
            return
        self._state = state
        try:
            self._apply(state)
        except Exception as exc:
            if not self._failed:
                log.warning("status LED failed (%s); carrying on without it", exc)
            self._failed = True
        else:
            self._failed = False

    def _apply(self, state: LedState) -> None:
        dev = self._dev
        dev.source = None  # stop a running pattern first, so it cannot write after off()
        dev.off()  # stops blink/pulse
        if state == "idle":
            if self._pwm:
                dev.value = IDLE_GLOW
        elif state == "listening":
            dev.on()
        elif state == "thinking":
            dev.blink(on_time=0.1, off_time=0.1)
        elif state == "speaking":
            if self._pwm:
                dev.pulse(fade_in_time=1.0, fade_out_time=1.0)
            else:
                dev.blink(on_time=0.4, off_time=0.4)
        elif state == "offline":
            dev.source = itertools.cycle(OFFLINE_PATTERN)
        else:  # error
            dev.source = itertools.cycle(ERROR_PATTERN)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._dev.source = None
            self._dev.off()
            self._dev.close()
        except Exception as exc:
            log.warning("closing the status LED failed: %s", exc)


class MockLed(GpioLed):
    """The gpio code path on a private ``MockFactory`` (PWM-capable pins if ``cfg.pwm``)."""

    def __init__(self, cfg: LedConfig) -> None:
        from gpiozero.pins.mock import MockFactory, MockPin, MockPWMPin

        self.pin_factory: Any = MockFactory(pin_class=MockPWMPin if cfg.pwm else MockPin)
        super().__init__(cfg, pin_factory=self.pin_factory)


def make_led(cfg: LedConfig, backend: str, *, pin_factory: Any = None) -> StatusLed:
    """The LED for ``cfg`` on the button's ``backend`` (gpio, mock or keyboard).

    Disabled, or with the keyboard backend (no GPIO there): a :class:`NullLed`.
    ``pin_factory`` (gpio only) overrides gpiozero's default pin factory.
    """
    if not cfg.enabled:
        return NullLed()
    if backend == "gpio":
        return GpioLed(cfg, pin_factory=pin_factory)
    if backend == "mock":
        return MockLed(cfg)
    if backend == "keyboard":
        log.info("status LED: keyboard backend has no GPIO; states are only logged (debug)")
        return NullLed()
    raise LedError(f"unknown backend {backend!r} for the status LED; use gpio, mock or keyboard")
