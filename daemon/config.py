"""parley's configuration: frozen dataclasses, validated from YAML with clear errors.

Each section is a frozen dataclass. Constraints live in field metadata (``min``, ``max``,
``doc``); :func:`load_config` walks the YAML against the dataclasses and collects every
mistake (unknown key, wrong type, out-of-range value) as one message per line naming the
key path and what is allowed. Components receive the section they need, never the whole
tree and never an argparse namespace.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from daemon.errors import ConfigError

T = TypeVar("T")

DEFAULT_CONFIG_PATH = Path("/etc/parley/config.yaml")


def _f(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None) -> Any:
    """A field with a default, a one-line doc and an optional inclusive range."""
    meta: dict[str, Any] = {"doc": doc}
    if lo is not None:
        meta["min"] = lo
    if hi is not None:
        meta["max"] = hi
    if isinstance(default, (list, dict)):
        raise TypeError("use _ff for mutable defaults")
    return field(default=default, metadata=meta)


def _ff(factory: Any, doc: str) -> Any:
    return field(default_factory=factory, metadata={"doc": doc})


Dialect = Literal["ga", "beta", "azure"]
KeySource = Literal["auto", "credential", "env", "none"]
AzureAuth = Literal["api-key", "bearer"]


@dataclass(frozen=True)
class ReconnectConfig:
    initial_delay_s: float = _f(0.5, "first retry delay after a lost connection", lo=0.05, hi=60)
    max_delay_s: float = _f(30.0, "cap of the exponential backoff", lo=0.5, hi=600)
    jitter: float = _f(0.25, "random fraction added to each delay", lo=0, hi=1)


@dataclass(frozen=True)
class ApiConfig:
    dialect: Dialect = _f("ga", "protocol dialect: ga (default), beta (legacy) or azure")
    url: str = _f("wss://api.openai.com/v1/realtime", "WebSocket endpoint, without ?model=")
    model: str = _f("gpt-realtime", "model (Azure: the deployment name)")
    key_source: KeySource = _f(
        "auto", "where the API key comes from: credential, env, auto (credential then env), none"
    )
    credential_name: str = _f("openai-api-key", "name of the systemd credential holding the key")
    env_var: str = _f("OPENAI_API_KEY", "environment variable holding the key (development)")
    azure_auth: AzureAuth = _f("bearer", "Azure: 'bearer' (key or Entra token) or 'api-key'")
    open_timeout_s: float = _f(10.0, "time allowed to open the WebSocket", lo=1, hi=120)
    ping_interval_s: float = _f(5.0, "keep-alive ping interval", lo=1, hi=120)
    ping_timeout_s: float = _f(
        5.0, "a missing pong after this long means the link is dead", lo=1, hi=120
    )
    send_timeout_s: float = _f(
        5.0, "deadline on every send; past it the link is aborted", lo=0.5, hi=60
    )
    max_message_bytes: int = _f(
        8 * 1024 * 1024, "largest server message accepted", lo=64 * 1024, hi=64 * 1024 * 1024
    )
    reconnect: ReconnectConfig = _ff(ReconnectConfig, "reconnect backoff")


@dataclass(frozen=True)
class SessionConfig:
    instructions: str = _f(
        "You are a helpful voice assistant on a small device. Answer briefly and speak naturally.",
        "system instructions for the model",
    )
    voice: str = _f("marin", "output voice")
    speed: float = _f(1.0, "speaking speed", lo=0.25, hi=1.5)
    output_modality: Literal["audio", "text"] = _f("audio", "reply modality")
    transcription_model: str = _f("gpt-4o-mini-transcribe", "model transcribing the user's speech")
    noise_reduction: Literal["near_field", "far_field", "off"] = _f(
        "near_field", "server-side input noise reduction"
    )
    rotate_after_min: float = _f(
        30.0, "open a fresh session after this many minutes", lo=0.01, hi=55
    )
    rotate_before_expiry_s: float = _f(
        300.0, "also rotate this long before the server's expires_at", lo=0, hi=1800
    )
    min_commit_ms: int = _f(
        100, "shorter captured audio is cleared, not committed", lo=100, hi=2000
    )
    append_chunk_ms: int = _f(40, "audio per input_audio_buffer.append", lo=20, hi=100)
    offline_buffer_s: float = _f(
        30.0, "speech kept while no session is available, sent once one is back", lo=0, hi=300
    )


@dataclass(frozen=True)
class HistoryConfig:
    max_items: int = _f(200, "conversation items kept (oldest dropped first)", lo=0, hi=100000)
    max_chars: int = _f(
        24000, "characters of history re-seeded into a new session", lo=0, hi=1_000_000
    )


@dataclass(frozen=True)
class ModelPrice:
    """US dollars per one million tokens."""

    text_in: float = _f(4.0, "text input", lo=0)
    text_in_cached: float = _f(0.4, "cached text input", lo=0)
    text_out: float = _f(16.0, "text output", lo=0)
    audio_in: float = _f(32.0, "audio input", lo=0)
    audio_in_cached: float = _f(0.4, "cached audio input", lo=0)
    audio_out: float = _f(64.0, "audio output", lo=0)


def _default_prices() -> dict[str, ModelPrice]:
    return {
        "gpt-realtime": ModelPrice(),
        "gpt-realtime-mini": ModelPrice(
            text_in=0.6,
            text_in_cached=0.06,
            text_out=2.4,
            audio_in=10.0,
            audio_in_cached=0.3,
            audio_out=20.0,
        ),
    }


@dataclass(frozen=True)
class UsageConfig:
    daily_budget_usd: float = _f(
        0.0, "stop starting turns past this spend per day (0 = no limit)", lo=0
    )
    prices: dict[str, ModelPrice] = _ff(_default_prices, "per-model prices, USD per 1M tokens")


@dataclass(frozen=True)
class ToolsConfig:
    enabled: tuple[str, ...] = _ff(
        lambda: ("get_time", "set_volume", "device_status"), "tools offered to the model"
    )
    timeout_s: float = _f(
        5.0, "a tool running longer is answered with a timeout error", lo=0.1, hi=120
    )


@dataclass(frozen=True)
class CaptureConfig:
    device: str = _f("default", "ALSA PCM name of the microphone")
    format: Literal["S16_LE", "S24_3LE", "S32_LE"] = _f("S32_LE", "sample format")
    rate: int = _f(48000, "sample rate in Hz", lo=8000, hi=192000)
    channels: int = _f(2, "channels in the ALSA frame", lo=1, hi=2)
    channel: Literal["left", "right", "mix"] = _f("left", "which channel carries the mic")
    period_frames: int = _f(960, "ALSA period (frames)", lo=32, hi=65536)
    buffer_frames: int = _f(7680, "ALSA buffer (frames)", lo=64, hi=1048576)
    dc_remove: bool = _f(True, "remove the DC offset (SPH0645-style mics)")
    gain_db: float = _f(12.0, "digital gain before resampling", lo=-40, hi=60)


@dataclass(frozen=True)
class PlaybackConfig:
    device: str = _f("default", "ALSA PCM name of the speaker")
    format: Literal["S16_LE", "S32_LE"] = _f("S16_LE", "sample format")
    rate: int = _f(48000, "sample rate in Hz", lo=8000, hi=192000)
    channels: int = _f(2, "channels in the ALSA frame", lo=1, hi=2)
    period_frames: int = _f(960, "ALSA period (frames)", lo=32, hi=65536)
    buffer_frames: int = _f(7680, "ALSA buffer (frames)", lo=64, hi=1048576)
    preroll_ms: int = _f(80, "jitter buffer filled before playback starts", lo=0, hi=1000)
    fade_ms: int = _f(8, "fade-out on interrupt, avoids a click", lo=0, hi=100)


@dataclass(frozen=True)
class MixerConfig:
    control: str = _f("", "ALSA mixer control for volume ('' = software volume)")
    card_index: int = _f(-1, "ALSA card of the control (-1 = default)", lo=-1, hi=31)
    initial_volume: int = _f(-1, "volume percent set at start (-1 = leave as is)", lo=-1, hi=100)


@dataclass(frozen=True)
class AudioConfig:
    capture: CaptureConfig = _ff(CaptureConfig, "microphone")
    playback: PlaybackConfig = _ff(PlaybackConfig, "speaker")
    mixer: MixerConfig = _ff(MixerConfig, "volume control")
    earcons: bool = _f(True, "short tones for listening/stop/error/offline")
    earcon_volume: float = _f(0.3, "earcon loudness (0..1 of full scale)", lo=0, hi=1)


@dataclass(frozen=True)
class ButtonConfig:
    backend: Literal["gpio", "keyboard", "mock"] = _f("gpio", "gpio, keyboard (space bar) or mock")
    pin: int = _f(17, "BCM GPIO number of the push-to-talk button", lo=0, hi=53)
    pull_up: bool = _f(True, "internal pull-up (button wired to ground)")
    bounce_ms: int = _f(20, "debounce time", lo=0, hi=500)
    min_press_ms: int = _f(150, "shorter presses are ignored with a short tone", lo=0, hi=5000)
    max_press_s: float = _f(60.0, "a press held longer ends the turn (stuck button)", lo=1, hi=600)


@dataclass(frozen=True)
class LedConfig:
    enabled: bool = _f(False, "drive a status LED")
    pin: int = _f(27, "BCM GPIO number of the LED", lo=0, hi=53)
    pwm: bool = _f(True, "use PWM for breathing patterns")
    active_high: bool = _f(True, "LED lights when the pin is high")


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: str = _f(
        "", "history and usage database directory ('' = $STATE_DIRECTORY or ~/.local/state/parley)"
    )
    control_socket: str = _f(
        "", "control socket path ('' = $RUNTIME_DIRECTORY/control.sock or /run/parley)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = _f("info", "log level")


@dataclass(frozen=True)
class Config:
    api: ApiConfig = _ff(ApiConfig, "Realtime API connection")
    session: SessionConfig = _ff(SessionConfig, "Realtime session")
    history: HistoryConfig = _ff(HistoryConfig, "conversation history")
    usage: UsageConfig = _ff(UsageConfig, "token usage and cost")
    tools: ToolsConfig = _ff(ToolsConfig, "function calling")
    audio: AudioConfig = _ff(AudioConfig, "ALSA audio")
    button: ButtonConfig = _ff(ButtonConfig, "push-to-talk button")
    led: LedConfig = _ff(LedConfig, "status LED")
    service: ServiceConfig = _ff(ServiceConfig, "service paths and logging")


# --- validation -------------------------------------------------------------------------


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path or '<top>'}: {message}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (tuple, list):
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_describe(get_args(tp)[1])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, value: Any, path: str, meta: Mapping[str, Any], errors: _Errors) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, path, errors)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            errors.add(path, f"{value!r} is not allowed; use {_describe(tp)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            errors.add(path, f"expected {_describe(tp)}, got {type(value).__name__}")
            return ()
        (item_tp,) = get_args(tp)[:1]
        return tuple(_convert(item_tp, v, f"{path}[{i}]", {}, errors) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            errors.add(path, f"expected {_describe(tp)}, got {type(value).__name__}")
            return {}
        _key_tp, val_tp = get_args(tp)
        return {str(k): _convert(val_tp, v, f"{path}.{k}", {}, errors) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        return value
    ok: bool
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema mistake, not a user mistake
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    if not ok:
        errors.add(path, f"expected {_describe(tp)}, got {value!r}")
        return value
    lo, hi = meta.get("min"), meta.get("max")
    below = lo is not None and value < lo
    above = hi is not None and value > hi
    if isinstance(value, (int, float)) and (below or above):
        errors.add(path, f"{value!r} is out of range; allowed {lo} to {hi}")
    return value


def _build(cls: type[T], data: Any, path: str, errors: _Errors) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.add(path, f"expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.add(sub, f"unknown key{hint} (allowed: {', '.join(fields)})")
            continue
        kwargs[key] = _convert(hints[key], value, sub, fields[key].metadata, errors)
    return cls(**kwargs)


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document; raises ConfigError listing every mistake."""
    errors = _Errors()
    config = _build(Config, data, "", errors)
    if not errors.lines:
        _cross_checks(config, errors)
    if errors.lines:
        raise ConfigError(f"invalid configuration in {source}:\n  " + "\n  ".join(errors.lines))
    return config


