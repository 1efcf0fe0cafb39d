"""Data mistakes whose error used to state the symptom only: a ';'-separated CSV, yes/no labels and
three label values given to pair-cls (each error now names the way out), and `data stats`, whose
plot of train.csv was overwritten by the plot of train.jsonl."""

from __future__ import annotations

import json

import pytest
from support import assert_located, assert_user_error, data_error, run, synthetic_pairs, write, write_pairs_csv

from qtune.data.pairs import read_pairs
from qtune.data.stats import PLOT_SOFTWARE
from qtune.plotting import png_text

# --- delimiters ----------------------------------------------------------------------------------


def test_a_semicolon_csv_names_the_delimiter_and_how_to_convert(tmp_path):
    path = write(tmp_path / "pairs.csv", "sentence1;sentence2;label\nthe cat;a dog;1\n")
    err = data_error(read_pairs, path)
    assert_located(err, path, 1, None)
    assert err.reason.startswith("expected 3 CSV fields, found 1; the line holds 2 ';': if the file is "
                                 "';'-separated, convert it to ','")
    assert "has no delimiter option" in err.reason
    assert "delimiter=';'" in err.reason and f"> {tmp_path / 'pairs.comma.csv'}" in err.reason


def test_the_conversion_the_hint_gives_makes_a_file_qtune_reads(tmp_path):
    import csv
    import io

    path = write(tmp_path / "pairs.csv", "sentence1;sentence2;label\nthe cat;a dog, the bus;1\n")
    out = io.StringIO()  # what the suggested one-liner writes
    csv.writer(out).writerows(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), delimiter=";"))
    converted = write(tmp_path / "pairs.comma.csv", out.getvalue())
    [pair] = read_pairs(converted)
    assert (pair.sentence1, pair.sentence2, pair.label) == ("the cat", "a dog, the bus", 1)


def test_a_tab_separated_csv_is_told_to_be_named_tsv(tmp_path):
    path = write(tmp_path / "pairs.csv", "sentence1,sentence2,label\nthe cat\ta dog\t1\n")
    err = data_error(read_pairs, path)
    assert_located(err, path, 2, None)
    assert err.reason == ("expected 3 CSV fields, found 1; the line holds 2 tabs: if the file is tab-separated, "
                          "name it pairs.tsv")


def test_a_short_row_without_another_delimiter_gets_no_guess(tmp_path):
    path = write(tmp_path / "pairs.csv", "sentence1,sentence2,label\nthe cat,1\n")
    assert data_error(read_pairs, path).reason == "expected 3 CSV fields, found 2"


# --- labels --------------------------------------------------------------------------------------


def test_yes_no_labels_suggest_the_labels_flag_negative_first(tmp_path):
    path = write(tmp_path / "pairs.csv", "sentence1,sentence2,label\nthe cat,a dog,yes\nthe cat,a bus,no\n")
    err = data_error(read_pairs, path)
    assert_located(err, path, 2, "label")
    assert err.reason == ("label 'yes' is not one of ['0', '1']; the file's labels are no, yes: pass "
                          "`--labels no yes` (negative first)")


def test_yes_no_labels_where_the_command_has_no_labels_flag_say_how_to_rewrite(tmp_path):
    path = write(tmp_path / "pairs.csv", "sentence1,sentence2,label\nthe cat,a dog,Yes\nthe cat,a bus,No\n")
    err = data_error(read_pairs, path, labels_flag=None)
    assert err.reason.endswith("the file's labels are No, Yes, this command reads the labels 0, 1: "
                               "write No as 0, Yes as 1")
    assert "--labels" not in err.reason


def test_three_label_values_suggest_train_classify(tmp_path):
    path = write(tmp_path / "nli.csv", "sentence1,sentence2,label\na cat,a dog,entailment\na cat,a bus,neutral\n"
                 "a cat,my cat,contradiction\n")
    err = data_error(read_pairs, path)
    assert_located(err, path, 2, "label")
    assert "the file holds 3 label values (contradiction, entailment, neutral)" in err.reason
    assert "`qtune train classify`" in err.reason
    assert "`--labels contradiction entailment neutral`" in err.reason


