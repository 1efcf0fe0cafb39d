"""`python -m bench`: the listing, the commands each size assembles (printed, never run, apart from
two trivial stand-ins), and the README table written from a small fake results folder."""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks are run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

entry = importlib.import_module("bench.__main__")

SPEED = [b.name for b in entry.BENCHMARKS if not b.quality]
QUALITY = {"quality", "recipe_ablation", "classify_learns", "quickstarts"}


def commands(capsys, *argv: str) -> list[list[str]]:
    assert entry.main([argv[0], "--print-commands", *argv[1:]]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]


def flags(argv: list[str]) -> dict[str, str]:
    """--flag value pairs of a command (a flag given twice: the last one, as argparse reads it)."""
    out = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            out[a] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
    return out


def test_listing_names_every_benchmark_and_keeps_quality_experiments_apart(capsys):
    assert entry.main([]) == 0
    out = capsys.readouterr().out
    speed, quality = out.split("Quality experiments", 1)
    assert {b.name for b in entry.BENCHMARKS if b.quality} == QUALITY
    for name in SPEED:
        assert f"  {name} " in speed
    for name in QUALITY:
        assert f"  {name} " in quality and f"  {name} " not in speed
    assert "shared_cpu" in speed


def test_cpu_suite_uses_the_recorded_cpu_settings(capsys, tmp_path):
    cmds = commands(capsys, "all", "--size", "cpu", "--data-root", str(tmp_path / "data"), "--tokenizer",
                    str(tmp_path / "tok"), "--output-dir", str(tmp_path / "out"))
    modules = [c[2] for c in cmds if c[1] == "-m" and c[2].startswith("bench.")]
    assert modules == ["bench.pair_cls_train", "bench.embedding_speed", "bench.rerank_speed", "bench.extract_speed",
                       "bench.cpu_int8", "bench.serve_load", "bench.adapter_memory", "bench.launcher",
                       "bench.memory_estimate", "bench.shared_cpu"]
    by_module = {c[2]: flags(c) for c in cmds}
    pair = by_module["bench.pair_cls_train"]
    assert pair["--data"] == str(tmp_path / "data" / "afqmc" / "train.csv")
    assert pair["--tokenizer"] == str(tmp_path / "tok")
    assert (pair["--arch"], pair["--batch-size"], pair["--steps"], pair["--warmup"]) == ("small", "32", "25", "3")
    assert "--full-baseline" in pair
    assert pair["--output"] == str(tmp_path / "out" / "pair_cls_train_cpu_small.json")
    assert by_module["bench.rerank_speed"]["--num-pairs"] == "256"
    assert by_module["bench.extract_speed"]["--max-new-tokens"] == "32"
    assert by_module["bench.embedding_speed"]["--train-batch-size"] == "16"
    assert by_module["bench.shared_cpu"]["--output"].endswith("shared_cpu_cpu.json")
    # cpu_int8 reads the BEIR split that the step before it makes
    split = [c for c in cmds if c[2] == "qtune.cli"]
    assert split and by_module["bench.cpu_int8"]["--data"] == str(Path(split[0][-1]) / "test")


def test_gpu_suite_is_what_gpu_suite_sh_ran(capsys, tmp_path):
    cmds = commands(capsys, "all", "--size", "gpu", "--data-root", str(tmp_path), "--tokenizer", str(tmp_path / "t"))
    assert [c[2] for c in cmds] == ["bench.pair_cls_train", "bench.embedding_speed", "bench.rerank_speed",
                                    "bench.extract_speed"]
    for c in cmds:
        f = flags(c)
        assert f["--arch"] == "qwen3-embedding-0.6b" and f["--tokenizer"] == str(tmp_path / "t")
        assert f["--output"].endswith("_gpu.json")
    assert flags(cmds[0])["--batch-size"] == "128" and flags(cmds[3])["--num-records"] == "512"


def test_default_paths_are_relative_to_the_repository_root(capsys):
    (cmd,) = commands(capsys, "launcher")
    assert flags(cmd)["--data"] == "../shared/data/afqmc/train.csv"
    assert flags(cmd)["--output"] == "bench/results/launcher_cpu.json"


