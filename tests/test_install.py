"""`make -C systemd install/uninstall DESTDIR=...`: the packaging layout, without root powers.

This builds a real venv (pip, the C extension) inside DESTDIR: about 10 s with a wheel
cache, longer on a cold one.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/opt/parley"

pytestmark = pytest.mark.timeout(900)


def make(target: str, destdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    args = ["make", "-s", "-C", str(ROOT / "systemd"), target, f"DESTDIR={destdir}",
            f"PYTHON={sys.executable}"]
    args += [f"{k}={v}" for k, v in env.items()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=800, check=False)
    assert proc.returncode == 0, f"make {target} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def build_artifacts() -> set[Path]:
    return {*ROOT.glob("*.egg-info"), *ROOT.glob("build"), *ROOT.glob("dist")}


SOURCE_TREE: dict[str, set[Path]] = {}


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destdir = tmp_path_factory.mktemp("destdir")
    SOURCE_TREE["before"] = build_artifacts()
    make("install", destdir)
    SOURCE_TREE["after"] = build_artifacts()
    return destdir


def test_unit_is_laid_and_its_exec_start_exists(dest: Path) -> None:
    unit = dest / "etc/systemd/system/parley.service"
    assert unit.read_text() == (ROOT / "systemd/parley.service").read_text()
    assert mode(unit) == 0o644
    exec_start = next(
        line.split("=", 1)[1] for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    )
    binary = exec_start.split()[0]
    assert binary.startswith(PREFIX + "/")
    laid = dest / binary.lstrip("/")
    assert laid.is_file() and os.access(laid, os.X_OK)


def test_config_is_private_and_from_the_repo(dest: Path) -> None:
    conf = dest / "etc/parley/config.yaml"
    assert conf.read_text() == (ROOT / "config.yaml").read_text()
    assert mode(conf) == 0o640
    assert mode(dest / "etc/parley") == 0o750
    assert (dest / "opt/parley/config.yaml.default").read_text() == conf.read_text()
    assert not (dest / "etc/parley/openai-api-key").exists()  # the key is the admin's job


def test_venv_imports_the_project_and_its_c_extension(dest: Path) -> None:
    python = dest / "opt/parley/venv/bin/python"
    proc = subprocess.run(
        [str(python), "-c", "import daemon, hw, hw._resample, daemon.cli; print(daemon.__file__)"],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    # The installed copy, not the source tree.
    assert proc.stdout.strip().startswith(str(dest / "opt/parley/venv/lib"))


def test_venv_is_relocated_to_the_prefix(dest: Path) -> None:
    venv = dest / "opt/parley/venv"
    script = venv / "bin/parley"
    assert script.read_text().splitlines()[0] == f"#!{PREFIX}/venv/bin/python"
    for f in [*sorted((venv / "bin").iterdir()), venv / "pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            assert str(dest) not in f.read_text(errors="replace"), f
    # Byte-code names the final path in tracebacks.
    pyc = next((venv / "lib").glob("python3*/site-packages/daemon/__pycache__/cli.*.pyc"))
    assert str(dest).encode() not in pyc.read_bytes()
    assert f"{PREFIX}/venv/lib".encode() in pyc.read_bytes()


def test_source_tree_is_untouched_by_the_build(dest: Path) -> None:
    # The wheel is built from a copy: no build/, dist/ or *.egg-info appears in the repo.
    assert SOURCE_TREE["after"] == SOURCE_TREE["before"]


def test_reinstall_keeps_an_edited_config_then_uninstall_removes_what_install_laid(
    dest: Path,
) -> None:
    conf = dest / "etc/parley/config.yaml"
    edited = conf.read_text() + "\n# edited by the admin\n"
    conf.write_text(edited)
    credential = dest / "etc/parley/openai-api-key"
    credential.write_text("sk-not-real")
    (dest / "etc/parley/openai-api-key.cred").write_bytes(b"encrypted blob")

    proc = make("install", dest)
    assert conf.read_text() == edited
    assert "kept existing" in proc.stdout
    # With an encrypted credential present the unit loads that one instead.
    lines = (dest / "etc/systemd/system/parley.service").read_text().splitlines()
    assert "LoadCredentialEncrypted=openai-api-key:/etc/parley/openai-api-key.cred" in lines
    assert not any(line.startswith("LoadCredential=") for line in lines)

    proc = make("uninstall", dest)
    assert not (dest / "etc/systemd/system/parley.service").exists()
    assert not (dest / "opt/parley").exists()
    # Config and key stay unless PURGE=1, and it says so.
    assert conf.read_text() == edited
    assert credential.exists()
    assert "kept /etc/parley" in proc.stdout and "PURGE=1" in proc.stdout

    proc = make("uninstall", dest, PURGE="1")
    assert not (dest / "etc/parley").exists()
    assert "removed /etc/parley" in proc.stdout
    leftovers = [p for p in dest.rglob("*") if not p.is_dir()]
    assert leftovers == []
