"""The local control socket: `parley ctl press|release|cancel|status|history`.

A unix stream socket, owner-only (0600 in a 0700 directory), speaking one JSON object
per line each way: ``{"cmd": "status"}`` → ``{"ok": true, ...}``. It is how automations
and the tests drive the device without a finger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon.errors import ParleyError

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

COMMANDS = ("press", "release", "cancel", "status", "history")
MAX_REQUEST_BYTES = 4096


def default_socket_path(configured: str, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if configured:
        return Path(configured)
    runtime = env.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / "control.sock"
    service_socket = Path("/run/parley/control.sock")
    if os.geteuid() == 0 or service_socket.exists():
        return service_socket
    xdg = env.get("XDG_RUNTIME_DIR") or f"/tmp/parley-{os.geteuid()}"
    return Path(xdg) / "parley" / "control.sock"


class ControlServer:
    """Serves the control socket; each request is passed to ``handler(cmd, args)``."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler

    async def run(self) -> None:
        """Owner task of the socket; removes it on exit."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError as exc:
            raise ParleyError(
                f"cannot create the control socket {self.path}: {exc.strerror}; "
                "set service.control_socket to a writable path"
            ) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("control socket at %s", self.path)
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                if len(line) > MAX_REQUEST_BYTES:
                    await self._reply(writer, {"ok": False, "error": "request too long"})
                    return
                await self._reply(writer, await self._dispatch(line))
        except (ConnectionError, BrokenPipeError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or request.get("cmd") not in COMMANDS:
            return {"ok": False, "error": f"unknown command; use one of {', '.join(COMMANDS)}"}
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            result = await self._handler(request["cmd"], args)
        except ParleyError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, **result}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()


def request(
    path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Blocking client used by `parley ctl`."""
    payload = json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ParleyError(
                f"no control socket at {path}: is parley running? (systemctl status parley)"
            ) from None
        except PermissionError:
            raise ParleyError(
                f"permission denied on {path}: run as the parley user or root"
            ) from None
        except ConnectionRefusedError:
            raise ParleyError(
                f"nothing listens on {path}: parley is not running (systemctl status parley)"
            ) from None
        data = b""
        try:
            sock.sendall(payload)
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ParleyError(f"parley did not answer on {path} within {timeout:g} s") from None
        except OSError as exc:
            raise ParleyError(f"lost the control socket {path}: {exc.strerror}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ParleyError("the daemon sent an unreadable reply on the control socket") from None
    if not isinstance(reply, dict):
        raise ParleyError("the daemon sent an unreadable reply on the control socket")
    return reply