def test_extra_arguments_follow_the_preset_so_they_win(capsys):
    (cmd,) = commands(capsys, "pair_cls_train", "--steps", "5", "--", "--warmup", "1")
    assert cmd[-4:] == ["--steps", "5", "--warmup", "1"]
    assert flags(cmd)["--steps"] == "5"
    (cmd,) = commands(capsys, "recipe_ablation", "--data", "x.csv")
    assert cmd[2:] == ["bench.recipe_ablation", "--data", "x.csv"]


def test_refusals():
    with pytest.raises(SystemExit, match="no --size gpu"):
        entry.main(["cpu_int8", "--size", "gpu", "--print-commands"])
    with pytest.raises(SystemExit, match="name it"):
        entry.main(["all", "--steps", "3", "--print-commands"])
    with pytest.raises(SystemExit, match="no benchmark"):
        entry.main(["nope", "--print-commands"])


def test_a_failure_does_not_stop_the_others(monkeypatch, tmp_path, capsys):
    ran = tmp_path / "ran"

    def python(code: str):
        return lambda ctx: [entry.Step([sys.executable, "-c", code])]

    fake = [entry.Benchmark("fails", "x", cpu=python("raise SystemExit(3)")),
            entry.Benchmark("runs", "x", cpu=python(f"open({str(ran)!r}, 'w').close()"))]
    monkeypatch.setattr(entry, "BENCHMARKS", fake)
    monkeypatch.setattr(entry, "BY_NAME", {b.name: b for b in fake})
    assert entry.main(["all", "--output-dir", str(tmp_path / "out")]) == 1
    assert ran.exists()
    out = capsys.readouterr().out
    assert "FAILED fails" in out and "runs                       ok" in out


# --- the report ------------------------------------------------------------------------------------

def fake_results(folder: Path) -> None:
    folder.mkdir()

    def write(name: str, report: dict) -> None:
        (folder / name).write_text(json.dumps(report), encoding="utf-8")

    def pair(samples: float, peak: float | None) -> dict:
        return {"samples_per_s": samples, "peak_gib": peak}

    write("pair_cls_train_cpu_small.json", {
        "benchmark": "pair_cls_train", "arch": "small", "batch_size": 32, "max_length": 64, "device": "AMD EPYC",
        "results": {"qtune (LoRA, packing on: default)": pair(400.0, None),
                    "plain fp32 LoRA, pad to 64": pair(100.0, None)}})
    write("pair_cls_train_gpu.json", {
        "benchmark": "pair_cls_train", "arch": "qwen3-embedding-0.6b", "batch_size": 128, "max_length": 64,
        "device": "NVIDIA H100", "results": {"qtune (LoRA, packing on: default)": pair(3000.0, 5.5),
                                             "plain fp32 LoRA, pad to 64": pair(1000.0, 11.0)}})
    write("shared_cpu_cpu.json", {
        "benchmark": "shared CPU", "busy_processes": 2, "environment": {"processor": "x86_64"},
        "rows": {"encode qtune": {"unit": "texts/s", "quiet": 50.0, "loaded": 25.0, "slowdown loaded": 2.0},
                 "encode peer": {"unit": "texts/s", "quiet": 50.0, "loaded": 12.5, "slowdown loaded": 4.0}}})
    write("quality_financial_qa_cpu.json", {"benchmark": "embedding quality"})  # not a speed benchmark


README = """# qtune

Intro text | with a pipe.

## Benchmarks

Prose before the table.

<!-- bench:table -->
| old | table |
| --- | --- |
<!-- /bench:table -->

Prose after the table.

## Next section
"""


