"""`qtune mine`, `qtune eval retrieval/rerank`, `qtune predict` and `qtune extract` under `torchrun`
(2 CPU processes, gloo): the ranks share the model work, and rank 0 writes exactly the files one
process writes; the other rank writes nothing.

One torchrun launch runs every command (`support.launch`'s driver calling `qtune.cli.main` once per
command, so the 2 processes start once), another runs `python -m qtune.cli mine` itself; the one-process
references run here, in-process, on one torch thread (as the launched ranks do). The corpus (7
passages), the queries (5) and the prediction inputs (7 rows) do not split evenly over 2 ranks,
and small batch sizes give each rank several batches (or, with the default sizes, one rank none).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import ANIMALS, VEHICLES, write_lines
from support.launch import launch_env, launcher, run_commands

from qtune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT = 120

PASSAGES = ["the cat is near the car", "a dog is here", "the old horse is near the big red bus now",
            "my cow", "the sheep is near the train", "a small goat is there", "the tiger is near the boat now"]
QUERIES = ["my cat", "the dog", "a horse and a bus", "the sheep", "tiger"]


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS` on CPUs (gloo), one thread per rank."""
    cmd = [*launcher(2), *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(cmd)}\nexit {done.returncode}\n{done.stderr[-6000:]}"
    return done


# ---------------------------------------------------------------- models and data

