"""Checkpoint folders (qtune.modeling.checkpoint) as other users see them: modes from the umask."""

from __future__ import annotations

import os
import stat

import pytest

from qtune.api import export
from qtune.modeling.checkpoint import save_checkpoint
from qtune.tasks import load_model


@pytest.fixture(scope="module")
def loaded(tiny_bert_dir):
    return load_model(tiny_bert_dir, task="pair-cls", device="cpu")


def modes(folder) -> set[tuple[str, int]]:
    """(kind, permission bits) of the folder and everything in it."""
    found = {("dir", stat.S_IMODE(folder.stat().st_mode))}
    for path in folder.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)))
    return found


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["022", "077"])
def test_a_checkpoint_and_an_export_follow_the_umask(loaded, tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        save_checkpoint(loaded, tmp_path / "last", {"state.txt": lambda p: p.write_text("x", encoding="utf-8")})
        export(str(tmp_path / "last"), str(tmp_path / "merged"))
    finally:
        os.umask(old)
    for folder in ("last", "merged"):
        assert (tmp_path / folder / "qtune.json").is_file()
        assert modes(tmp_path / folder) == {("dir", dir_mode), ("file", file_mode)}, folder
