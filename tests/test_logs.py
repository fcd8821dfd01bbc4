"""Logging set-up: stderr vs journald, structured fields, websockets quieting, redaction."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from daemon import logs
from daemon.errors import ConfigError
from daemon.logs import fields, setup_logging

SECRET = "sk-test-0123456789abcdefSECRET"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ws = logging.getLogger("websockets")
    ws_level = ws.level
    ws_client = logging.getLogger("websockets.client")
    ws_client_level = ws_client.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    ws.setLevel(ws_level)
    ws_client.setLevel(ws_client_level)


class Journal:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def __call__(self, message: str, **kw: Any) -> None:
        self.entries.append({"MESSAGE": message, **kw})


def journal_stream(tmp_path: Path) -> tuple[TextIO, dict[str, str]]:
    stream = (tmp_path / "stderr").open("w+", encoding="utf-8")
    st = os.fstat(stream.fileno())
    return stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_parley_handler", False)]


# --- fields -------------------------------------------------------------------------------


def test_fields_maps_to_journal_names() -> None:
    assert fields(turn_id="t1", session_id="s1", latency_ms=412, tokens=980, skipped=None) == {
        "TURN_ID": "t1",
        "SESSION_ID": "s1",
        "LATENCY_MS": 412,
        "TOKENS": 980,
    }
    for bad in ("message", "priority", "_private", "code_line"):
        with pytest.raises(ValueError):
            fields(**{bad: 1})
    with pytest.raises(ValueError):
        fields(**{"9lives": 1})
    with pytest.raises(ValueError):
        fields(**{"x" * 65: 1})


# --- stderr -------------------------------------------------------------------------------


def test_stderr_with_timestamps_and_field_suffix() -> None:
    out = io.StringIO()
    setup_logging("info", environ={}, stream=out)
    log = logging.getLogger("parley.test")
    log.info("turn done", extra=fields(turn_id="t1", latency_ms=412, note="two words"))
    log.debug("not shown")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO parley\.test: turn done "
        r'turn_id=t1 latency_ms=412 note="two words"',
        lines[0],
    ), lines[0]


def test_fields_go_on_the_first_line_before_a_traceback() -> None:
    out = io.StringIO()
    setup_logging("info", environ={}, stream=out)
    try:
        raise RuntimeError("kaputt")
    except RuntimeError:
        logging.getLogger("parley.test").exception("failed", extra=fields(turn_id="t9"))
    first, *rest = out.getvalue().splitlines()
    assert first.endswith("failed turn_id=t9")
    assert rest[0].startswith("Traceback")
    assert "RuntimeError: kaputt" in rest[-1]


def test_inherited_journal_stream_for_another_fd_is_ignored(tmp_path: Path) -> None:
    _, env = journal_stream(tmp_path)
    out = io.StringIO()  # not the journal stream: no fileno at all
    setup_logging("info", environ=env, stream=out, journal_sender=Journal())
    logging.getLogger("x").warning("hello")
    assert re.match(r"\d{4}-\d\d-\d\d ", out.getvalue())

    other = (tmp_path / "other").open("w", encoding="utf-8")
    assert not logs.under_journald(env, other)
    assert not logs.under_journald({"JOURNAL_STREAM": "garbage"}, other)


def test_level_and_idempotence() -> None:
    out = io.StringIO()
    setup_logging("warning", environ={}, stream=out)
    setup_logging("DEBUG", environ={}, stream=out)
    assert len(ours()) == 1
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger("x").debug("dbg")
    assert out.getvalue().count("dbg") == 1
    with pytest.raises(ConfigError):
        setup_logging("verbose", environ={}, stream=out)


# --- journald -----------------------------------------------------------------------------


def test_journald_gets_structured_fields_without_raw_args(tmp_path: Path) -> None:
    stream, env = journal_stream(tmp_path)
    journal = Journal()
    setup_logging("info", environ=env, stream=stream, journal_sender=journal)
    log = logging.getLogger("parley.turns")
    log.info("turn %s done", "t1", extra=fields(turn_id="t1", session_id="s1", latency_ms=412))
    (entry,) = journal.entries
    assert entry["MESSAGE"] == "turn t1 done"  # no timestamp, no level: journald adds those
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "parley"
    assert entry["LOGGER"] == "parley.turns"
    assert entry["TURN_ID"] == "t1"
    assert entry["SESSION_ID"] == "s1"
    assert entry["LATENCY_MS"] == "412"
    assert "CODE_ARGS" not in entry and "args" not in entry and "msg" not in entry
    stream.flush()
    assert (tmp_path / "stderr").read_text() == ""  # nothing duplicated onto stderr


def test_journald_priorities(tmp_path: Path) -> None:
    stream, env = journal_stream(tmp_path)
    journal = Journal()
    setup_logging("debug", environ=env, stream=stream, journal_sender=journal)
    log = logging.getLogger("p")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert [e["PRIORITY"] for e in journal.entries] == ["7", "6", "4", "3", "2"]


def test_journald_without_python_systemd_uses_prefixed_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_journal_sender", lambda: None)
    stream, env = journal_stream(tmp_path)
    setup_logging("info", environ=env, stream=stream)
    logging.getLogger("p").warning("careful", extra=fields(turn_id="t2"))
    stream.flush()
    assert (tmp_path / "stderr").read_text() == "<4>WARNING p: careful turn_id=t2\n"


# --- websockets and secrets ---------------------------------------------------------------


@pytest.mark.parametrize("journald", [False, True])
def test_websockets_debug_never_logged(tmp_path: Path, journald: bool) -> None:
    stream, env = journal_stream(tmp_path)
    journal = Journal()
    if not journald:
        env = {}
    setup_logging("debug", environ=env, stream=stream, journal_sender=journal)
    assert logging.getLogger("websockets").getEffectiveLevel() == logging.INFO
    # Even if a library (or a colleague) turns a child logger back to DEBUG:
    logging.getLogger("websockets.client").setLevel(logging.DEBUG)
    logging.getLogger("websockets.client").debug("> Authorization: Bearer %s", SECRET)
    logging.getLogger("websockets.client").info("connection open")
    logging.getLogger("websocketsish").debug("a different logger")
    stream.flush()
    text = (tmp_path / "stderr").read_text() + repr(journal.entries)
    assert "Authorization" not in text
    assert "connection open" in text
    assert "a different logger" in text


@pytest.mark.parametrize("journald", [False, True])
def test_secrets_redacted_everywhere(tmp_path: Path, journald: bool) -> None:
    stream, env = journal_stream(tmp_path)
    journal = Journal()
    if not journald:
        env = {}
    setup_logging("debug", secrets=[SECRET, "", "ab"], environ=env, stream=stream,
                  journal_sender=journal)
    log = logging.getLogger("parley.api")
    log.info("key is %s", SECRET)
    log.info(f"inline {SECRET}")
    log.info("field", extra=fields(session_id=f"x{SECRET}y"))
    try:
        raise ValueError(f"bad key {SECRET}")
    except ValueError:
        log.exception("failed")
    stream.flush()
    text = (tmp_path / "stderr").read_text() + repr(journal.entries)
    assert SECRET not in text
    assert text.count("[REDACTED]") >= 4
    # short or empty "secrets" are ignored rather than redacting every "ab" in the log
    log.info("about abc")
    stream.flush()
    text = (tmp_path / "stderr").read_text() + repr(journal.entries)
    assert "about abc" in text


def test_secret_filter_is_installed_on_the_handler() -> None:
    from daemon.secrets import SecretFilter

    setup_logging("info", secrets=[SECRET], environ={}, stream=io.StringIO())
    (handler,) = ours()
    assert any(isinstance(f, SecretFilter) for f in handler.filters)


@pytest.mark.parametrize("journald", [False, True])
def test_secret_added_after_setup_is_redacted(tmp_path: Path, journald: bool) -> None:
    stream, env = journal_stream(tmp_path)
    journal = Journal()
    if not journald:
        env = {}
    setup_logging("info", environ=env, stream=stream, journal_sender=journal)
    log = logging.getLogger("parley.api")
    log.info("before %s", "correct-horse-battery-staple")
    logs.add_secret("correct-horse-battery-staple")
    log.info("after %s", "correct-horse-battery-staple")
    try:
        raise RuntimeError("correct-horse-battery-staple rejected")
    except RuntimeError:
        log.exception("refused")
    stream.flush()
    text = (tmp_path / "stderr").read_text() + repr(journal.entries)
    assert text.count("correct-horse-battery-staple") == 1  # only the line logged before add_secret
    assert "after [REDACTED]" in text
