"""The export framework: the note of where an export came from (check-export finds the source, or
says to pass --model), formats per task, the difference table, and the tokenizer template that
makes a plain tokenizer call append what qtune appends (kept through save and load, cut before the
end tokens)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from support import assert_user_error, qwen_tokenizer_dir, run
from export_cases import lora_source
from qtune.modeling.export import append_to_template, difference_table, keep_tokenizer_settings, read_export_note


@pytest.fixture(scope="module")
def exported(tiny_bert_dir, tmp_path_factory):
    """(source, export) of a tiny BERT text classifier."""
    from qtune.api import export

    folder = tmp_path_factory.mktemp("framework")
    source = lora_source(tiny_bert_dir, "classify", folder / "run")
    return source, export(str(source), str(folder / "export"))


def test_the_export_notes_its_source_and_stays_a_qtune_folder(exported):
    from qtune import __version__

    source, output = exported
    assert read_export_note(output) == {"source": str(source.resolve()), "task": "classify", "format": "transformers",
                                        "qtune_version": __version__}
    meta = json.loads((output / "qtune.json").read_text(encoding="utf-8"))
    assert meta["task"] == "classify" and meta["adapter"] is False and meta["max_length"] == 24
    assert not (output / "adapter_config.json").exists()
    assert not list(output.parent.glob(".export.*"))  # no temp folder left beside it


def test_check_export_needs_the_source_when_the_note_cannot_give_it(exported, tmp_path, capsys):
    source, output = exported
    bare = shutil.copytree(output, tmp_path / "bare")
    (bare / "qtune_export.json").unlink()
    code, _, err = run(capsys, "check-export", bare)
    assert_user_error(code, err, "has no qtune_export.json", "pass --model")
    code, out, err = run(capsys, "check-export", bare, "--model", source)
    assert code == 0, err
    assert out.splitlines()[2].startswith("transformers pipeline ") and out.splitlines()[2].endswith("ok")

    moved = shutil.copytree(output, tmp_path / "moved")
    note = json.loads((moved / "qtune_export.json").read_text(encoding="utf-8"))
    (moved / "qtune_export.json").write_text(json.dumps({**note, "source": str(tmp_path / "gone")}), encoding="utf-8")
    code, _, err = run(capsys, "check-export", moved)
    assert_user_error(code, err, f"exported from {tmp_path / 'gone'}, which is no longer there: pass --model")

    code, _, err = run(capsys, "check-export", tmp_path / "nothing")
    assert_user_error(code, err, f"cannot check export '{tmp_path / 'nothing'}': no such folder")


def test_check_export_refuses_a_source_of_another_task(exported, tiny_bert_dir, tmp_path, capsys):
    _, output = exported
    other = lora_source(tiny_bert_dir, "pair-cls", tmp_path / "pairs")
    code, _, err = run(capsys, "check-export", output, "--model", other)
    assert_user_error(code, err, "is an export of a text classifier", "is a pair classifier")


def test_the_format_flag_offers_every_tasks_formats(capsys):
    from qtune.cli import build_parser
    from qtune.tasks import TASKS

    args = build_parser().parse_args(["export", "--model", "m", "--output", "o"])
    assert args.format == "auto" and args.check is False and args.tolerance == 1e-5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--model", "m", "--output", "o", "--format", "onnx"])
    formats = sorted({fmt for task in TASKS.values() for fmt in task.export_formats})
    assert {"sentence-transformers", "transformers"} <= set(formats)
    assert f"choose from {', '.join(repr(f) for f in ['auto', *formats])}" in capsys.readouterr().err


def test_the_difference_table_marks_engines_over_the_tolerance():
    table = difference_table({"a": 3e-7, "longer engine": 2e-3, "c": math.nan}, 1e-5)
    assert table.splitlines() == ["engine         max abs difference",
                                  "-------------  ------------------",
                                  "a              3e-07               ok",
                                  "longer engine  0.002               OVER 1e-05",
                                  "c              nan                 OVER 1e-05"]


def test_the_tokenizer_template_appends_qtunes_tokens_through_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    end, eos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    tokenizer.padding_side = "left"
    append_to_template(tokenizer, [eos], newline)
    keep_tokenizer_settings(tokenizer, 6)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    a, b = (reloaded(t, add_special_tokens=False)["input_ids"] for t in ("hello world", "good night"))
    assert reloaded("hello world")["input_ids"] == a + [eos]
    assert reloaded("hello world", "good night")["input_ids"] == a + newline + b + [eos]
    # cut before the end token is added, so it is never lost; padding on the left
    long = reloaded("one two three four five six seven eight", truncation=True)["input_ids"]
    assert len(long) == 6 and long[-1] == eos
    batch = reloaded(["hi", "one two three"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][-1] == eos
    assert reloaded.padding_side == "left" and reloaded.model_max_length == 6
    assert end != eos  # Qwen3: the embedder's end token is not the classifiers' EOS
