"""Atomic file output: a reader never sees a half-written file, a crash never leaves one.

Everything written here gets the modes plain `open()` and `mkdir()` would give (0666 and 0777 less
the umask), so a model folder or knowledge base written by one user can be served by another.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from qtune.errors import QtuneError

# A temp path whose name records no owner (written before owners were recorded) is stale after this.
UNOWNED_TEMP_MAX_AGE_S = 3600


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (changing it, even for a
    moment, would give files other threads create meanwhile the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unlinked_target(path: str | os.PathLike) -> Path:
    """`path` made absolute through the links of the folders above it, never through its own: a
    writer replaces or deletes the entry it was given, so an entry that is a symbolic link is refused
    (replacing what it points to would replace, and delete from, a folder outside the target's)."""
    path = Path(path)
    target = path.parent.resolve() / path.name
    refuse_link(target)
    return target


def refuse_link(path: Path) -> None:
    """A QtuneError naming `path` when it is a symbolic link (dangling or not)."""
    if path.is_symlink():
        raise QtuneError(f"{path} is a symbolic link (to {os.readlink(path)}) and qtune does not replace or delete "
                         "through a link: remove the link or write somewhere else")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.pid{os.getpid()}."


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    except (OverflowError, ValueError):  # no process can have this number
        return False
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders that writers of `path` killed mid-write left beside it
    (`.{name}.pid{PID}.{random}.tmp`, where `atomic_path` and `atomic_dir` write); returns them.

    A temp path is stale when the process named in it no longer runs on this machine; one that names
    no process (`.{name}.{random}.tmp`, from before owners were recorded) only once it is older than
    UNOWNED_TEMP_MAX_AGE_S. So a writer still running, in this process or another, keeps its temp
    path; a reused pid only delays the cleanup. Temp paths of other targets are never touched, nor
    a symbolic link with a temp path's name (writers make plain files and folders, never links).
    """
    path = Path(path)
    name = re.escape(path.name)
    # [a-z0-9_]{8}: the random part tempfile adds
    owned = re.compile(rf"\.{name}\.pid(\d+)\.[a-z0-9_]{{8}}\.tmp")
    unowned = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.is_symlink():
            continue
        match = owned.fullmatch(entry.name)
        if match:
            stale = not _pid_running(int(match.group(1)))
        elif unowned.fullmatch(entry.name):
            try:
                stale = time.time() - entry.lstat().st_mtime > UNOWNED_TEMP_MAX_AGE_S
            except FileNotFoundError:
                continue
        else:
            continue
        if stale:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds. A `path`
    that is a symbolic link is refused (`unlinked_target`)."""
    path = unlinked_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """One JSON value per line (UTF-8, non-ASCII kept as is, "\n" line ends), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _umask_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes plain `open()` and `mkdir()` give (executables
    stay executable): libraries that write through temp files of their own (transformers' weight
    shards) leave them 0600."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` as a whole on success.

    Used for checkpoints, so `best/` or `last/` is always a complete, loadable folder; the temp
    folders of earlier writers that were killed mid-save are removed first (`remove_stale_temps`),
    and what the block wrote gets the modes the umask gives (`_umask_modes`). A `path`, or the
    `.{name}.old` folder the replaced one passes through, that is a symbolic link is refused before
    anything is written (`unlinked_target`).
    """
    path = unlinked_target(path)
    old = path.with_name(f".{path.name}.old")
    refuse_link(old)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))  # 0700
    try:
        yield tmp
        _umask_modes(tmp)
        # checked again: a link made while the block ran must not be followed either
        refuse_link(path)
        refuse_link(old)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
