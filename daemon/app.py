"""The asyncio driver: one owner task per resource, the engine decides everything else.

Tasks under one TaskGroup: capture PCM, playback PCM, button, control socket, the engine
ticker, the watchdog, the status line, and one task per Realtime connection. Every input
(audio chunk, button event, server event, playback report, tool result) goes into the
sans-I/O :class:`daemon.engine.Conversation` on the event loop, and every action it returns
is carried out here. Threads (ALSA readers, gpiozero callbacks) hand work to the loop only
inside the hardware layer, through ``loop.call_soon_threadsafe``; nothing here blocks the
loop (SQLite appends are sub-millisecond and run inline; see daemon/history.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon import engine as eng
from daemon.config import Config
from daemon.connection import Connection, ConnectionCallbacks
from daemon.control import ControlServer
from daemon.errors import ParleyError
from daemon.history import HistoryEntry, HistoryStore
from daemon.protocol import connection_request
from daemon.tools import ToolRegistry
from daemon.usage import UsageLedger

log = logging.getLogger(__name__)

TICK_S = 0.1
STATUS_EVERY_S = 5.0


class Capture(Protocol):
    async def run(self, sink: Callable[[bytes], None]) -> None: ...


class Playback(Protocol):
    on_item_done: Callable[[str, int], None] | None

    async def run(self) -> None: ...
    def enqueue(self, item_id: str, pcm24k: bytes) -> None: ...
    def end_item(self, item_id: str) -> None: ...
    def stop(self, fade: bool = True) -> tuple[str | None, int]: ...
    def played_samples(self, item_id: str) -> int: ...
    def play_tone(self, pcm24k: bytes) -> None: ...


class Finger(Protocol):
    def press(self) -> None: ...
    def release(self) -> None: ...


class Indicator(Protocol):
    def set_state(self, state: Any) -> None: ...


class Notifier(Protocol):
    def ready(self) -> None: ...
    def status(self, text: str) -> None: ...


class _NullNotifier:
    def ready(self) -> None:
        pass

    def status(self, text: str) -> None:
        pass


@dataclass
class Devices:
    """The hardware the daemon drives; fakes and real backends share these interfaces."""

    capture: Capture
    playback: Playback
    tones: Callable[[str], bytes] | None = None
    indicator: Indicator | None = None
    extra_tasks: list[Callable[[], Any]] = field(default_factory=list)


class Daemon:
    """parley's main job: the conversation engine wired to sockets, audio and storage."""

    def __init__(
        self,
        config: Config,
        api_key: str | None,
        devices: Devices,
        *,
        state_dir: Path,
        tools: ToolRegistry,
        control_socket: Path | None = None,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        finger: Finger | None = None,
    ) -> None:
        self.config = config
        self._api_key = api_key
        self.devices = devices
        self.tools = tools
        self._notifier: Notifier = notifier or _NullNotifier()
        self._control_socket = control_socket
        # A mock button to drive from `parley ctl press|release`, so those take the same
        # debounce/min-press path as a finger; without one, ctl drives the engine directly.
        self._finger = finger
        self._last_tick = time.monotonic()
        self._first_attempt_failed = False
        # No mkdir here: the stores create their directory, and fall back to memory (with
        # an error in the log) when they cannot, so a bad state_dir never stops the device.
        self.history = HistoryStore(state_dir / "history.sqlite3", config.history.max_items)
        self.ledger = UsageLedger(
            state_dir / "usage.sqlite3", config.usage.prices, config.usage.daily_budget_usd
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._connections: dict[int, Connection] = {}
        self._conn_tasks: dict[int, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._ready_sent = False
        self.ready_event = asyncio.Event()
        self.indicator_state = "offline"
        self.last_error = ""
        self.fatal: tuple[str, str] | None = None
        self.conversation = eng.Conversation(
            config.api,
            config.session,
            config.history,
            tools.declarations(config.tools.enabled),
            self.history.entries(),
            self._now(),
            budget_exhausted=self.ledger.budget_exhausted(),
            rng=rng,
            wall_clock_offset=time.time() - time.monotonic(),
            # Unique per daemon start, so turn ids in the journal never repeat.
            turn_id_prefix=f"{int(time.time()):x}-",
        )

    # --- life cycle ---------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic()

    def now(self) -> float:
        """The driver's clock (monotonic seconds), shared with the hardware's stats."""
        return self._now()

    @property
    def ready_sent(self) -> bool:
        return self._ready_sent

    def engine_alive(self) -> bool:
        """Watchdog probe: the engine is ticking (connected, retrying, or stopped on a
        fatal API error and saying so) — a wedged loop or driver stops the pings."""
        return self._now() - self._last_tick < 5.0

    async def run(self) -> None:
        """Run until :meth:`stop`; every resource has one owner task in this group."""
        self._loop = asyncio.get_running_loop()
        self.devices.playback.on_item_done = self._on_item_done
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self.devices.capture.run(self._on_audio), name="capture")
                tasks.create_task(self.devices.playback.run(), name="playback")
                tasks.create_task(self._ticker(), name="ticker")
                tasks.create_task(self._status_line(), name="status")
                if self._control_socket is not None:
                    tasks.create_task(self._run_control(self._control_socket), name="control")
                for factory in self.devices.extra_tasks:
                    tasks.create_task(factory())
                self._apply(self.conversation.start(self._now()))
                await self._stopping.wait()
                await self._shutdown()
                raise _Stop
        except* _Stop:
            pass
        finally:
            self._tasks = None
            self.history.close()
            self.ledger.close()

    def stop(self) -> None:
        self._stopping.set()

    async def _run_control(self, path: Path) -> None:
        """The control socket is a convenience: without it the device still works."""
        try:
            await ControlServer(path, self.handle_control).run()
        except (ParleyError, OSError) as exc:
            log.error("no control socket (`parley ctl` will not work): %s", exc)

    async def _shutdown(self) -> None:
        """Cut any reply, close the sessions, let queued sends drain (bounded)."""
        with contextlib.suppress(Exception):
            self._apply(self.conversation.shutdown(self._now()))
        for conn in list(self._connections.values()):
            conn.close()
        if self._conn_tasks:
            # Bounded, so a dead link cannot hold up a stop within TimeoutStopSec.
            await asyncio.wait(set(self._conn_tasks.values()), timeout=3.0)

    # --- inputs -------------------------------------------------------------------------

    def press(self) -> None:
        self._apply(self.conversation.press(self._now()))

    def release(self) -> None:
        self._apply(self.conversation.release(self._now()))

    def cancel(self) -> None:
        self._apply(self.conversation.cancel(self._now()))

    def discard_press(self) -> None:
        """A press too short to be speech: drop what was captured, with a short tone."""
        self.cancel()
        self._apply([eng.PlayTone("too_short")])

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration. Session settings go through a fresh session at
        the next idle moment; audio, button and LED settings need a restart."""
        old = self.config
        for section in ("audio", "button", "led"):
            if getattr(old, section) != getattr(config, section):
                log.warning("%s settings changed: restart parley to apply them", section)
        if old.service.state_dir != config.service.state_dir or (
            old.service.control_socket != config.service.control_socket
        ):
            log.warning("service paths changed: restart parley to apply them")
        # Everything that can refuse the new config runs before anything changes.
        declarations = self.tools.declarations(config.tools.enabled)
        self.ledger.reconfigure(config.usage.prices, config.usage.daily_budget_usd)
        self.tools.timeout_s = config.tools.timeout_s
        self.config = config
        now = self._now()
        self._apply(self.conversation.reconfigure(
            config.api, config.session, config.history, declarations, now
        ))
        self._apply(self.conversation.set_budget_exhausted(self.ledger.budget_exhausted()))

    def _on_audio(self, chunk: bytes) -> None:
        self._apply(self.conversation.audio(chunk, self._now()))

    def _on_item_done(self, item_id: str, played: int) -> None:
        self._apply(self.conversation.playback_finished(item_id, played, self._now()))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._last_tick = self._now()
            self._apply(self.conversation.tick(self._last_tick))
            self._maybe_ready()

    # --- actions ------------------------------------------------------------------------

    def _apply(self, actions: list[eng.Action]) -> None:
        for action in actions:
            try:
                self._apply_one(action)
            except ParleyError as exc:
                log.error("could not carry out %s: %s", type(action).__name__, exc)
            except Exception:
                # One bad action (say, a malformed usage figure) must not take every
                # resource owner down with it; the traceback says what to fix.
                log.exception("could not carry out %s", type(action).__name__)

    def _apply_one(self, action: eng.Action) -> None:
        now = self._now()
        match action:
            case eng.Send(conn_id=conn_id, event=event):
                conn = self._connections.get(conn_id)
                if conn is None:
                    log.debug("dropping %s for closed connection %d", event.get("type"), conn_id)
                else:
                    conn.send(event)
            case eng.Connect(conn_id=conn_id, delay_s=delay):
                assert self._tasks is not None
                self._conn_tasks[conn_id] = self._tasks.create_task(
                    self._open(conn_id, delay), name=f"conn-{conn_id}"
                )
            case eng.Close(conn_id=conn_id):
                conn = self._connections.get(conn_id)
                if conn is not None:
                    conn.close()
            case eng.PlayAudio(item_id=item_id, pcm=pcm):
                self.devices.playback.enqueue(item_id, pcm)
            case eng.EndOfReply(item_id=item_id):
                self.devices.playback.end_item(item_id)
            case eng.StopPlayback(item_id=item_id):
                stopped_id, played = self.devices.playback.stop(fade=True)
                if stopped_id != item_id:
                    # Finished (or never started) before the stop: ask what was heard.
                    played = self.devices.playback.played_samples(item_id)
                self._apply(self.conversation.playback_stopped(item_id, played, now))
            case eng.PlayTone(kind=kind):
                if self.config.audio.earcons and self.devices.tones is not None:
                    self.devices.playback.play_tone(self.devices.tones(kind))
            case eng.SetIndicator(state=state):
                self.indicator_state = state
                if self.devices.indicator is not None:
                    self.devices.indicator.set_state(state)
            case eng.RunTool(call_id=call_id, name=name, arguments=arguments):
                assert self._tasks is not None
                self._tasks.create_task(
                    self._run_tool(call_id, name, arguments), name=f"tool-{name}"
                )
            case eng.RecordHistory(entry=entry):
                self._record_history(entry)
            case eng.RecordUsage(
                turn_id=turn_id, response_id=response_id, model=model, usage=usage
            ):
                cost = self.ledger.record(turn_id, response_id, model, usage)
                day = self.ledger.today()
                log.info(
                    "turn %s: %d tokens in, %d out, $%.4f (today $%.4f)",
                    turn_id, cost.input_tokens, cost.output_tokens, cost.cost_usd, day.cost_usd,
                    extra={"TURN_ID": turn_id, "TOKENS": cost.input_tokens + cost.output_tokens},
                )
                self._apply(self.conversation.set_budget_exhausted(self.ledger.budget_exhausted()))
            case eng.Fatal(code=code, message=message):
                self.fatal = (code, message)
                self.last_error = f"{code}: {message}"
                log.error("the API refused the session (%s): %s; not retrying", code, message)
                self._notify_ready()
            case eng.Notice(level=level, message=message, fields=fields):
                # daemon.logs renders the fields (journal fields, or key=value on stderr).
                log.log(_LEVELS.get(level, logging.INFO), "%s", message, extra=_journal(fields))
                if level in ("error", "warning"):
                    self.last_error = message
            case _:
                log.warning("unknown engine action %r", action)

    def _record_history(self, entry: HistoryEntry) -> None:
        try:
            self.history.append(entry)
        except Exception as exc:  # the conversation goes on; the entry is still in memory
            log.error("could not store a history entry: %s", exc)
        if entry.role in ("user", "assistant"):
            log.info("%s: %s", entry.role, entry.text, extra=_journal({"turn_id": entry.turn_id}))

    async def _open(self, conn_id: int, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if self._stopping.is_set():
            return
        url, headers = connection_request(self.config.api, self._api_key or "")
        conn = Connection(
            conn_id,
            url,
            headers,
            self.config.api,
            ConnectionCallbacks(
                opened=self._on_opened,
                event=self._on_server_event,
                closed=self._on_closed,
                failed=self._on_failed,
            ),
        )
        self._connections[conn_id] = conn
        try:
            await conn.run()
        finally:
            self._connections.pop(conn_id, None)
            self._conn_tasks.pop(conn_id, None)

    def _on_opened(self, conn_id: int) -> None:
        self._apply(self.conversation.connection_opened(conn_id, self._now()))

    def _on_server_event(self, conn_id: int, event: dict[str, Any]) -> None:
        try:
            actions = self.conversation.server_event(conn_id, event, self._now())
        except Exception:
            # A malformed event must not take the device down; say what it was.
            log.exception("could not handle server event %r", event.get("type"))
            return
        self._apply(actions)
        self._maybe_ready()

    def _on_closed(self, conn_id: int, code: int | None, reason: str) -> None:
        self._connections.pop(conn_id, None)
        self._apply(self.conversation.connection_closed(conn_id, code, reason, self._now()))
        if not self._ready_sent and not self.conversation.snapshot(self._now()).get("ready"):
            # Accepted, then closed before the session was ready: as good as a failed
            # first attempt for READY=1, which must not wait for the server to recover.
            self._first_attempt_failed = True
            self.last_error = f"the server closed the connection (code {code}) {reason}".strip()
            self._notifier.status(f"offline: {self.last_error}; retrying")
            self._maybe_ready()

    def _on_failed(self, conn_id: int, reason: str, http_status: int | None = None) -> None:
        self._connections.pop(conn_id, None)
        self._apply(
            self.conversation.connection_failed(conn_id, reason, self._now(), http_status)
        )
        self.last_error = reason  # after the engine's generic notice: this one says why
        if not self._ready_sent:
            # READY=1 also when the first attempt failed, with the reason in STATUS.
            self._first_attempt_failed = True
            self._notifier.status(f"offline: {reason}; retrying")
            self._maybe_ready()

    def _devices_open(self) -> bool:
        """Every audio device has tried to open (running, or retrying with its error in
        the status line): a missing mic must not hold READY, and so start-up, forever."""
        for device in (self.devices.capture, self.devices.playback):
            state = getattr(getattr(device, "stats", None), "state", "running")
            if state == "starting":
                return False
        return True

    def _maybe_ready(self) -> None:
        """READY=1 once the audio devices are open and a session is connected, or the
        first connection attempt failed (its reason is in STATUS)."""
        if self._ready_sent or not self._devices_open():
            return
        if self._first_attempt_failed or self.conversation.snapshot(self._now()).get("ready"):
            self._notify_ready()

    def _notify_ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            self.ready_event.set()
            self._notifier.ready()
            self._notifier.status(self.status_line())

    async def _run_tool(self, call_id: str, name: str, arguments: str) -> None:
        # The registry bounds the call and turns every failure into an error string; a
        # tool the user interrupted finishes anyway and the engine records it as such.
        output = await self.tools.run(name, arguments)
        self._apply(self.conversation.tool_result(call_id, output, self._now()))

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        snap = dict(self.conversation.snapshot(self._now()))
        day = self.ledger.today()
        snap.update(
            indicator=self.indicator_state,
            turns_today=day.turns,
            tokens_today={"input": day.input_tokens, "output": day.output_tokens},
            cost_today_usd=round(day.cost_usd, 6),
            budget_exhausted=self.ledger.budget_exhausted(),
            last_error=self.last_error,
            fatal=None if self.fatal is None else {"code": self.fatal[0], "message": self.fatal[1]},
            audio={
                "capture": _stats_dict(self.devices.capture),
                "playback": _stats_dict(self.devices.playback),
            },
        )
        return snap

    def status_line(self) -> str:
        snap = self.status()
        parts = [str(snap.get("state", self.indicator_state))]
        age = snap.get("session_age_s")
        if snap.get("connected") and isinstance(age, (int, float)):
            parts.append(f"session {int(age // 60)} min old")
        elif self.fatal is not None:
            parts.append(f"stopped: {self.fatal[0]}")
        elif self.last_error:
            parts.append(f"not connected: {self.last_error}")
        elif parts[0] != "offline":
            parts.append("not connected")
        for name, label in (("capture", "mic"), ("playback", "speaker")):
            dev = snap["audio"][name]
            if dev.get("state", "running") != "running":
                problem = dev.get("last_error") or dev["state"]
                parts.append(f"{label} {dev['state']}: {problem}")
        parts.append(f"{snap['turns_today']} turns today")
        parts.append(f"${snap['cost_today_usd']:.2f}")
        return " · ".join(parts)

    async def _status_line(self) -> None:
        last = ""
        while True:
            line = self.status_line()
            if line != last:
                self._notifier.status(line)
                last = line
            await asyncio.sleep(STATUS_EVERY_S)

    async def handle_control(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        if cmd == "press":
            (self._finger or self).press()
        elif cmd == "release":
            (self._finger or self).release()
        elif cmd == "cancel":
            self.cancel()
        elif cmd == "history":
            n = args.get("n", 20)
            if not isinstance(n, int) or n < 1:
                raise ParleyError("history: n must be a positive integer")
            return {
                "history": [
                    {"role": e.role, "text": e.text, "at": e.created_at, "name": e.name,
                     "interrupted": e.interrupted}
                    for e in self.history.recent(n)
                ]
            }
        return {"status": self.status()}


class _Stop(Exception):
    """Ends the TaskGroup on a requested stop."""


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _stats_dict(device: object) -> dict[str, Any]:
    stats: Any = getattr(device, "stats", None)
    if stats is None or not hasattr(stats, "__dataclass_fields__"):
        return {}
    values: dict[str, Any] = dataclasses.asdict(stats)
    return {k: v for k, v in values.items() if k != "last_progress"}


def _journal(fields: dict[str, Any]) -> dict[str, Any]:
    """Structured journal fields (upper-case names) for logging's ``extra``."""
    return {k.upper(): v for k, v in fields.items()}
