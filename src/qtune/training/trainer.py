"""The training loop every task uses: AdamW, schedules, gradient accumulation, bf16 autocast,
length-grouped dynamic batches, periodic evaluation with best/ and last/ checkpoints, experiment
tracking (TensorBoard by default), a progress bar with throughput, and exact resume after a stop
or crash.

Under torchrun / accelerate launch the same loop runs in every process (`Replica`): each micro-step
takes one global batch of `--batch-size` x processes rows (the task's sampler builds it, so its
rules, e.g. no text twice, hold for the global batch), and each rank computes its contiguous share.
A rank's loss is weighted by its share of what the loss averages over (rows, or answer tokens), so
the averaged gradient is the gradient of the global batch's mean loss, as one process with the
global batch would compute it.
Only rank 0 evaluates, writes checkpoints, logs and shows progress; the others wait for it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qtune.config import TrainConfig
from qtune.data.batching import length_grouped_batches
from qtune.distributed import all_gather_objects, broadcast_object, launch, shard_bounds
from qtune.errors import QtuneError
from qtune.io import write_json
from qtune.modeling.checkpoint import save_checkpoint
from qtune.modeling.heads import head_param_groups
from qtune.modeling.loading import LoadedModel, to_device
from qtune.modeling.packing import count_tokens
from qtune.training.replica import Replica
from qtune.training.schedulers import make_scheduler
from qtune.training.tracking import open_trackers
from qtune.training.verdict import DevSet, make_verdict, verdict_message

STATE_FILE = "trainer_state.pt"


@dataclass
class TaskHooks:
    """What the loop needs from a task."""

    collate: Callable[[Sequence[dict]], dict]  # unpadded features -> padded tensors
    loss: Callable[[object, dict], object]  # (model, batch) -> scalar loss tensor
    evaluate: Callable[[LoadedModel], dict] | None  # -> metrics; None when there is no eval data
    best_metric: str  # higher is better
    # (epoch, batch_size) -> batches of feature indices; default: length-grouped batches
    batches: Callable[[int, int], list[list[int]]] | None = None
    # (replica, batch, scale, sync) -> detached loss, for tasks that run their own backward (GradCache);
    # `sync`: the gradients are averaged over ranks after this batch
    backward: Callable[[Replica, dict, float, bool], object] | None = None
    # the loss already covers the global batch on every rank (cross-device negatives): no weighting
    global_loss: bool = False
    # what the loss is a mean over, counted in a collated batch (default: its rows); e.g. answer
    # tokens for a token-level loss, so the ranks' shares weigh what they hold
    loss_units: Callable[[dict], int] | None = None
    # the dev set `evaluate` scores (size, unit, source), for the base-vs-tuned verdict
    dev: DevSet | None = None
    # the figures to beat, before step 1: (name, model -> metrics). None: `evaluate` of the model as
    # loaded ("base"); a task whose head starts untrained gives a trivial predictor instead
    baseline: tuple[str, Callable[[LoadedModel], dict]] | None = None


@dataclass
class Progress:
    """Where the run stands; saved in last/ so a stopped run continues exactly where it was."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # (global) batches of `epoch` already consumed
    best_value: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    baseline: dict | None = None  # the dev figures of the starting point (see `TaskHooks.baseline`)
    evals_without_gain: int = 0  # for --early-stopping
    best_is_average: bool = False  # best/ holds the --average-from average, not a step's weights


def global_batches(batches: list[list[int]], world_size: int) -> list[list[int]]:
    """The batches every rank can take a share of: one with fewer rows than processes is left out."""
    return [b for b in batches if len(b) >= world_size]


