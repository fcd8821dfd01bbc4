"""A whole parley device on simulated hardware, for `make demo` and the service tests.

The real daemon runs as a child process (`parley run`), exactly as systemd would start
it, against:

- fake ALSA devices (alsa-lib's own ``file`` plugin fed by a FIFO for the mic, paced in
  real time; parley's ``parleyfault`` plugin for the speaker, paced like a sound card and
  writing what it plays to a file) selected through ``ALSA_CONFIG_PATH``;
- the mock push-to-talk button, pressed through the control socket (`parley ctl press`);
- the local Realtime server, in this process, validating every client event;
- a fake ``NOTIFY_SOCKET`` recording READY/STATUS/WATCHDOG/RELOADING/STOPPING.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from daemon.control import request
from daemon.localserver import LocalRealtimeServer, Script
from daemon.localserver.synth import synthesize
from hw.fake_alsa import FakeAlsaEnv, FaultDevice, build_plugin
from hw.resample import Resampler

REPO = Path(__file__).resolve().parent.parent
MIC_RATE = 48000
SPEAKER_RATE = 48000


@dataclass
class Notification:
    at: float
    fields: dict[str, str]


@dataclass
class SimulatedDevice:
    """Start with :meth:`start`, drive with :meth:`say` / :meth:`press` / ..., end with
    :meth:`stop` (SIGTERM, like ``systemctl stop``)."""

    workdir: Path
    script: Script = field(default_factory=Script)
    config: dict[str, Any] = field(default_factory=dict)
    on_log: Callable[[str], None] | None = None
    watchdog_usec: int = 4_000_000

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server = LocalRealtimeServer(self.script)
        self.notifications: list[Notification] = []
        self.log_lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._env: FakeAlsaEnv | None = None
        self._speaker: FaultDevice | None = None
        self._notify_sock: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._to_mic = Resampler(24000, MIC_RATE, out_channels=2)
        self.t0 = time.monotonic()

    # --- paths ---------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def control_socket(self) -> Path:
        return self.workdir / "run" / "control.sock"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def speaker_raw(self) -> Path:
        assert self._speaker is not None
        return self._speaker.out_path

    # --- life cycle ----------------------------------------------------------------------

    def write_config(self, **overrides: dict[str, Any]) -> None:
        """(Re)write the daemon's config.yaml: simulated devices plus ``overrides``."""
        doc: dict[str, Any] = {
            "api": {
                "url": self.server.base_url + "/v1/realtime",
                "key_source": "none",
                "reconnect": {"initial_delay_s": 0.2, "max_delay_s": 2.0},
            },
            "audio": {
                "capture": {"device": "fakemic", "format": "S32_LE", "rate": MIC_RATE,
                            "channels": 2, "channel": "left", "gain_db": 0.0},
                "playback": {"device": "fakespk", "format": "S16_LE", "rate": SPEAKER_RATE,
                             "channels": 2},
            },
            "button": {"backend": "mock"},
            "led": {"enabled": True},
            "service": {"state_dir": str(self.state_dir),
                        "control_socket": str(self.control_socket)},
        }
        for source in (self.config, overrides):
            for section, values in source.items():
                _merge(doc.setdefault(section, {}), values)
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    async def start(self, *, wait_ready: bool = True) -> None:
        await self.server.start()
        build_plugin()
        env = FakeAlsaEnv(self.workdir / "alsa")
        silence = self.workdir / "silence.wav"
        with wave.open(str(silence), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(4)
            w.setframerate(MIC_RATE)
            w.writeframes(bytes(4 * 2 * MIC_RATE // 10))
        env.mic_from_wav(silence, name="fakemic", period_frames=960)
        self._speaker = env.fault_device(
            name="fakespk", rate=SPEAKER_RATE, channels=2, format="S16_LE"
        )
        self._env = env
        self.write_config()

        notify_path = self.workdir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        sock.setblocking(False)
        self._notify_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify)

        inherited = ("NOTIFY_", "WATCHDOG_", "JOURNAL_")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        child_env.update(env.env())
        child_env.update(
            NOTIFY_SOCKET=str(notify_path),
            WATCHDOG_USEC=str(self.watchdog_usec),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(REPO),
        )
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "faulthandler", "-m", "daemon.cli", "run",
            "--config", str(self.config_path),
            cwd=str(self.workdir), env=child_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read_log())
        if wait_ready:
            await self.wait_notified("READY", timeout=30)

    async def stop(self, timeout: float = 15.0) -> tuple[int | None, float]:  # noqa: ASYNC109
        """SIGTERM, like ``systemctl stop``; returns (exit code, seconds it took)."""
        t = time.monotonic()
        code: int | None = None
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    code = await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        took = time.monotonic() - t
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        if self._notify_sock is not None:
            asyncio.get_running_loop().remove_reader(self._notify_sock.fileno())
            self._notify_sock.close()
            self._notify_sock = None
        if self._env is not None:
            self._env.close()
        await self.server.stop()
        return code, took

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    # --- observation ---------------------------------------------------------------------

    def _on_notify(self) -> None:
        assert self._notify_sock is not None
        while True:
            try:
                data = self._notify_sock.recv(65536)
            except BlockingIOError:
                return
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            self.notifications.append(Notification(time.monotonic() - self.t0, fields))

    def notified(self, key: str) -> list[Notification]:
        return [n for n in self.notifications if key in n.fields]

    async def wait_notified(self, key: str, count: int = 1, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await self.wait_until(lambda: len(self.notified(key)) >= count, timeout,
                         f"{count}x {key}= on NOTIFY_SOCKET")

    async def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log_lines.append(line)
            if self.on_log is not None:
                self.on_log(line)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self.process is not None and self.process.returncode is not None:
                        raise RuntimeError(
                            f"the daemon exited ({self.process.returncode}) while waiting for "
                            f"{what}; last log lines:\n" + "\n".join(self.log_lines[-20:])
                        )
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise TimeoutError(
                f"no {what} within {timeout} s; last log lines:\n"
                + "\n".join(self.log_lines[-20:])
            ) from None

    # --- driving -------------------------------------------------------------------------

    async def ctl(self, cmd: str, **args: Any) -> dict[str, Any]:
        return await asyncio.to_thread(request, self.control_socket, cmd, args)

    async def status(self) -> dict[str, Any]:
        reply = await self.ctl("status")
        status: dict[str, Any] = reply["status"]
        return status

    async def press(self) -> None:
        await self.ctl("press")

    async def release(self) -> None:
        await self.ctl("release")

    def speak(self, text: str) -> float:
        """Queue ``text`` as speech into the mic; returns its duration in seconds."""
        pcm24 = synthesize(text)
        stereo16 = self._to_mic.process(pcm24) + self._to_mic.flush()
        s32 = (np.frombuffer(stereo16, dtype="<i2").astype("<i4") << 16).tobytes()
        assert self._env is not None
        self._env.feeder("fakemic").queue(s32)
        return len(pcm24) / 2 / 24000

    async def say(self, text: str, *, release: bool = True) -> None:
        """Press, speak in real time, release — as a person would."""
        await self.press()
        await asyncio.sleep(0.15)  # the first words come a moment after the press
        duration = self.speak(text)
        await asyncio.sleep(duration + 0.25)
        if release:
            await self.release()

    async def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Until the reply has been played out and the device is idle again."""
        await asyncio.sleep(0.3)
        last: dict[str, Any] = {}

        async def idle() -> bool:
            nonlocal last
            last = await self.status()
            return bool(last.get("state") == "idle" and not last.get("response_active"))

        async with asyncio.timeout(timeout):
            while not await idle():  # noqa: ASYNC110 - polls the daemon over its socket
                await asyncio.sleep(0.1)
        return last

    async def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0  # noqa: ASYNC109
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                status = await self.status()
                if predicate(status):
                    return status
                await asyncio.sleep(0.1)

    def speaker_wav(self, path: Path) -> Path:
        """What the speaker played, as a WAV (48 kHz stereo S16)."""
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(SPEAKER_RATE)
            w.writeframes(self.speaker_raw.read_bytes())
        return path


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
