"""What every task's `train` does around the loop: check the output folder, seed, load the model
(fresh, or from last/ to resume, with the settings it was saved with), say what the run will do that
the user might not expect (rows cut by --max-length, no --eval), and only then write the resolved
config.yaml."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any, Sequence

import yaml

from qtune.config import TrainConfig, config_to_yaml
from qtune.data.split import describe, dev_split, resolve_dev_fraction
from qtune.distributed import barrier, launch
from qtune.errors import QtuneError
from qtune.io import refuse_link, write_text
from qtune.modeling.loading import LoadedModel, LoraSettings, ModelSpec, load_model
from qtune.training.replica import read_deepspeed_config
from qtune.training.tracking import check_trackers
from qtune.training.trainer import STATE_FILE
from qtune.training.verdict import DevSet


# Over this share of training rows cut by --max-length, a run is refused: most rows would lose
# their ends, which is a wrong --max-length rather than a few long rows (`qtune data stats`
# suggests one that covers 99% of rows).
MOST_ROWS = 0.5


def check_truncation(lengths: Sequence[int], max_length: int, rows: str) -> int:
    """Say how many training `rows` ("pairs", "texts") --max-length truncates, from their token
    counts before truncation; refuse the run when it is most of them. Returns how many are cut.

    Called from `start_run`'s `validate`, so a refused run has written nothing."""
    total = len(lengths)
    cut = sum(1 for n in lengths if n > max_length)
    if not cut:
        return 0
    share = f"{cut / total:.0%}" if cut / total >= 0.01 else "<1%"
    what = f"{cut} of {total} training {rows} ({share}) are longer than --max-length {max_length}"
    if cut / total > MOST_ROWS:
        raise QtuneError(f"{what}: most would be truncated; raise --max-length (`qtune data stats` suggests one "
                         "that covers 99% of rows)")
    print(f"{what} and are truncated")
    return cut


def hold_out(config: TrainConfig, keys: Sequence[str], unit: str) -> tuple[list[int], list[int], DevSet | None]:
    """Split the training rows (one `key` each: a query, a text) into training and dev rows, by
    --dev-fraction or its default (`qtune.data.split`). Returns (train rows, dev rows, the dev set as
    the verdict names it: None when nothing is held out and there is no --eval either)."""
    distinct = len(set(keys))
    fraction = resolve_dev_fraction(config.dev_fraction, distinct, bool(config.eval),
                                    str(config.train))
    train, dev = dev_split(keys, fraction, config.seed)
    if not dev:
        return train, dev, None
    held = len({keys[i] for i in dev})
    if launch().is_main:
        print(describe(fraction, held, unit, str(config.train)))
    return train, dev, DevSet(size=held, unit=unit, source=f"a {fraction:.0%} dev split of {config.train}")


def eval_dev_set(config: TrainConfig, size: int, unit: str) -> DevSet | None:
    """The dev set --eval names, as the verdict names it."""
    return DevSet(size=size, unit=unit, source=f"--eval {config.eval}") if config.eval else None


def lora_settings(config: TrainConfig) -> LoraSettings | None:
    """The LoRA the flags ask for; None with --full."""
    return None if config.full else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                 config.lora_targets)


CONFIG_FILE = "config.yaml"
# What a run replaces as a whole (qtune.io's atomic writers, which refuse links): the checkpoint
# folders with the `.NAME.old` names they pass through, and the two files.
REPLACED = (CONFIG_FILE, "metrics.json", "best", "last", ".best.old", ".last.old")


