"""`qtune train extract`: supervised fine-tuning of a causal LM to answer with JSON."""

from __future__ import annotations

from collections import Counter
from functools import partial

from qtune.data.extraction import read_extraction
from qtune.evaluation.extraction import extraction_metrics
from qtune.errors import QtuneError
from qtune.modeling.loading import LoadedModel
from qtune.tasks.base import TrainedRun
from qtune.tasks.extraction.config import ExtractConfig
from qtune.tasks.extraction.encode import PromptBuilder, collate, encode_examples
from qtune.tasks.extraction.model import Extractor, answer_tokens, loss
from qtune.training.run import eval_dev_set, resume_state, start_run
from qtune.training.trainer import TaskHooks, fit


def train(task, config: ExtractConfig, on_step=None) -> TrainedRun:
    if config.dev_fraction:
        raise QtuneError("train extract takes its dev set from --eval (a held-out file); --dev-fraction is for "
                         "embedding, reranker, classify and pair-cls")
    examples = read_extraction(config.train)
    eval_examples = read_extraction(config.eval) if config.eval else None
    loaded = start_run(config, task, validate=lambda m: PromptBuilder(m.tokenizer))
    if not config.resume:
        given = Counter(e.instruction for e in examples if e.instruction)
        loaded.meta.settings.instruction = config.instruction or (given.most_common(1)[0][0] if given else None)
    if config.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    builder = PromptBuilder(loaded.tokenizer, loaded.meta.settings.instruction)
    features, too_long = encode_examples(builder, examples, config.max_length, config.train)
    if too_long:
        shown = ", ".join(str(line) for line in too_long[:10]) + (" ..." if len(too_long) > 10 else "")
        print(f"{len(too_long)} of {len(examples)} training examples are longer than --max-length "
              f"{config.max_length} and are left out (lines {shown})")
    evaluate = None
    if eval_examples is not None:
        def evaluate(model: LoadedModel) -> dict:
            found = Extractor(model).extract_examples(eval_examples, batch_size=config.eval_batch_size,
                                                      max_new_tokens=config.max_new_tokens)
            return extraction_metrics([e.output for e in eval_examples], [r.output for r in found])

    hooks = TaskHooks(collate=partial(collate, loaded.tokenizer, packed=loaded.packs), loss=loss,
                      evaluate=evaluate, best_metric="all_fields_exact", loss_units=answer_tokens,
                      dev=eval_dev_set(config, len(eval_examples or ()), "records"))
    return TrainedRun(loaded, fit(config, loaded, features, hooks, resume_state=resume_state(config),
                                  on_step=on_step))
