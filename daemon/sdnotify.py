"""Talking to systemd: sd_notify(3) messages and a health-gated watchdog.

:class:`Notifier` sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and friends to the
socket named by ``NOTIFY_SOCKET``. It uses ``systemd.daemon.notify`` (libsystemd) when that
is importable and otherwise sends the datagram itself (path or abstract ``@name`` sockets).
Without ``NOTIFY_SOCKET`` every call does nothing; a socket that is gone never raises to the
caller: the first failure of an episode is logged at warning, the rest at debug.

:class:`Watchdog` pings ``WATCHDOG=1`` at half of systemd's ``WatchdogSec=`` only while every
registered part (capture, playback, connection, button, ...) reports progress. It runs as a
task on the event loop, so a blocked loop stops the pings too; either way systemd then
kills the service (SIGABRT; with ``PYTHONFAULTHANDLER=1`` the stuck stack lands in the
journal) and ``Restart=on-failure`` starts it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

Sender = Callable[[str], bool]
"""Sends one notification (newline-separated ``KEY=VALUE`` lines); True if it was sent."""


def _libsystemd_sender() -> Sender | None:
    try:
        import systemd.daemon as sd_daemon
    except ImportError:
        return None

    def send(message: str) -> bool:
        return bool(sd_daemon.notify(message))

    return send


def _socket_address(name: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a connectable AF_UNIX address (``@x`` is the abstract ``\\0x``)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """sd_notify(3) without surprises.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET`` read at construction. ``use_libsystemd``:
    None picks libsystemd when importable; libsystemd reads ``$NOTIFY_SOCKET`` itself, so
    an explicit ``socket_path`` always uses the built-in sender. The message methods return
    None (they never fail loudly); :meth:`notify` returns whether the datagram was sent.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        use_libsystemd: bool | None = None,
        monotonic_usec: Callable[[], int] | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        explicit = socket_path is not None
        path = socket_path if explicit else os.environ.get("NOTIFY_SOCKET")
        self._path: str | None = path or None
        self._timeout_s = timeout_s
        self._monotonic_usec = monotonic_usec or (
            lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        if explicit and use_libsystemd:
            raise ValueError("libsystemd reads $NOTIFY_SOCKET itself; omit socket_path")
        self._sender: Sender | None = None
        if self._path is not None and use_libsystemd is not False and not explicit:
            self._sender = _libsystemd_sender()
            if self._sender is None and use_libsystemd:
                raise ImportError("systemd.daemon is not importable (install systemd-python)")
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to talk to."""
        return self._path is not None

    @property
    def socket_path(self) -> str | None:
        return self._path

    # --- the messages --------------------------------------------------------------------

    def ready(self) -> None:
        """Start-up (or a reload) is complete."""
        self.notify("READY=1")

    def status(self, text: str) -> None:
        """One line for ``systemctl status``; newlines become spaces (no field injection)."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Keep-alive ping for ``WatchdogSec=``."""
        self.notify("WATCHDOG=1")

    def watchdog_trigger(self) -> None:
        """Ask systemd to act as if the watchdog timed out (we know we are stuck)."""
        self.notify("WATCHDOG=trigger")

    def reloading(self) -> None:
        """A reload began; send :meth:`ready` when it is done.

        systemd (since 253) wants ``MONOTONIC_USEC`` (CLOCK_MONOTONIC) with ``RELOADING=1``
        to tell this reload from an earlier one; 252 ignores the extra field.
        """
        self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}")

    def stopping(self) -> None:
        """Shutdown began."""
        self.notify("STOPPING=1")

    def extend_timeout(self, usec: int) -> None:
        """Ask for ``usec`` more microseconds for the current start, stop or reload."""
        if isinstance(usec, bool) or not isinstance(usec, int) or usec < 0:
            raise ValueError(f"extend_timeout needs a non-negative integer, got {usec!r}")
        self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def errno(self, code: int) -> None:
        """Report a failure as an errno(3) value (shown by ``systemctl status``)."""
        if isinstance(code, bool) or not isinstance(code, int) or code < 0:
            raise ValueError(f"errno needs a non-negative integer, got {code!r}")
        self.notify(f"ERRNO={code}")

    # --- transport -----------------------------------------------------------------------

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram."""
        if self._path is None:
            return False
        message = "\n".join(assignments)
        try:
            sent = self._sender(message) if self._sender else self._send_raw(message)
        except OSError as exc:
            self._failed(exc)
            return False
        if sent:
            if self._failing:
                log.info("systemd notification socket %s works again", self._path)
            self._failing = False
        else:
            self._failed(None)
        return sent

    def _send_raw(self, message: str) -> bool:
        assert self._path is not None
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self._timeout_s)
            self._sock = sock
        try:
            self._sock.sendto(message.encode(), _socket_address(self._path))
        except OSError:
            self.close()
            raise
        return True

    def _failed(self, exc: OSError | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "libsystemd did not send"
        if not self._failing:
            self._failing = True
            log.warning("cannot notify systemd via %s (%s)", self._path, reason)
        else:
            log.debug("cannot notify systemd via %s (%s)", self._path, reason)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``.

    None when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer, or
    ``WATCHDOG_PID`` set to another process (the variables were inherited, not meant for us).
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", owner)
            return None
    return usec / 2_000_000


class _Pinger(Protocol):
    def watchdog(self) -> object: ...


Probe = Callable[[], bool]
"""A part's health: True while it makes progress (or legitimately has nothing to do)."""


