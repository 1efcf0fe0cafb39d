"""The one model-loading path used by training, evaluation, prediction, export and serving.

`load_model` accepts a hub id, a plain local transformers folder, a qtune checkpoint folder
(LoRA adapter + qtune.json) or an exported (merged) qtune folder, and always returns the model
with the same tokenizer settings (padding side, pad token), so a model behaves the same everywhere.

Hub ids are checked before anything loads (`check_sources`): without network the hub client would
retry for up to a minute and then print a long error; here it fails in seconds and says what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Sequence

from qtune import __version__
from qtune.config import is_integer
from qtune.distributed import device_name
from qtune.errors import DataError, QtuneError, held_logs
from qtune.hub import hub_reachable
from qtune.modeling.family import Family, family_of
from qtune.modeling.packing import PACKED_ENCODERS

log = logging.getLogger(__name__)

META_FILE = "qtune.json"


class ModelSpec(Protocol):
    """What the loader needs from a task (each `qtune.tasks` Task is one): which transformers auto
    class carries its head, how LoRA wraps it, and the head settings and metadata defaults."""

    name: str
    int8_output: str | None  # the output an int8 ONNX export returns ("logits", ...); None: no int8
    saved_settings: type[SavedSettings]  # its own fields of qtune.json

    def auto_class(self, family: Family) -> str: ...

    def peft_task_type(self, family: Family) -> str: ...

    def lora_targets(self, family: Family) -> list[str]: ...

    def prepare(self, meta: "CheckpointMeta", source: str, tokenizer, family: Family) -> dict:
        """Fill `meta`'s task defaults (pooling, instruction, labels); return from_pretrained kwargs."""
        ...


@dataclass
class SavedSettings:
    """A task's own fields of qtune.json (its `Task.saved_settings`, a dataclass deriving from this
    one): stored beside `CheckpointMeta`'s shared fields, each field checked on load by the function
    in its metadata "check" (value -> None where usable, else what is allowed). This one has none."""

    def card_lines(self) -> list[str]:
        """Markdown lines the model card adds about these settings (none by default)."""
        return []


@dataclass
class CheckpointMeta:
    """What qtune needs to use a saved model exactly as it was trained (stored as qtune.json): the
    fields every task has, and `settings`, the task's own (pooling, instruction, labels, ...)."""

    task: str
    base_model: str
    adapter: bool
    max_length: int = 512
    settings: SavedSettings = field(default_factory=SavedSettings)
    qtune_version: str = __version__

    def save(self, folder: str | os.PathLike) -> None:
        shared = {k: v for k, v in asdict(self).items() if k != "settings"}
        data = {**{k: shared.pop(k) for k in REQUIRED_FIELDS}, **asdict(self.settings), **shared}
        Path(folder, META_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Each task's SavedSettings class by task name, filled as the task registry (qtune.tasks) loads.
SETTINGS_BY_TASK: dict[str, type[SavedSettings]] = {}


def register_saved_settings(task: str, cls: type[SavedSettings]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, SavedSettings)):
        raise TypeError(f"task {task!r}: saved_settings must be a qtune.modeling.loading.SavedSettings dataclass")
    taken = sorted({f.name for f in fields(cls)} & set(CheckpointMeta.__dataclass_fields__))
    if taken:
        raise TypeError(f"task {task!r}: saved_settings field(s) {', '.join(taken)} are qtune.json's shared fields")
    SETTINGS_BY_TASK[task] = cls


