"""Saving checkpoints (adapter or full weights + tokenizer + qtune.json) and merging LoRA for export."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from qtune.errors import QtuneError
from qtune.io import atomic_dir
from qtune.modeling.loading import LoadedModel


def save_model_files(loaded: LoadedModel, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write the model (LoRA adapter or full weights), tokenizer and qtune.json into `folder`;
    `state_dict`: the weights to write instead of the model's own (gathered from FSDP / ZeRO-3 shards)."""
    if state_dict is None:
        loaded.model.save_pretrained(folder)
    else:
        loaded.model.save_pretrained(folder, state_dict=state_dict)
    loaded.tokenizer.save_pretrained(folder)
    replace(loaded.meta, adapter=loaded.is_adapter).save(folder)


def save_checkpoint(loaded: LoadedModel, folder: str | os.PathLike, extra_files: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """Save atomically: `folder` is replaced as a whole, never left half-written.

    `extra_files` maps file names to callables that write them (e.g. the trainer state).
    """
    with atomic_dir(folder) as tmp:
        save_model_files(loaded, tmp, state_dict)
        for name, write in (extra_files or {}).items():
            write(tmp / name)


def check_export_target(output: str | os.PathLike) -> Path:
    """The export folder, refused before any model loads if it exists and is not empty: an export
    never replaces other files."""
    output = Path(output).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise QtuneError(f"{output} already exists and is not empty; choose a new --output")
    return output


def merge_lora(loaded: LoadedModel) -> LoadedModel:
    """Fold LoRA adapters into the base weights in place (a plain transformers model, no peft);
    a model without adapters stays as it is. Load it on the CPU in fp32 first."""
    if loaded.is_adapter:
        loaded.model = loaded.model.merge_and_unload()
    return loaded
