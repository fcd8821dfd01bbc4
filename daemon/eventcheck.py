"""Check Realtime API events against the official ``openai`` event types.

The ``openai`` package is a test-only dependency of parley, so it is imported lazily, on
first use. Without it, a non-strict :class:`EventChecker` accepts every event (and says
so once in the log); a strict one raises :class:`EventCheckUnavailable` at construction.

Two dialects are known:

* ``"ga"``: :mod:`openai.types.realtime` (``RealtimeClientEvent`` / ``RealtimeServerEvent``).
* ``"beta"``: :mod:`openai.types.beta.realtime` (the legacy ``OpenAI-Beta: realtime=v1`` shapes).

The official models accept unknown keys, so after validation the parsed model is walked and
every ``model_extra`` key is reported: that is what catches a misspelt field (``"txt"``
for ``"text"``) or a beta field sent on GA (``"modalities"``). The walk applies to client
events only: the real server sends fields the generated models lack.

A few semantic rules the types cannot express but the real API enforces are checked too
(see :func:`_semantic_problems`).
"""

from __future__ import annotations

import functools
import logging
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.errors import ParleyError

logger = logging.getLogger(__name__)

Dialect = Literal["ga", "beta"]
Direction = Literal["client", "server"]

_MAX_PROBLEMS = 8


class EventCheckUnavailable(ParleyError):
    """Strict event checking was asked for, but the ``openai`` package is not installed."""


class EventCheckFailed(ParleyError):
    """An event did not match the official types (raised by :meth:`EventChecker.require`)."""

    def __init__(self, event_type: str, problems: list[str]) -> None:
        super().__init__(f"invalid {event_type!r} event: " + "; ".join(problems))
        self.event_type = event_type
        self.problems = problems


@dataclass(frozen=True)
class Violation:
    """One event that failed validation."""

    dialect: Dialect
    direction: Direction
    event_type: str
    problems: list[str]
    event: dict[str, Any] = field(repr=False)
    connection: int | None = None

    def __str__(self) -> str:
        where = "" if self.connection is None else f" (connection {self.connection})"
        return f"{self.direction} {self.event_type!r}{where}: " + "; ".join(self.problems)


def available() -> bool:
    """Whether the ``openai`` and ``pydantic`` packages can be imported."""
    try:
        _union_members("ga", "client")
    except ImportError:
        return False
    return True


@functools.cache
def _union_members(dialect: Dialect, direction: Direction) -> dict[str, Any]:
    """Map each event ``type`` literal to its pydantic model class, for one union."""
    if dialect == "ga":
        from openai.types import realtime as mod

        union: Any = mod.RealtimeClientEvent if direction == "client" else mod.RealtimeServerEvent
    else:
        from openai.types.beta import realtime as bmod

        union = bmod.RealtimeClientEvent if direction == "client" else bmod.RealtimeServerEvent
    inner = typing.get_args(union)[0]  # Annotated[Union[...], PropertyInfo] -> Union[...]
    members: dict[str, Any] = {}
    for model in typing.get_args(inner):
        annotation = model.model_fields["type"].annotation
        for literal in typing.get_args(annotation):
            members[str(literal)] = model
    return members