def new_settings(cls: type[SavedSettings], **values) -> SavedSettings:
    """Settings of class `cls` at their defaults, but `values` (those the class has)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# Bounds of qtune.json values. Every value qtune writes lies inside them; a value outside was typed
# or damaged, and used as it stands it fails deep inside tokenizers, transformers or peft instead.
MAX_LENGTH_CAP = 1 << 20  # tokens: beyond the context of any model small enough for qtune
MAX_LABELS = 10_000  # a classifier head with more outputs is no small classifier
RESTORE_HINT = "restore the qtune.json written by training (or export), or correct it"


def read_meta(name_or_path: str | os.PathLike, settings: type[SavedSettings] | None = None) -> CheckpointMeta | None:
    """The qtune.json of a folder (None where there is none), checked field by field: a value qtune
    cannot use is a DataError naming the file, the field, the value and what is allowed. The shared
    fields are checked here, every task's own by its SavedSettings; the saved task's fields become
    `settings` (of class `settings`, by default the registered class of the task the file names)."""
    path = Path(name_or_path, META_FILE)
    if not path.is_file():
        return None
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg}, column {e.colno}); {RESTORE_HINT}", path=where,
                        line=e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot be read ({e}); {RESTORE_HINT}", path=where) from None
    if not isinstance(data, dict):
        raise DataError(f"holds a JSON {_json_type(data)}, expected an object of model settings "
                        f"({', '.join(REQUIRED_FIELDS)}, ...); {RESTORE_HINT}", path=where)
    for name in REQUIRED_FIELDS:
        if name not in data:
            raise DataError(f"missing; every qtune.json names {', '.join(REQUIRED_FIELDS)}; {RESTORE_HINT}",
                            path=where, field=name)
    for name, check in field_checks(settings).items():
        if name in data:
            allowed = check(data[name])
            if allowed is not None:
                raise DataError(f"{_shown(data[name])} is not allowed: {allowed}; {RESTORE_HINT}",
                                path=where, field=name)
    # Fields this qtune does not know come from a newer one (or another task): left out, not refused.
    shared = {k: v for k, v in data.items() if k in CheckpointMeta.__dataclass_fields__ and k != "settings"}
    cls = settings or SETTINGS_BY_TASK.get(data["task"], SavedSettings)
    return CheckpointMeta(**shared, settings=new_settings(cls, **data))


def field_checks(settings: type[SavedSettings] | None = None) -> dict:
    """field -> check(value) for the shared fields and for every registered task's own (and those of
    `settings`): a value is checked wherever it appears, so a damaged field is named even in another
    task's file."""
    checks = dict(SHARED_CHECKS)
    for cls in [*([settings] if settings else []), *SETTINGS_BY_TASK.values()]:
        for f in fields(cls):
            if "check" in f.metadata:
                checks.setdefault(f.name, f.metadata["check"])
    return checks


def _text(value, what: str) -> str | None:
    return None if isinstance(value, str) and value else f"expected {what}"


def check_optional_text(value) -> str | None:
    return None if value is None or isinstance(value, str) else "expected a string or null"


def _check_max_length(value) -> str | None:
    if is_integer(value) and 1 <= value <= MAX_LENGTH_CAP:
        return None
    return f"expected a whole number of tokens from 1 to {MAX_LENGTH_CAP}"


def check_labels(value) -> str | None:
    expected = (f"expected a list of 2 to {MAX_LABELS} distinct, non-empty label strings (or [] for a "
                f"task without labels)")
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return expected
    if len(value) == 1 or len(value) > MAX_LABELS:
        return f"{expected}, got {len(value)}"
    repeated = sorted(label for label, n in Counter(value).items() if n > 1)
    return f"{expected}; repeated: {repeated[:5]}" if repeated else None


def check_pooling(value) -> str | None:
    from qtune.modeling.pooling import POOLING_MODES

    if value is None or value in POOLING_MODES:
        return None
    return f"expected one of {', '.join(POOLING_MODES)} or null"


def check_threshold(value) -> str | None:
    if value is None or ((is_integer(value) or isinstance(value, float)) and math.isfinite(value)):
        return None
    return "expected a finite number or null"


REQUIRED_FIELDS = ("task", "base_model", "adapter")
# shared field -> check(value): None where the value is usable, else what is allowed
SHARED_CHECKS = {
    "task": lambda v: _text(v, "a task name (a non-empty string)"),
    "base_model": lambda v: _text(v, "a model folder or hub id (a non-empty string)"),
    "adapter": lambda v: None if isinstance(v, bool) else "expected true or false",
    "max_length": _check_max_length,
    "qtune_version": check_optional_text,
}


