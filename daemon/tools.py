"""Function calling: a small tool registry, a JSON-schema subset validator, built-in tools.

The model calls a tool with a name and a JSON string of arguments
(``response.function_call_arguments.done``). :meth:`ToolRegistry.run` always answers with a
string for ``function_call_output``: the handler's result, or ``{"error": "..."}`` when the
arguments are bad, the handler fails or takes too long. A tool can never take the daemon
down; only cancellation (``asyncio.CancelledError``) propagates.

Supported schema keywords (anything else is rejected when the tool is registered, so a
constraint is never silently unenforced): ``type`` (object, string, integer, number,
boolean, array, null, or a list of them), ``properties``, ``required``,
``additionalProperties`` (boolean or a schema), ``enum``, ``minimum``, ``maximum``,
``minLength``, ``maxLength``, ``items``; annotations ``description``, ``title``,
``default``, ``examples``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from daemon.errors import ConfigError, ToolError

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[str] | str]

# --- JSON-schema subset -----------------------------------------------------------------

_TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")
_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "enum", "minimum",
        "maximum", "minLength", "maxLength", "items",
        "description", "title", "default", "examples",
    }
)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    actual = _type_name(value)
    if name == "number":
        return actual in ("integer", "number")
    if name == "integer":
        return actual == "integer" or (
            actual == "number" and math.isfinite(value) and float(value).is_integer()
        )
    return actual == name


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: 1 == 1.0, but true != 1."""
    if _is_type(a, "number") and _is_type(b, "number"):
        return bool(a == b)
    if _type_name(a) != _type_name(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_schema(schema: Any, path: str = "parameters") -> None:
    """Raise ToolError if ``schema`` uses anything the validator does not implement."""
    if not isinstance(schema, dict):
        raise ToolError(f"{path}: a schema must be a JSON object, got {_type_name(schema)}")
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise ToolError(
            f"{path}: unsupported schema keyword(s) {', '.join(unknown)}; parley's validator "
            f"supports {', '.join(sorted(_KEYWORDS))}"
        )
    types = schema.get("type")
    names = types if isinstance(types, list) else [types] if types is not None else []
    for t in names:
        if t not in _TYPES:
            raise ToolError(f"{path}.type: {t!r} is not one of {', '.join(_TYPES)}")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise ToolError(f"{path}.properties: must be an object of schemas")
    for key, sub in props.items():
        check_schema(sub, f"{path}.properties.{key}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolError(f"{path}.required: must be a list of property names")
    additional = schema.get("additionalProperties", True)
    if isinstance(additional, dict):
        check_schema(additional, f"{path}.additionalProperties")
    elif not isinstance(additional, bool):
        raise ToolError(f"{path}.additionalProperties: must be true, false or a schema")
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ToolError(f"{path}.enum: must be a non-empty list")
    for key in ("minimum", "maximum"):
        if key in schema and _type_name(schema[key]) not in ("integer", "number"):
            raise ToolError(f"{path}.{key}: must be a number")
    for key in ("minLength", "maxLength"):
        if key in schema and _type_name(schema[key]) != "integer":
            raise ToolError(f"{path}.{key}: must be an integer")


def validate(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema``, one message each naming the path ($.a.b[0])."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is_type(value, t) for t in names):
            errors.append(f"{path}: expected {' or '.join(names)}, got {_type_name(value)}")
            return errors
    if "enum" in schema and not any(_json_equal(value, c) for c in schema["enum"]):
        allowed = ", ".join(json.dumps(c) for c in schema["enum"])
        errors.append(f"{path}: {json.dumps(value)} is not one of {allowed}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is more than the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors.extend(validate(item, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required property is missing")
        additional = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = f"{path}.{key}"
            if key in props:
                errors.extend(validate(item, props[key], sub))
            elif additional is False:
                known = ", ".join(props) or "none"
                errors.append(f"{sub}: unexpected property (allowed: {known})")
            elif isinstance(additional, dict):
                errors.extend(validate(item, additional, sub))
    return errors


# --- registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call. ``parameters`` is a JSON schema of type object."""

    name: str
    description: str
    parameters: dict[str, Any]
    handler: Handler


def error_result(message: str) -> str:
    """The string handed to the model when a call could not be carried out."""
    return json.dumps({"error": message}, ensure_ascii=False)


class ToolRegistry:
    """Named tools; :meth:`run` validates arguments and bounds each call by ``timeout_s``.

    Sync handlers run in a worker thread (``asyncio.to_thread``); a sync handler that
    overruns is answered with a timeout error but its thread runs on to completion (and
    ``asyncio.run`` waits for it at exit), so sync handlers should bound their own I/O.
    Once :meth:`declarations` was called, :meth:`run` only runs the tools it offered.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self._tools: dict[str, ToolSpec] = {}
        self._offered: frozenset[str] | None = None

    def register(self, spec: ToolSpec) -> None:
        if not _NAME_RE.match(spec.name):
            raise ToolError(
                f"tool name {spec.name!r} is invalid: use 1-64 letters, digits, _ or -"
            )
        if spec.name in self._tools:
            raise ToolError(f"a tool named {spec.name!r} is already registered")
        check_schema(spec.parameters, f"{spec.name}.parameters")
        if spec.parameters.get("type") != "object":
            raise ToolError(f"{spec.name}.parameters: the top-level type must be 'object'")
        self._tools[spec.name] = spec

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def declarations(self, enabled: Iterable[str]) -> list[dict[str, Any]]:
        """The ``session.tools`` entries for the enabled tools, in the given order."""
        wanted = list(dict.fromkeys(enabled))
        unknown = [n for n in wanted if n not in self._tools]
        if unknown:
            raise ConfigError(
                f"tools.enabled: unknown tool(s) {', '.join(repr(n) for n in unknown)}; "
                f"available: {', '.join(self.names) or 'none'}"
            )
        self._offered = frozenset(wanted)
        return [
            {
                "type": "function",
                "name": self._tools[n].name,
                "description": self._tools[n].description,
                "parameters": self._tools[n].parameters,
            }
            for n in wanted
        ]

    async def run(self, name: str, arguments_json: str) -> str:
        """Run one call; always returns a string for ``function_call_output``."""
        spec = self._tools.get(name)
        if spec is None or (self._offered is not None and name not in self._offered):
            offered = sorted(self._offered) if self._offered is not None else self.names
            logger.warning("the model called unknown or disabled tool %r", name)
            return error_result(
                f"unknown tool {name!r}; available tools: {', '.join(offered) or 'none'}"
            )
        try:
            args = (
                json.loads(arguments_json, parse_constant=_reject_constant)
                if arguments_json.strip()
                else {}
            )
        except (ValueError, TypeError, AttributeError) as exc:
            logger.warning("tool %s: arguments are not valid JSON: %s", name, exc)
            return error_result(
                f"arguments for {name} are not valid JSON ({exc}); send a JSON object"
            )
        if not isinstance(args, dict):
            return error_result(
                f"arguments for {name} must be a JSON object, got {_type_name(args)}"
            )
        problems = validate(args, spec.parameters)
        if problems:
            logger.info("tool %s: invalid arguments: %s", name, "; ".join(problems))
            return error_result(f"invalid arguments for {name}: {'; '.join(problems)}")
        started = time.monotonic()
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                result = await self._call(spec.handler, args)
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            if not deadline.expired():  # the handler's own timeout, not ours
                logger.warning("tool %s failed: %r", name, exc)
                return error_result(f"{name} failed: timed out ({exc or 'no detail'})")
            logger.warning("tool %s timed out after %.1f s", name, self.timeout_s)
            return error_result(
                f"{name} did not finish within {self.timeout_s:g} s; tell the user it is "
                "not available right now"
            )
        except ToolError as exc:
            logger.info("tool %s refused: %s", name, exc)
            return error_result(str(exc))
        except Exception as exc:
            logger.exception("tool %s failed", name)
            return error_result(f"{name} failed: {type(exc).__name__}: {exc}")
        logger.debug("tool %s done in %.0f ms", name, (time.monotonic() - started) * 1000)
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return str(result)

    @staticmethod
    async def _call(handler: Handler, args: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(handler):
            return await handler(args)
        result: Any = await asyncio.to_thread(handler, args)
        if inspect.isawaitable(result):
            result = await result
        return result


# --- built-in tools ---------------------------------------------------------------------


def _local_zone_name() -> str:
    """Best-effort IANA name of the local zone ('' if unknown)."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and "/" in tz and not tz.startswith("/"):
        return tz
    try:
        target = os.path.realpath("/etc/localtime")
    except OSError:  # pragma: no cover
        return ""
    marker = "/zoneinfo/"
    return target.split(marker, 1)[1] if marker in target else ""


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(
            f"unknown timezone {name!r}; use an IANA name such as Europe/Berlin or "
            "America/New_York"
        ) from None


def get_time_tool(clock: Callable[[], datetime] | None = None) -> ToolSpec:
    """``get_time``: local (or a named zone's) time, date, weekday and timezone.

    ``clock`` returns an aware datetime (default: now in the local zone).
    """
    now_fn = clock or (lambda: datetime.now().astimezone())

    def handler(args: dict[str, Any]) -> str:
        now = now_fn()
        if now.tzinfo is None:
            now = now.astimezone()
        zone_name = args.get("timezone")
        if zone_name:
            now = now.astimezone(_zone(str(zone_name)))
            label = str(zone_name)
        else:
            label = _local_zone_name() or (now.tzname() or "")
        offset = now.strftime("%z")
        return json.dumps(
            {
                "time": now.strftime("%H:%M"),
                "date": now.date().isoformat(),
                "weekday": now.strftime("%A"),
                "timezone": label,
                "abbreviation": now.tzname() or "",
                "utc_offset": f"{offset[:3]}:{offset[3:]}" if offset else "",
            }
        )

    return ToolSpec(
        name="get_time",
        description=(
            "Get the current time, date, weekday and timezone of the device. "
            "Optionally for another timezone."
        ),
        parameters={
            "type": "object",
            "properties": {
                "timezone": {
                    "type": "string",
                    "description": "IANA timezone such as Europe/Paris; omit for local time",
                    "minLength": 1,
                    "maxLength": 64,
                }
            },
            "additionalProperties": False,
        },
        handler=handler,
    )


class Volume(Protocol):
    """What ``set_volume`` needs from the mixer: percent in, percent out."""

    def get(self) -> int: ...

    def set(self, percent: int) -> int: ...


VOLUME_STEP = 10


def set_volume_tool(volume: Volume, step: int = VOLUME_STEP) -> ToolSpec:
    """``set_volume``: an absolute percent or one step up/down; answers the new level.

    ``volume`` is called from a worker thread.
    """

    def handler(args: dict[str, Any]) -> str:
        percent, direction = args.get("percent"), args.get("step")
        if (percent is None) == (direction is None):
            raise ToolError("give exactly one of 'percent' (0-100) or 'step' ('up' or 'down')")
        if percent is not None:
            target = int(percent)
        else:
            current = volume.get()
            target = current + step if direction == "up" else current - step
        new = volume.set(max(0, min(100, target)))
        return json.dumps({"volume": int(new)})

    return ToolSpec(
        name="set_volume",
        description=(
            "Set the speaker volume: either an absolute percent (0-100) or one step "
            f"up or down ({step}%). Returns the new volume."
        ),
        parameters={
            "type": "object",
            "properties": {
                "percent": {"type": "integer", "minimum": 0, "maximum": 100,
                            "description": "absolute volume in percent"},
                "step": {"type": "string", "enum": ["up", "down"],
                         "description": "relative change by one step"},
            },
            "additionalProperties": False,
        },
        handler=handler,
    )


def _summarize(value: Any, depth: int = 0) -> Any:
    """Keep a status dict short: limited depth, list length and string length."""
    if isinstance(value, str):
        return value if len(value) <= 120 else value[:117] + "..."
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else str(value)
    if depth >= 3:
        return "..."
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {str(k): _summarize(v, depth + 1) for k, v in items[:30]}
        if len(items) > 30:
            out["..."] = f"{len(items) - 30} more"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = list(value)
        short = [_summarize(v, depth + 1) for v in seq[:10]]
        if len(seq) > 10:
            short.append(f"... {len(seq) - 10} more")
        return short
    return _summarize(str(value), depth)


def device_status_tool(status_provider: Callable[[], Mapping[str, Any]]) -> ToolSpec:
    """``device_status``: a short JSON summary of ``status_provider()``.

    The provider is called on the event loop thread (it reads daemon state): keep it fast
    and non-blocking.
    """

    async def handler(args: dict[str, Any]) -> str:
        status = status_provider()
        return json.dumps(_summarize(dict(status)), ensure_ascii=False)

    return ToolSpec(
        name="device_status",
        description=(
            "Get the device's status: connection, audio devices, volume, uptime and "
            "similar. Use it when the user asks how the device is doing."
        ),
        parameters={"type": "object", "properties": {}, "additionalProperties": False},
        handler=handler,
    )


def default_registry(
    volume: Volume,
    status_provider: Callable[[], Mapping[str, Any]],
    timeout_s: float,
) -> ToolRegistry:
    """A registry with get_time, set_volume and device_status."""
    registry = ToolRegistry(timeout_s)
    registry.register(get_time_tool())
    registry.register(set_volume_tool(volume))
    registry.register(device_status_tool(status_provider))
    return registry