def _cross_checks(config: Config, errors: _Errors) -> None:
    cap, play = config.audio.capture, config.audio.playback
    if cap.buffer_frames < 2 * cap.period_frames:
        errors.add("audio.capture.buffer_frames", "must be at least two periods")
    if play.buffer_frames < 2 * play.period_frames:
        errors.add("audio.playback.buffer_frames", "must be at least two periods")
    if cap.channels == 1 and cap.channel != "left":
        errors.add("audio.capture.channel", "a mono capture has only 'left' (its one channel)")
    if config.api.model not in config.usage.prices and config.usage.daily_budget_usd > 0:
        errors.add(
            "usage.prices",
            f"no price for model {config.api.model!r}; a daily budget needs one",
        )
    if not config.api.url.startswith(("wss://", "ws://")):
        errors.add("api.url", "must start with wss:// (or ws:// for a local test server)")
    button, led = config.button, config.led
    if button.backend == "gpio" and led.enabled and led.pin == button.pin:
        errors.add("led.pin", "is the same GPIO as button.pin")


def load_config(path: Path) -> Config:
    """Read and validate a YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist; copy config.yaml from the "
            "parley source there, or pass another path"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}{where} is not valid YAML: {problem}") from None
    return parse_config(data, str(path))


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def config_reference() -> str:
    """A plain-text list of every key, its default and doc (for `parley check-config --keys`)."""
    lines: list[str] = []

    def walk(cls: type[Any], prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            name = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, name + ".")  # type: ignore[arg-type]
                continue
            default = _field_default(f)
            rng = ""
            if "min" in f.metadata or "max" in f.metadata:
                rng = f" [{f.metadata.get('min')}..{f.metadata.get('max')}]"
            lines.append(f"{name} = {default!r}{rng}  # {f.metadata.get('doc', '')}")

    walk(Config, "")
    return "\n".join(lines)