def _json_type(value) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _shown(value) -> str:
    """The value as JSON, shortened: a list of 100,000 labels is named by its length."""
    if isinstance(value, list) and len(value) > 5:
        return f"a list of {len(value)} items"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: Sequence[str] | None = None  # None: the family's attention projections


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel wrapping one
    tokenizer: Any
    family: Family
    meta: CheckpointMeta
    device: Any  # torch.device
    precision: str  # "fp32", "bf16", or "int8" (an ONNX Runtime model, see qtune.modeling.int8)
    packed: bool = False  # batches are padding-free packed rows (see qtune.modeling.packing)
    # modules a base checkpoint did not provide, so they start randomly initialised (a new head)
    new_modules: tuple[str, ...] = ()

    @property
    def is_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def autocast(self):
        """bf16 autocast where chosen; a no-op context in fp32."""
        import torch

        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def packs(self, rows: Sequence[dict]) -> bool:
        """Whether these unpadded rows go into a packed batch: always with the GPU flash kernel
        (bf16 on CUDA); otherwise only when padding would be a sizeable share of the batch (see
        `qtune.modeling.packing.MIN_PADDING_WITHOUT_KERNEL`)."""
        from qtune.modeling import packing

        if not self.packed or not rows:
            return False
        if self.device.type == "cuda" and self.precision == "bf16" and packing.has_flash_kernel():
            return True
        return packing.padding_share([len(r["input_ids"]) for r in rows]) >= packing.MIN_PADDING_WITHOUT_KERNEL

    def collate(self, features: Sequence[dict]) -> dict:
        """Unpadded model inputs -> one batch on the model's device: packed (see `packs`) or
        padded (the tokenizer's `pad`)."""
        from qtune.modeling.packing import pack_or_pad

        return to_device(pack_or_pad(self.tokenizer, features, self.packs), self.device)

    @contextlib.contextmanager
    def inference(self):
        """Eval mode, no gradients, autocast where chosen; the previous mode is restored after."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self.autocast():
                yield
        finally:
            self.model.train(was_training)

    def infer_batch(self, features: Sequence[dict], forward):
        """`forward(batch)` of ONE batch made of `features` (by `collate`), under `inference()`. The
        server's micro-batcher and `run_sorted` call the same `forward`."""
        with self.inference():
            return forward(self.collate(features))

    def sorted_batches(self, lengths: Sequence[int], *, batch_size: int, max_tokens: int | None = None,
                       desc: str = "predict", progress: bool = False):
        """Index arrays of batches sorted by length, longest first (least padding): at most
        `batch_size` rows and, with `max_tokens`, at most that many tokens counting padding (a longer
        single row still runs alone). Shows a progress bar with `progress`."""
        import numpy as np
        from tqdm.auto import tqdm

        from qtune.data.batching import sorted_batches

        lengths = np.asarray(lengths)
        order = np.argsort(-lengths, kind="stable")
        for start, end in tqdm(sorted_batches(lengths[order].tolist(), batch_size, max_tokens), desc=desc,
                               unit="batch", disable=not progress):
            yield order[start:end]

    def run_sorted(self, features: Sequence[dict], out, forward, *, batch_size: int, max_tokens: int | None = None,
                   desc: str = "predict", progress: bool = False):
        """Inference over `features` in length-sorted batches (see `sorted_batches`): `out[rows] =
        forward(batch)` for each batch made by `collate`, under `inference()`. Returns `out`."""
        lengths = [len(f["input_ids"]) for f in features]
        with self.inference():
            for rows in self.sorted_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, desc=desc,
                                            progress=progress):
                out[rows] = forward(self.collate([features[i] for i in rows]))
        return out


def to_device(batch: dict, device) -> dict:
    """Tensors to `device` (asynchronously); plain Python values (lengths, counts) stay as they are."""
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def resolve_device(device: str = "auto"):
    """The torch device for --device; under torchrun / accelerate launch, `auto` and `cuda` are the
    GPU of this process's LOCAL_RANK (qtune.distributed.device_name)."""
    import torch

    device = device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device) -> str:
    import torch

    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in {"fp32", "bf16"}:
        raise QtuneError(f"unknown precision {precision!r}; use auto, fp32 or bf16 (or int8 to run on a CPU)")
    return precision


