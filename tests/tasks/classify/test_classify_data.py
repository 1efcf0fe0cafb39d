"""classify: reading text files, the text encoder and the settings. Every bad row is refused with
file:line:field before any model loads, and nothing is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from classify_helpers import synthetic_texts, write_csv, write_jsonl
from support import (MISSING_MODEL, assert_data_accepted_up_to_the_model, assert_located,
                     assert_refused_before_the_model_loads, assert_user_error, data_error, run, write_lines)
from qtune.errors import DataError
from qtune.tasks.classify.data import TextExample, read_labelled, read_texts


# ---------------------------------------------------------------- reading

def test_labels_default_to_the_sorted_set_found_in_the_file(tmp_path):
    path = write_lines(tmp_path / "t.csv", "text,label", "a cow,farm", "my bus, road", "the tram,travel", "a goat,farm")
    examples, labels = read_labelled(path)
    assert labels == ["farm", "road", "travel"]  # labels are stripped, then sorted
    assert examples == [TextExample("a cow", 0, 2), TextExample("my bus", 1, 3), TextExample("the tram", 2, 4),
                        TextExample("a goat", 0, 5)]


def test_given_labels_are_the_class_order(tmp_path):
    path = write_lines(tmp_path / "t.csv", "text,label", "a cow,farm", "my bus,road", "the tram,travel")
    examples, labels = read_labelled(path, labels=["travel", "road", "farm", "unused"])
    assert labels == ["travel", "road", "farm", "unused"]
    assert [e.label for e in examples] == [2, 1, 0]


def test_jsonl_integer_labels_other_columns_tsv_and_headerless_csv(tmp_path):
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"utterance": "我的包裹在哪里", "intent": 2, "id": 7},
                                               {"utterance": "cancel it", "intent": 10}, {"utterance": "hi", "intent": 2}])
    examples, labels = read_labelled(jsonl, text_column="utterance", label_column="intent")
    assert labels == ["10", "2"]  # integers are read as their text
    assert examples == [TextExample("我的包裹在哪里", 1, 1), TextExample("cancel it", 0, 2), TextExample("hi", 1, 3)]
    tsv = write_lines(tmp_path / "t.tsv", "label\ttext", "road\ta, big bus", "farm\tcow")
    assert read_labelled(tsv) == ([TextExample("a, big bus", 1, 2), TextExample("cow", 0, 3)], ["farm", "road"])
    headerless = write_lines(tmp_path / "h.csv", "a cow,farm", "my bus,road")  # columns by position: text, label
    assert read_labelled(headerless) == ([TextExample("a cow", 0, 1), TextExample("my bus", 1, 2)], ["farm", "road"])


def test_unlabelled_reading_keeps_every_field_and_ignores_labels(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "a cow", "label": 1.5}, {"text": "my bus", "x": None}])
    rows, names, examples = read_texts(path)
    assert names == ["id", "text", "label", "x"]
    assert [r.fields for r in rows] == [{"id": 1, "text": "a cow", "label": 1.5}, {"text": "my bus", "x": None}]
    assert examples == [TextExample("a cow", None, 1), TextExample("my bus", None, 2)]


BAD_ROWS = {
    "empty text": ("t.csv", "text,label\na cow,farm\n  ,road\n", {}, 3, "text", "empty text"),
    "missing text column": ("t.jsonl", '{"text": "a cow", "label": "farm"}\n{"label": "road"}\n', {}, 2, "text",
                            "missing column"),
    "text that is not text": ("t.jsonl", '{"text": "a cow", "label": "farm"}\n{"text": 5, "label": "road"}\n', {},
                              2, "text", "expected text, got int"),
    "missing label column": ("t.jsonl", '{"text": "a cow", "label": "farm"}\n\n{"text": "my bus"}\n', {}, 3,
                             "label", "missing column"),
    "label outside the given set": ("t.csv", "text,label\na cow,farm\nmy bus,road\nthe tram,travel\n",
                                    {"labels": ["farm", "road"]}, 4, "label",
                                    "label 'travel' is not one of ['farm', 'road']"),
    "float label": ("t.jsonl", '{"text": "a cow", "label": "farm"}\n{"text": "my bus", "label": 1.5}\n', {}, 2,
                    "label", "label must be text or an integer, got 1.5"),
    "boolean label": ("t.jsonl", '{"text": "a cow", "label": true}\n', {"labels": ["True", "False"]}, 1, "label",
                      "label must be text or an integer, got True"),
    "list label": ("t.jsonl", '{"text": "a cow", "label": ["farm"]}\n', {}, 1, "label",
                   "label must be text or an integer"),
    "empty label": ("t.tsv", "text\tlabel\na cow\tfarm\nmy bus\t \n", {}, 3, "label", "empty label"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_every_bad_row_is_located_by_file_line_and_field(case, tmp_path):
    name, content, kwargs, line, field, message = BAD_ROWS[case]
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    err = data_error(read_labelled, path, **kwargs)
    assert_located(err, path, line, field)
    assert message in err.reason


def test_the_first_bad_row_is_the_one_reported(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a cow", "label": "farm"}, {"text": " ", "label": "road"},
                                              {"text": "my bus", "label": 2.5}])
    assert_located(data_error(read_labelled, path), path, 2, "text")


def test_a_file_with_one_label_or_bad_given_labels_is_refused(tmp_path):
    path = write_lines(tmp_path / "t.csv", "text,label", "a cow,farm", "a goat,farm")
    err = data_error(read_labelled, path)
    assert_located(err, path, None, "label")
    assert "at least two labels" in err.reason and "['farm']" in err.reason
    with pytest.raises(DataError, match="labels repeated: \\['farm'\\]"):
        read_labelled(path, labels=["farm", "road", "farm"])
    with pytest.raises(DataError, match="at least two labels"):
        read_labelled(path, labels=["farm"])


# ---------------------------------------------------------------- the CLI checks data before the model

def _train_file(tmp_path):
    return write_csv(tmp_path / "train.csv", synthetic_texts(12, seed=1))


def test_good_data_gets_as_far_as_the_model(tmp_path, capsys):
    train = _train_file(tmp_path)
    evalfile = write_csv(tmp_path / "eval.csv", synthetic_texts(6, seed=2))
    assert_data_accepted_up_to_the_model(capsys, "classify", ["--train", train, "--eval", evalfile],
                                         tmp_path / "out")


def test_train_refuses_a_bad_training_row_before_the_model_loads(tmp_path, capsys):
    train = write_lines(tmp_path / "train.csv", "text,label", "a cow,farm", "my bus,road", ",road")
    assert_refused_before_the_model_loads(capsys, "classify", ["--train", train], tmp_path / "out",
                                          f"{train}:4", "field 'text'", "empty text")


def test_train_refuses_an_eval_label_the_training_file_lacks(tmp_path, capsys):
    train = _train_file(tmp_path)
    evalfile = write_lines(tmp_path / "eval.csv", "text,label", "a cow,farm", "a boat,sea")
    assert_refused_before_the_model_loads(capsys, "classify", ["--train", train, "--eval", evalfile],
                                          tmp_path / "out", f"{evalfile}:3", "field 'label'",
                                          "label 'sea' is not one of ['farm', 'road', 'travel']")


def test_train_refuses_a_label_outside_the_given_labels(tmp_path, capsys):
    train = _train_file(tmp_path)
    assert_refused_before_the_model_loads(capsys, "classify", ["--train", train, "--labels", "farm", "road"],
                                          tmp_path / "out", f"{train}:", "field 'label'", "'travel' is not one of")


def test_eval_and_predict_refuse_bad_rows_before_the_model_loads(tmp_path, capsys):
    data = write_lines(tmp_path / "data.jsonl", '{"text": "a cow", "label": "farm"}', '{"text": "", "label": "road"}')
    report = tmp_path / "report"
    code, _, err = run(capsys, "eval", "classify", "--model", MISSING_MODEL, "--data", data, "--output", report,
                       "--device", "cpu")
    assert_user_error(code, err, f"{data}:2", "field 'text'", "empty text")
    output = tmp_path / "preds" / "out.csv"
    code, _, err = run(capsys, "predict", "classify", "--model", MISSING_MODEL, "--input", data, "--output", output,
                       "--device", "cpu")
    assert_user_error(code, err, f"{data}:2", "field 'text'", "empty text")
    assert MISSING_MODEL not in err
    code, _, err = run(capsys, "predict", "classify", "--model", MISSING_MODEL, "--input", data,
                       "--output", tmp_path / "out.xlsx")
    assert_user_error(code, err, "unsupported file type '.xlsx'")
    assert not report.exists() and not output.parent.exists() and not (tmp_path / "out.xlsx").exists()


# ---------------------------------------------------------------- encoding

def test_encoders_use_the_tokenizer_template_and_truncate(tiny_bert_dir):
    from qtune.modeling.loading import load_tokenizer_only
    from qtune.tasks.classify.encode import TextEncoder

    tok, family = load_tokenizer_only(tiny_bert_dir)
    assert not family.is_decoder
    ids = TextEncoder(tok, False, 16).encode("the big cow")
    assert tok.convert_ids_to_tokens(ids["input_ids"]) == ["[CLS]", "the", "big", "cow", "[SEP]"]
    assert ids["token_type_ids"] == [0] * 5 and ids["attention_mask"] == [1] * 5
    cut = TextEncoder(tok, False, 8).encode("cow " * 20)["input_ids"]
    assert len(cut) == 8 and cut[-1] == tok.sep_token_id
    assert len(TextEncoder(tok, False, None).encode("cow " * 100)["input_ids"]) == 102  # None: nothing cut


def test_decoder_texts_end_with_eos_which_truncation_never_cuts(tiny_qwen_dir):
    from qtune.modeling.loading import load_tokenizer_only
    from qtune.tasks.classify.data import TextExample
    from qtune.tasks.classify.encode import TextEncoder

    tok, family = load_tokenizer_only(tiny_qwen_dir)
    assert family.is_decoder and tok.padding_side == "left"
    ids = TextEncoder(tok, True, 64).encode("我的包裹在哪里")["input_ids"]
    assert ids[-1] == tok.eos_token_id != tok.pad_token_id
    assert tok.decode(ids) == "我的包裹在哪里" + tok.eos_token
    cut = TextEncoder(tok, True, 8).encode("cow " * 40)["input_ids"]
    assert len(cut) == 8 and cut[-1] == tok.eos_token_id
    assert len(TextEncoder(tok, True, None).encode(" ".join(["cow"] * 40))["input_ids"]) == 41  # 40 words + EOS
    features = TextEncoder(tok, True, 8).encode_examples([TextExample("a cow", 2), TextExample("a bus")])
    assert features[0]["labels"] == 2 and "labels" not in features[1]
    tok.pad_token = tok.eos_token  # EOS that is also the pad token would be masked out of the pooling
    assert TextEncoder(tok, True, 8).encode("a cow")["input_ids"] == tok("a cow", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- settings and the CLI surface

def test_the_cli_is_generated_from_the_settings(tmp_path, capsys):
    for argv, flags in ((["train"], ["classify", "over single texts (intents, categories)"]),
                        (["train", "classify"], ["--text-column", "--label-column", "--labels", "--group-by-length",
                                                  "--max-length"]),
                        (["eval", "classify"], ["--data", "--compare", "--output", "--text-column", "--label-column"]),
                        (["predict", "classify"], ["--input", "--output", "--text-column", "--quantize"])):
        with pytest.raises(SystemExit):
            run(capsys, *argv, "--help")
        out = " ".join(capsys.readouterr().out.split())  # unwrapped
        for flag in flags:
            assert flag in out, (argv, flag)
    from qtune.config import build_config, load_yaml
    from qtune.tasks.classify.config import ClassifyConfig

    recipe = write_lines(tmp_path / "r.yaml", "model: m", "train: t.csv", "output: out", "labels: [b, a]",
                         "max-length: 64")
    config = build_config(ClassifyConfig, load_yaml(recipe))
    assert (config.labels, config.max_length, config.text_column, config.group_by_length) == (["b", "a"], 64, "text",
                                                                                              True)
    assert ClassifyConfig(model="m", train="t", output="o").labels is None


def test_importing_the_registry_loads_no_torch():
    code = ("import sys, qtune.tasks, qtune.cli; qtune.cli.build_parser(); "
            "assert qtune.tasks.get('classify').kind == 'a text classifier'; "
            "print(sorted(m for m in ('torch', 'transformers', 'pydantic', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
