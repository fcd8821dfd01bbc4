"""Earcons, volume, and the audio CLI commands against fake ALSA devices."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from daemon.config import CaptureConfig, MixerConfig, PlaybackConfig
from hw import audio_cli
from hw.earcons import NAMES, all_earcons, earcon
from hw.fake_alsa import FakeAlsaEnv
from hw.mixer import SoftwareVolume, Volume, make_volume


def test_earcons_distinct_short_and_click_free() -> None:
    tones = all_earcons(0.3)
    assert set(tones) == set(NAMES)
    assert len(set(tones.values())) == len(NAMES)
    for pcm in tones.values():
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768
        assert 0.05 < len(x) / 24000 < 0.6
        assert np.max(np.abs(x)) <= 0.3 + 1e-3
        assert abs(x[0]) < 0.01 and abs(x[-1]) < 0.01  # raised-cosine edges
        assert np.max(np.abs(np.diff(x))) < 0.1  # no step anywhere
    quiet = np.frombuffer(earcon("error", 0.1), dtype="<i2")
    loud = np.frombuffer(earcon("error", 0.3), dtype="<i2")
    assert np.max(np.abs(loud)) == pytest.approx(3 * np.max(np.abs(quiet)), rel=0.01)
    with pytest.raises(ValueError):
        earcon("nope")


def test_software_volume_is_default_and_clamps() -> None:
    vol = make_volume(MixerConfig(control="", initial_volume=50))
    assert isinstance(vol, SoftwareVolume) and isinstance(vol, Volume)
    assert vol.get() == 50 and vol.gain == pytest.approx(0.25)
    assert vol.set(150) == 100 and vol.set(-3) == 0 and vol.gain == 0


def test_mic_test_records_24k_wav(alsa_env: FakeAlsaEnv, tmp_path: Path) -> None:
    t = np.arange(48000) / 48000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * 2**31).astype("<i4")
    raw = tmp_path / "in.raw"
    np.stack([x, x], axis=1).tofile(raw)
    alsa_env.fault_device(name="mic", infile=raw, rate=48000, channels=2, format="S32_LE")
    out = tmp_path / "rec.wav"
    assert audio_cli.mic_test(CaptureConfig(device="mic", gain_db=0), 0.5, out) == 0
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() >= 12000


def test_mic_test_reports_missing_device(alsa_env: FakeAlsaEnv, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert audio_cli.mic_test(CaptureConfig(device="nosuch"), 0.2, tmp_path / "x.wav") == 1
    assert "no ALSA capture device named 'nosuch'" in capsys.readouterr().err


def test_speaker_test_plays_on_fake_speaker(alsa_env: FakeAlsaEnv) -> None:
    out = alsa_env.speaker()
    assert audio_cli.speaker_test(PlaybackConfig(device="fakespk")) == 0
    assert out.stat().st_size >= 4.2 * 48000 * 4


def test_list_devices_runs_without_cards(alsa_env: FakeAlsaEnv,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    alsa_env.speaker()
    assert audio_cli.list_devices() == 0
    text = capsys.readouterr().out
    assert "Playback devices" in text and "fakespk" in text
