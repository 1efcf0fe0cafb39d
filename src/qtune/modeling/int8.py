"""CPU int8 inference through ONNX Runtime, behind the same model interface.

`quantize_int8(loaded)` exports the loaded encoder (LoRA merged first) to ONNX, quantizes the
weights of its matrix multiplications to int8 (dynamic quantization: int8 weights per output
channel, activations quantized on the fly per batch) and swaps `loaded.model` for an
`OnnxModel`, which is called like the transformers model (`model(**batch).last_hidden_state` or
`.logits`, a mean-pooled classifier's pooling included) and returns torch tensors. Tokenization, padding, pooling and heads' post-processing
stay the same code as in fp32, so `Embedder`, `PairClassifier` and cross-encoder `Reranker` work
unchanged, in `qtune eval`, `predict` and `serve` alike (`--quantize int8`).

Only BERT-family encoders are exported; decoders (Qwen3) stay in PyTorch. Install with
`pip install "qtune[int8]"` (onnxruntime, onnx).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from qtune.errors import QtuneError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OnnxModel:
    """An ONNX Runtime session that answers `model(**batch)` like a transformers model (inference only)."""

    def __init__(self, session, config, output: str):
        self.session, self.config, self.output = session, config, output
        self.input_names = [i.name for i in session.get_inputs()]
        self.training = False

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise QtuneError("an int8 (ONNX Runtime) model runs inference only; load it without --quantize to train")
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self

    def __call__(self, **inputs):
        import torch

        feed = {}
        for name in self.input_names:
            value = inputs.get(name)
            if value is None:  # e.g. token_type_ids left out by a caller: the model's default is zeros
                value = torch.zeros_like(inputs["input_ids"])
            feed[name] = value.detach().cpu().numpy().astype(np.int64)
        out = self.session.run([self.output], feed)[0]
        return SimpleNamespace(**{self.output: torch.from_numpy(out)})


def _export_module(model, output: str):
    """A module taking the tokenizer's tensors positionally (what the ONNX exporter traces). Logits
    are the classification head's as qtune computes them (`class_logits`), so a classifier that
    pools the mean of the last hidden state has that pooling in the graph too."""
    import torch

    from qtune.modeling.heads import class_logits

    class Exported(torch.nn.Module):
        def __init__(self, inner, names):
            super().__init__()
            self.inner, self.names = inner, names

        def forward(self, *tensors):
            inputs = dict(zip(self.names, tensors))
            if output == "logits":
                return class_logits(self.inner, inputs)
            return getattr(self.inner(**inputs), output)

    return Exported


def quantize_int8(loaded, *, output: str | None, threads: int | None = None, int8: bool = True):
    """Replace `loaded.model` by an int8 ONNX Runtime model of it; returns `loaded`.

    `output` is the model output the task reads ("last_hidden_state", "logits"; None: the task
    has no int8 path). `int8=False` keeps the exported fp32 graph (the export alone, e.g. to check it)."""
    import torch

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise QtuneError("--quantize int8 needs ONNX Runtime: pip install 'qtune[int8]' (onnxruntime, onnx)") from None
    task = loaded.meta.task
    if loaded.family.is_decoder or output is None:
        raise QtuneError(f"--quantize int8 is available for BERT-family encoders (embedding, pair-cls, "
                         f"cross-encoder reranker); '{loaded.meta.base_model}' is a {loaded.family.model_type} "
                         f"{task} model")
    if loaded.device.type != "cpu":
        raise QtuneError("--quantize int8 runs on the CPU; use --device cpu (on a GPU, bf16 is the fast path)")
    model = loaded.model
    if loaded.is_adapter:
        model = model.merge_and_unload()
    model = model.float().eval()
    probe = loaded.tokenizer(["a probe text", "a longer probe text for the exporter"], padding=True,
                             return_tensors="pt")
    names = [n for n in MODEL_INPUTS if n in probe]
    module = _export_module(model, output)(model, names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}
    with tempfile.TemporaryDirectory(prefix="qtune-int8-") as tmp:
        fp32_path, int8_path = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx")
        # The probe batch is padded, so the traced graph always applies the attention mask; the
        # tracer's warnings about Python branches are about exactly that choice.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(probe[n] for n in names), str(fp32_path), input_names=names,
                              output_names=[output], dynamic_axes=axes, opset_version=17, dynamo=False)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
        try:  # only the matrix multiplications: int8 embeddings and norms cost accuracy, gain nothing
            if int8:
                quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            logging.getLogger().setLevel(quiet)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the same thread budget as PyTorch (torch.set_num_threads / OMP_NUM_THREADS)
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = ort.InferenceSession(str(int8_path if int8 else fp32_path), options,
                                       providers=["CPUExecutionProvider"])
    loaded.model = OnnxModel(session, model.config, output)
    loaded.packed = False  # the graph takes padded batches
    loaded.precision = "int8" if int8 else "fp32"
    return loaded
