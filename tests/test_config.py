"""Config loading: the shipped file equals the defaults; every mistake is named by key path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from daemon.config import Config, ModelPrice, config_reference, load_config, parse_config
from daemon.errors import ConfigError, ParleyError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_equals_defaults() -> None:
    assert load_config(REPO / "config.yaml") == Config()


def test_shipped_config_documents_every_key() -> None:
    data = yaml.safe_load((REPO / "config.yaml").read_text())

    def walk(instance: object, node: dict[str, object], prefix: str) -> None:
        for f in dataclasses.fields(instance):  # type: ignore[arg-type]
            assert f.name in node, f"config.yaml does not document {prefix}{f.name}"
            child = getattr(instance, f.name)
            if dataclasses.is_dataclass(child):
                value = node[f.name]
                assert isinstance(value, dict)
                walk(child, value, f"{prefix}{f.name}.")

    walk(Config(), data, "")


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.api.model = "x"  # type: ignore[misc]


def test_empty_document_gives_defaults() -> None:
    assert parse_config(None) == Config()


def test_nested_values_are_applied() -> None:
    cfg = parse_config(
        {"session": {"rotate_after_min": 0.05}, "usage": {"prices": {"m": {"text_in": 1}}}}
    )
    assert cfg.session.rotate_after_min == 0.05
    assert cfg.usage.prices == {"m": ModelPrice(text_in=1.0)}
    assert isinstance(cfg.usage.prices["m"].text_in, float)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"api": {"modle": "x"}}, "api.modle: unknown key; did you mean 'model'?"),
        (
            {"api": {"dialect": "v2"}},
            "api.dialect: 'v2' is not allowed; use one of 'ga', 'beta', 'azure'",
        ),
        ({"session": {"speed": "fast"}}, "session.speed: expected a number, got 'fast'"),
        ({"session": {"speed": 9}}, "session.speed: 9.0 is out of range; allowed 0.25 to 1.5"),
        ({"button": {"pin": True}}, "button.pin: expected an integer, got True"),
        ({"tools": {"enabled": "get_time"}}, "tools.enabled: expected a list of a string"),
        ({"audio": "loud"}, "audio: expected a mapping, got str"),
        ({"api": {"url": "https://x"}}, "api.url: must start with wss://"),
        (
            {"audio": {"capture": {"period_frames": 960, "buffer_frames": 1000}}},
            "audio.capture.buffer_frames: must be at least two periods",
        ),
        ([1, 2], "<top>: expected a mapping, got list"),
    ],
)
def test_mistakes_are_named(doc: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "test.yaml")
    assert expected in str(info.value)
    assert "test.yaml" in str(info.value)
    assert isinstance(info.value, ParleyError)


def test_all_mistakes_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"api": {"model": 3, "bogus": 1}, "led": {"pin": 99}})
    text = str(info.value)
    assert "api.model" in text and "api.bogus" in text and "led.pin" in text


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("api:\n  model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(bad)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist; copy config\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_reference_lists_every_leaf() -> None:
    ref = config_reference()
    assert "api.reconnect.max_delay_s = 30.0" in ref
    assert "audio.capture.format = 'S32_LE'" in ref
