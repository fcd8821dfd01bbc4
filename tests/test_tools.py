from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aio import cancel_and_wait

from daemon.errors import ConfigError, ParleyError, ToolError
from daemon.tools import (
    ToolRegistry,
    ToolSpec,
    check_schema,
    default_registry,
    device_status_tool,
    get_time_tool,
    set_volume_tool,
    validate,
)

OBJ: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class FakeVolume:
    def __init__(self, level: int = 50) -> None:
        self.level = level
        self.calls: list[int] = []

    def get(self) -> int:
        return self.level

    def set(self, percent: int) -> int:
        self.calls.append(percent)
        self.level = percent
        return self.level


def error_of(result: str) -> str:
    data = json.loads(result)
    assert set(data) == {"error"}, result
    return str(data["error"])


# --- validator ----------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 5},
        "count": {"type": "integer", "minimum": 1, "maximum": 3},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "mode": {"enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "maybe": {"type": ["string", "null"]},
        "inner": {
            "type": "object",
            "properties": {"x": {"type": "integer"}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["name"],
    "additionalProperties": False,
}


def test_valid_document_has_no_errors() -> None:
    doc = {"name": "abc", "count": 2, "ratio": 0.5, "flag": True, "mode": "a",
           "tags": ["x", "yy"], "maybe": None, "inner": {"x": 1}}
    assert validate(doc, SCHEMA) == []


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, "$.name: required property is missing"),
        ({"name": 5}, "$.name: expected string, got integer"),
        ({"name": "a"}, "$.name: shorter than 2"),
        ({"name": "abcdef"}, "$.name: longer than 5"),
        ({"name": "ab", "count": 0}, "$.count: 0 is less than the minimum 1"),
        ({"name": "ab", "count": 4}, "$.count: 4 is more than the maximum 3"),
        ({"name": "ab", "count": 1.5}, "$.count: expected integer, got number"),
        ({"name": "ab", "count": True}, "$.count: expected integer, got boolean"),
        ({"name": "ab", "ratio": "1"}, "$.ratio: expected number, got string"),
        ({"name": "ab", "flag": 1}, "$.flag: expected boolean, got integer"),
        ({"name": "ab", "mode": "c"}, '$.mode: "c" is not one of "a", "b"'),
        ({"name": "ab", "tags": ["ok", "long"]}, "$.tags[1]: longer than 3"),
        ({"name": "ab", "tags": "x"}, "$.tags: expected array, got string"),
        ({"name": "ab", "maybe": 3}, "$.maybe: expected string or null, got integer"),
        ({"name": "ab", "inner": {}}, "$.inner.x: required property is missing"),
        ({"name": "ab", "inner": {"x": 1, "y": 2}}, "$.inner.y: unexpected property"),
        ({"name": "ab", "zzz": 1}, "$.zzz: unexpected property"),
    ],
)
def test_validation_errors_name_the_path(doc: dict[str, Any], expected: str) -> None:
    errors = validate(doc, SCHEMA)
    assert any(expected in e for e in errors), errors


def test_integer_accepts_integral_float_and_enum_is_type_strict() -> None:
    assert validate(3.0, {"type": "integer"}) == []
    assert validate(1, {"enum": [1.0]}) == []
    assert validate(True, {"enum": [1]}) != []
    assert validate(None, {"type": "null"}) == []
    assert validate({"a": 1}, {"type": "object", "additionalProperties": {"type": "string"}})


def test_check_schema_rejects_unsupported_keywords() -> None:
    with pytest.raises(ToolError, match="pattern"):
        check_schema({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}})
    with pytest.raises(ToolError, match="type"):
        check_schema({"type": "float"})
    check_schema(SCHEMA)


# --- registry -----------------------------------------------------------------------------


def echo_spec(name: str = "echo", handler: Any = None, schema: Any = None) -> ToolSpec:
    return ToolSpec(
        name=name,
        description="echo",
        parameters=schema or {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
            "additionalProperties": False,
        },
        handler=handler or (lambda args: "echo:" + args["text"]),
    )


def test_register_checks() -> None:
    reg = ToolRegistry(1.0)
    reg.register(echo_spec())
    with pytest.raises(ToolError, match="already registered"):
        reg.register(echo_spec())
    with pytest.raises(ToolError, match="invalid"):
        reg.register(echo_spec(name="bad name!"))
    with pytest.raises(ToolError, match="object"):
        reg.register(echo_spec(name="s", schema={"type": "string"}))
    with pytest.raises(ValueError):
        ToolRegistry(0)


def test_declarations_shape_and_unknown_names() -> None:
    reg = ToolRegistry(1.0)
    reg.register(echo_spec("a"))
    reg.register(echo_spec("b"))
    decl = reg.declarations(["b", "a", "b"])
    assert [d["name"] for d in decl] == ["b", "a"]
    assert decl[0] == {
        "type": "function", "name": "b", "description": "echo",
        "parameters": echo_spec().parameters,
    }
    with pytest.raises(ConfigError) as info:
        reg.declarations(["a", "nope"])
    assert isinstance(info.value, ParleyError)
    assert "'nope'" in str(info.value) and "available: a, b" in str(info.value)


