"""Many LoRA adapters of one base model, with the base weights loaded once.

`load_adapters` loads the first qtune adapter folder with `load_model` and every other one into
the same peft model (`PeftModel.load_adapter`), and returns one `AdapterView` per folder: a
`LoadedModel` that shares the model and tokenizer but keeps its own qtune.json metadata (labels,
pooling, instruction, max_length, threshold). A view activates its adapter at the start of every
model call (`inference()`, which `infer_batch`, `run_sorted` and generation all enter), so the
task wrappers (`Embedder`, `PairClassifier`, ...) work on views unchanged and never see another
adapter's weights. The views of one base share a lock: switching the adapter and the call that
uses it are one step, whichever thread calls.

What the adapters cannot each have their own of is checked before the second one loads: the base
model, the task, the tokenizer's vocabulary and pad token, and the head's shape (the number of
labels): a head is copied per adapter (peft's `modules_to_save`), but into the base's one shape.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

from qtune.errors import QtuneError
from qtune.modeling.loading import CheckpointMeta, LoadedModel, ModelSpec, load_model, load_tokenizer, read_meta

FIRST_ADAPTER = "default"  # the name peft gives the adapter `PeftModel.from_pretrained` loads
# Head settings that may differ between adapters: names, not shapes.
PER_ADAPTER_HEAD_SETTINGS = ("id2label", "label2id")


@dataclass
class AdapterView(LoadedModel):
    """One adapter of a peft model shared with other views: every model call runs with this one active."""

    adapter_name: str = FIRST_ADAPTER
    lock: threading.RLock = field(default_factory=threading.RLock)  # one per shared model

    @contextlib.contextmanager
    def inference(self):
        with self.lock:
            activate(self.model, self.adapter_name)
            with LoadedModel.inference(self):
                yield


def activate(model, adapter_name: str) -> None:
    """Make `adapter_name` the active adapter, frozen (peft's `set_adapter` would otherwise mark its
    weights trainable); nothing to do when it is active already (a switch walks every module)."""
    if model.active_adapter != adapter_name:
        model.set_adapter(adapter_name, inference_mode=True)


def adapter_base(folder: str) -> str | None:
    """The base model a qtune adapter folder was trained on (comparable across spellings of one
    local path), or None when `folder` is not a qtune adapter."""
    meta = read_meta(folder)
    if meta is None or not meta.adapter:
        return None
    base = Path(meta.base_model)
    return str(base.resolve()) if base.exists() else meta.base_model


def load_adapters(folders: Sequence[str], spec: ModelSpec, *, device: str = "auto", precision: str = "auto",
                  packing: bool = True) -> list[AdapterView]:
    """One view per qtune adapter folder (same task, same base model), in order, over one model."""
    folders = [str(f) for f in folders]
    metas = [_adapter_meta(folder, spec) for folder in folders]
    _check_one_base(folders)
    if precision == "int8":
        raise QtuneError("int8 models have their adapter merged into an ONNX export: load each adapter on its own")
    first = load_model(folders[0], spec, device=device, precision=precision, packing=packing)
    shared = {f.name: getattr(first, f.name) for f in fields(LoadedModel) if f.name != "meta"}
    lock = threading.RLock()
    views = [AdapterView(**shared, meta=first.meta, adapter_name=FIRST_ADAPTER, lock=lock)]
    first_head = spec.prepare(read_meta(folders[0], spec.saved_settings), folders[0], first.tokenizer, first.family)
    for i, (folder, meta) in enumerate(zip(folders[1:], metas[1:]), start=1):
        tokenizer = load_tokenizer(folder, first.family)
        _check_tokenizer(folder, tokenizer, folders[0], first.tokenizer)
        head = spec.prepare(meta, folder, first.tokenizer, first.family)
        _check_head(folder, _shape_of(head), folders[0], _shape_of(first_head))
        name = f"adapter{i}"  # peft keeps adapters in module dicts: the served name may hold dots
        try:
            first.model.load_adapter(folder, adapter_name=name, is_trainable=False, torch_device=str(first.device))
        except (OSError, ValueError, RuntimeError) as e:
            raise QtuneError(f"cannot load the adapter in {folder} onto {metas[0].base_model}: {e}") from None
        views.append(AdapterView(**shared, meta=meta, adapter_name=name, lock=lock))
    first.model.to(first.device)
    first.model.eval()
    return views


def _adapter_meta(folder: str, spec: ModelSpec) -> CheckpointMeta:
    meta = read_meta(folder, spec.saved_settings)
    if meta is None or not meta.adapter:
        raise QtuneError(f"{folder} is not a qtune LoRA adapter folder (qtune.json with adapter: true); only "
                         "adapters share one base model")
    if meta.task != spec.name:
        raise QtuneError(f"{folder} was trained for {meta.task}, not {spec.name}")
    return meta


def _check_one_base(folders: list[str]) -> None:
    bases = [adapter_base(f) for f in folders]
    for folder, base in zip(folders[1:], bases[1:]):
        if base != bases[0]:
            raise QtuneError(f"adapters served on one base must share it: {folders[0]} is an adapter of {bases[0]}, "
                             f"{folder} of {base}")


def _check_tokenizer(folder: str, tokenizer, first_folder: str, first) -> None:
    """The embedding matrix and the pad id in the model config are shared: so must the vocabulary be."""
    if tokenizer.get_vocab() != first.get_vocab():
        raise QtuneError(f"the adapters in {first_folder} and {folder} have different tokenizer vocabularies "
                         f"({len(first)} and {len(tokenizer)} tokens); adapters of one base share its tokenizer")
    if tokenizer.pad_token_id != first.pad_token_id:
        raise QtuneError(f"the adapters in {first_folder} and {folder} pad with different tokens "
                         f"({first.pad_token_id} and {tokenizer.pad_token_id}); adapters of one base share it")


def _shape_of(head: dict) -> dict:
    return {k: v for k, v in head.items() if k not in PER_ADAPTER_HEAD_SETTINGS}


def _check_head(folder: str, head: dict, first_folder: str, first: dict) -> None:
    if head != first:
        differ = ", ".join(f"{k}: {first.get(k)} vs {head.get(k)}" for k in sorted({*head, *first})
                           if head.get(k) != first.get(k))
        raise QtuneError(f"the adapters in {first_folder} and {folder} need different heads ({differ}); adapters "
                         "served on one base share the head's shape: serve them as separate models "
                         "(qtune serve --separate-adapters)")
