"""Exports that other engines load and that give qtune's own outputs there.

An export folder holds the merged transformers checkpoint (config, weights, tokenizer) with its
qtune.json, so `qtune.load(OUT)` works like the source; `qtune_export.json`, the note of where it
came from (`qtune check-export OUT` loads that source to compare); and whatever the task's format
adds (sentence-transformers modules, see each task's `export.py`). The tokenizer files carry what
qtune does itself when it encodes: the tokens it appends (an embedder's end token, a decoder
classifier's EOS and pair separator) as the tokenizer's own template, the padding side and the
maximum length, so a plain `tokenizer(text)` in another engine gives qtune's token ids.

Task-agnostic: the task's writer is passed in (`writer`), and the helpers below serve every task
whose head is a sequence classifier.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

from qtune import __version__
from qtune.errors import QtuneError
from qtune.modeling.checkpoint import check_export_target, merge_lora, save_model_files
from qtune.modeling.loading import LoadedModel

EXPORT_NOTE = "qtune_export.json"
DEFAULT_TOLERANCE = 1e-5

# What `qtune check-export` feeds each engine: mixed lengths (padding in a batch), two languages,
# a repeated word run long enough to be cut at a small --max-length (truncation).
SAMPLE_TEXTS = (
    "How do I reset my password?",
    "cat",
    "The delivery was two days late and the box arrived damaged, so I would like a refund.",
    "如何修改绑定的手机号码",
    "my old red bus is here now",
    "花呗的账单什么时候出",
    "A small green train goes there every morning, and a big bus comes back in the evening. " * 6,
    "Is the shop open on Sunday?",
)


def export_model(loaded: LoadedModel, output: str | os.PathLike, *, task: str, fmt: str, source: str,
                 writer: Callable[[LoadedModel, Path, str], None] | None = None,
                 card: Callable[[str], str] | None = None) -> Path:
    """Merge LoRA and write the export of `loaded` (loaded on the CPU in fp32) at `output`, which must
    not exist yet or be empty. The export note goes in first; then `writer(loaded, folder, fmt)` (the
    task's `write_export`) writes the model, or the plain merged checkpoint is saved without one. The
    folder appears whole or not at all. `card(usage text)` gives its README.md (the model card)."""
    from qtune.io import atomic_dir

    output = check_export_target(output)
    merge_lora(loaded)
    with atomic_dir(output) as tmp:
        note = {"source": source, "task": task, "format": fmt, "qtune_version": __version__}
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if writer is None:
            save_model_files(loaded, tmp)
        else:
            writer(loaded, tmp, fmt)
        if card is not None:  # the model card, around whatever usage text the task's writer put in README.md
            readme = tmp / "README.md"
            body = readme.read_text(encoding="utf-8") if readme.is_file() else ""
            readme.write_text(card(body), encoding="utf-8")
    return output


def read_export_note(output: str | os.PathLike) -> dict | None:
    """The note of a qtune export (source, task, format), or None for a folder without one."""
    path = Path(output, EXPORT_NOTE)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def source_setting(output: str | os.PathLike, name: str):
    """A training setting (e.g. `matryoshka_dims`) of the run the export's source came from: its
    config.yaml, beside the checkpoint folder (`run/best` -> `run/config.yaml`) or in it; None when
    the source has no such run or the run did not set it."""
    note = read_export_note(output)
    if note is None:
        return None
    return run_setting(note["source"], name)


def run_setting(checkpoint: str | os.PathLike, name: str):
    """A training setting of the run a checkpoint folder belongs to: its config.yaml, in it or beside
    it (`run/best` -> `run/config.yaml`); None for a folder of no run (a hub id, a base model) or
    a setting the run did not set."""
    import yaml

    source = Path(checkpoint)
    if not source.is_dir():
        return None
    for config in (source / "config.yaml", source.parent / "config.yaml"):
        if config.is_file():
            settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            return settings.get(name) if isinstance(settings, dict) else None
    return None


# -- the tokenizer as other engines use it


def append_to_template(tokenizer, end: Sequence[int], pair_separator: Sequence[int] = ()) -> None:
    """Make the tokenizer's own template append what qtune appends by hand: `text end` for one text
    and `a pair_separator b end` for a pair (the tokenizer truncates before it adds them, as qtune
    does). For tokenizers without a template of their own (decoders); a fast tokenizer's
    post-processor is saved in tokenizer.json, which transformers, sentence-transformers and TEI read."""
    from tokenizers import processors

    backend = tokenizer.backend_tokenizer
    tokens = {i: tokenizer.convert_ids_to_tokens(i) for i in (*end, *pair_separator)}
    for i, token in tokens.items():
        if not token or ":" in token or " " in token:  # the template syntax is "token:type_id", space-separated
            raise QtuneError(f"cannot put token {token!r} (id {i}) in the tokenizer's template")
    end_0 = [f"{tokens[i]}:0" for i in end]
    single = ["$A:0", *end_0]
    pair = ["$A:0", *(f"{tokens[i]}:0" for i in pair_separator), "$B:1", *(f"{tokens[i]}:1" for i in end)]
    template = processors.TemplateProcessing(single=single, pair=pair,
                                             special_tokens=[(token, i) for i, token in tokens.items()])
    current = backend.post_processor
    if current is None or current.num_special_tokens_to_add(False):
        # qtune encodes decoder texts without the tokenizer's own specials (a BOS template): drop them
        backend.post_processor = template
    else:  # ByteLevel and the like only fix offsets: keep them
        backend.post_processor = processors.Sequence([current, template])
    probe = tokenizer("probe", add_special_tokens=False)["input_ids"]
    if tokenizer("probe")["input_ids"] != probe + list(end):
        raise QtuneError("the tokenizer's template did not take the end tokens; this tokenizer cannot be exported")


def keep_tokenizer_settings(tokenizer, max_length: int) -> None:
    """Save the padding side qtune uses (left for decoders, so the last position is real) and the
    model's max length with the tokenizer: transformers writes a tokenizer's init settings, not the
    ones changed after loading."""
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side
    tokenizer.model_max_length = max_length


# -- classifiers (sequence-classification heads): `transformers.pipeline("text-classification")`


def write_classifier_export(loaded: LoadedModel, output: Path, end: Sequence[int],
                            pair_separator: Sequence[int] = ()) -> None:
    """A sequence classifier that `pipeline("text-classification", model=OUT)` loads: labels named in
    the config (softmax over them), the pad token set, and for decoders (`end`: the tokens qtune
    appends; `pair_separator`: what it puts between a pair's texts) the tokenizer template that
    encodes texts as qtune does. A head over the mean of the last hidden state is refused: the
    transformers head would classify BERT's pooler output instead (see `write_mean_classifier_export`)."""
    if loaded.meta.settings.pooling == "mean":
        raise QtuneError("this classifier's head reads the mean of the last hidden state, which transformers' "
                         "BERT head cannot (it reads the pooler): export it with --format sentence-transformers")
    tokenizer, config = loaded.tokenizer, loaded.model.config
    if loaded.family.is_decoder:
        append_to_template(tokenizer, end, pair_separator)
    keep_tokenizer_settings(tokenizer, loaded.meta.max_length)
    config.problem_type = "single_label_classification"
    config.pad_token_id = tokenizer.pad_token_id
    save_model_files(loaded, output)


def pipeline_differences(output: Path, labels: Sequence[str], inputs: list, expected) -> dict[str, float]:
    """{engine: max abs difference} between `expected` ((rows, labels) probabilities, in the model's
    label order) and what `pipeline("text-classification", model=output)` gives for `inputs`
    (texts, or {"text", "text_pair"} dicts), one at a time and in one padded batch."""
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(output), device="cpu")
    differences = {}
    for engine, batch_size in (("transformers pipeline", 1), ("transformers pipeline, batched", len(inputs))):
        rows = classifier(inputs, top_k=None, function_to_apply="softmax", truncation=True, batch_size=batch_size)
        differences[engine] = max(_label_difference(row, labels, probs) for row, probs in zip(rows, expected))
    return differences


def _label_difference(row: list[dict], labels: Sequence[str], probs) -> float:
    """Max abs difference of one pipeline answer ([{label, score}], best first) from `probs`; a
    label the export names differently counts as infinitely far."""
    scores = {answer["label"]: answer["score"] for answer in row}
    if set(scores) != set(labels):
        return math.inf
    return max(abs(scores[label] - float(p)) for label, p in zip(labels, probs))


# -- classifiers over the mean of the last hidden state (see qtune.modeling.heads): sentence-transformers

MEAN_POOLING = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False, "include_prompt": True}
USAGE = """# qtune {kind} export (sentence-transformers)

The head classifies the mean of the encoder's last hidden state, which `transformers.pipeline`
cannot reproduce (a BERT head reads the pooler): load it with sentence-transformers. `encode`
returns the logits (Transformer -> mean Pooling -> Dense to the labels, no activation); their
softmax is qtune's probabilities, in the order of `id2label` in config.json ({labels}).

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH")
logits = model.encode({example}, convert_to_tensor=True)
probs = logits.softmax(-1)
```
"""


