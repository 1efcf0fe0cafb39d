"""./dev: `./dev qtune ...` runs in the caller's folder (relative paths are the caller's, outputs land
there); `./dev test` and `./dev demo` run in the repository, as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from support import qwen_tokenizer_dir

ROOT = Path(__file__).resolve().parent.parent


def fake_checkout(tmp_path: Path) -> Path:
    """A copy of ./dev next to a stand-in environment whose python and qtune report where they ran."""
    root = tmp_path / "checkout"
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(ROOT / "dev", root / "dev")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for tool in ("python", "qtune"):
        script = root / ".venv" / "bin" / tool
        script.write_text(f'#!/usr/bin/env bash\necho "{tool} in $(pwd):" "$@"\n')
        script.chmod(0o755)
    stamp = root / ".venv" / ".installed"
    stamp.touch()
    os.utime(stamp, (os.path.getmtime(root / "pyproject.toml") + 10,) * 2)  # installed after the last change
    return root


def dev(script: Path, cwd: Path, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_qtune_runs_in_the_callers_folder_demo_and_test_in_the_checkout(tmp_path):
    root = fake_checkout(tmp_path)
    caller = tmp_path / "work"
    caller.mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dev").symlink_to(root / "dev")
    # absolute, relative (../checkout/dev) and through a symlink elsewhere
    for script in (root / "dev", Path(os.path.relpath(root / "dev", caller)), tmp_path / "bin" / "dev"):
        result = dev(script, caller, "qtune", "data", "stats", "pairs.csv", "--model", "m")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"qtune in {caller}: data stats pairs.csv --model m\n"
        result = dev(script, caller, "demo", "--epochs", "1")
        assert result.stdout == f"qtune in {root}: demo --epochs 1\n"
        result = dev(script, caller, "test", "-q", "tests/test_config.py")
        assert result.stdout == f"python in {root}: -m pytest -q tests/test_config.py\n"
    result = dev(root / "dev", caller, "nonsense")
    assert result.returncode == 2 and "./dev qtune" in result.stdout
    assert sorted(p.name for p in caller.iterdir()) == []  # the stand-ins wrote nothing; ./dev neither


def test_a_real_qtune_command_reads_and_writes_relative_to_the_caller(tmp_path):
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    (caller / "pairs.csv").write_text("sentence1,sentence2,label\nthe cat,a dog,1\nmy bus,the train,1\n",
                                      encoding="utf-8")
    result = dev(ROOT / "dev", caller, "qtune", "data", "stats", "pairs.csv", "--model", qwen_tokenizer_dir(),
                 "--plot", "lengths.png", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 2
    assert (caller / "lengths.png").is_file()
    assert not (ROOT / "lengths.png").exists()
