"""The memory check before the first training step (`qtune.training.memory`): the estimate, the
free memory read from /proc and the cgroup files, the decision (fits / GradCache with mini-batch N /
gradient accumulation / stop), and `qtune train embedding|reranker` acting on it with the free
memory set low."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from qtune.data.retrieval import write_query_groups
from qtune.errors import QtuneError
from qtune.records import QueryGroup
from qtune.training import memory
from qtune.training.memory import (ModelShape, activation_bytes, padded_width, plan_embedding, plan_groups,
                                   step_bytes)

from conftest import ANIMALS, VEHICLES, assert_user_error, run, train_losses

# all-MiniLM-L6-v2 in fp32 on a CPU, no trainable parameters: with every text 128 tokens long one
# row needs 128 x 6 x (32 x 384 + 2 x 1536 + 3.25 x 12 x 128) x 4 = 62,521,344 bytes
MINILM = ModelShape(layers=6, hidden=384, heads=12, intermediate=1536, bytes_per_value=4, attention_scores=True)
ROW_BYTES = 62_521_344
LENGTHS = [128] * 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the estimate


def test_activation_bytes_by_hand():
    shape = ModelShape(layers=2, hidden=4, heads=2, intermediate=8, bytes_per_value=4, attention_scores=True)
    # per token and layer: 32 x 4 + 2 x 8 + 3.25 x 2 heads x 5 tokens = 176.5 values
    assert activation_bytes(shape, rows=3, tokens=5) == 3 * 5 * 2 * 176.5 * 4
    fused = ModelShape(layers=2, hidden=4, heads=2, intermediate=8, bytes_per_value=2, attention_scores=False)
    assert activation_bytes(fused, rows=3, tokens=5) == 3 * 5 * 2 * 144 * 2
    assert activation_bytes(MINILM, rows=1, tokens=128) == ROW_BYTES
    trained = ModelShape(**{**MINILM.__dict__, "trainable_parameters": 1000})
    assert step_bytes(trained, 1, 128) == ROW_BYTES + 12_000  # gradient + AdamW's two moments, fp32


def test_estimate_matches_the_minilm_measurements_it_was_fitted_to():
    """Peak RSS (GiB) of one forward+backward of all-MiniLM-L6-v2 on a 2-core CPU (module docstring)."""
    measured = {(32, 128): 1.85, (64, 128): 3.65, (128, 64): 3.27, (32, 256): 4.34, (64, 256): 8.82,
                (16, 512): 6.22, (8, 512): 3.25}
    for (rows, tokens), gib in measured.items():
        assert activation_bytes(MINILM, rows, tokens) / 2**30 == pytest.approx(gib, rel=0.08)


def test_padded_width_is_the_longest_of_that_many_rows_capped():
    lengths = list(range(1, 101))
    assert padded_width(lengths, rows=1, max_length=512) == 50  # one row: about the median
    assert padded_width(lengths, rows=99, max_length=512) == 99
    assert padded_width(lengths, rows=10_000, max_length=512) == 100
    assert padded_width(lengths, rows=10_000, max_length=64) == 64
    assert padded_width([], rows=8, max_length=64) == 0


# ---------------------------------------------------------------- decisions (hand-set free memory)


def _embedding(free: float, cached: bool = False, mini: int = 32):
    return plan_embedding(MINILM, LENGTHS, groups=64, texts_per_group=9, max_length=256, free=int(free),
                          cached=cached, mini_batch_size=mini)


def test_a_batch_that_fits_keeps_the_flags():
    plan = _embedding(free=600 * ROW_BYTES / 0.7)  # 576 rows fit in 70% of it
    assert (plan.cached, plan.mini_batch_size, plan.note) == (False, 32, None)
    assert plan.needed == 576 * ROW_BYTES


def test_a_batch_that_does_not_fit_switches_to_the_largest_mini_batch_that_does():
    plan = _embedding(free=16e9)  # 70%: 11.2 GB; 128 rows need 8.0 GB, 256 rows 16.0 GB
    assert (plan.cached, plan.mini_batch_size) == (True, 128)
    assert plan.needed == 128 * ROW_BYTES + 576 * 384 * 8  # + the cached vectors and their gradients
    assert plan.note == ("a batch of 64 query groups x 9 texts needs ~36.0 GB, 16.0 GB free: "
                         "using --cached --mini-batch-size 128 (same loss and gradients)")
    assert _embedding(free=4e9).mini_batch_size == 32  # 2.8 GB usable: 32 rows need 2.0 GB, 64 rows 4.0 GB


def test_chosen_cached_mini_batch_is_kept_when_it_fits_and_refused_when_not():
    plan = _embedding(free=16e9, cached=True, mini=64)
    assert (plan.cached, plan.mini_batch_size, plan.note) == (True, 64, None)
    with pytest.raises(QtuneError) as error:
        _embedding(free=16e9, cached=True, mini=256)
    assert str(error.value) == ("a batch of 64 query groups x 9 texts with --cached --mini-batch-size 256 needs "
                                "~16.0 GB, 16.0 GB free: use --mini-batch-size 128 (or --no-memory-check to try "
                                "anyway)")


def test_stops_when_not_even_one_text_fits():
    with pytest.raises(QtuneError) as error:
        _embedding(free=50e6)  # 35 MB usable, one 128-token text needs 62.5 MB
    message = str(error.value)
    assert message.startswith("a batch of 64 query groups x 9 texts needs ~36.0 GB, 50 MB free, and even "
                              "--cached --mini-batch-size 1 needs ~64 MB")
    assert "--max-length" in message and "--no-memory-check" in message


def test_group_batches_split_into_accumulated_parts():
    def plan(free, batch_size=8, grad_accum=1, data_groups=None):
        return plan_groups(MINILM, LENGTHS, batch_size=batch_size, group_size=8, grad_accum=grad_accum,
                           max_length=512, free=int(free), data_groups=data_groups)

    assert (plan(6e9).batch_size, plan(6e9).grad_accum, plan(6e9).note) == (8, 1, None)  # 64 rows: 4.0 GB
    split = plan(4e9)  # 2.8 GB usable: 4 groups (32 rows) need 2.0 GB
    assert (split.batch_size, split.grad_accum) == (4, 2)
    assert split.note == ("a batch of 8 groups x 8 pairs needs ~4.0 GB, 4.0 GB free: using --batch-size 4 "
                          "--grad-accum 2 (the same 8 groups per optimizer step)")
    # 6 groups, already accumulated twice: 3 groups (1.5 GB) fit in 1.54 GB, 6 do not
    assert (plan(2.2e9, batch_size=6, grad_accum=2).batch_size, plan(2.2e9, batch_size=6, grad_accum=2).grad_accum) \
        == (3, 4)
    assert plan(2.2e9, batch_size=64, data_groups=3).batch_size == 64  # the data has 3 groups: a batch holds 3
    with pytest.raises(QtuneError) as error:
        plan(0.5e9)  # 0.35 GB usable, one group of 8 pairs needs 0.5 GB
    assert "even one group needs ~500 MB" in str(error.value) and "--group-size" in str(error.value)


# ---------------------------------------------------------------- free memory


def test_free_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    assert memory._meminfo_available(str(meminfo)) == 20_000_000 * 1024
    assert memory._meminfo_available(str(tmp_path / "none")) is None

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8000000000\n")
    (v2 / "memory.current").write_text("3000000000\n")
    (v2 / "memory.stat").write_text("anon 2000000000\ninactive_file 1000000000\n")
    assert memory._cgroup_room(str(v2)) == 8_000_000_000 - (3_000_000_000 - 1_000_000_000)
    (v2 / "memory.max").write_text("max\n")
    assert memory._cgroup_room(str(v2)) is None

    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    (v1 / "memory.usage_in_bytes").write_text("7000000000\n")
    assert memory._cgroup_room(str(tmp_path / "v1")) is None
    (v1 / "memory.limit_in_bytes").write_text("10000000000\n")
    (v1 / "memory.stat").write_text("cache 5\ntotal_inactive_file 2000000000\n")
    assert memory._cgroup_room(str(tmp_path / "v1")) == 10_000_000_000 - 5_000_000_000
    assert memory._cgroup_room(str(tmp_path / "nothing")) is None


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem-data") / "train.jsonl"
    write_query_groups(path, [QueryGroup(f"my {a}", (f"the {v} is here",), (f"the {w} is there",))
                              for a, v, w in zip(ANIMALS, VEHICLES, VEHICLES[1:] + VEHICLES[:1])])
    return path


def _low_memory(monkeypatch, rows_that_fit: int, tokens: int):
    """Free memory such that `rows_that_fit` rows of `tokens` fit, measured on the model the run loads."""
    original = memory.model_shape
    seen = {}

    def spy(loaded):
        seen["shape"] = original(loaded)
        return seen["shape"]

    monkeypatch.setattr(memory, "model_shape", spy)
    monkeypatch.setattr(memory, "free_memory",
                        lambda device: int(step_bytes(seen["shape"], rows_that_fit, tokens) / memory.USABLE_SHARE))
    return seen


def test_train_embedding_switches_to_cached_when_memory_is_low(still_bert_dir, groups_file, tmp_path, capsys,
                                                               monkeypatch):
    """8 groups x 3 texts do not fit, 3 rows of --max-length tokens do: the run says so, trains with
    GradCache (config.yaml records it) and ends with the plain run's losses."""
    common = ["train", "embedding", "--model", still_bert_dir, "--train", groups_file, "--lr", "5e-3",
              "--epochs", "2", "--batch-size", "8", "--hard-negatives", "1", "--max-length", "16",
              "--lora-dropout", "0", "--logging-steps", "1", "--device", "cpu", "--seed", "3"]
    code, _, err = run(capsys, *common, "--output", tmp_path / "plain", "--no-memory-check")
    assert code == 0, err
    seen = _low_memory(monkeypatch, rows_that_fit=3, tokens=16)
    code, out, err = run(capsys, *common, "--output", tmp_path / "low")
    assert code == 0, err
    assert seen["shape"].layers == 2 and seen["shape"].hidden == 32 and seen["shape"].trainable_parameters > 0
    line = next(line for line in out.splitlines() if "free: using --cached" in line)
    mini = int(line.split("--mini-batch-size ")[1].split()[0])
    assert line.startswith("a batch of 8 query groups x 3 texts needs ~")
    assert 2 <= mini <= 16 and mini & (mini - 1) == 0  # a power of two below the 24 rows of a batch
    config = yaml.safe_load((tmp_path / "low" / "config.yaml").read_text(encoding="utf-8"))
    assert (config["cached"], config["mini_batch_size"], config["memory_check"]) == (True, mini, True)
    losses = train_losses(tmp_path / "low")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    np.testing.assert_allclose(losses, train_losses(tmp_path / "plain"), atol=1e-4)


def test_train_embedding_stops_before_writing_when_nothing_fits(still_bert_dir, groups_file, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 1000)
    args = ["train", "embedding", "--model", still_bert_dir, "--train", groups_file, "--batch-size", "8",
            "--max-length", "16", "--device", "cpu", "--hard-negatives", "1"]
    code, _, err = run(capsys, *args, "--output", tmp_path / "out")
    assert_user_error(code, err, "a batch of 8 query groups x 3 texts needs", "even --cached --mini-batch-size 1",
                      "--no-memory-check")
    assert not (tmp_path / "out" / "config.yaml").exists()
    code, _, err = run(capsys, *args, "--output", tmp_path / "chosen", "--cached", "--mini-batch-size", "4")
    assert_user_error(code, err, "with --cached --mini-batch-size 4 needs", "--no-memory-check")
    assert not (tmp_path / "chosen" / "config.yaml").exists()


def test_train_reranker_accumulates_smaller_batches_when_memory_is_low(still_bert_dir, groups_file, tmp_path,
                                                                       capsys, monkeypatch):
    # every pair is [CLS] my cat [SEP] the car is here [SEP]: 9 tokens; 2 groups of 2 pairs fit, 4 do not
    _low_memory(monkeypatch, rows_that_fit=5, tokens=9)
    code, out, err = run(capsys, "train", "reranker", "--model", still_bert_dir, "--train", groups_file,
                         "--output", tmp_path / "rr", "--batch-size", "4", "--group-size", "2", "--epochs", "1",
                         "--max-length", "32", "--device", "cpu")
    assert code == 0, err
    assert "using --batch-size 2 --grad-accum 2 (the same 4 groups per optimizer step)" in out
    config = yaml.safe_load((tmp_path / "rr" / "config.yaml").read_text(encoding="utf-8"))
    assert (config["batch_size"], config["grad_accum"]) == (2, 2)
    metrics = json.loads((tmp_path / "rr" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == math.ceil(len(ANIMALS) / 4)
