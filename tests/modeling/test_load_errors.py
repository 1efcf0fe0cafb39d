"""What goes wrong when a model or a datasets folder is damaged, edited or named wrongly: one
QtuneError line naming the file, the field and what to do, never a library's traceback; and loading
a trained checkpoint says nothing about a head it restores (qtune.modeling.loading, qtune.data.sources)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from support import assert_user_error, data_error, run
from qtune.errors import QtuneError
from qtune.modeling.checkpoint import save_model_files
from qtune.modeling.loading import MAX_LABELS, MAX_LENGTH_CAP, LoraSettings, read_meta
from qtune.tasks import load_model

REPORT_LOGGER = "transformers.modeling_utils"


def lora_checkpoint(base: str, folder: Path, task: str, labels=None) -> Path:
    """A LoRA checkpoint of `base` for `task`, its new head saved with the adapter, as training leaves it."""
    loaded = load_model(base, task=task, device="cpu", trainable=True, labels=labels,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    save_model_files(loaded, folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tiny_bert_dir, tmp_path_factory) -> Path:
    return lora_checkpoint(tiny_bert_dir, tmp_path_factory.mktemp("ckpt") / "pair-cls", "pair-cls")


@pytest.fixture
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.csv"
    path.write_text("sentence1,sentence2\nthe cat,a dog\n", encoding="utf-8")
    return path


def edited(checkpoint: Path, folder: Path, text: str) -> Path:
    """A copy of `checkpoint` whose qtune.json holds `text`."""
    shutil.copytree(checkpoint, folder)
    (folder / "qtune.json").write_text(text, encoding="utf-8")
    return folder


def with_field(checkpoint: Path, **fields) -> str:
    return json.dumps({**json.loads((checkpoint / "qtune.json").read_text(encoding="utf-8")), **fields})


def predict(capsys, model, pairs: Path, tmp_path: Path) -> tuple[int, str, str]:
    return run(capsys, "predict", "pair-cls", "--model", model, "--input", pairs, "--output", tmp_path / "out.csv",
               "--device", "cpu")


# ── 1. qtune.json ───────────────────────────────────────────────

def test_an_untouched_checkpoint_predicts(checkpoint, pairs, tmp_path, capsys):
    code, _, err = predict(capsys, checkpoint, pairs, tmp_path)
    assert code == 0, err
    assert (tmp_path / "out.csv").is_file()


LENGTH = f"a whole number of tokens from 1 to {MAX_LENGTH_CAP}"
LABELS = f"a list of 2 to {MAX_LABELS} distinct, non-empty label strings"
BAD_FIELDS = {
    "max_length=10**12": ({"max_length": 10 ** 12}, "max_length", "1000000000000", LENGTH),
    "max_length=0": ({"max_length": 0}, "max_length", "0 is not allowed", LENGTH),
    "max_length=-5": ({"max_length": -5}, "max_length", "-5", LENGTH),
    "max_length=abc": ({"max_length": "abc"}, "max_length", '"abc"', LENGTH),
    "max_length=2.5": ({"max_length": 2.5}, "max_length", "2.5", LENGTH),
    "one label": ({"labels": ["yes"]}, "labels", '["yes"]', LABELS),
    "100000 labels": ({"labels": [f"l{i}" for i in range(100_000)]}, "labels", "a list of 100000 items", LABELS),
    "labels null": ({"labels": None}, "labels", "null", LABELS),
    "repeated labels": ({"labels": ["a", "a"]}, "labels", "repeated: ['a']", LABELS),
    "number labels": ({"labels": [0, 1]}, "labels", "[0, 1]", LABELS),
    "adapter text": ({"adapter": "yes"}, "adapter", '"yes"', "true or false"),
    "pooling": ({"pooling": "max"}, "pooling", '"max"', "last, mean, cls or null"),
    "threshold text": ({"threshold": "high"}, "threshold", '"high"', "a finite number or null"),
}


@pytest.mark.parametrize("fields,field,value,allowed", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_a_bad_qtune_json_value_is_one_line_naming_file_field_value_and_what_is_allowed(
        checkpoint, pairs, tmp_path, capsys, fields, field, value, allowed):
    model = edited(checkpoint, tmp_path / "model", with_field(checkpoint, **fields))
    code, _, err = predict(capsys, model, pairs, tmp_path)
    assert_user_error(code, err, f"{model / 'qtune.json'}, field '{field}': ", value, allowed,
                      "restore the qtune.json written by training")
    assert err.count("\n") == 1
    assert not (tmp_path / "out.csv").exists()


def test_the_same_checks_hold_for_every_reader_of_qtune_json(checkpoint, tmp_path):
    model = edited(checkpoint, tmp_path / "model", with_field(checkpoint, max_length=-5))
    err = data_error(read_meta, model)
    assert (err.path, err.field) == (str(model / "qtune.json"), "max_length")


@pytest.mark.parametrize("text,parts", [
    ('{"task": "pair-cls", "base_model": ', ("qtune.json:1: not valid JSON",)),
    ('{\n  "task": "pair-cls",\n  oops\n}', ("qtune.json:3: not valid JSON",)),
    ("[1, 2]", ("qtune.json: holds a JSON list, expected an object",)),
    ('"pair-cls"', ("qtune.json: holds a JSON string, expected an object",)),
], ids=["cut short", "bad line 3", "a list", "a string"])
def test_a_qtune_json_that_is_no_json_object_is_one_line(checkpoint, pairs, tmp_path, capsys, text, parts):
    model = edited(checkpoint, tmp_path / "model", text)
    code, _, err = predict(capsys, model, pairs, tmp_path)
    assert_user_error(code, err, str(model), *parts)
    assert err.count("\n") == 1


def test_a_qtune_json_without_a_required_field_names_it(checkpoint, pairs, tmp_path, capsys):
    settings = json.loads(with_field(checkpoint))
    del settings["task"]
    model = edited(checkpoint, tmp_path / "model", json.dumps(settings))
    code, _, err = predict(capsys, model, pairs, tmp_path)
    assert_user_error(code, err, f"{model / 'qtune.json'}, field 'task': missing")


def test_labels_that_do_not_fit_the_saved_head_name_both_counts(checkpoint, pairs, tmp_path, capsys):
    model = edited(checkpoint, tmp_path / "model", with_field(checkpoint, labels=["a", "b", "c"]))
    code, _, err = predict(capsys, model, pairs, tmp_path)
    assert_user_error(code, err, f"{model / 'qtune.json'}, field 'labels': 3 labels",
                      f"the classification head saved in {model} has 2 outputs")


def test_labels_that_do_not_fit_a_full_checkpoint_head(tiny_bert_dir, tmp_path):
    loaded = load_model(tiny_bert_dir, task="pair-cls", device="cpu")
    save_model_files(loaded, tmp_path / "full")
    model = tmp_path / "full"
    (model / "qtune.json").write_text(with_field(model, labels=["a", "b", "c"]), encoding="utf-8")
    with pytest.raises(QtuneError, match=r"field 'labels': 3 labels, but the classification head saved in .* "
                                         r"has 2 outputs"):
        load_model(model, device="cpu")


# ── 2. pickled weights ──────────────────────────────────────────

class RunsCode:
    """What a malicious pickle holds: unpickling it calls a function."""

    def __reduce__(self):
        return print, ("unpickling ran code",)


def pickled(folder: Path, safetensors_name: str, bin_name: str) -> None:
    """Replace the folder's safetensors weights by a pickle that also holds a Python object."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(folder / safetensors_name)
    (folder / safetensors_name).unlink()
    torch.save({**weights, "extra": RunsCode()}, folder / bin_name)


