"""systemd/parley.service: the check gate (verify + offline security score) and key directives."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "parley.service"
CHECK = ROOT / "systemd" / "check-unit.sh"
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd); the unit is unchecked",
)


def directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (repeated keys accumulate; comments dropped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return directives(UNIT.read_text(encoding="utf-8"))


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CHECK), str(path)], capture_output=True, text=True, timeout=120, check=False
    )


@needs_analyze
def test_make_check_passes_and_exposure_is_at_most_1_5() -> None:
    proc = subprocess.run(
        ["make", "-s", "-C", str(ROOT / "systemd"), "check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify: OK (no output)" in proc.stdout
    match = re.search(r"Overall exposure level for parley\.service: (\d+\.\d)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


@needs_analyze
def test_gate_fails_on_a_weaker_unit(tmp_path: Path) -> None:
    weak = tmp_path / "parley.service"
    text = UNIT.read_text(encoding="utf-8")
    for key in ("ProtectSystem", "SystemCallFilter", "CapabilityBoundingSet", "ProtectHome"):
        text = re.sub(rf"^{key}=.*$", "", text, flags=re.M)
    weak.write_text(text, encoding="utf-8")
    proc = run_check(weak)
    assert proc.returncode != 0
    assert "exposure" in proc.stderr and f"> {MAX_EXPOSURE}" in proc.stderr


@needs_analyze
def test_gate_fails_on_what_verify_only_warns_about(tmp_path: Path) -> None:
    bad = tmp_path / "parley.service"
    text = UNIT.read_text(encoding="utf-8").replace(
        "ProtectSystem=strict", "ProtectSystem=strikt\nRestartPreventExitStatuz=78"
    )
    bad.write_text(text, encoding="utf-8")
    proc = run_check(bad)
    assert proc.returncode != 0
    assert "Unknown key" in proc.stdout and "verify reported problems" in proc.stderr


def test_service_basics(unit: dict[str, list[str]]) -> None:
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.WatchdogSec"] == ["30"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.TimeoutStopSec"] == ["10"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (exec_start,) = unit["Service.ExecStart"]
    assert exec_start.startswith("/opt/parley/venv/bin/")
    assert " run --config /etc/parley/config.yaml" in exec_start
    env = " ".join(unit["Service.Environment"])
    assert "PYTHONFAULTHANDLER=1" in env or "-X faulthandler" in exec_start


def test_exit_status_78_is_not_restarted_and_matches_the_cli(
    unit: dict[str, list[str]],
) -> None:
    assert "78" in " ".join(unit["Service.RestartPreventExitStatus"]).split()
    cli = pytest.importorskip("daemon.cli")
    assert cli.EXIT_CONFIG == 78


def test_devices_groups_and_proc(unit: dict[str, list[str]]) -> None:
    assert unit["Service.DevicePolicy"] == ["closed"]
    allow = unit["Service.DeviceAllow"]
    assert "char-alsa rw" in allow
    assert "char-gpiochip rw" in allow
    assert not any("/dev/gpiochip" in a for a in allow)  # Pi 5 renumbered the chips
    groups = " ".join(unit["Service.SupplementaryGroups"]).split()
    assert "audio" in groups and "gpio" in groups
    assert unit.get("Service.PrivateDevices", ["no"])[-1] != "yes"
    assert unit.get("Service.ProcSubset", ["all"])[-1] != "pid"
    assert unit["Service.ProtectProc"] == ["invisible"]
    after = " ".join(unit["Unit.After"]).split()
    assert "modprobe@snd.service" in after and "sound.target" in after


def test_lgpio_pipes_and_working_directory_are_writable(unit: dict[str, list[str]]) -> None:
    assert unit["Service.RuntimeDirectory"] == ["parley"]
    assert "LG_WD=%t/parley" in " ".join(unit["Service.Environment"]).split()
    assert unit["Service.WorkingDirectory"] == ["%t/parley"]
    assert unit["Service.ProtectSystem"] == ["strict"]


def test_secrets_and_state(unit: dict[str, list[str]]) -> None:
    assert unit["Service.LoadCredential"] == ["openai-api-key:/etc/parley/openai-api-key"]
    assert not any("OPENAI_API_KEY" in e for e in unit["Service.Environment"])
    assert "Service.EnvironmentFile" not in unit
    assert unit["Service.LimitCORE"] == ["0"]
    assert unit["Service.UMask"] == ["0077"]
    assert unit["Service.StateDirectory"] == ["parley"]
    assert unit["Service.StateDirectoryMode"] == ["0700"]
    assert unit["Service.User"] == ["parley"]


def test_commented_encrypted_credential_alternative() -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert "#LoadCredentialEncrypted=openai-api-key:" in text
    assert "systemd-creds encrypt --name=openai-api-key" in text
