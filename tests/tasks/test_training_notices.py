"""What `qtune train` says before it trains: rows cut by --max-length (and a refusal when most
are), a run without --eval, reranker groups too short for --group-size. Every task that
truncates is driven through the CLI with the tiny BERT (one word = one token)."""

from __future__ import annotations

import json

import pytest
from support import assert_user_error, run

SHORT = ["cat", "dog", "bus", "car", "cow"]
# 20 words (one token each): over --max-length 8 (16 for the reranker, whose prompt needs more)
LONG = "the big red cat is here now and the old green bus is there with a small goat and cow"


def _pairs_csv(path, long_rows: int, rows: int = 10):
    lines = ["sentence1,sentence2,label"]
    for i in range(rows):
        first = LONG if i < long_rows else SHORT[i % 5]
        lines.append(f"{first},{SHORT[(i + 1) % 5]},{i % 2}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["--train", path]


def _texts_csv(path, long_rows: int, rows: int = 10):
    lines = ["text,label"] + [f"{LONG if i < long_rows else SHORT[i % 5]},{'ab'[i % 2]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["--train", path]


def _groups_jsonl(path, long_rows: int, rows: int = 10, negatives: int = 1):
    """`rows` groups (query, positive, `negatives` negatives); the first `long_rows` have a long query."""
    lines = []
    for i in range(rows):
        query = LONG if i < long_rows else f"q{i}"
        lines.append(json.dumps({"query": query, "pos": [f"p{i}"], "neg": [f"n{i} {k}" for k in range(negatives)]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["--train", path]


# task: (data writer, file name, what a row is, rows, --max-length, extra flags). Embedding counts
# texts (query, positive, negative: 3 per group); the reranker (query, document) pairs (2 per group).
TASKS = {
    "pair-cls": (_pairs_csv, "data.csv", "pairs", 10, 8, []),
    "classify": (_texts_csv, "data.csv", "texts", 10, 8, []),
    "embedding": (_groups_jsonl, "data.jsonl", "texts", 30, 8, ["--hard-negatives", "1", "--min-steps", "0"]),
    "reranker": (_groups_jsonl, "data.jsonl", "pairs", 20, 16, ["--group-size", "2"]),
}


def _train(capsys, tiny_bert_dir, task, data_args, output, *extra, max_length=8):
    return run(capsys, "train", task, "--model", tiny_bert_dir, *data_args, "--output", output,
               "--max-length", max_length, "--epochs", "0.2", "--batch-size", "4", "--device", "cpu", *extra)


@pytest.mark.parametrize("task", list(TASKS))
def test_truncated_rows_are_counted(capsys, tmp_path, tiny_bert_dir, task):
    write, name, unit, total, max_length, extra = TASKS[task]
    data = write(tmp_path / name, 3)
    cut = 6 if task == "reranker" else 3  # the reranker's 3 long queries make 6 long pairs
    code, out, err = _train(capsys, tiny_bert_dir, task, data, tmp_path / "run", *extra, max_length=max_length)
    assert code == 0, err
    assert out.count(f"{cut} of {total} training {unit} ({cut / total:.0%}) are longer than --max-length "
                     f"{max_length} and are truncated") == 1
    assert (tmp_path / "run" / "last").is_dir()


@pytest.mark.parametrize("task", list(TASKS))
def test_most_rows_truncated_is_refused_before_anything_is_written(capsys, tmp_path, tiny_bert_dir, task):
    write, name, unit, total, max_length, extra = TASKS[task]
    long_rows = 6 if task != "embedding" else 10  # embedding: 10 of 30 texts is a third only
    data = write(tmp_path / name, long_rows)
    if task == "embedding":  # make most texts long: long positives too
        rows = [json.loads(line) for line in data[1].read_text(encoding="utf-8").splitlines()]
        for row in rows:
            row["pos"] = [LONG + " " + row["pos"][0]]
        data[1].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cut = {"pair-cls": 6, "classify": 6, "embedding": 20, "reranker": 12}[task]
    code, out, err = _train(capsys, tiny_bert_dir, task, data, tmp_path / "run", *extra, max_length=max_length)
    assert_user_error(code, err, f"{cut} of {total} training {unit} ({cut / total:.0%}) are longer than "
                                 f"--max-length {max_length}", "raise --max-length")
    assert not (tmp_path / "run").exists()


def test_no_eval_says_best_is_the_last_checkpoint(capsys, tmp_path, tiny_bert_dir):
    data = _pairs_csv(tmp_path / "data.csv", 0)
    code, out, err = _train(capsys, tiny_bert_dir, "pair-cls", data, tmp_path / "run")
    assert code == 0, err
    assert out.count("no --eval and no dev split: best/ will be the last checkpoint") == 1
    assert "truncated" not in out  # nothing is cut: nothing is said
    code, out, err = _train(capsys, tiny_bert_dir, "pair-cls", data, tmp_path / "with-eval", "--eval", data[1])
    assert code == 0, err
    assert "no --eval" not in out


def test_reranker_groups_short_of_negatives_are_counted_once(capsys, tmp_path, tiny_bert_dir):
    path = tmp_path / "groups.jsonl"
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i} {k}" for k in range(1 + i % 3)]} for i in range(9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # --group-size 4 needs 3 negatives: groups with 1 or 2 (6 of 9) repeat theirs
    code, out, err = _train(capsys, tiny_bert_dir, "reranker", ["--train", path], tmp_path / "run",
                            "--group-size", "4", max_length=16)
    assert code == 0, err
    assert out.count("6 of 9 training groups have fewer than 3 negatives (--group-size 4)") == 1


def test_truncation_check_counts_and_refuses_past_half(capsys):
    from qtune.errors import QtuneError
    from qtune.training.run import check_truncation

    assert check_truncation([4, 8, 9], 8, "pairs") == 1
    assert capsys.readouterr().out == "1 of 3 training pairs (33%) are longer than --max-length 8 and are truncated\n"
    assert check_truncation([9] * 5 + [1] * 5, 8, "texts") == 5  # half is not most
    assert check_truncation([9] + [1] * 199, 8, "texts") == 1
    assert "1 of 200 training texts (<1%)" in capsys.readouterr().out
    assert check_truncation([1, 8], 8, "pairs") == 0
    assert capsys.readouterr().out == ""
    with pytest.raises(QtuneError, match=r"^6 of 10 training texts \(60%\) are longer than --max-length 8: most "):
        check_truncation([9] * 6 + [1] * 4, 8, "texts")


def test_short_groups_count():
    from qtune.records import QueryGroup
    from qtune.tasks.reranker.groups import short_groups

    groups = [QueryGroup("q", ("p",), ("a",) * k) for k in (0, 1, 2, 3, 4)]
    assert short_groups(groups, group_size=4) == 2  # 1 and 2 negatives; none is left out, not short
    assert short_groups(groups, group_size=2) == 0
