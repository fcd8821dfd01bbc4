"""The `parley` command: exit codes and messages a person (and systemd) can act on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli import EXIT_CONFIG, EXIT_OK, main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`parley run` configures the root logger; give later tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_check_config_accepts_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.yaml")]) == EXIT_OK
    assert "configuration is valid" in capsys.readouterr().out


def test_check_config_rejects_unknown_tools(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tools:\n  enabled: [get_time, make_coffee]\n")
    assert main(["check-config", str(cfg)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "make_coffee" in err and "get_time" in err


def test_run_with_a_bad_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("session:\n  speed: 7\n")
    assert main(["run", "--config", str(cfg)]) == EXIT_CONFIG
    assert "session.speed" in capsys.readouterr().err


def test_run_without_a_key_exits_78_and_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("api:\n  key_source: auto\n")
    assert main(["run", "--config", str(cfg)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "LoadCredential" in err and "OPENAI_API_KEY" in err