def write_mean_classifier_export(loaded: LoadedModel, output: Path, kind: str, example: str) -> None:
    """A classifier over the mean of the last hidden state as a sentence-transformers folder whose
    `encode` gives its logits: Transformer (the merged model, max_seq_length = qtune's max length)
    -> Pooling (mean over the attention mask, special tokens included, as qtune pools) -> Dense
    (the head's weights, identity activation). The merged checkpoint and qtune.json stay at the root,
    so `qtune.load(OUT)` works as on the source. `example`: the `encode` argument in the README."""
    from safetensors.torch import save_file

    if loaded.meta.settings.pooling != "mean":
        raise QtuneError(f"a {kind} with a transformers head exports as transformers, not sentence-transformers")
    tokenizer, config = loaded.tokenizer, loaded.model.config
    keep_tokenizer_settings(tokenizer, loaded.meta.max_length)
    config.problem_type = "single_label_classification"
    save_model_files(loaded, output)
    head = loaded.model.classifier
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    _write_json(output / "modules.json", modules)
    _write_json(output / "sentence_bert_config.json", {"max_seq_length": loaded.meta.max_length,
                                                       "do_lower_case": False})
    _write_json(output / "config_sentence_transformers.json", {"model_type": "SentenceTransformer", "prompts": {},
                                                               "default_prompt_name": None})
    _write_json(output / "1_Pooling" / "config.json", {"word_embedding_dimension": head.in_features, **MEAN_POOLING})
    _write_json(output / "2_Dense" / "config.json", {"in_features": head.in_features, "out_features": head.out_features,
                                                     "bias": head.bias is not None,
                                                     "activation_function": "torch.nn.modules.linear.Identity"})
    weights = {"linear.weight": head.weight.detach().float().contiguous()}
    if head.bias is not None:
        weights["linear.bias"] = head.bias.detach().float().contiguous()
    save_file(weights, str(output / "2_Dense" / "model.safetensors"))
    labels = ", ".join(loaded.meta.settings.labels)
    (output / "README.md").write_text(USAGE.format(kind=kind, labels=labels, example=example), encoding="utf-8")