def check_sources(*names: str | os.PathLike) -> None:
    """Raise a QtuneError, before any download is tried, for a model that cannot be had: a path that
    is not there, a hub id not in the local cache under HF_HUB_OFFLINE=1, or a hub id while the hub
    cannot be reached. Local folders never touch the network; the hub is probed once per call."""
    hub_ids = []
    for name in dict.fromkeys(str(n) for n in names):
        if Path(name).is_file():
            # transformers would take it for a malformed hub id and say so
            folder = Path(name).parent
            raise QtuneError(f"cannot load model '{name}': it is a file; a model is a folder (the one that holds "
                             f"config.json and the weights, here perhaps '{folder}') or a hub id such as "
                             f"'org/model'")
        if Path(name).exists():
            continue
        if _looks_like_path(name):
            raise QtuneError(f"cannot load model '{name}': no such folder")
        hub_ids.append(name)
    if not hub_ids:
        return
    from huggingface_hub import constants

    cached = {name: _in_hub_cache(name) for name in hub_ids}
    if constants.HF_HUB_OFFLINE:
        for name in hub_ids:
            if not cached[name]:
                raise QtuneError(f"cannot load model '{name}': it is not a local folder and not in the local "
                                 f"Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids "
                                 f"downloading it: pass a local folder, or download it once with the network on")
        return
    if not hub_reachable(constants.ENDPOINT):
        name = hub_ids[0]
        cache_note = "; the model is in the local cache, so offline mode will find it" if cached[name] else ""
        raise QtuneError(f"cannot load model '{name}': the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
                         f"(no network: pass a local folder or set HF_HUB_OFFLINE=1{cache_note})")


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be (`org/model` has one slash and no leading ./ or ~): a missing folder."""
    return name.startswith((".", "~", "/")) or Path(name).is_absolute() or name.count("/") > 1 or "\\" in name


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid hub id: the loader says so itself
        return False


def load_tokenizer(name_or_path: str, family: Family):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise QtuneError(f"cannot load the tokenizer of '{name_or_path}': {e}") from None
    tokenizer.padding_side = family.padding_side
    if tokenizer.pad_token is None:
        # Decoders often ship without a pad token; any id works for padding because it is masked,
        # but it must differ from real tokens at the pooled position, so prefer EOS over UNK.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise QtuneError(f"the tokenizer of '{name_or_path}' has no pad, eos or unk token to pad with")
    return tokenizer


def load_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise QtuneError(f"cannot load model '{name_or_path}': {e}") from None


def load_model(name_or_path: str | os.PathLike, spec: ModelSpec, *, labels: Sequence[str] | None = None,
               max_length: int | None = None, lora: LoraSettings | None = None, trainable: bool = False,
               device: str = "auto", precision: str = "auto", packing: bool = True) -> LoadedModel:
    """Load a model for the task `spec`, ready to train (`trainable=True`) or to run.

    A qtune folder brings its own labels and max length. For a base model, `lora` wraps it with
    fresh LoRA adapters (training); `lora=None` keeps every weight trainable. `packing`: decoders
    take padding-free packed batches (same results, no work on padding); encoders and int8 models
    are always padded. Callers pick `spec` from the task registry (`qtune.tasks.load_model`).
    """
    import torch

    name_or_path = str(name_or_path)
    saved = read_meta(name_or_path, spec.saved_settings)
    meta = saved
    if meta is not None and meta.task != spec.name:
        raise QtuneError(f"'{name_or_path}' was trained for {meta.task}, not {spec.name}")
    quantize = precision == "int8"  # loaded in fp32, then exported to an int8 ONNX Runtime model
    torch_device = resolve_device("cpu" if quantize and device == "auto" else device)
    if quantize and trainable:
        raise QtuneError("an int8 model runs inference only; train in fp32 or bf16")
    chosen = resolve_precision("fp32" if quantize else precision, torch_device)

    base = meta.base_model if meta is not None and meta.adapter else name_or_path
    check_sources(name_or_path, base)
    config = load_config(base)
    family = family_of(config)
    tokenizer = load_tokenizer(name_or_path, family)
    if meta is None:
        given = {"labels": list(labels)} if labels else {}  # else the task's default labels, if it has any
        meta = CheckpointMeta(task=spec.name, base_model=name_or_path, adapter=lora is not None,
                              max_length=max_length or default_max_length(name_or_path, tokenizer),
                              settings=new_settings(spec.saved_settings, **given))
    elif max_length is not None:
        meta.max_length = max_length
    head_kwargs = spec.prepare(meta, name_or_path, tokenizer, family)
    # Frozen base weights can live in bf16 (half the memory, faster); trained ones stay fp32. For
    # inference every weight is frozen: bf16 weights also spare autocast a cast of each weight on
    # every call (torch does not cache those casts under inference_mode).
    frozen_base = chosen == "bf16" and (lora is not None or not trainable)
    dtype = torch.bfloat16 if frozen_base else torch.float32
    import transformers

    auto_class = getattr(transformers, spec.auto_class(family))
    packs_encoder = spec.encoder_packing and family.model_type in PACKED_ENCODERS
    packed = packing and not quantize and (family.is_decoder or packs_encoder)
    if packed:
        from qtune.modeling.packing import register_attention

        head_kwargs["attn_implementation"] = register_attention()
    # transformers' load report calls every weight the checkpoint lacks newly initialised; qtune says
    # itself which of them are a new head and which the adapter restores (`_report_missing`)
    saved_adapter = saved is not None and saved.adapter
    with held_logs(LOAD_REPORT_LOGGER) as report:
        try:
            model, info = _from_pretrained(auto_class, base, saved, meta, config, dtype=dtype, **head_kwargs)
            model.config.pad_token_id = tokenizer.pad_token_id
            if saved_adapter:
                model = _peft_from_pretrained(model, name_or_path, meta, trainable)
        except QtuneError:
            report.clear()  # the error's one line says what is wrong
            raise
        new_modules = _report_missing(name_or_path, saved, info, trainable, report)
    if lora is not None and not saved_adapter:
        model = _add_lora(model, family, lora, _untrained_modules(info.get("missing_keys", ())), spec)
    if trainable:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.to(torch_device)
    model.train(trainable)
    if torch_device.type == "cpu":
        from qtune.modeling.cpu_fusion import fuse_feed_forward

        fuse_feed_forward(model)  # inference on CPU: activations inside the matrix product
    loaded = LoadedModel(model=model, tokenizer=tokenizer, family=family, meta=meta, device=torch_device,
                         precision=chosen, packed=packed,
                         new_modules=tuple(new_modules))
    if quantize:
        from qtune.modeling.int8 import quantize_int8

        quantize_int8(loaded, output=spec.int8_output, source=name_or_path)
    return loaded


def default_max_length(name_or_path: str, tokenizer) -> int:
    """The model's own limit: sentence-transformers' max_seq_length, else the tokenizer's (capped at 512)."""
    st_config = Path(name_or_path, "sentence_bert_config.json")
    if st_config.is_file():
        value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit <= 512 else 512


