"""What every task's `train` does around the loop: check the output folder, seed, load the model
(fresh, or from last/ to resume), say what the run will do that the user might not expect (rows
cut by --max-length, no --eval), and only then write the resolved config.yaml."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

from qtune.config import TrainConfig, config_to_yaml
from qtune.data.split import describe, dev_split, resolve_dev_fraction
from qtune.distributed import barrier, launch
from qtune.errors import QtuneError
from qtune.io import write_text
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
    """Checks the output folder, seeds, loads the model (fresh with `lora_settings(config)`, or from
    last/), runs `validate(loaded)` (settings and data checks that need the model or its tokenizer,
    e.g. `check_truncation`), says when there is no dev set (`held_out`: a dev split was made) and
    only then writes config.yaml.

    Called after the data was read, so bad data never gets this far.
    """
    check_trackers(getattr(config, "report_to", None))
    if getattr(config, "deepspeed", None):
        read_deepspeed_config(config.deepspeed)
        if config.resume:
            raise QtuneError("--resume with --deepspeed is not supported yet: DeepSpeed keeps the optimizer state "
                             "in its own shards, which last/ does not hold")
    output = Path(config.output)
    last = output / "last"
    if config.resume and not (last / STATE_FILE).is_file():
        raise QtuneError(f"nothing to resume: {last / STATE_FILE} does not exist")
    if not config.resume and last.exists():
        raise QtuneError(f"{output} already holds a run; pass --resume to continue it or choose another --output")
    seed_everything(config.seed)
    common = dict(trainable=True, device=config.device, precision=config.precision, packing=config.packing)
    if config.resume:
        loaded = load_model(last, spec, **common)
    else:
        loaded = load_model(config.model, spec, max_length=config.max_length, lora=lora_settings(config),
                            **common, **load_kwargs)
    if validate is not None:
        validate(loaded)
    if config.fail_on_regression and not config.eval and not held_out:
        raise QtuneError("--fail-on-regression needs a dev set to compare the tuned model with its base: give "
                         "--eval DEV, or --dev-fraction F (on by default from 200 training queries or rows)")
    if not config.eval and not held_out:
        # best/ is chosen by the eval metric; without eval data it is simply where training ended
        print("no --eval and no dev split: best/ will be the last checkpoint")
    if launch().is_main:
        write_text(output / "config.yaml", config_to_yaml(dataclasses.replace(config, resume=False)))
    barrier()  # every rank has checked the output folder before rank 0 writes into it
    return loaded