def test_a_pytorch_model_bin_holding_python_objects_is_refused_saying_why(tiny_bert_dir, tmp_path, capfd):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    pickled(model, "model.safetensors", "pytorch_model.bin")
    with pytest.raises(QtuneError) as info:
        load_model(model, task="pair-cls", device="cpu")
    message = str(info.value)
    assert message.startswith(f"{model / 'pytorch_model.bin'}: refused: this pickle file holds Python objects")
    for part in ("could run code", "qtune loads only tensors", "convert it to safetensors", "model.safetensors"):
        assert part in message
    assert "unpickling ran code" not in capfd.readouterr().out


def test_an_adapter_model_bin_holding_python_objects_is_refused_saying_why(checkpoint, tmp_path, capfd):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    pickled(model, "adapter_model.safetensors", "adapter_model.bin")
    with pytest.raises(QtuneError) as info:
        load_model(model, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{model / 'adapter_model.bin'}: refused: this pickle file holds Python objects")
    assert "could run code" in message and "adapter_model.safetensors" in message
    assert "unpickling ran code" not in capfd.readouterr().out


# ── 3. datasets folders ─────────────────────────────────────────

def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("keep", [0.5, 0.02, 0], ids=["body", "schema", "empty"])
def test_a_truncated_arrow_file_is_named(tmp_path, keep):
    import datasets

    from qtune.data.sources import columnar_source, read_columnar

    folder = tmp_path / "pairs"
    datasets.Dataset.from_dict({"sentence1": ["the cat"] * 500, "sentence2": ["a dog"] * 500}).save_to_disk(folder)
    arrow = next(folder.glob("*.arrow"))
    cut(arrow, int(arrow.stat().st_size * keep))
    err = data_error(read_columnar, columnar_source(folder), str(folder), nulls="empty")
    assert err.path == str(arrow)
    assert str(err).startswith(f"{arrow}: truncated or corrupt Arrow file (")
    assert f"in the datasets folder {folder}; write the dataset again with save_to_disk" in str(err)


def test_a_truncated_arrow_file_of_another_split_is_named_through_the_cli(tmp_path, capsys, tiny_bert_dir):
    import datasets

    folder = tmp_path / "pairs"
    split = datasets.Dataset.from_dict({"sentence1": ["the cat"] * 50, "sentence2": ["a dog"] * 50})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(folder)
    arrow = next((folder / "test").glob("*.arrow"))
    cut(arrow, arrow.stat().st_size // 2)
    code, _, err = run(capsys, "predict", "pair-cls", "--model", tiny_bert_dir, "--input", f"{folder}:train",
                       "--output", tmp_path / "out.csv", "--device", "cpu")
    assert_user_error(code, err, f"{arrow}: truncated or corrupt Arrow file")


def test_a_missing_arrow_file_is_named(tmp_path):
    import datasets

    from qtune.data.sources import columnar_source, read_columnar

    folder = tmp_path / "pairs"
    datasets.Dataset.from_dict({"text": ["the cat"]}).save_to_disk(folder)
    arrow = next(folder.glob("*.arrow"))
    arrow.unlink()
    err = data_error(read_columnar, columnar_source(folder), str(folder), nulls="empty")
    assert err.path == str(arrow) and str(err).startswith(f"{arrow}: missing")


# ── 6. a file for --model ───────────────────────────────────────

def test_a_config_json_for_model_says_a_folder_is_wanted(tiny_bert_dir, pairs, tmp_path, capsys):
    config = Path(tiny_bert_dir, "config.json")
    code, _, err = predict(capsys, config, pairs, tmp_path)
    assert_user_error(code, err, f"cannot load model '{config}': it is a file; a model is a folder",
                      f"here perhaps '{tiny_bert_dir}'", "or a hub id")
    assert "Repo id" not in err


# ── 7. the load report of a restored head ───────────────────────

@pytest.fixture
def load_reports():
    """The warnings transformers logs while loading (it does not propagate to the root logger,
    so caplog cannot see them), at transformers' default verbosity."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the CLI, run in-process by other tests, lowers it
    logging.getLogger("transformers").addHandler(handler)
    yield records
    logging.getLogger("transformers").removeHandler(handler)
    hf_logging.set_verbosity(before)


def reports(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == REPORT_LOGGER and "LOAD REPORT" in r.getMessage()]


def test_load_reports_sees_what_transformers_reports_of_a_new_head(tiny_bert_dir, load_reports):
    """The control of the tests below, which find no report: transformers alone reports the head."""
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert len(reports(load_reports)) == 1 and "classifier.weight" in reports(load_reports)[0]


@pytest.mark.parametrize("task", ["pair-cls", "reranker", "classify"])
def test_a_trained_lora_checkpoint_loads_without_a_missing_head_report(tiny_bert_dir, tiny_qwen_dir, tmp_path, task,
                                                                       load_reports, caplog):
    base = tiny_qwen_dir if task == "classify" else tiny_bert_dir  # a Qwen3 classifier's head is `score`
    model = lora_checkpoint(base, tmp_path / task, task, labels=["a", "b"] if task == "classify" else None)
    load_reports.clear()
    with caplog.at_level(logging.INFO, logger="qtune.modeling.loading"):
        loaded = load_model(model, device="cpu")
    assert reports(load_reports) == []
    assert loaded.new_modules == ()
    assert [r for r in caplog.records if "new and untrained" in r.getMessage()] == []


def test_a_new_head_gets_one_qtune_warning_instead_of_the_report(tiny_bert_dir, load_reports, caplog):
    with caplog.at_level(logging.WARNING, logger="qtune.modeling.loading"):
        loaded = load_model(tiny_bert_dir, task="pair-cls", device="cpu")
    assert loaded.new_modules == ("classifier",)
    warnings = [r.getMessage() for r in caplog.records if r.name == "qtune.modeling.loading"]
    assert warnings == [f"{tiny_bert_dir} has no weights for classifier: the head is new and untrained; its outputs "
                        f"are random until the model is trained"]
    assert reports(load_reports) == []


def test_a_new_head_for_training_is_no_warning(tiny_bert_dir, caplog):
    with caplog.at_level(logging.INFO, logger="qtune.modeling.loading"):
        load_model(tiny_bert_dir, task="pair-cls", device="cpu", trainable=True)
    notes = [r for r in caplog.records if r.name == "qtune.modeling.loading"]
    assert [(r.levelno, "training starts it from random weights" in r.getMessage()) for r in notes] == [
        (logging.INFO, True)]


def test_a_base_weight_the_adapter_does_not_restore_keeps_the_report(checkpoint, tiny_bert_dir, tmp_path,
                                                                    load_reports):
    """A weight that neither the base nor the adapter holds is no normal state: transformers' report stays."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    weights = load_file(base / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, base / "model.safetensors")
    model = edited(checkpoint, tmp_path / "model", with_field(checkpoint, base_model=str(base)))
    load_model(model, device="cpu")
    assert len(reports(load_reports)) == 1 and "pooler.dense.weight" in reports(load_reports)[0]