def saved_settings(output: Path) -> dict[str, Any] | None:
    """The settings of the run saved in `output` (its config.yaml); None when there is none, or the
    file is not a qtune run's (not a mapping of at least the settings every run has)."""
    try:
        saved = yaml.safe_load((output / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) and {"model", "train", "output"} <= set(saved) else None


def check_output_folder(output: Path, resume: bool) -> None:
    """Before anything loads: nothing a run replaces is a symbolic link (it would be followed out of
    the run); --resume finds a saved run, and a new run goes into a new or empty folder or one that
    holds a qtune run without a checkpoint, never over a run or into a folder of other files."""
    for name in REPLACED:
        refuse_link(output / name)
    last = output / "last"
    if resume:
        if not (last / STATE_FILE).is_file():
            raise QtuneError(f"nothing to resume: {last / STATE_FILE} does not exist")
        return
    if last.exists():
        raise QtuneError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    if not output.exists():
        return
    if not output.is_dir():
        raise QtuneError(f"--output {output} is a file: give a new or empty folder")
    entries = sorted(entry.name for entry in output.iterdir())
    if entries and saved_settings(output) is None:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise QtuneError(f"--output {output} holds files that are not a qtune run ({shown}): give a new or empty "
                         "folder, or the folder of a qtune run")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(saved: Any, now: Any) -> bool:
    if saved == now:
        return True
    # a file named from another folder, or by another spelling
    if isinstance(saved, str) and isinstance(now, str):
        try:
            return os.path.samefile(saved, now)
        except OSError:
            return False
    return False


def check_resumed_settings(config: TrainConfig, output: Path) -> None:
    """--resume continues the run last/ holds: a setting that differs from its config.yaml is refused,
    all of them named in one line, unless it is one of `config.resume_may_change` (said in one line)
    or one of `config.resume_from_last` left out.
    Called after `validate`, so settings it resolves (the memory check's batch split) are compared
    as the saved run resolved them."""
    path = output / CONFIG_FILE
    saved = saved_settings(output)
    if saved is None:
        print(f"{path} is missing or not a qtune run's: the settings cannot be checked against the saved run's")
        return
    changed = [(f.name, saved[f.name], getattr(config, f.name)) for f in dataclasses.fields(config)
               if f.name in saved and f.name not in ("output", "resume")
               and not (f.name in config.resume_from_last and getattr(config, f.name) is None)
               and not _same(saved[f.name], getattr(config, f.name))]
    listed = [f"{_flag(name)} {_shown(now)} (saved: {_shown(old)})" for name, old, now in changed]
    fixed = [line for line, (name, _, _) in zip(listed, changed) if name not in config.resume_may_change]
    if fixed:
        may = ", ".join(_flag(name) for name in sorted(config.resume_may_change))
        raise QtuneError(f"--resume continues the run saved in {output}, and these settings differ from its "
                         f"{CONFIG_FILE}: {', '.join(fixed)}; give the saved values (--config {path} --output {output} "
                         f"--resume repeats them) or train into another --output (only {may} may change on resume)")
    if listed:
        schedule = ("; the learning-rate schedule is recomputed for the new length"
                    if any(name == "epochs" for name, _, _ in changed) else "")
        print(f"resuming with {', '.join(listed)} (settings that may change on resume){schedule}")


def resume_state(config: TrainConfig) -> Path | None:
    return Path(config.output, "last", STATE_FILE) if config.resume else None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(config: TrainConfig, spec: ModelSpec, *, validate=None, held_out: bool = False,
              **load_kwargs) -> LoadedModel:
    """Checks the output folder (`check_output_folder`), seeds, loads the model (fresh with
    `lora_settings(config)`, or from last/), runs `validate(loaded)` (settings and data checks that
    need the model or its tokenizer, e.g. `check_truncation`), checks a resumed run's settings
    against the saved ones (`check_resumed_settings`), says when there is no dev set (`held_out`: a
    dev split was made) and only then writes config.yaml.

    Called after the data was read, so bad data never gets this far.
    """
    check_trackers(getattr(config, "report_to", None))
    if getattr(config, "deepspeed", None):
        read_deepspeed_config(config.deepspeed)
        if config.resume:
            raise QtuneError("--resume with --deepspeed is not supported yet: DeepSpeed keeps the optimizer state "
                             "in its own shards, which last/ does not hold")
    output = Path(config.output)
    check_output_folder(output, config.resume)
    seed_everything(config.seed)
    common = dict(trainable=True, device=config.device, precision=config.precision, packing=config.packing)
    if config.resume:
        loaded = load_model(output / "last", spec, **common)
    else:
        loaded = load_model(config.model, spec, max_length=config.max_length, lora=lora_settings(config),
                            **common, **load_kwargs)
    if validate is not None:
        validate(loaded)
    if config.resume:
        check_resumed_settings(config, output)
    if config.fail_on_regression and not config.eval and not held_out:
        raise QtuneError("--fail-on-regression needs a dev set to compare the tuned model with its base: give "
                         "--eval DEV, or --dev-fraction F (on by default from 200 training queries or rows)")
    if not config.eval and not held_out:
        # best/ is chosen by the eval metric; without eval data it is simply where training ended
        print("no --eval and no dev split: best/ will be the last checkpoint")
    barrier()  # every rank has checked the output folder and config.yaml before rank 0 writes into it
    if launch().is_main:
        write_text(output / CONFIG_FILE, config_to_yaml(dataclasses.replace(config, resume=False)))
    barrier()  # and no rank goes on before config.yaml is there
    return loaded
