"""Pooling: how a sequence of hidden states becomes one vector, and which pooling a model was trained with.

- "last": the last real token (decoders such as Qwen3-Embedding; whichever side the padding is on);
- "mean": the mean over real tokens (sentence-transformers' MiniLM);
- "cls": the first token (bge).
A BERT-family model's own sentence-transformers config (`1_Pooling/config.json`) says which.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtune.modeling.family import Family

POOLING_MODES = ("last", "mean", "cls")


# sentence-transformers' pooling modes as qtune names them: the 1_Pooling/config.json of version 6+
# says `"pooling_mode": "mean"` (or a list of modes), earlier versions one boolean flag per mode.
ST_MODES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
ST_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "lasttoken",
            "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens": "weightedmean"}


def default_pooling(name_or_path: str, family: Family) -> str:
    """The pooling `name_or_path` was trained with: its sentence-transformers config's, "last" for a
    decoder, "cls" for an encoder without one (bge, plain BERT). A config naming a pooling qtune does
    not compute (max, weighted mean, several at once) is an error, not a silent [CLS]."""
    if family.is_decoder:
        return "last"
    config = _pooling_config(name_or_path)
    if config is None:
        return "cls"
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes or [])
    else:
        modes = [mode for flag, mode in ST_FLAGS.items() if config.get(flag)]
    if len(modes) == 1 and modes[0] in ST_MODES:
        return ST_MODES[modes[0]]
    from qtune.errors import QtuneError

    raise QtuneError(f"{name_or_path}: its sentence-transformers pooling is {modes or 'not given'} "
                     f"(1_Pooling/config.json); qtune pools with one of {', '.join(ST_MODES)}")


def _pooling_config(name_or_path: str) -> dict | None:
    local = Path(name_or_path, "1_Pooling", "config.json")
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    if Path(name_or_path).exists():
        return None
    # A hub id: sentence-transformers models publish their pooling next to the weights. Only a
    # repository that has no such file means [CLS]; a file that could not be read (offline and not
    # cached, a network or permission error) would otherwise embed with the wrong pooling, silently.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        path = hf_hub_download(name_or_path, "1_Pooling/config.json")
    except RemoteEntryNotFoundError:
        return None
    except Exception as error:
        from qtune.errors import QtuneError

        raise QtuneError(f"{name_or_path}: cannot read its pooling (1_Pooling/config.json) from the hub "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         "download the model into a folder and pass the folder") from error
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pool(hidden, attention_mask, mode: str):
    """(batch, seq, dim) hidden states and (batch, seq) mask -> (batch, dim)."""
    import torch

    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        # the last real token, whichever side the padding is on
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)  # (batch,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; use one of {POOLING_MODES}")


def normalize(vectors):
    """L2-normalise in float32. (batch, dim) -> (batch, dim)."""
    import torch.nn.functional as F

    return F.normalize(vectors.float(), p=2, dim=-1)
