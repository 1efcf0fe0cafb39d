"""A run's output folder: nothing is replaced or deleted through a symbolic link (qtune.io refuses
links), --resume refuses settings that would make it another run, and a new run never goes into a
folder of someone else's files (qtune.training.run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from support import assert_user_error, run
from qtune.errors import QtuneError
from qtune.io import atomic_dir, atomic_path, write_json, write_text
from qtune.tasks import get
from qtune.tasks.pair_cls.config import PairClsConfig
from qtune.training.trainer import STATE_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(epochs=0.1, batch_size=16, max_length=32, device="cpu", eval_steps=2, lr=2e-4)


def train_args(tiny_bert_dir, synthetic_files, output, **overrides) -> list[str]:
    """`qtune train pair-cls` with SETTINGS, each overridable (None: left out)."""
    settings = {**SETTINGS, **overrides}
    args = ["train", "pair-cls", "--model", tiny_bert_dir, "--train", synthetic_files["train"],
            "--eval", synthetic_files["eval"], "--output", output]
    for name, value in settings.items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), value]
    return args


@pytest.fixture(scope="module")
def saved_run(tiny_bert_dir, synthetic_files, tmp_path_factory) -> Path:
    """A short run (4 batches, evaluated every 2 steps) that the tests copy and resume."""
    output = tmp_path_factory.mktemp("run") / "out"
    get("pair-cls").train(PairClsConfig(model=tiny_bert_dir, train=str(synthetic_files["train"]),
                                        eval=str(synthetic_files["eval"]), output=str(output), **SETTINGS))
    return output


@pytest.fixture
def copied_run(saved_run, tmp_path) -> Path:
    output = tmp_path / "out"
    shutil.copytree(saved_run, output)
    return output


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (not following links) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def single_line(err: str) -> str:
    assert err.count("\n") == 1 and "usage:" not in err, err
    return err


# --- links: atomic writers ----------------------------------------------------------------------

def outside_folder(tmp_path: Path) -> Path:
    """A folder of the user's, outside the run: files qtune never wrote."""
    folder = tmp_path / "elsewhere" / "models"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    (folder / "weights.bin").write_bytes(b"keep")
    (folder.parent / ".models.pid999999999.abcd1234.tmp").mkdir()  # looks like a stale temp of "models"
    return folder


def test_a_checkpoint_folder_that_is_a_link_is_refused_and_what_it_points_to_is_kept(tmp_path):
    outside = outside_folder(tmp_path)
    before = snapshot(outside.parent)
    link = tmp_path / "run" / "last"
    link.parent.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(QtuneError) as info:
        with atomic_dir(link) as tmp:
            (tmp / "weights.bin").write_bytes(b"new")
    assert str(info.value).startswith(f"{link} is a symbolic link (to {outside})")
    assert snapshot(outside.parent) == before
    assert (outside.parent / ".models.pid999999999.abcd1234.tmp").is_dir()
    assert link.is_symlink() and sorted(p.name for p in link.parent.iterdir()) == ["last"]


def test_a_dangling_link_and_a_linked_old_folder_are_refused(tmp_path):
    outside = outside_folder(tmp_path)
    before = snapshot(outside)
    dangling = tmp_path / "best"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(QtuneError, match="is a symbolic link"):
        with atomic_dir(dangling):
            pass
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    # the folder a replaced checkpoint passes through on its way out
    (tmp_path / "last").mkdir()
    (tmp_path / ".last.old").symlink_to(outside, target_is_directory=True)
    with pytest.raises(QtuneError) as info:
        with atomic_dir(tmp_path / "last") as tmp:
            (tmp / "w.txt").write_text("x", encoding="utf-8")
    assert str(info.value).startswith(f"{tmp_path / '.last.old'} is a symbolic link")
    assert snapshot(outside) == before and (tmp_path / "last").is_dir()


