"""Sources for the export tests: qtune checkpoint folders of any task on the tiny models, with LoRA
adapters moved off their zero start (so an export that skipped the merge would predict differently)."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = ["neg", "pos", "mid"]


def lora_source(base: str, task: str, folder: Path, *, max_length: int = 24, meta: dict | None = None,
                run_settings: dict | None = None) -> Path:
    """`folder/best`, a LoRA checkpoint of `task` on `base` (labels LABELS for classifiers; `meta`
    overrides qtune.json fields such as an embedder's pooling), and with `run_settings` the run's
    config.yaml beside it."""
    import torch
    import yaml

    from qtune.modeling.checkpoint import save_checkpoint
    from qtune.modeling.loading import LoraSettings
    from qtune.tasks import load_model

    labels = None if task == "embedding" else LABELS
    loaded = load_model(base, task=task, labels=labels, max_length=max_length, lora=LoraSettings(), device="cpu",
                        precision="fp32")
    for name, value in (meta or {}).items():  # a shared field of qtune.json, or one of the task's own
        holder = loaded.meta if name in loaded.meta.__dataclass_fields__ else loaded.meta.settings
        assert name in holder.__dataclass_fields__, name
        setattr(holder, name, value)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name or "score" in name or "classifier" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    save_checkpoint(loaded, folder / "best")
    if run_settings is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(run_settings), encoding="utf-8")
    return folder / "best"


def edit_json(path: Path, change) -> None:
    """Rewrite a JSON file with `change(value)` applied (to tamper with an export)."""
    value = json.loads(path.read_text(encoding="utf-8"))
    change(value)
    path.write_text(json.dumps(value), encoding="utf-8")


def drop_tokenizer_template(export: Path) -> None:
    """Remove the tokenizer template the export added (a decoder tokenizer then appends nothing)."""
    def strip(tokenizer):
        processor = tokenizer["post_processor"]
        if processor and processor["type"] == "Sequence":
            tokenizer["post_processor"] = processor["processors"][0]

    edit_json(export / "tokenizer.json", strip)


def exported_case(request, tmp_path_factory, task: str) -> tuple:
    """(family, source folder, export folder, the source's qtune wrapper) for a LoRA run of `task` on
    the tiny model of the family `request.param` ("bert" or "qwen3"), exported with --format auto."""
    import qtune
    from qtune.api import export

    base = request.getfixturevalue("tiny_bert_dir" if request.param == "bert" else "tiny_qwen_dir")
    folder = tmp_path_factory.mktemp(f"{task}-{request.param}")
    source = lora_source(base, task, folder / "run")
    return request.param, source, export(str(source), str(folder / "export")), qtune.load(source, device="cpu")
