"""Feed-forward layers with the activation fused into the first linear layer, for inference on CPU.

A transformer's feed-forward block spends a pass over its largest activation (tokens x the
intermediate size) on the activation function alone: BERT's `gelu(dense(x))`, Qwen3's
`silu(gate_proj(x)) * up_proj(x)`. oneDNN applies the activation inside the matrix product
(`torch.ops.mkldnn._linear_pointwise` with a GELU or swish post-op): erf GELU gives the same
values as the two steps, bit for bit; SiLU differs from torch's by float rounding (about 1e-7).

`fuse_feed_forward(model)` gives each such block of a loaded model a forward that takes the fused
path only where it changes nothing but speed and that rounding: fp32 tensors on the CPU, no
gradient being recorded, the module in eval mode, and no tracer or exporter (TorchScript, ONNX,
torch.compile) running, since those need the plain operations. Anything else runs the block's own forward.
Blocks whose linear layers are not plain `nn.Linear` (a LoRA adapter wraps them) are left alone.
"""

from __future__ import annotations

import types


def fused_linear_available() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain_linear(module) -> bool:
    import torch

    return type(module) is torch.nn.Linear


def _exact_gelu(act) -> bool:
    import torch

    if type(act).__name__ == "GELUActivation":
        return getattr(act, "act", None) is torch.nn.functional.gelu
    return type(act) is torch.nn.GELU and act.approximate == "none"


def _silu(act) -> bool:
    import torch

    return type(act).__name__ == "SiLUActivation" or type(act) is torch.nn.SiLU


def _fusable(module, x) -> bool:
    """The fused path may run here: inference in fp32 on the CPU, no tracer (see the module's docstring)."""
    import torch

    return (not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export())


def _gelu_forward(self, hidden_states):
    """BERT-style intermediate block: gelu(dense(x))."""
    import torch

    dense = self.dense
    if _fusable(self, hidden_states) and dense.weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(hidden_states, dense.weight, dense.bias, "gelu", [], "none")
    return self._qtune_unfused_forward(hidden_states)


def _gated_silu_forward(self, x):
    """Llama/Qwen-style gated block: down_proj(silu(gate_proj(x)) * up_proj(x))."""
    import torch

    gate = self.gate_proj
    if _fusable(self, x) and gate.weight.dtype == torch.float32:
        gated = torch.ops.mkldnn._linear_pointwise(x, gate.weight, gate.bias, "swish", [], "")
        return self.down_proj(gated.mul_(self.up_proj(x)))
    return self._qtune_unfused_forward(x)


def fuse_feed_forward(model) -> int:
    """Give each fusable feed-forward block of `model` the fused forward (see the module's
    docstring); the number of blocks changed. Idempotent; nothing changes where oneDNN's fused
    linear is missing."""
    if not fused_linear_available():
        return 0
    changed = 0
    for module in model.modules():
        if hasattr(module, "_qtune_unfused_forward"):
            continue
        forward = None
        if (_plain_linear(getattr(module, "dense", None))
                and _exact_gelu(getattr(module, "intermediate_act_fn", None))):
            forward = _gelu_forward
        elif (all(_plain_linear(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj"))
              and _silu(getattr(module, "act_fn", None))):
            forward = _gated_silu_forward
        if forward is not None:
            module._qtune_unfused_forward = module.forward
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed
