"""Shared pytest fixtures. ALSA: fake devices (hw/fake_alsa.py) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hw.fake_alsa import FakeAlsaEnv, build_plugin


@pytest.fixture(scope="session")
def fault_plugin() -> Path:
    """The parleyfault ALSA plugin, built on first use (make -C hw/alsa_fault)."""
    return build_plugin()


@pytest.fixture
def alsa_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             fault_plugin: Path) -> Iterator[FakeAlsaEnv]:
    """Fake ALSA devices; this process's alsa-lib is pointed at them for the test."""
    env = FakeAlsaEnv(tmp_path / "alsa", plugin=fault_plugin)
    monkeypatch.setenv("ALSA_CONFIG_PATH", env.alsa_config_path)
    env.activate()
    try:
        yield env
    finally:
        env.close()