def test_run_sync_and_async_handlers() -> None:
    async def ahandler(args: dict[str, Any]) -> str:
        await asyncio.sleep(0)
        return "async:" + args["text"]

    reg = ToolRegistry(1.0)
    reg.register(echo_spec("sync"))
    reg.register(echo_spec("async", handler=ahandler))
    assert run(reg.run("sync", '{"text": "hi"}')) == "echo:hi"
    assert run(reg.run("async", '{"text": "hi"}')) == "async:hi"


def test_sync_handler_runs_off_the_loop_thread() -> None:
    seen: list[int] = []

    def handler(args: dict[str, Any]) -> str:
        seen.append(threading.get_ident())
        return "ok"

    reg = ToolRegistry(1.0)
    reg.register(echo_spec("t", handler=handler, schema=OBJ))

    async def main() -> int:
        await reg.run("t", "{}")
        return threading.get_ident()

    loop_thread = run(main())
    assert seen and seen[0] != loop_thread


def test_bad_json_and_wrong_arguments_become_error_strings() -> None:
    reg = ToolRegistry(1.0)
    reg.register(echo_spec())
    assert "not valid JSON" in error_of(run(reg.run("echo", "{not json")))
    assert "not valid JSON" in error_of(run(reg.run("echo", '{"text": NaN}')))
    assert "JSON object" in error_of(run(reg.run("echo", "[1, 2]")))
    err = error_of(run(reg.run("echo", '{"text": 3}')))
    assert "$.text" in err and "expected string" in err
    assert "$.text: required" in error_of(run(reg.run("echo", "")))


def test_unknown_and_disabled_tools() -> None:
    reg = ToolRegistry(1.0)
    reg.register(echo_spec("a"))
    reg.register(echo_spec("b"))
    assert "unknown tool 'zzz'" in error_of(run(reg.run("zzz", "{}")))
    reg.declarations(["a"])
    err = error_of(run(reg.run("b", '{"text": "x"}')))
    assert "'b'" in err and "available tools: a" in err
    assert run(reg.run("a", '{"text": "x"}')) == "echo:x"


def test_exceptions_become_error_strings() -> None:
    def boom(args: dict[str, Any]) -> str:
        raise RuntimeError("mixer exploded")

    async def refuse(args: dict[str, Any]) -> str:
        raise ToolError("not allowed right now")

    reg = ToolRegistry(1.0)
    reg.register(echo_spec("boom", handler=boom, schema=OBJ))
    reg.register(echo_spec("refuse", handler=refuse, schema=OBJ))
    assert error_of(run(reg.run("boom", "{}"))) == "boom failed: RuntimeError: mixer exploded"
    assert error_of(run(reg.run("refuse", "{}"))) == "not allowed right now"


def test_timeout_async_and_sync() -> None:
    release = threading.Event()

    async def slow(args: dict[str, Any]) -> str:
        await asyncio.sleep(30)
        return "late"

    def slow_sync(args: dict[str, Any]) -> str:
        release.wait(30)
        return "late"

    reg = ToolRegistry(0.05)
    reg.register(echo_spec("slow", handler=slow, schema=OBJ))
    reg.register(echo_spec("slow_sync", handler=slow_sync, schema=OBJ))
    assert "did not finish within 0.05 s" in error_of(run(reg.run("slow", "{}")))

    async def main() -> str:
        try:
            return await reg.run("slow_sync", "{}")
        finally:
            release.set()  # let the worker thread end so asyncio.run can shut down

    assert "did not finish" in error_of(run(main()))


def test_handlers_own_timeout_is_not_reported_as_ours() -> None:
    async def handler(args: dict[str, Any]) -> str:
        raise TimeoutError("upstream took too long")

    reg = ToolRegistry(10)
    reg.register(echo_spec("t", handler=handler, schema=OBJ))
    err = error_of(run(reg.run("t", "{}")))
    assert "upstream took too long" in err and "within" not in err


def test_cancellation_propagates() -> None:
    started = asyncio.Event()

    async def slow(args: dict[str, Any]) -> str:
        started.set()
        await asyncio.sleep(30)
        return "late"

    async def main() -> None:
        reg = ToolRegistry(10)
        reg.register(echo_spec("slow", handler=slow, schema=OBJ))
        task = asyncio.create_task(reg.run("slow", "{}"))
        await started.wait()
        await cancel_and_wait(task)

    run(main())


def test_handler_raising_cancelled_is_not_swallowed() -> None:
    async def handler(args: dict[str, Any]) -> str:
        raise asyncio.CancelledError

    reg = ToolRegistry(10)
    reg.register(echo_spec("c", handler=handler, schema=OBJ))
    with pytest.raises(asyncio.CancelledError):
        run(reg.run("c", "{}"))


