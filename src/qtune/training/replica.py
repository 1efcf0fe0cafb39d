"""This process's copy of the model during training, through Hugging Face accelerate when a launcher
(torchrun, accelerate launch) started the run, and the plain model otherwise.

Launched, the model is prepared by `accelerate.Accelerator`: DDP by default (every rank holds the
whole model, gradients are averaged over ranks in the backward pass), DeepSpeed ZeRO with
`--deepspeed ds_config.json`, FSDP when `accelerate launch --config_file` says so. A task's loss
touches the model in its own ways (several forward passes per loss, packed inputs, GradCache), so
every forward pass that builds a graph goes through `Replica.run(fn, ...)`: one call of the prepared
module's forward that runs `fn(model, ...)`, which is what DDP needs to see to synchronise the
gradients of that pass. Forward passes without a graph (GradCache's first pass, evaluation) use the
plain model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from qtune.distributed import init_process_group, launch
from qtune.errors import QtuneError


def _forward_module():
    import torch

    class Forward(torch.nn.Module):
        """Holds the model; forward(fn, *args) = fn(model, *args)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, fn, *args):
            return fn(self.model, *args)

    return Forward


class Replica:
    def __init__(self, model, optimizer, *, deepspeed: str | None = None, bf16: bool = False, batch_size: int = 1,
                 grad_accum: int = 1, max_grad_norm: float = 0.0):
        self.model = model  # the plain model: no-graph passes, evaluation, saving
        self.optimizer = optimizer
        self.launch = launch()
        self.accelerator = None
        self._prepared = None
        if not self.launch.launched and not deepspeed:
            return
        if self.launch.launched:
            init_process_group()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        plugin = deepspeed_plugin(deepspeed, batch_size=batch_size, grad_accum=grad_accum,
                                  max_grad_norm=max_grad_norm, bf16=bf16) if deepspeed else None
        device = next(model.parameters()).device
        # Parameters a task's loss never touches (e.g. BERT's pooler under mean pooling) get no
        # gradient; DDP must be told to look for them.
        self.accelerator = Accelerator(cpu=device.type == "cpu", deepspeed_plugin=plugin,
                                       mixed_precision="bf16" if bf16 and plugin is not None else "no",
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self._prepared, self.optimizer = self.accelerator.prepare(_forward_module()(model), optimizer)

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    def run(self, fn, *args, sync: bool = True):
        """fn(model, *args) as one forward pass of the prepared module; `sync=False` for a pass whose
        gradients are to be added to before they are averaged over ranks (accumulation, GradCache)."""
        if self._prepared is None:
            return fn(self.model, *args)
        context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self._prepared)
        with context:
            return self._prepared(fn, *args)

    def backward(self, loss) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def backward_through(self, fn, args: tuple, grad, *, sync: bool) -> None:
        """Push `grad` (the gradient of the loss w.r.t. fn's output) back through one pass of fn:
        GradCache's second pass. Written as the backward of sum(output * grad), which has exactly
        that gradient and is a scalar, as DeepSpeed's engine wants."""
        if self._prepared is None:
            fn(self.model, *args).backward(grad)
            return
        context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self._prepared)
        with context:
            out = self._prepared(fn, *args)
            self.accelerator.backward((out * grad).sum())

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.accelerator is None:
            import torch

            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            self.accelerator.clip_grad_norm_(self._prepared.parameters(), max_norm)

    def full_state_dict(self) -> dict | None:
        """The whole model's weights when they are sharded over ranks (FSDP, ZeRO-3), gathered with
        every rank taking part (call it on all of them); None when the plain model holds them."""
        if self.accelerator is None:
            return None
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        sharded = kind == DistributedType.FSDP or (
            kind == DistributedType.DEEPSPEED and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        if not sharded:
            return None
        state = self.accelerator.get_state_dict(self._prepared)
        return {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def deepspeed_plugin(path: str, *, batch_size: int, grad_accum: int, max_grad_norm: float, bf16: bool):
    """accelerate's DeepSpeedPlugin for a DeepSpeed config file, the config's "auto" values filled
    from qtune's settings."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=fill_auto(read_deepspeed_config(path), batch_size=batch_size,
                                                  grad_accum=grad_accum, max_grad_norm=max_grad_norm, bf16=bf16,
                                                  world_size=launch().world_size))


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed config file as a dict; a missing or malformed file, or DeepSpeed not installed,
    is a clear error (called before any work by `start_run`)."""
    file = Path(path)
    if not file.is_file():
        raise QtuneError(f"--deepspeed {path}: no such file")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtuneError(f"--deepspeed {path}: not a JSON DeepSpeed config ({e})") from None
    if not isinstance(config, dict):
        raise QtuneError(f"--deepspeed {path}: a DeepSpeed config is a JSON object")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise QtuneError("--deepspeed needs the DeepSpeed package: pip install 'qtune[deepspeed]'")
    return config


def fill_auto(config: dict, *, batch_size: int, grad_accum: int, max_grad_norm: float, bf16: bool,
              world_size: int) -> dict:
    """A DeepSpeed config with its "auto" values set from qtune's flags (batch sizes, accumulation,
    clipping, bf16): qtune builds its own batches, so DeepSpeed cannot infer them from a data loader."""
    filled = json.loads(json.dumps(config))
    values = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
              "train_batch_size": batch_size * grad_accum * world_size, "gradient_clipping": max_grad_norm}
    for key, value in values.items():
        if filled.get(key, "auto") == "auto":
            filled[key] = value
    for key, on in (("bf16", bf16), ("fp16", False)):
        section = filled.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = on
    return filled
