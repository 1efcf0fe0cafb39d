"""What every task's `train` does around the loop: check the output folder, seed, load the model
(fresh, or from last/ to resume), and only then write the resolved config.yaml."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from qtune.config import TrainConfig, config_to_yaml
from qtune.errors import QtuneError
from qtune.io import write_text
from qtune.modeling.loading import LoadedModel, LoraSettings, ModelSpec, load_model
from qtune.training.trainer import STATE_FILE


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


def start_run(config: TrainConfig, spec: ModelSpec, *, validate=None, **load_kwargs) -> LoadedModel:
    """Checks the output folder, seeds, loads the model (fresh with `lora_settings(config)`, or from
    last/), runs `validate(loaded)` (settings that need the model) and only then writes config.yaml.

    Called after the data was read, so bad data never gets this far.
    """
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
    write_text(output / "config.yaml", config_to_yaml(dataclasses.replace(config, resume=False)))
    return loaded