def _untrained_modules(missing_keys: Sequence[str]) -> list[str]:
    """Modules the base checkpoint did not provide (so they were randomly initialised).

    They must be trained and saved with the adapter; otherwise a reload would draw new random
    weights and predict differently.
    """
    return sorted({key.rsplit(".", 1)[0] for key in missing_keys})


LOAD_REPORT_LOGGER = "transformers.modeling_utils"  # where from_pretrained logs its LOAD REPORT


def _from_pretrained(auto_class, base: str, saved: CheckpointMeta | None, meta: CheckpointMeta, base_config,
                     **kwargs):
    """(model, loading info) of `auto_class.from_pretrained(base)`, its failures as QtuneErrors.
    `base_config`: the checkpoint's config, unless a head passes its own as `config`."""
    config = kwargs.get("config", base_config)
    try:
        return auto_class.from_pretrained(base, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise QtuneError(_refused_pickle(base, "model", e)) from None
    except RuntimeError as e:
        # a full checkpoint's head has the outputs its config.json counts
        if saved is None or "mismatch" not in str(e) or len(meta.settings.labels) == config.num_labels:
            raise
        raise QtuneError(_head_mismatch(base, meta, config.num_labels)) from None
    except (OSError, ValueError) as e:
        raise QtuneError(f"cannot load model '{base}': {e}") from None


def _peft_from_pretrained(model, folder: str, meta: CheckpointMeta, trainable: bool):
    """`model` wrapped with the LoRA adapter (and head) saved in `folder`, its failures as QtuneErrors."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    except pickle.UnpicklingError as e:
        raise QtuneError(_refused_pickle(folder, "adapter", e)) from None
    except RuntimeError as e:
        # peft: "size mismatch for ...classifier.modules_to_save.default.bias: copying a param with
        # shape torch.Size([2]) from checkpoint, ..."; a saved head's first dimension is its outputs
        head = re.search(r"size mismatch for \S*modules_to_save\S*: copying a param with shape "
                         r"torch\.Size\(\[(\d+)", str(e))
        if head is None:
            raise
        raise QtuneError(_head_mismatch(folder, meta, int(head[1]))) from None


def _report_missing(name_or_path: str, saved: CheckpointMeta | None, info: dict, trainable: bool,
                    report: list) -> list[str]:
    """The new (randomly initialised) modules of a model just loaded, said in one qtune line instead
    of transformers' load report; returns them (none for a qtune folder, whose checkpoint holds them).

    A LoRA checkpoint's base lacks the head the adapter file brings back (peft's `modules_to_save`):
    nothing is new there, and nothing is said. A weight that neither the base nor the adapter holds
    keeps transformers' report, which tells the whole story of that unexpected state."""
    missing_keys = list(info.get("missing_keys", ()))
    missing = _untrained_modules(missing_keys)
    if saved is None:
        report.clear()
        if missing:
            # training is what a new head is loaded for; elsewhere it answers at random
            log.log(logging.INFO if trainable else logging.WARNING,
                    "%s has no weights for %s: the head is new and untrained; %s", name_or_path, ", ".join(missing),
                    "training starts it from random weights" if trainable else
                    "its outputs are random until the model is trained")
        return missing
    restored = _adapter_keys(name_or_path) if saved.adapter else set()
    # peft saves "classifier.weight" of the model it wraps as "base_model.model.classifier.weight"
    if all(any(k == key or k.endswith("." + key) for k in restored) for key in missing_keys):
        report.clear()
    return []