def fit(config: TrainConfig, loaded: LoadedModel, features: Sequence[dict], hooks: TaskHooks,
        resume_state: Path | None = None, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train `loaded.model` on `features`; write best/, last/, runs/ and metrics.json under config.output.

    `on_step`, if given, is called after every optimizer step with the running counts
    (step, samples, tokens), e.g. for benchmarks.
    """
    loop = TrainingLoop(config, loaded, features, hooks, on_step)
    loop.resume(resume_state)
    return loop.run()


class TrainingLoop:
    """One training run, in the order a reader follows it: the plan (batches, steps, optimizer,
    schedule) in `__init__`, `resume`, then `run`: the baseline, `micro_step` for every batch
    (`optimizer_step` where an accumulation ends, `log`, `evaluate_and_save`), and `finish`."""

    def __init__(self, config: TrainConfig, loaded: LoadedModel, features: Sequence[dict], hooks: TaskHooks,
                 on_step: Callable[[dict], None] | None = None):
        import torch

        self.config, self.loaded, self.features, self.hooks, self.on_step = config, loaded, features, hooks, on_step
        self.output = Path(config.output)
        self.model = loaded.model
        self.where = launch()
        self.world, self.rank = self.where.world_size, self.where.rank
        self.batch_size = config.batch_size * self.world  # the global batch of one micro-step
        self.lengths = [len(f["input_ids"]) for f in features] if hooks.batches is None else None
        first_epoch = self.task_batches(0)
        self.batches_per_epoch = len(global_batches(first_epoch, self.world))
        if self.batches_per_epoch == 0:
            raise QtuneError(f"{len(features)} training rows cannot be shared by {self.world} processes: fewer rows "
                             "than processes")
        if self.where.launched:
            self._print_launch(len(first_epoch) - self.batches_per_epoch)
        self.total_batches, self.total_steps = self.plan_length()

        # fused: one kernel per step for all parameters on a GPU instead of several per tensor
        # a task's new head may train at its own rate (--head-lr); the body's groups come first
        groups = head_param_groups(self.model, _param_groups(self.model, config.weight_decay),
                                   getattr(config, "head_lr", None))
        optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=loaded.device.type == "cuda")
        self.scheduler = make_scheduler(optimizer, config.scheduler, self.total_steps, config.warmup_ratio,
                                        patience=config.plateau_patience, factor=config.plateau_factor)
        self.progress = Progress()
        self.replica = Replica(self.model, optimizer, deepspeed=getattr(config, "deepspeed", None),
                               bf16=loaded.precision == "bf16", batch_size=config.batch_size,
                               grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm)
        self.optimizer = self.replica.optimizer
        self.main = self.replica.is_main
        # --average-from: a running mean of the trainable weights over the steps after `average_start`
        share = getattr(config, "average_from", 0.0) or 0.0
        self.average_start = math.floor(self.total_steps * share) if share > 0 else None
        if self.average_start is not None and getattr(config, "deepspeed", None):
            raise QtuneError("--average-from keeps a copy of the whole trained weights in each process: it does not "
                             "work with --deepspeed (sharded weights); leave one of them out")
        self.average: dict | None = None
        self.averaged_steps = 0
        self.trackers = None
        self.rng_state = None
        self.samples = self.tokens = 0  # this process's counts since the (re)start
        self.started = 0.0

    # -- the plan --------------------------------------------------------------------------------

    def task_batches(self, epoch: int) -> list[list[int]]:
        """The task's batches of feature indices for `epoch` (default: length-grouped)."""
        if self.hooks.batches is not None:
            return self.hooks.batches(epoch, self.batch_size)
        return length_grouped_batches(self.lengths, self.batch_size, seed=self.config.seed, epoch=epoch,
                                      group_by_length=getattr(self.config, "group_by_length", True))

    def plan_length(self) -> tuple[int, int]:
        """Micro-batches and optimizer steps of the run: --epochs of the data, or more epochs (a
        fraction allowed) when those make fewer than --min-steps optimizer steps."""
        config, per_batches = self.config, self.batches_per_epoch
        per_epoch = math.ceil(per_batches / config.grad_accum)  # an epoch's last accumulation always steps

        def steps_of(batches: int) -> int:
            full_epochs, rest = divmod(batches, per_batches)
            return full_epochs * per_epoch + math.ceil(rest / config.grad_accum)

        batches = max(1, math.ceil(per_batches * config.epochs))
        steps = steps_of(batches)
        min_steps = getattr(config, "min_steps", 0)
        if steps < min_steps:
            full_epochs, rest = divmod(min_steps, per_epoch)
            batches = full_epochs * per_batches + min(rest * config.grad_accum, per_batches)
            steps = steps_of(batches)
            if self.where.is_main:
                print(f"{per_epoch} optimizer step(s) per epoch: training {steps} steps "
                      f"({batches / per_batches:.2f} epochs, --min-steps {min_steps}; --min-steps 0 for exactly "
                      f"--epochs {config.epochs:g})")
        return batches, steps

    def _print_launch(self, left_out: int) -> None:
        config, world = self.config, self.world
        print(f"{world} process{'es' if world > 1 else ''} x --batch-size {config.batch_size} = global batch "
              f"{self.batch_size}" + (f", x --grad-accum {config.grad_accum} = {self.batch_size * config.grad_accum} "
                                      "rows per optimizer step" if config.grad_accum > 1 else ""))
        if left_out:
            print(f"{left_out} batch(es) per epoch with fewer rows than the {world} processes are left out")

    def resume(self, resume_state: Path | None) -> None:
        """Continue from the state saved in last/ (optimizer, schedule, progress, each rank's RNG), or
        seed a new run."""
        import torch

        if resume_state is None:
            torch.manual_seed(self.config.seed + self.rank)  # dropout differs between ranks, as their rows do
        else:
            state = load_trainer_state(resume_state)
            saved_world = int(state.get("world_size", 1))
            if saved_world != self.world:
                raise QtuneError(f"{resume_state}: this run was saved by {saved_world} process(es) and is resumed "
                                 f"by {self.world}: the data order and random state are per process, so resume it "
                                 f"with {saved_world} (torchrun --nproc_per_node ...), or start a new run")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.progress = Progress(**state["progress"])
            if self.average_start is not None and state.get("average") is not None:
                self.average, self.averaged_steps = state["average"], int(state["averaged_steps"])
            ranks_rng = state.get("torch_rng_ranks") or [state["torch_rng"]]
            torch.set_rng_state(ranks_rng[self.rank])
        self.rng_state = torch.get_rng_state()

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm.auto import tqdm

        config, progress = self.config, self.progress
        self.trackers = open_trackers(getattr(config, "report_to", ["tensorboard"]), self.output, self.output.name,
                                      dataclasses.asdict(config), enabled=self.main)
        if self.hooks.evaluate is not None and progress.baseline is None and progress.step == 0:
            self.record_baseline()
        done = progress.epoch * self.batches_per_epoch + progress.batches_done
        self.bar = tqdm(total=self.total_batches, initial=min(done, self.total_batches), desc="train", unit="batch",
                        dynamic_ncols=True, disable=not self.main)
        self.started = time.perf_counter()
        self.saved_step = progress.step
        self.model.train()
        try:
            while done < self.total_batches:
                order = global_batches(self.task_batches(progress.epoch), self.world)
                for batch_idx in order[progress.batches_done:]:
                    end_of_epoch = progress.batches_done + 1 == len(order)
                    finished = done + 1 >= self.total_batches
                    stop = self.micro_step(batch_idx, end_of_epoch, finished)
                    done = self.total_batches if stop else done + 1
                    if stop or finished or end_of_epoch:  # an epoch's last batch always steps
                        break
        except KeyboardInterrupt:
            # Weights only change at optimizer steps: drop the micro-batches of an unfinished
            # accumulation, save, and let --resume continue from exactly here. (With several
            # processes a stopped rank cannot save with the others: they resume from the last save.)
            if progress.step > self.saved_step and not self.where.distributed:
                progress.batches_done -= progress.batches_done % config.grad_accum
                self.save_last()
            raise
        finally:
            self.bar.close()
            self.trackers.close()
        return self.finish()

    def record_baseline(self) -> None:
        """The dev figures before step 1, logged as step 0 of the eval curves."""
        self.progress.baseline = broadcast_object(_baseline(self.hooks, self.loaded) if self.main else None)
        self.trackers.log({f"eval/{k}": v for k, v in self.progress.baseline.items() if isinstance(v, (int, float))},
                          0)
        self.model.train()

    def micro_step(self, batch_idx: list[int], end_of_epoch: bool, finished: bool) -> bool:
        """Forward and backward of this rank's share of one global batch, then the optimizer step
        where an accumulation ends. True: early stopping ends the run here."""
        config, hooks, progress, world = self.config, self.hooks, self.progress, self.world
        start, end = shard_bounds(len(batch_idx), world, self.rank)
        mine = batch_idx[start:end]
        batch = hooks.collate([self.features[i] for i in mine])
        # the rank's share of the global batch's mean loss (1 with one process)
        weight = 1.0
        if world > 1 and not hooks.global_loss:
            units = all_gather_objects(int(hooks.loss_units(batch)) if hooks.loss_units else len(mine))
            weight = units[self.rank] * world / max(1, sum(units))
        self.tokens += count_tokens(batch)  # counted on the host copy: no device sync
        # plain Python values (e.g. how many logits to keep) stay on the host
        batch = to_device(batch, self.loaded.device)
        # An epoch's last, shorter accumulation still makes a step, so no gradient is carried
        # across an epoch boundary (and a checkpoint there is exact).
        self.stepped = not (progress.batches_done + 1) % config.grad_accum or end_of_epoch or finished
        with self.loaded.autocast():
            if hooks.backward is not None:
                loss = hooks.backward(self.replica, batch, weight / config.grad_accum, self.stepped)
            else:
                loss = self.replica.run(hooks.loss, batch, sync=self.stepped)
        if hooks.backward is None:
            self.replica.backward(loss * (weight / config.grad_accum))
        self.samples += len(mine)
        progress.batches_done += 1
        self.bar.update(1)
        if not self.stepped:
            return False
        self.optimizer_step(end_of_epoch)
        if progress.step % config.logging_steps == 0 or finished:
            self.log(loss, weight)
        due = (progress.step % config.eval_steps == 0) if config.eval_steps else end_of_epoch
        if not (due or finished):
            return False
        record = self.evaluate_and_save()
        self.saved_step = progress.step
        if hooks.evaluate and self.main:
            self.bar.write(_format_record(record))
        stopping = getattr(config, "early_stopping", 0)
        if stopping and progress.evals_without_gain >= stopping and not finished:
            self.bar.write(f"early stop at step {progress.step}: {stopping} evaluation(s) without a better "
                           f"dev {hooks.best_metric} than step {progress.best_step}'s")
            return True
        return False

    def optimizer_step(self, end_of_epoch: bool) -> None:
        import torch

        config, progress = self.config, self.progress
        if config.max_grad_norm > 0:
            self.replica.clip_grad_norm(config.max_grad_norm)
        self.optimizer.step()
        if config.scheduler != "plateau":
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        if self.average_start is not None and progress.step > self.average_start:
            self.accumulate_average()
        self.rng_state = torch.get_rng_state()
        if self.on_step is not None:
            self.on_step({"step": progress.step, "samples": self.samples, "tokens": self.tokens})
        if end_of_epoch:
            progress.epoch += 1
            progress.batches_done = 0

    def log(self, loss, weight: float) -> None:
        """The global batch's mean loss (the ranks' weighted shares, averaged), lr and throughput."""
        world = self.world
        loss_value = sum(all_gather_objects(float(loss.detach()) * weight)) / world
        elapsed = time.perf_counter() - self.started
        lr = self.optimizer.param_groups[0]["lr"]
        self.trackers.log({"train/loss": loss_value, "train/lr": lr}, self.progress.step)
        self.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{self.samples * world / elapsed:.1f}",
                             tok_s=f"{self.tokens * world / elapsed:.0f}")

    # -- weight averaging (--average-from) --------------------------------------------------------

    def _trained(self):
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def accumulate_average(self) -> None:
        """Fold this step's trainable weights into the running mean (kept in fp32)."""
        import torch

        self.averaged_steps += 1
        with torch.no_grad():
            if self.average is None:
                self.average = {name: p.detach().float().clone() for name, p in self._trained()}
                return
            for name, p in self._trained():
                self.average[name].lerp_(p.detach().float(), 1.0 / self.averaged_steps)

    def score_average(self) -> None:
        """Score the averaged weights on the dev set; best/ becomes them when they beat the best
        step (or when nothing chooses: no dev set). The trained weights are put back after."""
        import torch

        hooks, progress = self.hooks, self.progress
        first = progress.step - self.averaged_steps + 1
        trained = {name: p.detach().clone() for name, p in self._trained()}
        with torch.no_grad():
            for name, p in self._trained():
                p.copy_(self.average[name].to(p.dtype))
        try:
            metrics = hooks.evaluate(self.loaded) if hooks.evaluate and self.main else {}
            metrics = broadcast_object(metrics)
            value = metrics.get(hooks.best_metric)
            record = {"step": progress.step, "average_of_steps": [first, progress.step], **metrics}
            progress.history.append(record)
            better = value is not None and (progress.best_value is None or value > progress.best_value)
            if better or hooks.evaluate is None:
                progress.best_value, progress.best_step, progress.best_is_average = value, progress.step, True
                self.save(self.output / "best")
            if self.main and value is not None:
                kept = "best/ is the average" if better else f"best/ stays step {progress.best_step}'s weights"
                print(f"weights averaged over steps {first}-{progress.step}: dev {hooks.best_metric} {value:.4f}; "
                      f"{kept}")
        finally:
            with torch.no_grad():
                for name, p in self._trained():
                    p.copy_(trained[name])
            self.model.train()

    # -- evaluation and checkpoints --------------------------------------------------------------

    def save(self, folder: Path, extra: dict | None = None) -> None:
        weights = self.replica.full_state_dict()  # every rank takes part when the weights are sharded
        if self.main:
            save_checkpoint(self.loaded, folder, extra, state_dict=weights)
        self.replica.barrier()

    def save_last(self) -> None:
        import torch

        rngs = all_gather_objects(self.rng_state)

        def write_state(path: Path) -> None:
            torch.save(plain_state({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                    "progress": self.progress.__dict__, "torch_rng": rngs[0], "torch_rng_ranks": rngs,
                                    "world_size": self.world, "average": self.average,
                                    "averaged_steps": self.averaged_steps}), path)

        self.save(self.output / "last", {STATE_FILE: write_state})

    def evaluate_and_save(self) -> dict:
        hooks, progress = self.hooks, self.progress
        metrics = hooks.evaluate(self.loaded) if hooks.evaluate and self.main else {}
        metrics = broadcast_object(metrics)  # the plateau schedule and the best step agree on every rank
        epoch = round(progress.epoch + progress.batches_done / self.batches_per_epoch, 4)
        record = {"step": progress.step, "epoch": epoch, **metrics}
        progress.history.append(record)
        self.trackers.log({f"eval/{name}": value for name, value in metrics.items() if isinstance(value, (int, float))},
                          progress.step)
        if hooks.best_metric in metrics:
            value = metrics[hooks.best_metric]
            if self.config.scheduler == "plateau":
                self.scheduler.step(value)
            if progress.best_value is None or value > progress.best_value:
                progress.best_value, progress.best_step = value, progress.step
                progress.evals_without_gain = 0
                self.save(self.output / "best")
            else:
                progress.evals_without_gain += 1
        self.save_last()
        self.model.train()
        return record

    def finish(self) -> dict:
        """best/ when nothing chose one, metrics.json (history, verdict, throughput), the verdict line."""
        hooks, progress, world = self.hooks, self.progress, self.world
        if self.averaged_steps:
            self.score_average()
        if (hooks.evaluate is None and not progress.best_is_average) or progress.best_step is None:
            self.save(self.output / "best")
        elapsed = time.perf_counter() - self.started
        counts = all_gather_objects((self.samples, self.tokens))
        samples, tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)
        result = {
            "best": best_record(progress),
            "last": next((r for r in reversed(progress.history) if "average_of_steps" not in r), None),
            "best_metric": hooks.best_metric,
            "history": progress.history,
            "baseline": progress.baseline,
            "verdict": _verdict(hooks, progress),
            "train": {"steps": progress.step, "samples": samples, "tokens": tokens, "seconds": round(elapsed, 3),
                      "samples_per_s": round(samples / elapsed, 2) if elapsed else None,
                      "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
                      "processes": world},
        }
        if self.main:
            write_json(self.output / "metrics.json", result)
            if result["verdict"] is not None:
                print(verdict_message(result["verdict"]),
                      file=sys.stderr if result["verdict"]["worse"] else sys.stdout)
        self.replica.barrier()
        return result