def test_report_writes_the_rows_between_the_markers_only(tmp_path, capsys):
    results, readme = tmp_path / "results", tmp_path / "README.md"
    fake_results(results)
    readme.write_text(README, encoding="utf-8")
    assert entry.main(["report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    before, rest = text.split("<!-- bench:table -->\n", 1)
    block, after = rest.split("<!-- /bench:table -->", 1)
    assert before == README.split("<!-- bench:table -->\n", 1)[0]
    assert after == README.split("<!-- /bench:table -->", 1)[1]
    assert "| old | table |" not in block
    cpu, gpu = block.split("On a GPU", 1)
    assert "| benchmark | qtune | baseline in the same run | ratio |" in cpu
    assert ("| pair-cls training, LoRA, batch 32 (AFQMC) | 400 samples/s | plain fp32 loop padding to 64: 100 "
            "| 4.00x |") in cpu
    assert ("| encoding 512 texts beside 2 busy processes: slowdown loaded / quiet | 2.00x (50 -> 25 texts/s) "
            "| sentence-transformers `encode`: 4.00x (50 -> 12.5) | 2.00x |") in cpu
    assert "peak GPU memory" not in cpu and "quality" not in block
    assert ("| pair-cls training, LoRA, batch 128 (AFQMC), random qwen3-embedding-0.6b | 3000 samples/s "
            "| plain fp32 loop padding to 64: 1000 | 3.00x | 5.50 GiB (baseline 11.00) |") in gpu
    assert "NVIDIA H100: pair_cls_train_gpu" in " ".join(gpu.split())
    capsys.readouterr()
    assert entry.main(["report", "--results", str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("400 samples/s", "401 samples/s"), encoding="utf-8")
    assert entry.main(["report", "--results", str(results), "--readme", str(readme), "--check"]) == 1


def test_report_needs_the_markers(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text("# no table\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="bench:table"):
        entry.main(["report", "--results", str(tmp_path / "results"), "--readme", str(tmp_path / "README.md")])


def test_every_committed_result_has_headline_rows():
    found = entry.collect(entry.RESULTS)
    names = [row["row"] for _, _, row in found["cpu"] + found["gpu"]]
    assert any(n.startswith("pair-cls training") for n in names)
    assert any(n.startswith("decoder reranking") for n in names)


def test_quality_verdicts_count_a_gain_only_above_the_seed_spread():
    quality = importlib.import_module("bench.quality.__main__")

    def row(*values):
        return {"mean ndcg@10": sum(values) / len(values), "spread ndcg@10": max(values) - min(values),
                "seeds": len(values)}

    summary = {"st-1e-4": row(0.820, 0.824), "st-2e-4": row(0.810, 0.812), "qtune": row(0.830, 0.832),
               "qtune-1-epoch": row(0.824, 0.826), "qtune-lr2e-4": row(0.800, 0.802),
               "qtune-hn1-percpos": row(0.835), "st-hn1-1e-4": row(0.833, 0.831),
               "qtune-round2-hn1": row(0.845, 0.847)}
    found = quality.verdicts(summary)
    # the best peer is lr 1e-4 (mean 0.822); +0.009 is above its 0.004 spread, +0.003 is not
    assert found["qtune"].startswith("better than st-1e-4 (the peer's best mean on the same training file): +0.0090")
    assert found["qtune-1-epoch"].startswith("within the seed spread of st-1e-4")
    assert found["qtune-lr2e-4"].startswith("worse than st-1e-4")
    # mined negatives: against the peer given the same negatives (one seed: not judged), and against
    # the in-batch peer; a second round has no peer on its file, only the in-batch one
    assert found["qtune-hn1-percpos"].startswith("not judged (a single seed): against st-hn1-1e-4")
    assert found["qtune-hn1-percpos vs in-batch"].startswith("not judged (a single seed): against st-1e-4")
    assert "qtune-round2-hn1" not in found
    assert found["qtune-round2-hn1 vs in-batch"].startswith("better than st-1e-4 (the peer's best mean on the user's "
                                                            "file, in-batch negatives): +0.0240")
    assert not [k for k in found if k.startswith("st-")]


def test_results_name_the_cpu_model_they_ran_on(tmp_path, monkeypatch):
    """Two machines of one kind can carry different CPUs: every result records the model name."""
    common = importlib.import_module("bench.common")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert common.cpu_model() == "AMD EPYC 9B14"
    assert common.environment()["cpu_model"] == "AMD EPYC 9B14"
    cpuinfo.write_text("processor\t: 0\n")  # no model line (some ARM kernels): None, not an error
    assert common.cpu_model() is None
