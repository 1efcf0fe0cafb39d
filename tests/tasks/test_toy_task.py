"""The Task contract, checked: a task written outside qtune (tests/toy_task.py) and registered, no
qtune file touched, gets `qtune train`, `qtune eval`, `qtune.load`, a `qtune serve` flag and its
endpoint, and 2-process evaluation under torchrun with the numbers of one process.

In this process the task is added to the registry by the fixture; the launched processes find it
as a user's would, through QTUNE_TASKS (the entry-point group "qtune.tasks" is read the same way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import run
from support.launch import launch_env, launcher

import qtune
from qtune.serving import ServerSettings
from qtune.serving.app import create_app
from qtune.tasks import TASKS

TESTS = Path(__file__).resolve().parents[1]
ROWS = [("a good day", "pos"), ("bad news again", "neg"), ("good good fine", "pos"), ("so bad", "neg"),
        ("really good and kind", "pos"), ("bad and sad and worse", "neg"), ("fine", "pos")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tiny_bert_dir, tmp_path_factory):
    """The toy task registered, a labelled file and a run trained on it."""
    import toy_task

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(TASKS, "toy", toy_task.ToyTask())
    work = tmp_path_factory.mktemp("toy")
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS), encoding="utf-8")
    from qtune.cli import main

    code = main(["train", "toy", "--model", tiny_bert_dir, "--train", str(data), "--output", str(work / "run"),
                 "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--max-length", "16", "--device", "cpu",
                 "--report-to", "none"])
    assert code == 0
    yield {"data": data, "run": work / "run", "work": work}
    monkeypatch.undo()


def test_train_writes_a_run_of_the_toy_task(toy):
    meta = json.loads((toy["run"] / "best" / "qtune.json").read_text(encoding="utf-8"))
    assert meta["task"] == "toy" and meta["labels"] == ["neg", "pos"]
    metrics = json.loads((toy["run"] / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 4  # 7 rows, batch 4: 2 steps an epoch, 2 epochs
    import toy_task  # its declared memory planner saw the 7 rows as tokenized ("bad and sad and worse": 7 tokens)

    assert toy_task.PLANNED == [(7, 7, 4)]


def test_eval_and_load_give_the_same_scores(toy, capsys):
    code, out, err = run(capsys, "eval", "toy", "--model", str(toy["run"] / "best"), "--data", str(toy["data"]),
                         "--output", str(toy["work"] / "eval-1"), "--device", "cpu", "--batch-size", "3")
    assert code == 0, err
    assert "accuracy" in out
    written = json.loads((toy["work"] / "eval-1" / "metrics.json").read_text(encoding="utf-8"))
    scorer = qtune.load(toy["run"] / "best")
    assert type(scorer).__name__ == "ToyScorer"
    scores = scorer.scores([t for t, _ in ROWS])
    np.testing.assert_allclose(written["scores"], scores, atol=1e-6)
    assert written["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == np.array([y == "pos" for _, y in ROWS])))


def test_served_under_its_own_flag_and_path(toy, served, capsys):
    from fastapi.testclient import TestClient

    code, _, err = run(capsys, "serve", "--toy-scorer", f"polarity={toy['run'] / 'best'}", "--device", "cpu")
    assert code == 0, err
    models = served["models"]
    assert list(models) == ["polarity"]
    texts = [t for t, _ in ROWS[:3]]
    with TestClient(create_app(models, ServerSettings())) as client:
        answer = client.post("/v1/toy", json={"input": texts, "model": "polarity"})
        assert answer.status_code == 200, answer.text
        listed = client.get("/v1/models").json()
    got = [row["score"] for row in answer.json()["data"]]
    np.testing.assert_allclose(got, models["polarity"].scores(texts), atol=1e-6)
    assert [m["id"] for m in listed["data"]] == ["polarity"]


def test_two_process_eval_equals_one_process(toy):
    """`qtune eval toy` under torchrun (2 CPU processes): the task comes from QTUNE_TASKS there."""
    out = toy["work"] / "eval-2"
    env = launch_env()
    env.update(QTUNE_TASKS="toy_task:ToyTask", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    cmd = [*launcher(2), "-m", "qtune.cli", "eval", "toy", "--model", str(toy["run"] / "best"), "--data",
           str(toy["data"]), "--output", str(out), "--device", "cpu", "--batch-size", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    one = toy["work"] / "eval-1" / "metrics.json"
    if not one.exists():  # this test alone: the one-process run first
        from qtune.cli import main

        assert main(["eval", "toy", "--model", str(toy["run"] / "best"), "--data", str(toy["data"]), "--output",
                     str(one.parent), "--device", "cpu", "--batch-size", "3"]) == 0
    assert (out / "metrics.json").read_bytes() == one.read_bytes()


def test_a_task_that_cannot_be_loaded_is_named():
    env = {**os.environ, "QTUNE_TASKS": "toy_task:NoSuchTask", "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-c", "import qtune.tasks"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "qtune task 'toy_task:NoSuchTask'" in done.stderr and "cannot be loaded" in done.stderr


def test_its_server_setting_is_a_serve_flag_and_a_server_setting():
    """A task's own server settings join ServerSettings and `qtune serve`'s flags (in a process where
    the task is registered before qtune.serving is imported, as with an installed package)."""
    env = {**os.environ, "QTUNE_TASKS": "toy_task:ToyTask", "PYTHONPATH": str(TESTS)}
    code = ("from qtune.cli import build_parser\n"
            "from qtune.serving import ServerSettings\n"
            "args = build_parser().parse_args(['serve', '--toy-scorer', 'x', '--toy-max-texts', '3'])\n"
            "print(args.toy_max_texts, ServerSettings().toy_max_texts, ServerSettings(toy_max_texts=5).toy_max_texts)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3", "64", "5"]