@pytest.mark.parametrize("write", ["atomic_path", "write_text", "write_json"])
def test_a_file_that_is_a_link_is_not_written_through(tmp_path, write):
    target = tmp_path / "elsewhere" / "metrics.json"
    target.parent.mkdir()
    target.write_text("the user's", encoding="utf-8")
    link = tmp_path / "metrics.json"
    link.symlink_to(target)
    with pytest.raises(QtuneError, match=f"^{link} is a symbolic link"):
        if write == "atomic_path":
            with atomic_path(link) as tmp:
                tmp.write_text("new", encoding="utf-8")
        elif write == "write_text":
            write_text(link, "new")
        else:
            write_json(link, {"a": 1})
    assert target.read_text(encoding="utf-8") == "the user's"
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "metrics.json"]
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_link_named_like_a_stale_temp_is_left_alone(tmp_path):
    outside = outside_folder(tmp_path)
    before = snapshot(outside)
    link = tmp_path / ".last.pid999999999.abcd1234.tmp"  # the name of a killed writer's temp folder
    link.symlink_to(outside, target_is_directory=True)
    with atomic_dir(tmp_path / "last") as tmp:
        (tmp / "w.txt").write_text("ok", encoding="utf-8")
    assert link.is_symlink() and snapshot(outside) == before
    assert (tmp_path / "last" / "w.txt").read_text(encoding="utf-8") == "ok"


def test_a_folder_above_the_target_may_be_a_link(tmp_path):
    # an output folder placed on another disk through a link is where the user wants the run
    real = tmp_path / "disk" / "runs"
    real.mkdir(parents=True)
    (tmp_path / "runs").symlink_to(real, target_is_directory=True)
    with atomic_dir(tmp_path / "runs" / "last") as tmp:
        (tmp / "w.txt").write_text("ok", encoding="utf-8")
    write_json(tmp_path / "runs" / "metrics.json", {"a": 1})
    assert sorted(p.name for p in real.iterdir()) == ["last", "metrics.json"]


# --- links: --resume ------------------------------------------------------------------------------

def test_resume_with_last_linked_outside_the_run_is_refused_and_the_outside_folder_kept(
        capsys, copied_run, tiny_bert_dir, synthetic_files, tmp_path):
    # the user keeps last/ on another disk, beside files of their own
    outside = tmp_path / "elsewhere" / "last"
    shutil.move(copied_run / "last", outside)
    (outside / "notes.txt").write_text("mine", encoding="utf-8")
    (copied_run / "last").symlink_to(outside, target_is_directory=True)
    before, run_before = snapshot(outside), snapshot(copied_run)
    # more epochs: the resumed run would save last/ again, replacing the folder the link points to
    code, out, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, copied_run, epochs=0.2), "--resume")
    assert_user_error(code, single_line(err), f"{copied_run / 'last'} is a symbolic link (to {outside})")
    assert snapshot(outside) == before
    assert snapshot(copied_run) == run_before and (copied_run / "last").is_symlink()
    assert not out  # refused before the model loaded


# --- --resume with other settings ---------------------------------------------------------------------

def test_resume_with_settings_that_change_the_run_is_refused_naming_each(capsys, copied_run, tiny_bert_dir,
                                                                          synthetic_files):
    before = snapshot(copied_run)
    code, out, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, copied_run, batch_size=8, lr=1e-4,
                                             max_length=48), "--resume")
    assert_user_error(code, single_line(err), f"--resume continues the run saved in {copied_run}",
                      "--batch-size 8 (saved: 16)", "--lr 0.0001 (saved: 0.0002)", "--max-length 48 (saved: 32)",
                      f"--config {copied_run / 'config.yaml'} --output {copied_run} --resume")
    assert "--epochs" not in err.split("(only")[0]
    assert snapshot(copied_run) == before  # config.yaml, last/ and best/ as they were
    assert "done:" not in out


def test_resume_extending_the_epochs_says_so_and_trains_on(capsys, copied_run, tiny_bert_dir, synthetic_files):
    steps_before = yaml.safe_load((copied_run / "config.yaml").read_text(encoding="utf-8"))
    assert steps_before["epochs"] == 0.1
    code, out, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, copied_run, epochs=0.2,
                                             logging_steps=1), "--resume")
    assert code == 0, err
    assert ("resuming with --epochs 0.2 (saved: 0.1), --logging-steps 1 (saved: 10) (settings that may change "
            "on resume); the learning-rate schedule is recomputed for the new length") in out
    saved = yaml.safe_load((copied_run / "config.yaml").read_text(encoding="utf-8"))
    assert (saved["epochs"], saved["logging_steps"], saved["batch_size"]) == (0.2, 1, 16)
    metrics = json.loads((copied_run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 8  # 4 batches saved + 4 more: 0.2 of 38 batches per epoch
    # the same settings again: nothing to say
    code, out, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, copied_run, epochs=0.2,
                                             logging_steps=1), "--resume")
    assert code == 0, err
    assert "resuming with" not in out


