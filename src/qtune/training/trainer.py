"""The training loop every task uses: AdamW, schedules, gradient accumulation, bf16 autocast,
length-grouped dynamic batches, periodic evaluation with best/ and last/ checkpoints,
TensorBoard logs, a progress bar with throughput, and exact resume after a stop or crash.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qtune.config import TrainConfig
from qtune.data.batching import length_grouped_batches
from qtune.errors import QtuneError
from qtune.io import write_json
from qtune.modeling.checkpoint import save_checkpoint
from qtune.modeling.loading import LoadedModel, to_device
from qtune.modeling.packing import count_tokens
from qtune.training.schedulers import make_scheduler

STATE_FILE = "trainer_state.pt"


@dataclass
class TaskHooks:
    """What the loop needs from a task."""

    collate: Callable[[Sequence[dict]], dict]  # unpadded features -> padded tensors
    loss: Callable[[object, dict], object]  # (model, batch) -> scalar loss tensor
    evaluate: Callable[[LoadedModel], dict] | None  # -> metrics; None when there is no eval data
    best_metric: str  # higher is better
    # epoch -> batches of feature indices; default: length-grouped batches of config.batch_size
    batches: Callable[[int], list[list[int]]] | None = None
    # (model, batch, scale) -> detached loss, for tasks that run their own backward (GradCache)
    backward: Callable[[object, dict, float], object] | None = None


@dataclass
class Progress:
    """Where the run stands; saved in last/ so a stopped run continues exactly where it was."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    best_value: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def fit(config: TrainConfig, loaded: LoadedModel, features: Sequence[dict], hooks: TaskHooks,
        resume_state: Path | None = None, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train `loaded.model` on `features`; write best/, last/, runs/ and metrics.json under config.output.

    `on_step`, if given, is called after every optimizer step with the running counts
    (step, samples, tokens), e.g. for benchmarks.
    """
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    output = Path(config.output)
    model = loaded.model
    if hooks.batches is None:
        lengths = [len(f["input_ids"]) for f in features]

        def batches_for(epoch: int) -> list[list[int]]:
            return length_grouped_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch,
                                          group_by_length=getattr(config, "group_by_length", True))
    else:
        batches_for = hooks.batches
    batches_per_epoch = len(batches_for(0))
    total_batches = max(1, math.ceil(batches_per_epoch * config.epochs))
    full_epochs, rest = divmod(total_batches, batches_per_epoch)
    total_steps = full_epochs * math.ceil(batches_per_epoch / config.grad_accum) + math.ceil(rest / config.grad_accum)

    # fused: one kernel per step for all parameters on a GPU instead of several per tensor
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  fused=loaded.device.type == "cuda")
    scheduler = make_scheduler(optimizer, config.scheduler, total_steps, config.warmup_ratio,
                               patience=config.plateau_patience, factor=config.plateau_factor)
    progress = Progress()
    rng_state = torch.get_rng_state()
    if resume_state is not None:
        state = load_trainer_state(resume_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**state["progress"])
        rng_state = state["torch_rng"]
        torch.set_rng_state(rng_state)
    else:
        torch.manual_seed(config.seed)
        rng_state = torch.get_rng_state()

    def save_last() -> None:
        def write_state(path: Path) -> None:
            torch.save(plain_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "progress": progress.__dict__, "torch_rng": rng_state}), path)

        save_checkpoint(loaded, output / "last", {STATE_FILE: write_state})

    def evaluate_and_save() -> dict:
        metrics = hooks.evaluate(loaded) if hooks.evaluate else {}
        record = {"step": progress.step, "epoch": round(progress.epoch + progress.batches_done / batches_per_epoch, 4),
                  **metrics}
        progress.history.append(record)
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"eval/{name}", value, progress.step)
        if hooks.best_metric in metrics:
            value = metrics[hooks.best_metric]
            if config.scheduler == "plateau":
                scheduler.step(value)
            if progress.best_value is None or value > progress.best_value:
                progress.best_value, progress.best_step = value, progress.step
                save_checkpoint(loaded, output / "best")
        save_last()
        model.train()
        return record

    writer = SummaryWriter(log_dir=str(output / "runs"))
    done_batches = progress.epoch * batches_per_epoch + progress.batches_done
    bar = tqdm(total=total_batches, initial=min(done_batches, total_batches), desc="train", unit="batch",
               dynamic_ncols=True)
    samples = tokens = 0
    started = time.perf_counter()
    saved_step = progress.step
    model.train()
    try:
        while done_batches < total_batches:
            order = batches_for(progress.epoch)
            for batch_idx in order[progress.batches_done:]:
                batch = hooks.collate([features[i] for i in batch_idx])
                # counted on the host copy: no device sync
                tokens += count_tokens(batch)
                # plain Python values (e.g. how many logits to keep) stay on the host
                batch = to_device(batch, loaded.device)
                with loaded.autocast():
                    if hooks.backward is not None:
                        loss = hooks.backward(model, batch, 1.0 / config.grad_accum)
                    else:
                        loss = hooks.loss(model, batch)
                if hooks.backward is None:
                    (loss / config.grad_accum).backward()
                samples += len(batch_idx)
                done_batches += 1
                progress.batches_done += 1
                bar.update(1)
                end_of_epoch = progress.batches_done == len(order)
                finished = done_batches >= total_batches
                # An epoch's last, shorter accumulation still makes a step, so no gradient is carried
                # across an epoch boundary (and a checkpoint there is exact).
                if progress.batches_done % config.grad_accum and not (end_of_epoch or finished):
                    continue
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                if config.scheduler != "plateau":
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                rng_state = torch.get_rng_state()
                if on_step is not None:
                    on_step({"step": progress.step, "samples": samples, "tokens": tokens})
                if end_of_epoch:
                    progress.epoch += 1
                    progress.batches_done = 0
                if progress.step % config.logging_steps == 0 or finished:
                    loss_value = float(loss.detach())
                    elapsed = time.perf_counter() - started
                    writer.add_scalar("train/loss", loss_value, progress.step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], progress.step)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    samples_s=f"{samples / elapsed:.1f}", tok_s=f"{tokens / elapsed:.0f}")
                due = (progress.step % config.eval_steps == 0) if config.eval_steps else end_of_epoch
                if due or finished:
                    record = evaluate_and_save()
                    saved_step = progress.step
                    if hooks.evaluate:
                        bar.write(_format_record(record))
                if finished or end_of_epoch:
                    break
    except KeyboardInterrupt:
        # Weights only change at optimizer steps: drop the micro-batches of an unfinished
        # accumulation, save, and let --resume continue from exactly here.
        if progress.step > saved_step:
            progress.batches_done -= progress.batches_done % config.grad_accum
            save_last()
        raise
    finally:
        bar.close()
        writer.close()

    if hooks.evaluate is None or progress.best_step is None:
        save_checkpoint(loaded, output / "best")
    elapsed = time.perf_counter() - started
    result = {
        "best": next((r for r in progress.history if r["step"] == progress.best_step), None),
        "last": progress.history[-1] if progress.history else None,
        "best_metric": hooks.best_metric,
        "history": progress.history,
        "train": {"steps": progress.step, "samples": samples, "tokens": tokens, "seconds": round(elapsed, 3),
                  "samples_per_s": round(samples / elapsed, 2) if elapsed else None,
                  "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None},
    }
    write_json(output / "metrics.json", result)
    return result


def plain_state(value):
    """`value` with numpy scalars and arrays (metrics often are) as Python numbers and tensors, so
    the state file holds only what `torch.load(weights_only=True)` reads back."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {k: plain_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_state(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def load_trainer_state(path: Path) -> dict:
    """The trainer state saved in last/, read as data only (`weights_only=True`): unpickling anything
    else would run whatever code a crafted or swapped file carries. A QtuneError when it is not a
    state this loop wrote."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise QtuneError(f"{path}: refused to load: it holds more than the plain data (tensors, numbers, text, "
                         "lists, dicts) a qtune trainer state holds, so it is damaged or was changed, perhaps to "
                         "run code when read; start a new run instead of --resume") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        detail = str(e) or "the file ends too soon"
        raise QtuneError(f"{path}: not a trainer state qtune can read ({detail}); start a new run instead of "
                         "--resume") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "progress", "torch_rng"} <= set(state):
        raise QtuneError(f"{path}: not a trainer state qtune wrote (it lacks the optimizer, scheduler, progress "
                         "or RNG state); start a new run instead of --resume")
    return state


def _format_record(record: dict) -> str:
    shown = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    return "eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise QtuneError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