def best_record(progress: Progress) -> dict | None:
    """The evaluation record of best/: a step's, or the --average-from average's."""
    for record in reversed(progress.history):
        if record["step"] == progress.best_step and ("average_of_steps" in record) == progress.best_is_average:
            return record
    return None


def _baseline(hooks: TaskHooks, loaded: LoadedModel) -> dict:
    """The dev figures to beat, computed before step 1 (see `TaskHooks.baseline`)."""
    name, evaluate = hooks.baseline or ("base", hooks.evaluate)
    metrics = evaluate(loaded)
    shown = f"{metrics[hooks.best_metric]:.4f}" if hooks.best_metric in metrics else "n/a"
    size = f" on {hooks.dev.size} dev {hooks.dev.unit}" if hooks.dev else ""
    print(f"{name}: {hooks.best_metric} {shown}{size}, before training")
    return {"name": name, **metrics}


def _verdict(hooks: TaskHooks, progress: Progress) -> dict | None:
    """best/ against the baseline on the dev set; None without a dev set or when the run was resumed
    from a state saved before baselines were recorded."""
    best = best_record(progress)
    base = progress.baseline
    metric = hooks.best_metric
    if best is None or not base or metric not in best or metric not in base:
        return None
    dev = hooks.dev or DevSet(size=0, unit="rows", source="the dev set")
    return make_verdict(metric, float(best[metric]), float(base[metric]), base.get("name", "base"), dev)


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