def test_non_string_results_are_serialized() -> None:
    reg = ToolRegistry(1)
    reg.register(echo_spec("d", handler=lambda a: {"ok": 1}, schema=OBJ))  # type: ignore[arg-type,return-value]
    assert json.loads(run(reg.run("d", "{}"))) == {"ok": 1}


# --- built-ins ----------------------------------------------------------------------------


def test_get_time_local_and_zone() -> None:
    fixed = datetime(2026, 3, 14, 15, 9, tzinfo=timezone(timedelta(hours=1), "CET"))
    reg = ToolRegistry(1)
    reg.register(get_time_tool(clock=lambda: fixed))
    local = json.loads(run(reg.run("get_time", "{}")))
    assert local["time"] == "15:09"
    assert local["date"] == "2026-03-14"
    assert local["weekday"] == "Saturday"
    assert local["utc_offset"] == "+01:00"
    assert local["timezone"]

    tokyo = json.loads(run(reg.run("get_time", '{"timezone": "Asia/Tokyo"}')))
    assert tokyo["time"] == "23:09"
    assert tokyo["timezone"] == "Asia/Tokyo"
    assert tokyo["utc_offset"] == "+09:00"

    utc = json.loads(run(reg.run("get_time", '{"timezone": "UTC"}')))
    assert utc["time"] == "14:09"


def test_get_time_unknown_zone_and_bad_params() -> None:
    reg = ToolRegistry(1)
    reg.register(get_time_tool(clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)))
    err = error_of(run(reg.run("get_time", '{"timezone": "Mars/Olympus"}')))
    assert "Mars/Olympus" in err and "IANA" in err
    assert "IANA" in error_of(run(reg.run("get_time", '{"timezone": "../../etc/passwd"}')))
    assert "unexpected property" in error_of(run(reg.run("get_time", '{"tz": "UTC"}')))


def test_set_volume_absolute_and_steps() -> None:
    vol = FakeVolume(95)
    reg = ToolRegistry(1)
    reg.register(set_volume_tool(vol))
    assert json.loads(run(reg.run("set_volume", '{"step": "up"}'))) == {"volume": 100}
    assert json.loads(run(reg.run("set_volume", '{"step": "down"}'))) == {"volume": 90}
    assert json.loads(run(reg.run("set_volume", '{"percent": 3}'))) == {"volume": 3}
    assert json.loads(run(reg.run("set_volume", '{"step": "down"}'))) == {"volume": 0}
    assert vol.calls == [100, 90, 3, 0]


def test_set_volume_rejects_bad_arguments_without_touching_the_mixer() -> None:
    vol = FakeVolume(50)
    reg = ToolRegistry(1)
    reg.register(set_volume_tool(vol))
    assert "maximum 100" in error_of(run(reg.run("set_volume", '{"percent": 150}')))
    assert "not one of" in error_of(run(reg.run("set_volume", '{"step": "left"}')))
    assert "exactly one" in error_of(run(reg.run("set_volume", "{}")))
    assert "exactly one" in error_of(run(reg.run("set_volume", '{"percent": 5, "step": "up"}')))
    assert vol.calls == []


def test_set_volume_reports_the_level_the_mixer_applied() -> None:
    class Coarse(FakeVolume):
        def set(self, percent: int) -> int:
            return super().set(percent - percent % 25)

    reg = ToolRegistry(1)
    reg.register(set_volume_tool(Coarse()))
    assert json.loads(run(reg.run("set_volume", '{"percent": 60}'))) == {"volume": 50}


def test_device_status_is_short() -> None:
    status = {
        "state": "idle",
        "connected": True,
        "latency_ms": 12.345678,
        "log": ["line"] * 50,
        "blob": "x" * 1000,
        "nested": {"a": {"b": {"c": {"d": 1}}}},
    }
    reg = ToolRegistry(1)
    reg.register(device_status_tool(lambda: status))
    out = run(reg.run("device_status", "{}"))
    data = json.loads(out)
    assert data["state"] == "idle" and data["connected"] is True
    assert data["latency_ms"] == 12.346
    assert len(data["log"]) == 11
    assert len(data["blob"]) == 120
    assert data["nested"]["a"] == {"b": "..."}
    assert len(out) < 1000


def test_device_status_provider_failure_is_an_error_string() -> None:
    def provider() -> dict[str, Any]:
        raise KeyError("engine")

    reg = ToolRegistry(1)
    reg.register(device_status_tool(provider))
    assert "device_status failed: KeyError" in error_of(run(reg.run("device_status", "{}")))


def test_default_registry() -> None:
    reg = default_registry(FakeVolume(), lambda: {"ok": True}, 5.0)
    assert reg.names == ["device_status", "get_time", "set_volume"]
    decl = reg.declarations(("get_time", "set_volume", "device_status"))
    assert [d["name"] for d in decl] == ["get_time", "set_volume", "device_status"]
    for d in decl:
        assert d["type"] == "function" and d["description"]
        assert d["parameters"]["type"] == "object"
    assert reg.timeout_s == 5.0