def test_resume_with_the_saved_config_repeats_its_settings(capsys, copied_run, synthetic_files):
    code, out, err = run(capsys, "train", "pair-cls", "--config", copied_run / "config.yaml", "--output", copied_run,
                         "--resume")
    assert code == 0, err
    assert "resuming with" not in out and f"done: {copied_run}" in out


def test_the_same_file_by_another_name_is_the_same_setting(capsys, copied_run, tiny_bert_dir, synthetic_files,
                                                           monkeypatch):
    monkeypatch.chdir(Path(synthetic_files["train"]).parent)
    code, out, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, copied_run), "--resume",
                         "--train", "train.csv", "--eval", "./eval.csv")
    assert code == 0, err
    assert "resuming with" not in out


# --- a folder that is not a run -------------------------------------------------------------------------

def test_training_into_a_folder_of_other_files_is_refused(capsys, tmp_path, tiny_bert_dir, synthetic_files):
    output = tmp_path / "project"
    output.mkdir()
    (output / "notes.txt").write_text("mine", encoding="utf-8")
    code, out, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, output))
    assert_user_error(code, single_line(err), f"--output {output} holds files that are not a qtune run (notes.txt)",
                      "give a new or empty folder")
    assert snapshot(output) == {"notes.txt": b"mine"} and [p.name for p in output.iterdir()] == ["notes.txt"]
    file_output = tmp_path / "a-file"
    file_output.write_text("x", encoding="utf-8")
    code, _, err = run(capsys, *train_args(tiny_bert_dir, synthetic_files, file_output))
    assert_user_error(code, single_line(err), f"--output {file_output} is a file")


def test_an_empty_folder_and_a_run_without_a_checkpoint_are_trained_into(capsys, tmp_path, saved_run,
                                                                         synthetic_files):
    # /nonexistent/model: the run gets past the folder checks to the model, which cannot load
    empty = tmp_path / "empty"
    empty.mkdir()
    stopped = tmp_path / "stopped"  # a run stopped before its first checkpoint: config.yaml, runs/
    stopped.mkdir()
    shutil.copy(saved_run / "config.yaml", stopped / "config.yaml")
    shutil.copytree(saved_run / "runs", stopped / "runs")
    for output in (empty, stopped):
        code, _, err = run(capsys, *train_args("/nonexistent/model", synthetic_files, output))
        assert_user_error(code, err, "/nonexistent/model")
        assert "not a qtune run" not in err


def test_linked_best_is_refused_before_a_new_run_loads_the_model(capsys, tmp_path, saved_run, synthetic_files):
    output = tmp_path / "out"
    output.mkdir()
    shutil.copy(saved_run / "config.yaml", output / "config.yaml")
    outside = outside_folder(tmp_path)
    (output / "best").symlink_to(outside, target_is_directory=True)
    code, _, err = run(capsys, *train_args("/nonexistent/model", synthetic_files, output))
    assert_user_error(code, single_line(err), f"{output / 'best'} is a symbolic link")
    assert "/nonexistent/model" not in err


def test_a_saved_state_is_still_required_to_resume(capsys, tmp_path, synthetic_files):
    code, _, err = run(capsys, *train_args("/nonexistent/model", synthetic_files, tmp_path / "none"), "--resume")
    assert_user_error(code, err, f"nothing to resume: {tmp_path / 'none' / 'last' / STATE_FILE} does not exist")
    assert not os.path.exists(tmp_path / "none")


def test_what_a_resumed_run_reads_from_last_may_be_left_out_but_not_changed(tmp_path, capsys):
    from qtune.config import config_to_yaml
    from qtune.tasks.classify.config import ClassifyConfig
    from qtune.training.run import check_resumed_settings

    saved = ClassifyConfig(model="m", train="t.csv", output=str(tmp_path), labels=["travel", "road", "farm"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(saved), encoding="utf-8")
    check_resumed_settings(ClassifyConfig(model="m", train="t.csv", output=str(tmp_path), resume=True), tmp_path)
    assert "resuming with" not in capsys.readouterr().out  # the labels of last/, as saved
    with pytest.raises(QtuneError, match=r"differ from its config.yaml: --seed 7 \(saved: 42\), --labels farm road "
                                         r"travel \(saved: travel road farm\);"):
        check_resumed_settings(ClassifyConfig(model="m", train="t.csv", output=str(tmp_path), resume=True,
                                              labels=["farm", "road", "travel"], seed=7), tmp_path)