@functools.cache
def _adapter(model: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(model)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _pydantic_problems(exc: Any) -> list[str]:
    """Turn a ``ValidationError`` into short messages, keeping the closest union branch.

    Union members are tried one by one, so pydantic reports an error for every member. The
    errors are grouped by the first union-branch name in their location (a class name),
    and only the group with the fewest errors is kept: it is the branch the sender meant.
    """
    errors: list[dict[str, Any]] = list(exc.errors())

    def branch(err: dict[str, Any]) -> tuple[str, ...]:
        parts = []
        for p in err["loc"]:
            if isinstance(p, str) and p[:1].isupper():
                parts.append(p)
        return tuple(parts[:1])

    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in errors:
        groups.setdefault(branch(err), []).append(err)
    best = min(groups.values(), key=len)
    out = []
    for err in best[:_MAX_PROBLEMS]:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        out.append(f"{_format_loc(loc)}: {err['msg']}")
    if len(best) > _MAX_PROBLEMS:
        out.append(f"... and {len(best) - _MAX_PROBLEMS} more")
    return out


def _walk_extras(obj: Any, path: str = "") -> Iterator[str]:
    """Yield ``path.key`` for every key a model accepted without declaring it."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        extra = obj.model_extra or {}
        for key in extra:
            yield f"{path}{key}" if path else str(key)
        for name in type(obj).model_fields:
            yield from _walk_extras(getattr(obj, name), f"{path}{name}.")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _walk_extras(value, f"{path}{i}.")
    elif isinstance(obj, dict):
        # Free-form JSON (tool parameters, metadata) holds plain dicts: nothing to report.
        for key, value in obj.items():
            if isinstance(value, BaseModel):
                yield from _walk_extras(value, f"{path}{key}.")


def _semantic_problems(event: Mapping[str, Any], dialect: Dialect) -> list[str]:
    """Rules the real API enforces that the generated types cannot express."""
    problems: list[str] = []
    etype = event.get("type")
    if dialect == "ga" and etype in ("session.update", "response.create"):
        holder = event.get("session" if etype == "session.update" else "response")
        if isinstance(holder, Mapping):
            modalities = holder.get("output_modalities")
            if isinstance(modalities, list) and len(modalities) > 1:
                problems.append(
                    "output_modalities: must be ['audio'] or ['text'], not both"
                )
    if etype == "input_audio_buffer.append":
        audio = event.get("audio")
        if isinstance(audio, str):
            import base64
            import binascii

            try:
                raw = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                problems.append("audio: not valid base64")
            else:
                if len(raw) % 2:
                    problems.append("audio: odd number of bytes for PCM16")
    return problems


@functools.cache
def _warn_unavailable_once() -> None:
    logger.warning("openai package not installed: Realtime events are not validated")


class EventChecker:
    """Validate events of one dialect against the official types.

    ``strict=True`` raises :class:`EventCheckUnavailable` now if ``openai`` is missing;
    ``strict=False`` then accepts every event (it only checks JSON-level basics).
    """

    def __init__(self, dialect: Dialect = "ga", *, strict: bool = False) -> None:
        self.dialect: Dialect = dialect
        self.strict = strict
        self.enabled = available()
        if not self.enabled:
            if strict:
                raise EventCheckUnavailable(
                    "strict event checking needs the 'openai' package (pip install -e '.[test]')"
                )
            _warn_unavailable_once()

    def check(self, event: Any, direction: Direction = "client") -> list[str]:
        """Return the problems found in ``event`` (an empty list when it is valid)."""
        if not isinstance(event, Mapping):
            return [f"event must be a JSON object, not {type(event).__name__}"]
        etype = event.get("type")
        if not isinstance(etype, str):
            return ["type: missing or not a string"]
        if not self.enabled:
            return []
        members = _union_members(self.dialect, direction)
        model = members.get(etype)
        if model is None:
            return [f"type: unknown {self.dialect} {direction} event type {etype!r}"]
        from pydantic import ValidationError

        try:
            parsed = _adapter(model).validate_python(dict(event))
        except ValidationError as exc:
            return _pydantic_problems(exc)
        problems: list[str] = []
        if direction == "client":
            problems += [f"{p}: unknown field" for p in _walk_extras(parsed)]
            problems += _semantic_problems(event, self.dialect)
        return problems

    def check_client(self, event: Any) -> list[str]:
        return self.check(event, "client")

    def check_server(self, event: Any) -> list[str]:
        return self.check(event, "server")

    def require(self, event: Any, direction: Direction = "client") -> None:
        """Raise :class:`EventCheckFailed` if ``event`` is invalid."""
        problems = self.check(event, direction)
        if problems:
            etype = event.get("type") if isinstance(event, Mapping) else None
            raise EventCheckFailed(str(etype), problems)


@functools.cache
def checker(dialect: Dialect = "ga", strict: bool = False) -> EventChecker:
    """A shared :class:`EventChecker` per (dialect, strict)."""
    return EventChecker(dialect, strict=strict)


def check_client_event(event: Any, dialect: Dialect = "ga", *, strict: bool = False) -> list[str]:
    """Problems with a client event (empty when valid)."""
    return checker(dialect, strict).check(event, "client")


def check_server_event(event: Any, dialect: Dialect = "ga", *, strict: bool = False) -> list[str]:
    """Problems with a server event (type validation only, no unknown-field walk)."""
    return checker(dialect, strict).check(event, "server")
