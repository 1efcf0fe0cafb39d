"""A knowledge base that cannot be written (full disk) or opened (another process has it): one
QtuneError line saying what happened, what was kept and what to do, without Milvus' tracebacks
(qtune.kb.store), through `qtune kb ...` in-process."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from support import assert_user_error, run
from qtune.kb.store import MILVUS_LOGGERS, KnowledgeBase

FAQ = [("q1", "the cat is here", "Cats live upstairs."),
       ("q2", "a red bus now", "The bus leaves at nine.")]
NEW = [("q3", "my old horse", "Horses are in the barn.")]
# What Milvus Lite raises when the disk fills (seen on a full tmpfs, from `upsert` or `flush`)
NO_SPACE = "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"


def write_faq(path: Path, rows) -> Path:
    path.write_text("id,question,answer\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def entry_ids(kb: Path) -> list[str]:
    with KnowledgeBase.open(str(kb)) as store:
        return sorted(e.id for e in store.get(["q1", "q2", "q3"]))


@pytest.fixture
def built(tmp_path, capsys, tiny_bert_dir) -> Path:
    kb = tmp_path / "faq.db"
    code, _, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input", write_faq(tmp_path / "faq.csv", FAQ),
                       "--kb", kb, "--device", "cpu")
    assert code == 0, err
    return kb


def disk_full(*args, **kwargs):
    from pymilvus.exceptions import MilvusException

    raise MilvusException(code=1, message=NO_SPACE)


def milvus_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("milvus_lite", "pymilvus")) and r.levelno >= logging.WARNING]


# ── 4. a full disk ──────────────────────────────────────────────

def test_a_full_disk_during_kb_add_says_so_and_keeps_what_was_written(built, tmp_path, capsys, monkeypatch, caplog):
    from pymilvus import MilvusClient

    monkeypatch.setattr(MilvusClient, "upsert", disk_full)
    with caplog.at_level(logging.DEBUG):
        code, _, err = run(capsys, "kb", "add", "--kb", built, "--input", write_faq(tmp_path / "new.csv", NEW),
                           "--device", "cpu")
    assert_user_error(code, err, f"the disk holding {built} is full ({NO_SPACE})",
                      "Nothing acknowledged was lost: the entries written before are kept",
                      "Free disk space, then write the same entries again: `qtune kb add` replaces entries by id")
    assert err.count("\n") == 1
    assert milvus_warnings(caplog) == []
    monkeypatch.undo()
    assert entry_ids(built) == ["q1", "q2"]


def test_a_write_acknowledged_before_the_disk_filled_is_kept(built, tmp_path, capsys, monkeypatch):
    """The flush after an upsert fails: the upsert was acknowledged, so its entry is there on reopening."""
    from pymilvus import MilvusClient

    monkeypatch.setattr(MilvusClient, "flush", disk_full)
    code, _, err = run(capsys, "kb", "add", "--kb", built, "--input", write_faq(tmp_path / "new.csv", NEW),
                       "--device", "cpu")
    assert_user_error(code, err, "is full", "Nothing acknowledged was lost")
    monkeypatch.undo()
    assert entry_ids(built) == ["q1", "q2", "q3"]


def test_a_full_disk_while_kb_build_creates_the_kb_says_how_to_start_again(tmp_path, capsys, monkeypatch,
                                                                           tiny_bert_dir):
    from pymilvus import MilvusClient

    monkeypatch.setattr(MilvusClient, "create_collection", disk_full)
    kb = tmp_path / "faq.db"
    code, _, err = run(capsys, "kb", "build", "--embedding", tiny_bert_dir, "--input",
                       write_faq(tmp_path / "faq.csv", FAQ), "--kb", kb, "--device", "cpu")
    assert_user_error(code, err, f"the disk holding {kb} is full", "while the knowledge base was being created",
                      f"Free disk space, delete {kb} and run `qtune kb build` again")


def test_another_write_failure_is_named_as_such(built, tmp_path, capsys, monkeypatch):
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    def refused(*args, **kwargs):
        raise MilvusException(code=65535, message="segment manifest is damaged")

    monkeypatch.setattr(MilvusClient, "delete", refused)
    code, _, err = run(capsys, "kb", "delete", "--kb", built, "--ids", "q1")
    assert_user_error(code, err, f"writing to the knowledge base {built} failed (segment manifest is damaged)",
                      "Nothing acknowledged was lost", "Remove the cause")
    assert "full" not in err


# ── 5. a KB another process has open ────────────────────────────

HOLD = """import fcntl, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)  # what Milvus Lite does with a .db it opens
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(built, tmp_path):
    """Starts a process that holds `built` the way another process's Milvus Lite does, with these
    words on its command line; returns the process (killed after the test)."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD, encoding="utf-8")
    procs = []

    def hold(*words: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script), str(built / "LOCK"), *words], stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_kb_served_by_another_process_says_which_and_to_query_its_match_endpoint(built, holder, capsys, caplog):
    pid = holder("serve", "--kb", str(built)).pid
    with caplog.at_level(logging.DEBUG):
        code, _, err = run(capsys, "kb", "search", "--kb", built, "the cat", "--device", "cpu")
    assert_user_error(code, err, f"the knowledge base {built} is open in process {pid} (", f"serve --kb {built})",
                      "Milvus Lite lets one process at a time use it",
                      "query that server's /v1/match endpoint instead, or stop it first")
    assert err.count("\n") == 1 and "Open local milvus failed" not in err
    assert milvus_warnings(caplog) == []


def test_a_kb_held_by_another_kb_add_says_to_wait_for_it(built, holder, tmp_path, capsys):
    proc = holder("kb", "add")
    code, _, err = run(capsys, "kb", "add", "--kb", built, "--input", write_faq(tmp_path / "new.csv", NEW),
                       "--device", "cpu")
    assert_user_error(code, err, f"is open in process {proc.pid} (", "kb add)", "wait for it to finish or stop it")
    proc.kill()
    proc.wait()
    assert entry_ids(built) == ["q1", "q2"]


def test_the_held_logs_are_the_loggers_milvus_logs_on():
    """Each name is a logger of milvus_lite or pymilvus that exists once they are imported: a
    renamed module would let its tracebacks through again."""
    import milvus_lite.adapter.grpc.server  # noqa: F401
    import milvus_lite.adapter.grpc.servicer  # noqa: F401
    import milvus_lite.server_manager  # noqa: F401
    import pymilvus.decorators  # noqa: F401

    assert all(name in logging.Logger.manager.loggerDict for name in MILVUS_LOGGERS)
