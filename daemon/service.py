"""`parley run`: the daemon as systemd runs it.

Builds the real devices from the configuration, loads the API key, and runs
:class:`daemon.app.Daemon` under systemd's eyes: ``READY=1`` once the configuration is
valid, the audio devices are open and a session is connected (or the first attempt failed
with the reason in ``STATUS=``); human-readable ``STATUS=`` lines; ``WATCHDOG=1`` from the
event loop only while capture, playback, connection and button all show progress;
``RELOADING=1``/``READY=1`` around SIGHUP; ``STOPPING=1`` and a bounded graceful stop on
SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.app import Daemon, Devices
from daemon.config import Config, load_config
from daemon.control import default_socket_path
from daemon.errors import ParleyError
from daemon.logs import add_secret, setup_logging
from daemon.sdnotify import Notifier, Watchdog
from daemon.secrets import load_api_key
from daemon.tools import default_registry

log = logging.getLogger(__name__)

# A part that shows no progress for this long stops the watchdog pings. Capture and
# playback tick every period even in silence; the engine ticks every 100 ms.
STALE_AFTER_S = 10.0
# SIGTERM to exit, within the unit's TimeoutStopSec=10 with room to spare.
GRACEFUL_STOP_S = 6.0


def state_dir(configured: str, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if configured:
        return Path(configured)
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "parley"


@dataclass
class Hardware:
    """The real devices, plus the virtual finger for `parley ctl press` on the mock button."""

    devices: Devices
    button: Any
    volume: Any
    led: Any


def build_hardware(config: Config) -> Hardware:
    """Real backends chosen by the configuration (imports are local: hw needs alsa-lib)."""
    from hw.alsa_capture import AlsaCapture
    from hw.alsa_playback import AlsaPlayback
    from hw.button import make_button
    from hw.earcons import earcon
    from hw.led import make_led
    from hw.mixer import SoftwareVolume, make_volume

    capture = AlsaCapture(config.audio.capture, config.session.append_chunk_ms)
    try:
        volume: Any = make_volume(config.audio.mixer)
    except ParleyError as exc:
        # A USB card that enumerates late must not stop the device: play on, louder or
        # softer in software, and say so.
        log.warning("%s; using software volume instead", exc)
        volume = SoftwareVolume()
    # A software volume scales the samples; a mixer control needs no help from playback.
    gain = volume if isinstance(volume, SoftwareVolume) else None
    playback = AlsaPlayback(config.audio.playback, volume=gain)
    led = make_led(config.led, config.button.backend)
    button = make_button(config.button)
    level = config.audio.earcon_volume

    def tones(kind: str) -> bytes:
        return earcon(kind, volume=level)

    devices = Devices(capture=capture, playback=playback, tones=tones, indicator=led)
    return Hardware(devices=devices, button=button, volume=volume, led=led)


class Service:
    """Owns the Daemon and the systemd conversation around it."""

    def __init__(
        self,
        config_path: Path,
        config: Config,
        api_key: str | None,
        hardware: Hardware,
        notifier: Notifier,
        *,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self._api_key = api_key
        self.hardware = hardware
        self.notifier = notifier
        self.watchdog = watchdog or Watchdog()
        volume = hardware.volume
        holder: dict[str, Daemon] = {}
        def device_status() -> dict[str, Any]:
            return holder["daemon"].status()

        tools = default_registry(volume, device_status, config.tools.timeout_s)
        devices = hardware.devices
        devices.extra_tasks.append(self._run_button)
        devices.extra_tasks.append(self._run_watchdog)
        self.daemon = Daemon(
            config,
            api_key,
            devices,
            state_dir=state_dir(config.service.state_dir),
            tools=tools,
            control_socket=default_socket_path(config.service.control_socket),
            notifier=notifier,
            finger=hardware.button if hasattr(hardware.button, "press") else None,
        )
        holder["daemon"] = self.daemon
        self._register_watchdog_parts()

    def _register_watchdog_parts(self) -> None:
        devices = self.hardware.devices

        def fresh(stats: Callable[[], Any]) -> Callable[[], bool]:
            def probe() -> bool:
                current = stats()
                # A device being reopened with backoff (unplugged, not there yet) is the
                # daemon doing its job: restarting cannot help, and the STATUS line says
                # what is wrong. Only a stream that stopped moving counts as stuck.
                if getattr(current, "state", "") in ("reopening", "failed"):
                    return True
                last = getattr(current, "last_progress", 0.0)
                return bool(last) and (self.daemon.now() - last) < STALE_AFTER_S

            return probe

        self.watchdog.register("capture", fresh(lambda: getattr(devices.capture, "stats", None)))
        self.watchdog.register("playback", fresh(lambda: getattr(devices.playback, "stats", None)))
        self.watchdog.register("connection", self.daemon.engine_alive)
        button = self.hardware.button
        self.watchdog.register("button", lambda: bool(button.healthy()))


    async def _run_watchdog(self) -> None:
        # No pings before READY=1: start-up is bounded by TimeoutStartSec, not the watchdog.
        await self.daemon.ready_event.wait()
        await self.watchdog.run(self.notifier)

    async def _run_button(self) -> None:
        from hw.button import ButtonEvent

        def on_event(event: ButtonEvent) -> None:
            if event.kind == "press":
                self.daemon.press()
            elif event.kind == "release":
                self.daemon.release()
            elif event.kind == "too_short":
                self.daemon.discard_press()
            elif event.kind == "stuck":
                log.warning(
                    "button held for %.0f s: ending the turn (stuck or sat on?)", event.held_s
                )
                self.daemon.release()

        await self.hardware.button.run(on_event)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; keep the old one if the new one is invalid."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            self.daemon.reconfigure(new)
        except ParleyError as exc:
            log.error("reload rejected, still running the previous configuration: %s", exc)
            self.notifier.status(f"reload rejected: {str(exc).splitlines()[-1].strip()}")
        else:
            setup_logging(new.service.log_level)
            if self._api_key:
                add_secret(self._api_key)  # the new handlers redact it too
            self.config = new
            log.info("configuration reloaded from %s", self.config_path)
        finally:
            self.notifier.ready()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()

        def on_term() -> None:
            log.info("stopping")
            self.notifier.stopping()
            stop_requested.set()
            self.daemon.stop()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        run = asyncio.create_task(self.daemon.run(), name="daemon")
        stopper = asyncio.create_task(stop_requested.wait(), name="stop-requested")
        try:
            await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                try:
                    async with asyncio.timeout(GRACEFUL_STOP_S):
                        await asyncio.shield(run)
                except TimeoutError:
                    log.error("stopping took over %.0f s; cutting it short", GRACEFUL_STOP_S)
                    run.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run
            run.result()
        finally:
            stopper.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                self.hardware.led.close()
        return 0


def run_service(config_path: Path) -> int:
    """Entry point of `parley run` (exit codes: see daemon.cli)."""
    config = load_config(config_path)
    setup_logging(config.service.log_level)
    api_key = load_api_key(config.api)
    if api_key:
        add_secret(api_key)
    notifier = Notifier()
    notifier.status("starting")
    try:
        hardware = build_hardware(config)
    except ParleyError as exc:
        notifier.status(f"failed: {exc}")
        raise
    service = Service(config_path, config, api_key, hardware, notifier)
    log.info(
        "parley starting: model %s, dialect %s, mic %s, speaker %s, button %s",
        config.api.model, config.api.dialect, config.audio.capture.device,
        config.audio.playback.device, config.button.backend,
    )
    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(service.run())
        # asyncio.run would wait for executor threads without limit; a thread hung in a
        # driver call must not turn a clean stop into systemd's SIGKILL.
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), 2.0))
    finally:
        loop.close()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()[1:]):
        log.warning("a device thread did not finish; exiting without it")
        logging.shutdown()
        os._exit(code)
    return code
