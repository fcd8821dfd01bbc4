"""The `parley` command: run the daemon, check the config, drive it, test the audio."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon.config import DEFAULT_CONFIG_PATH, Config, config_reference, load_config
from daemon.errors import ConfigError, FatalApiError, ParleyError, SecretError

# Exit codes: 78 (EX_CONFIG) is in the unit's RestartPreventExitStatus=, so a bad config,
# a missing or unsafe key, or a refused key does not make systemd restart us in a loop.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (what systemd starts)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_CONFIG_PATH)
    check.add_argument("--keys", action="store_true", help="list every key with its default")

    ctl = sub.add_parser("ctl", help="drive the running daemon through its control socket")
    ctl.add_argument("action", choices=["press", "release", "cancel", "status", "history"])
    ctl.add_argument("--socket", type=Path, help="control socket (default from the config)")
    ctl.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    ctl.add_argument("-n", type=int, default=20, help="history: how many entries")

    sub.add_parser("devices", help="list ALSA capture and playback devices")

    mic = sub.add_parser("mic-test", help="live level meter; records a WAV")
    mic.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    mic.add_argument("--seconds", type=float, default=5.0)
    mic.add_argument("--wav", type=Path, default=Path("mic-test.wav"))

    spk = sub.add_parser("speaker-test", help="play a tone and a sweep")
    spk.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    return parser


def _config_or_defaults(path: Path) -> Config:
    """For the diagnostic commands a missing file means defaults; a bad file is an error."""
    if not path.exists() and path == DEFAULT_CONFIG_PATH:
        return Config()
    return load_config(path)


def _exit_code(exc: ParleyError) -> int:
    print(f"parley: {exc}", file=sys.stderr)
    # Restarting cannot fix these: exit 78, which the unit does not restart.
    return EXIT_CONFIG if isinstance(exc, (ConfigError, SecretError, FatalApiError)) else (
        EXIT_FAILURE
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ParleyError as exc:
        return _exit_code(exc)
    except BaseExceptionGroup as group:
        # A resource owner under the daemon's TaskGroup failed (e.g. the GPIO button could
        # not be opened): report our own error like any other, not as a traceback.
        ours = group.subgroup(lambda e: isinstance(e, ParleyError))
        if ours is None:
            raise
        leaf: BaseException = ours
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, ParleyError)
        return _exit_code(leaf)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    # Each branch unpacks the namespace into plain values: nothing below sees argparse.
    if args.command == "check-config":
        if args.keys:
            print(config_reference())
            return EXIT_OK
        config = load_config(args.path)
        _check_tools(config)
        print(f"{args.path}: configuration is valid")
        return EXIT_OK
    if args.command == "run":
        from daemon.service import run_service

        return run_service(args.config)
    if args.command == "ctl":
        return _ctl(args.action, args.socket, args.config, args.n)
    if args.command == "devices":
        from hw.audio_cli import list_devices

        return list_devices()
    if args.command == "mic-test":
        from hw.audio_cli import mic_test

        cfg = _config_or_defaults(args.config)
        return mic_test(cfg.audio.capture, args.seconds, args.wav)
    if args.command == "speaker-test":
        from hw.audio_cli import speaker_test

        cfg = _config_or_defaults(args.config)
        return speaker_test(cfg.audio.playback)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces choices


class _NoVolume:
    def get(self) -> int:
        return 0

    def set(self, percent: int) -> int:
        return percent


def _check_tools(config: Config) -> None:
    """tools.enabled names the tools registered in code; unknown names are config errors."""
    from daemon.tools import default_registry

    default_registry(_NoVolume(), dict, config.tools.timeout_s).declarations(config.tools.enabled)


def _ctl(action: str, socket_path: Path | None, config_path: Path, count: int) -> int:
    from daemon.control import default_socket_path, request

    if socket_path is None:
        socket_path = default_socket_path(_config_or_defaults(config_path).service.control_socket)
    reply = request(socket_path, action, {"n": count} if action == "history" else {})
    print(json.dumps(reply, indent=2))
    return EXIT_OK if reply.get("ok") else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
