"""Facts about model families that fail silently when wrong.

- Decoders (Qwen3, Llama, ...) pool the LAST real token. We pad them on the left, so the last
  position of every row is real, and Qwen3ForSequenceClassification needs `pad_token_id` to find
  the last non-pad token.
- Encoders (BERT, RoBERTa, MiniLM, bge) read the first token or a mean over real tokens, with
  absolute positions: they are padded on the right.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "distilbert",
    "deberta", "deberta-v2", "mpnet", "modernbert", "nomic_bert", "new",
}

# LoRA on the attention projections, named as each architecture names them.
_ATTENTION_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "camembert": ["query", "key", "value", "attention.output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense"],
    "ernie": ["query", "key", "value", "attention.output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense"],
    "mpnet": ["q", "k", "v", "o"],
    "modernbert": ["Wqkv", "Wo"],
}
_DECODER_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
_DECODER_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Family:
    model_type: str
    is_decoder: bool

    @property
    def padding_side(self) -> str:
        return "left" if self.is_decoder else "right"

    @property
    def attention_targets(self) -> list[str]:
        if self.is_decoder:
            return list(_DECODER_ATTENTION_TARGETS)
        return list(_ATTENTION_TARGETS.get(self.model_type, _ATTENTION_TARGETS["bert"]))

    @property
    def linear_targets(self) -> list[str]:
        """Attention and MLP projections (decoders); encoders keep the attention ones."""
        return self.attention_targets + (list(_DECODER_MLP_TARGETS) if self.is_decoder else [])


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", "") or ""
    return Family(model_type=model_type, is_decoder=model_type not in ENCODER_TYPES)
