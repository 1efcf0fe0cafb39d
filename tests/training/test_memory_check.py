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
from qtune.tasks.embedding.memory import embedding_bytes, plan_embedding
from qtune.tasks.reranker.memory import plan_groups
from qtune.training.memory import (ModelShape, activation_bytes, optimizer_bytes, padded_width, pass_bytes, pass_size,
                                   step_bytes)

from support import ANIMALS, VEHICLES, assert_user_error, run, train_losses

# all-MiniLM-L6-v2 in fp32 on a CPU, no trainable parameters: with every text 128 tokens long one
# row needs 128 x 6 x (16 x 384 + 2 x 1536 + 3 x 12 x 128) x 4 = 42,467,328 bytes
MINILM = ModelShape(layers=6, hidden=384, heads=12, intermediate=1536, bytes_per_value=4, attention_scores=True)
ROW_BYTES = 42_467_328
LENGTHS = [128] * 100

# The shapes `model_shape` gives for the models bench/memory_estimate.py trains (fp32, CPU): the
# real all-MiniLM-L6-v2 and a random 4-layer Qwen3 (hidden 256), fully fine-tuned or with LoRA
# r=8 on the attention projections.
SHAPES = {
    "minilm full": ModelShape(6, 384, 12, 1536, 4, attention_scores=True, trainable_parameters=22_713_216),
    "minilm lora": ModelShape(6, 384, 12, 1536, 4, attention_scores=True, trainable_parameters=147_456,
                              adapter=True),
    "qwen full": ModelShape(4, 256, 4, 768, 4, attention_scores=False, trainable_parameters=41_975_808,
                            decoder=True, packing=0.1),
    "qwen lora": ModelShape(4, 256, 4, 768, 4, attention_scores=False, trainable_parameters=57_344, decoder=True,
                            adapter=True, packing=0.1),
}
# One training step each (qtune's loss, backward, clipping, AdamW step), measured as peak RSS growth
# in a fresh process on a 2-core CPU (bench/results/memory_estimate_cpu.json): (model, its
# (rows, width, tokens) query pass and passage pass; tokens < rows x width where the pass was
# packed), measured bytes.
MEASURED = [
    ("minilm full", ((64, 20, 1280), (64, 255, 16320)), 8_001_531_904),  # minilm:full:64:20:256
    ("minilm full", ((32, 20, 640), (32, 255, 8160)), 3_977_089_024),  # minilm:full:32:20:256
    ("minilm full", ((128, 32, 4096), (128, 128, 16384)), 6_587_432_960),  # minilm:full:128:32:128
    ("minilm full", ((64, 64, 4096), (64, 64, 4096)), 2_561_728_512),  # minilm:full:64:64:64
    ("minilm full", ((512, 16, 8192), (512, 32, 16384)), 5_654_208_512),  # minilm:full:512:16:32
    ("minilm full", ((8, 32, 256), (8, 506, 4048)), 2_943_840_256),  # minilm:full:8:32:512
    ("minilm full", ((16, 32, 512), (16, 506, 8096)), 5_762_191_360),  # minilm:full:16:32:512
    ("minilm full", ((32, 20, 640), (64, 255, 16320)), 7_631_757_312),  # minilm:full:32:20:256:1
    ("minilm lora", ((64, 20, 1280), (64, 255, 16320)), 9_938_456_576),  # minilm:lora:64:20:256
    ("minilm lora", ((128, 32, 4096), (128, 128, 16384)), 9_337_151_488),  # minilm:lora:128:32:128
    ("minilm lora", ((16, 32, 512), (16, 506, 8096)), 6_789_808_128),  # minilm:lora:16:32:512
    ("qwen full", ((64, 40, 2245), (64, 255, 14160)), 2_451_505_152),  # qwen:full:64:40:256
    ("qwen full", ((128, 40, 4524), (128, 128, 14137)), 2_679_607_296),  # qwen:full:128:40:128
    ("qwen full", ((32, 40, 1122), (32, 510, 14332)), 2_332_123_136),  # qwen:full:32:40:512
    ("qwen full", ((64, 40, 2245), (128, 256, 28391)), 4_432_785_408),  # qwen:full:64:40:256:1
    ("qwen full", ((64, 64, 4096), (64, 64, 4096)), 2_019_172_352),  # qwen:full:64:64:64:0:0
    ("qwen full", ((32, 256, 8192), (32, 256, 8192)), 2_302_132_224),  # qwen:full:32:256:256:0:0
    ("qwen lora", ((64, 40, 2245), (64, 255, 14160)), 2_953_998_336),  # qwen:lora:64:40:256
    ("qwen lora", ((32, 40, 1122), (32, 510, 14332)), 2_787_819_520),  # qwen:lora:32:40:512
    ("qwen lora", ((64, 64, 4096), (64, 64, 4096)), 1_354_317_824),  # qwen:lora:64:64:64:0:0
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the estimate


def test_activation_bytes_by_hand():
    shape = ModelShape(layers=2, hidden=4, heads=2, intermediate=8, bytes_per_value=4, attention_scores=True)
    # per layer: 15 tokens x (16 x 4 + 2 x 8) + 3 x 2 heads x 3 rows x 5² = 1650 values
    assert activation_bytes(shape, rows=3, width=5) == 1650 * 2 * 4
    assert activation_bytes(shape, rows=3, width=5, tokens=10) == (10 * 80 + 450) * 2 * 4  # packed: real tokens
    decoder = ModelShape(layers=2, hidden=4, heads=2, intermediate=8, bytes_per_value=2, attention_scores=False,
                         decoder=True)
    assert activation_bytes(decoder, rows=3, width=5) == 15 * (20 * 4 + 3 * 8) * 2 * 2  # no scores kept
    lora = ModelShape(**{**shape.__dict__, "adapter": True})
    assert activation_bytes(lora, rows=3, width=5) == int(1650 * 2 * 4 * 1.3)
    assert activation_bytes(MINILM, rows=1, width=128) == ROW_BYTES
    trained = ModelShape(**{**MINILM.__dict__, "trainable_parameters": 1000})
    assert step_bytes(trained, 1, 128) == ROW_BYTES + 16_000  # gradient, AdamW's moments, its update's temporary


@pytest.mark.parametrize("model,passes,measured", MEASURED, ids=[f"{m} {p}" for m, p, _ in MEASURED])
def test_estimate_is_within_25_percent_of_the_measured_step(model, passes, measured):
    shape = SHAPES[model]
    estimate = optimizer_bytes(shape) + sum(activation_bytes(shape, rows, width, tokens)
                                            for rows, width, tokens in passes)
    assert estimate / measured == pytest.approx(1, abs=0.25)


def test_padded_width_is_the_longest_text_capped():
    """Every text is in some batch each epoch: the widest pass is as wide as the longest text."""
    lengths = list(range(1, 101))
    assert padded_width(lengths, max_length=512) == 100
    assert padded_width(lengths, max_length=64) == 64
    assert padded_width([], max_length=64) == 0


def test_a_packing_model_counts_real_tokens_where_it_would_pack():
    spread = [50, 100] * 25  # mean 75, standard deviation 25: padded to 100, a batch is ~25% padding
    assert pass_size(MINILM, spread, rows=64, max_length=512) == (100, 6400)  # an encoder never packs
    packer = ModelShape(**{**MINILM.__dict__, "packing": 0.1})
    # the largest of an epoch's 64-row batches: 64 x 75 + 3 x 25 x 8 real tokens, 16% padding: packed
    assert pass_size(packer, spread, rows=64, max_length=512) == (100, 5400)
    assert pass_size(packer, [100] * 50, rows=64, max_length=512) == (100, 6400)  # no padding: padded
    # cut to 60: 64 x 55 + 3 x 5 x 8 = 3640 real tokens, 5% padding: padded
    assert pass_size(packer, spread, rows=64, max_length=60) == (60, 64 * 60)


def test_a_packed_cpu_pass_counts_attention_scores_within_its_length_buckets():
    """Packed on the CPU, attention pads only within length buckets: the score cells are about the
    sum of squared lengths (the longest text's plus the drawn rows', with the buckets' slack), not
    rows x width^2; an unpacked pass keeps the padded count."""
    from qtune.modeling.packing import BUCKET_SLACK
    from qtune.training.memory import score_area

    spread = [20, 200] * 25  # squares 400 and 40000: mean 20200, standard deviation 19800
    assert score_area(MINILM, spread, rows=64, max_length=512) == 64 * 200 * 200  # never packs
    packer = ModelShape(**{**MINILM.__dict__, "packing": 0.1})
    expected = math.ceil(BUCKET_SLACK * (200 * 200 + 63 * 20200 + 3 * 19800 * math.sqrt(63)))
    assert score_area(packer, spread, rows=64, max_length=512) == expected < 64 * 200 * 200
    assert score_area(packer, [100] * 50, rows=64, max_length=512) == 64 * 100 * 100  # padded: no buckets
    width, tokens = pass_size(packer, spread, rows=64, max_length=512)
    assert pass_bytes(packer, spread, 64, 512) == activation_bytes(packer, 64, width, tokens, area=expected)
    assert activation_bytes(packer, 64, width, tokens, area=expected) < activation_bytes(packer, 64, width, tokens)


def test_an_embedding_batch_is_a_query_pass_and_a_passage_pass():
    """Queries and passages are collated and embedded apart, each padded to its own longest row;
    GradCache holds one chunk of one side at a time, plus every vector and its gradient."""
    shape = SHAPES["minilm full"]
    queries, passages = [20] * 100, [256] * 300
    plain = embedding_bytes(shape, queries, passages, groups=64, texts_per_group=3, max_length=512)
    assert plain == (optimizer_bytes(shape) + activation_bytes(shape, 64, 20)  # 64 queries
                     + activation_bytes(shape, 128, 256))  # 64 positives + 64 hard negatives
    cached = embedding_bytes(shape, queries, passages, groups=64, texts_per_group=3, max_length=512,
                             mini_batch_size=32)
    assert cached == optimizer_bytes(shape) + activation_bytes(shape, 32, 256) + 192 * 384 * 4 * 2


def test_long_passages_with_short_queries_train_without_gradcache():
    """64 query groups of a ~20-token query and a 256-token passage, all-MiniLM-L6-v2 fully fine-tuned,
    21.4 GB free: the plain batch (measured 8.0 GB) fits, so GradCache, which embeds every text
    twice, is not chosen; padding the queries to the passages' width would count 128 x 256 tokens."""
    queries = [14 + i % 11 for i in range(2000)]  # 14 to 24 tokens
    passages = [200 + i % 120 for i in range(2000)]  # 200 to 319, cut to 256
    plan = plan_embedding(SHAPES["minilm full"], queries, passages, groups=64, texts_per_group=2, max_length=256,
                          free=int(21.4e9), cached=False, mini_batch_size=32)
    assert (plan.cached, plan.mini_batch_size, plan.note) == (False, 32, None)
    measured = next(m for model, passes, m in MEASURED if model == "minilm full" and passes[0][:2] == (64, 20))
    assert plan.needed / measured == pytest.approx(1, abs=0.25)


# ---------------------------------------------------------------- decisions (hand-set free memory)


def _embedding(free: float, cached: bool = False, mini: int = 32):
    # 64 queries and 512 passages (8 per group), every text 128 tokens: 576 rows
    return plan_embedding(MINILM, LENGTHS, LENGTHS, groups=64, texts_per_group=9, max_length=256, free=int(free),
                          cached=cached, mini_batch_size=mini)


def test_a_batch_that_fits_keeps_the_flags():
    plan = _embedding(free=600 * ROW_BYTES / 0.7)  # 576 rows fit in 70% of it
    assert (plan.cached, plan.mini_batch_size, plan.note) == (False, 32, None)
    assert plan.needed == 576 * ROW_BYTES


def test_a_batch_that_does_not_fit_switches_to_the_largest_mini_batch_that_does():
    plan = _embedding(free=16e9)  # 70%: 11.2 GB; 256 rows need 10.9 GB, 512 rows 21.7 GB
    assert (plan.cached, plan.mini_batch_size) == (True, 256)
    assert plan.needed == 256 * ROW_BYTES + 576 * 384 * 8  # + the cached vectors and their gradients
    assert plan.note == ("a batch of 64 query groups x 9 texts needs ~24.5 GB, 16.0 GB free: "
                         "using --cached --mini-batch-size 256 (same loss and gradients)")
    assert _embedding(free=3e9).mini_batch_size == 32  # 2.1 GB usable: 32 rows need 1.4 GB, 64 rows 2.7 GB


def test_chosen_cached_mini_batch_is_kept_when_it_fits_and_refused_when_not():
    plan = _embedding(free=16e9, cached=True, mini=64)
    assert (plan.cached, plan.mini_batch_size, plan.note) == (True, 64, None)
    with pytest.raises(QtuneError) as error:
        _embedding(free=16e9, cached=True, mini=512)
    assert str(error.value) == ("a batch of 64 query groups x 9 texts with --cached --mini-batch-size 512 needs "
                                "~21.7 GB, 16.0 GB free: use --mini-batch-size 256 (or --no-memory-check to try "
                                "anyway)")


def test_stops_when_not_even_one_text_fits():
    with pytest.raises(QtuneError) as error:
        _embedding(free=50e6)  # 35 MB usable, one 128-token text needs 42.5 MB
    message = str(error.value)
    assert message.startswith("a batch of 64 query groups x 9 texts needs ~24.5 GB, 50 MB free, and even "
                              "--cached --mini-batch-size 1 needs ~44 MB")
    assert "--max-length" in message and "--no-memory-check" in message


def test_group_batches_split_into_accumulated_parts():
    def plan(free, batch_size=8, grad_accum=1, data_groups=None):
        return plan_groups(MINILM, LENGTHS, batch_size=batch_size, group_size=8, grad_accum=grad_accum,
                           max_length=512, free=int(free), data_groups=data_groups)

    assert (plan(4e9).batch_size, plan(4e9).grad_accum, plan(4e9).note) == (8, 1, None)  # 64 rows: 2.7 GB
    split = plan(3e9)  # 2.1 GB usable: 4 groups (32 rows) need 1.4 GB
    assert (split.batch_size, split.grad_accum) == (4, 2)
    assert split.note == ("a batch of 8 groups x 8 pairs needs ~2.7 GB, 3.0 GB free: using --batch-size 4 "
                          "--grad-accum 2 (the same 8 groups per optimizer step)")
    # 6 groups, already accumulated twice: 3 groups (1.0 GB) fit in 1.54 GB, 6 do not
    assert (plan(2.2e9, batch_size=6, grad_accum=2).batch_size, plan(2.2e9, batch_size=6, grad_accum=2).grad_accum) \
        == (3, 4)
    assert plan(2.2e9, batch_size=64, data_groups=3).batch_size == 64  # the data has 3 groups: a batch holds 3
    with pytest.raises(QtuneError) as error:
        plan(0.4e9)  # 0.28 GB usable, one group of 8 pairs needs 0.34 GB
    assert "even one group needs ~340 MB" in str(error.value) and "--group-size" in str(error.value)


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
              "--epochs", "2", "--min-steps", "0", "--batch-size", "8", "--hard-negatives", "1",
              "--max-length", "16", "--lora-dropout", "0", "--logging-steps", "1", "--device", "cpu", "--seed", "3"]
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
