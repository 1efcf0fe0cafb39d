"""Atomic output (qtune.io): permissions that follow the umask, and temp folders left by killed writers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtune.io import atomic_dir, atomic_path, write_json, write_jsonl, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)], ids=["022", "077", "002"])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "sub" / "b.json", {"a": 1})
    write_jsonl(tmp_path / "c.jsonl", [{"a": 1}])
    with atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"\0")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "nested").mkdir()
    for name in ("a.txt", "sub/b.json", "c.jsonl", "d.bin", "ckpt/weights.bin"):
        assert mode(tmp_path / name) == file_mode, name
    for name in ("sub", "ckpt", "ckpt/nested"):
        assert mode(tmp_path / name) == dir_mode, name


def test_files_a_library_writes_0600_inside_a_folder_get_the_umask_mode(tmp_path, umask):
    import tempfile

    umask(0o022)
    with atomic_dir(tmp_path / "ckpt") as tmp:
        fd, shard = tempfile.mkstemp(dir=tmp)  # as transformers writes its weight shards: 0600
        os.close(fd)
        os.replace(shard, tmp / "model.safetensors")
        (tmp / "run.sh").write_text("#!/bin/sh\n", encoding="utf-8")
        (tmp / "run.sh").chmod(0o700)
    assert mode(tmp_path / "ckpt" / "model.safetensors") == 0o644
    assert mode(tmp_path / "ckpt" / "run.sh") == 0o755  # still executable


def test_replacing_a_folder_keeps_the_umask_mode(tmp_path, umask):
    umask(0o022)
    for text in ("old", "new"):
        with atomic_dir(tmp_path / "best") as tmp:
            (tmp / "w.txt").write_text(text, encoding="utf-8")
    assert mode(tmp_path / "best") == 0o755
    assert (tmp_path / "best" / "w.txt").read_text(encoding="utf-8") == "new"


# --- temp folders of killed writers ------------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from qtune.io import atomic_dir, atomic_path
target, kind = sys.argv[1], sys.argv[2]
with (atomic_dir if kind == "dir" else atomic_path)(target) as tmp:
    if kind == "dir":
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
    else:
        tmp.write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_writer(target: Path, kind: str) -> Path:
    """The temp path a writer left behind when it was killed in the middle of `atomic_dir`/`atomic_path`."""
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), kind], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    left = Path(done.stdout.strip())
    assert left.exists() and left.parent == target.parent
    return left


def temp_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_next_save_removes_the_temp_folders_of_killed_writers(tmp_path):
    target = tmp_path / "last"
    left = [killed_writer(target, "dir") for _ in range(3)]
    # each new writer removed the folder of the one killed before it: one is left, not three
    assert [p.exists() for p in left] == [False, False, True]
    other = killed_writer(tmp_path / "best", "dir")  # another target's: not this save's business
    with atomic_dir(target) as tmp:
        (tmp / "w.txt").write_text("ok", encoding="utf-8")
    assert not left[-1].exists()
    assert temp_entries(tmp_path) == [other.name]
    assert sorted(p.name for p in target.iterdir()) == ["w.txt"]


def test_next_write_removes_the_temp_files_of_killed_writers(tmp_path):
    target = tmp_path / "metrics.json"
    left = killed_writer(target, "file")
    write_json(target, {"a": 1})
    assert not left.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    target = tmp_path / "last"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # what a writer still running (another process, this one) has open right now
        live = [tmp_path / f".last.pid{pid}.abcd1234.tmp" for pid in (sleeper.pid, os.getpid())]
        for folder in live:
            folder.mkdir()
            (folder / "weights.bin").write_bytes(b"half")
        with atomic_dir(target) as tmp:
            (tmp / "w.txt").write_text("ok", encoding="utf-8")
        assert all((folder / "weights.bin").read_bytes() == b"half" for folder in live)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temp_folders_without_an_owner_are_removed_only_when_old(tmp_path):
    # Written before owners were recorded in the name: only their age tells.
    old, recent = tmp_path / ".last.k2j4h5g6.tmp", tmp_path / ".last.zz9yx8w7.tmp"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    with atomic_dir(tmp_path / "last") as tmp:
        (tmp / "w.txt").write_text("ok", encoding="utf-8")
    assert not old.exists()
    assert (recent / "weights.bin").exists()


def test_names_that_only_look_alike_are_not_touched(tmp_path):
    # ".last.x.pid1.abc.tmp" belongs to a target called "last.x", not "last"
    kept = [tmp_path / ".last.x.pid999999999.abcd1234.tmp", tmp_path / ".lastrun.pid999999999.abcd1234.tmp",
            tmp_path / "last.pid999999999.abcd1234.tmp"]
    for folder in kept:
        folder.mkdir()
    with atomic_dir(tmp_path / "last") as tmp:
        (tmp / "w.txt").write_text("ok", encoding="utf-8")
    assert all(folder.is_dir() for folder in kept)