def test_train_pair_cls_with_yes_no_labels_is_refused_with_the_flag_to_pass(tmp_path, capsys):
    from support import MISSING_MODEL

    train = write(tmp_path / "train.csv", "sentence1,sentence2,label\nthe cat,a dog,yes\nthe cat,a bus,no\n")
    code, _, err = run(capsys, "train", "pair-cls", "--model", MISSING_MODEL, "--train", train,
                       "--output", tmp_path / "out", "--device", "cpu")
    assert_user_error(code, err, f"{train}:2", "`--labels no yes`")
    assert not (tmp_path / "out").exists()


# --- data stats: where the plot goes -------------------------------------------------------------


@pytest.fixture
def pair_files(tmp_path):
    rows = synthetic_pairs(12, seed=3)
    (tmp_path / "in").mkdir()
    csv_file = write_pairs_csv(tmp_path / "in" / "train.csv", rows)
    jsonl_file = write(tmp_path / "in" / "train.jsonl", "".join(
        json.dumps({"sentence1": a, "sentence2": b, "label": y}) + "\n" for a, b, y in rows[:5]))
    return csv_file, jsonl_file


def test_plots_of_train_csv_and_train_jsonl_do_not_overwrite_each_other(pair_files, tiny_bert_dir, tmp_path,
                                                                          capsys, monkeypatch):
    csv_file, jsonl_file = pair_files
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run(capsys, "data", "stats", csv_file, "--model", tiny_bert_dir)
    assert code == 0, err
    assert out.rstrip().splitlines()[-1] == "plot: train.csv.lengths.png"
    code, out, err = run(capsys, "data", "stats", jsonl_file, "--model", tiny_bert_dir)
    assert code == 0, err
    assert out.rstrip().splitlines()[-1] == "plot: train.jsonl.lengths.png"
    assert sorted(p.name for p in work.iterdir()) == ["train.csv.lengths.png", "train.jsonl.lengths.png"]
    for name, data in (("train.csv", csv_file), ("train.jsonl", jsonl_file)):
        text = png_text(work / f"{name}.lengths.png")
        assert text["Software"] == PLOT_SOFTWARE and text["Title"].startswith(f"{data.name}: ")

    # its own earlier plot of the same file is replaced, and the output says so
    code, out, err = run(capsys, "data", "stats", csv_file, "--model", tiny_bert_dir)
    assert code == 0, err
    assert out.rstrip().splitlines()[-1] == "plot: train.csv.lengths.png (replaced the earlier plot of train.csv)"


def test_a_file_qtune_did_not_make_is_not_replaced(pair_files, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    csv_file, _ = pair_files
    monkeypatch.chdir(tmp_path)
    mine = write(tmp_path / "train.csv.lengths.png", b"someone's own picture")
    code, out, err = run(capsys, "data", "stats", csv_file, "--model", tiny_bert_dir)
    assert_user_error(code, err, "train.csv.lengths.png exists and is not a qtune length plot of train.csv",
                      "--output PATH")
    assert mine.read_bytes() == b"someone's own picture"

    # --output picks another file; with --json the JSON stays alone on stdout and stderr names the plot
    code, out, err = run(capsys, "data", "stats", csv_file, "--model", tiny_bert_dir, "--output",
                         tmp_path / "plots" / "csv.png", "--json")
    assert code == 0, err
    assert json.loads(out)["rows"] == 12
    assert err.strip().splitlines()[-1] == f"plot: {tmp_path / 'plots' / 'csv.png'}"
    assert png_text(tmp_path / "plots" / "csv.png")["Software"] == PLOT_SOFTWARE
    assert mine.read_bytes() == b"someone's own picture"

    # a path the user names is theirs to replace, and the output says it was replaced
    code, out, err = run(capsys, "data", "stats", csv_file, "--model", tiny_bert_dir, "--output", mine)
    assert code == 0, err
    assert out.rstrip().splitlines()[-1] == f"plot: {mine} (replaced the file that was there)"
    assert png_text(mine)["Software"] == PLOT_SOFTWARE


def test_the_input_file_is_never_the_plot(pair_files, tiny_bert_dir, capsys):
    csv_file, _ = pair_files
    before = csv_file.read_bytes()
    code, _, err = run(capsys, "data", "stats", csv_file, "--model", tiny_bert_dir, "--output", csv_file)
    assert_user_error(code, err, "is the input file")
    assert csv_file.read_bytes() == before
