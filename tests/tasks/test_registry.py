"""The task registry and the Task contract: what the CLI, the API and the server get from it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import qtune
from qtune.cli import build_parser
from qtune.config import InferenceConfig, TrainConfig
from qtune.errors import QtuneError
from qtune.tasks import TASKS, get, task_of


def test_every_task_has_a_training_config_a_trainer_and_a_wrapper():
    assert list(TASKS) == ["pair-cls", "embedding", "reranker", "extract", "classify"]
    for task in TASKS.values():
        assert issubclass(task.config, TrainConfig), task
        assert ":" in task.trainer and ":" in task.wrapper, task
        for command in task.all_commands():
            assert issubclass(command.config, InferenceConfig), (task, command)
            assert command.help.startswith("`qtune "), (task, command)


def test_the_tasks_that_plan_their_memory_declare_a_planner_that_resolves():
    from qtune.tasks.base import resolve

    planned = {name for name, task in TASKS.items() if task.memory_planner}
    assert planned == {"embedding", "reranker"}  # the others train the batch asked for
    for name in planned:
        assert callable(resolve(TASKS[name].memory_planner)), name
        assert any(f.name == "memory_check" for f in dataclasses.fields(TASKS[name].config)), name


def test_the_cli_is_built_from_the_registry():
    parser = build_parser()
    for task in TASKS.values():
        args = parser.parse_args(["train", task.name, "--model", "m", "--train", "t", "--output", "o"])
        assert args.task == task.name
    names = {kind: sorted(c.name for t in TASKS.values() for c in t.commands_of(kind))
             for kind in ("evaluation", "prediction")}
    assert names == {"evaluation": ["classify", "extract", "pair-cls", "rerank", "retrieval", "sts"],
                     "prediction": ["classify", "extract", "pair-cls"]}
    for name in names["evaluation"]:
        assert parser.parse_args(["eval", name, "--model", "m"]).from_config
    # flags come from the config dataclass: every field is a flag, its default left to the dataclass
    fields = [f.name for f in dataclasses.fields(get("pair-cls").commands["evaluation"].config)]
    args = parser.parse_args(["eval", "pair-cls", "--model", "m", "--text-columns", "q", "d"])
    assert vars(args)["text_columns"] == ["q", "d"] and "label_column" not in vars(args) and "label_column" in fields


def test_unknown_tasks_and_commands_are_clear_errors(tmp_path):
    with pytest.raises(QtuneError, match="unknown task 'nope'; known: pair-cls, embedding, reranker, extract, classify"):
        get("nope")
    with pytest.raises(QtuneError, match="is not a qtune folder: say which task it is for"):
        task_of(tmp_path)
    with pytest.raises(QtuneError, match="unknown evaluation 'nope'; known: pair-cls, retrieval, sts, rerank, extract, classify"):
        qtune.evaluate("nope", model="m")
    with pytest.raises(QtuneError, match="missing required setting"):
        qtune.evaluate("pair-cls", model="m")  # --data is required


def test_a_folder_trained_for_one_task_is_refused_for_another(tmp_path):
    from qtune.modeling.loading import CheckpointMeta

    CheckpointMeta(task="embedding", base_model="m", adapter=False).save(tmp_path)
    assert task_of(tmp_path) is get("embedding")
    with pytest.raises(QtuneError, match="was trained for embedding, not reranker"):
        task_of(tmp_path, "reranker")


def test_import_qtune_and_the_cli_parser_load_no_torch_or_transformers():
    code = ("import sys, qtune, qtune.cli; qtune.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_run = subprocess.run([sys.executable, "-m", "qtune.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "fine-tune a model" in help_run.stdout


def test_a_task_s_saved_settings_must_be_a_saved_settings_dataclass_without_shared_names():
    from dataclasses import dataclass

    from qtune.modeling.loading import SavedSettings, register_saved_settings

    @dataclass
    class Clashing(SavedSettings):
        max_length: int = 3

    with pytest.raises(TypeError, match="must be a qtune.modeling.loading.SavedSettings dataclass"):
        register_saved_settings("x", dict)
    with pytest.raises(TypeError, match="field\\(s\\) max_length are qtune.json's shared fields"):
        register_saved_settings("x", Clashing)


def test_each_task_writes_and_reads_its_own_fields_of_qtune_json(tmp_path):
    from qtune.modeling.loading import CheckpointMeta, read_meta
    from qtune.tasks.reranker.config import RerankerSaved

    CheckpointMeta(task="reranker", base_model="m", adapter=True,
                   settings=RerankerSaved(instruction="judge", threshold=0.5)).save(tmp_path)
    saved = json.loads((tmp_path / "qtune.json").read_text())
    assert list(saved)[:3] == ["task", "base_model", "adapter"]
    assert {"instruction", "threshold", "threshold_warning"} <= set(saved) and "labels" not in saved
    meta = read_meta(tmp_path)
    assert meta.settings == RerankerSaved(instruction="judge", threshold=0.5)