def _adapter_keys(folder: str) -> set[str]:
    """The names of the weights in a peft adapter folder's file (LoRA matrices and whole modules)."""
    path = Path(folder, "adapter_model.safetensors")
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            return set(weights.keys())
    path = Path(folder, "adapter_model.bin")
    if path.is_file():
        import torch

        try:
            return set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except (pickle.UnpicklingError, RuntimeError, OSError):
            return set()
    return set()


def _refused_pickle(folder: str, kind: str, error: Exception) -> str:
    """Why a pickled weights file (`pytorch_model.bin`, `adapter_model.bin`) is refused."""
    pattern = "adapter_model*.bin" if kind == "adapter" else "pytorch_model*.bin"
    files = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    where = str(files[0]) if len(files) == 1 else f"{folder} ({pattern.replace('*', '')})"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    holds = f"Python objects ({found[1]})" if found else "Python objects"
    target = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    return (f"{where}: refused: this pickle file holds {holds}, not only tensors, and loading those could run "
            f"code; qtune loads only tensors (torch.load with weights_only=True). If you trust the file, "
            f"convert it to safetensors: torch.load it with weights_only=False and write the tensors with "
            f"safetensors.torch.save_file to {target} in the same folder, then delete the .bin")


def _head_mismatch(folder: str, meta: CheckpointMeta, outputs: int | None) -> str:
    """A qtune.json whose labels do not fit the classification head saved beside it."""
    head = f"has {outputs} outputs" if outputs is not None else "has another number of outputs"
    return (f"{Path(folder, META_FILE)}, field 'labels': {len(meta.settings.labels)} labels, but the classification head "
            f"saved in {folder} {head}: the labels must be those the model was trained with; {RESTORE_HINT}")


def _add_lora(model, family: Family, lora: LoraSettings, extra_modules: Sequence[str], spec: ModelSpec):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(lora.targets) if lora.targets else spec.lora_targets(family)
    config = LoraConfig(task_type=getattr(TaskType, spec.peft_task_type(family)), r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=targets, modules_to_save=list(extra_modules) or None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise QtuneError(f"cannot add LoRA to {family.model_type} with targets {targets}: {e}") from None


def load_tokenizer_only(name_or_path: str | os.PathLike):
    """(tokenizer, family) without loading weights; works for a folder holding only a tokenizer."""
    name_or_path = str(name_or_path)
    meta = read_meta(name_or_path)
    source = meta.base_model if meta is not None and meta.adapter else name_or_path
    check_sources(name_or_path, source)
    try:
        family = family_of(load_config(source))
    except QtuneError:
        family = None
    if family is None:
        from transformers import AutoTokenizer

        try:
            probe = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise QtuneError(f"cannot load the tokenizer of '{name_or_path}': {e}") from None
        # No model config: encoders' tokenizers have a pair template with [SEP]; decoders' do not.
        family = Family(model_type="unknown", is_decoder=probe.sep_token is None)
    return load_tokenizer(name_or_path, family), family