def is_sentence_transformers_export(output: Path) -> bool:
    return (Path(output) / "modules.json").is_file()


def sentence_transformers_differences(output: Path, inputs: list, expected) -> dict[str, float]:
    """{engine: max abs difference} between `expected` ((rows, labels) probabilities) and the softmax
    of `SentenceTransformer(output).encode(inputs)` (texts, or [a, b] pairs), one at a time and in
    one padded batch."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(output), device="cpu")
    differences = {}
    for engine, batch_size in (("sentence-transformers", 1), ("sentence-transformers, batched", len(inputs))):
        logits = model.encode(inputs, batch_size=batch_size, convert_to_tensor=True)
        differences[engine] = max_abs_difference(torch.softmax(logits.float(), dim=-1).numpy(), expected)
    return differences


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def max_abs_difference(a, b) -> float:
    """The largest absolute difference of two equally shaped arrays; inf when the shapes differ."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.shape == b.shape else math.inf


def difference_table(differences: dict[str, float], tolerance: float) -> str:
    """What `qtune check-export` prints: one line per engine, its max abs difference and whether it
    is within `tolerance`."""
    width = max([len("engine"), *map(len, differences)])
    lines = [f"{'engine':<{width}}  max abs difference", f"{'-' * width}  ------------------"]
    for engine, difference in differences.items():
        verdict = "ok" if difference <= tolerance else f"OVER {tolerance:g}"
        lines.append(f"{engine:<{width}}  {difference:<18.3g}  {verdict}")
    return "\n".join(lines)
