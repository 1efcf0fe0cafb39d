"""--average-from: a running mean of the trained weights over the last share of the run, scored on
the dev set at the end; best/ becomes the average only when it scores higher (always without a
dev set); last/ and a resumed run keep the trained weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support import run, write_query_groups

from qtune.training import trainer as trainer_module

PARAM = "encoder.layer.0.attention.self.query.weight"


def _weights(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    return next(v for k, v in tensors.items() if k.endswith(PARAM))


@pytest.fixture
def recorded(monkeypatch):
    """The trained weight PARAM after every optimizer step."""
    steps = []
    real = trainer_module.TrainingLoop.optimizer_step

    def recording(self, end_of_epoch):
        real(self, end_of_epoch)
        steps.append(next(p for n, p in self.model.named_parameters() if n.endswith(PARAM)).detach().clone())

    monkeypatch.setattr(trainer_module.TrainingLoop, "optimizer_step", recording)
    return steps


def _train(capsys, model, data, output, *extra):
    return run(capsys, "train", "embedding", "--model", model, "--train", data, "--output", output,
               "--batch-size", "8", "--max-length", "16", "--device", "cpu", "--report-to", "none", "--full",
               "--lr", "1e-3", "--min-steps", "0", *extra)


def test_without_a_dev_set_best_is_the_mean_of_the_last_half(capsys, tmp_path, tiny_bert_dir, recorded):
    data = write_query_groups(tmp_path / "g.jsonl", 40)  # 5 batches of 8 an epoch, no default dev split under 200
    code, out, err = _train(capsys, tiny_bert_dir, data, tmp_path / "run", "--epochs", "2", "--average-from", "0.5")
    assert code == 0, err
    assert len(recorded) == 10
    mean = torch.stack(recorded[5:]).mean(0)  # steps 6..10: after floor(10 x 0.5) steps
    torch.testing.assert_close(_weights(tmp_path / "run" / "best"), mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(_weights(tmp_path / "run" / "last"), recorded[-1])  # last/ keeps the trained weights
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["best"]["average_of_steps"] == [6, 10]
    assert "average_of_steps" not in metrics["last"]


def test_with_a_dev_set_the_average_is_scored_and_chosen_only_when_better(capsys, tmp_path, tiny_bert_dir,
                                                                          recorded):
    data = write_query_groups(tmp_path / "g.jsonl", 60)
    code, out, err = _train(capsys, tiny_bert_dir, data, tmp_path / "run", "--epochs", "3", "--dev-fraction", "0.2",
                            "--average-from", "0.5")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    *steps, average = metrics["history"]
    assert [r["step"] for r in steps] == [6, 12, 18] and average["step"] == 18
    assert average["average_of_steps"] == [10, 18] and "ndcg@10" in average
    line = f"weights averaged over steps 10-18: dev ndcg@10 {average['ndcg@10']:.4f}; "
    assert line in out
    best_step = max(steps, key=lambda r: r["ndcg@10"])  # the first of equals, as the loop keeps it
    best_step = next(r for r in steps if r["ndcg@10"] == best_step["ndcg@10"])
    mean = torch.stack(recorded[9:]).mean(0)
    if average["ndcg@10"] > best_step["ndcg@10"]:
        assert "best/ is the average" in out and metrics["best"] == average
        torch.testing.assert_close(_weights(tmp_path / "run" / "best"), mean, rtol=1e-5, atol=1e-6)
    else:
        assert f"best/ stays step {best_step['step']}'s weights" in out and metrics["best"] == best_step
        assert torch.equal(_weights(tmp_path / "run" / "best"), recorded[best_step["step"] - 1])


def test_a_resumed_run_continues_the_same_average(capsys, tmp_path, tiny_bert_dir, recorded, monkeypatch):
    data = write_query_groups(tmp_path / "g.jsonl", 40)
    whole = tmp_path / "whole"
    code, _, err = _train(capsys, tiny_bert_dir, data, whole, "--epochs", "3", "--average-from", "0.3")
    assert code == 0, err
    # the same run stopped after its first epoch's save (Ctrl-C there), then resumed
    real = trainer_module.TrainingLoop.evaluate_and_save
    calls = []

    def stop_after_first(self):
        record = real(self)
        calls.append(record)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(trainer_module.TrainingLoop, "evaluate_and_save", stop_after_first)
    split = tmp_path / "split"
    code, _, err = _train(capsys, tiny_bert_dir, data, split, "--epochs", "3", "--average-from", "0.3")
    assert code == 130 and "interrupted" in err
    code, _, err = _train(capsys, tiny_bert_dir, data, split, "--epochs", "3", "--average-from", "0.3", "--resume")
    assert code == 0, err
    torch.testing.assert_close(_weights(split / "best"), _weights(whole / "best"), rtol=1e-6, atol=1e-7)