@dataclass
class Heartbeat:
    """A probe fed by the part itself: call :meth:`beat` on every unit of progress.

    Healthy while the last beat is at most ``max_age_s`` old, or while paused (a part that
    is idle on purpose, e.g. playback with nothing to play). A new heartbeat starts fresh.
    """

    name: str
    max_age_s: float
    clock: Callable[[], float]
    last: float = 0.0
    paused: bool = False

    def __post_init__(self) -> None:
        self.last = self.clock()

    def beat(self) -> None:
        self.last = self.clock()
        self.paused = False

    def pause(self) -> None:
        """Stop checking until the next :meth:`beat`."""
        self.paused = True

    def age(self) -> float:
        return self.clock() - self.last

    def __call__(self) -> bool:
        return self.paused or self.age() <= self.max_age_s


class Watchdog:
    """Pings systemd's watchdog only while every registered part is healthy."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._probes: dict[str, Probe] = {}
        self._unhealthy: set[str] = set()

    def register(self, name: str, probe: Probe) -> None:
        """Add a part; ``probe()`` is called on every tick and must not block."""
        if name in self._probes:
            raise ValueError(f"watchdog part {name!r} is already registered")
        self._probes[name] = probe

    def heartbeat(self, name: str, max_age_s: float) -> Heartbeat:
        """Register a part as a :class:`Heartbeat` on this watchdog's clock and return it."""
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive")
        hb = Heartbeat(name, max_age_s, self._clock)
        self.register(name, hb)
        return hb

    def unregister(self, name: str) -> None:
        self._probes.pop(name, None)
        self._unhealthy.discard(name)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self._probes)

    def unhealthy(self) -> list[str]:
        """Names of the parts failing their probe now; logs each change once."""
        bad: list[str] = []
        for name, probe in list(self._probes.items()):
            error: BaseException | None = None
            try:
                ok = bool(probe())
            except Exception as exc:
                ok, error = False, exc
            if ok:
                if name in self._unhealthy:
                    self._unhealthy.discard(name)
                    log.info("watchdog: %s makes progress again", name)
                continue
            bad.append(name)
            if name in self._unhealthy:
                continue
            self._unhealthy.add(name)
            why = ""
            if error is not None:
                why = " (its probe raised)"
            elif isinstance(probe, Heartbeat):
                why = f" (no progress for {probe.age():.1f} s)"
            log.error(
                "watchdog: %s is stuck%s; withholding the systemd watchdog ping",
                name,
                why,
                exc_info=error,
            )
        return bad

    def tick(self, notifier: _Pinger) -> bool:
        """One check; pings and returns True only when every part is healthy."""
        if self.unhealthy():
            return False
        notifier.watchdog()
        return True

    async def run(self, notifier: _Pinger, interval: float | None = None) -> None:
        """Tick every ``interval`` seconds (default: :func:`watchdog_interval`) until cancelled.

        Returns at once when systemd's watchdog is not enabled for this process.
        """
        if interval is None:
            interval = watchdog_interval()
        if interval is None:
            log.debug("systemd watchdog not enabled; not pinging")
            return
        if interval <= 0:
            raise ValueError("watchdog interval must be positive")
        log.debug("pinging the systemd watchdog every %.1f s", interval)
        while True:
            self.tick(notifier)
            await self._sleep(interval)
