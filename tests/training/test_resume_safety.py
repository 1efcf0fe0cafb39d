"""--resume reads last/trainer_state.pt as data only: a crafted file cannot run code. And `qtune.train`
reports an unknown task only for a name that is not one, never for an error inside training."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import qtune.api
from qtune.errors import QtuneError
from qtune.tasks import get
from qtune.tasks.pair_cls.config import PairClsConfig
from qtune.training.trainer import STATE_FILE


def _config(tiny_bert_dir, synthetic_files, output, **overrides) -> PairClsConfig:
    settings = dict(model=tiny_bert_dir, train=str(synthetic_files["train"]), eval=str(synthetic_files["eval"]),
                    output=str(output), epochs=0.1, batch_size=16, max_length=32, device="cpu", eval_steps=2)
    settings.update(overrides)
    return PairClsConfig(**settings)


@pytest.fixture(scope="module")
def stopped_run(tiny_bert_dir, synthetic_files, tmp_path_factory):
    """A short run (with evaluation history) whose last/ a later --resume would read."""
    output = tmp_path_factory.mktemp("run") / "out"
    get("pair-cls").train(_config(tiny_bert_dir, synthetic_files, output))
    return output


class RunsCode:
    """What a crafted state file carries: unpickling it calls os.makedirs (harmless here; any
    function in a real attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def load_trainer_state(path):
    from qtune.training.trainer import load_trainer_state

    return load_trainer_state(path)


def test_the_saved_state_is_plain_data(stopped_run):
    state = torch.load(stopped_run / "last" / STATE_FILE, weights_only=True)
    assert set(state) >= {"optimizer", "scheduler", "progress", "torch_rng"}
    history = state["progress"]["history"]
    assert history and all(type(v) in (int, float, str) for record in history for v in record.values()
                           if not isinstance(v, (list, dict)))
    assert load_trainer_state(stopped_run / "last" / STATE_FILE)["progress"] == state["progress"]


def test_numpy_values_are_saved_as_plain_numbers_and_tensors(tmp_path):
    import numpy as np

    from qtune.training.trainer import plain_state

    state = {"progress": {"history": [{"step": 2, "accuracy": np.float64(0.75), "pairs": np.int64(8)}]},
             "rng": (np.arange(3, dtype=np.uint32), [np.bool_(True)])}
    torch.save(plain_state(state), tmp_path / STATE_FILE)
    back = torch.load(tmp_path / STATE_FILE, weights_only=True)
    record = back["progress"]["history"][0]
    assert record == {"step": 2, "accuracy": 0.75, "pairs": 8}
    assert [type(v) for v in record.values()] == [int, float, int]
    assert back["rng"][0].tolist() == [0, 1, 2] and back["rng"][1] == [True]
    assert isinstance(back["rng"], tuple)


@pytest.mark.parametrize("payload", ["whole file", "inside the state"])
def test_a_state_file_that_would_run_code_is_refused(stopped_run, tmp_path, payload):
    marker = tmp_path / "code-ran"
    path = tmp_path / STATE_FILE
    if payload == "whole file":
        torch.save(RunsCode(marker), path)
    else:
        state = torch.load(stopped_run / "last" / STATE_FILE, weights_only=True)
        state["progress"]["history"].append({"step": 1, "note": RunsCode(marker)})
        torch.save(state, path)
    with pytest.raises(QtuneError) as info:
        load_trainer_state(path)
    assert not marker.exists()
    assert str(info.value).startswith(f"{path}: refused to load")
    assert "--resume" in str(info.value)


def test_resume_from_a_crafted_state_file_runs_no_code(stopped_run, tiny_bert_dir, synthetic_files, tmp_path):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(stopped_run, output)
    marker = tmp_path / "code-ran"
    torch.save(RunsCode(marker), output / "last" / STATE_FILE)
    with pytest.raises(QtuneError, match="refused to load"):
        get("pair-cls").train(_config(tiny_bert_dir, synthetic_files, output, resume=True))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a torch file", pickle.dumps({"progress": 1})[:5]],
                         ids=["empty", "text", "truncated"])
def test_an_unreadable_state_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / STATE_FILE
    path.write_bytes(content)
    with pytest.raises(QtuneError) as info:
        load_trainer_state(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "Traceback" not in str(info.value)


# --- qtune.train and unknown tasks ---------------------------------------------------------------

def test_an_error_inside_training_is_not_reported_as_an_unknown_task(monkeypatch):
    task = get("pair-cls")

    def train(config, on_step=None):
        raise KeyError("input_ids")  # e.g. a feature a collate function expected

    monkeypatch.setattr(task, "train", train)
    with pytest.raises(KeyError, match="input_ids"):
        qtune.api.train("pair-cls", PairClsConfig(model="m", train="t.csv", output="o"))


def test_an_unknown_task_is_reported_as_one():
    with pytest.raises(QtuneError, match="unknown task 'pair_cls'; known: pair-cls"):
        qtune.api.train("pair_cls", PairClsConfig(model="m", train="t.csv", output="o"))
