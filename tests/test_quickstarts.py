"""The README's quick starts and the YAML recipes can be followed as written: every command parses
with the CLI's parser (its flags exist), and every file a step reads is made by an earlier step,
is in ../shared/data or is one the user is told to bring. bench/quickstarts.py runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _quickstarts():
    spec = importlib.util.spec_from_file_location("quickstarts", ROOT / "bench" / "quickstarts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


qs = _quickstarts()
STARTS = qs.quick_starts((ROOT / "README.md").read_text(encoding="utf-8"))
STEPS = [step for start in STARTS for step in start.steps]


def test_every_quick_start_has_commands():
    assert [s.title for s in STARTS] == ["semantic matching", "text classification", "domain embeddings",
                                         "reranking", "JSON extraction"]
    assert all(s.steps for s in STARTS)


@pytest.mark.parametrize("step", STEPS, ids=[f"{s.section}: {' '.join(s.words[1:3])}" for s in STEPS])
def test_every_command_parses_with_its_optional_flags(step):
    args = qs.parsed(step)  # SystemExit (a test error) when a flag does not exist
    assert args.func is not None
    qs.parsed(step, step.words)  # and without the optional parts


def test_every_file_a_step_reads_is_made_earlier_shared_or_brought():
    assert qs.unresolved_inputs(STARTS) == []


def test_the_flow_check_finds_a_file_nothing_makes():
    # the control: data/fin/ holds what retrieval-split writes (train.jsonl, test/), not mined.jsonl
    split = "qtune data retrieval-split table.csv --output data/fin"
    train = "qtune train reranker --model Qwen/Qwen3-Reranker-0.6B --train data/fin/mined.jsonl --output runs/fin-rr"
    broken = qs.QuickStart("reranking", [qs._step("reranking", split), qs._step("reranking", train)], ["table.csv"])
    assert qs.unresolved_inputs([broken]) == [f"reranking: {train}: data/fin/mined.jsonl"]
    fixed = qs.QuickStart("reranking", [qs._step("reranking", split),
                                        qs._step("reranking", train.replace("mined", "train"))], ["table.csv"])
    assert qs.unresolved_inputs([fixed]) == []


def test_files_the_user_brings_have_stand_ins(tmp_path):
    # the runner writes small stand-ins for them; only the ones that need no earlier step are written here
    brought = {name for start in STARTS for name in start.brought}
    assert {"intents.csv", "intents-dev.csv", "new.csv"} <= brought
    for name in ("intents.csv", "intents-dev.csv", "new.csv"):
        qs.write_stand_in(name, tmp_path)
        assert (tmp_path / name).read_text(encoding="utf-8").count("\n") > 5


# --- configs/*.yaml -------------------------------------------------------------------------------

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
DATA_SETTINGS = ("train", "eval", "data", "input")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_paths_exist_or_are_made_by_a_quick_start(recipe):
    settings = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    written = [getattr(qs.parsed(step, step.words), "output", None) for step in STEPS]
    for key in DATA_SETTINGS:
        value = settings.get(key)
        if value is None:
            continue
        if value.startswith("../shared/") and not (ROOT.parent / "shared").is_dir():
            continue  # the shared data is not beside this checkout
        assert (ROOT / value).exists() or qs._under(value, [w for w in written if w]), f"{recipe.name}: {key}: {value}"
    model = settings["model"]
    assert qs.is_hub_id(model) or (ROOT / model).exists(), f"{recipe.name}: model: {model}"


def test_a_recipe_runs_through_the_cli_parser():
    # every recipe names its task in the first comment line, as the README's `--config` example does
    for recipe in RECIPES:
        first = recipe.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# qtune train "), recipe.name
        task = first.split()[3]
        from qtune.cli import build_parser
        from qtune.config import config_from_args
        from qtune.tasks import get

        args = build_parser().parse_args(["train", task, "--config", str(recipe)])
        config = config_from_args(get(task).config, args)
        assert config.train == yaml.safe_load(recipe.read_text(encoding="utf-8"))["train"]