@pytest.fixture(scope="module")
def heads(tiny_bert_dir, tmp_path_factory) -> dict[str, str]:
    """The tiny BERT with its heads saved (random heads would differ from one load, and rank, to the
    next): a 1-logit cross-encoder (reranker) and a 2-label classifier (pair-cls and classify)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    folders = {}
    for name, labels in (("cross_encoder", 1), ("classifier", 2)):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(labels)
        BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=labels).save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from qtune.data.retrieval import write_beir

    folder = tmp_path_factory.mktemp("data")
    groups = [{"query": q, "pos": [PASSAGES[i]]} for i, q in enumerate(QUERIES)]
    groups[2]["pos"].append("a passage outside the corpus")
    groups[0]["neg"] = [PASSAGES[6]]  # for the triplet margin
    write_lines(folder / "queries.jsonl", *(json.dumps(g) for g in groups))
    write_lines(folder / "corpus.txt", *PASSAGES)
    write_beir(folder / "beir", corpus={f"d{i}": t for i, t in enumerate(PASSAGES)},
               queries={f"q{i}": t for i, t in enumerate(QUERIES)},
               qrels={f"q{i}": {f"d{i}": 1} for i in range(len(QUERIES))})
    pairs = [(f"the {a}", f"a {v} is {'here' if i % 2 else 'near the old red train now'}")
             for i, (a, v) in enumerate(zip(ANIMALS, VEHICLES))][:7]
    write_lines(folder / "pairs.csv", "sentence1,sentence2,label",
                *(f"{a},{b},{i % 2}" for i, (a, b) in enumerate(pairs)))
    write_lines(folder / "texts.csv", "text,label", *(f"{a} {b},{i % 2}" for i, (a, b) in enumerate(pairs)))
    write_lines(folder / "extract.jsonl", *(json.dumps({"input": f"{a} {b}", "output": {"animal": a.split()[-1]}})
                                            for a, b in pairs[:5]))
    return {"queries": folder / "queries.jsonl", "corpus": folder / "corpus.txt", "beir": folder / "beir",
            "pairs": folder / "pairs.csv", "texts": folder / "texts.csv", "extract": folder / "extract.jsonl"}


def commands(out: Path, data: dict, bert: str, qwen: str, heads: dict) -> dict[str, list[str]]:
    """Every command of the check, by name, writing below `out`."""
    mine = ["mine", "--model", bert, "--queries", data["queries"], "--corpus", data["corpus"], "--range-min", "1",
            "--range-max", "4", "--num-negatives", "2", "--max-score", "off", "--margin", "off", "--batch-size", "2",
            "--device", "cpu"]
    argv = {
        "mine": [*mine, "--output", out / "mine.jsonl", "--no-vector-cache"],
        "mine_cached": [*mine, "--output", out / "cached" / "first.jsonl"],  # embeds, writes the cache
        "mine_cached_again": [*mine, "--output", out / "cached" / "again.jsonl"],  # reads it
        "mine_rescored": [*mine, "--output", out / "rescored.jsonl", "--no-vector-cache",
                          "--rescore-with", heads["cross_encoder"]],
        "eval_retrieval": ["eval", "retrieval", "--model", bert, "--compare", qwen, "--data", data["beir"],
                           "--reranker", heads["cross_encoder"], "--triplets", data["queries"], "--dims", "16",
                           "--top-k", "5", "--rerank-top-k", "4", "--batch-size", "2", "--rerank-batch-size", "3",
                           "--output", out / "retrieval", "--device", "cpu"],
        # default batch sizes: one batch, so rank 1 has none
        "eval_rerank": ["eval", "rerank", "--retriever", bert, "--model", heads["cross_encoder"], "--data",
                        data["beir"], "--top-k", "4", "--output", out / "rerank", "--device", "cpu"],
        "predict_pairs": ["predict", "pair-cls", "--model", heads["classifier"], "--input", data["pairs"],
                          "--output", out / "pairs.csv", "--batch-size", "2", "--device", "cpu"],
        "predict_texts": ["predict", "classify", "--model", heads["classifier"], "--input", data["texts"],
                          "--output", out / "texts.jsonl", "--batch-size", "3", "--device", "cpu"],
        "extract": ["extract", "--model", qwen, "--input", data["extract"], "--output", out / "extract.jsonl",
                    "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"],
        # other evaluations (eval classify and eval extract share the helpers of predict classify and extract)
        "eval_pairs": ["eval", "pair-cls", "--model", heads["classifier"], "--data", data["pairs"], "--output",
                       out / "eval-pairs", "--batch-size", "2", "--device", "cpu"],
        "eval_sts": ["eval", "sts", "--model", bert, "--data", data["pairs"], "--output", out / "eval-sts",
                     "--batch-size", "2", "--device", "cpu"],
        "calibrate": ["calibrate", "--model", out / "calibrated", "--data", data["pairs"], "--output",
                      out / "calibration", "--batch-size", "2", "--device", "cpu"],
    }
    return {name: [str(a) for a in args] for name, args in argv.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, tiny_bert_dir, tiny_qwen_dir, heads) -> dict:
    """Every command once under torchrun (2 ranks, one launch) and once in this process."""
    root = tmp_path_factory.mktemp("runs")
    launched, single = root / "launched", root / "single"
    for side in (launched, single):  # `qtune calibrate` writes into the model folder: one copy each
        shutil.copytree(heads["cross_encoder"], side / "calibrated")
    done = run_commands(list(commands(launched, data, tiny_bert_dir, tiny_qwen_dir, heads).values()), launched,
                        tmp_path_factory.mktemp("driver"), timeout=TIMEOUT)
    for name, argv in commands(single, data, tiny_bert_dir, tiny_qwen_dir, heads).items():
        assert main(argv) == 0, name
    return {"launched": launched, "single": single, "writes": done.writes, "stderr": done.stderr}


# ---------------------------------------------------------------- the same files as one process

@pytest.mark.parametrize("name", ["mine.jsonl", "cached/first.jsonl", "cached/again.jsonl", "rescored.jsonl",
                                  "pairs.csv", "texts.jsonl", "extract.jsonl", "retrieval/per_query.jsonl"])
def test_launched_files_are_byte_identical_to_one_process(runs, name):
    launched, single = runs["launched"] / name, runs["single"] / name
    assert launched.read_bytes() == single.read_bytes()
    assert launched.read_bytes().count(b"\n") >= 5


def test_mined_negatives_and_scores_are_there(runs):
    """A control for the byte comparison: the mined files hold negatives and their scores."""
    for name in ("mine.jsonl", "rescored.jsonl"):
        rows = [json.loads(line) for line in (runs["launched"] / name).read_text(encoding="utf-8").splitlines()]
        assert [r["query"] for r in rows] == QUERIES
        assert all(len(r["neg"]) == 2 and len(r["neg_scores"]) == 2 for r in rows)
        assert [len(r["pos_scores"]) for r in rows] == [1, 1, 2, 1, 1]


def test_the_cached_vectors_are_written_once_and_equal_one_processes(runs):
    (cached,) = (runs["launched"] / "cached" / ".qtune-vectors").iterdir()
    (reference,) = (runs["single"] / "cached" / ".qtune-vectors").iterdir()
    assert cached.name == reference.name
    vectors = np.load(cached)
    assert vectors.shape == (len(PASSAGES), 32)
    np.testing.assert_array_equal(vectors, np.load(reference))
    # the second mine read the cache: rank 0 wrote one cache file in all (one temporary name, renamed)
    created = {path for event, path in runs["writes"][0] if event == "open" and ".qtune-vectors" in path}
    assert len(created) == 1 and next(iter(created)).endswith(".tmp"), created


@pytest.mark.parametrize("folder", ["retrieval", "rerank"])
def test_launched_metrics_equal_one_processes(runs, folder):
    launched = json.loads((runs["launched"] / folder / "metrics.json").read_text(encoding="utf-8"))
    single = json.loads((runs["single"] / folder / "metrics.json").read_text(encoding="utf-8"))
    assert_same_numbers(launched, single)
    assert len(launched) == (4 if folder == "retrieval" else 2)  # two models and their reranked runs; two stages
    for name in ("report.md", "retrieval.png"):
        assert (runs["launched"] / folder / name).is_file()


@pytest.mark.parametrize("folder", ["eval-pairs", "eval-sts"])
def test_other_evaluations_equal_one_processes(runs, folder):
    launched = json.loads((runs["launched"] / folder / "metrics.json").read_text(encoding="utf-8"))
    single = json.loads((runs["single"] / folder / "metrics.json").read_text(encoding="utf-8"))
    assert_same_numbers(launched, single)
    assert (runs["launched"] / folder / "report.md").is_file()


def test_calibration_equals_one_processes(runs):
    found = [json.loads((runs[side] / "calibration" / "metrics.json").read_text(encoding="utf-8"))
             for side in ("launched", "single")]
    assert_same_numbers({k: v for k, v in found[0].items() if k != "model"},
                        {k: v for k, v in found[1].items() if k != "model"})
    stored = [json.loads((runs[side] / "calibrated" / "qtune.json").read_text(encoding="utf-8"))["threshold"]
              for side in ("launched", "single")]
    assert stored[0] == stored[1] == found[0]["threshold"]


def assert_same_numbers(a, b, path="metrics"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            assert_same_numbers(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6), path
    else:
        assert a == b, path


def test_triplet_margin_and_matryoshka_are_computed(runs):
    metrics = json.loads((runs["launched"] / "retrieval" / "metrics.json").read_text(encoding="utf-8"))
    first = next(iter(metrics.values()))
    assert isinstance(first["triplet_margin"], float)
    assert set(first["matryoshka"]) == {"32", "16"}


# ---------------------------------------------------------------- only rank 0 writes

def test_rank_one_writes_nothing_and_rank_zero_writes_the_outputs(runs):
    assert set(runs["writes"]) == {0, 1}, runs["stderr"][-3000:]
    assert runs["writes"][1] == []
    written = {path for event, path in runs["writes"][0] if event == "os.rename"}
    for name in ("mine.jsonl", "rescored.jsonl", "pairs.csv", "texts.jsonl", "extract.jsonl",
                 "retrieval/metrics.json", "rerank/metrics.json"):
        assert name in written, sorted(written)


def test_no_temporary_files_are_left(runs):
    files = sorted(p.relative_to(runs["launched"]).as_posix() for p in runs["launched"].rglob("*") if p.is_file())
    reference = sorted(p.relative_to(runs["single"]).as_posix() for p in runs["single"].rglob("*") if p.is_file())
    assert files == reference
    assert not [f for f in files if f.endswith(".tmp")]


def test_python_m_qtune_cli_mine_under_torchrun(data, tiny_bert_dir, tmp_path):
    """`torchrun -m qtune.cli mine` itself: the output and the cache beside it, once each, as one
    process writes them (the driver above calls the same `main`)."""
    argv = ["mine", "--model", tiny_bert_dir, "--queries", data["queries"], "--corpus", data["corpus"],
            "--range-min", "0", "--range-max", "3", "--num-negatives", "3", "--max-score", "off", "--margin", "off",
            "--batch-size", "3", "--device", "cpu"]
    done = torchrun("-m", "qtune.cli", *argv, "--output", tmp_path / "launched" / "mined.jsonl", cwd=tmp_path)
    assert done.stdout.count("wrote ") == 1  # rank 1's standard output is muted
    assert main([str(a) for a in [*argv, "--output", tmp_path / "single" / "mined.jsonl"]]) == 0
    for side in ("launched", "single"):
        files = sorted(p.relative_to(tmp_path / side).as_posix() for p in (tmp_path / side).rglob("*") if p.is_file())
        assert len(files) == 2 and files[1] == "mined.jsonl" and files[0].startswith(".qtune-vectors/corpus-")
    assert (tmp_path / "launched" / "mined.jsonl").read_bytes() == (tmp_path / "single" / "mined.jsonl").read_bytes()
    assert (tmp_path / "launched" / files[0]).read_bytes() == (tmp_path / "single" / files[0]).read_bytes()
