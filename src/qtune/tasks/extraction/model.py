"""The extractor: greedy generation of a JSON answer per text, and the SFT loss on the answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qtune.modeling.inference import InferenceModel
from qtune.records import ExtractionExample
from qtune.tasks.extraction.encode import IGNORE_INDEX, PromptBuilder


def answer_tokens(batch: dict) -> int:
    """How many answer tokens `loss` averages over in a collated batch (padded or packed)."""
    if "answer_targets" in batch:
        return int(batch["answer_targets"].numel())
    return int((batch["labels"] != IGNORE_INDEX).sum())


def loss(model, batch: dict):
    """Mean cross-entropy over the answer tokens of the batch (next-token, shifted).

    Packed: the LM head runs only at the positions that predict an answer token.
    """
    import torch.nn.functional as F

    from qtune.modeling.packing import head_model, is_packed, packed_hidden

    if is_packed(batch):
        hidden = packed_hidden(model, batch)  # (tokens, hidden)
        logits = head_model(model).lm_head(hidden[batch["answer_positions"]]).float()  # (answer tokens, vocab)
        return F.cross_entropy(logits, batch["answer_targets"])

    keep = batch.get("logits_to_keep", batch["input_ids"].shape[1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=keep).logits  # (rows, keep, vocab): positions width-keep .. width-1
    labels = batch["labels"][:, batch["labels"].shape[1] - keep + 1:]  # what each kept position predicts
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class Generation:
    text: str  # the answer, special tokens removed
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    tokens: int  # tokens generated, EOS included


def generate(loaded, prompts: Sequence[list[int]], *, batch_size: int = 16, max_new_tokens: int = 256,
             progress: bool = False) -> list[Generation]:
    """Greedy answers to token-id prompts, in input order; batches are length-sorted (longest
    first), left-padded.

    The loop `transformers`' greedy `generate` runs, with the same inputs (left padding, position
    ids counted over the real tokens, a KV cache, only the last position's logits), so the same
    tokens, less its per-step work: the argmax is taken on the logits as computed (no float32 copy
    of them, no logits processors or stopping criteria), by `max`, which finds the same first
    largest index faster than `argmax` on the CPU."""
    import torch
    from transformers import DynamicCache

    tokenizer, model = loaded.tokenizer, loaded.model
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stop = sorted({eos, *([model.config.eos_token_id] if isinstance(model.config.eos_token_id, int)
                          else model.config.eos_token_id or [])} - {None})
    stops = torch.tensor(stop, device=loaded.device)
    results: list[Generation | None] = [None] * len(prompts)
    with loaded.inference():
        for idx in loaded.sorted_batches([len(p) for p in prompts], batch_size=batch_size, desc="generate",
                                         progress=progress):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=loaded.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                device=loaded.device)
            positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
            cache = DynamicCache(config=model.config)
            done = torch.zeros(len(idx), dtype=torch.bool, device=loaded.device)
            new: list = []
            step_ids = ids
            for _ in range(max_new_tokens):
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].max(-1).indices
                token = torch.where(done, torch.full_like(token, pad), token)  # finished rows are padded
                new.append(token)
                done |= torch.isin(token, stops)
                if len(new) == max_new_tokens or bool(done.all()):
                    break
                step_ids = token[:, None]
                mask = torch.cat([mask, mask.new_ones(len(idx), 1)], dim=1)
                positions = positions[:, -1:] + 1
            rows = torch.stack(new, dim=1).tolist()
            for row, i in zip(rows, idx):
                end = next((k for k, t in enumerate(row) if t in stop), None)
                tokens = row if end is None else row[:end + 1]
                text = tokenizer.decode(tokens[:end] if end is not None else tokens, skip_special_tokens=True)
                results[i] = Generation(text=text.strip(), finished=end is not None, tokens=len(tokens))
    return results


@dataclass(frozen=True)
class Extraction:
    output: object | None  # the parsed JSON value; None when the answer did not parse
    error: str | None
    text: str  # the raw answer
    tokens: int = 0  # tokens generated, EOS included


class Extractor(InferenceModel):
    """A loaded extraction model: `extract(texts)` -> parsed JSON per text. Its batch function is
    greedy generation over left-padded prompts (`generate`), not `forward`."""

    batch_calls = frozenset({"extract_examples"})
    micro_batched = False  # the server runs one generate() per request

    def __init__(self, loaded):
        super().__init__(loaded)
        self.builder = PromptBuilder(loaded.tokenizer, loaded.meta.settings.instruction)

    def features(self, examples: Sequence[ExtractionExample], *, truncate: bool = True) -> list[list[int]]:
        """The prompt token ids of each example (its input with its own instruction), as trained;
        what `extract_examples` sorts by. Prompts are never cut (`truncate` changes nothing)."""
        return [self.builder.prompt_ids(e.input, e.instruction) for e in examples]

    def extract(self, texts: Sequence[str], *, instructions: Sequence[str | None] | None = None,
                batch_size: int = 16, max_new_tokens: int = 256, progress: bool = False) -> list[Extraction]:
        instructions = instructions or [None] * len(texts)
        prompts = [self.builder.prompt_ids(t, i) for t, i in zip(texts, instructions)]
        return self.extract_prompts(prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)

    def extract_prompts(self, prompts: Sequence[list[int]], *, batch_size: int = 16, max_new_tokens: int = 256,
                        progress: bool = False) -> list[Extraction]:
        """`extract` for prompts already built with `self.builder.prompt_ids`."""
        from qtune.evaluation.extraction import parse_answer

        results = []
        for gen in generate(self.loaded, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            progress=progress):
            value, error = parse_answer(gen.text)
            if error is not None and not gen.finished:
                error = f"stopped at max_new_tokens={max_new_tokens} before the answer ended; {error}"
            results.append(Extraction(value, error, gen.text, gen.tokens))
        return results

    def extract_examples(self, examples: Sequence[ExtractionExample], **kwargs) -> list[Extraction]:
        """`extract` of each example's input with its own instruction (the model's default if None)."""
        return self.extract([e.input for e in examples], instructions=[e.instruction for e in examples], **kwargs)
