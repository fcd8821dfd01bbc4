"""sd_notify and the health-gated watchdog, against a real unix datagram socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aio import cancel_and_wait

from daemon import sdnotify
from daemon.sdnotify import Heartbeat, Notifier, Watchdog, watchdog_interval

HAVE_LIBSYSTEMD = sdnotify._libsystemd_sender() is not None


class Receiver:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name  # what NOTIFY_SOCKET says

    def messages(self) -> list[str]:
        """Every datagram queued so far (non-blocking; the sender already returned)."""
        out: list[str] = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify.sock")
        sock.bind(name)
    else:
        label = f"parley-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + label.encode())
        name = "@" + label
    sock.setblocking(False)
    yield Receiver(sock, name)
    sock.close()


@pytest.mark.parametrize("backend", ["raw", "libsystemd"])
def test_messages_arrive_in_order(
    receiver: Receiver, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "libsystemd" and not HAVE_LIBSYSTEMD:
        pytest.skip("systemd-python is not installed")
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.name)
    n = Notifier(use_libsystemd=(backend == "libsystemd"), monotonic_usec=lambda: 123456789)
    assert n.enabled
    n.ready()
    n.status("listening\nREADY=1")  # a newline must not smuggle in another field
    n.watchdog()
    n.reloading()
    n.extend_timeout(5_000_000)
    n.errno(5)
    n.stopping()
    assert n.notify("STATUS=raw") is True
    assert receiver.messages() == [
        "READY=1",
        "STATUS=listening READY=1",
        "WATCHDOG=1",
        "RELOADING=1\nMONOTONIC_USEC=123456789",
        "EXTEND_TIMEOUT_USEC=5000000",
        "ERRNO=5",
        "STOPPING=1",
        "STATUS=raw",
    ]
    n.close()


def test_default_reloading_clock_is_monotonic_usec(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.name)
    import time

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(use_libsystemd=False).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    (msg,) = receiver.messages()
    first, second = msg.split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_explicit_socket_path(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier(receiver.name)
    n.ready()
    assert receiver.messages() == ["READY=1"]
    with pytest.raises(ValueError):
        Notifier(receiver.name, use_libsystemd=True)


def test_unset_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready()
    n.watchdog()
    assert n.notify("READY=1") is False


@pytest.mark.parametrize("backend", ["raw", "libsystemd"])
def test_missing_socket_never_raises_and_warns_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    backend: str,
) -> None:
    if backend == "libsystemd" and not HAVE_LIBSYSTEMD:
        pytest.skip("systemd-python is not installed")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = Notifier(use_libsystemd=(backend == "libsystemd"))
    with caplog.at_level(logging.DEBUG, logger="daemon.sdnotify"):
        n.ready()
        n.watchdog()
        n.status("x")
        assert n.notify("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gone.sock" in warnings[0].getMessage()


def test_refused_socket_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nobody listens: ECONNREFUSED
    n = Notifier(str(path))
    n.watchdog()
    assert n.notify("WATCHDOG=1") is False
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_recovers_after_the_socket_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.sdnotify")
    path = tmp_path / "later.sock"
    n = Notifier(str(path))
    assert n.notify("WATCHDOG=1") is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        assert n.notify("WATCHDOG=1") is True
        assert sock.recv(100) == b"WATCHDOG=1"
        assert any("works again" in r.getMessage() for r in caplog.records)
    finally:
        sock.close()


def test_argument_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            n.extend_timeout(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            n.errno(bad)  # type: ignore[arg-type]


# --- watchdog_interval ---------------------------------------------------------------------


def test_watchdog_interval() -> None:
    pid = os.getpid()
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}) is None


def test_watchdog_interval_reads_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


# --- Watchdog ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pings:
    def __init__(self) -> None:
        self.count = 0

    def watchdog(self) -> bool:
        self.count += 1
        return True


def test_watchdog_skips_pings_while_a_part_is_stale_and_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    wd = Watchdog(clock=clock)
    capture = wd.heartbeat("capture", max_age_s=5)
    playback = wd.heartbeat("playback", max_age_s=5)
    connected = [True]
    wd.register("connection", lambda: connected[0])
    wd.register("button", lambda: True)
    assert wd.parts == ("capture", "playback", "connection", "button")
    pings = Pings()

    assert wd.tick(pings) is True
    assert pings.count == 1

    clock.now += 4
    capture.beat()
    playback.beat()
    assert wd.tick(pings) is True

    caplog.set_level(logging.INFO, logger="daemon.sdnotify")
    clock.now += 6  # both stale
    playback.beat()  # playback recovers, capture does not
    for _ in range(3):
        assert wd.tick(pings) is False
    assert pings.count == 2
    stuck = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(stuck) == 1  # once per episode, not once per tick
    assert "capture" in stuck[0] and "6.0 s" in stuck[0]

    capture.beat()
    assert wd.tick(pings) is True
    assert pings.count == 3
    assert any("capture makes progress again" in r.getMessage() for r in caplog.records)

    connected[0] = False
    assert wd.tick(pings) is False
    assert wd.unhealthy() == ["connection"]
    connected[0] = True
    assert wd.tick(pings) is True


def test_paused_heartbeat_is_healthy_until_next_beat() -> None:
    clock = FakeClock()
    hb = Heartbeat("playback", 2.0, clock)
    hb.pause()
    clock.now += 100
    assert hb()
    hb.beat()
    assert hb()
    clock.now += 2.5
    assert not hb()


def test_raising_probe_counts_as_stuck(caplog: pytest.LogCaptureFixture) -> None:
    wd = Watchdog(clock=FakeClock())

    def broken() -> bool:
        raise RuntimeError("boom")

    wd.register("button", broken)
    pings = Pings()
    assert wd.tick(pings) is False
    assert wd.tick(pings) is False
    assert pings.count == 0
    assert len([r for r in caplog.records if "button" in r.getMessage()]) == 1


def test_register_twice_and_unregister() -> None:
    wd = Watchdog(clock=FakeClock())
    wd.register("capture", lambda: False)
    with pytest.raises(ValueError):
        wd.register("capture", lambda: True)
    assert wd.tick(Pings()) is False
    wd.unregister("capture")
    assert wd.tick(Pings()) is True
    with pytest.raises(ValueError):
        wd.heartbeat("x", 0)


def test_run_pings_each_interval_over_a_socket(receiver: Receiver) -> None:
    clock = FakeClock()
    sleeps: list[float] = []
    hb: list[Heartbeat] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds
        if len(sleeps) in (1, 2):  # capture keeps up for the first two intervals
            hb[0].beat()
        if len(sleeps) == 5:
            hb[0].beat()  # ...then stalls for two, then recovers
        if len(sleeps) == 6:
            raise asyncio.CancelledError

    wd = Watchdog(clock=clock, sleep=fake_sleep)
    hb.append(wd.heartbeat("capture", max_age_s=20))
    n = Notifier(receiver.name)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(wd.run(n, interval=15))
    assert sleeps == [15] * 6
    # ticks at t=0,15,30 ping; t=45 (age 15) pings; t=60 (age 30) stale; t=75 after beat pings
    assert receiver.messages() == ["WATCHDOG=1"] * 5


def test_run_without_watchdog_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    pings = Pings()
    asyncio.run(Watchdog().run(pings))
    assert pings.count == 0


def test_blocked_loop_stops_pings() -> None:
    """The watchdog is a task on the loop: a loop stuck in a blocking call cannot ping."""
    pings = Pings()
    ticks: list[int] = []

    async def main() -> None:
        task = asyncio.create_task(Watchdog().run(pings, interval=0.001))
        await asyncio.sleep(0)  # first tick
        ticks.append(pings.count)
        # Block the loop without yielding: no tick can run, however long this takes.
        for _ in range(200_000):
            pass
        ticks.append(pings.count)
        await cancel_and_wait(task)

    asyncio.run(main())
    assert ticks == [1, 1]
